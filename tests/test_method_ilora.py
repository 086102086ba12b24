"""ILoRA (docs/methods.md#ilora, the project's readings): QR initialisation, concatenated-QR
aggregation against ``torch.linalg.qr`` of the dense average, and the control variates against an
independent SCAFFOLD written here."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given
from torch import Tensor

from conftest import config_with, randn
from method_cases import SYNTHETIC, Case, cases, exact_delta
from raflora.engine import build_federation
from raflora.methods import ClientUpdate, get_aggregator
from raflora.methods.context import RoundContext
from raflora.methods.ilora import qr_aggregate


def test_every_ranks_round_zero_model_is_the_base_model() -> None:
    fed = build_federation(config_with(SYNTHETIC, method="ilora"))
    state = fed.initial_state()
    assert fed.aggregator.initial_residual(state) is None  # the base is not shifted
    for rank in fed.aggregator.rank_levels:
        for name, (B, A) in fed.aggregator.level_factors(
            fed.context(0).at_rank(rank), state
        ).items():
            assert not (B @ A).any(), (rank, name)  # A_g = 0: W_0 itself
    for B, _ in state.factors.values():  # B_g = Q[:, :r_max]: orthonormal columns
        torch.testing.assert_close(B.T @ B, torch.eye(B.shape[1]), rtol=0, atol=1e-5)


def test_the_shift_variant_keeps_the_model_and_needs_one_rank_level() -> None:
    W = randn(0, 6, 5)
    method = get_aggregator("ilora", [3], qr_init="shift")
    ctx = RoundContext(
        generator=torch.Generator(),
        base_weights=lambda: {"m": W},
        client_ranks=(3, 3),
        dtype=torch.float64,
    )
    state = method.init_state(ctx, {"m": (6, 5)})
    B_s, A_s = method.initial_residual(state)["m"]  # type: ignore[index]
    B, A = state.factors["m"]
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close((B @ A).abs(), (Q[:, :3] @ R[:3]).abs())
    torch.testing.assert_close(W + B_s @ A_s + B @ A, W)  # shifted base + adapter = W_0
    with pytest.raises(ValueError, match="single rank level"):
        get_aggregator("ilora", [2, 4], qr_init="shift")
    with pytest.raises(ValueError, match="need client_ranks"):
        method.init_state(replace(ctx, client_ranks=()), {"m": (6, 5)})


@given(cases())
def test_concatenated_qr_equals_the_qr_of_the_dense_average(case: Case) -> None:
    d, n = case.previous[0].shape[0], case.previous[1].shape[1]
    r = case.r_max
    assume(r <= min(d, n))
    dW = exact_delta(case.updates)
    assume(torch.linalg.matrix_rank(dW[:, :r]) == r)  # QR unique up to signs
    method = get_aggregator("ilora", case.levels)
    B, A = method.aggregate_module(RoundContext(1), case.updates)
    Q, R = torch.linalg.qr(dW)
    scale = max(float(dW.norm()), 1.0)
    assert float((B @ A - Q[:, :r] @ R[:r]).norm()) <= 1e-9 * scale
    assert float((A.abs() - R[:r].abs()).norm()) <= 1e-9 * scale


def test_a_module_smaller_than_r_max_is_refused_before_the_first_round() -> None:
    method = get_aggregator("ilora", [2, 8])
    assert "r_max ≤ min(d, n)" in str(method.module_shape_problem({"q": (16, 4)}))
    assert method.module_shape_problem({"q": (16, 8)}) is None
    B, A = qr_aggregate(randn(1, 5, 3), randn(2, 3, 4), 2)
    assert B.shape == (5, 2) and A.shape == (2, 4)


# ------------------------------------------------------------------ control variates
D, N, RANKS, SAMPLES, STEPS, LR = 6, 5, (2, 4), (30, 10), 4, 0.05


def loss(k: int, step: int, t: int, B: Tensor, A: Tensor, W: Tensor) -> Tensor:
    """Client k's minibatch loss: ½‖W + B A − T‖² against a target of its own (non-IID)."""
    target = randn(1000 * k + 10 * t + step, D, N)
    return 0.5 * ((W + B @ A - target) ** 2).sum()


