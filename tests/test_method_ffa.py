"""FFA-LoRA (docs/methods.md#ffa): ``A`` frozen at its init, ``B`` averaged; exact; ``B``-only
traffic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from torch import Tensor

import raflora
from method_cases import (
    Case,
    Update,
    assert_close,
    cases,
    engine_rounds,
    first_module,
    p_k,
    pad_cols,
)


def ref_ffa(updates: list[Update], A_g: Tensor) -> tuple[Tensor, Tensor]:
    """B_g = Σ p_k pad(B_k); A_g stays."""
    r_max = A_g.shape[0]
    B_g = sum(w * pad_cols(B, r_max) for w, (B, _, _) in zip(p_k(updates), updates, strict=True))
    return B_g, A_g  # type: ignore[return-value]


@given(cases())
def test_ffa_matches_the_dense_reference_and_is_exact(case: Case) -> None:
    A_g = case.previous[1]
    # FFA's clients return A_g[:r_k] untouched: the server never reads what they send as A
    updates = [(B, A_g[: B.shape[1]].clone(), n) for B, _, n in case.updates]
    B, A = raflora.aggregate("ffa", updates, rank_levels=case.levels, previous=case.previous)
    B_ref, A_ref = ref_ffa(updates, A_g)
    assert_close(B, B_ref)
    assert torch.equal(A, A_ref)
    # exact: Σ p_k B_k A_g[:r_k] = B_g A_g
    exact = sum(w * (B_k @ A_k) for w, (B_k, A_k, _) in zip(p_k(updates), updates, strict=True))
    assert_close(B @ A, exact)  # type: ignore[arg-type]


def test_ffa_needs_the_previous_global_factors() -> None:
    B, A = torch.ones(3, 2), torch.ones(2, 4)
    with pytest.raises(ValueError, match="ffa needs previous"):
        raflora.aggregate("ffa", [(B, A, 1)], rank_levels=[2])


def test_ffa_clients_train_only_b_and_a_stays_the_round_zero_init() -> None:
    steps = engine_rounds("ffa", 3)
    A0 = first_module(steps[0].before.factors)[1]
    for step in steps:
        for result in step.results:
            B_k, A_k = first_module(result.update.factors)
            B_sent, A_sent = step.received[result.update.client_id]
            assert torch.equal(A_k, A_sent)  # frozen: bit for bit what it received
            assert not torch.equal(B_k, B_sent)  # B trained
        assert torch.equal(first_module(step.outcome.state.factors)[1], A0)
    # exactness on real updates, every module: B_g A_g = Σ p_k B_k A_g[:r_k]
    last = steps[-1]
    p = p_k(
        [
            (B, A, r.update.num_samples)
            for r in last.results
            for B, A in [first_module(r.update.factors)]
        ]
    )
    for name, (B_g, A_g) in last.outcome.state.factors.items():
        exact = sum(
            w * (r.update.factors[name][0] @ A_g[: r.update.rank])
            for w, r in zip(p, last.results, strict=True)
        )
        torch.testing.assert_close(B_g @ A_g, exact, rtol=1e-5, atol=1e-7)


def test_ffa_traffic_is_b_only_each_way() -> None:
    step = engine_rounds("ffa", 1)[0]
    fed, state = step.fed, step.before
    shapes = state.module_shapes.values()
    for result in step.results:
        r = result.update.rank
        ctx = fed.context(1).for_client(result.update.client_id, r)
        assert fed.aggregator.download_numel(ctx, state) == sum(d * r for d, _ in shapes)
        assert fed.aggregator.upload_bytes(ctx, result.update) == sum(d * r * 4 for d, _ in shapes)
