"""Every aggregator against a dense implementation of its formula, in float64
(docs/methods.md#aggregation-rules)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import raflora
from conftest import assert_best_rank, randn
from raflora.methods import (
    ClientUpdate,
    GlobalState,
    HetLoRA,
    available_methods,
    get_aggregator,
    partition_weights,
)
from raflora.methods.context import RoundContext

Update = tuple[Tensor, Tensor, int]
METHODS = ("fedit", "hetlora", "flora", "flexlora", "raflora")


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Round:
    """One module's round: configured levels, client updates and the previous global factors."""

    levels: tuple[int, ...]
    updates: list[Update]
    previous: tuple[Tensor, Tensor]

    @property
    def r_max(self) -> int:
        return self.levels[-1]


def make_updates(seed: int, d: int, n: int, ranks: list[int], samples: list[int]) -> list[Update]:
    return [
        (randn(seed + 2 * i, d, r), randn(seed + 2 * i + 1, r, n), s)
        for i, (r, s) in enumerate(zip(ranks, samples, strict=True))
    ]


@st.composite
def rounds(draw: st.DrawFn, single_level: bool = False, equal_ranks: bool = False) -> Round:
    size = 1 if single_level else draw(st.integers(1, 4))
    levels = tuple(sorted(draw(st.sets(st.integers(1, 8), min_size=size, max_size=size))))
    d, n, clients = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
    if equal_ranks:
        ranks = [draw(st.sampled_from(levels))] * clients
    else:
        ranks = draw(st.lists(st.sampled_from(levels), min_size=clients, max_size=clients))
    samples = draw(st.lists(st.integers(1, 1000), min_size=clients, max_size=clients))
    seed = draw(st.integers(0, 2**30))
    previous = (randn(seed - 1, d, levels[-1]), randn(seed - 2, levels[-1], n))
    return Round(levels, make_updates(seed, d, n, ranks, samples), previous)


# ------------------------------------------------------------------- dense references
def p_k(updates: list[Update]) -> Tensor:
    n = torch.tensor([float(s) for _, _, s in updates], dtype=torch.float64)
    return n / n.sum()


def dense_delta(updates: list[Update], weights: Tensor) -> Tensor:
    """``Σ_k w_k B_k A_k`` formed densely."""
    return sum(w * (B @ A) for w, (B, A, _) in zip(weights.tolist(), updates, strict=True))


def pad_cols(B: Tensor, r: int) -> Tensor:
    return torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)


def ref_hetlora(updates: list[Update], r_max: int, weighting: str) -> tuple[Tensor, Tensor]:
    norms = torch.stack([torch.linalg.matrix_norm(B @ A) for B, A, _ in updates])
    use_samples = weighting == "samples" or float(norms.sum()) == 0.0  # zero: fall back to p_k
    w = p_k(updates) if use_samples else norms / norms.sum()
    B = sum(wk * pad_cols(B, r_max) for wk, (B, _, _) in zip(w.tolist(), updates, strict=True))
    A = sum(wk * pad_cols(A.T, r_max).T for wk, (_, A, _) in zip(w.tolist(), updates, strict=True))
    return B, A


def ref_raflora_delta(
    updates: list[Update],
    levels: tuple[int, ...],
    previous: tuple[Tensor, Tensor] | None,
    mode: str,
) -> Tensor:
    """Algorithm 1 / Eq. 8 densely: ``Σ_h Σ_{k∈C_h} (n_k/N_h) B_k[:, l:h] A_k[l:h, :]``."""
    d, n = updates[0][0].shape[0], updates[0][1].shape[1]
    total = torch.zeros(d, n, dtype=torch.float64)
    low = 0
    for h in levels:
        members = [(B, A, s) for B, A, s in updates if B.shape[1] >= h]
        N_h = sum(s for _, _, s in members)
        for B, A, s in members:
            total += (s / N_h) * (B[:, low:h] @ A[low:h, :])
        if not members and mode == "carry" and previous is not None:
            total += previous[0][:, low:h] @ previous[1][low:h, :]
        low = h
    return total


