"""Quantised base layers (``task.quantization``, docs/quantization.md): recognising them, their
weights in float32, the float32 residual merges go into, and their memory.

A 4-bit (or 8-bit) weight cannot take an exact merge ``W ← W + B A``: rounding the sum back to
4 bits would lose most of a round's update and compound every round. So a merge into a quantised
layer (FLoRA, FedEx-LoRA, ILoRA's base shift: docs/methods.md#aggregation-rules) is kept as a
float32 residual ``R (d, n)`` beside it, and the layer computes ``W_q x + R x`` (a forward hook
on the base layer, under PEFT's LoRA term), which training and evaluation both see. ``R`` is the
cumulative merged delta the server state already holds (``GlobalState.base_delta``), so the
quantised weight ``W_q`` never changes and is rebuilt from the model the same way on every
process; checkpoints and the Flower messages carry ``R`` where they carry a float base weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RESIDUAL",
    "dequantized_weight",
    "is_quantized",
    "is_quantized_model",
    "layer_bytes",
    "place_model",
    "residual",
    "set_residual",
]

RESIDUAL = "raflora_residual"
"""Name of the float32 residual buffer on a quantised base layer."""


def _bnb_classes() -> tuple[type, ...]:
    try:
        from bitsandbytes.nn import modules
    except ImportError:  # no bitsandbytes: nothing can be quantised
        return ()
    return (modules.Linear4bit, modules.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def _quantized_layers(model: nn.Module) -> Iterator[nn.Module]:
    classes = _bnb_classes()
    if classes:
        yield from (m for m in model.modules() if isinstance(m, classes))


def is_quantized_model(model: nn.Module) -> bool:
    """Whether ``model`` holds a quantised linear layer."""
    return next(_quantized_layers(model), None) is not None


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``model.to(device=device, dtype=dtype)``, or for a quantised model (loaded in the run's
    dtype on the run's device, docs/quantization.md: transformers refuses a dtype cast of it)
    a move to ``device`` only where a parameter is elsewhere.
    """
    if not is_quantized_model(model):
        return model.to(device=device, dtype=dtype)
    if any(p.device != device for p in model.parameters()):
        return model.to(device)
    return model


def dequantized_weight(layer: nn.Module) -> Tensor:
    """The weight ``W_q (d, n)`` a quantised layer computes with, in float32 (a new tensor)."""
    import bitsandbytes.functional as bnbf

    weight: Any = layer.weight  # a bitsandbytes Params4bit / Int8Params
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit: packed codes and their blockwise scales
        out = bnbf.dequantize_4bit(weight.data, state)
        return out.to(torch.float32)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scales is not None:  # 8-bit: row-wise absmax / 127
        codes: Tensor = weight.data.to(torch.float32)
        row: Tensor = scales.to(torch.float32)[:, None] / 127.0
        return codes * row
    plain: Tensor = weight.detach().to(torch.float32)
    return plain


def _add_residual(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook: the layer's output plus ``R x`` (computed in float32)."""
    res = getattr(module, RESIDUAL, None)
    if res is None:
        return output
    x = args[0]
    return output + F.linear(x.to(res.dtype), res).to(output.dtype)


def residual(layer: nn.Module) -> Tensor:
    """The float32 residual ``R (d, n)`` beside a quantised layer (zeros before any merge)."""
    res = getattr(layer, RESIDUAL, None)
    if res is not None:
        assert isinstance(res, Tensor)
        return res
    mod: Any = layer
    return torch.zeros(
        int(mod.out_features), int(mod.in_features), dtype=torch.float32, device=mod.weight.device
    )


def set_residual(layer: nn.Module, value: Tensor) -> None:
    """Set the float32 residual beside a quantised layer to ``value (d, n)`` (a copy), adding
    the forward hook on first use.
    """
    mod: Any = layer
    shape = (int(mod.out_features), int(mod.in_features))
    if tuple(value.shape) != shape:
        raise ValueError(f"residual: the layer is {shape}, got {tuple(value.shape)}")
    new = value.detach().to(device=mod.weight.device, dtype=torch.float32).clone()
    if getattr(layer, RESIDUAL, None) is None:
        layer.register_buffer(RESIDUAL, new, persistent=False)
        layer.register_forward_hook(_add_residual)
    else:
        setattr(layer, RESIDUAL, new)


def layer_bytes(layer: nn.Module) -> int:
    """Bytes a linear layer's weight takes in memory: the stored weight (4-bit codes, int8 or a
    float tensor) plus a quantised layer's scales (``quant_state``'s absmax and code book, or
    the int8 row scales); the bias and a residual are not counted.
    """
    weight: Any = layer.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        for part in (state.absmax, state.code, getattr(state, "state2", None)):
            if isinstance(part, Tensor):
                total += part.numel() * part.element_size()
            elif part is not None:  # nested statistics (double quantisation)
                total += sum(
                    t.numel() * t.element_size()
                    for t in (part.absmax, part.code)
                    if isinstance(t, Tensor)
                )
    scales = getattr(weight, "SCB", None)
    if isinstance(scales, Tensor):
        total += scales.numel() * scales.element_size()
    return int(total)
