"""The server half of a round (paper Algorithm 1), shared by the local and Flower engines.

:func:`plan_round` samples ``M`` clients with the run's own stream and counts what is sent to
them; :func:`complete_round` validates and aggregates what they sent back, merges into the base
when the method says so (FLoRA), records the energy diagnostics
(docs/methods.md#rank-collapse-diagnostics), traffic (docs/design.md#communication) and
timings, and evaluates every ``eval.every`` rounds and at the last one. :func:`run_round` is a
whole round in this process: the sampled clients are trained one after another
(:func:`~raflora.engine.client_round.train_client`) between the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from raflora.diagnostics import EnergyReport, energy_report
from raflora.engine.client_round import ClientResult, train_client
from raflora.engine.concurrent import train_concurrent
from raflora.engine.evaluation import evaluate_round
from raflora.engine.federation import Federation, learning_rate
from raflora.engine.metering import device_clock, tensor_bytes
from raflora.engine.private_round import (
    aggregate_private,
    check_budget,
    privatize_results,
    round_clients,
)
from raflora.methods import GlobalState
from raflora.privacy.mechanism import Contribution
from raflora.report.metrics import metrics_row

__all__ = [
    "CompletedRound",
    "RoundPlan",
    "complete_round",
    "energy_metrics",
    "plan_round",
    "run_round",
    "train_clients",
]


def energy_metrics(state: GlobalState, levels: list[int]) -> tuple[dict[str, Any], EnergyReport]:
    """The round's rank-collapse diagnostics (docs/methods.md#rank-collapse-diagnostics), from
    one SVD per module.

    Returns the metrics row's ``higher_rank_energy`` (1 − ρ_{r_1}, mean over modules) and
    ``energy_per_level`` (ρ at every rank level), and the report they come from (per-module
    spectra: ``energy.jsonl`` and the TensorBoard spectrum are read off it, no second SVD).
    """
    report = energy_report(state.factors, levels)
    if not state.factors or all(B.shape[-1] == 0 for B, _ in state.factors.values()):
        return {"higher_rank_energy": None, "energy_per_level": None}, report
    means = {
        "higher_rank_energy": report.higher_rank_energy,
        "energy_per_level": {str(r): v for r, v in report.cumulative.items()},
    }
    return means, report


class CompletedRound(NamedTuple):
    """A finished round: the new global state, its metrics row and its energy report."""

    state: GlobalState
    row: dict[str, Any]
    energy: EnergyReport


def _weighted_loss(results: Sequence[ClientResult], accepted: tuple[int, ...]) -> float | None:
    chosen = [r for r in results if r.update.client_id in accepted and math.isfinite(r.train_loss)]
    total = sum(r.update.num_samples for r in chosen)
    if not chosen or total == 0:
        return None
    return sum(r.train_loss * r.update.num_samples for r in chosen) / total


@dataclass(frozen=True)
class RoundPlan:
    """Who trains in a round and what it costs to send them the global state.

    Attributes
    ----------
    round_index : int
        1-based round.
    lr : float
        The round's learning rate.
    clients : list[int]
        Sampled client ids, ascending.
    ranks : list[int]
        The rank each trains at.
    download_bytes : int
        Bytes sent down to all of them (factors and heads, docs/design.md#communication).
    """

    round_index: int
    lr: float
    clients: list[int]
    ranks: list[int]
    download_bytes: int


def plan_round(fed: Federation, state: GlobalState, round_index: int) -> RoundPlan:
    """Sample round ``round_index``'s clients (the run's own stream) and count the download."""
    cfg = fed.config
    clients = round_clients(fed, round_index)  # the run's sample (Poisson under privacy)
    ranks = [fed.rank_of(state, k, round_index) for k in clients]
    element = next(iter(state.factors.values()))[0].element_size()
    head = tensor_bytes(state.dense)
    ctx = fed.context(round_index)
    download = sum(
        fed.aggregator.download_numel(ctx.for_client(k, r), state) * element + head
        for k, r in zip(clients, ranks, strict=True)
    )
    return RoundPlan(round_index, learning_rate(cfg, round_index), clients, ranks, download)


def complete_round(
    fed: Federation,
    state: GlobalState,
    plan: RoundPlan,
    results: Sequence[ClientResult],
    *,
    train_seconds: float,
    failures: Mapping[int, str] | None = None,
    private: Mapping[int, Contribution | str] | None = None,
) -> CompletedRound:
    """Validate and aggregate the round's client results, evaluate, and build its metrics row.

    Parameters
    ----------
    fed : Federation
        The federation (its base model receives FLoRA's merge and the evaluation).
    state : GlobalState
        The state the round started from.
    plan : RoundPlan
        The round's plan.
    results : Sequence[ClientResult]
        What the clients sent back (invalid updates are rejected here and counted).
    train_seconds : float
        Wall time of the client phase.
    failures : Mapping[int, str], optional
        Clients that sent nothing usable (raised, timed out) → reason; counted as rejected.
    private : Mapping[int, Contribution | str], optional
        A private run's client contributions (:func:`~raflora.engine.private_round.
        privatize_results`): the round releases the method's rule applied to their noised
        mean instead of aggregating ``results`` (docs/privacy.md).
    """
    cfg = fed.config
    t1 = device_clock(fed.device)
    # Client order never changes the result: aggregate in client-id order whatever order the
    # clients trained or replied in (the local engine groups them by rank, Flower by arrival).
    results = sorted(results, key=lambda r: r.update.client_id)
    ctx = fed.context(plan.round_index)
    privacy_row: dict[str, Any] = {}
    if fed.privacy is not None:
        if private is None:
            private = privatize_results(fed, state, plan.round_index, results) or {}
        outcome, privacy_row = aggregate_private(fed, state, plan.round_index, private, ctx)
    else:
        outcome = fed.aggregator.aggregate(
            state, [r.update for r in results], ctx=ctx, wire_dtypes=fed.wire_dtypes
        )
    new_state = outcome.state
    if outcome.residual is not None:
        fed.bank.merge_into_base(outcome.residual, new_state.base_delta)
    for result in results:  # the per-client state of the accepted clients only
        if result.state is not None and result.update.client_id in outcome.accepted:
            fed.client_states.put(result.update.client_id, plan.round_index, result.state)
    energy, report = energy_metrics(new_state, list(cfg.fl.rank_levels))
    if outcome.residual is not None and fed.aggregator.capabilities.reports_residual_energy:
        # a method merging a residual besides its global factors (FedEx-LoRA) also reports the
        # spectrum of the round's merged residual (docs/methods.md#fedex)
        residual = energy_report(outcome.residual, list(cfg.fl.rank_levels))
        energy["residual_higher_rank_energy"] = residual.higher_rank_energy
    t2 = device_clock(fed.device)
    row: dict[str, Any] = {
        "round": plan.round_index,
        "lr": plan.lr,
        "train_loss": _weighted_loss(results, outcome.accepted),
    }
    if plan.round_index % cfg.eval.every == 0 or plan.round_index == cfg.fl.rounds:
        row.update(evaluate_round(fed, new_state))
    t3 = device_clock(fed.device)
    rejected = {**outcome.rejected, **(failures or {})}
    row.update(energy)
    row.update(
        {
            "upload_bytes": sum(
                fed.aggregator.upload_bytes(
                    ctx.for_client(r.update.client_id, r.update.rank), r.update
                )
                + tensor_bytes(r.update.dense)
                for r in results
            ),
            "download_bytes": plan.download_bytes,
            "clients": plan.clients,
            "client_ranks": plan.ranks,
            "accepted": len(outcome.accepted),
            "rejected": len(rejected),
            "rejected_reasons": {str(k): v for k, v in sorted(rejected.items())},
            "time": {
                "train_seconds": train_seconds,
                "client_compute_seconds": sum(r.compute_seconds for r in results),
                "aggregate_seconds": t2 - t1,
                "eval_seconds": t3 - t2,
                "round_seconds": train_seconds + (t3 - t1),
            },
        }
    )
    row.update(privacy_row)  # epsilon …: private runs only (docs/privacy.md)
    # the one row schema of both engines: Flower fills transport_bytes, locally it stays null
    return CompletedRound(new_state, metrics_row(row), report)


def run_round(fed: Federation, state: GlobalState, round_index: int) -> CompletedRound:
    """Run round ``round_index`` (1-based) from ``state``: the new state and its metrics."""
    check_budget(fed, round_index)  # a private run stops before exceeding its epsilon
    t0 = device_clock(fed.device)
    plan = plan_round(fed, state, round_index)
    results = train_clients(fed, state, plan)
    train_seconds = device_clock(fed.device) - t0
    private = privatize_results(fed, state, round_index, results)  # None without privacy
    return complete_round(fed, state, plan, results, train_seconds=train_seconds, private=private)


def train_clients(
    fed: Federation, state: GlobalState, plan: RoundPlan, *, capacity: int | None = None
) -> list[ClientResult]:
    """The local engine's client phase of ``plan``: the sampled clients trained one after
    another, or ``capacity`` (default ``train.concurrent_clients``) at a time in one model
    (docs/concurrency.md); their results.
    """
    k = fed.config.train.concurrent_clients if capacity is None else capacity
    # Trained grouped by rank so the shared model switches adapters as rarely as possible.
    order = sorted(zip(plan.ranks, plan.clients, strict=True))
    if k > 1:
        return train_concurrent(fed, state, order, plan.round_index, plan.lr, capacity=k)
    return [
        train_client(
            fed,
            client_id,
            rank,
            fed.client_message(state, client_id, plan.round_index),
            state.dense,
            plan.round_index,
            plan.lr,
            state=fed.client_states.get(client_id, device=fed.device),
        )
        for rank, client_id in order
    ]
