"""The global model as a PEFT adapter: full rank ``r_max``, or truncated for a client of rank ``r``.

For the methods that keep global factors (FedIT, HetLoRA, FlexLoRA, raFLoRA) the adapter is
``B_g, A_g`` (truncated to ``B_g[:, :r]``, ``A_g[:r, :]`` for a client of rank ``r`` — exactly what
such a client is sent, docs/methods.md#global-state-and-broadcast). FLoRA merges every round into
the base weights, so its result is the merged delta ``Σ_t B_s A_s``: the adapter is that delta's
SVD (all singular directions for the full export, the top ``r`` for a truncated one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import LoraConfig, PeftModel
from safetensors import SafetensorError
from torch import Tensor, nn

from raflora.adapters.factors import PEFT_PREFIX
from raflora.engine.rundir import replace_dir, write_failure
from raflora.linalg import factored_svd, frobenius_norm
from raflora.methods import Aggregator, GlobalState
from raflora.methods.base import Factors

__all__ = [
    "AdapterExport",
    "DeltaSVD",
    "adapter_factors",
    "delta_svd",
    "export_peft_adapter",
    "write_adapter",
]


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

    @property
    def relative_error(self) -> float:
        """``‖ΔW − B_r A_r‖_F / ‖ΔW‖_F = √(1 − energy_kept)`` over the modules (0 for the full
        export, to rounding): written to ``raflora_export.json`` beside the adapter, with the rank.
        """
        return math.sqrt(max(0.0, 1.0 - self.energy_kept))


_RANK_TOL = 1e-6
"""Singular values below this fraction of a module's largest are numerically zero."""

_DENSE_BELOW = 512
"""Modules with ``min(d, n)`` below this take the dense SVD (a fraction of a second each)."""
_SKETCH_START = 64
"""First sketch size of the adaptive range finder (doubled until the residual is negligible)."""
_OVERSAMPLE = 10
"""Least extra sketch columns of the randomized SVD (Halko et al. 2011, §4.2); it takes
``max(10, rank)`` (a sketch of twice the rank: slowly decaying spectra need it)."""
_POWER_ITERATIONS = 3
"""Subspace (power) iterations of the randomized SVD (Halko et al. 2011, Alg. 4.4)."""
_TEST_VECTORS = 10
"""Start vectors of the a-posteriori residual estimate (Halko et al. 2011, §4.3)."""


class DeltaSVD(NamedTuple):
    """Thin SVD ``U diag(S) Vh`` of one module's delta (descending ``S``).

    ``exact``: the singular triplets are those of the dense SVD to rounding — the dense or
    factored route, or a sketch whose residual is below ``_RANK_TOL σ_1`` (what the dense route
    counts as zero); ``False`` only for a randomized SVD of a matrix of larger numerical rank.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    exact: bool


def _numerical_rank(S: Tensor) -> int:
    """Singular values (descending) above ``_RANK_TOL`` times the largest."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int(torch.count_nonzero(S / S[0] > _RANK_TOL))


