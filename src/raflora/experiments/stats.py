"""Statistics over seeds: mean, sample standard deviation, Student-t confidence intervals and
paired comparisons (``raflora compare --seeds``, ``raflora sweep``).

Seeds are few (3–5 in a paper), so intervals use Student's t distribution with ``n − 1`` degrees
of freedom (``scipy.stats.t``) rather than the normal approximation, and a paired comparison of
two methods works on the per-seed differences: for a given seed both methods see the same
partitions, client ranks and sampling, so the seed-to-seed variation they share cancels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["CONFIDENCE", "PairedStats", "SeedStats", "describe", "paired", "t_quantile"]

CONFIDENCE = 0.95
"""Coverage of the intervals reported (two-sided)."""


@dataclass(frozen=True)
class SeedStats:
    """Mean, spread and confidence interval of one quantity over seeds.

    Attributes
    ----------
    n : int
        Number of values (seeds).
    mean : float
        Arithmetic mean.
    std : float or None
        Sample standard deviation (``ddof = 1``); ``None`` for a single value.
    ci_low, ci_high : float or None
        The two-sided :data:`CONFIDENCE` Student-t interval of the mean,
        ``mean ± t_{0.975, n−1} · std / √n``; ``None`` for a single value.
    """

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        """Half the width of the confidence interval (``None`` for a single value)."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2.0


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value ``t_{(1 + confidence)/2, df}``.

    Parameters
    ----------
    df : int
        Degrees of freedom (≥ 1).
    confidence : float
        Coverage in ``(0, 1)``.

    Returns
    -------
    float
        E.g. 12.706 for ``df = 1`` and 2.776 for ``df = 4`` at 95 %.
    """
    from scipy import stats as scipy_stats

    if df < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {df}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, df))


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedStats:
    """:class:`SeedStats` of ``values`` (one per seed).

    Parameters
    ----------
    values : Sequence[float]
        Finite numbers, at least one.
    confidence : float
        Coverage of the interval.

    Returns
    -------
    SeedStats
        With ``std`` and the interval ``None`` when there is a single value.

    Raises
    ------
    ValueError
        No values, or a value that is not finite.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("describe needs at least one value")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"values must be finite, got {xs}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return SeedStats(1, mean, None, None, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
    return SeedStats(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedStats:
    """One method against a baseline, seed by seed (``method − baseline``).

    Attributes
    ----------
    differences : dict[int, float]
        Seed → ``value(method) − value(baseline)``, for the seeds both have, ascending.
    stats : SeedStats
        :func:`describe` of the differences.
    wins, ties, losses : int
        Seeds where the method is better / equal (within the tolerance) / worse, in the
        metric's direction (``higher_is_better``).
    """

    differences: dict[int, float]
    stats: SeedStats
    wins: int
    ties: int
    losses: int


def paired(
    method: Mapping[int, float],
    baseline: Mapping[int, float],
    *,
    higher_is_better: bool = True,
    tie_tolerance: float = 1e-12,
    confidence: float = CONFIDENCE,
) -> PairedStats:
    """Paired differences of ``method`` against ``baseline`` over their common seeds.

    Parameters
    ----------
    method, baseline : Mapping[int, float]
        Seed → the metric's value.
    higher_is_better : bool
        The metric's direction: a win is a positive difference (``False``: a negative one, as
        for traffic or a loss).
    tie_tolerance : float
        A difference with ``|d| ≤ tie_tolerance`` is a tie (absorbs floating-point noise).
    confidence : float
        Coverage of the interval of the mean difference.

    Returns
    -------
    PairedStats
        The per-seed differences, their statistics and the win / tie / loss counts.

    Raises
    ------
    ValueError
        The two have no seed in common.
    """
    common = sorted(set(method) & set(baseline))
    if not common:
        raise ValueError(
            f"no common seed to pair: method has {sorted(method)}, baseline {sorted(baseline)}"
        )
    diffs = {seed: float(method[seed]) - float(baseline[seed]) for seed in common}
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(1 for d in diffs.values() if sign * d > tie_tolerance)
    losses = sum(1 for d in diffs.values() if sign * d < -tie_tolerance)
    ties = len(diffs) - wins - losses
    return PairedStats(diffs, describe(list(diffs.values()), confidence), wins, ties, losses)
