"""FedEx-LoRA (docs/methods.md#fedex): factor averaging with carry, plus the exact residual merged
into W."""

from __future__ import annotations

from pathlib import Path

import torch
from hypothesis import given
from torch import Tensor

import raflora
from conftest import config_with
from method_cases import (
    SYNTHETIC,
    Case,
    Update,
    assert_close,
    cases,
    engine_rounds,
    exact_delta,
    p_k,
    pad_cols,
    pad_rows,
)
from raflora.adapters import adapter_name, base_weights
from raflora.diagnostics import energy_report
from raflora.engine import run_local
from raflora.methods.context import RoundContext


def ref_fedex(
    updates: list[Update], previous: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-padded averages, indices beyond every client's rank carried; dense residual."""
    r_max, p = previous[0].shape[1], p_k(updates)
    B_g = sum(w * pad_cols(B, r_max) for w, (B, _, _) in zip(p, updates, strict=True))
    A_g = sum(w * pad_rows(A, r_max) for w, (_, A, _) in zip(p, updates, strict=True))
    top = max(B.shape[1] for B, _, _ in updates)
    B_g[:, top:] = previous[0][:, top:]  # type: ignore[index]
    A_g[top:] = previous[1][top:]  # type: ignore[index]
    return B_g, A_g, exact_delta(updates) - B_g @ A_g  # type: ignore[operator]


@given(cases())
def test_fedex_matches_the_dense_reference_and_is_exact(case: Case) -> None:
    out = raflora.aggregate_round(
        "fedex", case.updates, rank_levels=case.levels, previous=case.previous
    )
    B_ref, A_ref, res_ref = ref_fedex(case.updates, case.previous)
    assert_close(out.B, B_ref)
    assert_close(out.A, A_ref)
    assert out.residual is not None
    B_res, A_res = out.residual
    assert B_res.shape[1] == sum(B.shape[1] for B, _, _ in case.updates) + case.r_max
    assert_close(B_res @ A_res, res_ref)
    # the global model is exactly W + Σ p_k B_k A_k
    assert_close(out.B @ out.A + B_res @ A_res, exact_delta(case.updates))


def test_fedex_global_model_in_the_engine_is_w_plus_the_exact_average() -> None:
    steps = engine_rounds("fedex", 3)
    fed = steps[0].fed
    name = adapter_name(fed.aggregator.r_max)
    W0 = {k: v.clone() for k, v in base_weights(fed.bank.model, name).items()}  # after 3 merges
    total = {k: torch.zeros_like(v) for k, v in W0.items()}
    for step in steps:
        p = p_k([(None, None, r.update.num_samples) for r in step.results])  # type: ignore[misc]
        for k in total:
            exact = sum(
                w * (r.update.factors[k][0] @ r.update.factors[k][1])
                for w, r in zip(p, step.results, strict=True)
            )
            B_prev, A_prev = step.before.factors[k]
            total[k] += exact - B_prev @ A_prev  # the round's change of the global model
    state = steps[-1].outcome.state
    for k, delta in state.base_delta.items():
        B_g, A_g = state.factors[k]
        # base_delta + B_g A_g = Σ_t (Σ p_k B_k A_k − B_g^{t−1} A_g^{t−1}) + B_g^0 A_g^0 (= 0)
        torch.testing.assert_close(delta + B_g @ A_g, total[k], rtol=1e-4, atol=1e-6)
    # the base weights really moved by the merged residuals
    fresh = raflora.engine.build_federation(fed.config)
    W_start = base_weights(fresh.bank.model, name)
    for k, W in W0.items():
        torch.testing.assert_close(W - W_start[k], state.base_delta[k], rtol=1e-4, atol=1e-6)


def test_fedex_downloads_factors_plus_last_rounds_residual() -> None:
    steps = engine_rounds("fedex", 2)
    first, second = steps
    shapes = second.before.module_shapes.values()
    residual = sum(r.update.rank for r in first.results) + first.fed.aggregator.r_max
    for r in (2, 8):
        ctx = RoundContext(rank=r)
        assert first.fed.aggregator.download_numel(ctx, first.before) == sum(
            (d + n) * r for d, n in shapes
        )
        assert first.fed.aggregator.download_numel(ctx, second.before) == sum(
            (d + n) * (r + residual) for d, n in shapes
        )


def test_rows_report_the_energy_of_the_merged_residual_too(tmp_path: Path) -> None:
    fedex = run_local(config_with(SYNTHETIC, method="fedex", **{"fl.rounds": 2}), tmp_path / "x")
    flora = run_local(config_with(SYNTHETIC, method="flora", **{"fl.rounds": 2}), tmp_path / "y")
    for row in fedex.metrics:
        assert 0.0 <= row["residual_higher_rank_energy"] <= 1.0
    assert all("residual_higher_rank_energy" not in row for row in flora.metrics)  # its stack
    step = engine_rounds("fedex", 1)[0]
    assert step.outcome.residual is not None
    expected = energy_report(step.outcome.residual, [2, 4, 8]).higher_rank_energy
    got = run_local(config_with(SYNTHETIC, method="fedex", **{"fl.rounds": 1}), tmp_path / "z")
    assert got.metrics[0]["residual_higher_rank_energy"] == expected
