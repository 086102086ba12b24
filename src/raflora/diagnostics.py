"""Rank-collapse diagnostics (docs/methods.md#rank-collapse-diagnostics; paper Section 3,
Definition 4.1, Table 4, Figure 2).

The energy of direction ``i`` is ``σ_i²`` of the global update (its top ``r_max`` directions):
``B_g A_g`` for FedIT/HetLoRA/FlexLoRA/raFLoRA, the round's stacked update ``B_s A_s`` for FLoRA.
``ρ_r = Σ_{i≤r} σ_i² / Σ_{i≤r_max} σ_i²`` is the cumulative energy ratio and the **higher-rank
energy ratio** ``1 − ρ_{r_1}`` (``r_1`` the smallest rank level) is the paper's Table 4 quantity:
it decays to zero under rank collapse. A zero update has no energy; its ratios are reported as
``ρ_r = 1`` and ``1 − ρ_{r_1} = 0`` in the means; per module (:func:`module_energy_row`, one line
of a run's ``energy.jsonl``) it is reported as ``null``, so a collapsed module (``0``) and a module
that was never updated (``null``) can be told apart.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from raflora.linalg import factored_energy

__all__ = [
    "EnergyReport",
    "ModuleEnergy",
    "cumulative_energy_ratios",
    "energy_report",
    "energy_spectrum",
    "higher_rank_energy",
    "module_energy_row",
    "natural_key",
]


def energy_spectrum(B: Tensor, A: Tensor, max_rank: int | None = None) -> Tensor:
    """``σ_i²`` of ``B @ A``, descending (1-D for 2-D factors), top ``max_rank`` when given."""
    energy = factored_energy(B, A)
    return energy if max_rank is None else energy[..., :max_rank]


def cumulative_energy_ratios(spectrum: Tensor, ranks: Sequence[int]) -> Tensor:
    """``ρ_r`` for each ``r`` in ``ranks`` (last dim), from a descending energy spectrum."""
    cumulative = torch.nn.functional.pad(spectrum, (0, 1)).cumsum(dim=-1)  # trailing 0: L = 0 ok
    total = cumulative[..., -1:]
    # index min(r, L) - 1; for an empty spectrum that is -1, the (zero) total
    idx = torch.tensor([min(r, spectrum.shape[-1]) - 1 for r in ranks], device=spectrum.device)
    at = cumulative[..., idx]
    positive = total > 0
    return torch.where(positive, at / torch.where(positive, total, torch.ones_like(total)), 1.0)


def higher_rank_energy(
    B: Tensor, A: Tensor, shared_rank: int, max_rank: int | None = None
) -> float:
    """``1 − ρ_{r_1}`` of ``B @ A`` in ``[0, 1]``: the energy share beyond the shared rank.

    ``max_rank`` restricts the total to the top ``max_rank`` directions (the diagnostics use
    ``r_max``, docs/methods.md#rank-collapse-diagnostics).
    """
    if shared_rank < 1:
        raise ValueError(f"shared_rank must be ≥ 1, got {shared_rank}")
    spectrum = energy_spectrum(B, A, max_rank)
    rho = cumulative_energy_ratios(spectrum, [shared_rank])
    return float((1.0 - rho).clamp(0.0, 1.0).reshape(-1)[0])


@dataclass(frozen=True)
class ModuleEnergy:
    """Energy diagnostics of one module's global update."""

    spectrum: list[float]
    """``σ_i²``, top ``r_max``, descending."""
    cumulative: dict[int, float]
    """``ρ_r`` at every rank level ``r``."""
    higher_rank_energy: float
    """``1 − ρ_{r_1}``."""


@dataclass(frozen=True)
class EnergyReport:
    """Per-module diagnostics and their means over modules (the numbers the engine records)."""

    modules: dict[str, ModuleEnergy]
    higher_rank_energy: float
    cumulative: dict[int, float]

    def to_dict(self, *, include_modules: bool = False) -> dict[str, Any]:
        """JSON-ready dict; per-module spectra only on request (they are large)."""
        out: dict[str, Any] = {
            "higher_rank_energy": self.higher_rank_energy,
            "energy_at_rank": {str(r): v for r, v in self.cumulative.items()},
        }
        if include_modules:
            out["modules"] = {
                name: {
                    "spectrum": m.spectrum,
                    "energy_at_rank": {str(r): v for r, v in m.cumulative.items()},
                    "higher_rank_energy": m.higher_rank_energy,
                }
                for name, m in self.modules.items()
            }
        return out


def energy_report(
    factors: Mapping[str, tuple[Tensor, Tensor]], rank_levels: Sequence[int]
) -> EnergyReport:
    """Diagnostics of a whole model's global update, batched over modules of one shape.

    Parameters
    ----------
    factors : Mapping[str, tuple[Tensor, Tensor]]
        Module name → ``(B (d, R), A (R, n))``.
    rank_levels : Sequence[int]
        The configured rank levels; ``r_1 = min``, ``r_max = max``.
    """
    levels = sorted(int(r) for r in rank_levels)
    r_max = levels[-1]
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = defaultdict(list)
    for name in sorted(factors):
        B, A = factors[name]
        groups[(tuple(B.shape), tuple(A.shape))].append(name)
    modules: dict[str, ModuleEnergy] = {}
    for names in groups.values():
        B = torch.stack([factors[m][0].detach() for m in names])
        A = torch.stack([factors[m][1].detach() for m in names])
        spectra = energy_spectrum(B, A, r_max)  # (m, ≤ r_max)
        rho = cumulative_energy_ratios(spectra, levels)  # (m, P)
        for i, m in enumerate(names):
            values = rho[i].tolist()
            modules[m] = ModuleEnergy(
                spectrum=spectra[i].tolist(),
                cumulative=dict(zip(levels, values, strict=True)),
                higher_rank_energy=min(1.0, max(0.0, 1.0 - values[0])),
            )
    count = max(len(modules), 1)
    return EnergyReport(
        modules=modules,
        higher_rank_energy=sum(m.higher_rank_energy for m in modules.values()) / count,
        cumulative={r: sum(m.cumulative[r] for m in modules.values()) / count for r in levels},
    )


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``layers.2`` before ``layers.10`` (digit runs compare as numbers)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    )


