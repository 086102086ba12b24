"""The method interface: :class:`Method` (the server half) and :class:`ClientRound` (the client
half) — docs/design.md#layers, and ``examples/README.md`` for the complete hooks table.

A method is one subclass of :class:`Method` in one file, registered by name, with typed options
and its :class:`~raflora.methods.context.Capabilities`. Every hook that depends on who or when
takes a :class:`~raflora.methods.context.RoundContext` first, then its data. The hooks, grouped
as a round uses them (Algorithm 1 of the paper; docs/design.md#one-round):

* **server state** — the round-0 state (:meth:`Method.init_state`), the rank a client trains at
  (:meth:`Method.client_rank`);
* **what a client gets** — :meth:`Method.client_message` (line 5's broadcast), built from
  :meth:`Method.client_factors`; what the global model and each rank level hold
  (:meth:`Method.model_factors`, :meth:`Method.level_factors`);
* **aggregation** — per module :meth:`Method.aggregate_module` (lines 8–17), the residual merged
  into the base weights (:meth:`Method.module_residual`) and the method's own server state
  (:meth:`Method.finish_state`), all driven by :meth:`Method.aggregate`;
* **traffic** — :meth:`Method.download_numel`, :meth:`Method.upload_bytes`
  (docs/design.md#communication);
* **client half** — :meth:`Method.client_round` builds a :class:`ClientRound` (lines 6–7): the
  factors training starts from, which train, a loss term, a gradient correction, the upload;
* **privacy** (``privacy.enabled``, docs/privacy.md) — :meth:`Method.private_rule` declares the
  private update (product or factor space, which factors, partitions or per-index weights),
  :meth:`Method.privacy_refusal` says why the method (with its options) cannot be private,
  :meth:`Method.private_aggregate_module` applies the method's rule to the noised mean.

Everything here is pure tensor code keyed by module name — no models, I/O or transport — so both
engines call the same hooks. The data types live in :mod:`raflora.methods.state`, FedAvg's
weights in :mod:`raflora.methods.averaging`; both are re-exported here. ``Aggregator`` is the 0.1
name of :class:`Method`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from raflora.methods.averaging import sample_weights, weighted_average
from raflora.methods.context import Capabilities, RoundContext
from raflora.methods.options import MethodOptions
from raflora.methods.private import PrivateRule
from raflora.methods.state import (
    AggregationResult,
    ClientMessage,
    ClientUpload,
    FactorAggregation,
    Factors,
    GlobalState,
    lora_a_init,
    map_tensors,
    tensor_bytes,
)
from raflora.methods.validation import (
    ClientUpdate,
    InvalidUpdateError,
    is_positive_int,
    validate_update,
)

__all__ = [
    "AggregationResult",
    "Aggregator",
    "Capabilities",
    "ClientMessage",
    "ClientRound",
    "ClientUpload",
    "FactorAggregation",
    "Factors",
    "GlobalState",
    "Method",
    "ModuleUpdates",
    "RoundContext",
    "lora_a_init",
    "map_tensors",
    "sample_weights",
    "weighted_average",
]

ModuleUpdates = Sequence[tuple[Tensor, Tensor, int]]
"""One module's accepted updates: ``(B_k (…, d, r_k), A_k (…, r_k, n), n_k)`` per client."""


class ClientRound:
    """The client half of a method: one client's local round (Algorithm 1 lines 6–7).

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
    ctx : RoundContext
        The round and the client (``ctx.client_id``, ``ctx.rank``, ``ctx.round_index``).
    received : ClientMessage
        What the server sent.
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
        ctx: RoundContext,
        received: ClientMessage,
        state: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.method = method
        self.ctx = ctx
        self.received = received
        self.state = state

    @property
    def rank(self) -> int:
        """The client's rank this round (``ctx.rank``)."""
        return self.ctx.rank

    @property
    def round_index(self) -> int:
        """The 1-based round (``ctx.round_index``)."""
        return self.ctx.round_index

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


