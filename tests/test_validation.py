"""Client-update validation: named errors, and rejection without disturbing the good updates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from conftest import randn
from raflora.methods import (
    Aggregator,
    BadSampleCountError,
    ClientUpdate,
    GlobalState,
    InvalidUpdateError,
    ModuleSetError,
    NonFiniteUpdateError,
    RankError,
    ShapeMismatchError,
    get_aggregator,
    validate_update,
)
from raflora.methods.context import RoundContext

METHODS = ("fedit", "hetlora", "flora", "flexlora", "raflora")
SHAPES = {"a": (5, 4), "b": (3, 6)}
HEAD = (2, 3)


def levels_for(method: str) -> tuple[int, ...]:
    return (4,) if method == "fedit" else (2, 4)


def setup(method: str) -> tuple[Aggregator, GlobalState]:
    agg = get_aggregator(method, levels_for(method))
    ctx = RoundContext(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = agg.init_state(ctx, SHAPES, {"head": torch.zeros(HEAD, dtype=torch.float64)})
    return agg, state


def factors(seed: int, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (randn(seed + 2 * i, d, rank), randn(seed + 2 * i + 1, rank, n))
        for i, (name, (d, n)) in enumerate(sorted(SHAPES.items()))
    }


def good(cid: int, rank: int = 4, samples: int = 10) -> ClientUpdate:
    head = randn(1000 + cid, *HEAD)
    return ClientUpdate(cid, rank, samples, factors(100 * cid, rank), {"head": head})


def with_factor(u: ClientUpdate, name: str, B: torch.Tensor, A: torch.Tensor) -> ClientUpdate:
    return replace(u, factors={**u.factors, name: (B, A)})


def poisoned(u: ClientUpdate, which: int, value: float) -> ClientUpdate:
    pair = [t.clone() for t in u.factors["a"]]
    pair[which][0, -1] = value
    return with_factor(u, "a", *pair)


def bad_dense(u: ClientUpdate, value: float) -> ClientUpdate:
    head = u.dense["head"].clone()
    head[1, 1] = value
    return replace(u, dense={"head": head})


# Each case: name, expected error, how to break a good rank-4 update (ranks 2/4 are levels).
Breaker = Callable[[ClientUpdate], ClientUpdate]
CASES: list[tuple[str, type[InvalidUpdateError], Breaker]] = [
    (
        "B-rows",
        ShapeMismatchError,
        lambda u: with_factor(u, "a", randn(0, 6, 4), u.factors["a"][1]),
    ),
    (
        "A-cols",
        ShapeMismatchError,
        lambda u: with_factor(u, "b", u.factors["b"][0], randn(0, 4, 7)),
    ),
    ("declared-rank", ShapeMismatchError, lambda u: replace(u, factors=factors(0, 3))),
    ("dense-shape", ShapeMismatchError, lambda u: replace(u, dense={"head": torch.zeros(3, 2)})),
    ("nan-B", NonFiniteUpdateError, lambda u: poisoned(u, 0, float("nan"))),
    ("inf-A", NonFiniteUpdateError, lambda u: poisoned(u, 1, float("inf"))),
    ("-inf-A", NonFiniteUpdateError, lambda u: poisoned(u, 1, float("-inf"))),
    ("nan-dense", NonFiniteUpdateError, lambda u: bad_dense(u, float("nan"))),
    ("zero-samples", BadSampleCountError, lambda u: replace(u, num_samples=0)),
    ("negative-samples", BadSampleCountError, lambda u: replace(u, num_samples=-5)),
    ("float-samples", BadSampleCountError, lambda u: replace(u, num_samples=10.0)),
    ("bool-samples", BadSampleCountError, lambda u: replace(u, num_samples=True)),
    ("missing-module", ModuleSetError, lambda u: replace(u, factors={"a": u.factors["a"]})),
    (
        "unknown-module",
        ModuleSetError,
        lambda u: replace(u, factors={**u.factors, "zz": (randn(0, 2, 4), randn(1, 4, 2))}),
    ),
    ("missing-dense", ModuleSetError, lambda u: replace(u, dense={})),
    (
        "unknown-dense",
        ModuleSetError,
        lambda u: replace(u, dense={**u.dense, "extra": torch.zeros(1)}),
    ),
    ("rank-above-rmax", RankError, lambda u: replace(u, rank=5, factors=factors(0, 5))),
    ("rank-zero", RankError, lambda u: replace(u, rank=0, factors=factors(0, 0))),
]
CASE_IDS = [name for name, _, _ in CASES]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("case", "error", "breaker"), CASES, ids=CASE_IDS)
def test_bad_update_raises_named_error(
    method: str, case: str, error: type[InvalidUpdateError], breaker: Breaker
) -> None:
    agg, state = setup(method)
    agg.validate(state, good(7))  # the unbroken update is fine
    with pytest.raises(error) as info:
        agg.validate(state, breaker(good(7)))
    assert info.value.client_id == 7
    assert str(info.value).startswith("client 7:")
    assert info.value.reason


@pytest.mark.parametrize("method", METHODS)
def test_rank_off_the_levels(method: str) -> None:
    """raFLoRA and FedIT need ranks among the levels; the others take any rank ≤ r_max."""
    agg, state = setup(method)
    off_level = 3 if method != "fedit" else 2
    update = replace(good(4), rank=off_level, factors=factors(0, off_level))
    if method in ("raflora", "fedit"):
        with pytest.raises(RankError, match=r"client 4: .*rank level"):
            agg.validate(state, update)
    else:
        agg.validate(state, update)


def test_non_tensor_factor_is_rejected() -> None:
    agg, state = setup("flexlora")
    update = with_factor(good(3), "a", [[0.0] * 4] * 5, randn(0, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(InvalidUpdateError, match="client 3"):
        agg.validate(state, update)


def test_validate_update_without_dense_or_level_constraints() -> None:
    u = replace(good(1, rank=3), dense={})
    validate_update(u, SHAPES)
    validate_update(u, SHAPES, max_rank=3)
    with pytest.raises(RankError):
        validate_update(u, SHAPES, allowed_ranks=(2, 4))
    with pytest.raises(ModuleSetError, match="unknown dense tensor"):
        validate_update(good(1), SHAPES)


def assert_states_equal(a: GlobalState, b: GlobalState) -> None:
    assert a.round == b.round and a.extras == b.extras
    assert a.factors.keys() == b.factors.keys() and a.dense.keys() == b.dense.keys()
    for name in a.factors:
        assert torch.equal(a.factors[name][0], b.factors[name][0])
        assert torch.equal(a.factors[name][1], b.factors[name][1])
    for name in a.dense:
        assert torch.equal(a.dense[name], b.dense[name])
    for name in a.base_delta:
        assert torch.equal(a.base_delta[name], b.base_delta[name])


def mixed_round(method: str) -> tuple[list[ClientUpdate], list[ClientUpdate]]:
    """Good updates (ids 0–2) interleaved with one bad update of every kind (ids 10+)."""
    ranks = (4, 4, 4) if method == "fedit" else (2, 4, 4)
    goods = [good(cid, r, 10 * (cid + 1)) for cid, r in enumerate(ranks)]
    bads = [breaker(good(10 + i)) for i, (_, _, breaker) in enumerate(CASES)]
    mixed = [*bads[:5], goods[0], *bads[5:11], goods[1], *bads[11:], goods[2]]
    return goods, mixed


@pytest.mark.parametrize("method", METHODS)
def test_rejected_are_reported_and_the_rest_aggregate_exactly(method: str) -> None:
    agg, state = setup(method)
    goods, mixed = mixed_round(method)
    result = agg.aggregate(state, mixed)
    assert result.accepted == (0, 1, 2)
    assert set(result.rejected) == {10 + i for i in range(len(CASES))}
    assert all(isinstance(r, str) and r for r in result.rejected.values())
    assert_states_equal(result.state, agg.aggregate(state, goods).state)


@pytest.mark.parametrize("method", METHODS)
def test_nothing_accepted_leaves_state_unchanged(method: str) -> None:
    agg, state = setup(method)
    before = GlobalState.from_state_dict(state.state_dict())
    _, mixed = mixed_round(method)
    bads = [u for u in mixed if u.client_id >= 10]
    result = agg.aggregate(state, bads)
    assert result.state is state
    assert result.accepted == ()
    assert len(result.rejected) == len(bads)
    assert result.base_update is None
    assert_states_equal(state, before)
    empty = agg.aggregate(state, [])
    assert empty.state is state and empty.accepted == () and empty.rejected == {}


@pytest.mark.parametrize("method", METHODS)
def test_every_update_under_a_duplicated_id_is_rejected(method: str) -> None:
    """It is ambiguous which of two updates under one id is genuine, so neither is used."""
    agg, state = setup(method)
    first, again = good(5), replace(good(6), client_id=5)
    result = agg.aggregate(state, [first, good(1), again])
    assert result.accepted == (1,)
    assert "duplicate" in result.rejected[5]
    assert_states_equal(result.state, agg.aggregate(state, [good(1)]).state)


def test_duplicate_after_a_rejected_update_is_still_a_duplicate() -> None:
    """Regression: ids were only remembered once accepted, so a second update under the id of a
    rejected one got in, and the id was reported both accepted and rejected.
    """
    agg, state = setup("flexlora")
    result = agg.aggregate(state, [replace(good(5), num_samples=0), good(5)])
    assert result.accepted == ()
    assert set(result.rejected) == {5}
    assert result.state is state
