"""The method interface shared by every method (both halves), and its name registry.

A method (DESIGN layer 2) is one subclass of :class:`Method` in one file, registered by name, with
typed options. Its **server half** answers, for a whole model (a dict of modules, SPEC §2–3, §9):

* the round-0 state (:meth:`Method.init_state`; it may read the base weights, ILoRA's QR init);
* what a client of rank ``r`` is sent (:meth:`Method.client_message`: factors and named extras);
* how the accepted client updates become the next global state (:meth:`Method.aggregate`, per
  module :meth:`Method.aggregate_module`), and the residual merged into the base weights
  (:meth:`Method.module_residual`: FLoRA's stack, FedEx-LoRA's residual);
* the algorithmic traffic (:meth:`Method.download_numel`, :meth:`Method.upload_bytes`, SPEC §8).

Its **client half** is a :class:`ClientRound` (:meth:`Method.client_round`): the local factors
from what was received, which factors train, a local loss term, a gradient correction applied
before clipping and the optimizer step, the transform before upload, the extras uploaded and the
per-client state kept across the rounds a client takes part in.

Everything here is pure tensor code keyed by module name — no models, I/O or transport — so the
local engine and the Flower engine call the same hooks and carry extras and per-client state
generically. Per-module math works on tensors with leading batch dimensions; the whole-model
:meth:`Method.aggregate` groups modules of one shape and aggregates each group in one batched
call. ``Aggregator`` is the 0.1 name of :class:`Method`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from raflora.methods.options import MethodOptions
from raflora.methods.validation import (
    ClientUpdate,
    InvalidUpdateError,
    is_positive_int,
    validate_update,
)

__all__ = [
    "AggregationResult",
    "Aggregator",
    "ClientMessage",
    "ClientRound",
    "ClientUpload",
    "Factors",
    "GlobalState",
    "Method",
    "lora_a_init",
    "map_tensors",
    "sample_weights",
    "weighted_average",
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
        Methods that merge a residual into the base weights (:meth:`Method.module_residual`:
        FLoRA, FedEx-LoRA): every residual merged so far, ``Σ_t B_t A_t`` (``(d, n)`` per
        module); empty for the others.
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
class AggregationResult:
    """Outcome of one round's aggregation.

    ``rejected`` maps client id → the reason its update was left out. When no update was
    accepted, ``state`` is the previous state, unchanged. ``residual`` is the factored delta to
    merge into the base weights this round (:meth:`Method.module_residual`: FLoRA's stack,
    FedEx-LoRA's residual), else ``None``.
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
    """What a client's round produced (:meth:`ClientRound.finish`).

    Attributes
    ----------
    factors : Factors
        The effective factors to upload.
    extras : dict[str, Tensor]
        Named extra tensors to upload (validated against :meth:`Method.upload_extra_shapes`).
    state : dict[str, Tensor] or None
        The client's new per-client state, kept until its next round (``None``: it keeps none;
        the engine then keeps whatever it had).
    """

    factors: Factors
    extras: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None


def _as_dtype(update: ClientUpdate, dtype: torch.dtype) -> ClientUpdate:
    """``update`` with every tensor in ``dtype`` (no copy for tensors already in it)."""
    return replace(
        update,
        factors={k: (B.to(dtype), A.to(dtype)) for k, (B, A) in update.factors.items()},
        dense={k: v.to(dtype) for k, v in update.dense.items()},
        extras={k: v.to(dtype) for k, v in update.extras.items()},
    )


def lora_a_init(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """PEFT's default ``lora_A`` init (``kaiming_uniform_(a=√5)``): ``U(-1/√n, 1/√n)``, ``(r, n)``.

    Drawn from ``generator`` on the CPU in float32, so it is reproducible on every device.
    """
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def sample_weights(samples: Sequence[int], *, like: Tensor) -> Tensor:
    """``p_k = n_k / Σ_j n_j`` as a 1-D tensor on ``like``'s device (float64 for accuracy)."""
    n = torch.tensor([float(s) for s in samples], dtype=torch.float64, device=like.device)
    return n / n.sum()


def weighted_average(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``Σ_k w_k T_k`` for equally shaped tensors (FedAvg; weights are used as given)."""
    out = torch.zeros_like(tensors[0], dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    for w, t in zip(weights.tolist(), tensors, strict=True):
        out.add_(t.to(out.dtype), alpha=w)
    return out.to(tensors[0].dtype)


class ClientRound:
    """The client half of a method: one client's local round (DESIGN layer 2).

    The engine builds one per client and round (:meth:`Method.client_round`) and calls, in
    order: :meth:`start` (the factors put on the client's adapter), :attr:`trains` (which
    factors get gradients), :meth:`penalty` every step when :attr:`uses_penalty`,
    :meth:`correct_gradients` every step before clipping and the optimizer step when
    :attr:`corrects_gradients`, and :meth:`finish` with the trained factors. This default is
    plain LoRA: start from what was received, train both factors, upload them unchanged.

    Parameters
    ----------
    method : Method
        The method (its options).
    received : ClientMessage
        What the server sent.
    rank : int
        The client's rank this round.
    round_index : int
        The 1-based round.
    state : Mapping[str, Tensor] or None
        The client's per-client state from its last round (``None`` before its first).
    """

    #: Which factors train this round: a subset of ``{"B", "A"}``.
    trains: frozenset[str] = frozenset({"B", "A"})
    #: Whether :meth:`penalty` adds a local loss term (the engine skips it otherwise).
    uses_penalty: bool = False
    #: Whether :meth:`correct_gradients` changes the gradients (skipped otherwise).
    corrects_gradients: bool = False

    def __init__(
        self,
        method: Method,
        received: ClientMessage,
        *,
        rank: int,
        round_index: int,
        state: Mapping[str, Tensor] | None,
    ) -> None:
        self.method = method
        self.received = received
        self.rank = rank
        self.round_index = round_index
        self.state = state

    def start(self) -> Factors:
        """The effective factors local training starts from (default: those received)."""
        return self.received.factors

    def penalty(self, live: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor | None:
        """Local loss term on the live effective factors (the gradient flows through it)."""
        return None

    def correct_gradients(self, grads: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> None:
        """Change the raw minibatch gradients in place, before clipping and the optimizer step.

        ``grads`` maps module → the gradients of the adapter's ``(lora_B, lora_A)`` weights
        (PEFT layout; ``None`` for a frozen factor).
        """

    def finish(self, trained: Factors) -> ClientUpload:
        """What the client uploads, from its trained effective factors (default: them)."""
        return ClientUpload(trained)


class Method(ABC):
    """Base class of a method: one subclass per method, registered by name with :func:`register`.

    Parameters
    ----------
    rank_levels : Sequence[int]
        The configured rank levels ``R = {r_1 < … < r_max}``; the server keeps rank ``r_max``.
    options : MethodOptions, optional
        The method's options, an instance of its :attr:`Options` (default: every default).
    """

    name: ClassVar[str]
    #: Whether client ranks must be one of the rank levels (raFLoRA's partitions need it).
    ranks_must_be_levels: ClassVar[bool] = False
    #: Whether every client must have the same rank (one rank level): FedIT's factor averaging.
    single_rank_level: ClassVar[bool] = False
    #: Whether :meth:`init_state` reads the base weights (the engine then passes them).
    reads_base_weights: ClassVar[bool] = False
    #: Whether rows also report the energy of the round's merged residual
    #: (``residual_higher_rank_energy``): FedEx-LoRA, whose global factors are not the residual.
    reports_residual_energy: ClassVar[bool] = False
    #: The method's typed options (a frozen :class:`MethodOptions` dataclass); none by default.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: The client half (:class:`ClientRound`: plain LoRA by default).
    ClientRoundType: ClassVar[type[ClientRound]] = ClientRound

    def __init__(self, rank_levels: Sequence[int], options: MethodOptions | None = None) -> None:
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(
                f"{self.name} takes {self.Options.__name__} options, got {type(options).__name__}"
            )
        self.options = options
        levels = [int(r) for r in rank_levels]
        if not levels:
            raise ValueError("rank_levels must not be empty")
        if any(r <= 0 for r in levels):
            raise ValueError(f"rank levels must be positive, got {levels}")
        if levels != sorted(set(levels)):
            raise ValueError(f"rank levels must be strictly increasing, got {levels}")
        self.rank_levels: tuple[int, ...] = tuple(levels)
        self.r_max = levels[-1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank_levels={list(self.rank_levels)}, {self.options!r})"

    # ----------------------------------------------------------------- server: state
    def init_state(
        self,
        module_shapes: Mapping[str, tuple[int, int]],
        *,
        generator: torch.Generator,
        dense: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        base_weights: Mapping[str, Tensor] | None = None,
        client_ranks: Sequence[int] = (),
    ) -> GlobalState:
        """Initial global state: ``B_g = 0`` and PEFT's default ``A_g`` init at ``r_max`` (SPEC §2).

        Modules are initialised in sorted name order from ``generator``, so the same seed gives
        the same state whatever order the model lists its modules in. ``base_weights`` (module →
        ``W_0 (d, n)``) is given when :attr:`reads_base_weights` is set; ``client_ranks`` is the
        rank of every client of the federation (ILoRA's control variates count them).
        """
        factors: Factors = {}
        for name in sorted(module_shapes):
            d, n = module_shapes[name]
            A = lora_a_init(self.r_max, n, generator).to(device=device, dtype=dtype)
            factors[name] = (torch.zeros(d, self.r_max, dtype=dtype, device=device), A)
        return GlobalState(
            factors=factors,
            module_shapes={k: (int(d), int(n)) for k, (d, n) in module_shapes.items()},
            dense={k: v.detach().clone() for k, v in (dense or {}).items()},
        )

    def module_shape_problem(self, module_shapes: Mapping[str, tuple[int, int]]) -> str | None:
        """Why the method cannot adapt modules of these ``(d, n)`` shapes (``None``: it can).

        The engines ask before the first round and stop with the message.
        """
        return None

    def initial_residual(self, state: GlobalState) -> Factors | None:
        """A factored delta merged into the base weights before round 1 (ILoRA's base shift),
        given the round-0 ``state``; ``None`` (the default) for a method that merges none.
        """
        return None

    def with_residual(self, state: GlobalState, residual: Factors) -> GlobalState:
        """``state`` with ``residual`` added to ``base_delta`` (every residual merged so far)."""
        delta = dict(state.base_delta)
        for name, (B_r, A_r) in residual.items():
            step = B_r @ A_r  # (d, n): the residual merged into the base
            delta[name] = delta[name] + step if name in delta else step
        return replace(state, base_delta=delta)

    def client_rank(self, state: GlobalState, client_id: int, declared_rank: int) -> int:
        """The rank client ``client_id`` trains at this round (HetLoRA may have pruned it)."""
        return declared_rank

    # ------------------------------------------------------- server: what a client gets
    def client_message(
        self,
        state: GlobalState,
        rank: int,
        *,
        client_id: int,
        round_index: int,
        generator: torch.Generator | None = None,
    ) -> ClientMessage:
        """What client ``client_id`` (rank ``rank``) is sent in round ``round_index``.

        Default: :meth:`client_factors` and no extras.
        """
        return ClientMessage(self.client_factors(state, rank, generator=generator))

    def client_factors(
        self, state: GlobalState, rank: int, *, generator: torch.Generator | None = None
    ) -> Factors:
        """Effective factors a client of rank ``rank`` starts from: the nested truncation
        ``B_g[:, :r]``, ``A_g[:r, :]`` (paper Algorithm 1 line 5).
        """
        self._check_rank(rank)
        return {
            k: (B[:, :rank].clone(), A[:rank, :].clone()) for k, (B, A) in state.factors.items()
        }

    def model_factors(self, state: GlobalState) -> Factors:
        """Factors at ``r_max`` that, on the current base weights, give the global model.

        ``B_g, A_g`` for the methods that keep global factors; FLoRA (whose updates are merged
        into the base) overrides it with a zero adapter.
        """
        return {k: (B.clone(), A.clone()) for k, (B, A) in state.factors.items()}

    def level_factors(self, state: GlobalState, rank: int) -> Factors:
        """Factors at ``r_max`` that, on the current base weights, give the model a client of
        rank ``rank`` holds after receiving the global state (per-level evaluation).

        By default what :meth:`client_factors` sends it — the nested truncation ``B_g[:, :r]``,
        ``A_g[:r, :]`` — zero-padded to ``r_max`` (the padded directions add nothing to
        ``B A``). A method whose clients hold something other than what they start training
        from overrides it (FLoRA: the merged base).
        """
        out: Factors = {}
        for name, (B, A) in self.client_factors(state, rank).items():
            d, n = state.module_shapes[name]
            B_pad = B.new_zeros(d, self.r_max)  # (d, r_max): columns ≥ r stay 0
            A_pad = A.new_zeros(self.r_max, n)  # (r_max, n): rows ≥ r stay 0
            B_pad[:, :rank] = B
            A_pad[:rank, :] = A
            out[name] = (B_pad, A_pad)
        return out

    # ------------------------------------------------------------- server: traffic
    def download_numel(self, state: GlobalState, rank: int) -> int:
        """Elements the method must send a client of rank ``rank`` for the adapted modules,
        extras included (SPEC §8–9; the heads are counted by the engine).
        """
        return sum((d + n) * rank for d, n in state.module_shapes.values())

    def upload_bytes(self, update: ClientUpdate, round_index: int) -> int:
        """Bytes the method must receive from a client in round ``round_index`` for the adapted
        modules, extras included (SPEC §8–9; the heads are counted by the engine). Default: both
        factors and the extras.
        """
        total = sum(B.numel() * B.element_size() for B, _ in update.factors.values())
        total += sum(A.numel() * A.element_size() for _, A in update.factors.values())
        return total + sum(t.numel() * t.element_size() for t in update.extras.values())

    # ------------------------------------------------------------------ client half
    def client_round(
        self,
        received: ClientMessage,
        *,
        rank: int,
        round_index: int,
        state: Mapping[str, Tensor] | None = None,
    ) -> ClientRound:
        """The client half for one client's round (an instance of :attr:`ClientRoundType`)."""
        return self.ClientRoundType(self, received, rank=rank, round_index=round_index, state=state)

    def upload_extra_shapes(self, state: GlobalState, rank: int) -> dict[str, tuple[int, ...]]:
        """Name → shape of every extra tensor a client of rank ``rank`` must upload (none)."""
        return {}

    def client_state_shapes(self, state: GlobalState, rank: int) -> dict[str, tuple[int, ...]]:
        """Name → shape of a rank-``rank`` client's per-client state (none: it keeps none).

        The Flower engine checks the state a client returns against it before keeping it.
        """
        return {}

    # ------------------------------------------------------------- server: aggregation
    @abstractmethod
    def aggregate_module(
        self,
        updates: Sequence[tuple[Tensor, Tensor, int]],
        previous: tuple[Tensor, Tensor] | None = None,
        *,
        round_index: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """Aggregate one module (or a batch of same-shape modules).

        Parameters
        ----------
        updates : Sequence[tuple[Tensor, Tensor, int]]
            ``(B_k (..., d, r_k), A_k (..., r_k, n), n_k)`` effective factors and sample counts of
            the accepted clients; leading dimensions (a batch of modules) are shared.
        previous : tuple[Tensor, Tensor], optional
            The previous global factors of these modules.
        round_index : int
            The 1-based round being aggregated (RoLoRA's phase depends on it).

        Returns
        -------
        tuple[Tensor, Tensor]
            The new global factors (see each method).
        """

    def module_residual(
        self,
        updates: Sequence[tuple[Tensor, Tensor, int]],
        new: tuple[Tensor, Tensor],
        previous: tuple[Tensor, Tensor] | None = None,
        *,
        round_index: int = 1,
    ) -> tuple[Tensor, Tensor] | None:
        """The factored residual of one module (batch) merged into the base weights after this
        aggregation, given the new global factors ``new``; ``None`` (the default) for a method
        that merges nothing.
        """
        return None

    def validate(
        self,
        state: GlobalState,
        update: ClientUpdate,
        *,
        wire_dtypes: Sequence[torch.dtype] = (),
    ) -> None:
        """Raise an :class:`InvalidUpdateError` if ``update`` cannot be aggregated.

        Accepted dtypes are float32, the state's (float32 in a run) and ``wire_dtypes`` (the
        run's model dtype); every tensor must be on the state's device; the extras must be
        those of :meth:`upload_extra_shapes`.
        """
        validate_update(
            update,
            state.module_shapes,
            dense_shapes={k: tuple(v.shape) for k, v in state.dense.items()},
            allowed_ranks=self.rank_levels if self.ranks_must_be_levels else None,
            max_rank=self.r_max,
            dtypes={torch.float32, state.dtype, *wire_dtypes},
            device=state.device,
            extra_shapes=self.upload_extra_shapes(state, update.rank)
            if is_positive_int(update.rank) and update.rank <= self.r_max
            else None,
        )

    def aggregate(
        self,
        state: GlobalState,
        updates: Sequence[ClientUpdate],
        *,
        wire_dtypes: Sequence[torch.dtype] = (),
    ) -> AggregationResult:
        """Validate every update and aggregate the accepted ones into the next global state.

        Rejected updates are reported in the result, not raised. With none accepted the state
        is returned unchanged. Accepted updates are upcast to the state's dtype (float32) before
        anything is averaged, so a bfloat16 update never demotes the state (see
        :meth:`validate` for the dtypes accepted). A method's residual
        (:meth:`module_residual`) is added to the state's ``base_delta`` and returned for the
        engine to merge into the base weights.
        """
        accepted: list[ClientUpdate] = []
        rejected: dict[int, str] = {}
        counts = Counter(u.client_id for u in updates)
        for update in updates:
            try:
                if counts[update.client_id] > 1:
                    # ambiguous which one is genuine: every update under that id is left out
                    raise InvalidUpdateError(
                        update.client_id,
                        f"duplicate: {counts[update.client_id]} updates under one id this round",
                    )
                self.validate(state, update, wire_dtypes=wire_dtypes)
            except InvalidUpdateError as err:
                rejected[update.client_id] = err.reason
                continue
            accepted.append(_as_dtype(update, state.dtype))
        if not accepted:
            return AggregationResult(state, (), rejected)
        new_factors, residual = self._aggregate_factors(state, accepted)
        weights = sample_weights([u.num_samples for u in accepted], like=torch.empty(0))
        dense = {
            name: weighted_average([u.dense[name] for u in accepted], weights)
            for name in state.dense
        }
        new_state = replace(state, factors=new_factors, dense=dense, round=state.round + 1)
        if residual is not None:
            new_state = self.with_residual(new_state, residual)
        new_state = self.finish_state(state, new_state, accepted)
        return AggregationResult(
            new_state, tuple(u.client_id for u in accepted), rejected, residual=residual
        )

    def finish_state(
        self, previous: GlobalState, state: GlobalState, accepted: Sequence[ClientUpdate]
    ) -> GlobalState:
        """Hook for the method's own server state (``state.extras``: HetLoRA's pruned ranks,
        ILoRA's control variate) after the factors are aggregated; default: ``state``.
        """
        return state

    def _aggregate_factors(
        self, state: GlobalState, accepted: Sequence[ClientUpdate]
    ) -> tuple[Factors, Factors | None]:
        """Run :meth:`aggregate_module` (and :meth:`module_residual`) once per group of
        same-shape modules (batched); the new factors and the residual (``None`` if none).
        """
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name in sorted(state.module_shapes):
            groups[state.module_shapes[name]].append(name)
        round_index = state.round + 1
        out: Factors = {}
        residual: Factors = {}
        for names in groups.values():
            batch = [
                (
                    torch.stack([u.factors[m][0] for m in names]),  # (m, d, r_k)
                    torch.stack([u.factors[m][1] for m in names]),  # (m, r_k, n)
                    u.num_samples,
                )
                for u in accepted
            ]
            previous = (
                torch.stack([state.factors[m][0] for m in names]),
                torch.stack([state.factors[m][1] for m in names]),
            )
            B, A = self.aggregate_module(batch, previous, round_index=round_index)
            res = self.module_residual(batch, (B, A), previous, round_index=round_index)
            for i, m in enumerate(names):
                out[m] = (B[i], A[i])
                if res is not None:
                    residual[m] = (res[0][i], res[1][i])
        return out, (residual if residual else None)

    def _check_rank(self, rank: int) -> None:
        if rank <= 0 or rank > self.r_max:
            raise ValueError(f"rank must be in 1…{self.r_max} (r_max), got {rank}")


Aggregator = Method
"""The 0.1 name of :class:`Method` (a method was server-only then)."""
