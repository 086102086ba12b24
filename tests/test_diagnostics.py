"""Rank-collapse diagnostics against dense singular values.

See docs/methods.md#rank-collapse-diagnostics.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from conftest import randn
from raflora.diagnostics import (
    EnergyReport,
    ModuleEnergy,
    cumulative_energy_ratios,
    energy_report,
    energy_spectrum,
    higher_rank_energy,
    module_energy_row,
    natural_key,
)

LEVELS = (2, 4, 6)


def dense_energy(B: Tensor, A: Tensor) -> Tensor:
    return torch.linalg.svdvals(B @ A) ** 2


def dense_rho(B: Tensor, A: Tensor, r: int, r_max: int) -> float:
    """``Σ_{i≤r} σ_i² / Σ_{i≤r_max} σ_i²`` (1 for a zero update, as documented)."""
    e = dense_energy(B, A)
    total = float(e[:r_max].sum())
    return float(e[:r].sum()) / total if total > 0 else 1.0


@st.composite
def factor_pairs(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    d, n, R = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**30))
    B, A = randn(seed, d, R), randn(seed + 1, R, n)
    # decaying columns make the spectrum uneven, like a trained update
    return B * torch.logspace(0, -2, R, dtype=torch.float64), A


@given(factor_pairs(), st.none() | st.integers(1, 12))
def test_energy_spectrum_is_dense_sigma_squared(
    pair: tuple[Tensor, Tensor], top: int | None
) -> None:
    B, A = pair
    spectrum = energy_spectrum(B, A, top)
    k = min(*B.shape, A.shape[1])  # min(d, R, n) directions exist
    expected = dense_energy(B, A)[:k][:top]
    assert spectrum.shape == expected.shape
    assert bool((spectrum[:-1] >= spectrum[1:]).all())
    torch.testing.assert_close(spectrum, expected, rtol=0, atol=1e-10 * float(expected[0]))


@given(factor_pairs(), st.integers(1, 8), st.integers(1, 12))
def test_higher_rank_energy_is_dense_ratio(
    pair: tuple[Tensor, Tensor], r1: int, r_max: int
) -> None:
    B, A = pair
    expected = 1.0 - dense_rho(B, A, r1, r_max)
    got = higher_rank_energy(B, A, r1, r_max)
    assert isinstance(got, float) and 0.0 <= got <= 1.0
    assert math.isclose(got, max(expected, 0.0), rel_tol=1e-9, abs_tol=1e-12)


def test_higher_rank_energy_by_hand() -> None:
    """σ = (3, 2, 1): with r_1 = 1 and r_max = 2, 1 − 9/13; over all three, 1 − 9/14."""
    B = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    A = torch.eye(3, dtype=torch.float64)
    assert math.isclose(higher_rank_energy(B, A, 1, 2), 4 / 13, rel_tol=1e-12)
    assert math.isclose(higher_rank_energy(B, A, 1), 5 / 14, rel_tol=1e-12)
    assert higher_rank_energy(B, A, 3) == pytest.approx(0.0, abs=1e-15)


def test_zero_update_has_no_higher_rank_energy() -> None:
    B, A = torch.zeros(5, 4), randn(0, 4, 3)
    assert higher_rank_energy(B, A, 2, 4) == 0.0
    rho = cumulative_energy_ratios(energy_spectrum(B, A, 4), [1, 2, 4])
    assert rho.tolist() == [1.0, 1.0, 1.0]


def test_shared_rank_must_be_positive() -> None:
    with pytest.raises(ValueError, match="shared_rank"):
        higher_rank_energy(randn(0, 3, 2), randn(1, 2, 3), 0)


def model_factors() -> dict[str, tuple[Tensor, Tensor]]:
    """Modules of two shapes (batched together), one short spectrum and one zero update."""
    decay = torch.logspace(0, -1.5, 6, dtype=torch.float64)
    out = {name: (randn(i, 7, 6) * decay, randn(i + 50, 6, 9)) for i, name in enumerate("abc")}
    out["wide"] = (randn(10, 3, 6) * decay, randn(11, 6, 12))  # only 3 directions < r_max
    out["zero"] = (torch.zeros(7, 6, dtype=torch.float64), randn(12, 6, 9))
    return out


def test_energy_report_per_module_matches_single_module() -> None:
    factors = model_factors()
    report = energy_report(factors, LEVELS)
    assert set(report.modules) == set(factors)
    for name, (B, A) in factors.items():
        m = report.modules[name]
        expected = energy_spectrum(B, A, LEVELS[-1])
        torch.testing.assert_close(torch.tensor(m.spectrum, dtype=torch.float64), expected)
        assert math.isclose(
            m.higher_rank_energy, higher_rank_energy(B, A, LEVELS[0], LEVELS[-1]), abs_tol=1e-12
        )
        assert m.higher_rank_energy == pytest.approx(
            1.0 - dense_rho(B, A, LEVELS[0], LEVELS[-1]), abs=1e-12
        )
        for r in LEVELS:
            assert m.cumulative[r] == pytest.approx(dense_rho(B, A, r, LEVELS[-1]), abs=1e-12)
    count = len(factors)
    mean_hre = sum(m.higher_rank_energy for m in report.modules.values()) / count
    assert report.higher_rank_energy == pytest.approx(mean_hre, abs=1e-15)
    for r in LEVELS:
        mean = sum(m.cumulative[r] for m in report.modules.values()) / count
        assert report.cumulative[r] == pytest.approx(mean, abs=1e-15)
    assert 0.0 < report.higher_rank_energy < 1.0


def test_cumulative_ratios_are_monotone_and_end_at_one() -> None:
    report = energy_report(model_factors(), LEVELS)
    for m in [*report.modules.values(), report]:
        values = [m.cumulative[r] for r in LEVELS]
        assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
        assert values[-1] == pytest.approx(1.0, abs=1e-12)
    full = report.modules["a"]
    assert len(full.spectrum) == LEVELS[-1]  # spectrum at least r_max long
    assert full.cumulative[LEVELS[0]] < 1.0
    zero = report.modules["zero"]
    assert zero.higher_rank_energy == 0.0 and all(v == 1.0 for v in zero.cumulative.values())


def test_energy_report_is_independent_of_module_order_and_batching() -> None:
    factors = model_factors()
    reverse = energy_report(dict(reversed(list(factors.items()))), LEVELS)
    report = energy_report(factors, LEVELS)
    for name, (B, A) in factors.items():
        alone = energy_report({name: (B, A)}, LEVELS).modules[name]
        for other in (alone, reverse.modules[name]):
            assert other.spectrum == pytest.approx(report.modules[name].spectrum, abs=1e-12)
            assert other.higher_rank_energy == pytest.approx(
                report.modules[name].higher_rank_energy, abs=1e-12
            )


def test_energy_report_to_dict() -> None:
    report = energy_report(model_factors(), LEVELS)
    plain = report.to_dict()
    assert plain["higher_rank_energy"] == report.higher_rank_energy
    assert plain["energy_at_rank"] == {str(r): report.cumulative[r] for r in LEVELS}
    assert "modules" not in plain
    detailed = report.to_dict(include_modules=True)
    assert detailed["modules"]["a"]["spectrum"] == report.modules["a"].spectrum


# --------------------------------------------------------------------------- energy.jsonl rows


def orthonormal_rows(seed: int, k: int, n: int) -> Tensor:
    Q, _ = torch.linalg.qr(randn(seed, n, k))  # (n, k), orthonormal columns
    return Q.T


def collapsed_and_spread() -> dict[str, tuple[Tensor, Tensor]]:
    """``layers.10.q``: all energy in the first ``r_1`` directions (1 − ρ_{r_1} = 0 exactly in
    exact arithmetic); ``layers.2.q``: a full spectrum; ``layers.2.v``: a zero update."""
    r1, R = LEVELS[0], LEVELS[-1]
    sigma = torch.tensor([5.0, 3.0] + [0.0] * (R - r1), dtype=torch.float64)
    collapsed = (orthonormal_rows(1, R, 9).T * sigma, orthonormal_rows(2, R, 11))
    spread = (randn(3, 9, R) * torch.logspace(0, -0.5, R, dtype=torch.float64), randn(4, R, 11))
    zero = (torch.zeros(9, R, dtype=torch.float64), randn(5, R, 11))
    return {"layers.10.q": collapsed, "layers.2.q": spread, "layers.2.v": zero}


def test_module_energy_row_matches_dense_svd() -> None:
    factors = collapsed_and_spread()
    row = module_energy_row(7, energy_report(factors, LEVELS))
    assert row["round"] == 7
    # natural order (2 before 10), not the report's order
    assert list(row["modules"]) == ["layers.2.q", "layers.2.v", "layers.10.q"]
    collapsed = row["modules"]["layers.10.q"]
    assert collapsed["higher_rank_energy"] == pytest.approx(0.0, abs=1e-12)
    assert collapsed["energy_per_level"]["2"] == pytest.approx(1.0, abs=1e-12)
    B, A = factors["layers.2.q"]
    spread = row["modules"]["layers.2.q"]
    expected = 1.0 - dense_rho(B, A, LEVELS[0], LEVELS[-1])
    assert expected > 0.1  # far from collapsed
    assert spread["higher_rank_energy"] == pytest.approx(expected, abs=1e-12)
    assert list(spread["energy_per_level"]) == [str(r) for r in LEVELS]
    for r in LEVELS:
        got = spread["energy_per_level"][str(r)]
        assert got == pytest.approx(dense_rho(B, A, r, LEVELS[-1]), abs=1e-12)
    # a zero update has no energy: null, not the means' convention (ρ = 1, 1 − ρ = 0)
    assert row["modules"]["layers.2.v"] == {"higher_rank_energy": None, "energy_per_level": None}
    json.dumps(row, allow_nan=False)


def test_module_energy_row_null_without_energy() -> None:
    """FLoRA's round-0 empty stack (rank 0) and a non-finite spectrum give null, never NaN."""
    empty = {"m": (torch.zeros(4, 0), torch.zeros(0, 5))}
    row = module_energy_row(1, energy_report(empty, LEVELS))
    assert row == {
        "round": 1,
        "modules": {"m": {"higher_rank_energy": None, "energy_per_level": None}},
    }
    nan = ModuleEnergy(spectrum=[math.nan, 1.0], cumulative={2: math.nan}, higher_rank_energy=0.5)
    inf = ModuleEnergy(spectrum=[math.inf], cumulative={2: 1.0}, higher_rank_energy=0.0)
    report = EnergyReport({"a": nan, "b": inf}, higher_rank_energy=0.0, cumulative={2: 1.0})
    row = module_energy_row(2, report)
    assert all(m["higher_rank_energy"] is None for m in row["modules"].values())
    json.dumps(row, allow_nan=False)
    assert module_energy_row(3, energy_report({}, LEVELS)) == {"round": 3, "modules": {}}


def test_natural_key() -> None:
    names = ["layers.10.mlp", "layers.2.mlp", "layers.1.mlp", "head", "layers.2.attn"]
    assert sorted(names, key=natural_key) == [
        "head",
        "layers.1.mlp",
        "layers.2.attn",
        "layers.2.mlp",
        "layers.10.mlp",
    ]
