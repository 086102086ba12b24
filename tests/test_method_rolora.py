"""RoLoRA (docs/methods.md#rolora): alternating ``B``/``A`` rounds, the trained factor averaged;
exact."""

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
    pad_rows,
)
from raflora.methods.context import RoundContext


def ref_rolora(
    updates: list[Update], previous: tuple[Tensor, Tensor], round_index: int
) -> tuple[Tensor, Tensor]:
    """Odd rounds: B_g = Σ p_k pad(B_k), A_g kept; even rounds: A_g = Σ p_k pad(A_k), B_g kept."""
    B_prev, A_prev = previous
    r_max, p = A_prev.shape[0], p_k(updates)
    if round_index % 2 == 1:
        return sum(w * pad_cols(B, r_max) for w, (B, _, _) in zip(p, updates, strict=True)), A_prev  # type: ignore[return-value]
    return B_prev, sum(w * pad_rows(A, r_max) for w, (_, A, _) in zip(p, updates, strict=True))  # type: ignore[return-value]


@pytest.mark.parametrize("round_index", [1, 2, 3, 4])
@given(case=cases())
def test_rolora_matches_the_dense_reference_and_is_exact(case: Case, round_index: int) -> None:
    B_prev, A_prev = case.previous
    odd = round_index % 2 == 1
    # what RoLoRA's clients return: the frozen factor is what they received
    updates = [
        (B, A_prev[: B.shape[1]].clone(), n) if odd else (B_prev[:, : A.shape[0]].clone(), A, n)
        for B, A, n in case.updates
    ]
    B, A = raflora.aggregate(
        "rolora", updates, rank_levels=case.levels, previous=case.previous, round_index=round_index
    )
    B_ref, A_ref = ref_rolora(updates, case.previous, round_index)
    assert_close(B, B_ref)
    assert_close(A, A_ref)
    exact = sum(w * (B_k @ A_k) for w, (B_k, A_k, _) in zip(p_k(updates), updates, strict=True))
    assert_close(B @ A, exact)  # type: ignore[arg-type]


def test_rolora_clients_alternate_the_trained_factor() -> None:
    steps = engine_rounds("rolora", 4)
    for t, step in enumerate(steps, start=1):
        for result in step.results:
            B_k, A_k = first_module(result.update.factors)
            B_sent, A_sent = step.received[result.update.client_id]
            frozen, trained = (
                ((A_k, A_sent), (B_k, B_sent)) if t % 2 else ((B_k, B_sent), (A_k, A_sent))
            )
            assert torch.equal(*frozen), t
            assert not torch.equal(*trained), t
        B_g, A_g = first_module(step.outcome.state.factors)
        B_0, A_0 = first_module(step.before.factors)
        assert torch.equal(A_g, A_0) if t % 2 else torch.equal(B_g, B_0)


def test_rolora_uploads_the_trained_factor_only() -> None:
    steps = engine_rounds("rolora", 2)
    for t, step in enumerate(steps, start=1):
        shapes = step.before.module_shapes.values()
        for result in step.results:
            r = result.update.rank
            size = sum((d if t % 2 else n) * r * 4 for d, n in shapes)
            assert step.fed.aggregator.upload_bytes(RoundContext(t), result.update) == size
            assert step.fed.aggregator.download_numel(RoundContext(rank=r), step.before) == sum(
                (d + n) * r for d, n in shapes
            )
