"""Empirical privacy auditing: Clopper–Pearson bounds and the ε lower bound they imply.

An audit runs the mechanism many times with and without a canary client, and a test guesses
"canary present?" from each release. For an ``(ε, δ)``-DP mechanism every such test satisfies
(Kairouz, Oh and Viswanath 2015's hypothesis-testing view, as used by Jagielski, Ullman and Oprea,
NeurIPS 2020, "Auditing differentially private machine learning: how private is private SGD?",
and Nasr et al., IEEE S&P 2021, "Adversary instantiation: lower bounds for differentially private
machine learning")::

    TPR ≤ e^ε FPR + δ        and        1 − FPR ≤ e^ε (1 − TPR) + δ

so ``ε ≥ log((TPR − δ) / FPR)`` and ``ε ≥ log((1 − FPR − δ) / (1 − TPR))``. With finitely many
trials the rates are replaced by Clopper–Pearson bounds that make each fraction *smaller*:

    ε_lb = max( log((TPR_lb − δ) / FPR_ub),  log((1 − FPR_ub − δ) / (1 − TPR_lb)),  0 )

where ``TPR_lb`` and ``FPR_ub`` are one-sided bounds at level ``α/2`` each (the ends of the
two-sided ``1 − α`` Clopper–Pearson intervals), so by the union bound ``ε_lb`` is a valid lower
bound on the true ε with probability at least ``confidence = 1 − α``. A term whose numerator is
not positive gives no evidence and is skipped.
"""

from __future__ import annotations

import math

__all__ = ["clopper_pearson", "epsilon_lower_bound"]


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact two-sided Clopper–Pearson interval for a binomial proportion.

    ``(B(α/2; k, n − k + 1), B(1 − α/2; k + 1, n − k))`` with ``B(·; a, b)`` the beta quantile
    and ``α = 1 − confidence``; ``0`` below for ``k = 0``, ``1`` above for ``k = n``
    (Clopper and Pearson, Biometrika 1934).
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy.stats import beta  # here, so importing raflora.privacy stays light

    alpha = 1.0 - confidence
    k, n = successes, trials
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(
    true_positives: int,
    positives: int,
    false_positives: int,
    negatives: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """``ε_lb`` (module docstring) from an audit's counts.

    Parameters
    ----------
    true_positives, positives
        Trials with the canary in which the test said "present", and all trials with the canary.
    false_positives, negatives
        Trials without the canary in which the test said "present", and all trials without it.
    delta : float
        The mechanism's ``δ``.
    confidence : float
        Probability that the returned value is below the true ε (``1 − α``).
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    tpr_lb, _ = clopper_pearson(true_positives, positives, confidence)
    _, fpr_ub = clopper_pearson(false_positives, negatives, confidence)
    best = 0.0
    for numerator, denominator in ((tpr_lb - delta, fpr_ub), (1 - fpr_ub - delta, 1 - tpr_lb)):
        if numerator > 0 and denominator > 0:
            best = max(best, math.log(numerator / denominator))
    return best
