"""One PEFT model with one LoRA adapter per client rank (AdapterBank, wrap_model)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from raflora.adapters.factors import (
    _layer_map,
    adapter_name,
    get_factors,
    module_shapes,
    scaling_for,
    set_factors,
)
from raflora.adapters.heads import _saved_modules, get_dense, set_dense, trainable_parameters
from raflora.adapters.merge import load_base_weights, merge_into_base, set_merged_base
from raflora.adapters.quantized import is_quantized
from raflora.methods.base import Factors

__all__ = [
    "AdapterBank",
    "Alpha",
    "wrap_model",
]

Alpha = float | Callable[[int], float] | None
"""``lora_alpha`` policy: ``None`` (``alpha = r``, scaling 1), a number, or ``rank → alpha``."""


def _alpha_for(alpha: Alpha, rank: int) -> Any:
    """``lora_alpha`` for ``rank`` (an ``int`` when integral, as ``LoraConfig`` annotates it)."""
    value = float(rank) if alpha is None else float(alpha(rank) if callable(alpha) else alpha)
    return int(value) if value.is_integer() else value


class AdapterBank:
    """One PEFT model with one adapter per client rank, created lazily.

    Parameters
    ----------
    model : PeftModel | None
        The wrapped model (:func:`wrap_model` builds the bank and sets it).
    target_modules : Sequence[str] | str
        PEFT ``target_modules``.
    max_rank : int
        Largest rank; an adapter at this rank exists from the start.
    modules_to_save : Sequence[str] | None
        PEFT ``modules_to_save`` (fully trained heads).
    lora_alpha : float | Callable[[int], float] | None
        ``None``: ``alpha = r`` (scaling 1, the paper's choice); a number; or ``rank → alpha``.
    lora_dropout : float
        LoRA dropout.
    use_rslora : bool
        rsLoRA scaling ``alpha / sqrt(r)``.
    task_type : str | None
        PEFT task type (``"SEQ_CLS"`` makes the classifier head trainable).
    """

    def __init__(
        self,
        model: PeftModel | None,
        *,
        target_modules: Sequence[str] | str,
        max_rank: int,
        modules_to_save: Sequence[str] | None = None,
        lora_alpha: Alpha = None,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        task_type: str | None = None,
    ) -> None:
        self._model = model
        self._trainable: dict[str, list[nn.Parameter]] = {}
        self._pristine: dict[str, Tensor] | None = None  # W_0 of narrow-dtype merges
        self.target_modules = (
            target_modules if isinstance(target_modules, str) else list(target_modules)
        )
        self.max_rank = int(max_rank)
        self.modules_to_save = None if modules_to_save is None else list(modules_to_save)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.task_type = task_type

    @property
    def model(self) -> PeftModel:
        """The wrapped ``PeftModel``."""
        if self._model is None:
            raise RuntimeError("AdapterBank has no model yet")
        return self._model

    @model.setter
    def model(self, value: PeftModel) -> None:
        self._model = value

    def config(self, rank: int) -> LoraConfig:
        """The ``LoraConfig`` of the adapter at ``rank``."""
        return LoraConfig(
            r=int(rank),
            lora_alpha=_alpha_for(self.lora_alpha, int(rank)),
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            task_type=self.task_type,
        )

    def scaling(self, rank: int) -> float:
        """The LoRA scaling ``s`` of rank ``rank`` (``α / r``, or ``α / sqrt(r)`` under rsLoRA),
        as PEFT computes it for the adapter :meth:`config` describes.
        """
        return scaling_for(
            int(rank), float(_alpha_for(self.lora_alpha, int(rank))), use_rslora=self.use_rslora
        )

    @property
    def ranks(self) -> list[int]:
        """Ranks whose adapters exist, ascending."""
        return sorted(int(name[1:]) for name in self.model.peft_config if name.startswith("r"))

    def ensure(self, rank: int) -> str:
        """Create the adapter for ``rank`` if it does not exist yet; return its name."""
        rank = int(rank)
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}")
        name = adapter_name(rank)
        if name not in self.model.peft_config:
            self.model.add_adapter(name, self.config(rank))
            self._trainable.clear()
        return name

    def activate(self, rank: int) -> str:
        """Create (if needed) and activate the adapter for ``rank``; return its name.

        Afterwards only that adapter's LoRA weights and heads require grad.
        """
        name = self.ensure(rank)
        if self.model.active_adapter != name:  # PEFT walks every module: skip when unchanged
            self.model.set_adapter(name)
        return name

    @property
    def active_rank(self) -> int:
        """Rank of the active adapter."""
        return int(str(self.model.active_adapter)[1:])

    def get_factors(self, rank: int) -> Factors:
        """:func:`get_factors` of the adapter at ``rank`` (created if missing)."""
        return get_factors(self.model, self.ensure(rank))

    def set_factors(self, rank: int, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """:func:`set_factors` into the adapter at ``rank`` (created if missing)."""
        set_factors(self.model, self.ensure(rank), factors)

    def get_dense(self, rank: int) -> dict[str, Tensor]:
        """:func:`get_dense` of the adapter at ``rank`` (created if missing)."""
        return get_dense(self.model, self.ensure(rank))

    def set_dense(self, rank: int, dense: Mapping[str, Tensor]) -> None:
        """:func:`set_dense` into the adapter at ``rank`` (created if missing)."""
        set_dense(self.model, self.ensure(rank), dense)

    def saved_module_names(self) -> list[str]:
        """Canonical names of the modules trained in full (``modules_to_save`` matches)."""
        return [name for name, _ in _saved_modules(self.model, adapter_name(self.max_rank))]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """:func:`module_shapes` (the same for every rank)."""
        return module_shapes(self.model, adapter_name(self.max_rank))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """:func:`trainable_parameters` of the model (the active adapter's; memoized per rank)."""
        name = str(self.model.active_adapter)
        if name not in self._trainable:
            self._trainable[name] = trainable_parameters(self.model)
        return list(self._trainable[name])

    def merge_into_base(
        self,
        delta: Mapping[str, tuple[Tensor, Tensor]],
        cumulative: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Merge a round's factored ``delta`` into the shared base model.

        float32 weights: ``W ← W + B A`` (:func:`merge_into_base`). Narrower weights (bfloat16)
        with ``cumulative`` (every delta merged so far, this one included, in float32): the
        weights are recomputed as ``dtype(W_0 + Δ_cum)`` from a pristine copy of ``W_0`` taken
        before the first merge (:func:`set_merged_base`), so rounding to bfloat16 happens once
        instead of compounding every round (deltas of 1e-4 would otherwise lose a third of
        their size to rounding). The pristine copy costs one copy of the adapted weights, in
        CPU memory.

        Quantised weights (``task.quantization``) take no merge: ``cumulative`` becomes the
        float32 residual beside each quantised layer (``delta`` is added to it when no
        ``cumulative`` is given), never re-quantised (docs/quantization.md).
        """
        if self._quantized_base() and cumulative is not None:
            set_merged_base(self.model, {}, cumulative)
            return
        if not self._narrow_base() or cumulative is None:
            merge_into_base(self.model, delta)
            return
        if self._pristine is None:
            self._pristine = self._cpu_base_weights()
        set_merged_base(self.model, self._pristine, cumulative)

    def _cpu_base_weights(self) -> dict[str, Tensor]:
        """``W_0`` of every adapted module, kept in CPU memory (not a second model on the GPU);
        :func:`set_merged_base` moves one module at a time to the model's device.
        """
        layers = _layer_map(self.model, adapter_name(self.max_rank))
        out: dict[str, Tensor] = {}
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            assert isinstance(weight, Tensor)
            out[name] = weight.detach().to("cpu", copy=True)
        return out

    def _narrow_base(self) -> bool:
        """Whether an adapted base weight is stored in a float dtype narrower than float32
        (a quantised layer is not: its merges go into a float32 residual).
        """
        layers = _layer_map(self.model, adapter_name(self.max_rank))
        return any(
            layer.get_base_layer().weight.dtype not in (torch.float32, torch.float64)
            and not is_quantized(layer.get_base_layer())
            for layer in layers.values()
        )

    def _quantized_base(self) -> bool:
        """Whether an adapted base layer is quantised (bitsandbytes 4- or 8-bit)."""
        layers = _layer_map(self.model, adapter_name(self.max_rank))
        return any(is_quantized(layer.get_base_layer()) for layer in layers.values())

    def load_base_weights(self, weights: Mapping[str, Tensor]) -> None:
        """:func:`load_base_weights` (a resumed run's merged weights), keeping ``W_0`` first.

        The weights in the model before the first load or merge are the pristine ``W_0`` that
        :meth:`merge_into_base` needs for narrow dtypes.
        """
        name = adapter_name(self.max_rank)
        if self._pristine is None and self._narrow_base():
            self._pristine = self._cpu_base_weights()
        load_base_weights(self.model, name, weights)


def wrap_model(
    base_model: nn.Module,
    *,
    target_modules: Sequence[str] | str,
    max_rank: int,
    modules_to_save: Sequence[str] | None = None,
    lora_alpha: Alpha = None,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    task_type: str | None = None,
) -> AdapterBank:
    """Wrap ``base_model`` (in place) with PEFT LoRA and return an :class:`AdapterBank`.

    The adapter ``f"r{max_rank}"`` is created (PEFT's default init: ``B = 0``, random ``A``) and
    activated; adapters of other ranks are added on demand by :meth:`AdapterBank.activate`.

    Parameters
    ----------
    base_model : nn.Module
        A transformers model; PEFT injects the LoRA layers into it.
    target_modules : Sequence[str] | str
        PEFT ``target_modules`` (e.g. ``["q_proj", "v_proj"]`` or ``"all-linear"``).
    max_rank : int
        Largest client rank.
    modules_to_save : Sequence[str] | None
        Fully trained modules (e.g. ``["classifier"]`` for ViT).
    lora_alpha : float | Callable[[int], float] | None
        ``None`` means ``alpha = r``. Any choice gives the same ``ΔW`` for the same effective
        factors.
    lora_dropout : float
        LoRA dropout.
    use_rslora : bool
        rsLoRA scaling.
    task_type : str | None
        PEFT task type, e.g. ``"SEQ_CLS"``.

    Returns
    -------
    AdapterBank
        Holds the ``PeftModel`` in ``.model``.
    """
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    bank_kwargs: dict[str, Any] = {
        "target_modules": target_modules,
        "max_rank": int(max_rank),
        "modules_to_save": modules_to_save,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "task_type": task_type,
    }
    bank = AdapterBank(None, **bank_kwargs)
    peft_model = get_peft_model(
        base_model,
        bank.config(int(max_rank)),
        adapter_name=adapter_name(int(max_rank)),
    )
    assert isinstance(peft_model, PeftModel)
    bank.model = peft_model
    return bank
