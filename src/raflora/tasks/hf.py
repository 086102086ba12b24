"""Shared machinery of the Hugging Face classification tasks (image and text).

Everything a task needs that is not specific to its modality lives here:

* :func:`check_options` — unknown or ill-typed ``task.options`` keys become a :class:`TaskError`;
* :func:`load_pretrained` — ``from_pretrained`` that turns every failure into one
  :class:`TaskError` naming the model that was asked for;
* :func:`load_splits` — a dataset by hub name, a ``save_to_disk`` directory, a data directory
  (``train.*``/``test.*`` files, ``imagefolder`` layouts …) or one CSV / JSON Lines / Parquet file,
  returned as a ``(train, eval)`` pair (split deterministically when there is only one split);
* :func:`encode_labels` — class labels as integer ids (strings mapped in sorted order);
* :func:`backbone_target_modules` / :func:`head_modules` — what LoRA adapts and what is trained in
  full;
* :class:`HFClassificationTask` — the common task body: batching by index, cross-entropy loss,
  accuracy, and seeded (reproducible) construction of the model with its new head.
"""

from __future__ import annotations

import contextlib
import os
import re
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from raflora.schema import setting
from raflora.tasks.base import Batch, ClassificationTask, TaskError
from raflora.tasks.quantize import one_cpu_path, pretrained_kwargs

if TYPE_CHECKING:
    from datasets import Dataset

    from raflora.config import RunConfig

__all__ = [
    "DATA_FILE_BUILDERS",
    "HFClassificationTask",
    "LabelEncoding",
    "as_splits",
    "attempt_load",
    "backbone_target_modules",
    "check_options",
    "encode_labels",
    "head_modules",
    "load_local",
    "load_pretrained",
    "load_splits",
    "looks_local",
    "pick_column",
    "seeded",
]

T = TypeVar("T")

