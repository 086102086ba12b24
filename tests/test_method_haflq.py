"""HAFLQ (docs/methods.md#haflq, the project's reading): per-component averaging over the clients
that trained each component against a dense reference written here, AdaLoRA's smoothed
sensitivity against a hand computation, importance-based freezing in real engine rounds, the
per-client state across rounds and a resume, and the truncation variant."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import raflora
from conftest import config_with, randn
from method_cases import SYNTHETIC, Case, assert_close, cases, first_module
from raflora.adapters import adapter_name, lora_parameters
from raflora.config import ConfigError, load_config
from raflora.engine import build_federation, load_checkpoint, run_local
from raflora.engine.client_round import train_client
from raflora.engine.server_round import complete_round, plan_round
from raflora.methods import ClientUpdate, GlobalState, get_aggregator
from raflora.methods.context import RoundContext
from raflora.methods.haflq import (
    HAFLQClientRound,
    component_scores,
    smooth_sensitivity,
    top_components,
)


# ------------------------------------------------------------------- the server rule
def ref_components(
    previous: tuple[Tensor, Tensor], trained: list[tuple[Tensor, Tensor, list[int], int]]
) -> tuple[Tensor, Tensor]:
    """Per component j: b_j = Σ_{k trained j} n_k b_{k,j} / Σ n_k (a_j alike); else kept.

    ``trained``: per client its factors at rank R (column j = component j), the components it
    trained and n_k.
    """
    B_g, A_g = (x.clone() for x in previous)
    for j in range(B_g.shape[1]):
        holders = [(B, A, n) for B, A, S, n in trained if j in S]
        if not holders:
            continue
        total = sum(n for _, _, n in holders)
        B_g[:, j] = sum(n * B[:, j] for B, _, n in holders) / total
        A_g[j, :] = sum(n * A[j, :] for _, A, n in holders) / total
    return B_g, A_g


def state_of(method: raflora.methods.Method, previous: tuple[Tensor, Tensor]) -> GlobalState:
    d, n = previous[0].shape[0], previous[1].shape[1]
    ctx = RoundContext(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = method.init_state(ctx, {"m": (d, n)})
    state.factors = {"m": previous}
    return state


@given(cases(), st.data())
def test_per_component_average_matches_the_dense_reference(case: Case, data: Any) -> None:
    R = case.r_max
    method = get_aggregator("haflq", case.levels)
    state = state_of(method, case.previous)
    updates, trained = [], []
    for k, (B, A, n) in enumerate(case.updates):
        # a client at rank R trains any r_k of the R components; the others come back as sent
        S = sorted(
            data.draw(st.sets(st.integers(0, R - 1), min_size=B.shape[1], max_size=B.shape[1]))
        )
        B_R, A_R = case.previous[0].clone(), case.previous[1].clone()
        B_R[:, S], A_R[S, :] = B, A
        mask = torch.zeros(R, dtype=torch.float64)
        mask[S] = 1
        updates.append(ClientUpdate(k, R, n, {"m": (B_R, A_R)}, extras={"mask/m": mask}))
        trained.append((B_R, A_R, S, n))
    out = method.aggregate(state, updates, ctx=RoundContext(1, dtype=torch.float64))
    assert out.accepted == tuple(range(len(updates)))
    B, A = out.state.factors["m"]
    B_ref, A_ref = ref_components(case.previous, trained)
    assert_close(B, B_ref)
    assert_close(A, A_ref)
    untouched = [j for j in range(R) if all(j not in S for _, _, S, _ in trained)]
    assert torch.equal(B[:, untouched], case.previous[0][:, untouched])  # kept, bit for bit
    assert torch.equal(A[untouched], case.previous[1][untouched])


@given(cases())
def test_a_bare_update_reads_as_its_first_r_k_components(case: Case) -> None:
    """The per-module API (``raflora.aggregate``): client k trained components 0 … r_k − 1."""
    B, A = raflora.aggregate("haflq", case.updates, rank_levels=case.levels, previous=case.previous)
    R = case.r_max
    trained = []
    for B_k, A_k, n in case.updates:
        r = B_k.shape[1]
        B_R, A_R = case.previous[0].clone(), case.previous[1].clone()
        B_R[:, :r], A_R[:r] = B_k, A_k
        trained.append((B_R, A_R, list(range(r)), n))
    B_ref, A_ref = ref_components(case.previous, trained)
    assert_close(B, B_ref)
    assert_close(A, A_ref)
    top = max(B_k.shape[1] for B_k, _, _ in case.updates)
    assert torch.equal(B[:, top:], case.previous[0][:, top:]) and top <= R


def test_a_component_nobody_updated_is_kept_and_one_client_sets_its_own() -> None:
    method = get_aggregator("haflq", [1, 2, 4])
    previous = (randn(1, 5, 4), randn(2, 4, 3))
    state = state_of(method, previous)
    B1, A1 = randn(3, 5, 4), randn(4, 4, 3)
    B2, A2 = randn(5, 5, 4), randn(6, 4, 3)
    masks = (torch.tensor([1.0, 1, 0, 0]), torch.tensor([0.0, 1, 0, 0]))
    updates = [
        ClientUpdate(0, 4, 30, {"m": (B1, A1)}, extras={"mask/m": masks[0].double()}),
        ClientUpdate(1, 4, 10, {"m": (B2, A2)}, extras={"mask/m": masks[1].double()}),
    ]
    B, A = method.aggregate(state, updates, ctx=RoundContext(1, dtype=torch.float64)).state.factors[
        "m"
    ]
    assert torch.equal(B[:, 2:], previous[0][:, 2:]) and torch.equal(A[2:], previous[1][2:])
    assert torch.equal(B[:, 0], B1[:, 0]) and torch.equal(A[0], A1[0])  # only client 0
    torch.testing.assert_close(B[:, 1], (30 * B1[:, 1] + 10 * B2[:, 1]) / 40, rtol=1e-12, atol=0)
    torch.testing.assert_close(A[1], (30 * A1[1] + 10 * A2[1]) / 40, rtol=1e-12, atol=0)
    # a mask that is not 0/1 is rejected, the round goes on without it
    bad = ClientUpdate(2, 4, 5, {"m": (B1, A1)}, extras={"mask/m": torch.full((4,), 0.5).double()})
    out = method.aggregate(state, [*updates, bad], ctx=RoundContext(1, dtype=torch.float64))
    assert out.accepted == (0, 1) and "0 or 1" in out.rejected[2]


# --------------------------------------------------------------- smoothed sensitivity
def test_smoothed_sensitivity_and_scores_by_hand() -> None:
    w, ipt, unc = torch.tensor([2.0, -1.0]), torch.zeros(2), torch.zeros(2)
    # step 1: I = |w g| = (1, 3); Ī = 0.5 I = (0.5, 1.5); Ū = 0.25 |I − Ī| = (0.125, 0.375)
    ipt, unc = smooth_sensitivity(w, torch.tensor([0.5, 3.0]), ipt, unc, 0.5, 0.75)
    assert ipt.tolist() == [0.5, 1.5] and unc.tolist() == [0.125, 0.375]
    # step 2: I = (4, 0); Ī = (0.25 + 2, 0.75) = (2.25, 0.75); Ū = 0.75 Ū + 0.25 |I − Ī|
    ipt, unc = smooth_sensitivity(w, torch.tensor([-2.0, 0.0]), ipt, unc, 0.5, 0.75)
    assert ipt.tolist() == [2.25, 0.75]
    assert unc.tolist() == [0.75 * 0.125 + 0.25 * 1.75, 0.75 * 0.375 + 0.25 * 0.75]
    # S_j = mean over b_j's entries of Ī Ū + mean over a_j's entries of Ī Ū
    ipt_B, unc_B = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.5]])
    ipt_A, unc_A = torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 6.0]]), torch.ones(2, 3)
    scores = component_scores(ipt_B, unc_B, ipt_A, unc_A)
    assert scores.tolist() == [(1 + 3) / 2 + 2.0, (2 + 2) / 2 + 2.0]
    assert top_components(torch.tensor([0.0, 3.0, 3.0, 1.0]), 2).tolist() == [1, 2]
    assert top_components(torch.zeros(4), 2).tolist() == [0, 1]  # ties: the lower index


def client_steps(
    received: Mapping[str, tuple[Tensor, Tensor]],
    steps: list[tuple[Tensor, Tensor]],
    budget: int,
    state: Mapping[str, Tensor] | None = None,
) -> tuple[HAFLQClientRound, Any, list[tuple[Tensor, Tensor]]]:
    """HAFLQ's client half driven by hand: live factors = received, the given raw gradients."""
    method = get_aggregator("haflq", [1, 2], beta1=0.5, beta2=0.5)
    ctx = RoundContext(1, client_ranks=(budget,)).for_client(0, 2)
    client = method.client_round(ctx, raflora.methods.ClientMessage(dict(received)), state)
    corrected = []
    for g_B, g_A in steps:
        assert client.penalty(received) is None
        g_B, g_A = g_B.clone(), g_A.clone()
        client.correct_gradients({"m": (g_B, g_A)})
        corrected.append((g_B, g_A))
    return client, client.finish(dict(received)), corrected  # type: ignore[return-value]


