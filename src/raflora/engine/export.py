"""The global model as a PEFT adapter: full rank ``r_max``, or truncated for a client of rank ``r``.

For the methods that keep global factors (FedIT, HetLoRA, FlexLoRA, raFLoRA) the adapter is
``B_g, A_g`` (truncated to ``B_g[:, :r]``, ``A_g[:r, :]`` for a client of rank ``r`` — exactly what
such a client is sent, SPEC §2). FLoRA merges every round into the base weights, so its result is
the merged delta ``Σ_t B_s A_s``: the adapter is that delta's SVD (all singular directions for
the full export, the top ``r`` for a truncated one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from raflora.adapters import export_peft_adapter
from raflora.engine.rundir import replace_dir, write_failure
from raflora.linalg import frobenius_norm
from raflora.methods import Aggregator, GlobalState
from raflora.methods.base import Factors

__all__ = ["AdapterExport", "adapter_factors", "write_adapter"]


@dataclass(frozen=True)
class AdapterExport:
    """What was written.

    Attributes
    ----------
    path : Path
        The adapter directory.
    rank : int
        The adapter's rank.
    energy_kept : float
        ``Σ‖B_r A_r‖²_F / Σ‖B A‖²_F`` over modules: share of the global update's energy kept
        (1 for the full export).
    """

    path: Path
    rank: int
    energy_kept: float


_RANK_TOL = 1e-6
"""Singular values below this fraction of a module's largest are numerically zero."""


def _numerical_rank(S: Tensor) -> int:
    """Singular values (descending) above ``_RANK_TOL`` times the largest."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int(torch.count_nonzero(S / S[0] > _RANK_TOL))


def _delta_factors(delta: Mapping[str, Tensor], rank: int | None) -> tuple[Factors, int]:
    """SVD factors ``(UΣ, Vᵀ)`` of dense deltas, all at one rank (zero-padded where smaller).

    ``rank=None`` keeps every numerically non-zero direction: the largest numerical rank over
    the modules (so the adapter reproduces the deltas to float precision without carrying
    ``min(d, n)`` columns of zeros).
    """
    svds = {k: torch.linalg.svd(v.double(), full_matrices=False) for k, v in delta.items()}
    if rank is None:
        numerical = [_numerical_rank(S) for _, S, _ in svds.values()]
        out_rank = max(1, *numerical)
    else:
        out_rank = int(rank)
    factors: Factors = {}
    for name, (U, S, Vh) in svds.items():
        k = min(out_rank, S.numel())
        dw = delta[name]
        B = torch.zeros(dw.shape[0], out_rank, dtype=torch.float64)
        A = torch.zeros(out_rank, dw.shape[1], dtype=torch.float64)
        B[:, :k] = U[:, :k] * S[:k]
        A[:k] = Vh[:k]
        factors[name] = (B.float(), A.float())
    return factors, out_rank


def adapter_factors(
    aggregator: Aggregator, state: GlobalState, rank: int | None = None
) -> tuple[Factors, int, float]:
    """Factors of the global update relative to the original base model.

    Parameters
    ----------
    aggregator : Aggregator
        The run's method.
    state : GlobalState
        The final global state.
    rank : int, optional
        Truncate for a client of this rank (``None``: the whole global update).

    Returns
    -------
    tuple[Factors, int, float]
        The factors, their rank and the share of energy kept.
    """
    if state.base_delta:
        # merged residuals (FLoRA, FedEx-LoRA) plus the global product on top of them
        delta = dict(state.base_delta)
        for name, (B, A) in aggregator.model_factors(state).items():
            if B.any() and A.any():
                delta[name] = delta[name] + B @ A
        full, full_rank = _delta_factors(delta, None)
        if rank is not None and not 1 <= rank <= full_rank:
            raise ValueError(f"rank must be in 1…{full_rank}, got {rank}")
        factors, out_rank = (full, full_rank) if rank is None else _delta_factors(delta, rank)
    else:
        full = aggregator.model_factors(state)
        out_rank = aggregator.r_max if rank is None else int(rank)
        if out_rank < 1 or out_rank > aggregator.r_max:
            raise ValueError(f"rank must be in 1…{aggregator.r_max} (r_max), got {out_rank}")
        factors = {k: (B[:, :out_rank], A[:out_rank]) for k, (B, A) in full.items()}
    total = sum(float(frobenius_norm(B, A)) ** 2 for B, A in full.values())
    kept = sum(float(frobenius_norm(B, A)) ** 2 for B, A in factors.values())
    return factors, out_rank, (kept / total if total > 0 else 1.0)


def write_adapter(
    out_dir: Path,
    aggregator: Aggregator,
    state: GlobalState,
    meta: Mapping[str, Any],
    *,
    rank: int | None = None,
) -> AdapterExport:
    """Write the global (or rank-``rank``) adapter in PEFT format to ``out_dir``.

    ``meta`` carries ``model_id``, ``target_modules``, ``modules_to_save`` and ``task_type``
    (saved in the run's checkpoint), so no model has to be loaded. The adapter is written to a
    temporary directory and swapped in (:func:`~raflora.engine.rundir.replace_dir`): an
    interruption leaves the previous adapter or the new one, never half of one.
    """
    factors, out_rank, kept = adapter_factors(aggregator, state, rank)

    def build(tmp: Path) -> None:
        try:
            export_peft_adapter(
                None,
                factors,
                state.dense,
                tmp,
                rank=out_rank,
                target_modules=meta.get("target_modules"),
                modules_to_save=meta.get("modules_to_save"),
                task_type=meta.get("task_type"),
                base_model_name_or_path=meta.get("model_id"),
            )
        except SafetensorError as err:  # safetensors reports a failed write (a full disk) so
            raise write_failure(Path(out_dir), err) from err

    replace_dir(Path(out_dir), build)
    return AdapterExport(Path(out_dir), out_rank, kept)
