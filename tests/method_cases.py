"""Shared inputs of the per-method tests (``test_method_*.py``): random heterogeneous-rank
rounds, the plain dense helpers the references are written with, and one real engine round.

The references themselves live in each method's test file, written from its rule in
docs/methods.md (the heading named after the method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from torch import Tensor

from conftest import config_with, randn
from raflora.engine import build_federation
from raflora.engine.client_round import ClientResult, train_client
from raflora.engine.federation import Federation
from raflora.engine.server_round import plan_round
from raflora.methods import AggregationResult, GlobalState

Update = tuple[Tensor, Tensor, int]


@dataclass(frozen=True)
class Case:
    """One module's round: rank levels, client updates and the previous global factors."""

    levels: tuple[int, ...]
    updates: list[Update]
    previous: tuple[Tensor, Tensor]

    @property
    def r_max(self) -> int:
        return self.levels[-1]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Mixed ranks; the clients of a round often miss the top rank level (uncovered indices)."""
    levels = tuple(sorted(draw(st.sets(st.integers(1, 8), min_size=1, max_size=4))))
    d, n, clients = draw(st.integers(1, 10)), draw(st.integers(1, 10)), draw(st.integers(1, 5))
    ranks = draw(st.lists(st.sampled_from(levels), min_size=clients, max_size=clients))
    samples = draw(st.lists(st.integers(1, 1000), min_size=clients, max_size=clients))
    seed = draw(st.integers(0, 2**30))
    updates = [
        (randn(seed + 2 * i, d, r), randn(seed + 2 * i + 1, r, n), s)
        for i, (r, s) in enumerate(zip(ranks, samples, strict=True))
    ]
    previous = (randn(seed - 1, d, levels[-1]), randn(seed - 2, levels[-1], n))
    return Case(levels, updates, previous)


def p_k(updates: list[Update]) -> list[float]:
    """``p_k = n_k / Σ n_j``."""
    total = sum(s for _, _, s in updates)
    return [s / total for _, _, s in updates]


def pad_cols(B: Tensor, r: int) -> Tensor:
    """``B (d, r_k)`` zero-padded to ``r`` columns."""
    out = B.new_zeros(B.shape[0], r)
    out[:, : B.shape[1]] = B
    return out


def pad_rows(A: Tensor, r: int) -> Tensor:
    """``A (r_k, n)`` zero-padded to ``r`` rows."""
    out = A.new_zeros(r, A.shape[1])
    out[: A.shape[0]] = A
    return out


def exact_delta(updates: list[Update]) -> Tensor:
    """``Σ_k p_k B_k A_k``, formed densely."""
    return sum(w * (B @ A) for w, (B, A, _) in zip(p_k(updates), updates, strict=True))


SYNTHETIC: dict[str, Any] = {
    "seed": 5,
    "task": {"name": "synthetic", "options": {"num_train": 300, "num_eval": 100}},
    "fl": {"num_clients": 6, "clients_per_round": 3, "rounds": 4, "rank_levels": [2, 4, 8]},
    "data": {"partition": "iid"},
    "train": {"lr": 1e-2, "batch_size": 32},
    "output": {"plots": False},
}


@dataclass
class EngineRound:
    """One real round on the synthetic task, driven step by step (what the engines do)."""

    fed: Federation
    before: GlobalState
    received: dict[int, tuple[Tensor, Tensor]]
    results: list[ClientResult]
    outcome: AggregationResult


def engine_rounds(method: str, rounds: int, **over: Any) -> list[EngineRound]:
    """``rounds`` rounds of ``method``: what each client received, trained and what came of it."""
    fed = build_federation(config_with(SYNTHETIC, method=method, **over))
    state = fed.initial_state()
    out = []
    for t in range(1, rounds + 1):
        plan = plan_round(fed, state, t)
        received, results = {}, []
        for client_id, rank in zip(plan.clients, plan.ranks, strict=True):
            message = fed.client_message(state, client_id, t)
            name = sorted(message.factors)[0]
            received[client_id] = tuple(x.clone() for x in message.factors[name])
            results.append(train_client(fed, client_id, rank, message, state.dense, t, plan.lr))
        outcome = fed.aggregator.aggregate(state, [r.update for r in results])
        if outcome.residual is not None:
            fed.bank.merge_into_base(outcome.residual, outcome.state.base_delta)
        out.append(EngineRound(fed, state, received, results, outcome))  # type: ignore[arg-type]
        state = outcome.state
    return out


def first_module(factors: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The factors of the first module in name order."""
    return factors[sorted(factors)[0]]


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    """Equal up to ``tol`` relative to the larger norm (float64 references)."""
    scale = max(float(a.norm()), float(b.norm()), 1.0)
    assert float((a - b).norm()) <= tol * scale, float((a - b).norm()) / scale
