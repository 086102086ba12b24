"""The export's SVD of a cumulative delta without a dense SVD where it can
(:func:`raflora.engine.export.delta_svd`): factored, sketched and randomized routes against the
dense SVD."""

from __future__ import annotations

import torch
from torch import Tensor

from conftest import dense_svd, randn
from raflora.engine.export import _delta_factors, _numerical_rank, delta_svd

D, N = 600, 520  # min(d, n) ≥ 512: the sketch routes, not the dense one


def low_rank_sum(seed: int, ranks: list[int], d: int = D, n: int = N) -> tuple[Tensor, Tensor]:
    """Stacked factors of ``Σ_k B_k A_k`` (FLoRA's rounds of stacks)."""
    Bs = [randn(seed + 2 * i, d, r) / r for i, r in enumerate(ranks)]
    As = [randn(seed + 2 * i + 1, r, n) for i, r in enumerate(ranks)]
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def test_factored_route_is_the_dense_svd() -> None:
    B, A = low_rank_sum(0, [8, 16, 32, 4])
    out = delta_svd(None, (B, A))
    _, S, _ = dense_svd(B @ A)
    assert out.exact
    assert rel(out.S[:60], S[:60]) < 1e-12
    assert rel((out.U * out.S) @ out.Vh, B @ A) < 1e-12
    top = delta_svd(None, (B, A), rank=5)
    assert top.S.shape == (5,) and rel(top.S, S[:5]) < 1e-12


def test_sketch_of_a_numerically_low_rank_dense_delta_is_the_dense_svd() -> None:
    B, A = low_rank_sum(1, [16] * 9)  # rank 144, stored as a float32 sum like base_delta
    delta = (B @ A).float()
    out = delta_svd(delta)
    _, S, _ = dense_svd(delta.double())
    assert out.exact
    k = _numerical_rank(S)
    assert _numerical_rank(out.S) == k == 144
    assert rel(out.S[:k], S[:k]) < 1e-9
    assert rel((out.U[:, :k] * out.S[:k]) @ out.Vh[:k], delta.double()) < 1e-7


def test_randomized_route_for_a_truncated_export() -> None:
    # exactly low rank (rank 40 ≤ the sketch of 30 + 30 columns): exact
    B, A = low_rank_sum(2, [40])
    out = delta_svd((B @ A).float(), rank=30)
    _, S, _ = dense_svd((B @ A).float().double())
    assert out.exact and out.S.shape == (30,)
    assert rel(out.S, S[:30]) < 1e-9
    # full rank with a decaying spectrum: the top singular values to a small error
    U, _ = torch.linalg.qr(randn(3, D, N))
    V, _ = torch.linalg.qr(randn(4, N, N))
    sigma = 0.97 ** torch.arange(N, dtype=torch.float64)
    M = (U * sigma) @ V.T
    out = delta_svd(M.float(), rank=16)
    assert not out.exact
    assert rel(out.S, sigma[:16]) < 1e-3
    # the retained part is close to the best rank-16 approximation
    best = (U[:, :16] * sigma[:16]) @ V[:, :16].T
    assert rel((out.U * out.S) @ out.Vh, best) < 5e-2  # near-equal σ_16, σ_17 mix


def test_full_rank_whole_export_falls_back_to_the_dense_svd() -> None:
    M = randn(5, D, N).float()
    out = delta_svd(M)
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    assert out.exact
    assert torch.equal(out.S, S) and torch.equal(out.U, U) and torch.equal(out.Vh, Vh)


def test_small_modules_keep_the_dense_svd_bit_for_bit() -> None:
    M = randn(6, 64, 48).float()
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    for rank in (None, 7):
        out = delta_svd(M, rank=rank)
        k = S.numel() if rank is None else rank
        assert torch.equal(out.S, S[:k]) and torch.equal(out.U, U[:, :k])
        assert torch.equal(out.Vh, Vh[:k])


def test_routes_are_deterministic_and_leave_the_global_rng_alone() -> None:
    B, A = low_rank_sum(7, [16] * 4)
    delta = (B @ A).float()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = delta_svd(delta)
    b = delta_svd(delta, rank=20)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.U, delta_svd(delta).U) and torch.equal(b.Vh, delta_svd(delta, rank=20).Vh)


def test_delta_factors_reproduce_the_deltas_and_find_the_numerical_rank() -> None:
    B1, A1 = low_rank_sum(8, [16, 16])
    B2, A2 = low_rank_sum(9, [8])
    delta = {"a": (B1 @ A1).float(), "b": (B2 @ A2).float(), "c": randn(10, 40, 30).float()}
    factors, rank, numerical = _delta_factors(delta, None)
    assert rank == numerical == 32  # the largest numerical rank over modules (c has 30)
    for name, (B, A) in factors.items():
        assert B.shape[1] == 32 and rel(B.double() @ A.double(), delta[name].double()) < 1e-6
    factors, rank, numerical = _delta_factors(delta, 4)
    assert rank == 4 and numerical == 4
    for name, (B, A) in factors.items():
        _, S, _ = dense_svd(delta[name].double())
        kept = float((B.double() @ A.double()).norm() ** 2)
        # the best rank-4 energy: to rounding (small "c", low-rank "b") or near it ("a": rank
        # 32 with a flat spectrum, past the sketch of 4 + 10)
        assert abs(kept / float(S[:4].square().sum()) - 1) < (3e-2 if name == "a" else 1e-6)


def test_whole_export_of_a_full_rank_delta_carries_it_bit_for_bit() -> None:
    # numerical rank past min(d, n) / 2: no dense SVD, the delta itself as (ΔW, I) or (I, ΔW)
    tall = randn(11, D, N).float()
    wide = randn(12, N, D).float()
    B1, A1 = low_rank_sum(13, [8, 8])  # a low-rank module beside them: its SVD, padded
    delta = {"tall": tall, "wide": wide, "low": (B1 @ A1).float()}
    factors, rank, numerical = _delta_factors(delta, None)
    assert rank == numerical == N  # min(d, n) of the full-rank modules
    B, A = factors["tall"]
    assert B.shape == (D, N) and torch.equal(B, tall) and torch.equal(A, torch.eye(N))
    B, A = factors["wide"]
    assert torch.equal(B, torch.eye(N)) and torch.equal(A, wide)
    B, A = factors["low"]
    assert B.shape == (D, N) and float(B[:, 16:].norm()) < 1e-6 * float(B.norm())
    assert rel(B.double() @ A.double(), delta["low"].double()) < 1e-6
    # a zero module beside a low-rank one is zeros at the other's rank, not "full rank"
    factors, rank, _ = _delta_factors({"zero": torch.zeros(D, N), "low": delta["low"]}, None)
    assert rank == 16 and not factors["zero"][0].any() and not factors["zero"][1].any()
    # a truncated export of the same delta takes the randomized route, never the whole delta
    factors, rank, _ = _delta_factors({"tall": tall}, 8)
    assert rank == 8 and factors["tall"][0].shape == (D, 8)
