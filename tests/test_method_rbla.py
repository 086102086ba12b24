"""RBLA (docs/methods.md#rbla): rank-index averaging against a dense reference written from the
rule, carry."""

from __future__ import annotations

import torch
from hypothesis import given
from torch import Tensor

import raflora
from method_cases import Case, Update, assert_close, cases, engine_rounds, first_module


def ref_rbla(updates: list[Update], previous: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Per index j: the sample-weighted mean over C_j = {k : r_k ≥ j}; uncovered j carries."""
    B_prev, A_prev = previous
    B_g, A_g = B_prev.clone(), A_prev.clone()
    for j in range(B_prev.shape[1]):
        holders = [(B, A, n) for B, A, n in updates if B.shape[1] > j]
        if not holders:
            continue  # nobody reaches j: the previous column and row stay
        total = sum(n for _, _, n in holders)
        B_g[:, j] = sum(n * B[:, j] for B, _, n in holders) / total
        A_g[j, :] = sum(n * A[j, :] for _, A, n in holders) / total
    return B_g, A_g


@given(cases())
def test_rbla_matches_the_dense_reference(case: Case) -> None:
    B, A = raflora.aggregate("rbla", case.updates, rank_levels=case.levels, previous=case.previous)
    B_ref, A_ref = ref_rbla(case.updates, case.previous)
    assert_close(B, B_ref)
    assert_close(A, A_ref)
    assert (
        raflora.aggregate_round(
            "rbla", case.updates, rank_levels=case.levels, previous=case.previous
        ).residual
        is None
    )


def test_an_index_held_by_one_client_is_that_clients_value() -> None:
    g = torch.Generator().manual_seed(0)
    small = (
        torch.randn(5, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
        900,
    )
    big = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        100,
    )
    B, A = raflora.aggregate("rbla", [small, big], rank_levels=[2, 4, 8])
    # indices 2, 3: only the rank-4 client, unweighted by the rank-2 client's many samples
    assert torch.equal(B[:, 2:4], big[0][:, 2:4]) and torch.equal(A[2:4], big[1][2:4])
    # index 0: 0.9 / 0.1 by samples; indices 4..7: nobody, nothing to carry -> zero
    assert_close(B[:, 0], 0.9 * small[0][:, 0] + 0.1 * big[0][:, 0])
    assert not B[:, 4:].any() and not A[4:].any()


def test_rbla_in_the_engine_matches_the_reference_on_real_updates() -> None:
    for step in engine_rounds("rbla", 2):
        updates = [(*first_module(r.update.factors), r.update.num_samples) for r in step.results]
        expected = ref_rbla(updates, first_module(step.before.factors))  # type: ignore[arg-type]
        B, A = first_module(step.outcome.state.factors)
        torch.testing.assert_close(B, expected[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(A, expected[1], rtol=1e-5, atol=1e-7)