def assert_svd_factor_layout(B: Tensor, A: Tensor, r_max: int) -> None:
    """``B_g = [σ_i u_i]`` (orthogonal columns), ``A_g`` rows orthonormal
    (docs/methods.md#global-state-and-broadcast)."""
    assert B.shape[1] == r_max and A.shape[0] == r_max
    rows = min(r_max, A.shape[1])
    eye = torch.eye(rows, dtype=A.dtype)
    torch.testing.assert_close(A[:rows] @ A[:rows].T, eye, rtol=0, atol=1e-10)
    gram = B.T @ B
    off = gram - torch.diag(torch.diagonal(gram))
    assert float(off.abs().max()) <= 1e-10 * max(float(gram.abs().max()), 1e-300)


# -------------------------------------------------------------------------- fedit
@given(rounds(single_level=True, equal_ranks=True))
def test_fedit_is_factorwise_fedavg(rnd: Round) -> None:
    B, A = raflora.aggregate("fedit", rnd.updates, rank_levels=rnd.levels)
    p = p_k(rnd.updates).tolist()
    expected_B = sum(w * B_k for w, (B_k, _, _) in zip(p, rnd.updates, strict=True))
    expected_A = sum(w * A_k for w, (_, A_k, _) in zip(p, rnd.updates, strict=True))
    torch.testing.assert_close(B, expected_B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A, expected_A, rtol=1e-12, atol=1e-12)


def test_fedit_refuses_mixed_ranks_naming_hetlora() -> None:
    updates = make_updates(0, 5, 4, [2, 4], [3, 5])
    with pytest.raises(ValueError, match="hetlora"):
        raflora.aggregate("fedit", updates, rank_levels=[4])


def test_fedit_refuses_several_rank_levels_naming_hetlora() -> None:
    with pytest.raises(ValueError, match="hetlora"):
        get_aggregator("fedit", [2, 4])


# ------------------------------------------------------------------------ hetlora
@given(rounds())
def test_hetlora_sample_weighting_zero_pads(rnd: Round) -> None:
    B, A = raflora.aggregate("hetlora", rnd.updates, rank_levels=rnd.levels, weighting="samples")
    exp_B, exp_A = ref_hetlora(rnd.updates, rnd.r_max, "samples")
    torch.testing.assert_close(B, exp_B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A, exp_A, rtol=1e-12, atol=1e-12)


@given(rounds())
def test_hetlora_default_is_sparsity_weighted(rnd: Round) -> None:
    B, A = raflora.aggregate("hetlora", rnd.updates, rank_levels=rnd.levels)
    exp_B, exp_A = ref_hetlora(rnd.updates, rnd.r_max, "sparsity")
    torch.testing.assert_close(B, exp_B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A, exp_A, rtol=1e-10, atol=1e-12)


def test_hetlora_sparsity_weights_differ_from_sample_weights() -> None:
    """Guard: the two weightings really differ on ordinary inputs (the tests above can fail)."""
    updates = make_updates(3, 6, 5, [2, 4, 4], [10, 10, 10])
    B_s, _ = raflora.aggregate("hetlora", updates, rank_levels=[2, 4], weighting="samples")
    B_w, _ = raflora.aggregate("hetlora", updates, rank_levels=[2, 4])
    assert not torch.allclose(B_s, B_w)


def test_hetlora_zero_updates_fall_back_to_sample_weights() -> None:
    """``B_k = 0`` (round 1 from the init): every ‖B_k A_k‖ is 0, so ``w_k = p_k``."""
    ranks_samples = [(2, 10), (4, 30), (4, 60)]
    zero = torch.zeros(5, 4, dtype=torch.float64)
    updates = [(zero[:, :r], randn(i, r, 4), s) for i, (r, s) in enumerate(ranks_samples)]
    B, A = raflora.aggregate("hetlora", updates, rank_levels=[2, 4])
    assert bool((B == 0).all())
    expected_A = 0.1 * pad_cols(updates[0][1].T, 4).T + 0.3 * updates[1][1] + 0.6 * updates[2][1]
    torch.testing.assert_close(A, expected_A, rtol=1e-12, atol=1e-12)


