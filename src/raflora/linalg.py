"""Exact low-rank algebra on factored matrices (docs/methods.md#aggregation-rules).

Every aggregation rule in this package produces a matrix of the form

    ΔW = Σ_k w_k B_k A_k = B_cat A_cat,   B_cat (d, R),  A_cat (R, n),  R = Σ_k r_k,

and FlexLoRA / raFLoRA then need its truncated SVD (paper Eqs. 3–4). Forming the ``d × n``
matrix and running a dense SVD costs ``O(d n min(d, n))``; here it is computed exactly from the
factors:

    B_cat = Q_b R_b          (reduced QR, Q_b (d, k_b), R_b (k_b, R))
    A_catᵀ = Q_a R_a         (reduced QR, Q_a (n, k_a), R_a (k_a, R))
    ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, and the small core R_b R_aᵀ (k_b, k_a) is SVD'd,

in ``O((d + n) R² + R³)`` time and ``O((d + n) R)`` memory. All functions accept leading batch
dimensions (``(..., d, R)``), so modules of one shape are processed in one call, and run on any
device. Half-precision inputs are computed in float32 (torch's QR/SVD need it) and cast back.

Degenerate blocks never reach LAPACK. A matrix of a batch that is all zero (or empty) gets its
exact decomposition directly — identity bases and zero values, which is also what LAPACK returns
for it — and one holding NaN or ±inf gets NaN for every output (its decomposition is undefined).
Only the other matrices go to ``torch.linalg``; a batch without degenerate matrices takes the
unguarded call, so its numbers are unchanged. The guarded decompositions (:func:`guarded_qr`,
:func:`guarded_svd`, :func:`guarded_svdvals`, :func:`guarded_eigh`) serve any caller. (MKL's SVD
writes ``Intel oneMKL ERROR: Parameter 4 was incorrect on entry to DLASCL`` to the process's
stdout when a matrix holds ±inf, and returns garbage singular values without an error. It
prints the same on some finite cores with exactly repeated and numerically zero singular values,
e.g. one of ``raflora theory``'s Monte Carlo with two MKL threads, and then does not converge:
:func:`_small_svd` falls back to the Gram matrix, and the command keeps such output off its
stdout.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FactoredSVD",
    "degenerate_matrices",
    "factored_energy",
    "factored_svd",
    "frobenius_norm",
    "guarded_eigh",
    "guarded_qr",
    "guarded_svd",
    "guarded_svdvals",
    "svd_to_factors",
]

_COMPUTE_DTYPES = (torch.float32, torch.float64)


class FactoredSVD(NamedTuple):
    """Thin SVD ``B A = U diag(S) Vh`` of a factored matrix.

    Shapes: ``U (..., d, k)``, ``S (..., k)`` descending, ``Vh (..., k, n)`` with
    ``k = min(d, n, R)``.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _COMPUTE_DTYPES else torch.float32


# --------------------------------------------------------------------------- guarded LAPACK


def degenerate_matrices(x: Tensor) -> tuple[Tensor, Tensor]:
    """Masks over the batch dimensions of ``x (..., m, n)``: ``(zero, nonfinite)``.

    ``zero``: every entry is 0 (an empty matrix included); ``nonfinite``: some entry is NaN or
    ±inf. The two are disjoint. These are the blocks no LAPACK routine here is handed.
    """
    nonfinite = ~torch.isfinite(x).flatten(-2).all(dim=-1)
    zero = ~(x != 0).flatten(-2).any(dim=-1)  # NaN != 0, so a non-finite matrix is not zero
    return zero, nonfinite


def _guarded(
    x: Tensor,
    call: Callable[[Tensor], Sequence[Tensor]],
    exact_zero: Callable[[Tensor], Sequence[Tensor]],
) -> tuple[Tensor, ...]:
    """``call(x)`` per matrix of the batch, its degenerate matrices answered without it.

    ``exact_zero(x)`` gives the outputs for one all-zero matrix of ``x``'s shape (no batch
    dimensions); a non-finite matrix gets the same shapes filled with NaN.
    """
    zero, nonfinite = degenerate_matrices(x)
    if not bool((zero | nonfinite).any()):
        return tuple(call(x))  # the unguarded call: the non-degenerate numbers are unchanged
    batch = x.shape[:-2]
    flat = x.reshape(math.prod(batch), *x.shape[-2:])  # explicit: an empty matrix has no -1
    zero, nonfinite = zero.reshape(-1), nonfinite.reshape(-1)
    regular = ~(zero | nonfinite)
    outs = [t.expand(flat.shape[0], *t.shape).clone() for t in exact_zero(x)]
    for out in outs:
        out[nonfinite] = torch.nan
    if bool(regular.any()):
        for out, part in zip(outs, call(flat[regular]), strict=True):
            out[regular] = part
    return tuple(out.reshape(*batch, *out.shape[1:]) for out in outs)


