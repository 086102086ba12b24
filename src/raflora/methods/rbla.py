"""RBLA: rank-based LoRA aggregation, factor-wise per rank index (docs/methods.md#rbla).

Nazemi et al., "Rank-Based LoRA Aggregation for Fine-tuning Heterogeneous Models in FLaaS"
(2024, https://arxiv.org/abs/2408.08699); also the natural reading of the "replication padding"
of Byun & Lee (NAACL 2025, https://arxiv.org/abs/2406.17477), where a low-rank client's missing
rows are filled with the contributors' values. Per rank index ``j`` only the clients that reach
it, ``C_j = {k : r_k ≥ j}``, are averaged, weighted by their samples:

    A_g[j, :] = Σ_{k∈C_j} n_k A_k[j, :] / Σ_{k∈C_j} n_k,   B_g[:, j] likewise.

It is raFLoRA's contributor weighting without the SVD of the product — the ablation that tells
how much of raFLoRA's gain is the re-weighting and how much the exact product. Not exact: the
factors are averaged separately (``B_g A_g ≠ Σ p_k B_k A_k``).

Departures and readings: an index that no accepted client reaches keeps the previous global
column and row (the project's carry, docs/methods.md#aggregation-rules; the papers do not say).
Plain LoRA on the client, traffic as FedIT (docs/design.md#communication).
"""

from __future__ import annotations

from torch import Tensor

from raflora.methods.base import Method, ModuleUpdates
from raflora.methods.context import RoundContext
from raflora.methods.padding import carry_uncovered, covered_rank, rank_index_average
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register

__all__ = ["RBLA"]


@register
class RBLA(Method):
    """Per-rank-index factor averaging over the clients that reach each index."""

    name = "rbla"

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``B_g (…, d, r_max)``, ``A_g (…, r_max, n)`` averaged per rank index; uncovered
        indices carried from ``previous`` (zero without it).
        """
        samples = [n for _, _, n in updates]
        B, _ = rank_index_average([B for B, _, _ in updates], samples, self.r_max, -1)
        A, _ = rank_index_average([A for _, A, _ in updates], samples, self.r_max, -2)
        return carry_uncovered((B, A), previous, covered_rank(updates))

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Factor space per rank index: index ``j``'s noised sum is divided by ``q N_j``, the
        federation's clients reaching it (docs/privacy.md).
        """
        return PrivateRule.factor("BA", per_index=True)