def test_hetlora_zero_update_gets_zero_weight_among_nonzero() -> None:
    updates = make_updates(5, 5, 4, [2, 4], [10, 90])
    updates.append((torch.zeros(5, 4, dtype=torch.float64), randn(99, 4, 4), 500))
    _, A = raflora.aggregate("hetlora", updates, rank_levels=[2, 4])
    _, A_without = raflora.aggregate("hetlora", updates[:2], rank_levels=[2, 4])
    torch.testing.assert_close(A, A_without, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------- flora
@given(rounds())
def test_flora_stack_is_exact_weighted_sum(rnd: Round) -> None:
    B_s, A_s = raflora.aggregate("flora", rnd.updates, rank_levels=rnd.levels)
    total = sum(B.shape[1] for B, _, _ in rnd.updates)
    d, n = rnd.updates[0][0].shape[0], rnd.updates[0][1].shape[1]
    assert B_s.shape == (d, total) and A_s.shape == (total, n)
    torch.testing.assert_close(B_s, torch.cat([B for B, _, _ in rnd.updates], dim=1))
    expected = dense_delta(rnd.updates, p_k(rnd.updates))
    torch.testing.assert_close(B_s @ A_s, expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------- flexlora
@given(rounds())
def test_flexlora_is_best_rank_rmax_of_weighted_sum(rnd: Round) -> None:
    B, A = raflora.aggregate("flexlora", rnd.updates, rank_levels=rnd.levels)
    assert_svd_factor_layout(B, A, rnd.r_max)
    assert_best_rank(B @ A, dense_delta(rnd.updates, p_k(rnd.updates)), rnd.r_max, rtol=1e-10)


# ------------------------------------------------------------------------ raflora
@given(rounds(), st.sampled_from(["carry", "drop"]))
def test_raflora_matches_dense_algorithm_1(rnd: Round, mode: str) -> None:
    B, A = raflora.aggregate(
        "raflora", rnd.updates, rank_levels=rnd.levels, previous=rnd.previous, empty_partition=mode
    )
    assert_svd_factor_layout(B, A, rnd.r_max)
    expected = ref_raflora_delta(rnd.updates, rnd.levels, rnd.previous, mode)
    assert_best_rank(B @ A, expected, rnd.r_max, rtol=1e-10)


def test_raflora_carry_and_drop_differ_on_an_empty_partition() -> None:
    """Only rank-2 clients with levels (2, 4): partition (2, 4] is empty."""
    updates = make_updates(7, 6, 5, [2, 2], [4, 6])
    previous = (randn(1, 6, 4), randn(2, 4, 5))
    carry = raflora.aggregate("raflora", updates, rank_levels=[2, 4], previous=previous)
    drop = raflora.aggregate(
        "raflora", updates, rank_levels=[2, 4], previous=previous, empty_partition="drop"
    )
    slice_2_4 = previous[0][:, 2:4] @ previous[1][2:4]
    base = dense_delta(updates, p_k(updates))
    assert_best_rank(carry[0] @ carry[1], base + slice_2_4, 4, rtol=1e-10)
    assert_best_rank(drop[0] @ drop[1], base, 4, rtol=1e-10)


def test_raflora_partition_weights_differ_from_flexlora() -> None:
    """Guard: with mixed ranks raFLoRA really reweights the upper partitions."""
    updates = make_updates(11, 8, 8, [2, 4, 4], [50, 30, 20])
    B_r, A_r = raflora.aggregate("raflora", updates, rank_levels=[2, 4])
    B_f, A_f = raflora.aggregate("flexlora", updates, rank_levels=[2, 4])
    assert not torch.allclose(B_r @ A_r, B_f @ A_f)


@pytest.mark.parametrize(
    ("ranks", "mode", "kept"),
    [
        ([2, 4, 6, 6], "carry", 6),
        ([2, 4, 6, 6], "drop", 6),
        ([2, 2, 4], "carry", 6),  # partition (4, 6] empty: carried from the previous state
        ([2, 2, 4], "drop", 4),  # … or dropped
    ],
)
def test_raflora_keeps_a_broadcast_fed_back_unchanged(
    ranks: list[int], mode: str, kept: int
) -> None:
    """docs/methods.md#theory with β = 1: every energy stays (repeated singular values, as in the
    theory)."""
    U, _ = torch.linalg.qr(randn(0, 10, 6))
    V, _ = torch.linalg.qr(randn(1, 8, 6))
    sigma = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.1], dtype=torch.float64)
    B_g, A_g = U * sigma, V.T
    updates = [(B_g[:, :r], A_g[:r], 10 + i) for i, r in enumerate(ranks)]
    B, A = raflora.aggregate(
        "raflora", updates, rank_levels=[2, 4, 6], previous=(B_g, A_g), empty_partition=mode
    )
    torch.testing.assert_close(B @ A, B_g[:, :kept] @ A_g[:kept], rtol=0, atol=1e-12)
    flex_B, flex_A = raflora.aggregate("flexlora", updates, rank_levels=[2, 4, 6])
    flex_energy = torch.linalg.svdvals(flex_B @ flex_A) ** 2
    assert float(flex_energy[2:].sum()) < float((sigma[2:] ** 2).sum()) - 1e-3  # FlexLoRA decays


