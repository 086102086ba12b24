"""The aggregator interface shared by every method, and its name registry.

An aggregator answers two questions for a whole model (a dict of modules, SPEC §2–3):

* what a client of rank ``r`` starts local training from (:meth:`Aggregator.client_factors`);
* how the accepted client updates become the next global state (:meth:`Aggregator.aggregate`).

Everything here is pure tensor code keyed by module name — no models, I/O or transport — so the
local engine and the Flower strategy call the same functions. Per-module math lives in
:meth:`Aggregator.aggregate_module`, which works on tensors with leading batch dimensions; the
whole-model :meth:`Aggregator.aggregate` groups modules of one shape and aggregates each group in
one batched call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from raflora.methods.options import (
    MethodOptions,
    option_specs,
    parse_options,
    resolve_options,
)
from raflora.methods.validation import ClientUpdate, InvalidUpdateError, validate_update

__all__ = [
    "AggregationResult",
    "Aggregator",
    "Factors",
    "GlobalState",
    "available_methods",
    "get_aggregator",
    "lora_a_init",
    "method_options_classes",
    "options_for",
    "register",
    "resolve_method_options",
    "sample_weights",
    "unsupported_reason",
    "weighted_average",
]

Factors = dict[str, tuple[Tensor, Tensor]]
"""Module name → effective factors ``(B (d, r), A (r, n))``."""


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
        FLoRA only: ``Σ_t B_s A_s`` merged into the base weights so far (``(d, n)`` per module).
    client_ranks : dict[int, int]
        HetLoRA self-pruning only: clients whose rank was pruned → their current rank.
    """

    factors: Factors
    module_shapes: dict[str, tuple[int, int]]
    dense: dict[str, Tensor] = field(default_factory=dict)
    round: int = 0
    base_delta: dict[str, Tensor] = field(default_factory=dict)
    client_ranks: dict[int, int] = field(default_factory=dict)

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
            "client_ranks": dict(self.client_ranks),
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
            client_ranks={int(k): int(v) for k, v in data["client_ranks"].items()},
        )


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of one round's aggregation.

    ``rejected`` maps client id → the reason its update was left out. When no update was
    accepted, ``state`` is the previous state, unchanged. ``base_update`` is the factored delta to
    merge into the base weights this round (FLoRA), else ``None``.
    """

    state: GlobalState
    accepted: tuple[int, ...]
    rejected: dict[int, str]
    base_update: Factors | None = None


def _as_dtype(update: ClientUpdate, dtype: torch.dtype) -> ClientUpdate:
    """``update`` with every tensor in ``dtype`` (no copy for tensors already in it)."""
    return replace(
        update,
        factors={k: (B.to(dtype), A.to(dtype)) for k, (B, A) in update.factors.items()},
        dense={k: v.to(dtype) for k, v in update.dense.items()},
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


class Aggregator(ABC):
    """Base class: one subclass per method, registered by name with :func:`register`.

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
    #: The method's typed options (a frozen :class:`MethodOptions` dataclass); none by default.
    Options: ClassVar[type[MethodOptions]] = MethodOptions

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

    # ----------------------------------------------------------------------------- state
    def init_state(
        self,
        module_shapes: Mapping[str, tuple[int, int]],
        *,
        generator: torch.Generator,
        dense: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> GlobalState:
        """Initial global state: ``B_g = 0`` and PEFT's default ``A_g`` init at ``r_max`` (SPEC §2).

        Modules are initialised in sorted name order from ``generator``, so the same seed gives
        the same state whatever order the model lists its modules in.
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

    def client_rank(self, state: GlobalState, client_id: int, declared_rank: int) -> int:
        """The rank client ``client_id`` trains at this round (HetLoRA may have pruned it)."""
        return state.client_ranks.get(client_id, declared_rank)

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

    def download_numel(self, state: GlobalState, rank: int) -> int:
        """Elements sent down to a client of rank ``rank`` for the adapted modules (SPEC §8)."""
        return sum((d + n) * rank for d, n in state.module_shapes.values())

    @property
    def uses_local_penalty(self) -> bool:
        """Whether :meth:`local_penalty` adds a term (the engine skips it otherwise)."""
        return False

    def local_penalty(
        self, factors: Mapping[str, tuple[Tensor, Tensor]], rank: int
    ) -> Tensor | None:
        """Extra local loss term on the client's (effective) factors; ``None`` for most methods."""
        return None

    # ----------------------------------------------------------------------- aggregation
    @abstractmethod
    def aggregate_module(
        self,
        updates: Sequence[tuple[Tensor, Tensor, int]],
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Aggregate one module (or a batch of same-shape modules).

        Parameters
        ----------
        updates : Sequence[tuple[Tensor, Tensor, int]]
            ``(B_k (..., d, r_k), A_k (..., r_k, n), n_k)`` effective factors and sample counts of
            the accepted clients; leading dimensions (a batch of modules) are shared.
        previous : tuple[Tensor, Tensor], optional
            The previous global factors of these modules.

        Returns
        -------
        tuple[Tensor, Tensor]
            The new global factors (see each method).
        """

    def validate(
        self,
        state: GlobalState,
        update: ClientUpdate,
        *,
        wire_dtypes: Sequence[torch.dtype] = (),
    ) -> None:
        """Raise an :class:`InvalidUpdateError` if ``update`` cannot be aggregated.

        Accepted dtypes are float32, the state's (float32 in a run) and ``wire_dtypes`` (the
        run's model dtype); every tensor must be on the state's device.
        """
        validate_update(
            update,
            state.module_shapes,
            dense_shapes={k: tuple(v.shape) for k, v in state.dense.items()},
            allowed_ranks=self.rank_levels if self.ranks_must_be_levels else None,
            max_rank=self.r_max,
            dtypes={torch.float32, state.dtype, *wire_dtypes},
            device=state.device,
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
        :meth:`validate` for the dtypes accepted).
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
        new_factors = self._aggregate_factors(state, accepted)
        weights = sample_weights([u.num_samples for u in accepted], like=torch.empty(0))
        dense = {
            name: weighted_average([u.dense[name] for u in accepted], weights)
            for name in state.dense
        }
        new_state = replace(state, factors=new_factors, dense=dense, round=state.round + 1)
        new_state = self._finish_state(state, new_state, accepted)
        return AggregationResult(
            new_state,
            tuple(u.client_id for u in accepted),
            rejected,
            base_update=self.base_update(new_state),
        )

    def base_update(self, state: GlobalState) -> Factors | None:
        """Factored delta to merge into the base weights after this aggregation (FLoRA)."""
        return None

    def _finish_state(
        self, previous: GlobalState, state: GlobalState, accepted: Sequence[ClientUpdate]
    ) -> GlobalState:
        """Hook for method-specific state (FLoRA's merged delta, HetLoRA's pruned ranks)."""
        return state

    def _aggregate_factors(self, state: GlobalState, accepted: Sequence[ClientUpdate]) -> Factors:
        """Run :meth:`aggregate_module` once per group of same-shape modules (batched)."""
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name in sorted(state.module_shapes):
            groups[state.module_shapes[name]].append(name)
        out: Factors = {}
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
            B, A = self.aggregate_module(batch, previous)
            for i, m in enumerate(names):
                out[m] = (B[i], A[i])
        return out

    def _check_rank(self, rank: int) -> None:
        if rank <= 0 or rank > self.r_max:
            raise ValueError(f"rank must be in 1…{self.r_max} (r_max), got {rank}")


_A = TypeVar("_A", bound=type[Aggregator])
_REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: _A) -> _A:
    """Class decorator adding an aggregator to the name registry under ``cls.name``.

    ``cls.Options`` must be a frozen :class:`MethodOptions` dataclass, and no option may share a
    name with a method (in ``method_options`` a method's name holds that method's options).
    """
    if cls.name in _REGISTRY:
        raise ValueError(f"aggregator {cls.name!r} is already registered")
    opts = cls.Options
    params = vars(opts).get("__dataclass_params__")
    if not issubclass(opts, MethodOptions) or params is None or not params.frozen:
        raise TypeError(f"{cls.name}.Options must be a frozen dataclass deriving MethodOptions")
    names = {s.name for s in option_specs(opts)}
    clash = sorted(names & (set(_REGISTRY) | {cls.name}))
    clash += [
        m for m, c in _REGISTRY.items() if cls.name in (s.name for s in option_specs(c.Options))
    ]
    if clash:
        raise ValueError(f"{cls.name}: option and method names must differ, both use {clash}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def _lookup(method: str) -> type[Aggregator]:
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; available: {', '.join(available_methods())}"
        ) from None


def unsupported_reason(method: str, rank_levels: Sequence[int]) -> str | None:
    """Why ``method`` cannot run with these rank levels, or ``None`` when it can.

    Raises
    ------
    ValueError
        ``method`` is not registered.
    """
    if _lookup(method).single_rank_level and len(rank_levels) > 1:
        return "needs a single rank level (every client at the same rank)"
    return None


def method_options_classes() -> dict[str, type[MethodOptions]]:
    """Every registered method → its options class, in name order."""
    return {name: _REGISTRY[name].Options for name in available_methods()}


def resolve_method_options(
    method_options: Mapping[str, Any], methods_in_run: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The options each method of a run or comparison gets from ``method_options``.

    A key that is a method's name holds that method's options; any other key applies to every
    method of the run that declares it, and is an error when none does (see
    :func:`~raflora.methods.options.resolve_options`).

    Raises
    ------
    OptionsError
        With every problem (an unknown method, key or option, a wrong type or value).
    """
    for method in methods_in_run:
        _lookup(method)
    return resolve_options(method_options, method_options_classes(), methods_in_run)


def options_for(
    method: str,
    method_options: Mapping[str, Any],
    *,
    methods_in_run: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The options ``method`` gets from a run's ``method_options``, as keyword arguments.

    Parameters
    ----------
    method : str
        The method to build.
    method_options : Mapping[str, Any]
        The run's ``method_options`` (plain keys and/or keys named after methods).
    methods_in_run : Sequence[str], optional
        Every method of the run or comparison (default: ``method`` alone); a plain key must be
        declared by at least one of them.

    Returns
    -------
    dict[str, Any]
        The options set for ``method`` (checked and coerced; defaults left out), ready for
        :func:`get_aggregator`.

    Raises
    ------
    OptionsError
        With every problem in ``method_options``.
    """
    run = [method] if methods_in_run is None else list(methods_in_run)
    if method not in run:
        raise ValueError(f"method {method!r} is not among the methods in the run {run}")
    return resolve_method_options(method_options, run)[method]


def get_aggregator(method: str, rank_levels: Sequence[int], **options: Any) -> Aggregator:
    """Build the aggregator registered as ``method`` with its options as keyword arguments.

    Unknown method names list the known ones; options are checked by the method's
    :attr:`Aggregator.Options` (an :class:`OptionsError`, a ``ValueError``, lists every
    problem).
    """
    cls = _lookup(method)
    factory: Callable[..., Aggregator] = cls
    return factory(rank_levels, parse_options(cls.Options, options, owner=method))
