"""raflora.privacy.accountant against dp-accounting called directly and a published value."""

from __future__ import annotations

import json
import math

import pytest

from raflora.privacy.accountant import (
    PrivacyLedger,
    calibrate_noise,
    default_delta,
    epsilon,
)

dpa = pytest.importorskip("dp_accounting")


def _direct_poisson(z: float, q: float, steps: int, delta: float) -> float:
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


def test_published_value_opacus_rdp() -> None:
    # Opacus's RDPAccountant (its documented example): z = 1.5, q = 0.04, 2,250
    # steps, delta = 1e-5 -> epsilon = 7.329; z = 1.1, q = 0.2, 5 steps -> 3.839.
    assert epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.329, abs=2e-3)
    assert epsilon(1.1, 0.2, 5, 1e-5) == pytest.approx(3.839, abs=2e-3)


@pytest.mark.parametrize(("z", "q", "steps"), [(1.5, 0.04, 2250), (0.8, 0.1, 50), (3.0, 1.0, 7)])
def test_poisson_equals_the_library_called_directly(z: float, q: float, steps: int) -> None:
    assert epsilon(z, q, steps, 1e-5) == _direct_poisson(z, q, steps, 1e-5)


def test_fixed_sampling_is_wor_replace_one_with_half_the_multiplier() -> None:
    # Replace-one: the sum moves by up to 2C, so the Gaussian's multiplier is z / 2.
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(0.5)), 30)
    expected = float(acc.get_epsilon(1e-5))
    got = epsilon(1.0, 0.1, 30, 1e-5, sampling="fixed", num_clients=100)
    assert got == expected
    # Paying for replace-one: more than Poisson at the same z and q.
    assert got > epsilon(1.0, 0.1, 30, 1e-5)


def test_fixed_sampling_full_participation_is_the_plain_gaussian() -> None:
    # q = 1: every round is the Gaussian mechanism with sensitivity 2C, RDP 2 a / z^2 per round;
    # the library's conversion of that curve must match composing it by hand.
    z, steps = 4.0, 3
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.GaussianDpEvent(z / 2), steps)
    assert epsilon(z, 1.0, steps, 1e-5, sampling="fixed", num_clients=5) == pytest.approx(
        float(acc.get_epsilon(1e-5)), rel=1e-12
    )


def test_pld_is_tighter_and_matches_prv_value() -> None:
    eps_pld = epsilon(1.5, 0.04, 2250, 1e-5, accountant="pld")
    # PRV accountants (Opacus's and prv_accountant's) give 6.758-6.779 for this setting.
    assert 6.70 < eps_pld < 6.85
    assert eps_pld < epsilon(1.5, 0.04, 2250, 1e-5)


def test_edge_cases_and_bad_input() -> None:
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 3, 1e-5) == math.inf
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon(1.0, 0.0, 3, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 0.1, 3, 1.5)
    with pytest.raises(ValueError, match="needs num_clients"):
        epsilon(1.0, 0.1, 3, 1e-5, sampling="fixed")
    with pytest.raises(ValueError, match="whole number"):
        epsilon(1.0, 0.15, 3, 1e-5, sampling="fixed", num_clients=10)
    with pytest.raises(ValueError, match="poisson sampling only"):
        epsilon(1.0, 0.1, 3, 1e-5, sampling="fixed", num_clients=100, accountant="pld")


def test_default_delta() -> None:
    assert default_delta(100) == pytest.approx(100**-1.1)
    assert default_delta(100) < 1 / 100
    with pytest.raises(ValueError):
        default_delta(0)


@pytest.mark.parametrize(
    ("target", "q", "steps", "kwargs"),
    [
        (7.329, 0.04, 2250, {}),
        (1.0, 0.1, 100, {}),
        (8.0, 0.1, 100, {"sampling": "fixed", "num_clients": 100}),
    ],
)
def test_calibrate_round_trips(
    target: float, q: float, steps: int, kwargs: dict[str, object]
) -> None:
    z = calibrate_noise(target, q, steps, 1e-5, **kwargs)  # type: ignore[arg-type]
    assert epsilon(z, q, steps, 1e-5, **kwargs) <= target  # type: ignore[arg-type]
    # Smallest: 0.1 % less noise already exceeds the target.
    assert epsilon(z * 0.999, q, steps, 1e-5, **kwargs) > target  # type: ignore[arg-type]


def test_calibrate_finds_the_published_multiplier() -> None:
    assert calibrate_noise(7.3293, 0.04, 2250, 1e-5) == pytest.approx(1.5, rel=1e-3)


def test_ledger_composes_like_one_call_and_survives_json() -> None:
    ledger = PrivacyLedger()
    eps = []
    for _ in range(5):
        ledger.record(1.1, 0.2)
        eps.append(ledger.epsilon(1e-5))
    assert eps == sorted(eps)
    assert eps[-1] == pytest.approx(epsilon(1.1, 0.2, 5, 1e-5), rel=1e-12)
    assert ledger.rounds == [[1.1, 0.2, 5]]  # run-length encoded
    ahead = ledger.peek(2.0, 0.1, 1e-5, count=3)
    assert ledger.steps == 5 and ledger.epsilon(1e-5) == eps[-1]  # peek records nothing
    ledger.record(2.0, 0.1, count=3)
    assert ledger.epsilon(1e-5) == ahead
    data = json.loads(json.dumps(ledger.to_json()))
    loaded = PrivacyLedger.from_json(data)
    assert loaded.steps == 8
    assert loaded.epsilon(1e-5) == ledger.epsilon(1e-5)
    # Continuing after a resume equals never having stopped.
    ledger.record(1.1, 0.2)
    loaded.record(1.1, 0.2)
    assert loaded.epsilon(1e-5) == ledger.epsilon(1e-5)
    assert loaded.to_json() == ledger.to_json()


def test_ledger_fixed_sampling_and_bad_format() -> None:
    ledger = PrivacyLedger(sampling="fixed", num_clients=100)
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(1.0, 0.1, count=30)
    assert ledger.epsilon(1e-5) == epsilon(1.0, 0.1, 30, 1e-5, sampling="fixed", num_clients=100)
    assert PrivacyLedger.from_json(ledger.to_json()).epsilon(1e-5) == ledger.epsilon(1e-5)
    with pytest.raises(ValueError, match="format"):
        PrivacyLedger.from_json({**ledger.to_json(), "format": 99})
    with pytest.raises(ValueError, match="needs num_clients"):
        PrivacyLedger(sampling="fixed").record(1.0, 0.1)