DATA_FILE_BUILDERS: dict[str, str] = {
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
"""File suffix → ``datasets`` builder for local data files."""

_EVAL_SPLITS = ("test", "validation", "valid", "eval")
_HEAD_SEED_STREAM = 8  # fixed forever: changing it changes every run's initial head
_MAX_CAUSE = 300


# --------------------------------------------------------------------------------------------
# Errors and options
# --------------------------------------------------------------------------------------------


def _cause(err: BaseException) -> str:
    """First line of an exception message, shortened (HF errors can span many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > _MAX_CAUSE:
        text = text[: _MAX_CAUSE - 1] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def attempt_load(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; any exception becomes a :class:`TaskError` starting with ``what``."""
    try:
        return fn()
    except TaskError:
        raise
    except Exception as err:
        raise TaskError(f"{what}: {_cause(err)}") from err


@dataclass(frozen=True)
class SplitOptions:
    """The ``task.options`` shared by the HF tasks (checked by :func:`check_options`; the
    fields' help and bounds are their schema, for ``docs/configuration.md`` and the JSON
    Schema).
    """

    train_split: str = setting("train", "Split trained on.")
    eval_split: str | None = setting(
        None, "Split evaluated on (null: the first of test/validation/valid/eval that exists)."
    )
    eval_fraction: float = setting(
        0.2,
        "Share of the examples held out for evaluation when the data has only one split.",
        gt=0,
        lt=1,
    )
    dataset_config: str | None = setting(
        None, "Configuration (subset) name of a hub dataset, e.g. sst2 of nyu-mll/glue."
    )


def check_options(task: str, options: Mapping[str, Any]) -> SplitOptions:
    """Validate ``task.options`` of an HF task.

    Parameters
    ----------
    task : str
        Task name (for the message).
    options : Mapping[str, Any]
        ``config.task.options``.

    Returns
    -------
    SplitOptions
        The parsed options.

    Raises
    ------
    TaskError
        An unknown key, or a value of the wrong type or out of range.
    """
    valid = ("dataset_config", "eval_fraction", "eval_split", "train_split")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TaskError(
            f"task.options: unknown key(s) {', '.join(map(repr, unknown))} for task {task!r}; "
            f"valid keys: {', '.join(valid)}"
        )
    train_split = options.get("train_split", "train")
    eval_split = options.get("eval_split")
    fraction = options.get("eval_fraction", 0.2)
    if not isinstance(train_split, str) or not train_split:
        raise TaskError(f"task.options.train_split: a split name expected, got {train_split!r}")
    if eval_split is not None and (not isinstance(eval_split, str) or not eval_split):
        raise TaskError(f"task.options.eval_split: a split name expected, got {eval_split!r}")
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0.0 < float(fraction) < 1.0
    ):
        raise TaskError(
            f"task.options.eval_fraction: a number in (0, 1) expected, got {fraction!r}"
        )
    subset = options.get("dataset_config")
    if subset is not None and (not isinstance(subset, str) or not subset):
        raise TaskError(f"task.options.dataset_config: a config name expected, got {subset!r}")
    return SplitOptions(train_split, eval_split, float(fraction), subset)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id."""
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or Path(name).suffix.lower() in DATA_FILE_BUILDERS
        or name.count("/") > 1
        or "\\" in name
    )


def load_pretrained(field: str, name: str, loader: Callable[[str], T]) -> T:
    """``loader(name)`` (a ``from_pretrained``), with failures as one :class:`TaskError`.

    Parameters
    ----------
    field : str
        Config field the name came from, e.g. ``"task.model"``.
    name : str
        Hub name or local directory.
    loader : Callable[[str], T]
        Loads from a name or directory.

    Raises
    ------
    TaskError
        Missing local directory, or the hub/directory load failed.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return attempt_load(
            f"{field} {name!r}: could not load from this local directory", lambda: loader(str(path))
        )
    if path.exists():
        raise TaskError(f"{field} {name!r}: a directory expected, this is a file")
    if looks_local(name):
        raise TaskError(f"{field} {name!r}: no such local directory")
    return attempt_load(
        f"{field} {name!r}: not a local directory and could not be loaded from the Hugging Face "
        "hub (offline?)",
        lambda: loader(name),
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def head_seed(seed: int) -> int:
    """Seed of a task's new classifier head, derived from the run seed."""
    state = np.random.SeedSequence([int(seed), _HEAD_SEED_STREAM]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def _backbone_prefix(model: nn.Module) -> str | None:
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else None


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the pretrained backbone (the new head).

    For ``ViTForImageClassification`` and ``RobertaForSequenceClassification`` this is
    ``["classifier"]``; for ``DistilBertForSequenceClassification``
    ``["pre_classifier", "classifier"]``.
    """
    backbone = _backbone_prefix(model)
    return [
        name
        for name, child in model.named_children()
        if name != backbone and any(True for _ in child.parameters())
    ]


def backbone_target_modules(model: nn.Module) -> str:
    r"""A PEFT regex matching the backbone's ``nn.Linear`` layers, never the head.

    The layers taken are those inside the repeated transformer blocks (names with a numeric
    index, e.g. ``roberta.encoder.layer.3.attention.self.query``); when the backbone has none,
    every linear layer of the backbone; when the model has no recognised backbone, every linear
    layer outside :func:`head_modules`. Block indices are generalised to ``\d+`` so the pattern
    stays short and reads like the architecture.

    Raises
    ------
    TaskError
        The model has no linear layer outside its head.
    """
    backbone = _backbone_prefix(model)
    heads = set(head_modules(model))
    linear = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if backbone is not None:
        candidates = [n for n in linear if n.startswith(backbone + ".")]
    else:
        candidates = [n for n in linear if n.split(".", 1)[0] not in heads]
    in_blocks = [n for n in candidates if re.search(r"\.\d+\.", n)]
    chosen = in_blocks or candidates
    if not chosen:
        raise TaskError(f"model {type(model).__name__} has no linear layer outside its head")
    patterns: list[str] = []
    for name in chosen:
        parts = [r"\d+" if part.isdigit() else re.escape(part) for part in name.split(".")]
        pattern = r"\.".join(parts)
        if pattern not in patterns:
            patterns.append(pattern)
    return "^(?:" + "|".join(patterns) + ")$"


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def load_local(path: Path) -> Any:
    """A ``Dataset``/``DatasetDict`` from a local file or directory."""
    import datasets

    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise TaskError(
                f"task.dataset {str(path)!r}: unsupported file type {path.suffix!r}; "
                f"use one of {', '.join(sorted(DATA_FILE_BUILDERS))} or a directory"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    # train.csv/test.csv, train/…/*.png (imagefolder) …: datasets infers builder and splits.
    return datasets.load_dataset(str(path))


def as_splits(loaded: Any) -> dict[str, Dataset]:
    """A loaded ``Dataset`` / ``DatasetDict`` as ``{split name: Dataset}``."""
    from datasets import Dataset, DatasetDict

    if isinstance(loaded, DatasetDict):
        return dict(loaded.items())
    if isinstance(loaded, Dataset):
        return {"train": loaded}
    raise TaskError(f"unsupported dataset object {type(loaded).__name__}")


def load_splits(name: str, options: SplitOptions) -> tuple[Dataset, Dataset]:
    """The ``(train, eval)`` splits of a dataset.

    Parameters
    ----------
    name : str
        Hub name, local file (CSV, JSON Lines, Parquet) or directory (``save_to_disk`` output,
        ``train.*``/``test.*`` files, an ``imagefolder`` tree …).
    options : SplitOptions
        Split choice. When the data has no evaluation split, ``eval_fraction`` of the training
        split is held out with a fixed seed (the same for every run seed, so runs compare on the
        same examples).

    Raises
    ------
    TaskError
        The dataset cannot be found or loaded, or a requested split is missing.
    """
    path = Path(name).expanduser()
    if path.exists():
        kind = "file" if path.is_file() else "directory"
        what = f"task.dataset {name!r}: could not load this local {kind}"
        splits = as_splits(attempt_load(what, lambda: load_local(path)))
    elif looks_local(name):
        raise TaskError(f"task.dataset {name!r}: no such local file or directory")
    else:
        import datasets

        splits = as_splits(
            attempt_load(
                f"task.dataset {name!r}: not a local file or directory and could not be loaded "
                "from the Hugging Face hub (offline?)",
                lambda: datasets.load_dataset(name, options.dataset_config),
            )
        )
    available = ", ".join(sorted(splits))
    train_name = options.train_split
    if train_name not in splits:
        if train_name == "train" and len(splits) == 1:
            train_name = next(iter(splits))
        else:
            raise TaskError(
                f"task.options.train_split {train_name!r}: no such split in dataset {name!r}; "
                f"available: {available}"
            )
    if options.eval_split is not None:
        if options.eval_split not in splits:
            raise TaskError(
                f"task.options.eval_split {options.eval_split!r}: no such split in dataset "
                f"{name!r}; available: {available}"
            )
        return splits[train_name], splits[options.eval_split]
    for candidate in _EVAL_SPLITS:
        if candidate in splits and candidate != train_name:
            return splits[train_name], splits[candidate]
    train = splits[train_name]
    parts = attempt_load(
        f"task.dataset {name!r}: cannot hold out eval_fraction={options.eval_fraction} of "
        f"{len(train)} examples",
        lambda: train.train_test_split(test_size=options.eval_fraction, seed=0, shuffle=True),
    )
    return parts["train"], parts["test"]


def pick_column(
    field: str, given: str | None, defaults: Sequence[str], splits: Sequence[Dataset], name: str
) -> str:
    """The column to read: ``given`` if set, else the first default present in every split.

    Raises
    ------
    TaskError
        The column (or every default) is missing; the message lists the available columns.
    """
    present = [set(split.column_names) for split in splits]
    available = ", ".join(splits[0].column_names)
    if given is not None:
        if all(given in cols for cols in present):
            return given
        raise TaskError(
            f"{field} {given!r}: no such column in dataset {name!r}; available: {available}"
        )
    for candidate in defaults:
        if all(candidate in cols for cols in present):
            return candidate
    raise TaskError(
        f"{field}: dataset {name!r} has none of the default columns "
        f"{', '.join(map(repr, defaults))}; set {field}; available: {available}"
    )


@dataclass(frozen=True)
class LabelEncoding:
    """Integer class ids of the train and eval examples.

    Attributes
    ----------
    train : np.ndarray
        ``(num_train,)`` int64 class ids.
    eval : np.ndarray
        ``(num_eval,)`` int64 class ids.
    names : list[str]
        Name of each class id (``str(id)`` for plain integer labels).
    """

    train: np.ndarray
    eval: np.ndarray
    names: list[str]

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.names)


def _column_values(ds: Dataset, column: str) -> list[Any]:
    # Arrow access reads only this column and honours index mappings (no image decoding).
    return list(ds.select_columns([column]).with_format("arrow")[column].to_pylist())


def encode_labels(train: Dataset, eval_: Dataset, column: str) -> LabelEncoding:
    """Integer ids of a label column.

    ``ClassLabel`` columns keep their ids and names; non-negative integers are used as given
    (``num_labels = max + 1``); strings are mapped to ids in sorted order over both splits.

    Raises
    ------
    TaskError
        Missing labels, negative or fractional numbers, or mixed types.
    """
    from datasets import ClassLabel

    feature = train.features.get(column)
    raw_train = _column_values(train, column)
    raw_eval = _column_values(eval_, column)
    values = raw_train + raw_eval
    if any(v is None for v in values):
        raise TaskError(f"task.label_column {column!r}: some examples have no label")
    if isinstance(feature, ClassLabel):
        names = [str(n) for n in feature.names]
        return LabelEncoding(_ids(raw_train), _ids(raw_eval), names)
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {label: i for i, label in enumerate(names)}
        return LabelEncoding(
            _ids([index[v] for v in raw_train]), _ids([index[v] for v in raw_eval]), names
        )
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        numbers = np.asarray(values, dtype=np.float64)
        if numbers.size == 0 or not np.all(numbers == np.round(numbers)) or numbers.min() < 0:
            raise TaskError(
                f"task.label_column {column!r}: labels must be strings or non-negative integers"
            )
        count = int(numbers.max()) + 1
        return LabelEncoding(_ids(raw_train), _ids(raw_eval), [str(i) for i in range(count)])
    raise TaskError(
        f"task.label_column {column!r}: labels must be strings or non-negative integers, "
        f"got a mix of {sorted({type(v).__name__ for v in values})}"
    )


def _ids(values: Sequence[Any]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.int64).reshape(-1)


# --------------------------------------------------------------------------------------------
# The common task body
# --------------------------------------------------------------------------------------------


class HFClassificationTask(ClassificationTask):
    """Body shared by the HF image and text classification tasks.

    Subclasses load their processor in :meth:`_setup`, collate examples in :meth:`_collate` and
    build the model in :meth:`_create_model`; this class loads the data, encodes the labels,
    seeds the model construction, batches by index and computes loss and accuracy.

    Parameters
    ----------
    config : RunConfig
        The run configuration (``config.task`` and ``config.seed`` are used).
    """

    default_model: str
    default_dataset: str
    data_column_field: str
    data_column_defaults: tuple[str, ...]
    label_column_defaults: tuple[str, ...] = ("label", "labels")
    Options = SplitOptions
    supports_quantization = True

    def __init__(self, config: RunConfig) -> None:
        tc = config.task
        options = check_options(self.name, tc.options)
        self.config = config
        self.model_id = tc.model or self.default_model
        self.dataset_name = tc.dataset or self.default_dataset
        self.max_length = int(tc.max_length)
        self._seed = head_seed(config.seed)

        train, eval_ = load_splits(self.dataset_name, options)
        given = getattr(tc, self.data_column_field.removeprefix("task."))
        self.data_column = pick_column(
            self.data_column_field,
            given,
            self.data_column_defaults,
            [train, eval_],
            self.dataset_name,
        )
        self.label_column = pick_column(
            "task.label_column",
            tc.label_column,
            self.label_column_defaults,
            [train, eval_],
            self.dataset_name,
        )
        if tc.num_eval_samples is not None:
            eval_ = eval_.select(range(min(int(tc.num_eval_samples), len(eval_))))
        if len(train) == 0 or len(eval_) == 0:
            raise TaskError(
                f"task.dataset {self.dataset_name!r}: empty split ({len(train)} train, "
                f"{len(eval_)} eval examples)"
            )
        self.labels = encode_labels(train, eval_, self.label_column)
        # Keep only the input column: row access then never decodes or copies the others.
        self.train_data = train.select_columns([self.data_column])
        self.eval_data = eval_.select_columns([self.data_column])
        self.num_train = len(self.train_data)
        self.partition_labels = self.labels.train

        self._setup()
        self.model = self.load_base_model()
        self.target_modules = backbone_target_modules(self.model)
        self.modules_to_save = head_modules(self.model)

    # -- subclass hooks ------------------------------------------------------------------

    @abstractmethod
    def _setup(self) -> None:
        """Load the processor/tokenizer (``self.model_id`` is set; the model is not built)."""

    @abstractmethod
    def _collate(self, values: list[Any]) -> dict[str, Tensor]:
        """Model inputs of a list of raw column values (images or texts)."""

    @abstractmethod
    def _create_model(self, model_dir: str, label_kwargs: dict[str, Any]) -> nn.Module:
        """``AutoModelFor….from_pretrained(model_dir, **label_kwargs, …)``."""

    # -- Task interface ------------------------------------------------------------------

    def load_base_model(self) -> nn.Module:
        """The base model with its new head, seeded from the run seed (same seed, same head)."""
        names = self.labels.names
        label_kwargs: dict[str, Any] = {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }

        # task.quantization: BitsAndBytesConfig through from_pretrained (docs/quantization.md);
        # the subclasses load in float32 already, and a quantised model takes no dtype cast
        quantized = pretrained_kwargs(self.config)
        quantized.pop("dtype", None)
        label_kwargs.update(quantized)

        def build(model_dir: str) -> nn.Module:
            with seeded(self._seed):
                model = self._create_model(model_dir, label_kwargs)
            if quantized:
                return one_cpu_path(model)
            return model.to(device="cpu", dtype=torch.float32)

        return load_pretrained("task.model", self.model_id, build)

    def _batch(self, data: Dataset, labels: np.ndarray, indices: Sequence[int]) -> Batch:
        idx = [int(i) for i in indices]
        batch = self._collate(list(data[idx][self.data_column]))
        batch["labels"] = torch.as_tensor(labels[idx], dtype=torch.long)
        return batch

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """Collated training examples ``indices`` (inputs processed now, not up front)."""
        return self._batch(self.train_data, self.labels.train, indices)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The evaluation split in order, ``batch_size`` examples per batch."""
        n = len(self.eval_data)
        for start in range(0, n, batch_size):
            yield self._batch(
                self.eval_data, self.labels.eval, range(start, min(start + batch_size, n))
            )

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """The model's class logits for every input but the labels."""
        out: Tensor = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return out

    def describe(self) -> dict[str, Any]:
        """Task facts plus the dataset, columns and evaluation size."""
        facts = super().describe()
        facts.update(
            dataset=self.dataset_name,
            num_classes=self.labels.num_labels,
            num_eval=len(self.eval_data),
            data_column=self.data_column,
            label_column=self.label_column,
        )
        return facts
