"""The bridge between PEFT LoRA modules and effective factors (SPEC §1–2).

One base model lives in memory; every client rank ``r`` gets its own PEFT adapter named
``f"r{r}"`` on that same model (created lazily, swapped in with ``set_adapter``), so no per-client
model copies are made. Outside this module, factors are *effective*: the LoRA scaling is folded
into ``B`` (``B_eff = s · lora_B.weight`` with ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)``
under rsLoRA), so ``ΔW = B_eff A`` whatever ``lora_alpha`` the adapters were built with.

Module names are *canonical*: the model's own module path, without PEFT's ``base_model.model.``
prefix and without adapter names (``vit.layers.0.attention.q_proj``). Dense tensors of
``modules_to_save`` heads are keyed by the canonical module name plus the parameter name
(``classifier.weight``), the same keys PEFT writes to ``adapter_model.safetensors`` (behind
``base_model.model.``).

Only ``nn.Linear``-style LoRA layers (``peft.tuners.lora.Linear``) are supported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import Tensor, nn

from raflora.methods.base import Factors

__all__ = [
    "PEFT_PREFIX",
    "AdapterBank",
    "adapter_name",
    "base_weights",
    "export_peft_adapter",
    "get_dense",
    "get_factors",
    "live_factors",
    "load_base_weights",
    "lora_scaling",
    "merge_into_base",
    "module_shapes",
    "scaling_for",
    "set_dense",
    "set_factors",
    "set_merged_base",
    "trainable_parameters",
    "wrap_model",
]

PEFT_PREFIX = "base_model.model."
"""Prefix PEFT puts in front of the wrapped model's module names (and saved keys)."""

Alpha = float | Callable[[int], float] | None
"""``lora_alpha`` policy: ``None`` (``alpha = r``, scaling 1), a number, or ``rank → alpha``."""


def adapter_name(rank: int) -> str:
    """PEFT adapter name used for client rank ``rank`` (``"r{rank}"``)."""
    return f"r{int(rank)}"


