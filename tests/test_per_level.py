"""Per-level evaluation (``eval.per_level``): the model a client of each rank level holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import config_with, randn
from raflora.config import EvalConfig, RunConfig, load_config, validate
from raflora.engine import build_federation, load_checkpoint, run_local
from raflora.engine.evaluation import evaluate_global, evaluate_levels
from raflora.engine.server_round import run_round
from raflora.methods import GlobalState, get_aggregator
from raflora.methods.context import RoundContext
from raflora.report import progress_postfix, summarize

LEVELS = [2, 4, 8]
SYNTHETIC: dict[str, Any] = {
    "method": "raflora",
    "seed": 3,
    "threads": 1,
    "task": {"name": "synthetic", "options": {"num_train": 400, "num_eval": 200}},
    "fl": {"num_clients": 6, "clients_per_round": 3, "rounds": 3, "rank_levels": LEVELS},
    "data": {"partition": "dir-a1.0"},
    "train": {"lr": 2e-2, "batch_size": 32},
    "eval": {"every": 2, "per_level": True},
    "output": {"plots": False},
}


def per_level_config(**over: Any) -> Any:
    return config_with(SYNTHETIC, **over)


def random_state(method: str) -> GlobalState:
    shapes = {"a": (5, 7), "b": (6, 3)}
    agg = get_aggregator(method, LEVELS)
    state = agg.init_state(RoundContext(generator=torch.Generator().manual_seed(0)), shapes)
    state.factors = {
        k: (randn(i, d, 8, dtype=torch.float32), randn(10 + i, 8, n, dtype=torch.float32))
        for i, (k, (d, n)) in enumerate(shapes.items())
    }
    return state


@pytest.mark.parametrize("method", ["raflora", "flexlora", "hetlora"])
def test_level_factors_are_the_nested_truncation_padded_with_zeros(method: str) -> None:
    agg = get_aggregator(method, LEVELS)
    state = random_state(method)
    for rank in LEVELS:
        got = agg.level_factors(RoundContext(rank=rank), state)
        assert got.keys() == state.factors.keys()
        for name, (B, A) in state.factors.items():
            B_r, A_r = got[name]
            assert B_r.shape == B.shape and A_r.shape == A.shape  # (d, r_max), (r_max, n)
            assert torch.equal(B_r[:, :rank], B[:, :rank]) and torch.equal(A_r[:rank], A[:rank])
            assert not B_r[:, rank:].any() and not A_r[rank:].any()
    top = agg.level_factors(RoundContext(rank=LEVELS[-1]), state)
    assert all(
        torch.equal(top[k][0], B) and torch.equal(top[k][1], A)
        for k, (B, A) in state.factors.items()
    )


def test_flora_clients_of_every_rank_hold_the_merged_model() -> None:
    agg = get_aggregator("flora", LEVELS)
    state = agg.init_state(RoundContext(generator=torch.Generator().manual_seed(0)), {"a": (5, 7)})
    model = agg.model_factors(state)
    for rank in LEVELS:
        got = agg.level_factors(RoundContext(rank=rank), state)
        assert torch.equal(got["a"][0], model["a"][0]) and torch.equal(got["a"][1], model["a"][1])
    with pytest.raises(ValueError, match="rank must be in"):
        agg.level_factors(RoundContext(rank=9), state)


def test_top_level_equals_the_global_model_and_a_lower_level_differs() -> None:
    fed = build_federation(per_level_config())
    state = fed.initial_state()
    for round_index in (1, 2, 3):
        state = run_round(fed, state, round_index).state
    full = evaluate_global(fed, state)
    levels = evaluate_levels(fed, state)  # every level evaluated (no reuse of ``full``)
    assert levels["accuracy@8"] == full["accuracy"]
    assert levels["eval_loss@8"] == full["eval_loss"]
    assert levels["eval_loss@2"] != full["eval_loss"]
    # the global model is back on the adapter: evaluating it again gives the same numbers
    from raflora.engine.evaluation import _evaluate_loaded

    assert _evaluate_loaded(fed) == full


def test_run_records_every_level_on_evaluated_rounds_and_in_the_summary(tmp_path: Path) -> None:
    result = run_local(per_level_config(), tmp_path, progress=False)
    rows = result.metrics
    assert [("accuracy" in r, "accuracy@2" in r) for r in rows] == [
        (False, False),
        (True, True),
        (True, True),
    ]
    for row in rows[1:]:
        assert row["accuracy@8"] == row["accuracy"] and row["eval_loss@8"] == row["eval_loss"]
        assert {f"{m}@{r}" for m in ("accuracy", "eval_loss") for r in LEVELS} <= row.keys()
    assert rows[-1]["eval_loss@2"] != rows[-1]["eval_loss"]  # raFLoRA after 3 rounds
    summary = result.summary
    for r in LEVELS:
        assert summary[f"final_accuracy@{r}"] == rows[-1][f"accuracy@{r}"]
        assert summary[f"best_accuracy@{r}"] == max(row[f"accuracy@{r}"] for row in rows[1:])
    assert summary["final_accuracy@8"] == summary["final_accuracy"]


def test_flora_per_level_equals_the_full_model(tmp_path: Path) -> None:
    result = run_local(
        per_level_config(method="flora", **{"fl.rounds": 2}), tmp_path, progress=False
    )
    row = result.metrics[-1]
    for r in LEVELS:
        assert row[f"accuracy@{r}"] == row["accuracy"]
        assert row[f"eval_loss@{r}"] == row["eval_loss"]


@pytest.mark.parametrize("method", ["raflora", "flora"])
def test_per_level_evaluation_changes_nothing_else(method: str, tmp_path: Path) -> None:
    """Evaluating the levels draws no random number and leaves the global model loaded."""
    on = run_local(per_level_config(method=method), tmp_path / "on", progress=False)
    off_config = per_level_config(method=method, **{"eval.per_level": False})
    off = run_local(off_config, tmp_path / "off", progress=False)

    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "time" and "@" not in k} for r in rows]

    assert strip(on.metrics) == strip(off.metrics)
    assert not any("@" in k for row in off.metrics for k in row)
    assert not any("@" in k for k in off.summary)
    a, b = load_checkpoint(tmp_path / "on"), load_checkpoint(tmp_path / "off")
    for name, (B, A) in a.state.factors.items():
        assert torch.equal(B, b.state.factors[name][0]) and torch.equal(A, b.state.factors[name][1])
    for name, weight in a.base_weights.items():
        assert torch.equal(weight, b.base_weights[name])


def test_summary_and_progress_of_per_level_rows() -> None:
    rows = [
        {"round": 1, "train_loss": 1.0},
        {"round": 2, "accuracy": 0.5, "accuracy@4": 0.3, "accuracy@16": 0.5},
        {"round": 3, "accuracy": 0.6, "accuracy@4": 0.2, "accuracy@16": 0.6},
    ]
    summary = summarize(rows, method="raflora", wall_seconds=1.0)
    assert [k for k in summary if "@" in k] == [
        "final_accuracy@4",
        "best_accuracy@4",
        "final_accuracy@16",
        "best_accuracy@16",
    ]
    assert (summary["final_accuracy@4"], summary["best_accuracy@4"]) == (0.2, 0.3)
    assert (summary["final_accuracy@16"], summary["best_accuracy@16"]) == (0.6, 0.6)
    assert progress_postfix(rows[2]) == {"acc": "60.0%", "acc@4": "20.0%"}
    assert "acc@4" not in progress_postfix(rows[0])


def test_per_level_is_off_by_default_and_a_bool() -> None:
    assert load_config(None, []).eval.per_level is False
    bad = RunConfig(eval=EvalConfig(per_level=1))  # type: ignore[arg-type]
    assert "eval.per_level: expected bool, got int 1" in validate(bad)
