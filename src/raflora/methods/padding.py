"""Zero padding and index-wise averaging of heterogeneous-rank factors
(docs/methods.md#aggregation-rules).

Shared by the factor-averaging methods. Every function works on tensors with leading batch
dimensions (a batch of same-shape modules): ``B (…, d, r)``, ``A (…, r, n)``. Sums are taken in
float64 and returned in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from raflora.methods.averaging import sample_weights
from raflora.methods.base import Method, ModuleUpdates
from raflora.methods.context import RoundContext

__all__ = [
    "CarriedAverageMethod",
    "average_one_factor",
    "carried_factor_average",
    "carry_uncovered",
    "covered_rank",
    "pad_rank",
    "padded_average",
    "rank_index_average",
    "stacked_factors",
    "weights_of",
]


def pad_rank(t: Tensor, rank: int, dim: int) -> Tensor:
    """``t`` zero-padded along ``dim`` to length ``rank`` (the ``pad(·)`` of
    docs/methods.md#aggregation-rules).
    """
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def padded_average(factors: Sequence[Tensor], weights: Tensor, rank: int, dim: int) -> Tensor:
    """``Σ_k w_k pad(F_k)``: factors zero-padded to ``rank`` along ``dim`` and averaged with the
    weights ``w_k`` as given (HetLoRA, FedEx-LoRA, FFA-LoRA's ``B``, RoLoRA).
    """
    out = torch.zeros(1, dtype=torch.float64, device=factors[0].device)
    for w_k, f_k in zip(weights.tolist(), factors, strict=True):
        out = out + w_k * pad_rank(f_k, rank, dim).double()
    return out.to(factors[0].dtype)


def covered_rank(updates: ModuleUpdates) -> int:
    """The largest rank among the updates: indices at or above it are covered by no client."""
    return max(int(B.shape[-1]) for B, _, _ in updates)


def carry_uncovered(
    new: tuple[Tensor, Tensor], previous: tuple[Tensor, Tensor] | None, covered: int
) -> tuple[Tensor, Tensor]:
    """``new`` with the indices ``j ≥ covered`` that no client reached taken from ``previous``
    (column ``B_g[:, j]`` and row ``A_g[j, :]``): the project's carry
    (docs/methods.md#aggregation-rules); unchanged without ``previous``.
    """
    B, A = new
    if previous is None or covered >= B.shape[-1]:
        return B, A
    B, A = B.clone(), A.clone()
    B[..., :, covered:] = previous[0][..., :, covered:].to(B.dtype)
    A[..., covered:, :] = previous[1][..., covered:, :].to(A.dtype)
    return B, A


def rank_index_average(
    factors: Sequence[Tensor], samples: Sequence[int], rank: int, dim: int
) -> tuple[Tensor, Tensor]:
    """Per rank index ``j``: ``Σ_{k: r_k > j} n_k F_k[j] / Σ_{k: r_k > j} n_k`` (RBLA).

    Returns the average, zero-padded to ``rank`` along ``dim``, and a boolean ``(rank,)`` mask of
    the indices some client covers (the others are zero here; the caller carries them).
    """
    device = factors[0].device
    ranks = [int(f.shape[dim]) for f in factors]
    n = torch.tensor([float(s) for s in samples], dtype=torch.float64, device=device)
    covers = (
        torch.arange(rank, device=device)[None, :] < torch.tensor(ranks, device=device)[:, None]
    )
    weight = n[:, None] * covers  # (K, rank): n_k where client k reaches index j
    total = weight.sum(dim=0)  # (rank,): Σ_{C_j} n_k
    covered = total > 0
    weight = weight / torch.where(covered, total, torch.ones_like(total))
    out = torch.zeros(1, dtype=torch.float64, device=device)
    for k, f_k in enumerate(factors):
        w = weight[k]  # (rank,)
        shape = [1] * f_k.dim()
        shape[dim] = rank
        out = out + w.reshape(shape) * pad_rank(f_k, rank, dim).double()
    return out.to(factors[0].dtype), covered


def weights_of(updates: ModuleUpdates) -> Tensor:
    """``p_k = n_k / Σ n_j`` of a module's updates (float64, on the factors' device)."""
    return sample_weights([n for _, _, n in updates], like=updates[0][0])


def carried_factor_average(
    updates: ModuleUpdates,
    previous: tuple[Tensor, Tensor] | None,
    rank: int,
) -> tuple[Tensor, Tensor]:
    """``(Σ p_k pad(B_k), Σ p_k pad(A_k))`` at ``rank``, the indices no client reaches carried
    from ``previous`` (FedEx-LoRA, FedRot-LoRA, LoRA-FAIR; docs/methods.md#aggregation-rules).
    """
    p = weights_of(updates)
    B = padded_average([B for B, _, _ in updates], p, rank, -1)
    A = padded_average([A for _, A, _ in updates], p, rank, -2)
    return carry_uncovered((B, A), previous, covered_rank(updates))


def average_one_factor(
    updates: ModuleUpdates, previous: tuple[Tensor, Tensor], rank: int, factor: str
) -> tuple[Tensor, Tensor]:
    """The trained ``factor`` averaged, the frozen one kept from ``previous``:
    ``(Σ p_k pad(B_k), A_g)`` for ``"B"``, ``(B_g, Σ p_k pad(A_k))`` for ``"A"`` (FFA-LoRA,
    RoLoRA; docs/methods.md#aggregation-rules).
    """
    p = weights_of(updates)
    if factor == "B":
        return padded_average([B for B, _, _ in updates], p, rank, -1), previous[1].clone()
    return previous[0].clone(), padded_average([A for _, A, _ in updates], p, rank, -2)


def stacked_factors(updates: ModuleUpdates) -> tuple[Tensor, Tensor]:
    """FLoRA's stack ``B_s = [B_1 … B_M]`` (…, d, Σ r_k), ``A_s = [p_1 A_1; …; p_M A_M]``
    (…, Σ r_k, n): ``B_s A_s = Σ p_k B_k A_k`` exactly, without forming it (FLoRA, FedEx-LoRA's
    residual, ILoRA's and LoRA-FAIR's ``ΔW*``).
    """
    p = weights_of(updates).tolist()
    B_s = torch.cat([B for B, _, _ in updates], dim=-1)
    A_s = torch.cat([A * w for (_, A, _), w in zip(updates, p, strict=True)], dim=-2)
    return B_s, A_s


class CarriedAverageMethod(Method):
    """A method whose server rule is :func:`carried_factor_average` (FedEx-LoRA, FedRot-LoRA):
    ``(Σ p_k pad(B_k), Σ p_k pad(A_k))``, the indices no accepted client reaches carried.
    """

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(Σ p_k pad(B_k), Σ p_k pad(A_k))``, uncovered indices carried from ``previous``."""
        return carried_factor_average(updates, previous, self.r_max)
