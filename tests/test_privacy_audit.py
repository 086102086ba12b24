"""raflora.privacy.audit: Clopper–Pearson against scipy and closed forms; the ε lower bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from raflora.privacy.audit import clopper_pearson, epsilon_lower_bound


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (5, 10), (10, 10), (17, 400), (399, 400)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.999])
def test_clopper_pearson_equals_scipy_exact_interval(k: int, n: int, confidence: float) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = clopper_pearson(k, n, confidence)
    assert lo == pytest.approx(ci.low, abs=1e-12)
    assert hi == pytest.approx(ci.high, abs=1e-12)


def test_clopper_pearson_known_values() -> None:
    # k = 0 and k = n have closed forms: 1 - (a/2)^(1/n) and (a/2)^(1/n).
    assert clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025**0.1, rel=1e-10)
    assert clopper_pearson(10, 10)[0] == pytest.approx(0.025**0.1, rel=1e-10)
    # the textbook 5 of 10 at 95 %: (0.1871, 0.8129)
    lo, hi = clopper_pearson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.1871, 0.8129)
    with pytest.raises(ValueError):
        clopper_pearson(11, 10)
    with pytest.raises(ValueError):
        clopper_pearson(1, 10, confidence=1.0)


def test_perfect_test_gives_the_closed_form_bound() -> None:
    n, delta = 1000, 1e-5
    tpr_lb = 0.025 ** (1 / n)
    fpr_ub = 1 - tpr_lb
    expected = math.log((tpr_lb - delta) / fpr_ub)  # both terms are equal here
    assert epsilon_lower_bound(n, n, 0, n, delta) == pytest.approx(expected, rel=1e-10)


def test_a_useless_test_gives_no_evidence() -> None:
    assert epsilon_lower_bound(500, 1000, 500, 1000, 1e-5) == 0.0
    assert epsilon_lower_bound(0, 1000, 1000, 1000, 1e-5) == 0.0


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_bound_is_valid_and_tight_on_randomized_response(eps: float) -> None:
    # Randomized response is exactly eps-DP (delta = 0) and its likelihood-ratio test has
    # TPR = e^eps / (1 + e^eps), FPR = 1 / (1 + e^eps): the bound must stay below eps and,
    # with many trials, come close to it.
    rng = np.random.default_rng(0)
    n = 200_000
    p = math.exp(eps) / (1 + math.exp(eps))
    tp = int(rng.binomial(n, p))
    fp = int(rng.binomial(n, 1 - p))
    lb = epsilon_lower_bound(tp, n, fp, n, delta=0.0, confidence=0.95)
    assert lb <= eps
    assert lb > eps - 0.06


def test_bad_delta() -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(1, 2, 1, 2, delta=1.0)


# ------------------------------------------------------------------ the empirical audit


def _audit_module():  # type: ignore[no-untyped-def]
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy_audit.py"
    spec = importlib.util.spec_from_file_location("privacy_audit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["privacy_audit"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_audit_canary_is_clipped_like_everyone() -> None:
    audit = _audit_module()
    others, canary, direction, shapes = audit.contributions(clients=4, clip=0.7, seed=0)
    assert canary.clipped and canary.norm > 100  # scaled ×1000, then clipped to C
    norm = math.sqrt(sum(float(p.pow(2).sum()) for p in canary.pieces.values()))
    assert norm == pytest.approx(0.7, rel=1e-9)
    assert set(canary.pieces) <= set(shapes) and all(len(c.pieces) > 0 for c in others)
    assert math.sqrt(sum(float(d.pow(2).sum()) for d in direction.values())) == pytest.approx(1)


def test_audit_bound_stays_below_the_accountant_and_the_test_has_power() -> None:
    audit = _audit_module()
    noised = audit.audit(1.0, trials=600, seed=1)
    assert 0 <= noised.epsilon_lb <= noised.epsilon_accountant
    assert noised.tpr > noised.fpr  # the canary shows, but only as much as ε allows
    off = audit.audit(0.0, trials=600, seed=1)
    assert (off.tpr, off.fpr) == (1.0, 0.0)
    # a perfect test on 300 + 300 trials: the closed form of a perfect Clopper–Pearson bound
    n = off.trials
    tpr_lb = 0.025 ** (1 / n)
    assert off.epsilon_lb == pytest.approx(math.log((tpr_lb - 1e-5) / (1 - tpr_lb)), rel=1e-9)
    assert off.epsilon_lb > noised.epsilon_lb and math.isinf(off.epsilon_accountant)