def raflora_rounds(W: Tensor, rounds: int) -> tuple[dict, list[dict], list[float]]:
    """ILoRA's real client and server halves, driven by a plain SGD loop."""
    method = get_aggregator("ilora", list(RANKS))
    ctx = RoundContext(
        generator=torch.Generator(),
        base_weights=lambda: {"m": W},
        client_ranks=RANKS,
        dtype=torch.float64,
    )
    state = method.init_state(ctx, {"m": (D, N)})
    own: list[dict | None] = [None, None]
    corrections = []
    for t in range(1, rounds + 1):
        updates = []
        for k, r in enumerate(RANKS):
            client_ctx = replace(ctx, round_index=t, generator=None).for_client(k, r)
            message = method.client_message(client_ctx, state)
            client = method.client_round(client_ctx, message, own[k])
            B, A = (x.clone().requires_grad_() for x in client.start()["m"])
            for s in range(STEPS):
                g_B, g_A = torch.autograd.grad(loss(k, s, t, B, A, W), (B, A))
                raw = g_B.clone()
                client.correct_gradients({"m": (g_B, g_A)})
                corrections.append(float((g_B - raw).norm()))
                with torch.no_grad():
                    B -= LR * g_B
                    A -= LR * g_A
            upload = client.finish({"m": (B.detach(), A.detach())})
            own[k] = upload.state
            updates.append(ClientUpdate(k, r, SAMPLES[k], upload.factors, extras=upload.extras))
        state = method.aggregate(state, updates).state
    return {"factors": state.factors["m"], "c": state.extras["c"]["m"]}, own, corrections  # type: ignore[return-value]


def scaffold_rounds(W: Tensor, rounds: int) -> tuple[dict, list[tuple[Tensor, Tensor]]]:
    """Independent SCAFFOLD in gradient units with the rank-aware server update
    (docs/methods.md#ilora)."""
    r_max = max(RANKS)
    Q, R = torch.linalg.qr(W)
    B_g, A_g = Q[:, :r_max].clone(), torch.zeros(r_max, N, dtype=W.dtype)
    c_B, c_A = torch.zeros(D, r_max, dtype=W.dtype), torch.zeros(r_max, N, dtype=W.dtype)
    c_k = [(torch.zeros(D, r, dtype=W.dtype), torch.zeros(r, N, dtype=W.dtype)) for r in RANKS]
    K = [sum(1 for r in RANKS if r > j) for j in range(r_max)]
    for t in range(1, rounds + 1):
        trained, deltas = [], []
        for k, r in enumerate(RANKS):
            B, A = B_g[:, :r].clone().requires_grad_(), A_g[:r].clone().requires_grad_()
            sums = [torch.zeros_like(c_k[k][0]), torch.zeros_like(c_k[k][1])]
            for s in range(STEPS):
                g_B, g_A = torch.autograd.grad(loss(k, s, t, B, A, W), (B, A))
                sums[0] += g_B
                sums[1] += g_A
                with torch.no_grad():
                    B -= LR * (g_B + c_B[:, :r] - c_k[k][0])
                    A -= LR * (g_A + c_A[:r] - c_k[k][1])
            new = (sums[0] / STEPS, sums[1] / STEPS)
            deltas.append((new[0] - c_k[k][0], new[1] - c_k[k][1]))
            c_k[k] = new
            trained.append((B.detach(), A.detach()))
        for j in range(r_max):
            c_B[:, j] += sum(dB[:, j] for dB, _ in deltas if dB.shape[1] > j) / K[j]
            c_A[j] += sum(dA[j] for _, dA in deltas if dA.shape[0] > j) / K[j]
        p = [s / sum(SAMPLES) for s in SAMPLES]
        dW = sum(w * (B @ A) for w, (B, A) in zip(p, trained, strict=True))
        Q, R = torch.linalg.qr(dW)
        B_g, A_g = Q[:, :r_max], R[:r_max]
    return {"factors": (B_g, A_g), "c": (c_B, c_A)}, c_k


def test_control_variates_follow_an_independent_scaffold_for_mixed_ranks() -> None:
    W = randn(7, D, N)
    got, own, corrections = raflora_rounds(W, 3)
    want, c_k = scaffold_rounds(W, 3)
    per_round = len(RANKS) * STEPS
    assert max(corrections[:per_round]) == 0  # round 1: c = c_k = 0
    assert min(corrections[per_round:]) > 1e-3  # rounds 2-3: corrections actually act
    B, A = got["factors"]
    B_ref, A_ref = want["factors"]
    torch.testing.assert_close(B @ A, B_ref @ A_ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(got["c"], want["c"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for k in range(len(RANKS)):
        torch.testing.assert_close(own[k]["c.B/m"], c_k[k][0], rtol=1e-9, atol=1e-12)  # type: ignore[index]
        torch.testing.assert_close(own[k]["c.A/m"], c_k[k][1], rtol=1e-9, atol=1e-12)  # type: ignore[index]
