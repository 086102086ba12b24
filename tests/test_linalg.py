"""Factored low-rank algebra against dense ``torch.linalg.svd`` of the formed ``B @ A``."""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from conftest import assert_best_rank, best_rank, randn
from raflora.linalg import factored_energy, factored_svd, frobenius_norm, svd_to_factors

KINDS = ("random", "duplicate_columns", "low_rank", "zero")


@dataclass(frozen=True)
class Case:
    kind: str
    d: int
    n: int
    R: int
    batch: int | None
    seed: int

    @property
    def k(self) -> int:
        """Number of singular triplets of ``B A``: ``min(d, n, R)``."""
        return min(self.d, self.n, self.R)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        lead = () if self.batch is None else (self.batch,)
        B = randn(self.seed, *lead, self.d, self.R)
        A = randn(self.seed + 1, *lead, self.R, self.n)
        if self.kind == "duplicate_columns" and self.R > 1:
            B[..., -1] = B[..., 0]  # B A has rank < R
        elif self.kind == "low_rank":
            inner = max(1, self.R // 2)  # B = B₁ C: rank(B A) ≤ R // 2
            B = randn(self.seed, *lead, self.d, inner) @ randn(self.seed + 2, inner, self.R)
        elif self.kind == "zero":
            B = torch.zeros_like(B)
        return B.to(dtype), A.to(dtype)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    return Case(
        kind=draw(st.sampled_from(KINDS)),
        d=draw(st.integers(1, 12)),
        n=draw(st.integers(1, 12)),
        R=draw(st.integers(1, 12)),  # often > min(d, n)
        batch=draw(st.none() | st.integers(1, 3)),
        seed=draw(st.integers(0, 2**31)),
    )


# Deterministic corners that must always run (not left to the draw).
CORNERS = [
    Case("random", 4, 6, 9, None, 0),  # R > min(d, n)
    Case("random", 7, 3, 2, 3, 1),  # batch, R < min(d, n)
    Case("duplicate_columns", 8, 8, 5, None, 2),
    Case("low_rank", 10, 9, 6, 2, 3),
    Case("zero", 5, 4, 3, 2, 4),
    Case("random", 1, 1, 1, None, 5),
]


def _orthonormal_rows(X: Tensor, atol: float) -> None:
    eye = torch.eye(X.shape[-2], dtype=X.dtype).expand(*X.shape[:-2], -1, -1)
    torch.testing.assert_close(X @ X.transpose(-1, -2), eye, rtol=0, atol=atol)


def check_factored_svd(
    case: Case, rank: int | None, tol: float = 1e-10, rel_gap: float = 1e-6
) -> None:
    B, A = case.factors()
    M = B @ A
    U, S, Vh = factored_svd(B, A, rank)
    kept = case.k if rank is None else min(rank, case.k)
    lead = () if case.batch is None else (case.batch,)
    assert U.shape == (*lead, case.d, kept)
    assert S.shape == (*lead, kept)
    assert Vh.shape == (*lead, kept, case.n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    scale = max(float(torch.linalg.matrix_norm(M, ord=2).max()), 1e-300)
    dense_S = torch.linalg.svdvals(M)[..., :kept]
    torch.testing.assert_close(S, dense_S, rtol=0, atol=tol * scale)
    assert bool((S[..., :-1] >= S[..., 1:]).all()), "singular values not descending"
    _orthonormal_rows(U.transpose(-1, -2), 1e-10)
    _orthonormal_rows(Vh, 1e-10)
    assert_best_rank((U * S[..., None, :]) @ Vh, M, kept, rtol=tol, rel_gap=rel_gap)


@given(cases(), st.none() | st.integers(0, 14))
def test_factored_svd_matches_dense_float64(case: Case, rank: int | None) -> None:
    check_factored_svd(case, rank)


@pytest.mark.parametrize("case", CORNERS, ids=lambda c: f"{c.kind}-{c.d}x{c.n}-R{c.R}-b{c.batch}")
@pytest.mark.parametrize("rank", [None, 1, 3, 20])
def test_factored_svd_corners(case: Case, rank: int | None) -> None:
    check_factored_svd(case, rank)


@given(cases(), st.integers(1, 14))
def test_factored_svd_float32(case: Case, rank: int) -> None:
    B, A = case.factors(torch.float32)
    M = B.double() @ A.double()  # exact reference of the float32 inputs
    U, S, Vh = factored_svd(B, A, rank)
    assert S.dtype == torch.float32
    kept = min(rank, case.k)
    scale = max(float(torch.linalg.matrix_norm(M, ord=2).max()), 1e-30)
    torch.testing.assert_close(
        S.double(), torch.linalg.svdvals(M)[..., :kept], rtol=0, atol=1e-5 * scale
    )
    X = (U * S[..., None, :]).double() @ Vh.double()
    assert_best_rank(X, M, kept, rtol=1e-5, rel_gap=1e-2)


def check_svd_to_factors(case: Case, r: int, tol: float = 1e-10, rel_gap: float = 1e-6) -> None:
    B, A = case.factors()
    M = B @ A
    B_g, A_g = svd_to_factors(B, A, r)
    lead = () if case.batch is None else (case.batch,)
    assert B_g.shape == (*lead, case.d, r) and A_g.shape == (*lead, r, case.n)
    assert B_g.dtype == A_g.dtype == torch.float64
    scale = max(float(torch.linalg.matrix_norm(M, ord=2).max()), 1e-300)
    # all singular values on B: BᵀB = diag(σ²), the dense top-r (zero beyond min(d, n, R))
    sigma = torch.zeros(*lead, r, dtype=torch.float64)
    dense_S = torch.linalg.svdvals(M)[..., :r]
    sigma[..., : dense_S.shape[-1]] = dense_S
    gram = B_g.transpose(-1, -2) @ B_g
    torch.testing.assert_close(gram, torch.diag_embed(sigma**2), rtol=0, atol=tol * scale**2)
    # A_g rows orthonormal — including the completed rows when r > min(d, n, R) — as far as
    # n allows (there are only n orthonormal rows of length n)
    _orthonormal_rows(A_g[..., : min(r, case.n), :], 1e-10)
    if r > case.k:
        assert bool((B_g[..., case.k :] == 0).all()), "padding columns of B_g must be zero"
    assert_best_rank(B_g @ A_g, M, r, rtol=tol, rel_gap=rel_gap)


@given(cases(), st.integers(1, 14))
def test_svd_to_factors_is_best_rank_r(case: Case, r: int) -> None:
    check_svd_to_factors(case, r)


@pytest.mark.parametrize("case", CORNERS, ids=lambda c: f"{c.kind}-{c.d}x{c.n}-R{c.R}-b{c.batch}")
@pytest.mark.parametrize("r", [1, 4, 8])
def test_svd_to_factors_corners(case: Case, r: int) -> None:
    check_svd_to_factors(case, r)


def _svd_does_not_converge(*args: object, **kwargs: object) -> None:
    raise torch.linalg.LinAlgError("forced: the algorithm failed to converge")


# LAPACK's gesdd really fails on some cores with many repeated singular values (seen in the
# theory Monte Carlo); forcing the failure drives the Gram-eigensolver fallback on every input.
# It is accurate relative to σ₁² only, hence the looser tolerance and uniqueness gap.
@given(cases(), st.integers(1, 14))
def test_fallback_when_svd_does_not_converge(case: Case, r: int) -> None:
    with mock.patch.object(torch.linalg, "svd", _svd_does_not_converge):
        check_factored_svd(case, r, tol=1e-7, rel_gap=1e-3)
        check_svd_to_factors(case, r, tol=1e-7, rel_gap=1e-3)


@pytest.mark.parametrize("case", CORNERS, ids=lambda c: f"{c.kind}-{c.d}x{c.n}-R{c.R}-b{c.batch}")
def test_fallback_corners(case: Case) -> None:
    with mock.patch.object(torch.linalg, "svd", _svd_does_not_converge):
        for r in (1, 3, 8):
            check_factored_svd(case, r, tol=1e-7, rel_gap=1e-3)
            check_svd_to_factors(case, r, tol=1e-7, rel_gap=1e-3)


def test_fallback_on_repeated_singular_values() -> None:
    """Blocks of equal singular values and exact zeros, the shape of the real failure."""
    U, _ = torch.linalg.qr(randn(0, 12, 12))
    V, _ = torch.linalg.qr(randn(1, 10, 10))
    s = torch.tensor([1.0] * 3 + [0.07] * 3 + [0.0] * 4, dtype=torch.float64)
    B, A = U[:, :10] * s, V.T
    with mock.patch.object(torch.linalg, "svd", _svd_does_not_converge):
        B_g, A_g = svd_to_factors(B, A, 6)
        _, S, _ = factored_svd(B, A)
    torch.testing.assert_close(S, s, rtol=0, atol=1e-12)
    torch.testing.assert_close(B_g @ A_g, B @ A, rtol=0, atol=1e-12)
    _orthonormal_rows(A_g, 1e-12)


def test_svd_to_factors_pads_beyond_available_directions() -> None:
    """r > R: extra A rows orthonormal to the rest, extra B columns zero, product unchanged."""
    B, A = randn(0, 9, 2), randn(1, 2, 7)
    B_g, A_g = svd_to_factors(B, A, 5)
    _orthonormal_rows(A_g, 1e-12)
    assert bool((B_g[:, 2:] == 0).all())
    torch.testing.assert_close(B_g @ A_g, B @ A, rtol=0, atol=1e-12)


def test_svd_to_factors_of_zero_update_keeps_orthonormal_a() -> None:
    B, A = torch.zeros(6, 3, dtype=torch.float64), randn(0, 3, 5)
    B_g, A_g = svd_to_factors(B, A, 4)
    assert bool((B_g == 0).all())
    _orthonormal_rows(A_g, 1e-12)


@given(cases())
def test_factored_energy_is_dense_sigma_squared(case: Case) -> None:
    B, A = case.factors()
    M = B @ A
    energy = factored_energy(B, A)
    expected = torch.linalg.svdvals(M)[..., : case.k] ** 2
    assert energy.shape == expected.shape
    scale = max(float(expected.max()) if expected.numel() else 0.0, 1e-300)
    torch.testing.assert_close(energy, expected, rtol=0, atol=1e-10 * scale)


@given(cases())
def test_frobenius_norm_is_dense_norm(case: Case) -> None:
    B, A = case.factors()
    expected = torch.linalg.matrix_norm(B @ A)
    torch.testing.assert_close(frobenius_norm(B, A), expected, rtol=1e-10, atol=1e-12)


def test_half_precision_runs_and_is_finite() -> None:
    B, A = randn(0, 2, 10, 6).bfloat16(), randn(1, 2, 6, 8).bfloat16()
    M = B.double() @ A.double()
    U, S, Vh = factored_svd(B, A, 4)
    assert S.dtype == torch.float32 and bool(torch.isfinite(S).all())
    assert bool(torch.isfinite(U).all() and torch.isfinite(Vh).all())
    # computed in float32 from the (exactly representable) bf16 values
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(M)[..., :4], rtol=1e-4, atol=1e-4)
    B_g, A_g = svd_to_factors(B, A, 4)
    assert B_g.dtype == A_g.dtype == torch.bfloat16
    assert bool(torch.isfinite(B_g).all() and torch.isfinite(A_g).all())
    rel = torch.linalg.matrix_norm(B_g.double() @ A_g.double() - best_rank(M, 4))
    assert float((rel / torch.linalg.matrix_norm(M)).max()) < 5e-2
    assert bool(torch.isfinite(factored_energy(B, A)).all())
    norm = frobenius_norm(B, A)
    torch.testing.assert_close(norm.double(), torch.linalg.matrix_norm(M), rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    ("B", "A"),
    [
        (torch.zeros(4, 3), torch.zeros(2, 5)),  # inner dimensions differ
        (torch.zeros(4), torch.zeros(4, 5)),  # not a matrix
    ],
)
def test_bad_factor_shapes_raise(B: Tensor, A: Tensor) -> None:
    with pytest.raises(ValueError, match=r"inner dimensions|at least 2-D"):
        factored_svd(B, A)
    with pytest.raises(ValueError, match=r"inner dimensions|at least 2-D"):
        frobenius_norm(B, A)


def test_negative_rank_raises() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        factored_svd(torch.ones(3, 2), torch.ones(2, 3), -1)
