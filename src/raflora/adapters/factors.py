"""Effective factors of PEFT LoRA adapters: layer lookup, LoRA scaling, get and set."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from raflora.methods.base import Factors

__all__ = [
    "PEFT_PREFIX",
    "adapter_name",
    "get_factors",
    "live_factors",
    "lora_parameters",
    "lora_scaling",
    "module_shapes",
    "scaling_for",
    "set_factors",
]

PEFT_PREFIX = "base_model.model."
"""Prefix PEFT puts in front of the wrapped model's module names (and saved keys)."""


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


def lora_parameters(
    peft_model: nn.Module, adapter: str
) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Module → the adapter's ``(lora_B.weight, lora_A.weight)`` parameters (PEFT layout).

    What a method's client half freezes (FFA-LoRA: ``A``) or whose gradients it corrects
    (ILoRA's control variates); same names as :func:`get_factors`.
    """
    out: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for name, layer in _layer_map(peft_model, adapter).items():
        B, A = _weights(layer, adapter)
        assert isinstance(B, nn.Parameter) and isinstance(A, nn.Parameter)
        out[name] = (B, A)
    return out


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


def scaling_for(rank: int, lora_alpha: float, *, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling ``alpha / r`` (``alpha / sqrt(r)`` under rsLoRA)."""
    return float(lora_alpha) / (math.sqrt(rank) if use_rslora else float(rank))