class _FromCapabilities:
    """A read-only view of one :class:`Capabilities` field under its 0.1 class-attribute name
    (``Method.single_rank_level`` …), so code that reads the old flags keeps working.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> bool:
        cls = owner if owner is not None else type(obj)
        value: bool = getattr(getattr(cls, "capabilities"), self.name)  # noqa: B009
        return value

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(
            f"{self.name} is read from the method's capabilities; declare it as "
            f"capabilities = Capabilities({self.name}=...)"
        )


class Method(ABC):
    """Base class of a method: one subclass per method, registered by name with ``register``.

    Parameters
    ----------
    rank_levels : Sequence[int]
        The configured rank levels ``R = {r_1 < … < r_max}``; the server keeps rank ``r_max``.
    options : MethodOptions, optional
        The method's options, an instance of its :attr:`Options` (default: every default);
        hooks read them from ``self.options``.
    """

    name: ClassVar[str]
    #: What the method declares about itself (see :class:`Capabilities`); the only place.
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: The method's typed options (a frozen :class:`MethodOptions` dataclass); none by default.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: The client half (:class:`ClientRound`: plain LoRA by default).
    ClientRoundType: ClassVar[type[ClientRound]] = ClientRound

    # the 0.1 flags, read-only views of ``capabilities``
    ranks_must_be_levels = _FromCapabilities()
    single_rank_level = _FromCapabilities()
    reads_base_weights = _FromCapabilities()
    reports_residual_energy = _FromCapabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a 0.1 flag set in a subclass would shadow the view and disagree with capabilities
        legacy = sorted(n for n in vars(cls) if isinstance(vars(Method).get(n), _FromCapabilities))
        if legacy:
            raise TypeError(
                f"{cls.__name__}: declare {', '.join(legacy)} in one place, e.g. "
                f"capabilities = Capabilities({legacy[0]}=True)"
            )

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
        ctx: RoundContext,
        module_shapes: Mapping[str, tuple[int, int]],
        dense: Mapping[str, Tensor] | None = None,
    ) -> GlobalState:
        """The round-0 state (Algorithm 1 line 1): ``B_g = 0`` and PEFT's default ``A_g`` at
        ``r_max`` (docs/methods.md#global-state-and-broadcast), ``dense`` the initial heads.

        Modules are initialised in sorted name order from ``ctx.generator`` (required), in
        ``ctx.dtype`` on ``ctx.device``, so the same seed gives the same state whatever order
        the model lists its modules in.
        """
        if ctx.generator is None:
            raise ValueError(f"{self.name}: init_state needs ctx.generator (the init stream)")
        factors: Factors = {}
        for name in sorted(module_shapes):
            d, n = module_shapes[name]
            A = self.initial_a(n, ctx.generator).to(device=ctx.device, dtype=ctx.dtype)
            factors[name] = (torch.zeros(d, self.r_max, dtype=ctx.dtype, device=ctx.device), A)
        return GlobalState(
            factors=factors,
            module_shapes={k: (int(d), int(n)) for k, (d, n) in module_shapes.items()},
            dense={k: v.detach().clone() for k, v in (dense or {}).items()},
        )

    def initial_a(self, n: int, generator: torch.Generator) -> Tensor:
        """The round-0 ``A_g (r_max, n)`` of one module, drawn from ``generator`` (the run's init
        stream; default PEFT's ``lora_A`` init, :func:`lora_a_init`).
        """
        return lora_a_init(self.r_max, n, generator)

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

    def client_rank(self, ctx: RoundContext, state: GlobalState, declared_rank: int) -> int:
        """The rank client ``ctx.client_id`` trains at this round, given its declared rank
        (default: that; HetLoRA's self-pruning lowers it).
        """
        return declared_rank

    # ------------------------------------------------------- server: what a client gets
    def client_message(self, ctx: RoundContext, state: GlobalState) -> ClientMessage:
        """What client ``ctx.client_id`` (rank ``ctx.rank``) is sent in round
        ``ctx.round_index`` (Algorithm 1 line 5). Default: :meth:`client_factors`, no extras.
        """
        return ClientMessage(self.client_factors(ctx, state))

    def client_factors(self, ctx: RoundContext, state: GlobalState) -> Factors:
        """Effective factors a client of rank ``r = ctx.rank`` starts from: the nested
        truncation ``B_g[:, :r]``, ``A_g[:r, :]`` (Algorithm 1 line 5).
        """
        rank = ctx.rank
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

    def level_factors(self, ctx: RoundContext, state: GlobalState) -> Factors:
        """Factors at ``r_max`` that, on the current base weights, give the model a client of
        rank ``r = ctx.rank`` holds after receiving the global state (per-level evaluation,
        docs/methods.md#rank-collapse-diagnostics).

        By default what :meth:`client_factors` sends it — ``B_g[:, :r]``, ``A_g[:r, :]`` —
        zero-padded to ``r_max`` (the padded directions add nothing to ``B A``). A method whose
        clients hold something other than what they start training from overrides it (FLoRA:
        the merged base).
        """
        rank = ctx.rank
        out: Factors = {}
        for name, (B, A) in self.client_factors(ctx, state).items():
            d, n = state.module_shapes[name]
            B_pad = B.new_zeros(d, self.r_max)  # (d, r_max): columns ≥ r stay 0
            A_pad = A.new_zeros(self.r_max, n)  # (r_max, n): rows ≥ r stay 0
            B_pad[:, :rank] = B
            A_pad[:rank, :] = A
            out[name] = (B_pad, A_pad)
        return out

    # ------------------------------------------------------------- server: aggregation
    @abstractmethod
    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The new global factors of one module, or of a batch of same-shape modules
        (Algorithm 1 lines 8–17; docs/methods.md#aggregation-rules).

        Parameters
        ----------
        ctx : RoundContext
            The round being aggregated (``ctx.round_index``: RoLoRA's phase depends on it).
        updates : ModuleUpdates
            ``(B_k (…, d, r_k), A_k (…, r_k, n), n_k)`` effective factors and sample counts of
            the accepted clients; leading dimensions (a batch of modules) are shared.
        previous : tuple[Tensor, Tensor], optional
            The previous global factors of these modules.
        """

    def module_residual(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        new: tuple[Tensor, Tensor],
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """The factored residual of one module (batch) merged into the base weights after this
        aggregation, given the new global factors ``new``; ``None`` (the default) for a method
        that merges nothing.
        """
        return None

    def finish_state(
        self,
        ctx: RoundContext,
        previous: GlobalState,
        state: GlobalState,
        accepted: Sequence[ClientUpdate],
    ) -> GlobalState:
        """The method's own server state (``state.extras``: HetLoRA's pruned ranks, ILoRA's
        control variate) after the factors are aggregated; default: ``state``.
        """
        return state

    def validate(
        self,
        state: GlobalState,
        update: ClientUpdate,
        *,
        ctx: RoundContext | None = None,
        wire_dtypes: Sequence[torch.dtype] = (),
    ) -> None:
        """Raise an :class:`InvalidUpdateError` if ``update`` cannot be aggregated.

        Accepted dtypes are float32, the state's (float32 in a run) and ``wire_dtypes`` (the
        run's model dtype); every tensor must be on the state's device; the extras must be
        those of :meth:`upload_extra_shapes` (asked with ``ctx`` for the update's client).
        """
        round_ctx = ctx if ctx is not None else self._round_context(state)
        extra_shapes = None
        if is_positive_int(update.rank) and update.rank <= self.r_max:
            client_ctx = round_ctx.for_client(update.client_id, update.rank)
            extra_shapes = self.upload_extra_shapes(client_ctx, state)
        validate_update(
            update,
            state.module_shapes,
            dense_shapes={k: tuple(v.shape) for k, v in state.dense.items()},
            allowed_ranks=self.rank_levels if self.capabilities.ranks_must_be_levels else None,
            max_rank=self.r_max,
            dtypes={torch.float32, state.dtype, *wire_dtypes},
            device=state.device,
            extra_shapes=extra_shapes,
        )

    def aggregate(
        self,
        state: GlobalState,
        updates: Sequence[ClientUpdate],
        *,
        ctx: RoundContext | None = None,
        wire_dtypes: Sequence[torch.dtype] = (),
    ) -> AggregationResult:
        """Validate every update and aggregate the accepted ones into the next global state.

        ``ctx`` is the round's context (the engines pass theirs: the round being run, which is
        later than ``state.round`` — later by more than one after a round with no update
        accepted); by default the round after ``state.round``, the state's dtype and device.
        Rejected updates are reported in the result, not raised. With none accepted the state is
        returned unchanged. Accepted updates are upcast to the state's dtype (float32) before
        anything is averaged, so a bfloat16 update never demotes the state. A method's residual
        (:meth:`module_residual`) is added to the state's ``base_delta`` and returned for the
        engine to merge into the base weights.
        """
        if ctx is None:
            ctx = self._round_context(state)
        elif ctx.round_index <= state.round:
            raise ValueError(
                f"aggregate: ctx.round_index is {ctx.round_index}, but the state already has "
                f"{state.round} aggregation(s)"
            )
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
                self.validate(state, update, ctx=ctx, wire_dtypes=wire_dtypes)
            except InvalidUpdateError as err:
                rejected[update.client_id] = err.reason
                continue
            accepted.append(_as_dtype(update, state.dtype))
        if not accepted:
            return AggregationResult(state, (), rejected)
        result = self.aggregate_factors(ctx, state, accepted)
        residual = result.residual
        weights = sample_weights([u.num_samples for u in accepted], like=torch.empty(0))
        dense = {
            name: weighted_average([u.dense[name] for u in accepted], weights)
            for name in state.dense
        }
        new_state = replace(state, factors=dict(result.factors), dense=dense, round=state.round + 1)
        if result.extras:
            new_state = replace(new_state, extras={**state.extras, **result.extras})
        if residual is not None:
            new_state = self.with_residual(new_state, residual)
        new_state = self.finish_state(ctx, state, new_state, accepted)
        return AggregationResult(
            new_state, tuple(u.client_id for u in accepted), rejected, residual=residual
        )

    # ------------------------------------------------------------- server: traffic
    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """Elements the method must send a client of rank ``ctx.rank`` for the adapted modules,
        extras included (docs/design.md#communication; the heads are counted by the engine).
        """
        return sum((d + n) * ctx.rank for d, n in state.module_shapes.values())

    def upload_bytes(self, ctx: RoundContext, update: ClientUpdate) -> int:
        """Bytes the method must receive from a client in round ``ctx.round_index`` for the
        adapted modules, extras included (docs/design.md#communication; the heads are counted
        by the engine). Default: both factors and the extras.
        """
        return tensor_bytes(update.factors) + tensor_bytes(update.extras)

    # ------------------------------------------------------------------ client half
    def client_round(
        self,
        ctx: RoundContext,
        received: ClientMessage,
        state: Mapping[str, Tensor] | None = None,
    ) -> ClientRound:
        """The client half for client ``ctx.client_id``'s round (an :attr:`ClientRoundType`),
        from what it ``received`` and its per-client ``state`` (``None`` before its first round).
        """
        return self.ClientRoundType(self, ctx, received, state)

    def upload_extra_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        """Name → shape of every extra tensor a client of rank ``ctx.rank`` must upload (none)."""
        return {}

    def client_state_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        """Name → shape of a rank-``ctx.rank`` client's per-client state (none: it keeps none).

        The Flower engine checks the state a client returns against it before keeping it.
        """
        return {}

    # --------------------------------------------------------- privacy (docs/privacy.md)
    def private_rule(self, ctx: RoundContext) -> PrivateRule | None:
        """What a client's private update ``U_k`` is in round ``ctx.round_index``
        (:class:`~raflora.methods.private.PrivateRule`): product space (``Δ_k = B_k A_k − B_0
        A_0`` per module, optionally per rank-level partition), or factor space (the zero-padded
        differences of the factors the method averages, optionally weighted per rank index);
        heads are always part of it. Sample counts are never used under privacy: every sum is
        divided by the expected number of its contributors, ``q N_j``
        (:mod:`raflora.methods.private`).

        ``None`` (the default): the method declares no private update, and a run with
        ``privacy.enabled`` is refused before round 1 (:meth:`privacy_refusal`). A new method
        declares one, e.g. ``return PrivateRule.product()`` (its :meth:`aggregate_module` then
        re-factorises the noised dense mean) or ``PrivateRule.factor("B")``.
        """
        return None

    def privacy_refusal(self) -> str | None:
        """Why this method, with its options, cannot run with ``privacy.enabled`` — one line,
        shown as the config error — or ``None`` when it can.

        Default: the missing declaration (:meth:`private_rule` returns ``None``). A method
        overrides it for rules that cannot be made private: one that releases a single client's
        factors, data-dependent ranks (HetLoRA's self-pruning), weights that depend on the
        updates, or what the noised sums cannot give (FedEx-LoRA's residual).
        """
        if self.private_rule(RoundContext(round_index=1)) is None:
            return (
                f"method {self.name!r} does not declare a private update "
                f"(Method.private_rule; docs/privacy.md)"
            )
        return None

    def private_aggregate_module(
        self,
        ctx: RoundContext,
        mean: tuple[Tensor, Tensor],
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The new global factors of a module batch from the noised mean ``(B (…, d, r),
        A (…, r, n))`` (post-processing; :func:`~raflora.methods.private.private_mean`): by
        default the method's own :meth:`aggregate_module` of that one update with ``n = 1``.
        """
        B, A = mean
        return self.aggregate_module(ctx, [(B, A, 1)], previous)

    def aggregate_factors(
        self, ctx: RoundContext, state: GlobalState, accepted: Sequence[ClientUpdate]
    ) -> FactorAggregation:
        """The round's new factors from the accepted (validated, float32) updates: by default
        :meth:`aggregate_module` (and :meth:`module_residual`) once per group of same-shape
        modules, batched. A method whose rule is not per module overrides this — FedHL (one set
        of weights for every module, and the tail it returns as ``extras``), AFLoRA (each update
        spread to its components first).
        """
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name in sorted(state.module_shapes):
            groups[state.module_shapes[name]].append(name)
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
            B, A = self.aggregate_module(ctx, batch, previous)
            res = self.module_residual(ctx, batch, (B, A), previous)
            for i, m in enumerate(names):
                out[m] = (B[i], A[i])
                if res is not None:
                    residual[m] = (res[0][i], res[1][i])
        return FactorAggregation(out, residual if residual else None)

    # ------------------------------------------------------------------ internals
    def _round_context(self, state: GlobalState) -> RoundContext:
        """The context of the round after ``state`` when the caller gave none."""
        return RoundContext(round_index=state.round + 1, dtype=state.dtype, device=state.device)

    def _check_rank(self, rank: int) -> None:
        if rank <= 0 or rank > self.r_max:
            raise ValueError(f"rank must be in 1…{self.r_max} (r_max), got {rank}")


def _as_dtype(update: ClientUpdate, dtype: torch.dtype) -> ClientUpdate:
    """``update`` with every tensor in ``dtype`` (no copy for tensors already in it)."""
    return replace(
        update,
        factors={k: (B.to(dtype), A.to(dtype)) for k, (B, A) in update.factors.items()},
        dense={k: v.to(dtype) for k, v in update.dense.items()},
        extras={k: v.to(dtype) for k, v in update.extras.items()},
    )


Aggregator = Method
"""The 0.1 name of :class:`Method` (a method was server-only then)."""
