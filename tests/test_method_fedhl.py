"""FedHL (docs/methods.md#fedhl): the untruncated global update as the basis,
``W_{t+1} = W_t + Σ p_i (B_i A_i − W_t^{r_i})``, against a dense reference written here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from conftest import config_with, dense_svd, randn
from method_cases import SYNTHETIC, engine_rounds, first_module
from raflora.adapters import adapter_name, base_weights
from raflora.engine import adapter_factors, build_federation, load_checkpoint, run_local
from raflora.methods import ClientUpdate, GlobalState, get_aggregator
from raflora.methods.context import RoundContext
from raflora.methods.fedhl import FedHL, FedHLOptions, fedhl_weights

WEIGHTS = ("samples", "truncation", "relative")


# ----------------------------------------------------------------------------- dense reference
def ref_truncate(W: Tensor, r: int) -> Tensor:
    """``W^{r}``: the best rank-``r`` approximation, by a dense SVD."""
    U, S, Vh = dense_svd(W)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def ref_weights(
    W: Tensor, ranks: list[int], samples: list[int], weights: str, eps: float, cap: float
) -> list[float]:
    """The weights of docs/methods.md#fedhl from the dense ``W_t`` (one module)."""
    if weights == "samples":
        return [s / sum(samples) for s in samples]
    total = float(W.norm() ** 2)
    err = [float((W - ref_truncate(W, r)).norm() ** 2) for r in ranks]
    x = err if weights == "truncation" else [e / total if total > 0 else 0.0 for e in err]
    w = [1 / (v**2 + eps) for v in x]
    w = [min(v, cap * min(w)) for v in w]
    return [v / sum(w) for v in w]


def ref_round(
    W: Tensor, ups: list[tuple[Tensor, Tensor, int]], weights: str, eps: float, cap: float
) -> Tensor:
    """``W + Σ p_i (B_i A_i − W^{r_i})``."""
    ranks = [B.shape[1] for B, _, _ in ups]
    p = ref_weights(W, ranks, [n for _, _, n in ups], weights, eps, cap)
    return W + sum(
        w * (B.double() @ A.double() - ref_truncate(W, B.shape[1]))
        for w, (B, A, _) in zip(p, ups, strict=True)
    )


# ----------------------------------------------------------------------------- helpers
def start(method: FedHL, d: int, n: int) -> GlobalState:
    ctx = RoundContext(generator=torch.Generator().manual_seed(0))
    return method.init_state(ctx, {"m": (d, n)})


def sent(method: FedHL, state: GlobalState, rank: int) -> tuple[Tensor, Tensor]:
    msg = method.client_message(RoundContext(state.round + 1, client_id=0, rank=rank), state)
    return msg.factors["m"]


def step(method: FedHL, state: GlobalState, ups: list[tuple[Tensor, Tensor, int]]) -> GlobalState:
    updates = [
        ClientUpdate(i, int(B.shape[1]), n, {"m": (B.float(), A.float())})
        for i, (B, A, n) in enumerate(ups)
    ]
    out = method.aggregate(state, updates)
    assert len(out.accepted) == len(ups), out.rejected
    return out.state


def merged(state: GlobalState) -> Tensor:
    """What the engine evaluates on top of ``W_0``: merged residuals plus the global factors."""
    B, A = state.factors["m"]
    delta = state.base_delta.get("m")
    W = B.double() @ A.double()
    return W if delta is None else W + delta.double()