def _gaussian(rows: int, cols: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal ``(rows, cols)`` drawn on the CPU from ``generator`` (every device gets
    the same numbers, and the global RNG is never touched: an export must not change a run's
    random stream), in ``like``'s dtype and device.
    """
    draw = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return draw.to(device=like.device, dtype=like.dtype)


def _residual_norm(M: Tensor, Q: Tensor, generator: torch.Generator, steps: int = 6) -> float:
    """Estimate of ``‖M − Q Qᵀ M‖_2`` by block power iteration on the residual (``_TEST_VECTORS``
    Gaussian start vectors, re-orthonormalised each step; Halko et al. 2011, §4.3–4.5), times 1.25
    for safety: power iteration approaches the norm from below (a block of 10 over 6 steps
    comes within a few percent on the flat spectrum of rounding noise). A Frobenius-type bound would
    not do: a float32 delta's rounding spreads ~1e-7 σ_1 over every remaining direction, whose
    sum is far above what the dense route counts as zero. Each step costs two products with
    ``M`` of ``_TEST_VECTORS`` columns.
    """
    X = _gaussian(M.shape[1], _TEST_VECTORS, generator, M)
    value = 0.0
    for _ in range(steps):
        X, _ = torch.linalg.qr(X)
        Y = M @ X
        Y = Y - Q @ (Q.T @ Y)  # (I − Q Qᵀ) M X
        value = float(torch.linalg.matrix_norm(Y, ord=2))
        X = M.T @ Y  # Rᵀ Y = Mᵀ (I − Q Qᵀ) Y, and Y ⟂ Q
    return 1.25 * value


def _top_singular_value(M: Tensor, generator: torch.Generator, steps: int = 8) -> float:
    """A lower bound on ``σ_1(M)`` from a few power iterations (``‖M x‖`` for a unit ``x``)."""
    x = _gaussian(M.shape[1], 1, generator, M)
    value = 0.0
    for _ in range(steps):
        x = x / torch.linalg.vector_norm(x).clamp_min(1e-300)
        y = M @ x
        value = max(value, float(torch.linalg.vector_norm(y)))
        x = M.T @ y
    return value


def _from_range(M: Tensor, Q: Tensor, exact: bool) -> DeltaSVD:
    """The SVD of ``Q Qᵀ M`` through the small ``Qᵀ M`` (``k × n``) and its QR."""
    C = Q.T @ M  # (k, n), wide: LAPACK's SVD of it is slow, so through the QR of Cᵀ
    Q2, R2 = torch.linalg.qr(C.T)  # C = R2ᵀ Q2ᵀ, R2 (k, k)
    U_c, S, Vh_c = torch.linalg.svd(R2.T)
    return DeltaSVD(Q @ U_c, S, Vh_c @ Q2.T, exact)


def _adaptive_range(M: Tensor, generator: torch.Generator, limit: int) -> DeltaSVD | None:
    """Exact SVD of a numerically low-rank ``M`` from a growing Gaussian sketch, or ``None``
    when the sketch reaches ``limit`` columns first (Halko et al. 2011, §4.4: the sketch is
    doubled until the a-posteriori residual estimate is below ``_RANK_TOL σ_1``). Cost
    ``O(d n k)`` for a numerical rank ``k``, against ``O(d n min(d, n))`` for the dense SVD.
    """
    sigma = _top_singular_value(M, generator)
    if sigma == 0.0:
        return None  # a zero delta: the dense route answers it at once
    Y = M.new_zeros(M.shape[0], 0)
    k = _SKETCH_START
    while k <= limit:
        Y = torch.cat([Y, M @ _gaussian(M.shape[1], k - Y.shape[1], generator, M)], dim=1)
        Q, _ = torch.linalg.qr(Y)
        if _residual_norm(M, Q, generator) <= _RANK_TOL * sigma:
            return _from_range(M, Q, exact=True)
        k *= 2
    return None


def _randomized(M: Tensor, rank: int, generator: torch.Generator) -> DeltaSVD:
    """Randomized SVD with ``rank + max(10, rank)`` sketch columns and three subspace
    iterations (Halko et al. 2011, Alg. 4.4 and 5.1; what ``torch.svd_lowrank`` does, here with
    an explicit generator), truncated to ``rank``. Exact when ``M``'s residual is negligible.
    """
    k = rank + max(_OVERSAMPLE, rank)
    Q, _ = torch.linalg.qr(M @ _gaussian(M.shape[1], k, generator, M))
    for _ in range(_POWER_ITERATIONS):
        Z, _ = torch.linalg.qr(M.T @ Q)  # re-orthonormalised each half step (Alg. 4.4)
        Q, _ = torch.linalg.qr(M @ Z)
    U, S, Vh, _ = _from_range(M, Q, exact=False)
    exact = _residual_norm(M, Q, generator) <= _RANK_TOL * float(S[0]) if S.numel() else True
    return DeltaSVD(U[:, :rank], S[:rank], Vh[:rank], exact)


def delta_svd(
    delta: Tensor | None,
    factors: tuple[Tensor, Tensor] | None = None,
    rank: int | None = None,
    *,
    seed: int = 0,
) -> DeltaSVD:
    """Thin SVD of one module's cumulative delta ``M = delta + B A`` (either part may be absent),
    in float64: every singular triplet for ``rank=None``, the top ``rank`` otherwise.

    The route (docs/methods.md#flora; ``benchmarks/flora_export.py`` times them):

    * **factored** (``delta`` is ``None``): ``B A`` is a sum of known low-rank factors, and the
      QR of the stacked factors plus the SVD of the small core is exact
      (:func:`raflora.linalg.factored_svd`), ``O((d + n) R²)``;
    * **dense** (``min(d, n) < 512``, or a sketch as large as ``min(d, n) / 2``): the dense SVD,
      exact (the adapter export skips it for a whole export of such a delta and carries the
      delta itself, :func:`_delta_factors`);
    * **sketch** (``rank=None``): a Gaussian sketch doubled until the residual is below what the
      dense route counts as zero (``1e-6 σ_1``), so the result is the dense one to rounding, at
      ``O(d n k)`` for numerical rank ``k``;
    * **randomized** (``rank`` given): a randomized SVD with oversampling and three subspace
      iterations; exact when ``M``'s numerical rank fits the sketch, otherwise the top ``rank``
      triplets to the accuracy ``benchmarks/flora_export.py`` reports.

    Random draws come from a generator seeded with ``seed`` on the CPU: the same delta gives the
    same adapter in every process, and the run's random stream is left alone.
    """
    if delta is None:
        if factors is None:
            raise ValueError("delta_svd: neither a delta nor factors given")
        B, A = factors
        U, S, Vh = factored_svd(B.double(), A.double(), rank)
        return DeltaSVD(U, S, Vh, exact=True)
    M = delta.double()
    if factors is not None:
        M = M + factors[0].double() @ factors[1].double()
    found = _sketched_svd(M, rank, seed)
    return found if found is not None else _dense_svd(M, rank)


def _dense_svd(M: Tensor, rank: int | None) -> DeltaSVD:
    """The dense SVD of ``M`` (every triplet, or the top ``rank``): exact."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if rank is not None:
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    return DeltaSVD(U, S, Vh, exact=True)


def _sketched_svd(M: Tensor, rank: int | None, seed: int) -> DeltaSVD | None:
    """The sketch route (``rank=None``) or the randomized route (``rank`` given) of
    :func:`delta_svd` for a float64 ``M``; ``None`` where only the dense SVD answers: a module
    under ``_DENSE_BELOW`` wide, a numerical rank past ``min(d, n) / 2``, or a sketch for
    ``rank`` that large.
    """
    small = min(M.shape)
    if small < _DENSE_BELOW:
        return None
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        return _adaptive_range(M, generator, small // 2)
    if rank + max(_OVERSAMPLE, rank) < small // 2:
        return _randomized(M, rank, generator)
    return None


def _whole_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Exact factors of a delta of (nearly) full numerical rank, padded to ``rank`` columns:
    ``(ΔW, I_n)`` when ``n ≤ d``, ``(I_d, ΔW)`` otherwise. The delta itself, bit for bit: a
    whole export keeps every direction of such a delta anyway, so its SVD (the one dense
    ``O(d n min(d, n))`` step left, ~80 s for 39 modules of 2048² on two cores) buys nothing.
    """
    d, n = delta.shape
    B = delta.new_zeros(d, rank, dtype=torch.float32)
    A = delta.new_zeros(rank, n, dtype=torch.float32)
    if n <= d:
        B[:, :n] = delta
        A[:n] = torch.eye(n, dtype=torch.float32, device=delta.device)
    else:
        B[:, :d] = torch.eye(d, dtype=torch.float32, device=delta.device)
        A[:d] = delta
    return B, A


def _delta_factors(delta: Mapping[str, Tensor], rank: int | None) -> tuple[Factors, int, int]:
    """Factors of dense deltas, all at one rank (zero-padded where smaller), and the largest
    numerical rank seen (exact where every module's SVD was complete or reached past it).

    Each module's factors are its SVD's ``(UΣ, Vᵀ)`` (:func:`delta_svd`), except in a whole
    export (``rank=None``) of a module at least ``_DENSE_BELOW`` wide whose numerical rank passes
    ``min(d, n) / 2``: that delta is carried whole (:func:`_whole_factors`, rank ``min(d, n)``).

    ``rank=None`` keeps every numerically non-zero direction: the largest numerical rank over
    the modules (so the adapter reproduces the deltas to float precision without carrying
    ``min(d, n)`` columns of zeros).
    """
    svds: dict[str, DeltaSVD | None] = {}
    for name, dw in delta.items():
        M = dw.double()
        if min(M.shape) >= _DENSE_BELOW and not M.any():
            # a wide zero delta has no direction (it is not "full rank"; small ones keep their
            # dense SVD, bit for bit as before)
            d, n = M.shape
            svds[name] = DeltaSVD(M.new_zeros(d, 0), M.new_zeros(0), M.new_zeros(0, n), True)
            continue
        found = _sketched_svd(M, rank, seed=0)
        if found is None and (rank is not None or min(M.shape) < _DENSE_BELOW):
            found = _dense_svd(M, rank)
        svds[name] = found  # None: carried whole
    numerical = max(
        1, *(min(delta[k].shape) if s is None else _numerical_rank(s.S) for k, s in svds.items())
    )
    out_rank = numerical if rank is None else int(rank)
    factors: Factors = {}
    for name, found in svds.items():
        dw = delta[name]
        if found is None:
            factors[name] = _whole_factors(dw, out_rank)
            continue
        U, S, Vh, _ = found
        k = min(out_rank, S.numel())
        B = torch.zeros(dw.shape[0], out_rank, dtype=torch.float64, device=dw.device)
        A = torch.zeros(out_rank, dw.shape[1], dtype=torch.float64, device=dw.device)
        B[:, :k] = U[:, :k] * S[:k]
        A[:k] = Vh[:k]
        factors[name] = (B.float(), A.float())
    return factors, out_rank, numerical


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
        The factors, their rank and the share of energy kept (``Σ‖B_r A_r‖²_F / Σ‖ΔW‖²_F``;
        the relative Frobenius error of the adapter is ``√(1 − kept)``).
    """
    if state.base_delta:
        # merged residuals (FLoRA, FedEx-LoRA, FedHL) plus the global product on top of them
        delta = dict(state.base_delta)
        for name, (B, A) in aggregator.model_factors(state).items():
            if B.any() and A.any():
                delta[name] = delta[name] + B @ A
        factors, out_rank, full_rank = _delta_factors(delta, rank)
        if rank is not None and not 1 <= rank <= full_rank:
            raise ValueError(f"rank must be in 1…{full_rank}, got {rank}")
        total = sum(float(torch.linalg.vector_norm(v.double())) ** 2 for v in delta.values())
    else:
        full = aggregator.model_factors(state)
        out_rank = aggregator.r_max if rank is None else int(rank)
        if out_rank < 1 or out_rank > aggregator.r_max:
            raise ValueError(f"rank must be in 1…{aggregator.r_max} (r_max), got {out_rank}")
        factors = {k: (B[:, :out_rank], A[:out_rank]) for k, (B, A) in full.items()}
        total = sum(float(frobenius_norm(B, A)) ** 2 for B, A in full.values())
    kept = sum(float(frobenius_norm(B, A)) ** 2 for B, A in factors.values())
    return factors, out_rank, (min(1.0, kept / total) if total > 0 else 1.0)


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
    result = AdapterExport(Path(out_dir), out_rank, kept)
    # what the adapter is, in a file of its own beside it: its rank and how far it is from the
    # global update (not in the safetensors header, whose metadata map is written in an order
    # that changes from process to process: the same run would not give the same bytes)
    record = {
        "rank": out_rank,
        "energy_kept": kept,
        "relative_error": result.relative_error,
    }

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
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _write_base_requirement(tmp, meta)

    replace_dir(Path(out_dir), build)
    return result


EXPORT_FILE = "raflora_export.json"
"""Written beside every adapter: its rank, the share of the global update's energy it keeps and
its relative error (``energy_kept``, ``relative_error``, ``rank``)."""

BASE_FILE = "raflora_base.json"
"""Written beside a quantised run's adapter: the base it was trained over (docs/quantization.md)."""


def _write_base_requirement(out: Path, meta: Mapping[str, Any]) -> None:
    """Record which base, and which quantisation of it, the adapter was trained over (nothing
    for a float base: the adapter's ``base_model_name_or_path`` says it all).
    """
    quantization = meta.get("quantization", "none")
    if quantization == "none":
        return
    from raflora.tasks.quantize import bnb_config

    record = {
        "base_model_name_or_path": meta.get("model_id"),
        "quantization": quantization,
        "bitsandbytes_config": meta.get("bitsandbytes_config"),
        "how": "load the base with transformers' BitsAndBytesConfig(**bitsandbytes_config) "
        "(from_pretrained(..., quantization_config=...)), then PeftModel.from_pretrained; "
        "the adapter was trained over these quantised weights",
    }
    if record["bitsandbytes_config"] is None:
        quant = bnb_config(str(quantization))
        record["bitsandbytes_config"] = (
            None if quant is None else json.loads(quant.to_json_string())
        )
    (out / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")


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
    save_file(
        tensors,
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},  # one key: a map of several is written in no fixed order
    )
    return out