def test_the_client_measures_every_component_and_freezes_all_but_its_budget() -> None:
    B, A = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [-1.0]])  # d = n = 1, R = 2
    g = (torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0], [1.0]]))
    client, upload, corrected = client_steps({"m": (B, A)}, [g, g], budget=1)
    assert client.trained["m"].tolist() == [0]  # first round: the first n_k = 1
    for g_B, g_A in corrected:  # component 1 frozen: its gradients zeroed, component 0's kept
        assert g_B.tolist() == [[1.0, 0.0]] and g_A.tolist() == [[2.0], [0.0]]
    # by hand, β = 0.5: I_B = (1, 2), I_A = (2, 1) at both steps
    #   Ī = 0.5 I, then 0.75 I; Ū = 0.25 I, then 0.5·0.25 I + 0.5·0.25 I = 0.25 I
    state = upload.state
    assert state["ipt.B/m"].tolist() == [[0.75, 1.5]] and state["unc.B/m"].tolist() == [[0.25, 0.5]]
    assert state["ipt.A/m"].tolist() == [[1.5], [0.75]] and state["unc.A/m"].tolist() == [
        [0.5],
        [0.25],
    ]
    assert upload.extras["mask/m"].tolist() == [1.0, 0.0]
    # S = (0.75·0.25 + 1.5·0.5, 1.5·0.5 + 0.75·0.25): a tie, then component 1 pulls ahead
    g2 = (torch.tensor([[0.0, 4.0]]), torch.tensor([[0.0], [0.0]]))
    client2, _, _ = client_steps({"m": (B, A)}, [g2], budget=1, state=state)
    assert client2.trained["m"].tolist() == [0]  # chosen from the state it started with
    _, upload2, _ = client_steps({"m": (B, A)}, [g2], budget=1, state=state)
    client3, _, _ = client_steps({"m": (B, A)}, [], budget=1, state=upload2.state)
    assert client3.trained["m"].tolist() == [1]  # the state carried: now component 1


