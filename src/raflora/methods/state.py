"""The data a method works on: the server's global state, what a client is sent and uploads,
and the round-0 draw of ``A`` (docs/methods.md#global-state-and-broadcast).

Everything here is plain tensors keyed by module name, so both engines checkpoint, send and
receive it generically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AggregationResult",
    "ClientMessage",
    "ClientUpload",
    "Factors",
    "GlobalState",
    "lora_a_init",
    "map_tensors",
    "tensor_bytes",
]

Factors = dict[str, tuple[Tensor, Tensor]]
"""Module name → effective factors ``(B (d, r), A (r, n))``."""


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (dicts, lists and tuples are walked;
    anything else is kept as it is). Containers are rebuilt, so the result shares no dict.
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


@dataclass
class GlobalState:
    """The server's state between rounds.

    Attributes
    ----------
    factors : Factors
        Global effective factors. FedIT/HetLoRA/FlexLoRA/raFLoRA: ``B_g (d, r_max)``,
        ``A_g (r_max, n)`` with ``ΔW_g = B_g A_g`` the cumulative update. FLoRA: the last
        round's stacked update ``(B_s, A_s)`` (already merged into ``base_delta``).
    module_shapes : dict[str, tuple[int, int]]
        Module name → ``(d, n)``.
    dense : dict[str, Tensor]
        Fully trained tensors (heads), FedAvg-aggregated.
    round : int
        Number of aggregations performed so far.
    base_delta : dict[str, Tensor]
        Methods that merge a residual into the base weights
        (:meth:`~raflora.methods.Method.module_residual`: FLoRA, FedEx-LoRA): every residual
        merged so far, ``Σ_t B_t A_t`` (``(d, n)`` per module); empty for the others.
    extras : dict[str, Any]
        The method's own server state (HetLoRA's pruned ranks, ILoRA's control variate …):
        tensors, numbers, strings and nested dicts/lists of them, checkpointed as they are.
    """

    factors: Factors
    module_shapes: dict[str, tuple[int, int]]
    dense: dict[str, Tensor] = field(default_factory=dict)
    round: int = 0
    base_delta: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def state_dict(self, *, clone: bool = True) -> dict[str, Any]:
        """Plain nested dict of tensors and ints (for ``torch.save`` checkpoints).

        ``clone=False`` shares the tensors (enough for writing a checkpoint right away, and no
        extra copy of FLoRA's dense deltas).
        """

        def c(t: Tensor) -> Tensor:
            return t.clone() if clone else t

        return {
            "factors": {k: (c(B), c(A)) for k, (B, A) in self.factors.items()},
            "module_shapes": dict(self.module_shapes),
            "dense": {k: c(v) for k, v in self.dense.items()},
            "round": self.round,
            "base_delta": {k: c(v) for k, v in self.base_delta.items()},
            "extras": map_tensors(self.extras, c),
        }

    @property
    def device(self) -> torch.device:
        """Where the state's tensors live (the run's device; the CPU for an empty state)."""
        for B, _ in self.factors.values():
            return B.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The state's floating-point dtype (float32 in every run, whatever the model's)."""
        for B, _ in self.factors.values():
            return B.dtype
        return torch.float32

    def to(self, device: torch.device | str) -> GlobalState:
        """The same state with every tensor on ``device`` (no copy for tensors already there)."""
        return replace(
            self,
            factors={k: (B.to(device), A.to(device)) for k, (B, A) in self.factors.items()},
            dense={k: v.to(device) for k, v in self.dense.items()},
            base_delta={k: v.to(device) for k, v in self.base_delta.items()},
            extras=map_tensors(self.extras, lambda t: t.to(device)),
        )

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> GlobalState:
        """Inverse of :meth:`state_dict`."""
        return cls(
            factors={k: (B, A) for k, (B, A) in data["factors"].items()},
            module_shapes={k: (int(d), int(n)) for k, (d, n) in data["module_shapes"].items()},
            dense=dict(data["dense"]),
            round=int(data["round"]),
            base_delta=dict(data["base_delta"]),
            extras=dict(data["extras"]),
        )


@dataclass(frozen=True)
class FactorAggregation:
    """What :meth:`~raflora.methods.Method.aggregate_factors` returns for one round.

    Attributes
    ----------
    factors : Factors
        The new global factors, every module.
    residual : Factors or None
        The factored delta merged into the base weights this round (``None``: nothing merged).
    extras : Mapping[str, Any]
        Entries of ``state.extras`` the aggregation itself produced (FedHL's tail), set on the
        new state before :meth:`~raflora.methods.Method.finish_state`; empty by default.
    """

    factors: Factors
    residual: Factors | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of one round's aggregation.

    ``rejected`` maps client id → the reason its update was left out. When no update was
    accepted, ``state`` is the previous state, unchanged. ``residual`` is the factored delta to
    merge into the base weights this round (:meth:`~raflora.methods.Method.module_residual`:
    FLoRA's stack, FedEx-LoRA's residual), else ``None``.
    """

    state: GlobalState
    accepted: tuple[int, ...]
    rejected: dict[int, str]
    residual: Factors | None = None

    @property
    def base_update(self) -> Factors | None:
        """The 0.1 name of :attr:`residual`."""
        return self.residual


@dataclass(frozen=True)
class ClientMessage:
    """What the server sends a client for one round (besides the global heads).

    Attributes
    ----------
    factors : Factors
        Effective factors at the client's rank (the nested truncation of the global factors for
        most methods; FLoRA: a fresh init).
    extras : dict[str, Tensor]
        Named extra tensors of the method (ILoRA's control variate …); empty for most.
    """

    factors: Factors
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpload:
    """What a client's round produced (:meth:`~raflora.methods.ClientRound.finish`).

    Attributes
    ----------
    factors : Factors
        The effective factors to upload.
    extras : dict[str, Tensor]
        Named extra tensors to upload (validated against
        :meth:`~raflora.methods.Method.upload_extra_shapes`).
    state : dict[str, Tensor] or None
        The client's new per-client state, kept until its next round (``None``: it keeps none;
        the engine then keeps whatever it had).
    """

    factors: Factors
    extras: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None


def lora_a_init(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """PEFT's default ``lora_A`` init (``kaiming_uniform_(a=√5)``): ``U(-1/√n, 1/√n)``, ``(r, n)``.

    Drawn from ``generator`` on the CPU in float32, so it is reproducible on every device.
    """
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def tensor_bytes(tensors: Mapping[str, Any]) -> int:
    """Bytes of every tensor in a mapping of tensors or ``(B, A)`` pairs.

    What is counted: docs/design.md#communication.
    """
    total = 0
    for value in tensors.values():
        parts = value if isinstance(value, tuple) else (value,)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total