def _eye(x: Tensor, rows: int, cols: int) -> Tensor:
    return torch.eye(rows, cols, dtype=x.dtype, device=x.device)


def _zeros(x: Tensor, *shape: int) -> Tensor:
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def guarded_qr(x: Tensor, mode: str = "reduced") -> tuple[Tensor, Tensor]:
    """``torch.linalg.qr`` (``mode`` reduced or complete) guarded: ``Q = I``, ``R = 0`` on zero."""
    m, n = x.shape[-2:]
    k = min(m, n) if mode == "reduced" else m
    Q, R = _guarded(
        x,
        lambda y: torch.linalg.qr(y, mode=mode),
        lambda y: (_eye(y, m, k), _zeros(y, k, n)),
    )
    return Q, R


def guarded_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin ``torch.linalg.svd`` guarded: ``U = I``, ``S = 0``, ``Vh = I`` on zero."""
    m, n = x.shape[-2:]
    k = min(m, n)
    U, S, Vh = _guarded(
        x,
        lambda y: torch.linalg.svd(y, full_matrices=False),
        lambda y: (_eye(y, m, k), _zeros(y, k), _eye(y, k, n)),
    )
    return U, S, Vh


def guarded_svdvals(x: Tensor) -> Tensor:
    """``torch.linalg.svdvals`` guarded: zeros on zero."""
    k = min(x.shape[-2:])
    (S,) = _guarded(x, lambda y: (torch.linalg.svdvals(y),), lambda y: (_zeros(y, k),))
    return S


def guarded_eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` (ascending) guarded: eigenvalues 0 and ``I`` on zero."""
    n = x.shape[-1]
    L, W = _guarded(x, torch.linalg.eigh, lambda y: (_zeros(y, n), _eye(y, n, n)))
    return L, W


def _check_pair(B: Tensor, A: Tensor) -> None:
    if B.ndim < 2 or A.ndim < 2:
        raise ValueError(
            f"factors must be at least 2-D, got B {tuple(B.shape)}, A {tuple(A.shape)}"
        )
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"inner dimensions differ: B is {tuple(B.shape)} (…, d, R), "
            f"A is {tuple(A.shape)} (…, R, n)"
        )


def _core(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(Q_b, core, Q_a)`` with ``B A = Q_b core Q_aᵀ`` (computed in float32/64)."""
    _check_pair(B, A)
    dtype = _compute_dtype(torch.promote_types(B.dtype, A.dtype))
    Q_b, R_b = guarded_qr(B.to(dtype))  # (…, d, k_b), (…, k_b, R)
    Q_a, R_a = guarded_qr(A.to(dtype).transpose(-1, -2))  # (…, n, k_a), (…, k_a, R)
    return Q_b, R_b @ R_a.transpose(-1, -2), Q_a  # core (…, k_b, k_a)


def _small_svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the small core, robust to LAPACK's rare non-convergence.

    ``gesdd`` can fail to converge on inputs with many exactly repeated singular values (e.g. a
    global update fed back unchanged by every client). The fallback diagonalises the symmetric
    Gram matrix ``coreᵀ core = W Λ Wᵀ`` (``syevd`` always converges), takes ``σ_i = ‖core w_i‖``
    and orthonormalises ``core W`` by QR, which also completes the left vectors of zero
    singular values. Its accuracy on the smallest singular values is that of the Gram matrix
    (relative to ``σ_1²``), which the SVD path does not lose.
    """
    try:
        return guarded_svd(core)
    except torch.linalg.LinAlgError:  # type: ignore[attr-defined]
        pass
    k = min(core.shape[-2], core.shape[-1])
    _, W = guarded_eigh(core.transpose(-1, -2) @ core)  # ascending eigenvalues
    W = W.flip(-1)[..., :k]  # (…, k_a, k): leading right singular vectors
    US = core @ W  # (…, k_b, k) = U diag(σ)
    S = torch.linalg.vector_norm(US, dim=-2)
    S, order = S.sort(dim=-1, descending=True)
    W = W.gather(-1, order.unsqueeze(-2).expand_as(W))
    US = US.gather(-1, order.unsqueeze(-2).expand_as(US))
    Q, R = guarded_qr(US)
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    U = Q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)
    return U, S, W.transpose(-1, -2)


