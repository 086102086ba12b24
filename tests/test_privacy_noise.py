"""raflora.privacy.noise: the aggregate's noise is N(0, (zC/m)^2) in every space, seeded; weights;
adaptive clipping.

The noise checks are two-sided chi-square tests on the sample variance (the noise has known mean
0, so ``Σ x² / σ² ~ χ²(N)``) at false-alarm rate α = 1e-6 per test: with a fixed seed they are
deterministic, and a random seed would fail one in a million times. Each test also shows its
power: the same statistic rejects a standard deviation off by the factor a plausible bug gives
(``√m``, i.e. the client share mistaken for the sum's, or ``m``).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

from conftest import randn
from raflora.privacy.clipping import ClientUpdate, ProductDelta, clip_update, padded_difference
from raflora.privacy.noise import (
    adaptive_clip_update,
    add_noise,
    client_noise_std,
    coverage_weight,
    fixed_weight,
    gaussian_like,
    noised_unclipped_fraction,
    poisson_weight,
    product_sum,
    split_noise_multiplier,
    sum_noise_std,
)

ALPHA = 1e-6
Z, C, M = 1.3, 0.7, 4


def _accepts(samples: torch.Tensor, std: float) -> bool:
    """Two-sided chi-square test of ``samples ~ N(0, std²)`` at level ALPHA."""
    x = samples.double().flatten()
    stat = float((x * x).sum()) / std**2
    n = x.numel()
    return bool(chi2.ppf(ALPHA / 2, n) <= stat <= chi2.ppf(1 - ALPHA / 2, n))


def _clients(seed: int) -> list[ClientUpdate]:
    """M clipped client updates with a product module, padded factors and a head."""
    out = []
    for k in range(M):
        s = seed + 100 * k
        update = ClientUpdate(
            product={
                "m": ProductDelta(
                    randn(s, 9, 2), randn(s + 1, 2, 7), randn(s + 2, 9, 2), randn(s + 3, 2, 7)
                )
            },
            factors={
                "m.B": padded_difference(randn(s + 4, 9, 1 + k % 3), randn(s + 5, 9, 1), 4, -1)
            },
            dense={"head": randn(s + 6, 3, 7)},
        )
        out.append(clip_update(update, C).update)
    return out


def _sums(clients: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The sums the server noises: dense per product module, padded factors, heads."""
    return {
        "m": product_sum(c.product["m"] for c in clients),
        "m.B": sum(
            (c.factors["m.B"].double() for c in clients), torch.zeros(9, 4, dtype=torch.float64)
        ),
        "head": sum(
            (c.dense["head"].double() for c in clients), torch.zeros(3, 7, dtype=torch.float64)
        ),
    }


def test_server_noise_on_the_average_is_zc_over_m_in_every_space() -> None:
    clients = _clients(0)
    sums = _sums(clients)
    gen = torch.Generator().manual_seed(1234)
    draws: dict[str, list[torch.Tensor]] = {k: [] for k in sums}
    for _ in range(400):
        noised = add_noise(sums, sum_noise_std(Z, C), gen)
        for k in sums:
            # the released average minus the clean average: the noise the average carries
            draws[k].append(noised[k] * fixed_weight(M) - sums[k] * fixed_weight(M))
    for k, values in draws.items():
        sample = torch.stack(values)
        assert _accepts(sample, Z * C / M), k
        assert not _accepts(sample, Z * C / M * math.sqrt(M)), k  # power: client share's std
        assert not _accepts(sample, Z * C / M / math.sqrt(M)), k