def assert_rel(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    scale = max(float(a.norm()), float(b.norm()), 1e-6)
    assert float((a - b).norm()) <= tol * scale, float((a - b).norm()) / scale


@st.composite
def rounds(draw: st.DrawFn) -> dict[str, Any]:
    levels = sorted(draw(st.sets(st.integers(1, 6), min_size=1, max_size=3)))
    d, n = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    plan = [
        draw(st.lists(st.sampled_from(levels), min_size=1, max_size=4))
        for _ in range(draw(st.integers(1, 3)))
    ]
    return {
        "levels": levels,
        "d": d,
        "n": n,
        "plan": plan,
        "samples": draw(st.lists(st.integers(1, 500), min_size=4, max_size=4)),
        "weights": draw(st.sampled_from(WEIGHTS)),
        "factored_below": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "seed": draw(st.integers(0, 2**20)),
    }


def random_updates(case: dict[str, Any], t: int, ranks: list[int]) -> list[Any]:
    seed, d, n = case["seed"] + 100 * t, case["d"], case["n"]
    return [
        (0.5 * randn(seed + 2 * i, d, r), randn(seed + 2 * i + 1, r, n), case["samples"][i])
        for i, r in enumerate(ranks)
    ]


# ----------------------------------------------------------------------------- the rule
@given(rounds())
def test_fedhl_matches_the_dense_reference_over_rounds(case: dict[str, Any]) -> None:
    opts = FedHLOptions(weights=case["weights"], factored_below=case["factored_below"])
    method = FedHL(case["levels"], opts)
    state = start(method, case["d"], case["n"])
    W = torch.zeros(case["d"], case["n"], dtype=torch.float64)
    for t, ranks in enumerate(case["plan"]):
        for r in set(ranks):  # a client of rank r starts from W_t^{r} (FlexLoRA's split)
            B, A = sent(method, state, r)
            assert B.shape == (case["d"], r) and A.shape == (r, case["n"])
            assert_rel(B.double() @ A.double(), ref_truncate(W, r))
        ups = random_updates(case, t, ranks)
        W = ref_round(W, ups, opts.weights, opts.epsilon, opts.weight_cap)
        state = step(method, state, ups)
        assert_rel(method.global_update(state)["m"], W)
        assert_rel(merged(state), W)  # the model evaluated is W_0 + W_t


@given(rounds(), st.sampled_from(WEIGHTS))
def test_equal_client_changes_move_the_global_update_by_exactly_that_change(
    case: dict[str, Any], weights: str
) -> None:
    """The "unbiased" claim: whatever the ranks, if every client's B_i A_i is its start plus the
    same D, then W_{t+1} − W_t = D."""
    method = FedHL(case["levels"], FedHLOptions(weights=weights))
    state = start(method, case["d"], case["n"])
    for t, ranks in enumerate(case["plan"][:-1]):  # a few random rounds: W_t with a tail
        state = step(method, state, random_updates(case, t, ranks))
    ranks = case["plan"][-1]
    low = min(ranks)
    G = 0.3 * randn(case["seed"] + 7, case["d"], low)
    H = 0.3 * randn(case["seed"] + 8, low, case["n"])
    ups = []
    for i, r in enumerate(ranks):
        B_s, A_s = (x.double() for x in sent(method, state, r))
        B_i, A_i = B_s.clone(), A_s.clone()
        B_i[:, :low] += G  # B_i A_i = B_s A_s + G A_s[:low] + B_s[:, :low] H + G H
        A_i[:low] += H
        ups.append((B_i, A_i, case["samples"][i]))
    B_g, A_g = (x.double() for x in state.factors["m"])
    D = G @ A_g[:low] + B_g[:, :low] @ H + G @ H  # the same for every rank ≥ low
    before, model_before = method.global_update(state)["m"], merged(state)
    after = step(method, state, ups)
    change = method.global_update(after)["m"] - before
    assert_rel(change, D, 1e-4)
    assert_rel(merged(after) - model_before, D, 1e-4)


def test_factored_and_dense_w_t_agree_and_the_switch_happens() -> None:
    levels, d, n = [2, 4], 30, 24
    ranks_per_round = [[2, 4], [4, 2, 2], [4, 4]]
    states: dict[float, GlobalState] = {}
    ranks_seen: dict[float, list[list[str]]] = {}
    for below in (0.0, 0.5, 1.0):
        method = FedHL(levels, FedHLOptions(factored_below=below))
        state = start(method, d, n)
        seen = []
        for t, ranks in enumerate(ranks_per_round):
            ups = [
                (0.5 * randn(10 * t + 2 * i, d, r), randn(10 * t + 2 * i + 1, r, n), 50 + i)
                for i, r in enumerate(ranks)
            ]
            state = step(method, state, ups)
            seen.append(list(state.extras["dense"]))
        states[below], ranks_seen[below] = state, seen
    assert ranks_seen[0.0] == [["m"]] * 3  # always dense
    # W_t's rank: 6 after round 1; then each client adds its r_i new directions and the
    # directions every client's rank covers are replaced (Σ p_i = 1): 6 − 2 + 8 = 12, 12 − 4 + 8
    assert ranks_seen[0.5] == [[], ["m"], ["m"]]  # 12 ≥ 24 / 2: dense from round 2 on
    assert ranks_seen[1.0] == [[], [], []]  # 16 < 24: still factored
    method = FedHL(levels)
    ref = method.global_update(states[0.0])["m"]
    for below in (0.5, 1.0):
        assert_rel(method.global_update(states[below])["m"], ref)
        assert_rel(merged(states[below]), ref)


def test_weights_truncation_relative_and_cap() -> None:
    opts = FedHLOptions(weights="truncation", epsilon=1e-2, weight_cap=1e9)
    p = fedhl_weights([1, 1], [0.1, 0.2], 1.0, opts)
    w = [1 / (0.01 + 1e-2), 1 / (0.04 + 1e-2)]
    assert p == pytest.approx([w[0] / sum(w), w[1] / sum(w)])
    # relative: the same errors on a W_t ten times larger give the same weights at any scale
    rel = FedHLOptions(weights="relative", epsilon=1e-2, weight_cap=1e9)
    assert fedhl_weights([1, 1], [1.0, 2.0], 10.0, rel) == pytest.approx(
        fedhl_weights([1, 1], [100.0, 200.0], 1000.0, rel)
    )
    assert fedhl_weights([1, 1], [1.0, 2.0], 10.0, opts) != pytest.approx(
        fedhl_weights([1, 1], [100.0, 200.0], 1000.0, opts)
    )
    # a client whose rank covers W_t (ê = 0) gets 1/ε; the cap bounds it at cap × the smallest
    capped = fedhl_weights([1, 1], [0.0, 1.0], 1.0, FedHLOptions(weights="relative", weight_cap=4))
    assert capped == pytest.approx([0.8, 0.2])
    # samples: p_i = n_i / Σ n_j whatever the errors
    assert fedhl_weights([1, 3], [5.0, 0.0], 5.0, FedHLOptions()) == pytest.approx([0.25, 0.75])
    # W_t = 0 (round 1): every error weight is equal
    assert fedhl_weights([1, 9], [0.0, 0.0], 0.0, rel) == pytest.approx([0.5, 0.5])


def test_standalone_aggregate_treats_previous_as_w_t() -> None:
    """raflora.aggregate_round: W_t = B_prev A_prev, the clients were sent its nested split."""
    import raflora

    levels, d, n = [2, 4], 7, 6
    prev = (0.5 * randn(1, d, 4), randn(2, 4, n))
    W = prev[0] @ prev[1]
    ups = [(randn(3, d, 2), randn(4, 2, n), 10), (randn(5, d, 4), randn(6, 4, n), 30)]
    out = raflora.aggregate_round(
        "fedhl",
        [(B.float(), A.float(), k) for B, A, k in ups],
        rank_levels=levels,
        previous=tuple(x.float() for x in prev),  # type: ignore[arg-type]
    )
    assert out.residual is not None
    total = out.B.double() @ out.A.double() + out.residual[0].double() @ out.residual[1].double()
    p = [0.25, 0.75]
    B_p, A_p = prev
    expected = W + sum(
        w * (B @ A - B_p[:, : B.shape[1]] @ A_p[: B.shape[1]])
        for w, (B, A, _) in zip(p, ups, strict=True)
    )
    assert_rel(total, expected)
    # the global factors are W_{t+1}'s best rank-4 part, split evenly (‖B col‖ = ‖A row‖)
    assert_rel(out.B.double() @ out.A.double(), ref_truncate(expected, 4))
    torch.testing.assert_close(out.B.norm(dim=0), out.A.norm(dim=1), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the engine
def test_engine_rounds_add_each_clients_change_to_the_merged_model() -> None:
    steps = engine_rounds("fedhl", 3)
    fed = steps[0].fed
    method = fed.aggregator
    assert isinstance(method, FedHL)
    name = sorted(steps[0].before.factors)[0]
    for s in steps:
        # every client was sent the nested truncation of the split global factors
        B_g, A_g = s.before.factors[name]
        for r in s.results:
            B_s, A_s = s.received[r.update.client_id]
            assert torch.equal(B_s, B_g[:, : r.update.rank]) and torch.equal(
                A_s, A_g[: r.update.rank]
            )
        p = [r.update.num_samples for r in s.results]
        p = [x / sum(p) for x in p]
        change = sum(
            w
            * (
                r.update.factors[name][0].double() @ r.update.factors[name][1].double()
                - B_g[:, : r.update.rank].double() @ A_g[: r.update.rank].double()
            )
            for w, r in zip(p, s.results, strict=True)
        )
        before = method.global_update(s.before)[name]
        after = method.global_update(s.outcome.state)[name]
        assert_rel(after - before, change, 1e-4)  # type: ignore[arg-type]
    # the base weights moved by the merged residuals: base + factors = W_0 + W_t
    state = steps[-1].outcome.state
    W_now = base_weights(fed.bank.model, adapter_name(method.r_max))
    W_start = base_weights(build_federation(fed.config).bank.model, adapter_name(method.r_max))
    for k, W_t in method.global_update(state).items():
        B, A = state.factors[k]
        model = (W_now[k] - W_start[k]).double() + B.double() @ A.double()
        assert_rel(model, W_t, 1e-4)
    assert first_module(state.factors)[0].shape[1] == method.r_max


def test_traffic_counts_the_residual_the_merged_base_needs() -> None:
    first, second = engine_rounds("fedhl", 2)
    shapes = list(second.before.module_shapes.values())
    rank = 2 * sum(r.update.rank for r in first.results) + 2 * first.fed.aggregator.r_max
    ctx = RoundContext(rank=4)
    assert first.fed.aggregator.download_numel(ctx, first.before) == sum(
        (d + n) * 4 for d, n in shapes
    )
    assert first.fed.aggregator.download_numel(ctx, second.before) == sum(
        (d + n) * (4 + rank) for d, n in shapes
    )


def test_export_is_w_t_and_truncated_exports_state_their_error(tmp_path: Path) -> None:
    cfg = config_with(SYNTHETIC, method="fedhl", **{"fl.rounds": 3})
    run_local(cfg, tmp_path, progress=False)
    state = load_checkpoint(tmp_path).state
    method = get_aggregator("fedhl", cfg.fl.rank_levels)
    assert isinstance(method, FedHL)
    W = method.global_update(state)
    factors, rank, kept = adapter_factors(method, state)
    assert kept == pytest.approx(1.0)
    for k, (B, A) in factors.items():
        assert_rel(B.double() @ A.double(), W[k], 1e-4)
    r = 3
    factors, rank, kept = adapter_factors(method, state, r)
    assert rank == r
    total = sum(float(w.norm() ** 2) for w in W.values())
    best = sum(float(dense_svd(w)[1][:r].square().sum()) for w in W.values())
    assert kept == pytest.approx(best / total, rel=1e-4)
    for k, (B, A) in factors.items():
        assert_rel(B.double() @ A.double(), ref_truncate(W[k], r), 1e-4)
    assert math.isfinite(kept)


def test_privacy_is_refused_with_the_reason() -> None:
    reason = FedHL([2, 4]).privacy_refusal()
    assert reason is not None and "fedhl" in reason and "W_t" in reason