def _canonical(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def _lora_layers(peft_model: nn.Module, adapter: str) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(canonical name, LoRA layer)`` for every layer that carries ``adapter``."""
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            lora_a = module.lora_A[adapter]
            lora_b = module.lora_B[adapter]
            if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
                raise NotImplementedError(
                    f"module {_canonical(name)!r}: only linear LoRA layers are supported, "
                    f"got {type(module).__name__}"
                )
            yield _canonical(name), module


_CACHE_ATTR = "_raflora_module_cache"


def _cached(peft_model: nn.Module, key: tuple[str, str], build: Callable[[], Any]) -> Any:
    """Per-model memo of module lookups (walking ``named_modules`` each round is slow on big
    models). An entry is rebuilt when a cached module no longer carries the adapter.
    """
    cache: dict[tuple[str, str], Any] = peft_model.__dict__.setdefault(_CACHE_ATTR, {})
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
    return value


def _layer_map(peft_model: nn.Module, adapter: str) -> dict[str, LoraLayer]:
    layers: dict[str, LoraLayer] = _cached(
        peft_model, ("lora", adapter), lambda: dict(_lora_layers(peft_model, adapter))
    )
    if not layers or any(adapter not in layer.lora_A for layer in layers.values()):
        layers = dict(_lora_layers(peft_model, adapter))
        peft_model.__dict__[_CACHE_ATTR][("lora", adapter)] = layers
    if not layers:
        raise KeyError(f"no LoRA layer carries adapter {adapter!r}")
    return layers


def _weights(layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
    """``(lora_B.weight (d, r), lora_A.weight (r, n))`` of one layer."""
    lora_b = layer.lora_B[adapter]
    lora_a = layer.lora_A[adapter]
    assert isinstance(lora_b, nn.Linear) and isinstance(lora_a, nn.Linear)
    return lora_b.weight, lora_a.weight


def lora_scaling(peft_model: nn.Module, adapter: str) -> dict[str, float]:
    """Per-module LoRA scaling ``s`` of ``adapter`` (``lora_alpha / r`` or ``/ sqrt(r)``).

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model.
    adapter : str
        Adapter name.

    Returns
    -------
    dict[str, float]
        Canonical module name → scaling, as PEFT applies it in the forward pass.
    """
    return {
        name: float(layer.scaling[adapter]) for name, layer in _lora_layers(peft_model, adapter)
    }


def module_shapes(peft_model: nn.Module, adapter: str) -> dict[str, tuple[int, int]]:
    """Shapes ``(out_features, in_features)`` of the modules adapted by ``adapter``.

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model.
    adapter : str
        Adapter name.

    Returns
    -------
    dict[str, tuple[int, int]]
        Canonical module name → ``(d, n)``.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for name, layer in _lora_layers(peft_model, adapter):
        B, A = _weights(layer, adapter)
        shapes[name] = (int(B.shape[0]), int(A.shape[1]))
    return shapes


def get_factors(peft_model: nn.Module, adapter: str) -> Factors:
    """Effective factors of ``adapter``: ``(s · lora_B.weight, lora_A.weight)`` per module.

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model.
    adapter : str
        Adapter name.

    Returns
    -------
    Factors
        Canonical module name → ``(B_eff (d, r), A (r, n))``, detached float32 clones (on the
        weights' device), so that ``ΔW = B_eff A``.
    """
    factors: Factors = {}
    for name, layer in _layer_map(peft_model, adapter).items():
        B, A = _weights(layer, adapter)
        s = float(layer.scaling[adapter])
        factors[name] = (
            (B.detach().to(torch.float32) * s).clone(),
            A.detach().to(torch.float32).clone(),
        )
    return factors


def live_factors(peft_model: nn.Module, adapter: str) -> Factors:
    """Effective factors ``(s · lora_B.weight, lora_A.weight)`` that keep the autograd graph.

    For local loss terms on the factors (HetLoRA's rank self-pruning penalty): gradients flow
    back to the adapter's weights. Same names and layout as :func:`get_factors`.
    """
    factors: Factors = {}
    for name, layer in _layer_map(peft_model, adapter).items():
        B, A = _weights(layer, adapter)
        factors[name] = (B * float(layer.scaling[adapter]), A)
    return factors


def base_weights(peft_model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """Detached copies of the base weights of every LoRA-wrapped module (canonical names).

    The weights FLoRA merges into; a checkpoint stores them so a resumed run continues from the
    exact same floating-point values.
    """
    out: dict[str, Tensor] = {}
    for name, layer in _layer_map(peft_model, adapter).items():
        weight = layer.get_base_layer().weight
        assert isinstance(weight, Tensor)
        out[name] = weight.detach().clone()
    return out


def load_base_weights(peft_model: nn.Module, adapter: str, weights: Mapping[str, Tensor]) -> None:
    """Copy weights saved by :func:`base_weights` back into the wrapped modules' base layers."""
    layers = _layer_map(peft_model, adapter)
    unknown = sorted(set(weights) - set(layers))
    if unknown:
        raise KeyError(f"load_base_weights: no LoRA module named {unknown[0]!r}")
    with torch.no_grad():
        for name, value in weights.items():
            target = layers[name].get_base_layer().weight
            assert isinstance(target, Tensor)
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"load_base_weights: module {name!r} has weight {tuple(target.shape)}, "
                    f"got {tuple(value.shape)}"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def set_factors(
    peft_model: nn.Module, adapter: str, factors: Mapping[str, tuple[Tensor, Tensor]]
) -> None:
    """Load effective factors into ``adapter`` in place (``lora_B ← B_eff / s``, ``lora_A ← A``).

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model.
    adapter : str
        Adapter name; its rank must equal the factors' rank.
    factors : Mapping[str, tuple[Tensor, Tensor]]
        Canonical module name → ``(B_eff (d, r), A (r, n))``, one entry for every module the
        adapter covers. Weights keep their dtype and device.

    Raises
    ------
    KeyError
        If the module names differ from the adapter's.
    ValueError
        If a factor has the wrong shape.
    """
    layers = _layer_map(peft_model, adapter)
    missing = sorted(set(layers) - set(factors))
    unknown = sorted(set(factors) - set(layers))
    if missing or unknown:
        raise KeyError(
            f"adapter {adapter!r}: factor names do not match its modules "
            f"(missing: {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unknown: {unknown[:5]}{'…' if len(unknown) > 5 else ''})"
        )
    # Validate everything before writing anything.
    for name, layer in layers.items():
        B, A = _weights(layer, adapter)
        B_new, A_new = factors[name]
        if tuple(B_new.shape) != tuple(B.shape) or tuple(A_new.shape) != tuple(A.shape):
            raise ValueError(
                f"adapter {adapter!r}, module {name!r}: expected B {tuple(B.shape)} and "
                f"A {tuple(A.shape)} (d, r) / (r, n), got B {tuple(B_new.shape)} and "
                f"A {tuple(A_new.shape)}"
            )
    with torch.no_grad():
        for name, layer in layers.items():
            B, A = _weights(layer, adapter)
            B_new, A_new = factors[name]
            s = float(layer.scaling[adapter])
            B.copy_((B_new.to(device=B.device, dtype=torch.float32) / s).to(B.dtype))
            A.copy_(A_new.to(device=A.device, dtype=A.dtype))


def _saved_modules(peft_model: nn.Module, adapter: str) -> list[tuple[str, nn.Module]]:
    """``(canonical module name, adapter's trainable copy)`` of every ``modules_to_save``."""

    def build() -> list[tuple[str, nn.Module]]:
        return [
            (_canonical(name), module.modules_to_save[adapter])
            for name, module in peft_model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save
        ]

    saved: list[tuple[str, nn.Module]] = _cached(peft_model, ("saved", adapter), build)
    return saved


def get_dense(peft_model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """Fully trained tensors (``modules_to_save`` heads) of ``adapter``.

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model.
    adapter : str
        Adapter name.

    Returns
    -------
    dict[str, Tensor]
        Canonical name (``classifier.weight``) → detached clone (dtype and device kept).
    """
    dense: dict[str, Tensor] = {}
    for name, module in _saved_modules(peft_model, adapter):
        for key, value in module.state_dict().items():
            dense[f"{name}.{key}"] = value.detach().clone()
    return dense


def set_dense(peft_model: nn.Module, adapter: str, dense: Mapping[str, Tensor]) -> None:
    """Load ``modules_to_save`` tensors into ``adapter``'s copies in place.

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model.
    adapter : str
        Adapter name.
    dense : Mapping[str, Tensor]
        Canonical name → tensor, exactly the keys :func:`get_dense` returns.

    Raises
    ------
    KeyError
        If the names differ from the adapter's.
    ValueError
        If a tensor has the wrong shape.
    """
    targets: dict[str, Tensor] = {}
    for name, module in _saved_modules(peft_model, adapter):
        for key, value in module.state_dict(keep_vars=True).items():
            targets[f"{name}.{key}"] = value
    missing = sorted(set(targets) - set(dense))
    unknown = sorted(set(dense) - set(targets))
    if missing or unknown:
        raise KeyError(
            f"adapter {adapter!r}: dense names do not match its modules_to_save "
            f"(missing: {missing}, unknown: {unknown})"
        )
    for key, target in targets.items():
        if tuple(dense[key].shape) != tuple(target.shape):
            raise ValueError(
                f"adapter {adapter!r}, {key!r}: expected shape {tuple(target.shape)}, "
                f"got {tuple(dense[key].shape)}"
            )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(dense[key].to(device=target.device, dtype=target.dtype))


def trainable_parameters(peft_model: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad: the active adapter's LoRA weights and heads.

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model (after ``set_adapter``).

    Returns
    -------
    list[nn.Parameter]
        In ``named_parameters`` order; pass them to the optimizer.
    """
    return [p for p in peft_model.parameters() if p.requires_grad]


def _merge_targets(
    peft_model: nn.Module, names: Sequence[str]
) -> dict[str, tuple[Tensor, bool, int, int]]:
    """``name → (base weight, fan_in_fan_out, d, n)`` of the modules a merge writes into."""
    root: nn.Module = (
        peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    )
    out: dict[str, tuple[Tensor, bool, int, int]] = {}
    for name in names:
        try:
            module = root.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"merge_into_base: no module named {name!r}") from err
        fan_in_fan_out = False
        if isinstance(module, LoraLayer):
            fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
            module = module.get_base_layer()
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"merge_into_base: module {name!r} has no weight")
        d, n = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
        out[name] = (weight, fan_in_fan_out, int(d), int(n))
    return out


def merge_into_base(peft_model: nn.Module, delta: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """Add ``B @ A`` to each adapted module's base weight (``W ← W + B A``, FLoRA).

    The sum is formed in float32 and rounded once to the weight's dtype. For weights narrower
    than float32 (bfloat16) use :func:`set_merged_base`, which never compounds that rounding.

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model (the LoRA layers' base layers are updated) or a plain model (its
        ``nn.Linear`` modules are updated).
    delta : Mapping[str, tuple[Tensor, Tensor]]
        Canonical module name → effective ``(B (d, R), A (R, n))``.

    Raises
    ------
    KeyError
        If a module name is not found.
    ValueError
        If ``B @ A`` does not match the weight's shape.
    """
    # Validate every module first (nothing is merged when one is wrong), then merge one module
    # at a time so only one (d, n) product exists at once.
    targets = _merge_targets(peft_model, list(delta))
    for name, (B, A) in delta.items():
        _, _, d, n = targets[name]
        if (
            B.ndim != 2
            or A.ndim != 2
            or B.shape[1] != A.shape[0]
            or (B.shape[0], A.shape[1]) != (d, n)
        ):
            raise ValueError(
                f"merge_into_base: module {name!r} has weight (d, n) = ({d}, {n}), "
                f"got B {tuple(B.shape)} and A {tuple(A.shape)}"
            )
    with torch.no_grad():
        for name, (B, A) in delta.items():
            weight, fan_in_fan_out, _, _ = targets[name]
            dw = B.to(device=weight.device, dtype=torch.float32) @ A.to(
                device=weight.device, dtype=torch.float32
            )
            weight.copy_(
                (weight.to(torch.float32) + (dw.T if fan_in_fan_out else dw)).to(weight.dtype)
            )


def set_merged_base(
    peft_model: nn.Module, pristine: Mapping[str, Tensor], cumulative: Mapping[str, Tensor]
) -> None:
    """Set each adapted base weight to ``dtype(W_0 + Δ_cum)``: one rounding, however many rounds.

    Parameters
    ----------
    peft_model : nn.Module
        A PEFT-wrapped model.
    pristine : Mapping[str, Tensor]
        The base weights ``W_0`` before any merge (:func:`base_weights` layout).
    cumulative : Mapping[str, Tensor]
        ``Δ_cum (d, n)`` per module in float32: everything merged so far (FLoRA's
        ``base_delta``).

    Raises
    ------
    KeyError
        A module is missing from ``pristine`` or unknown to the model.
    ValueError
        A delta's shape does not match the weight.
    """
    targets = _merge_targets(peft_model, list(cumulative))
    for name, delta in cumulative.items():
        _, _, d, n = targets[name]
        if name not in pristine:
            raise KeyError(f"set_merged_base: no pristine weight for module {name!r}")
        if tuple(delta.shape) != (d, n):
            raise ValueError(
                f"set_merged_base: module {name!r} has weight (d, n) = ({d}, {n}), "
                f"got a delta of shape {tuple(delta.shape)}"
            )
    with torch.no_grad():
        for name, delta in cumulative.items():
            weight, fan_in_fan_out, _, _ = targets[name]
            dw = delta.to(device=weight.device, dtype=torch.float32)
            w0 = pristine[name].to(device=weight.device, dtype=torch.float32)
            weight.copy_((w0 + (dw.T if fan_in_fan_out else dw)).to(weight.dtype))


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
        """
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
        """Whether an adapted base weight is stored in a dtype narrower than float32."""
        layers = _layer_map(self.model, adapter_name(self.max_rank))
        return any(
            layer.get_base_layer().weight.dtype not in (torch.float32, torch.float64)
            for layer in layers.values()
        )

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


def export_peft_adapter(
    base_model_or_peft: nn.Module | None,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    dense: Mapping[str, Tensor] | None,
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a standard PEFT LoRA adapter directory for the given effective factors.

    The adapter has ``r = lora_alpha = rank`` (scaling 1, no rsLoRA), so the saved
    ``lora_B.weight`` is ``B_eff[:, :rank]`` and ``lora_A.weight`` is ``A[:rank]``.
    ``PeftModel.from_pretrained(fresh_base_model, out_dir)`` then computes ``W + B_eff A`` on
    every module, like the in-memory model. No model copy is made.

    Parameters
    ----------
    base_model_or_peft : nn.Module | None
        The base model or the ``PeftModel``; used to check shapes and for
        ``base_model_name_or_path``. ``None`` skips the shape checks against a model (the
        factors' own consistency is still checked).
    factors : Mapping[str, tuple[Tensor, Tensor]]
        Canonical module name → effective ``(B (d, r'), A (r', n))`` with ``r' >= rank``.
    dense : Mapping[str, Tensor] | None
        ``modules_to_save`` tensors, canonical names (as :func:`get_dense` returns).
    out_dir : str | os.PathLike[str]
        Output directory (created).
    rank : int
        Rank of the exported adapter (factors are truncated to it).
    target_modules : Sequence[str] | str | None
        PEFT ``target_modules``; ``None`` uses the factors' module names.
    modules_to_save : Sequence[str] | None
        PEFT ``modules_to_save``; required when ``dense`` is non-empty (unless ``task_type``
        implies it, as ``"SEQ_CLS"`` does).
    task_type : str | None
        PEFT task type.
    base_model_name_or_path : str | None
        Recorded in ``adapter_config.json``; defaults to the model's ``name_or_path``.

    Returns
    -------
    Path
        ``out_dir``.
    """
    from safetensors.torch import save_file

    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not factors:
        raise ValueError("export_peft_adapter: no factors given")
    root: nn.Module | None = (
        base_model_or_peft.get_base_model()
        if isinstance(base_model_or_peft, PeftModel)
        else base_model_or_peft
    )
    tensors: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        out_f = in_f = None
        if root is not None:
            try:
                module = root.get_submodule(name)
            except AttributeError as err:
                raise KeyError(f"export_peft_adapter: no module named {name!r}") from err
            out_f = getattr(module, "out_features", None)
            in_f = getattr(module, "in_features", None)
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"module {name!r}: B (d, r) and A (r, n) expected, got B {tuple(B.shape)} "
                f"and A {tuple(A.shape)}"
            )
        if (out_f is not None and B.shape[0] != out_f) or (in_f is not None and A.shape[1] != in_f):
            raise ValueError(
                f"module {name!r}: weight is ({out_f}, {in_f}), got B {tuple(B.shape)} and "
                f"A {tuple(A.shape)}"
            )
        if B.shape[1] < rank:
            raise ValueError(f"module {name!r}: factors have rank {B.shape[1]} < rank {rank}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A[:rank].detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B[:, :rank].detach().cpu().contiguous()

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=0.0,
        target_modules=(
            sorted(factors)
            if target_modules is None
            else target_modules
            if isinstance(target_modules, str)
            else list(target_modules)
        ),
        modules_to_save=None if modules_to_save is None else list(modules_to_save),
        task_type=task_type,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path
        or getattr(root, "name_or_path", None)
        or None,
    )
    if dense:
        # PEFT's task models add their heads at load time (SEQ_CLS: classifier, score).
        if not config.modules_to_save and task_type is None:
            raise ValueError(
                "export_peft_adapter: dense tensors given but no modules_to_save "
                "(pass modules_to_save or a task_type that implies it)"
            )
        for key, value in dense.items():
            tensors[f"{PEFT_PREFIX}{key}"] = value.detach().cpu().contiguous()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def scaling_for(rank: int, lora_alpha: float, *, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling ``alpha / r`` (``alpha / sqrt(r)`` under rsLoRA)."""
    return float(lora_alpha) / (math.sqrt(rank) if use_rslora else float(rank))
