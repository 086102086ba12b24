"""The task interface: a model builder, a dataset, a loss and a metric (layer 4 of
docs/design.md#layers).

A :class:`Task` owns one frozen base model (built once, float32 on the CPU; the engine moves it),
the training examples (addressed by integer index so partitioners and engines never copy data),
the evaluation split, and the loss/metric. Engines only talk to this interface, so the local and
Flower engines train every task the same way.

Tasks are registered by name (:func:`register_task`) and built from a run configuration with
:func:`build_task`. A model or dataset that cannot be loaded raises :class:`TaskError` naming what
was asked for (the CLI turns it into one line and exit code 2).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raflora.schema import check_type, coerce, field_bounds, hints

if TYPE_CHECKING:
    from raflora.config import RunConfig

__all__ = [
    "Batch",
    "ClassificationTask",
    "Task",
    "TaskError",
    "available_tasks",
    "batch_rows",
    "build_task",
    "concat_batches",
    "move_batch",
    "parse_options",
    "register_task",
    "task_options_classes",
]

Batch = dict[str, Tensor]
"""A collated batch: model keyword arguments plus ``labels``."""


class TaskError(RuntimeError):
    """A task's model or dataset could not be built or loaded (message names what was asked)."""


class Task(ABC):
    """One federated fine-tuning task.

    Subclasses set :attr:`name`, build everything in ``__init__(config)`` and implement the
    abstract methods. Attributes every task sets:

    Attributes
    ----------
    model : nn.Module
        The base model on the CPU (frozen weights are fine; PEFT freezes them anyway), float32
        or, for large models, already in the run's ``dtype``.
    model_id : str
        Where the base model comes from: a hub name or a local directory that
        :meth:`load_base_model` (and ``PeftModel.from_pretrained``'s users) can load again.
    num_train : int
        Number of training examples (indices ``0 … num_train-1``).
    partition_labels : np.ndarray | None
        Integer class of each training example, used by the non-IID partitioners; ``None`` when
        the task has no labels to split by (only ``iid`` is then possible).
    target_modules : list[str] | str
        What ``lora.target_modules: all-linear`` means for this task: every linear layer of the
        backbone but not the new head (a list of names or a PEFT regex string). An explicit list
        in the config is used as given.
    modules_to_save : list[str] | None
        Modules trained in full and FedAvg-aggregated (a new classifier head), PEFT names.
    task_type : str | None
        PEFT task type (``"SEQ_CLS"`` for sequence classification, else ``None``).
    """

    name: ClassVar[str]
    Options: ClassVar[type | None] = None
    """The frozen dataclass of the task's ``task.options`` (``None``: it takes none); the JSON
    Schema and ``docs/configuration.md`` are generated from it."""

    supports_quantization: ClassVar[bool] = False
    """Whether the task loads its base through transformers, so that ``task.quantization`` can
    quantise it (:mod:`raflora.tasks.quantize`); a run asking it of another task is refused."""

    model: nn.Module
    model_id: str
    num_train: int
    partition_labels: np.ndarray | None
    target_modules: list[str] | str
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    @abstractmethod
    def train_batch(self, indices: Sequence[int]) -> Batch:
        """The collated training batch of the given example indices (CPU tensors)."""

    @abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The evaluation split in batches, always in the same order (CPU tensors)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Scalar training loss of ``model`` on ``batch`` (already on the model's device)."""

    #: Fill values when client batches are padded to a group's widest
    #: (:func:`concat_batches`); keys not listed pad with 0.
    group_pad_values: Mapping[str, int] = MappingProxyType({})

    def group_losses(self, model: nn.Module, batches: Sequence[Batch]) -> list[Tensor]:
        """Each batch's :meth:`loss` from ONE forward pass over their concatenation (the clients
        of a group trained together, docs/concurrency.md): the batches' rows are concatenated in
        order (:func:`concat_batches`) and the ``i``-th loss must equal ``loss(model,
        batches[i])`` (each batch's own mean, never a mean over the group). A task that cannot
        do this keeps this default, and ``train.concurrent_clients > 1`` is refused for it.
        """
        raise NotImplementedError(f"task {self.name!r} defines no group_losses")

    @abstractmethod
    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device) -> dict[str, float]:
        """Metrics of ``model`` on the evaluation split: at least ``accuracy`` and ``eval_loss``.

        Called under ``torch.no_grad`` with ``model.eval()``; deterministic.
        """

    @abstractmethod
    def load_base_model(self) -> nn.Module:
        """A fresh copy of the base model exactly as :attr:`model` was built (for export checks)."""

    def describe(self) -> dict[str, Any]:
        """Short facts about the task for the run summary."""
        return {
            "task": self.name,
            "model": self.model_id,
            "num_train": self.num_train,
            "num_classes": (
                None
                if self.partition_labels is None
                else int(np.unique(self.partition_labels).size)
            ),
        }


