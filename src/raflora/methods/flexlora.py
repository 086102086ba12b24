"""FlexLoRA: unbiased full-size aggregation re-factored by truncated SVD (Bai et al., 2024;
docs/methods.md#flexlora).

``ΔW = Σ_k p_k B_k A_k`` (paper Eq. 2 with sample weights), then the truncated SVD to ``r_max``
gives ``B_g = [σ_i u_i]``, ``A_g = [v_i]ᵀ`` (paper Eqs. 3–4). The SVD is computed exactly from the
stacked factors ``[p_1 B_1 … p_M B_M] [A_1; …; A_M]`` (:mod:`raflora.linalg`), never from the
``d × n`` matrix that public FlexLoRA code forms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raflora.linalg import svd_to_factors
from raflora.methods.averaging import sample_weights
from raflora.methods.base import Method, ModuleUpdates
from raflora.methods.context import RoundContext
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register

__all__ = ["FlexLoRA"]


@register
class FlexLoRA(Method):
    """Sample-weighted aggregation of ``B_k A_k`` and rank-``r_max`` SVD re-factorisation."""

    name = "flexlora"

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Rank-``r_max`` factors ``(…, d, r_max)``, ``(…, r_max, n)`` of ``Σ p_k B_k A_k``."""
        p = sample_weights([n for _, _, n in updates], like=updates[0][0])
        B_cat = torch.cat([B * w for (B, _, _), w in zip(updates, p.tolist(), strict=True)], dim=-1)
        A_cat = torch.cat([A for _, A, _ in updates], dim=-2)
        return svd_to_factors(B_cat, A_cat, self.r_max)

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Product space: ``Δ_k = B_k A_k − B_g[:, :r_k] A_g[:r_k]``; the noised mean is added to
        ``B_g A_g`` and truncated by SVD to ``r_max`` (docs/privacy.md).
        """
        return PrivateRule.product()