def test_client_noise_shares_sum_to_the_server_noise() -> None:
    clients = _clients(7)
    sums = _sums(clients)
    gens = [torch.Generator().manual_seed(50 + k) for k in range(M)]
    share = client_noise_std(Z, C, M)
    assert share == pytest.approx(Z * C / math.sqrt(M))
    draws: dict[str, list[torch.Tensor]] = {k: [] for k in sums}
    for _ in range(400):
        total = {k: torch.zeros_like(v) for k, v in sums.items()}
        for gen in gens:  # each client noises its own (zero) share of every sum
            noise = add_noise({k: torch.zeros_like(v) for k, v in sums.items()}, share, gen)
            total = {k: total[k] + noise[k] for k in total}
        for k in sums:
            draws[k].append(total[k] / M)
    for k, values in draws.items():
        sample = torch.stack(values)
        assert _accepts(sample, Z * C / M), k
        assert not _accepts(sample, share / M), k  # one client's share alone


def test_noise_is_seeded_order_independent_and_keeps_dtype() -> None:
    sums = {"b": torch.zeros(3, 2, dtype=torch.float32), "a": torch.zeros(4, dtype=torch.float64)}
    first = add_noise(sums, 0.5, torch.Generator().manual_seed(3))
    again = add_noise(dict(reversed(sums.items())), 0.5, torch.Generator().manual_seed(3))
    for k in sums:
        assert torch.equal(first[k], again[k])
        assert first[k].dtype == sums[k].dtype
    # sorted keys: "a" is drawn first
    expected_a = (
        torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    )
    assert torch.equal(first["a"], expected_a)
    assert not torch.equal(first["b"], add_noise(sums, 0.5, torch.Generator().manual_seed(4))["b"])
    unchanged = add_noise(sums, 0.0, torch.Generator().manual_seed(3))
    assert all(torch.equal(unchanged[k], sums[k]) for k in sums)
    g = torch.Generator().manual_seed(9)
    like = gaussian_like(torch.ones(5, dtype=torch.float32), 2.0, g)
    assert like.dtype == torch.float32 and like.shape == (5,)


def test_product_sum_is_the_dense_sum() -> None:
    deltas = [
        ProductDelta(randn(i, 5, 2), randn(i + 1, 2, 3), randn(i + 2, 5, 1), randn(i + 3, 1, 3))
        for i in (0, 10)
    ]
    expected = sum(d.B @ d.A - d.B0 @ d.A0 for d in deltas)
    torch.testing.assert_close(product_sum(deltas), expected)
    with pytest.raises(ValueError):
        product_sum([])


def test_data_independent_weights() -> None:
    assert fixed_weight(10) == 0.1
    assert poisson_weight(0.1, 100) == pytest.approx(0.1)
    # a partition covered by 20 of the federation's 100 clients, sampled at q = 0.1: 2 expected
    assert coverage_weight(0.1, 20) == pytest.approx(0.5)
    for bad in (
        lambda: fixed_weight(0),
        lambda: coverage_weight(0.0, 5),
        lambda: coverage_weight(0.1, 0),
    ):
        with pytest.raises(ValueError):
            bad()


def test_adaptive_clip_update() -> None:
    assert adaptive_clip_update(1.0, 0.5, 0.5, 0.2) == 1.0
    assert adaptive_clip_update(2.0, 0.9, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.2 * 0.4))
    assert adaptive_clip_update(2.0, 0.1, 0.5, 0.2) > 2.0  # too many clipped: C grows
    with pytest.raises(ValueError):
        adaptive_clip_update(1.0, 0.5, 1.5, 0.2)


def test_noised_unclipped_fraction_is_unbiased_with_the_stated_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    sigma_b, m = 2.0, 10
    values = torch.tensor([noised_unclipped_fraction(7, m, m, sigma_b, gen) for _ in range(20_000)])
    # b~ - 0.7 = noise / m with noise ~ N(0, sigma_b^2)
    assert _accepts((values - 0.7) * m, sigma_b)
    assert noised_unclipped_fraction(3, 10, 10, 0.0, gen) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        noised_unclipped_fraction(11, 10, 10, 1.0, gen)


def test_split_noise_multiplier() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = split_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ValueError, match="leaves nothing"):
        split_noise_multiplier(1.0, 0.5)
