"""Seed statistics against hand-computed values (t quantiles from a printed t table)."""

from __future__ import annotations

import math

import pytest

from raflora.experiments.stats import describe, paired, t_quantile

# two-sided 95 % critical values t_{0.975, df} from a printed table
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}


@pytest.mark.parametrize(("df", "t"), sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df: int, t: float) -> None:
    assert t_quantile(df) == pytest.approx(t, abs=1e-4)


def test_t_quantile_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(3, confidence=1.0)


def test_describe_four_values() -> None:
    # mean 2.5; std = sqrt((1.5² + 0.5² + 0.5² + 1.5²) / 3) = sqrt(5/3) = 1.290994
    # half width = 3.182446 · 1.290994 / 2 = 2.054268
    s = describe([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4
    assert s.mean == pytest.approx(2.5)
    assert s.std == pytest.approx(math.sqrt(5.0 / 3.0))
    assert s.ci_low == pytest.approx(0.445732, abs=1e-5)
    assert s.ci_high == pytest.approx(4.554268, abs=1e-5)
    assert s.half_width == pytest.approx(2.054268, abs=1e-5)


def test_describe_two_values_uses_one_degree_of_freedom() -> None:
    # std = 0.02 / sqrt(2) = 0.0141421; half = 12.7062 · 0.0141421 / sqrt(2) = 0.127062
    s = describe([0.80, 0.82])
    assert s.mean == pytest.approx(0.81)
    assert s.std == pytest.approx(0.0141421, abs=1e-7)
    assert (s.ci_low, s.ci_high) == (
        pytest.approx(0.682938, abs=1e-5),
        pytest.approx(0.937062, abs=1e-5),
    )


def test_describe_one_value_has_no_spread_and_equal_values_no_width() -> None:
    one = describe([0.7])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high, one.half_width) == (
        1,
        0.7,
        None,
        None,
        None,
        None,
    )
    same = describe([3.0, 3.0, 3.0])
    assert (same.std, same.ci_low, same.ci_high) == (0.0, 3.0, 3.0)


def test_describe_rejects_empty_and_non_finite() -> None:
    with pytest.raises(ValueError, match="at least one"):
        describe([])
    with pytest.raises(ValueError, match="finite"):
        describe([1.0, math.nan])


def test_paired_differences_on_common_seeds() -> None:
    # diffs (seeds 0, 1, 2) = +0.02, 0, −0.01 (seed 3 has no pair): mean 0.0033333,
    # std = sqrt((0.0166667² + 0.0033333² + 0.0133333²) / 2) = 0.0152753,
    # half = 4.302653 · 0.0152753 / sqrt(3) = 0.037946
    method = {0: 0.80, 1: 0.85, 2: 0.90}
    baseline = {0: 0.78, 1: 0.85, 2: 0.91, 3: 0.50}
    p = paired(method, baseline)
    assert list(p.differences) == [0, 1, 2]
    assert [round(d, 12) for d in p.differences.values()] == [0.02, 0.0, -0.01]
    assert (p.wins, p.ties, p.losses) == (1, 1, 1)
    assert p.stats.n == 3
    assert p.stats.mean == pytest.approx(0.0033333, abs=1e-7)
    assert p.stats.std == pytest.approx(0.0152753, abs=1e-7)
    assert p.stats.half_width == pytest.approx(0.037946, abs=1e-5)


def test_paired_lower_is_better_swaps_wins_and_losses() -> None:
    traffic = {0: 100.0, 1: 120.0, 2: 90.0}
    base = {0: 110.0, 1: 110.0, 2: 110.0}
    assert (paired(traffic, base).wins, paired(traffic, base).losses) == (1, 2)
    lower = paired(traffic, base, higher_is_better=False)
    assert (lower.wins, lower.ties, lower.losses) == (2, 0, 1)
    assert lower.differences == {0: -10.0, 1: 10.0, 2: -20.0}


def test_paired_needs_a_common_seed() -> None:
    with pytest.raises(ValueError, match="no common seed"):
        paired({0: 1.0}, {1: 1.0})
