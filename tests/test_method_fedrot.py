"""FedRot-LoRA (docs/methods.md#fedrot): the client's Procrustes rotation and a whole round
against a dense reference (scipy's Procrustes with the Kabsch sign fix, numpy padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import orthogonal_procrustes
from torch import Tensor

from conftest import randn
from method_cases import engine_rounds, first_module
from raflora.methods import ClientMessage, get_aggregator
from raflora.methods.context import RoundContext
from raflora.methods.fedrot import FedRotClientRound, procrustes_rotation
from raflora.methods.validation import ClientUpdate


def rotate(
    method: object, received: tuple[Tensor, Tensor], trained: tuple[Tensor, Tensor], t: int
) -> tuple[Tensor, Tensor]:
    client = FedRotClientRound(
        method,  # type: ignore[arg-type]
        RoundContext(t).for_client(0, received[0].shape[1]),
        ClientMessage({"m": received}),
    )
    return client.finish({"m": trained}).factors["m"]


def ref_rotation(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The rotation R (det +1) minimising ‖X R − Y‖_F: scipy's Procrustes, then Kabsch's fix."""
    R, _ = orthogonal_procrustes(X, Y)
    if np.linalg.det(R) < 0:
        U, _, Vt = np.linalg.svd(X.T @ Y)
        U[:, -1] *= -1
        R = U @ Vt
    return R


@given(st.integers(0, 2**20), st.sampled_from([2, 3]), st.integers(1, 6))
def test_the_rotation_keeps_the_product_and_is_the_optimal_rotation(
    seed: int, t: int, r: int
) -> None:
    method = get_aggregator("fedrot", [r])
    d, n = 7, 5
    received = (randn(seed, d, r), randn(seed + 1, r, n))
    trained = (received[0] + randn(seed + 2, d, r), received[1] + randn(seed + 3, r, n))
    B, A = rotate(method, received, trained, t)
    product = trained[0] @ trained[1]
    assert float((B @ A - product).norm()) <= 1e-6 * float(product.norm())
    R = torch.linalg.lstsq(trained[0], B).solution  # B = B_k R
    assert float(torch.linalg.det(R)) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(R.T @ R, torch.eye(r, dtype=R.dtype), rtol=0, atol=1e-9)
    # A side: (Rᵀ A_k) A_0ᵀ = V Σ Vᵀ, symmetric PSD when det(A_k A_0ᵀ) > 0; B side: Rᵀ B_kᵀ B_0
    M = A @ received[1].T if t == 2 else B.T @ received[0]
    torch.testing.assert_close(M, M.T, rtol=0, atol=1e-9)
    cross = trained[1] @ received[1].T if t == 2 else trained[0].T @ received[0]
    if float(torch.linalg.det(cross)) > 0:
        assert float(torch.linalg.eigvalsh(M).min()) >= -1e-9
    # and it is the reference's rotation
    X, Y = (
        (trained[1].T.numpy(), received[1].T.numpy())
        if t == 2
        else (trained[0].numpy(), received[0].numpy())
    )
    np.testing.assert_allclose(R.numpy(), ref_rotation(X, Y), atol=1e-8)


def test_no_rotation_in_round_one_and_identity_for_a_zero_cross_product() -> None:
    method = get_aggregator("fedrot", [2])
    trained = (randn(0, 4, 2), randn(1, 2, 3))
    B, A = rotate(method, (randn(2, 4, 2), randn(3, 2, 3)), trained, 1)
    assert torch.equal(B, trained[0]) and torch.equal(A, trained[1])
    B, A = rotate(method, (torch.zeros(4, 2, dtype=torch.float64), randn(3, 2, 3)), trained, 3)
    torch.testing.assert_close(B, trained[0])  # B_0 = 0: nothing to align to
    assert torch.equal(procrustes_rotation(torch.zeros(3, 3)), torch.eye(3, dtype=torch.float64))


def test_soft_rotation_is_the_polar_factor_of_the_blend() -> None:
    M = randn(4, 3, 3)
    R = procrustes_rotation(M)
    soft = procrustes_rotation(M, 0.3)
    U, _, Vh = torch.linalg.svd(0.7 * torch.eye(3, dtype=torch.float64) + 0.3 * R)
    torch.testing.assert_close(soft, U @ Vh)


def test_a_whole_round_matches_the_dense_reference() -> None:
    levels, r_max, d, n, t = [2, 4, 8], 8, 6, 5, 2
    method = get_aggregator("fedrot", levels)
    B_g, A_g = randn(10, d, r_max), randn(11, r_max, n)
    clients = [(0, 2, 30), (1, 4, 50), (2, 2, 20)]  # (id, rank, samples): index 4..7 uncovered
    updates, reference = [], []
    for cid, r, samples in clients:
        received = (B_g[:, :r].clone(), A_g[:r].clone())
        trained = (
            received[0] + 0.1 * randn(20 + cid, d, r),
            received[1] + 0.1 * randn(30 + cid, r, n),
        )
        B, A = rotate(method, received, trained, t)
        updates.append(ClientUpdate(cid, r, samples, {"m": (B, A)}))
        R = ref_rotation(trained[1].T.numpy(), received[1].T.numpy())  # even round: A side
        reference.append((trained[0].numpy() @ R, R.T @ trained[1].numpy(), samples))
    ctx = RoundContext(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = method.init_state(ctx, {"m": (d, n)})
    state.factors = {"m": (B_g, A_g)}
    B_new, A_new = method.aggregate(state, updates).state.factors["m"]
    total = sum(s for *_, s in reference)
    B_ref, A_ref = np.zeros((d, r_max)), np.zeros((r_max, n))
    for B, A, s in reference:
        B_ref[:, : B.shape[1]] += s / total * B
        A_ref[: A.shape[0]] += s / total * A
    B_ref[:, 4:], A_ref[4:] = B_g[:, 4:].numpy(), A_g[4:].numpy()  # carried
    np.testing.assert_allclose(B_new.numpy(), B_ref, atol=1e-10)
    np.testing.assert_allclose(A_new.numpy(), A_ref, atol=1e-10)


def test_fedrot_in_the_engine_uploads_rotated_factors_of_the_same_product() -> None:
    steps = engine_rounds("fedrot", 3)
    for t, step in enumerate(steps, start=1):
        for result in step.results:
            B, A = first_module(result.update.factors)
            B_0, A_0 = step.received[result.update.client_id]
            M = A @ A_0.T if t == 2 else B.T @ B_0
            if t > 1:  # aligned: the cross term is symmetric
                torch.testing.assert_close(M, M.T, rtol=1e-4, atol=1e-6)
