"""raFLoRA: rank-partitioned aggregation (paper Section 5, Algorithm 1, Eq. 8;
docs/methods.md#raflora).

The rank levels ``R = {r_1 < … < r_max}`` cut ``1 … r_max`` into partitions ``[l, h]`` with
``l = prev(h) + 1``. Each partition is averaged over its *effective contributors* only:

    C_h = {k sampled : r_k ≥ h},   N_h = Σ_{k∈C_h} n_k,
    ΔW_h = Σ_{k∈C_h} (n_k / N_h) B_k[:, l:h] A_k[l:h, :],       ΔW = Σ_h ΔW_h,

followed by the truncated SVD to ``r_max`` (Algorithm 1 line 17). Partitions come from the
configured levels, not from the ranks sampled this round, so client ranks must be rank levels.

Since ``(n_k/N_h)`` only scales columns of ``B_k``, ΔW is one product of stacked factors and its
SVD costs exactly what FlexLoRA's does (:mod:`raflora.linalg`).

Empty partitions (no sampled client reaches ``h``) are not covered by the paper. Default
``empty_partition="carry"``: the previous global slice ``B_g[:, l:h] A_g[l:h, :]`` is carried into
ΔW, so directions nobody could train this round keep their value instead of being erased by the
luck of the draw; ``"drop"`` leaves the partition out (ΔW_h = 0), the literal reading of Eq. 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raflora.linalg import svd_to_factors
from raflora.methods.base import Method, ModuleUpdates
from raflora.methods.context import Capabilities, RoundContext
from raflora.methods.options import MethodOptions, option
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register

__all__ = ["RaFLoRA", "RaFLoRAOptions", "partition_bounds", "partition_weights"]


def partition_bounds(rank_levels: Sequence[int]) -> list[tuple[int, int]]:
    """0-based half-open column ranges ``[prev(h), h)`` of every partition, in level order."""
    bounds, prev = [], 0
    for h in rank_levels:
        bounds.append((prev, h))
        prev = h
    return bounds


def partition_weights(
    ranks: Sequence[int], samples: Sequence[int], rank_levels: Sequence[int]
) -> Tensor:
    """Weights ``n_k / N_h`` of every client (rows) in every partition (columns), float64.

    Clients that do not reach a partition (``r_k < h``) have weight 0 there; every partition
    with at least one contributor has weights summing to one; an empty partition is all zeros.
    """
    r = torch.tensor(list(ranks), dtype=torch.int64)
    n = torch.tensor([float(s) for s in samples], dtype=torch.float64)
    h = torch.tensor(list(rank_levels), dtype=torch.int64)
    member = (r[:, None] >= h[None, :]).double()  # (K, P): k ∈ C_h
    N_h = (member * n[:, None]).sum(dim=0)  # (P,)
    return member * n[:, None] / torch.where(N_h > 0, N_h, torch.ones_like(N_h))


@dataclass(frozen=True)
class RaFLoRAOptions(MethodOptions):
    """raFLoRA's options (``method_options`` of a raflora run)."""

    empty_partition: Literal["carry", "drop"] = option(
        "carry",
        "A partition no sampled client reaches: 'carry' the previous global slice, or 'drop' it "
        "(Eq. 8 read literally).",
    )


@register
class RaFLoRA(Method):
    """Rank-partitioned aggregation (Algorithm 1).

    Parameters
    ----------
    rank_levels : Sequence[int]
        The partition boundaries ``R``; every client rank must be one of them.
    options : RaFLoRAOptions, optional
        ``empty_partition``: what an empty partition contributes.
    """

    name = "raflora"
    capabilities = Capabilities(ranks_must_be_levels=True)
    Options = RaFLoRAOptions
    options: RaFLoRAOptions

    @property
    def empty_partition(self) -> str:
        """``"carry"`` or ``"drop"``."""
        return self.options.empty_partition

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Rank-``r_max`` factors of ``Σ_h ΔW_h`` (Eq. 8): ``(…, d, r_max)``, ``(…, r_max, n)``."""
        ranks = [B.shape[-1] for B, _, _ in updates]
        unknown = sorted(set(ranks) - set(self.rank_levels))
        if unknown:
            raise ValueError(
                f"raflora: client rank(s) {unknown} are not rank levels {list(self.rank_levels)}"
            )
        weights = partition_weights(ranks, [n for _, _, n in updates], self.rank_levels)
        bounds = partition_bounds(self.rank_levels)
        B_blocks, A_blocks = [], []
        for k, (B, A, _) in enumerate(updates):
            # column j of client k lies in partition P(j) and is scaled by n_k / N_P(j)
            scale = torch.cat(
                [weights[k, p].expand(h - l) for p, (l, h) in enumerate(bounds) if h <= ranks[k]]
            )
            B_blocks.append(B * scale.to(B.dtype).to(B.device))
            A_blocks.append(A)
        if self.empty_partition == "carry" and previous is not None:
            B_prev, A_prev = previous
            for p, (l, h) in enumerate(bounds):
                if not bool(weights[:, p].any()):
                    B_blocks.append(B_prev[..., :, l:h])
                    A_blocks.append(A_prev[..., l:h, :])
        return svd_to_factors(torch.cat(B_blocks, dim=-1), torch.cat(A_blocks, dim=-2), self.r_max)

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Product space per rank partition: ``U_k`` is the concatenation of the pieces
        ``Δ_k^(h)`` of the partitions ``h ≤ r_k``; partition ``h``'s noised sum is divided by
        ``q N_h``, ``N_h`` the federation's clients of rank ``≥ h`` (docs/privacy.md).
        """
        return PrivateRule.product(partitions=self.rank_levels)

    def privacy_refusal(self) -> str | None:
        """``empty_partition: drop`` depends on which clients were sampled."""
        if self.empty_partition == "drop":
            return (
                "raflora's empty_partition 'drop' depends on which clients were sampled, which "
                "privacy keeps secret; use method_options.raflora.empty_partition: carry"
            )
        return super().privacy_refusal()

    def private_aggregate_module(
        self,
        ctx: RoundContext,
        mean: tuple[Tensor, Tensor],
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The truncated SVD of the noised ``Σ_h ΔW_h`` to ``r_max`` (Algorithm 1 line 17); an
        empty partition carries its previous slice (its noised sum is added to it).
        """
        return svd_to_factors(mean[0], mean[1], self.r_max)
