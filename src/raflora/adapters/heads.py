"""Fully trained tensors (``modules_to_save`` heads) of an adapter, and its trainable parameters."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import Tensor, nn

from raflora.adapters.factors import _cached, _canonical

__all__ = [
    "get_dense",
    "set_dense",
    "trainable_parameters",
]


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
