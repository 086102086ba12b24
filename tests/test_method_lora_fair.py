"""LoRA-FAIR (docs/methods.md#lora-fair): the factored objective equals the dense one; the
refinement never lowers the cosine to the exact average; zero products skip it; the engine round."""

from __future__ import annotations

import torch
from hypothesis import given

import raflora
from method_cases import (
    Case,
    assert_close,
    cases,
    engine_rounds,
    exact_delta,
    p_k,
    pad_cols,
    pad_rows,
)
from raflora.methods.lora_fair import _terms, fair_objective, refine_b


def dense_objective(
    dW: torch.Tensor, X: torch.Tensor, A_bar: torch.Tensor, delta: torch.Tensor, lam: float
) -> torch.Tensor:
    Y = X @ A_bar
    cos = (dW * Y).sum() / (dW.norm() * Y.norm())
    return 1 - cos + lam * (delta**2).sum()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def averages(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p = p_k(case.updates)
    B_bar = sum(w * pad_cols(B, case.r_max) for w, (B, _, _) in zip(p, case.updates, strict=True))
    A_bar = sum(w * pad_rows(A, case.r_max) for w, (_, A, _) in zip(p, case.updates, strict=True))
    top = max(B.shape[1] for B, _, _ in case.updates)
    B_bar[:, top:] = case.previous[0][:, top:]  # type: ignore[index]
    A_bar[top:] = case.previous[1][top:]  # type: ignore[index]
    B_cat = torch.cat([B for B, _, _ in case.updates], dim=1)
    A_cat = torch.cat([w * A for w, (_, A, _) in zip(p, case.updates, strict=True)], dim=0)
    return B_bar, A_bar, B_cat, A_cat  # type: ignore[return-value]


@given(cases())
def test_the_factored_objective_equals_the_dense_one(case: Case) -> None:
    B_bar, A_bar, B_cat, A_cat = averages(case)
    delta = 0.1 * torch.randn(
        B_bar.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    P, S, target = _terms(B_cat, A_cat, A_bar)
    dW = exact_delta(case.updates)
    X = B_bar + delta
    if float(dW.norm()) == 0 or float((X @ A_bar).norm()) == 0:
        return
    got = fair_objective(X, delta, P, S, target, 0.7)
    assert_close(got, dense_objective(dW, X, A_bar, delta, 0.7), 1e-9)


@given(cases())
def test_the_refined_product_is_at_least_as_close_in_angle_as_the_plain_average(case: Case) -> None:
    out = raflora.aggregate(
        "lora-fair", case.updates, rank_levels=case.levels, previous=case.previous
    )
    B_bar, A_bar, _, _ = averages(case)
    assert_close(out[1], A_bar)  # Ā is kept
    dW = exact_delta(case.updates)
    if float(dW.norm()) == 0 or float((B_bar @ A_bar).norm()) == 0:
        return
    assert cosine(dW, out[0] @ out[1]) >= cosine(dW, B_bar @ A_bar) - 1e-12
    # and the objective (λ = 1) did not go up: the best iterate is kept
    P, S, target = _terms(*averages(case)[2:], A_bar)
    f_plain = fair_objective(B_bar, torch.zeros_like(B_bar), P, S, target, 1.0)
    f_refined = fair_objective(out[0], out[0] - B_bar, P, S, target, 1.0)
    assert float(f_refined) <= float(f_plain) + 1e-12


def test_the_refinement_improves_a_lossy_average_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    ups = [
        (
            torch.randn(12, r, generator=g, dtype=torch.float64),
            torch.randn(r, 10, generator=g, dtype=torch.float64),
            n,
        )
        for r, n in [(2, 10), (4, 30), (4, 60)]
    ]
    prev = (torch.zeros(12, 4, dtype=torch.float64), torch.zeros(4, 10, dtype=torch.float64))
    a = raflora.aggregate("lora-fair", ups, rank_levels=[2, 4], previous=prev)
    b = raflora.aggregate("lora-fair", ups, rank_levels=[2, 4], previous=prev)
    assert torch.equal(a[0], b[0])
    plain = raflora.aggregate("lora-fair", ups, rank_levels=[2, 4], previous=prev, fair_steps=0)
    dW = exact_delta(ups)
    assert cosine(dW, a[0] @ a[1]) > cosine(dW, plain[0] @ plain[1]) + 1e-3


def test_a_zero_product_skips_the_refinement() -> None:
    B_bar = torch.zeros(5, 2, dtype=torch.float64)
    A_bar = torch.randn(2, 4, dtype=torch.float64)
    B_cat, A_cat = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(refine_b(B_bar, A_bar, B_cat, A_cat), B_bar)


def test_lora_fair_runs_in_the_engine() -> None:
    for step in engine_rounds("lora-fair", 2):
        assert step.outcome.accepted and all(
            torch.isfinite(B).all() for B, _ in step.outcome.state.factors.values()
        )