@given(rounds(equal_ranks=True))
def test_raflora_equals_flexlora_for_equal_ranks(rnd: Round) -> None:
    flex = raflora.aggregate("flexlora", rnd.updates, rank_levels=rnd.levels)
    drop = raflora.aggregate("raflora", rnd.updates, rank_levels=rnd.levels, empty_partition="drop")
    assert_best_rank(drop[0] @ drop[1], flex[0] @ flex[1], rnd.r_max, rtol=1e-10)
    if rnd.updates[0][0].shape[1] == rnd.r_max:  # no empty partition: carry changes nothing
        carry = raflora.aggregate(
            "raflora", rnd.updates, rank_levels=rnd.levels, previous=rnd.previous
        )
        assert_best_rank(carry[0] @ carry[1], flex[0] @ flex[1], rnd.r_max, rtol=1e-10)


@given(
    st.sets(st.integers(1, 8), min_size=1, max_size=4).flatmap(
        lambda lv: st.tuples(
            st.just(tuple(sorted(lv))),
            st.lists(st.tuples(st.sampled_from(sorted(lv)), st.integers(1, 100)), max_size=6),
        )
    )
)
def test_partition_weights_columns(args: tuple[tuple[int, ...], list[tuple[int, int]]]) -> None:
    levels, clients = args
    ranks, samples = [r for r, _ in clients], [s for _, s in clients]
    W = partition_weights(ranks, samples, levels)
    assert W.shape == (len(clients), len(levels))
    for j, h in enumerate(levels):
        N_h = sum(s for r, s in clients if r >= h)
        expected = [s / N_h if r >= h else 0.0 for r, s in clients]
        torch.testing.assert_close(W[:, j], torch.tensor(expected, dtype=torch.float64))
        assert math.isclose(float(W[:, j].sum()), 1.0 if N_h else 0.0, abs_tol=1e-12)


def test_raflora_rejects_rank_that_is_not_a_level() -> None:
    updates = make_updates(0, 5, 4, [2, 3], [1, 1])
    with pytest.raises(ValueError, match="rank level"):
        raflora.aggregate("raflora", updates, rank_levels=[2, 4])


# ------------------------------------------------------------- whole-model path
SHAPES = {"q": (6, 5), "k": (6, 5), "v": (6, 5), "fc": (4, 9), "out": (4, 9)}
OPTIONS: dict[str, dict[str, str]] = {"hetlora": {}, "raflora": {"empty_partition": "carry"}}


def levels_for(method: str) -> tuple[int, ...]:
    return (4,) if method == "fedit" else (2, 4, 6)


def model_updates(method: str, seed: int) -> list[ClientUpdate]:
    ranks = [4, 4, 4] if method == "fedit" else [2, 4, 2, 4]  # nobody at 6: empty partition
    out = []
    for cid, r in enumerate(ranks):
        factors = {
            name: (randn(seed + 100 * cid + 2 * i, d, r), randn(seed + 100 * cid + 2 * i + 1, r, n))
            for i, (name, (d, n)) in enumerate(sorted(SHAPES.items()))
        }
        head = randn(seed + 100 * cid + 50, 3, 2)
        out.append(ClientUpdate(cid, r, 10 * (cid + 1), factors, {"head": head}))
    return out


