"""Base weights of the adapted modules: copies for checkpoints, and FLoRA's merge into them.

Over a quantised base (``task.quantization``) the weight a merge writes into is the float32
residual beside each quantised layer (:mod:`raflora.adapters.quantized`): these functions read
and write it where they would read and write a float weight (docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from raflora.adapters.factors import _layer_map
from raflora.adapters.quantized import dequantized_weight, is_quantized, residual, set_residual

__all__ = [
    "base_weights",
    "effective_base_weights",
    "load_base_weights",
    "merge_into_base",
    "set_merged_base",
]


def base_weights(peft_model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """Detached copies of the base weights of every LoRA-wrapped module (canonical names).

    The weights FLoRA merges into; a checkpoint stores them so a resumed run continues from the
    exact same floating-point values. A quantised layer's entry is its float32 residual (what
    merges write into; its quantised weight never changes).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _layer_map(peft_model, adapter).items():
        base = layer.get_base_layer()
        if is_quantized(base):
            out[name] = residual(base).detach().clone()
            continue
        weight = base.weight
        assert isinstance(weight, Tensor)
        out[name] = weight.detach().clone()
    return out


def effective_base_weights(peft_model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """The weights the base layers compute with: :func:`base_weights`, except that a quantised
    layer gives its dequantised weight plus its residual, in float32 (ILoRA's QR init reads it).
    """
    out = base_weights(peft_model, adapter)
    for name, layer in _layer_map(peft_model, adapter).items():
        base = layer.get_base_layer()
        if is_quantized(base):
            out[name] = dequantized_weight(base) + out[name]
    return out


def load_base_weights(peft_model: nn.Module, adapter: str, weights: Mapping[str, Tensor]) -> None:
    """Copy weights saved by :func:`base_weights` back into the wrapped modules' base layers."""
    layers = _layer_map(peft_model, adapter)
    unknown = sorted(set(weights) - set(layers))
    if unknown:
        raise KeyError(f"load_base_weights: no LoRA module named {unknown[0]!r}")
    with torch.no_grad():
        for name, value in weights.items():
            base = layers[name].get_base_layer()
            if is_quantized(base):  # base_weights gave its residual
                set_residual(base, value)
                continue
            target = base.weight
            assert isinstance(target, Tensor)
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"load_base_weights: module {name!r} has weight {tuple(target.shape)}, "
                    f"got {tuple(value.shape)}"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))


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
        if is_quantized(module):  # merges go into its float32 residual (d, n)
            res = residual(module)
            out[name] = (res, False, int(res.shape[0]), int(res.shape[1]))
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"merge_into_base: module {name!r} has no weight")
        d, n = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
        out[name] = (weight, fan_in_fan_out, int(d), int(n))
    return out


def _quantized_base(peft_model: nn.Module, name: str) -> nn.Module | None:
    """The quantised base layer of module ``name``, or ``None`` when it is not quantised."""
    root: nn.Module = (
        peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    )
    module = root.get_submodule(name)
    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    return module if is_quantized(module) else None


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
            quantized = _quantized_base(peft_model, name)
            if quantized is not None:  # R ← R + B A beside the quantised weight
                set_residual(quantized, weight + dw)
                continue
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
        if name not in pristine and _quantized_base(peft_model, name) is None:
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
            quantized = _quantized_base(peft_model, name)
            if quantized is not None:  # R = Δ_cum beside the quantised weight, exactly
                set_residual(quantized, dw)
                continue
            w0 = pristine[name].to(device=weight.device, dtype=torch.float32)
            weight.copy_((w0 + (dw.T if fan_in_fan_out else dw)).to(weight.dtype))