class ClassificationTask(Task):
    """A task whose model maps a batch to class logits: cross-entropy loss, accuracy metric.

    Subclasses implement :meth:`logits`; the loss and the metrics are computed in float32
    whatever the model's dtype.
    """

    @abstractmethod
    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """Class logits ``(batch, classes)`` of ``model`` on ``batch`` (labels are not used)."""

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean cross-entropy of the logits."""
        return F.cross_entropy(self.logits(model, batch).float(), batch["labels"])

    def group_losses(self, model: nn.Module, batches: Sequence[Batch]) -> list[Tensor]:
        """Each batch's mean cross-entropy, from one forward pass over their concatenation."""
        group, bounds = concat_batches(batches, self.group_pad_values)
        logits = self.logits(model, group).float()
        labels = group["labels"]
        return [F.cross_entropy(logits[lo:hi], labels[lo:hi]) for lo, hi in bounds]

    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device) -> dict[str, float]:
        """``accuracy`` and mean cross-entropy ``eval_loss`` over the evaluation split."""
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        total_loss, correct, count = 0.0, 0, 0
        with torch.no_grad():  # also when a caller forgot to disable autograd
            for cpu_batch in self.eval_batches(batch_size):
                batch = move_batch(cpu_batch, device, dtype)
                logits = self.logits(model, batch).float()
                labels = batch["labels"]
                total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                count += int(labels.numel())
        return {"accuracy": correct / count, "eval_loss": total_loss / count}


def move_batch(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
    """Move a batch to ``device``; floating tensors are cast to ``dtype`` when given."""
    out: Batch = {}
    for key, value in batch.items():
        if dtype is not None and value.is_floating_point():
            out[key] = value.to(device=device, dtype=dtype)
        else:
            out[key] = value.to(device=device)
    return out


def batch_rows(batch: Batch) -> int:
    """Number of examples (rows) in a batch: the first dimension of its tensors."""
    return int(next(iter(batch.values())).shape[0])


def concat_batches(
    batches: Sequence[Batch], pad_values: Mapping[str, int] | None = None
) -> tuple[Batch, list[tuple[int, int]]]:
    """Concatenate batches row-wise; ``(group, [(lo, hi) rows of each batch])``.

    Tensors whose trailing dimensions differ (token sequences of different lengths) are
    right-padded to the group's widest first, with ``pad_values[key]`` (default 0: an
    ``attention_mask`` of 0 hides the padding from the real tokens).
    """
    pad_values = pad_values or {}
    bounds: list[tuple[int, int]] = []
    lo = 0
    for batch in batches:
        rows = batch_rows(batch)
        bounds.append((lo, lo + rows))
        lo += rows
    group: Batch = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            widest = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
            fill = pad_values.get(key, 0)
            padded = []
            for p in parts:
                spec: list[int] = []
                for d in reversed(range(1, p.dim())):
                    spec += [0, widest[d - 1] - p.shape[d]]
                padded.append(F.pad(p, spec, value=fill))
            parts = padded
        group[key] = torch.cat(parts)
    return group, bounds


_O = TypeVar("_O")


def _type_words(tp: Any) -> str:
    """How an option type reads in a message (``int`` → ``an integer``)."""
    words = {int: "an integer", float: "a number", str: "a string"}
    if tp in words:
        return words[tp]
    if tp == (str | None):
        return "a string or null"
    return f"a list of {_type_words(typing.get_args(tp)[0]).split(' ', 1)[1]}s"


def parse_options(
    cls: type[_O], options: Mapping[str, Any], task: str, check: Callable[[_O], list[str]]
) -> _O:
    """``task.options`` as the options dataclass ``cls``, with every problem reported at once.

    Each key must be a field of ``cls`` and its value of the field's type (``int``, ``float``,
    ``str``, ``str | None`` or ``tuple[T, ...]``), checked and coerced by the schema's rules
    (:mod:`raflora.schema`: a bool is not an int, a float field takes an int or ``"1e-3"``, a
    list becomes the tuple) and within the field's bounds (:func:`~raflora.schema.setting`);
    missing keys take the field defaults. Then ``check`` lists the ranges bounds do not state.

    Raises
    ------
    TaskError
        ``"task '<task>': problem; problem; …"``.
    """
    types = hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    valid = list(fields)
    problems: list[str] = []
    unknown = sorted(set(options) - set(valid))
    if unknown:
        problems.append(f"unknown option(s) {unknown}; valid: {', '.join(valid)}")
    values: dict[str, Any] = {}
    for name in valid:
        if name not in options:
            continue
        value = coerce(options[name], types[name])
        bounds = field_bounds(fields[name])
        if not check_type(value, types[name]) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            problems.append(f"{name}: expected {_type_words(types[name])}, got {options[name]!r}")
        elif bounds is not None and (why := bounds.problem(value, integer=isinstance(value, int))):
            problems.append(f"{name}: {why}")
        else:
            values[name] = value
    parsed = cls(**values)
    problems += check(parsed)
    if problems:
        raise TaskError(f"task {task!r}: " + "; ".join(problems))
    return parsed


_TASKS: dict[str, Callable[[RunConfig], Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a task class under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def task_options_classes() -> dict[str, type | None]:
    """Every registered task → its options dataclass (:attr:`Task.Options`), in name order."""
    out: dict[str, type | None] = {}
    for name in available_tasks():
        factory = _TASKS[name]
        out[name] = getattr(factory, "Options", None)
    return out


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASKS)


def build_task(config: RunConfig) -> Task:
    """Build the task named by ``config.task.name``.

    Raises
    ------
    TaskError
        Unknown task, or its model/dataset cannot be loaded.
    """
    try:
        factory = _TASKS[config.task.name]
    except KeyError:
        raise TaskError(
            f"unknown task {config.task.name!r}; available: {', '.join(available_tasks())}"
        ) from None
    quantization = getattr(config.task, "quantization", "none")
    if quantization != "none" and not getattr(factory, "supports_quantization", False):
        able = [n for n in available_tasks() if getattr(_TASKS[n], "supports_quantization", 0)]
        raise TaskError(
            f"task.quantization {quantization!r}: task {config.task.name!r} does not load its "
            f"model through transformers, which quantises it; tasks that do: {', '.join(able)}"
        )
    return factory(config)