def init(method: str, seed: int = 0) -> tuple[raflora.Aggregator, GlobalState]:
    agg = get_aggregator(method, levels_for(method), **OPTIONS.get(method, {}))
    ctx = RoundContext(generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    state = agg.init_state(ctx, SHAPES, {"head": torch.zeros(3, 2, dtype=torch.float64)})
    return agg, state


def assert_module_equal(
    method: str, got: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor]
) -> None:
    if method in ("flexlora", "raflora"):  # SVD signs are arbitrary: compare products
        torch.testing.assert_close(got[0] @ got[1], ref[0] @ ref[1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            torch.linalg.svdvals(got[0]), torch.linalg.svdvals(ref[0]), rtol=1e-10, atol=1e-10
        )
    else:
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_whole_model_equals_per_module_api(method: str) -> None:
    agg, state = init(method)
    for rnd, seed in enumerate((1000, 2000), start=1):
        updates = model_updates(method, seed)
        result = agg.aggregate(state, updates)
        assert result.accepted == tuple(u.client_id for u in updates) and result.rejected == {}
        assert result.state.round == rnd
        for name in SHAPES:
            per_module = [(u.factors[name][0], u.factors[name][1], u.num_samples) for u in updates]
            ref = raflora.aggregate(
                method,
                per_module,
                rank_levels=levels_for(method),
                previous=state.factors[name],
                **OPTIONS.get(method, {}),
            )
            assert_module_equal(method, result.state.factors[name], ref)
        p = p_k([(None, None, u.num_samples) for u in updates])  # type: ignore[misc]
        head = sum(w * u.dense["head"] for w, u in zip(p.tolist(), updates, strict=True))
        torch.testing.assert_close(result.state.dense["head"], head, rtol=1e-12, atol=1e-12)
        state = result.state


def test_whole_model_raflora_carries_previous_slice_per_module() -> None:
    """Round 2 carries each module's own round-1 slice (6 is never reached)."""
    agg, state = init("raflora")
    state = agg.aggregate(state, model_updates("raflora", 1)).state
    updates = model_updates("raflora", 2)
    new = agg.aggregate(state, updates).state
    for name in SHAPES:
        per_module = [(u.factors[name][0], u.factors[name][1], u.num_samples) for u in updates]
        expected = ref_raflora_delta(per_module, (2, 4, 6), state.factors[name], "carry")
        assert_best_rank(new.factors[name][0] @ new.factors[name][1], expected, 6, rtol=1e-10)


# ------------------------------------------------------------------ state and init
@pytest.mark.parametrize("method", [m for m in METHODS if m != "flora"])
def test_init_state_is_zero_b_and_peft_a(method: str) -> None:
    agg, state = init(method)
    r_max = agg.r_max
    assert state.round == 0 and set(state.factors) == set(SHAPES)
    for name, (d, n) in SHAPES.items():
        B, A = state.factors[name]
        assert B.shape == (d, r_max) and bool((B == 0).all())
        assert A.shape == (r_max, n) and float(A.abs().max()) <= 1 / math.sqrt(n)
        assert float(A.abs().max()) > 0.3 / math.sqrt(n)  # really spread over the interval
    _, again = init(method)
    _, other = init(method, seed=1)
    for name in SHAPES:
        assert torch.equal(state.factors[name][1], again.factors[name][1])
        assert not torch.equal(state.factors[name][1], other.factors[name][1])


def test_init_state_does_not_depend_on_module_order() -> None:
    agg = get_aggregator("flexlora", [2, 4])
    shuffled = dict(reversed(list(SHAPES.items())))
    states = [
        agg.init_state(RoundContext(generator=torch.Generator().manual_seed(3)), shapes)
        for shapes in (SHAPES, shuffled)
    ]
    for name in SHAPES:
        assert torch.equal(states[0].factors[name][1], states[1].factors[name][1])


def test_init_state_is_uniform_in_peft_bounds() -> None:
    agg = get_aggregator("flexlora", [64])
    state = agg.init_state(
        RoundContext(generator=torch.Generator().manual_seed(0)), {"m": (2, 400)}
    )
    A = state.factors["m"][1] * math.sqrt(400)  # U(-1, 1): mean 0, variance 1/3
    assert abs(float(A.mean())) < 0.02
    assert abs(float(A.var()) - 1 / 3) < 0.02


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "raflora"])
def test_client_factors_are_nested_truncation(method: str) -> None:
    agg, state = init(method)
    state = agg.aggregate(state, model_updates(method, 7)).state
    for r in agg.rank_levels:
        sent = agg.client_factors(RoundContext(rank=r), state)
        for name, (B_g, A_g) in state.factors.items():
            assert torch.equal(sent[name][0], B_g[:, :r])
            assert torch.equal(sent[name][1], A_g[:r, :])
        ctx = RoundContext(rank=r)
        assert agg.download_numel(ctx, state) == sum((d + n) * r for d, n in SHAPES.values())
    with pytest.raises(ValueError):
        agg.client_factors(RoundContext(rank=agg.r_max + 1), state)


