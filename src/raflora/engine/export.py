"""The global model as a PEFT adapter: full rank ``r_max``, or truncated for a client of rank ``r``.

For the methods that keep global factors (FedIT, HetLoRA, FlexLoRA, raFLoRA) the adapter is
``B_g, A_g`` (truncated to ``B_g[:, :r]``, ``A_g[:r, :]`` for a client of rank ``r`` — exactly what
such a client is sent, docs/methods.md#global-state-and-broadcast). FLoRA merges every round into
the base weights, so its result is the merged delta ``Σ_t B_s A_s``: the adapter is that delta's
SVD (all singular directions for the full export, the top ``r`` for a truncated one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from safetensors import SafetensorError
from torch import Tensor, nn

from raflora.adapters.factors import PEFT_PREFIX
from raflora.engine.rundir import replace_dir, write_failure
from raflora.linalg import frobenius_norm
from raflora.methods import Aggregator, GlobalState
from raflora.methods.base import Factors

__all__ = ["AdapterExport", "adapter_factors", "export_peft_adapter", "write_adapter"]


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


def export_peft_adapter(
    base_model_or_peft: nn.Module | None,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    dense: Mapping[str, Tensor] | None,
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a standard PEFT LoRA adapter directory for the given effective factors.

    The adapter has ``r = lora_alpha = rank`` (scaling 1, no rsLoRA), so the saved
    ``lora_B.weight`` is ``B_eff[:, :rank]`` and ``lora_A.weight`` is ``A[:rank]``.
    ``PeftModel.from_pretrained(fresh_base_model, out_dir)`` then computes ``W + B_eff A`` on
    every module, like the in-memory model. No model copy is made.

    Parameters
    ----------
    base_model_or_peft : nn.Module | None
        The base model or the ``PeftModel``; used to check shapes and for
        ``base_model_name_or_path``. ``None`` skips the shape checks against a model (the
        factors' own consistency is still checked).
    factors : Mapping[str, tuple[Tensor, Tensor]]
        Canonical module name → effective ``(B (d, r'), A (r', n))`` with ``r' >= rank``.
    dense : Mapping[str, Tensor] | None
        ``modules_to_save`` tensors, canonical names (as :func:`get_dense` returns).
    out_dir : str | os.PathLike[str]
        Output directory (created).
    rank : int
        Rank of the exported adapter (factors are truncated to it).
    target_modules : Sequence[str] | str | None
        PEFT ``target_modules``; ``None`` uses the factors' module names.
    modules_to_save : Sequence[str] | None
        PEFT ``modules_to_save``; required when ``dense`` is non-empty (unless ``task_type``
        implies it, as ``"SEQ_CLS"`` does).
    task_type : str | None
        PEFT task type.
    base_model_name_or_path : str | None
        Recorded in ``adapter_config.json``; defaults to the model's ``name_or_path``.

    Returns
    -------
    Path
        ``out_dir``.
    """
    from safetensors.torch import save_file

    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not factors:
        raise ValueError("export_peft_adapter: no factors given")
    root: nn.Module | None = (
        base_model_or_peft.get_base_model()
        if isinstance(base_model_or_peft, PeftModel)
        else base_model_or_peft
    )
    tensors: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        out_f = in_f = None
        if root is not None:
            try:
                module = root.get_submodule(name)
            except AttributeError as err:
                raise KeyError(f"export_peft_adapter: no module named {name!r}") from err
            out_f = getattr(module, "out_features", None)
            in_f = getattr(module, "in_features", None)
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"module {name!r}: B (d, r) and A (r, n) expected, got B {tuple(B.shape)} "
                f"and A {tuple(A.shape)}"
            )
        if (out_f is not None and B.shape[0] != out_f) or (in_f is not None and A.shape[1] != in_f):
            raise ValueError(
                f"module {name!r}: weight is ({out_f}, {in_f}), got B {tuple(B.shape)} and "
                f"A {tuple(A.shape)}"
            )
        if B.shape[1] < rank:
            raise ValueError(f"module {name!r}: factors have rank {B.shape[1]} < rank {rank}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A[:rank].detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B[:, :rank].detach().cpu().contiguous()

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=0.0,
        target_modules=(
            sorted(factors)
            if target_modules is None
            else target_modules
            if isinstance(target_modules, str)
            else list(target_modules)
        ),
        modules_to_save=None if modules_to_save is None else list(modules_to_save),
        task_type=task_type,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path
        or getattr(root, "name_or_path", None)
        or None,
    )
    if dense:
        # PEFT's task models add their heads at load time (SEQ_CLS: classifier, score).
        if not config.modules_to_save and task_type is None:
            raise ValueError(
                "export_peft_adapter: dense tensors given but no modules_to_save "
                "(pass modules_to_save or a task_type that implies it)"
            )
        for key, value in dense.items():
            tensors[f"{PEFT_PREFIX}{key}"] = value.detach().cpu().contiguous()

    if isinstance(config.target_modules, set):
        # PEFT keeps them as a set, whose order follows the process's string hashing: written
        # sorted, the same run gives the same adapter_config.json byte for byte
        config.target_modules = sorted(config.target_modules)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
