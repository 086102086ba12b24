"""Image classification with a pretrained vision transformer (paper: ViT-base on CIFAR-100).

``task.model`` (default ``google/vit-base-patch16-224-in21k``) is loaded with
``AutoModelForImageClassification`` and a new classifier sized to the data's classes; its
initialisation is seeded from the run seed, so :meth:`ImageClassificationTask.load_base_model`
rebuilds exactly the same model. ``task.dataset`` (default ``uoft-cs/cifar100``, columns ``img``
and ``fine_label``) is a hub name or a local directory/file (see
:func:`raflora.tasks.hf.load_splits`).
Images are decoded and processed per batch with the model's ``AutoImageProcessor``; LoRA adapts
the backbone's linear layers and the classifier is trained in full (``modules_to_save``).

Options (``task.options``): ``train_split`` (default ``train``), ``eval_split`` (default: the
first of test/validation/valid/eval), ``eval_fraction`` (held out when there is only one
split; default 0.2) and ``dataset_config`` (a hub dataset's configuration name).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from raflora.tasks.base import TaskError, register_task
from raflora.tasks.hf import HFClassificationTask, load_pretrained

__all__ = ["ImageClassificationTask"]


@register_task("image-classification")
class ImageClassificationTask(HFClassificationTask):
    """Fine-tune an image classifier (ViT by default) on a labelled image dataset.

    Parameters
    ----------
    config : RunConfig
        Run configuration: ``task.model``, ``task.dataset``, ``task.image_column`` (default
        ``img``, else ``image``), ``task.label_column`` (default ``fine_label``, else ``label``),
        ``task.num_eval_samples``, ``task.options`` and ``seed``.

    Raises
    ------
    TaskError
        The model, image processor or dataset cannot be loaded, a column is missing, or an
        option is unknown.
    """

    default_model = "google/vit-base-patch16-224-in21k"
    default_dataset = "uoft-cs/cifar100"
    data_column_field = "task.image_column"
    data_column_defaults = ("img", "image")
    label_column_defaults = ("fine_label", "label", "labels")

    def _setup(self) -> None:
        from transformers import AutoImageProcessor

        self.processor = load_pretrained(
            "task.model", self.model_id, AutoImageProcessor.from_pretrained
        )
        # Relative image paths in CSV/JSON files are read relative to the data file.
        dataset_path = Path(self.dataset_name).expanduser()
        self._image_root = dataset_path.parent if dataset_path.is_file() else dataset_path

    def _create_model(self, model_dir: str, label_kwargs: dict[str, Any]) -> nn.Module:
        from transformers import AutoModelForImageClassification

        model: nn.Module = AutoModelForImageClassification.from_pretrained(
            model_dir, ignore_mismatched_sizes=True, dtype="float32", **label_kwargs
        )
        return model

    def _collate(self, values: list[Any]) -> dict[str, Tensor]:
        images = [self._open(value) for value in values]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}

    def _open(self, value: Any) -> Any:
        """A PIL RGB image from a decoded image, a ``{"bytes", "path"}`` dict or a file path."""
        from PIL import Image

        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path") is not None:
                value = value["path"]
        if isinstance(value, str):
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = self._image_root / path
            try:
                value = Image.open(path)
            except OSError as err:
                raise TaskError(f"task.image_column {self.data_column!r}: {err}") from err
        if not isinstance(value, Image.Image):
            raise TaskError(
                f"task.image_column {self.data_column!r}: an image or an image path expected, "
                f"got {type(value).__name__}"
            )
        return value.convert("RGB")
