"""FedIT: factor-wise FedAvg for homogeneous ranks (Zhang et al., 2024; docs/methods.md#fedit).

``B_g = Σ_k p_k B_k``, ``A_g = Σ_k p_k A_k`` with ``p_k = n_k / Σ_j n_j``. Averaging the factors
separately is biased (``Σ p_k B_k · Σ p_k A_k ≠ Σ p_k B_k A_k``) and only defined when every
client has the same rank; heterogeneous ranks are refused with a pointer to HetLoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from raflora.methods.averaging import sample_weights, weighted_average
from raflora.methods.base import Method, ModuleUpdates
from raflora.methods.context import Capabilities, RoundContext
from raflora.methods.options import MethodOptions
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register

__all__ = ["FedIT"]

_MIXED = "fedit needs every client at the same rank; use method 'hetlora' for heterogeneous ranks"


@register
class FedIT(Method):
    """Factor-wise FedAvg; requires a single rank level."""

    name = "fedit"
    capabilities = Capabilities(ranks_must_be_levels=True, single_rank_level=True)

    def __init__(self, rank_levels: Sequence[int], options: MethodOptions | None = None) -> None:
        super().__init__(rank_levels, options)
        if len(self.rank_levels) != 1:
            raise ValueError(f"{_MIXED} (got rank levels {list(self.rank_levels)})")

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(Σ p_k B_k, Σ p_k A_k)``, each ``(…, d, r)`` / ``(…, r, n)``."""
        ranks = {B.shape[-1] for B, _, _ in updates}
        if len(ranks) != 1:
            raise ValueError(f"{_MIXED} (got ranks {sorted(ranks)})")
        p = sample_weights([n for _, _, n in updates], like=updates[0][0])
        B = weighted_average([B for B, _, _ in updates], p)
        A = weighted_average([A for _, A, _ in updates], p)
        return B, A

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Factor space: both factors' differences, averaged over ``q N`` (docs/privacy.md)."""
        return PrivateRule.factor("BA")
