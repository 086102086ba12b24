"""FedEx-LoRA: factor averaging plus the exact residual merged into the base weights
(docs/methods.md#fedex).

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models" (ACL 2025, https://arxiv.org/abs/2410.09432). The server averages the
zero-padded factors,

    B_g = Σ_k p_k pad(B_k),   A_g = Σ_k p_k pad(A_k),

and merges the residual ``Res = Σ_k p_k B_k A_k − B_g A_g`` into the base weights as they were at
the start of the round, so the global model is exactly ``W + Σ_k p_k B_k A_k``. The residual is
kept factored, ``[B_1 … B_M, −B_g] [p_1 A_1; …; p_M A_M; A_g]`` (rank ``Σ r_k + r_max``), and
merged through the same mechanism as FLoRA's stack (:meth:`Method.module_residual`); the
exported adapter is the SVD of every merged residual plus the global product, as FLoRA's is.
Metrics rows report the energy of the global product (``higher_rank_energy``) and of the
round's residual (``residual_higher_rank_energy``, docs/methods.md#rank-collapse-diagnostics).

Exact aggregation, not freedom from rank collapse: the factors themselves are diluted by zero
padding; the residual absorbs the difference, so the *model* is exact.

Traffic (docs/design.md#communication): factors up; factors plus this round's factored residual
down (a client that missed rounds also needs the earlier residuals; like FLoRA's stack in the
paper's Table 5, only the round's own is counted). Departures: the paper uses equal ranks; zero
padding for mixed ranks is the project's reading, and an index no accepted client reaches keeps
the previous global column and row (the project's carry) instead of becoming zero — the residual
keeps the model exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from raflora.methods.base import GlobalState, ModuleUpdates
from raflora.methods.context import Capabilities, RoundContext
from raflora.methods.padding import CarriedAverageMethod, stacked_factors
from raflora.methods.registry import register
from raflora.methods.validation import ClientUpdate

__all__ = ["FedExLoRA"]


@register
class FedExLoRA(CarriedAverageMethod):
    """Zero-padded factor averaging with uncovered indices carried, plus the exact residual."""

    name = "fedex"
    capabilities = Capabilities(reports_residual_energy=True, quantized_base="residual")

    def privacy_refusal(self) -> str | None:
        """The residual needs the clients' products besides their factors."""
        return (
            "fedex's residual Σ p_k B_k A_k − B_g A_g needs each client's product besides its "
            "factors, and privacy releases only the noised sum of one of them; use a factor "
            "method (fedit, hetlora, rbla, ffa, rolora, fedrot) or a product one (flexlora, "
            "raflora)"
        )

    def module_residual(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        new: tuple[Tensor, Tensor],
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """``[B_1 … B_M, −B_g] [p_1 A_1; …; p_M A_M; A_g]`` (rank ``Σ r_k + r_max``)."""
        B_s, A_s = stacked_factors(updates)
        return torch.cat([B_s, -new[0]], dim=-1), torch.cat([A_s, new[1]], dim=-2)

    def finish_state(
        self,
        ctx: RoundContext,
        previous: GlobalState,
        state: GlobalState,
        accepted: Sequence[ClientUpdate],
    ) -> GlobalState:
        """Record the rank of the round's residual (``Σ r_k + r_max``) for the download count."""
        rank = sum(u.rank for u in accepted) + self.r_max
        state.extras = {**state.extras, "residual_rank": rank}
        return state

    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """The client's factors plus the last round's factored residual, per module."""
        residual = int(state.extras.get("residual_rank", 0))
        return sum((d + n) * (ctx.rank + residual) for d, n in state.module_shapes.values())
