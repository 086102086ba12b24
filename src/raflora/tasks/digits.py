"""The ``digits`` task (the Quickstart default): a tiny ViT on scikit-learn's 8×8 digits, offline.

Data: ``sklearn.datasets.load_digits`` (1797 real 8×8 grey images, 10 classes, bundled with
scikit-learn). A fixed stratified split (NumPy seed 0, independent of the run seed) gives, per
class, 30 % *public* pretraining images, 20 % evaluation images and the rest for federated
training: 539 public, 359 eval and 899 train images in all. Pixels ``0…16`` are mapped to
``[-1, 1]``.

Model: ``ViTForImageClassification`` (8×8 image, 2×2 patches, 1 channel, hidden 64, 2 layers,
4 heads, MLP 128, no dropout; ``task.options.hidden_dim`` widens it, the MLP staying twice as
wide). It is *pretrained* in-process on the public images of the digits 0–4 only
(``pretrain_classes``), so the backbone has seen digits but never told 5–9 apart; then the
classifier is replaced by a fresh, seeded 10-way head (std 0.02, zero bias). Federated
fine-tuning trains LoRA adapters on the backbone's linear layers (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``fc1``, ``fc2``) and the new ``classifier`` in full. The fresh head starts
near chance (0.20 eval accuracy as built). Measured centrally (AdamW, lr 5e-3, batch 32, 10
epochs over the 899 training images): head only ≈ 0.72; LoRA rank 8 or 32 + head ≈ 0.84–0.89.

The pretrained model (with its fresh head) is saved with ``save_pretrained`` under
``$RAFLORA_CACHE`` (else ``$XDG_CACHE_HOME/raflora``, else ``~/.cache/raflora``, or
``task.options.cache_dir``) in a directory named after a hash of the recipe, written atomically
(temporary directory + rename) and reused by later runs; :attr:`DigitsTask.model_id` is that
directory, so ``ViTForImageClassification.from_pretrained(model_id)`` gives back the base model.
Pretraining is seeded and runs on the CPU in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raflora.schema import setting
from raflora.tasks.base import Batch, ClassificationTask, TaskError, parse_options, register_task
from raflora.tasks.quantize import one_cpu_path, pretrained_kwargs

if TYPE_CHECKING:
    from transformers import ViTForImageClassification

    from raflora.config import RunConfig

__all__ = ["DigitsOptions", "DigitsTask", "cache_root", "digits_splits"]

RECIPE_VERSION = "digits-vit-v1"
"""Bumped whenever the pretraining code changes in a way the options do not capture."""

SPLIT_SEED = 0
PUBLIC_FRACTION = 0.3
EVAL_FRACTION = 0.2
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
"""The ViT backbone's linear layers (transformers 5 names); the ``classifier`` is not among them."""

NUM_HEADS = 4
"""Attention heads of the ViT (``hidden_dim`` must be a multiple)."""

_RECIPE_FILE = "raflora_recipe.json"


@dataclass(frozen=True)
class DigitsOptions:
    """Options of the ``digits`` task (``task.options``); every field has a default.

    The help text and bounds of each field are its schema (:func:`~raflora.schema.setting`):
    ``docs/configuration.md`` and the JSON Schema are generated from them, and
    :func:`~raflora.tasks.base.parse_options` checks them.
    """

    pretrain_epochs: int = setting(
        30, "Epochs of pretraining on the public images of pretrain_classes.", ge=0
    )
    pretrain_classes: tuple[int, ...] = setting(
        (0, 1, 2, 3, 4),
        "Distinct digits 0–9 the backbone is pretrained on (the federated task always has all "
        "ten).",
    )
    pretrain_lr: float = setting(1e-3, "AdamW learning rate of the pretraining (> 0).")
    num_layers: int = setting(2, "ViT encoder layers.", ge=1)
    hidden_dim: int = setting(
        64,
        f"ViT width, a positive multiple of the {NUM_HEADS} attention heads (the MLP is twice as "
        "wide). A LoRA rank must not exceed it: the adapted layers are hidden_dim × hidden_dim "
        "or wider.",
    )
    model_seed: int = setting(
        0, "Seed of the ViT initialisation, the pretraining order and the fresh head.", ge=0
    )
    cache_dir: str | None = setting(
        None,
        "Cache root (null: $RAFLORA_CACHE, $XDG_CACHE_HOME/raflora or ~/.cache/raflora).",
    )

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> DigitsOptions:
        """Parse and validate ``task.options`` (:func:`~raflora.tasks.base.parse_options`)."""
        return parse_options(cls, options, "digits", _digits_problems)

    def recipe(self) -> dict[str, Any]:
        """Everything that determines the pretrained model (the cache key)."""
        recipe = asdict(self)
        del recipe["cache_dir"]
        del recipe["hidden_dim"]  # in ``vit`` (and so the default width keeps its cache key)
        recipe["pretrain_classes"] = list(self.pretrain_classes)
        recipe.update(
            version=RECIPE_VERSION,
            split_seed=SPLIT_SEED,
            public_fraction=PUBLIC_FRACTION,
            eval_fraction=EVAL_FRACTION,
            vit=_vit_kwargs(self.num_layers, self.hidden_dim),
        )
        return recipe


