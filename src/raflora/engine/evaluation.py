"""Evaluation of the global model (and, with ``eval.per_level``, of every rank level's model).

The model to evaluate is put on the base model's ``r_max`` adapter (:func:`load_global_model`)
and the task's metrics are read off it; nothing draws from a random generator, so evaluating
never changes the rest of a run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from raflora.engine.federation import Federation
from raflora.methods import GlobalState
from raflora.methods.base import Factors

__all__ = ["evaluate_global", "evaluate_levels", "evaluate_round", "load_global_model"]


def load_global_model(fed: Federation, state: GlobalState) -> None:
    """Put the global model on the base model's ``r_max`` adapter and activate it."""
    _load_model(fed, fed.aggregator.model_factors(state), state.dense)


def _load_model(fed: Federation, factors: Factors, dense: Mapping[str, Tensor]) -> None:
    """Put ``factors`` (at ``r_max``) and the heads on the ``r_max`` adapter and activate it."""
    r_max = fed.aggregator.r_max
    fed.bank.activate(r_max)
    fed.bank.set_factors(r_max, factors)
    if dense:
        fed.bank.set_dense(r_max, dense)


def _evaluate_loaded(fed: Federation) -> dict[str, float]:
    """The task's metrics of the model the bank holds now (deterministic, no RNG drawn)."""
    model = fed.bank.model
    model.eval()
    with torch.no_grad():
        metrics: dict[str, float] = fed.task.evaluate(model, fed.config.eval.batch_size, fed.device)
    return metrics


def evaluate_global(fed: Federation, state: GlobalState) -> dict[str, float]:
    """The task's metrics (``accuracy``, ``eval_loss`` …) of the global model."""
    load_global_model(fed, state)
    return _evaluate_loaded(fed)


def _same_factors(a: Factors, b: Factors) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a
    )


def evaluate_levels(
    fed: Federation, state: GlobalState, full: Mapping[str, float] | None = None
) -> dict[str, float]:
    """The task's metrics of the model a client of each rank level holds (``eval.per_level``).

    Level ``r`` gets the method's :meth:`~raflora.methods.Method.level_factors`
    (the nested truncation of the global factors; FLoRA: the merged base, so every level
    equals the global model) with the global heads; its metrics are keyed ``"{name}@{r}"``
    (``accuracy@8``, ``eval_loss@8``). The global model is back on the ``r_max`` adapter
    afterwards, and nothing draws from a random generator, so the run continues exactly as
    without per-level evaluation.

    Parameters
    ----------
    fed : Federation
        The federation (its ``r_max`` adapter is used for every level).
    state : GlobalState
        The global state to evaluate.
    full : Mapping[str, float], optional
        The global model's metrics when already computed: a level whose factors are the global
        model's (the top level; every level of FLoRA) reuses them instead of evaluating again.
    """
    aggregator = fed.aggregator
    global_factors = aggregator.model_factors(state)
    ctx = fed.context(state.round)  # the round just aggregated
    out: dict[str, float] = {}
    for rank in aggregator.rank_levels:
        factors = aggregator.level_factors(ctx.at_rank(rank), state)
        if full is not None and _same_factors(factors, global_factors):
            metrics = dict(full)
        else:
            _load_model(fed, factors, state.dense)
            metrics = _evaluate_loaded(fed)
        out.update({f"{name}@{rank}": value for name, value in metrics.items()})
    load_global_model(fed, state)  # what an evaluation leaves on the adapter, as without levels
    return out


def evaluate_round(fed: Federation, state: GlobalState) -> dict[str, float]:
    """The global model's metrics, then each rank level's when ``eval.per_level`` is on."""
    metrics = evaluate_global(fed, state)
    if fed.config.eval.per_level:
        metrics.update(evaluate_levels(fed, state, full=metrics))
    return metrics