def test_flora_client_factors_are_fresh_init() -> None:
    agg, state = init("flora")
    state = agg.aggregate(state, model_updates("flora", 3)).state
    sent = agg.client_factors(
        RoundContext(rank=2, generator=torch.Generator().manual_seed(5)), state
    )
    again = agg.client_factors(
        RoundContext(rank=2, generator=torch.Generator().manual_seed(5)), state
    )
    for name, (d, n) in SHAPES.items():
        B, A = sent[name]
        assert B.shape == (d, 2) and bool((B == 0).all())
        assert A.shape == (2, n) and 0 < float(A.abs().max()) <= 1 / math.sqrt(n)
        assert torch.equal(A, again[name][1])
    with pytest.raises(ValueError, match="generator"):
        agg.client_factors(RoundContext(rank=2), state)


def test_flora_accumulates_base_delta_and_downloads_the_stack() -> None:
    agg, state = init("flora")
    assert all(B.shape[1] == 0 for B, _ in state.factors.values())
    expected = {name: torch.zeros(d, n, dtype=torch.float64) for name, (d, n) in SHAPES.items()}
    for seed in (1, 2):
        updates = model_updates("flora", seed)
        result = agg.aggregate(state, updates)
        state = result.state
        p = p_k([(None, None, u.num_samples) for u in updates])  # type: ignore[misc]
        for name in SHAPES:
            step = dense_delta([(*u.factors[name], u.num_samples) for u in updates], p)
            expected[name] += step
            B_s, A_s = result.base_update[name]  # type: ignore[index]
            torch.testing.assert_close(B_s @ A_s, step, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(
                state.base_delta[name], expected[name], rtol=1e-10, atol=1e-10
            )
    stack = sum(u.rank for u in updates)
    stacked = sum((d + n) * stack for d, n in SHAPES.values())
    assert agg.download_numel(RoundContext(rank=2), state) == stacked


@pytest.mark.parametrize("method", ["fedit", "hetlora", "flexlora", "raflora"])
def test_non_flora_methods_have_no_base_update(method: str) -> None:
    agg, state = init(method)
    result = agg.aggregate(state, model_updates(method, 1))
    assert result.base_update is None and result.state.base_delta == {}


# ------------------------------------------------------------ hetlora self-pruning
def test_hetlora_local_penalty_is_lambda_times_tail_norm() -> None:
    agg = get_aggregator(
        "hetlora", [2, 8], self_pruning=True, pruning_gamma=0.7, pruning_lambda=0.3
    )
    factors = {
        "a": (randn(0, 6, 8).requires_grad_(), randn(1, 8, 5).requires_grad_()),
        "b": (randn(2, 3, 8).requires_grad_(), randn(3, 8, 7).requires_grad_()),
    }
    penalty = agg.local_penalty(factors, 8)
    p = math.floor(0.7 * 8)  # 5: a floor, not a rounding
    expected = 0.3 * sum(
        torch.linalg.norm(B[:, p:]) * torch.linalg.norm(A[p:, :]) for B, A in factors.values()
    )
    assert penalty is not None
    torch.testing.assert_close(penalty, expected.detach(), rtol=1e-12, atol=0)
    penalty.backward()
    B_a = factors["a"][0]
    assert B_a.grad is not None and bool((B_a.grad[:, :p] == 0).all())
    assert float(B_a.grad[:, p:].abs().max()) > 0
    assert get_aggregator("hetlora", [2, 8]).local_penalty(factors, 8) is None


def test_hetlora_self_pruning_prunes_clients_whose_tail_shrank() -> None:
    gamma, r = 0.6, 8  # ⌊4.8⌋ = 4
    agg = get_aggregator("hetlora", [4, 8], self_pruning=True, pruning_gamma=gamma)
    shapes = {"m": (6, 5)}
    ctx = RoundContext(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = agg.init_state(ctx, shapes)
    first = [ClientUpdate(c, r, 10, {"m": (randn(c, 6, r), randn(c + 9, r, 5))}) for c in (0, 1)]
    state = agg.aggregate(state, first).state
    assert HetLoRA.pruned_ranks(state) == {}  # B_g was 0: nothing could shrink in round 1
    p = math.floor(gamma * r)
    B_g, A_g = agg.client_factors(RoundContext(rank=r), state)["m"]

    def returned(scale: float) -> dict[str, tuple[Tensor, Tensor]]:
        B, A = B_g.clone(), A_g.clone()
        B[:, p:] *= scale
        return {"m": (B, A)}

    second = [ClientUpdate(0, r, 10, returned(0.5)), ClientUpdate(1, r, 10, returned(2.0))]
    state = agg.aggregate(state, second).state
    assert HetLoRA.pruned_ranks(state) == {0: p}
    assert agg.client_rank(RoundContext(client_id=0), state, r) == p
    assert agg.client_rank(RoundContext(client_id=1), state, r) == r
    # Pruning happens once, from r_k: a pruned client whose tail shrinks again keeps ⌊γ r_k⌋.
    B_p, A_p = agg.client_factors(RoundContext(rank=p), state)["m"]
    B_p = B_p.clone()
    B_p[:, math.floor(gamma * p) :] *= 0.1
    third = [ClientUpdate(0, p, 10, {"m": (B_p, A_p)})]
    state = agg.aggregate(state, third).state
    assert HetLoRA.pruned_ranks(state) == {0: p}


# ---------------------------------------------------------------- registry errors
def test_available_methods() -> None:
    assert set(METHODS) <= set(available_methods())


def test_unknown_method_lists_available() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        get_aggregator("nope", [2, 4])
    for method in METHODS:
        assert method in str(info.value)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_is_named(method: str) -> None:
    with pytest.raises(ValueError, match="bogus_option"):
        get_aggregator(method, levels_for(method), bogus_option=1)


@pytest.mark.parametrize(
    ("method", "options"),
    [("hetlora", {"weighting": "loss"}), ("raflora", {"empty_partition": "zero"})],
)
def test_bad_option_values_are_refused(method: str, options: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=next(iter(options.values()))):
        get_aggregator(method, [2, 4], **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"self_pruning": "no"}, "hetlora.self_pruning: expected bool, got str 'no'"),
        ({"self_pruning": 1}, "hetlora.self_pruning: expected bool, got int 1"),
        ({"pruning_lambda": True}, "hetlora.pruning_lambda: expected float, got bool True"),
    ],
)
def test_keyword_options_are_type_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        get_aggregator("hetlora", [2, 4], **options)
    assert str(info.value) == message


def test_keyword_options_are_coerced_and_typos_get_a_suggestion() -> None:
    agg = get_aggregator("hetlora", [2, 4], pruning_lambda=0)
    assert isinstance(agg, HetLoRA) and isinstance(agg.pruning_lambda, float)
    with pytest.raises(ValueError, match=r"\(did you mean 'empty_partition'\?\)"):
        get_aggregator("raflora", [2, 4], empty_partiton="drop")


@pytest.mark.parametrize("levels", [[], [0, 2], [4, 2], [2, 2]])
def test_bad_rank_levels_are_refused(levels: list[int]) -> None:
    with pytest.raises(ValueError):
        get_aggregator("flexlora", levels)