# --------------------------------------------------------------- real engine rounds
def test_engine_rounds_freeze_and_upload_frozen_components_as_received() -> None:
    cfg = config_with(SYNTHETIC, method="haflq", **{"train.weight_decay": 0.1})
    fed = build_federation(cfg)
    R = fed.aggregator.r_max
    state = fed.initial_state()
    for t in (1, 2, 3):
        plan = plan_round(fed, state, t)
        assert plan.ranks == [R] * len(plan.clients)  # everyone holds rank R
        results = []
        for client_id in plan.clients:
            message = fed.client_message(state, client_id, t)
            result = train_client(
                fed,
                client_id,
                R,
                message,
                state.dense,
                t,
                plan.lr,
                state=fed.client_states.get(client_id),
            )
            budget = fed.client_ranks[client_id]
            for name, (B, A) in result.update.factors.items():
                B_0, A_0 = message.factors[name]
                mask = result.update.extras[f"mask/{name}"].bool()
                assert int(mask.sum()) == budget
                # weight decay moved them locally; the upload is what was received, bit for bit
                assert torch.equal(B[:, ~mask], B_0[:, ~mask])
                assert torch.equal(A[~mask], A_0[~mask])
                assert not torch.equal(A[mask], A_0[mask])  # the trained ones trained
            results.append(result)
        done = complete_round(fed, state, plan, results, train_seconds=0.0)
        assert done.row["accepted"] == len(plan.clients)
        shapes = fed.bank.module_shapes()
        assert done.row["download_bytes"] == len(plan.clients) * (
            sum((d + n) * R * 4 for d, n in shapes.values())
            + sum(v.numel() * 4 for v in state.dense.values())
        )
        trained_up = sum(  # the budget's components, (d + n) each, and the mask (R)
            sum((fed.client_ranks[k] * (d + n) + R) * 4 for d, n in shapes.values())
            for k in plan.clients
        )
        head_up = len(plan.clients) * sum(v.numel() * 4 for v in state.dense.values())
        assert done.row["upload_bytes"] == trained_up + head_up
        for client_id in plan.clients:  # the per-client state is kept for the next round
            kept = fed.client_states.get(client_id)
            assert kept is not None and set(kept) == set(
                fed.aggregator.client_state_shapes(fed.context(t).for_client(client_id, R), state)
            )
        state = done.state


