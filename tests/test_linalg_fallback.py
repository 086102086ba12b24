"""The small-core SVD falls back to a symmetric eigensolver when LAPACK's SVD does not converge."""

from __future__ import annotations

import pytest
import torch

from raflora import linalg


def _fail(*args: object, **kwargs: object) -> None:
    raise torch.linalg.LinAlgError("forced non-convergence")


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
def test_fallback_matches_dense_svd(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(1)
    core = torch.randn(*shape, generator=g, dtype=torch.float64)
    core[:, 0] = 0.0  # a zero singular value: its left vector must still be completed
    S_ref = torch.linalg.svdvals(core)
    monkeypatch.setattr(torch.linalg, "svd", _fail)
    U, S, Vh = linalg._small_svd(core)
    k = min(shape)
    assert torch.allclose(S, S_ref, atol=1e-12)
    assert torch.allclose(U @ torch.diag(S) @ Vh, core, atol=1e-12)
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-12)
    assert torch.allclose(Vh @ Vh.T, eye, atol=1e-12)


def test_repeated_singular_values_through_svd_to_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly repeated singular values (what the Monte Carlo produces) through the fallback."""
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(8, 4, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(8, 4, generator=g, dtype=torch.float64))
    B = torch.cat([U, U], dim=1)  # the same update twice: every σ repeated
    A = torch.cat([V.T, V.T], dim=0) * 0.5
    monkeypatch.setattr(torch.linalg, "svd", _fail)
    B_g, A_g = linalg.svd_to_factors(B, A, 6)
    assert torch.allclose(B_g @ A_g, B @ A, atol=1e-12)
    assert torch.allclose(A_g @ A_g.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