def _module_entry(module: ModuleEnergy) -> dict[str, Any]:
    """``higher_rank_energy`` and ``energy_per_level`` of one module; ``None`` without energy."""
    total = math.fsum(module.spectrum)
    if not (math.isfinite(total) and total > 0.0):  # zero update, or a non-finite one
        return {"higher_rank_energy": None, "energy_per_level": None}
    return {
        "higher_rank_energy": module.higher_rank_energy,
        "energy_per_level": {str(r): v for r, v in module.cumulative.items()},
    }


def module_energy_row(round_index: int, report: EnergyReport) -> dict[str, Any]:
    """One round's per-module diagnostics: a JSON-ready line of a run's ``energy.jsonl``.

    Built from the spectra :func:`energy_report` already computed (no further SVD).

    Parameters
    ----------
    round_index : int
        The 1-based round the report describes.
    report : EnergyReport
        That round's :func:`energy_report` of the global update.

    Returns
    -------
    dict[str, Any]
        ``{"round": t, "modules": {name: {"higher_rank_energy": 1 − ρ_{r_1},
        "energy_per_level": {"8": ρ_8, …}}}}`` with modules in natural name order (layer 2
        before layer 10). A module without energy (a zero update, FLoRA's empty stack) or with a
        non-finite spectrum has ``null`` for both values, so the row never holds ``NaN``.
    """
    names = sorted(report.modules, key=natural_key)
    return {
        "round": int(round_index),
        "modules": {name: _module_entry(report.modules[name]) for name in names},
    }