def test_the_sensitivity_reads_the_parameters_current_values() -> None:
    """``penalty(live)`` gets ``(s · lora_B, lora_A)`` as they are at that step."""
    fed = build_federation(config_with(SYNTHETIC, method="haflq", **{"lora.alpha": 2.0}))
    method = fed.aggregator
    R = method.r_max
    matches: list[bool] = []
    steps: list[Tensor] = []

    class Spy(HAFLQClientRound):
        def penalty(self, live: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor | None:
            params = lora_parameters(fed.bank.model, adapter_name(R))
            for name, (B, A) in live.items():
                B_p, A_p = params[name]
                matches.append(torch.equal(A, A_p) and torch.allclose(B, B_p * (2.0 / R)))
            steps.append(first_module(dict(live))[0].detach().clone())
            return super().penalty(live)

    method.ClientRoundType = Spy  # type: ignore[misc]
    state = fed.initial_state()
    message = fed.client_message(state, 0, 1)
    result = train_client(fed, 0, R, message, state.dense, 1, 1e-2)
    assert result.steps == len(steps) > 1 and matches and all(matches)
    assert torch.equal(steps[0], first_module(message.factors)[0])  # step 1: what was sent
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(steps))  # moving


def test_killed_and_resumed_truncation_run_is_bit_identical(tmp_path: Path) -> None:
    over: dict[str, Any] = {"fl.rounds": 4, "method_options": {"truncate": True}}
    cfg = config_with(SYNTHETIC, method="haflq", **over)
    full = run_local(cfg, tmp_path / "full", progress=False)

    class StopRunError(Exception):
        pass

    def stop(row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise StopRunError

    with pytest.raises(StopRunError):
        run_local(cfg, tmp_path / "cut", progress=False, on_round=stop)
    resumed = run_local(cfg, tmp_path / "cut", resume=True, progress=False)
    timeless = [
        [{k: v for k, v in r.items() if k != "time"} for r in m]
        for m in (resumed.metrics, full.metrics)
    ]
    assert timeless[0] == timeless[1]
    a, b = load_checkpoint(tmp_path / "full").state, load_checkpoint(tmp_path / "cut").state
    for name, (B, A) in a.factors.items():
        assert torch.equal(B, b.factors[name][0]) and torch.equal(A, b.factors[name][1])
    for name, imp in a.extras["importance"].items():
        assert torch.equal(imp, b.extras["importance"][name]) and bool(imp.any())
    # truncation: a rank-r_k client trains at r_k
    assert all(r in (2, 4, 8) for row in full.metrics for r in row["client_ranks"])


def test_truncation_sends_the_top_components_and_scatters_them_back() -> None:
    method = get_aggregator("haflq", [1, 2, 4], truncate=True)
    previous = (randn(1, 5, 4), randn(2, 4, 3))
    state = state_of(method, previous)
    state.extras["importance"]["m"] = torch.tensor([0.1, 0.9, 0.0, 0.5], dtype=torch.float64)
    ctx = RoundContext(1, dtype=torch.float64)
    message = method.client_message(ctx.for_client(0, 2), state)
    assert message.extras["index/m"].tolist() == [1.0, 3.0]
    B_s, A_s = message.factors["m"]
    assert torch.equal(B_s, previous[0][:, [1, 3]]) and torch.equal(A_s, previous[1][[1, 3]])
    B_k, A_k = randn(3, 5, 2), randn(4, 2, 3)
    B_j, A_j = randn(5, 5, 1), randn(6, 1, 3)  # rank 1: component 1
    up = [
        ClientUpdate(
            0, 2, 30, {"m": (B_k, A_k)}, extras={"score/m": torch.tensor([2.0, 4.0]).double()}
        ),
        ClientUpdate(1, 1, 10, {"m": (B_j, A_j)}, extras={"score/m": torch.tensor([6.0]).double()}),
    ]
    out = method.aggregate(state, up, ctx=ctx).state
    B, A = out.factors["m"]
    ref = ref_components(
        previous,
        [
            (
                torch.zeros(5, 4).double().index_copy(1, torch.tensor([1, 3]), B_k),
                torch.zeros(4, 3).double().index_copy(0, torch.tensor([1, 3]), A_k),
                [1, 3],
                30,
            ),
            (
                torch.zeros(5, 4).double().index_copy(1, torch.tensor([1]), B_j),
                torch.zeros(4, 3).double().index_copy(0, torch.tensor([1]), A_j),
                [1],
                10,
            ),
        ],
    )
    assert_close(B, ref[0])
    assert_close(A, ref[1])
    assert out.extras["importance"]["m"].tolist() == [0.1, (30 * 2 + 10 * 6) / 40, 0.0, 4.0]
    # per-level evaluation: level r holds the top-r components (now component 3, score 4)
    B_l, A_l = method.level_factors(ctx.at_rank(1), out)["m"]
    torch.testing.assert_close(B_l @ A_l, B[:, [3]] @ A[[3]])


def test_every_level_holds_the_whole_adapter_without_truncation() -> None:
    fed = build_federation(config_with(SYNTHETIC, method="haflq"))
    state = fed.initial_state()
    for rank in fed.aggregator.rank_levels:
        level = fed.aggregator.level_factors(fed.context(1).at_rank(rank), state)
        assert all(torch.equal(level[k][0], B) for k, (B, _) in state.factors.items())
    B, _ = first_module(state.factors)
    assert B.shape[1] == fed.aggregator.r_max


@pytest.mark.parametrize("truncate", [False, True])
def test_privacy_is_refused_with_the_reason(truncate: bool) -> None:
    overrides = [
        "method=haflq",
        "privacy.enabled=true",
        "privacy.noise_multiplier=1.0",
        f"method_options.haflq.truncate={str(truncate).lower()}",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    lines = [p for p in info.value.problems if p.startswith("privacy:")]
    assert len(lines) == 1 and "data-dependent" in lines[0], info.value.problems
    assert ("scores" in lines[0]) is truncate


def test_truncation_on_flower_equals_the_local_engine_bit_for_bit(tmp_path: Path) -> None:
    """The variant whose messages carry indices and whose uploads carry scores (the default is
    in test_flower's every-method test)."""
    pytest.importorskip("flwr")
    from raflora.flower import run_flower
    from test_flower import assert_same_client_states, tiny

    threads = torch.get_num_threads()
    try:
        config = tiny("haflq", "threads=1", "method_options.haflq.truncate=true")
        local = run_local(config, tmp_path / "local", progress=False)
        flower = run_flower(config, tmp_path / "flower", progress=False)
    finally:
        torch.set_num_threads(threads)
    skip = {"time", "transport_bytes"}
    rows = [
        [{k: v for k, v in r.items() if k not in skip} for r in m]
        for m in (local.metrics, flower.metrics)
    ]
    assert rows[0] == rows[1]
    a, b = load_checkpoint(local.run_dir).state, load_checkpoint(flower.run_dir).state
    for name, (B, A) in a.factors.items():
        assert torch.equal(b.factors[name][0], B) and torch.equal(b.factors[name][1], A)
    for name, imp in a.extras["importance"].items():
        assert torch.equal(b.extras["importance"][name], imp)
    assert_same_client_states(local.run_dir, flower.run_dir)
