"""Tasks: model, data, loss and metric behind one interface (docs/design.md#layers).

Importing this package registers the built-in tasks: the offline ``synthetic`` and ``digits``
tasks, and the Hugging Face ``image-classification`` and ``text-classification`` tasks.
"""

from raflora.tasks import commonsense as commonsense
from raflora.tasks import digits as digits
from raflora.tasks import image as image
from raflora.tasks import math as math
from raflora.tasks import synthetic as synthetic
from raflora.tasks import text as text
from raflora.tasks.base import (
    Batch,
    ClassificationTask,
    Task,
    TaskError,
    available_tasks,
    build_task,
    move_batch,
    register_task,
)

__all__ = [
    "Batch",
    "ClassificationTask",
    "Task",
    "TaskError",
    "available_tasks",
    "build_task",
    "move_batch",
    "register_task",
]