def factored_svd(B: Tensor, A: Tensor, rank: int | None = None) -> FactoredSVD:
    """Truncated SVD of ``B @ A`` without forming it.

    Parameters
    ----------
    B : Tensor
        Left factor ``(..., d, R)``.
    A : Tensor
        Right factor ``(..., R, n)``.
    rank : int, optional
        Keep the top ``rank`` triplets (at most ``min(d, n, R)`` exist); all when omitted.

    Returns
    -------
    FactoredSVD
        ``U (..., d, k)``, ``S (..., k)``, ``Vh (..., k, n)`` in float64 for float64 inputs and
        float32 otherwise, singular values descending.
    """
    Q_b, core, Q_a = _core(B, A)
    U_c, S, Vh_c = _small_svd(core)
    if rank is not None:
        if rank < 0:
            raise ValueError(f"rank must be non-negative, got {rank}")
        U_c, S, Vh_c = U_c[..., :rank], S[..., :rank], Vh_c[..., :rank, :]
    U = Q_b @ U_c  # (…, d, k)
    Vh = Vh_c @ Q_a.transpose(-1, -2)  # (…, k, n)
    return FactoredSVD(U, S, Vh)


def factored_energy(B: Tensor, A: Tensor) -> Tensor:
    """Energy spectrum ``σ_i²`` of ``B @ A`` (descending, length ``min(d, n, R)``).

    Only singular values are computed (no singular vectors), in float32/float64.
    """
    _, core, _ = _core(B, A)
    energy: Tensor = guarded_svdvals(core).square()
    return energy


def frobenius_norm(B: Tensor, A: Tensor) -> Tensor:
    """``‖B A‖_F`` from the factors: ``‖BA‖_F² = Σ (BᵀB) ⊙ (AAᵀ)``, cost ``O((d + n) R²)``."""
    _check_pair(B, A)
    dtype = _compute_dtype(torch.promote_types(B.dtype, A.dtype))
    B, A = B.to(dtype), A.to(dtype)
    gram_b = B.transpose(-1, -2) @ B  # (…, R, R)
    gram_a = A @ A.transpose(-1, -2)  # (…, R, R)
    return (gram_b * gram_a).sum(dim=(-1, -2)).clamp_min(0).sqrt()


def _orthonormal_complement(Vh: Tensor, extra: int) -> Tensor:
    """Rows orthonormal to each other and to the rows of ``Vh (..., k, n)``; ``extra`` of them.

    Uses a complete QR of ``Vhᵀ``: its trailing ``n - k`` columns span the complement. Only used
    when the aggregate has fewer than ``r_max`` directions, i.e. rarely and on small ``k``.
    """
    n, k = Vh.shape[-1], Vh.shape[-2]
    extra = min(extra, n - k)
    if extra <= 0:
        return Vh.new_zeros((*Vh.shape[:-2], 0, n))
    Q, _ = guarded_qr(Vh.transpose(-1, -2), mode="complete")  # (…, n, n)
    complement: Tensor = Q[..., k : k + extra].transpose(-1, -2)
    return complement


def svd_to_factors(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Global LoRA factors of rank ``rank`` from the truncated SVD of ``B @ A`` (paper Eq. 4).

    ``B_g = [σ_1 u_1 … σ_r u_r]`` (all singular values on B) and ``A_g = [v_1 … v_r]ᵀ`` (orthonormal
    rows), so ``B_g A_g`` is the best rank-``rank`` approximation of ``B A``.

    When ``B A`` has fewer than ``rank`` singular triplets (``min(d, n, R) < rank``), ``A_g`` is
    completed with orthonormal rows from the complement of the row space and ``B_g`` with zero
    columns — exactly what a full SVD returns for zero singular values. This keeps every
    broadcast direction trainable (a LoRA pair with both factors zero gets no gradient) and leaves
    ``B_g A_g`` unchanged.

    Returns
    -------
    tuple of Tensor
        ``B_g (..., d, rank)`` and ``A_g (..., rank, n)`` in the dtype of the inputs.
    """
    out_dtype = torch.promote_types(B.dtype, A.dtype)
    U, S, Vh = factored_svd(B, A, rank)
    B_g = U * S.unsqueeze(-2)  # (…, d, k): column i is σ_i u_i
    A_g = Vh  # (…, k, n)
    missing = rank - S.shape[-1]
    if missing > 0:
        complement = _orthonormal_complement(Vh, missing)
        A_g = torch.cat([A_g, complement], dim=-2)
        still_missing = rank - A_g.shape[-2]  # only when rank > n: no more orthonormal rows exist
        if still_missing > 0:
            A_g = torch.cat(
                [A_g, A_g.new_zeros((*A_g.shape[:-2], still_missing, A_g.shape[-1]))], -2
            )
        B_g = torch.cat([B_g, B_g.new_zeros((*B_g.shape[:-1], missing))], dim=-1)
    return B_g.to(out_dtype), A_g.to(out_dtype)