def _digits_problems(opts: DigitsOptions) -> list[str]:
    """Ranges the fields' bounds do not state (their messages predate the schema)."""
    problems: list[str] = []
    if opts.hidden_dim < NUM_HEADS or opts.hidden_dim % NUM_HEADS:
        problems.append(
            f"hidden_dim: must be a positive multiple of {NUM_HEADS} (the attention heads), "
            f"got {opts.hidden_dim}"
        )
    if not opts.pretrain_lr > 0:
        problems.append(f"pretrain_lr: must be > 0, got {opts.pretrain_lr}")
    classes = opts.pretrain_classes
    if not classes or any(not 0 <= c <= 9 for c in classes) or len(set(classes)) != len(classes):
        problems.append(
            f"pretrain_classes: expected a non-empty list of distinct digits 0–9, got {classes!r}"
        )
    return problems


def _vit_kwargs(num_layers: int, hidden_dim: int) -> dict[str, Any]:
    return {
        "image_size": 8,
        "patch_size": 2,
        "num_channels": 1,
        "hidden_size": hidden_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": NUM_HEADS,
        "intermediate_size": 2 * hidden_dim,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "num_labels": 10,
    }


def cache_root(cache_dir: str | None = None) -> Path:
    """Root of raflora's model cache.

    Parameters
    ----------
    cache_dir : str | None
        Explicit root; ``None`` uses ``$RAFLORA_CACHE``, else ``$XDG_CACHE_HOME/raflora``, else
        ``~/.cache/raflora``.

    Returns
    -------
    Path
        The cache root (not created).
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("RAFLORA_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "raflora"
    return Path.home() / ".cache" / "raflora"


@dataclass(frozen=True)
class _Split:
    x: Tensor  # (N, 1, 8, 8) float32 in [-1, 1]
    y: Tensor  # (N,) int64


def digits_splits() -> dict[str, tuple[Tensor, Tensor]]:
    """The fixed ``public`` / ``train`` / ``eval`` splits of the digits data.

    Returns
    -------
    dict[str, tuple[Tensor, Tensor]]
        Split name → ``(images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64)``; the
        split is stratified by class and independent of the run seed.
    """
    return {name: (s.x, s.y) for name, s in _splits().items()}


def _splits() -> dict[str, _Split]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float32)  # (1797, 8, 8), values 0…16
    labels = np.asarray(data.target, dtype=np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"public": [], "eval": [], "train": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_public = round(PUBLIC_FRACTION * idx.size)
        n_eval = round(EVAL_FRACTION * idx.size)
        parts["public"].append(idx[:n_public])
        parts["eval"].append(idx[n_public : n_public + n_eval])
        parts["train"].append(idx[n_public + n_eval :])
    out: dict[str, _Split] = {}
    for name, chunks in parts.items():
        # Interleave classes in a fixed shuffled order rather than leaving them sorted by class.
        idx = rng.permutation(np.concatenate(chunks))
        x = torch.from_numpy(images[idx] / 8.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8)
        out[name] = _Split(x.contiguous(), torch.from_numpy(labels[idx]))
    return out


def _pretrain(opts: DigitsOptions, public: _Split) -> ViTForImageClassification:
    """Pretrain a ViT on the public images of ``opts.pretrain_classes``; give it a fresh head."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(**_vit_kwargs(opts.num_layers, opts.hidden_dim))
    # transformers initialises from the global RNG: fork it so the caller's state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.model_seed)
        model = ViTForImageClassification(config)
    gen = torch.Generator().manual_seed(opts.model_seed + 1)
    keep = torch.isin(public.y, torch.tensor(opts.pretrain_classes))
    x, y = public.x[keep], public.y[keep]
    if opts.pretrain_epochs > 0 and y.numel() > 0:
        optimizer = torch.optim.AdamW(model.parameters(), lr=opts.pretrain_lr, weight_decay=0.0)
        model.train()
        for _ in range(opts.pretrain_epochs):
            order = torch.randperm(y.numel(), generator=gen)
            for start in range(0, y.numel(), 32):
                idx = order[start : start + 32]
                logits = model(pixel_values=x[idx]).logits
                loss = F.cross_entropy(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
    # The federated task gets a new 10-way head (as a downstream fine-tuning would).
    classifier = model.classifier
    assert isinstance(classifier, nn.Linear)
    with torch.no_grad():
        shape = classifier.weight.shape
        classifier.weight.copy_(torch.randn(shape, generator=gen) * config.initializer_range)
        classifier.bias.zero_()
    model.requires_grad_(False)
    model.train(False)
    return model


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars (loading a 70k-parameter model needs none)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _recipe_hash(recipe: Mapping[str, Any]) -> str:
    text = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _is_complete(path: Path) -> bool:
    return (path / _RECIPE_FILE).is_file() and (path / "config.json").is_file()


def ensure_pretrained(opts: DigitsOptions, public: _Split) -> tuple[Path, bool]:
    """The cached pretrained model directory for ``opts``, pretraining it if missing.

    Returns
    -------
    tuple[Path, bool]
        The directory and whether it was built by this call.

    Raises
    ------
    TaskError
        If the cache directory cannot be written.
    """
    recipe = opts.recipe()
    root = cache_root(opts.cache_dir)
    target = root / f"{RECIPE_VERSION}-{_recipe_hash(recipe)}"
    if _is_complete(target):
        return target, False
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    except OSError as exc:
        raise TaskError(f"task 'digits': cannot write the model cache {root}: {exc}") from None
    try:
        model = _pretrain(opts, public)
        with _quiet_transformers():
            model.save_pretrained(str(tmp))
        (tmp / _RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, target)  # atomic: readers see no directory or a complete one
        except OSError:
            if not _is_complete(target):  # not simply another process winning the race
                raise
        return target, True
    except OSError as exc:
        raise TaskError(f"task 'digits': cannot write the model cache {target}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: str, **kwargs: Any) -> ViTForImageClassification:
    """The saved model (``kwargs``: :func:`~raflora.tasks.quantize.pretrained_kwargs`, the
    route by which a quantised base is loaded).
    """
    from transformers import ViTForImageClassification

    try:
        with _quiet_transformers():
            model: ViTForImageClassification = ViTForImageClassification.from_pretrained(
                path, **kwargs
            )
    except (OSError, ValueError) as exc:
        raise TaskError(
            f"task 'digits': cannot load the cached model {path} ({exc}); delete the directory "
            f"to rebuild it"
        ) from None
    model.requires_grad_(False)
    model.train(False)  # evaluation mode (no dropout anyway)
    if kwargs:
        one_cpu_path(model)
    return model


@register_task("digits")
class DigitsTask(ClassificationTask):
    """Federated fine-tuning of a tiny pretrained ViT on scikit-learn's 8×8 digits (offline).

    Parameters
    ----------
    config : RunConfig
        Uses ``task.options`` (see :class:`DigitsOptions`) and ``task.num_eval_samples``;
        ``task.model`` and ``task.dataset`` must be null. The run seed is not used: the
        pretrained model, its fresh head and the splits are fixed.

    Attributes
    ----------
    options : DigitsOptions
        The parsed options.
    built_cache : bool
        Whether this build pretrained the model (``False``: loaded from the cache).
    """

    Options = DigitsOptions
    supports_quantization = True

    def __init__(self, config: RunConfig) -> None:
        if config.task.model is not None or config.task.dataset is not None:
            raise TaskError(
                "task 'digits' builds its own model and data offline; task.model and "
                f"task.dataset must be null (got model={config.task.model!r}, "
                f"dataset={config.task.dataset!r})"
            )
        self.options = DigitsOptions.from_mapping(config.task.options)
        splits = _splits()
        path, self.built_cache = ensure_pretrained(self.options, splits["public"])
        self.model_id = str(path)
        # task.quantization: the float32 model pretrained above, reloaded through transformers'
        # BitsAndBytesConfig (docs/quantization.md); the new head stays in float32
        self._load_kwargs = pretrained_kwargs(config, ("classifier",))
        self.model = _load(self.model_id, **self._load_kwargs)
        train, evaluation = splits["train"], splits["eval"]
        if config.task.num_eval_samples is not None:
            cap = config.task.num_eval_samples
            evaluation = _Split(evaluation.x[:cap], evaluation.y[:cap])
        self._train, self._eval = train, evaluation
        self.num_train = int(train.y.numel())
        self.partition_labels = train.y.numpy().copy()
        self.target_modules = list(TARGET_MODULES)
        self.modules_to_save = ["classifier"]
        self.task_type = None

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """``{"pixel_values": (b, 1, 8, 8) float32, "labels": (b,) int64}``."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"pixel_values": self._train.x[idx], "labels": self._train.y[idx]}

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The evaluation split in order, ``batch_size`` images at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        for start in range(0, self._eval.y.numel(), batch_size):
            stop = start + batch_size
            yield {"pixel_values": self._eval.x[start:stop], "labels": self._eval.y[start:stop]}

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """The ViT's class logits."""
        out: Tensor = model(pixel_values=batch["pixel_values"]).logits
        return out

    def load_base_model(self) -> nn.Module:
        """``ViTForImageClassification.from_pretrained(model_id)``: the base model again (with
        the run's quantisation, if any).
        """
        return _load(self.model_id, **self._load_kwargs)

    def describe(self) -> dict[str, Any]:
        """Task facts plus the evaluation size and the pretraining classes."""
        facts = super().describe()
        facts.update(
            num_eval=int(self._eval.y.numel()),
            pretrain_classes=list(self.options.pretrain_classes),
        )
        return facts
