"""FLoRA: stacking-based aggregation (Wang et al., 2024; docs/methods.md#flora).

The server stacks the clients' factors,

    B_s = [B_1 … B_M]  (d, Σ r_k),   A_s = [p_1 A_1; …; p_M A_M]  (Σ r_k, n),

so that ``B_s A_s = Σ_k p_k B_k A_k`` exactly. The stacked update is merged into the base weights
(``W ← W + B_s A_s``) and every client starts the next round from a **fresh** LoRA init at its
own rank (``B = 0``, PEFT's default ``A``). Each client downloads the whole stack (to merge it),
which is what makes FLoRA's traffic ``O((d+n) Σ r_k)`` (paper Table 1).

The energy diagnostics of FLoRA are those of the round's update ``B_s A_s``
(docs/methods.md#rank-collapse-diagnostics).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from raflora.methods.base import Factors, GlobalState, Method, ModuleUpdates, lora_a_init
from raflora.methods.context import Capabilities, RoundContext
from raflora.methods.padding import stacked_factors
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register

__all__ = ["FLoRA"]


@register
class FLoRA(Method):
    """Stacking aggregation, merge into the base, fresh client init each round."""

    name = "flora"
    # over a quantised base each merge is kept as a float32 residual beside the 4/8-bit layer
    capabilities = Capabilities(quantized_base="residual")

    def init_state(
        self,
        ctx: RoundContext,
        module_shapes: Mapping[str, tuple[int, int]],
        dense: Mapping[str, Tensor] | None = None,
    ) -> GlobalState:
        """No global factors yet: an empty stack ``(d, 0)``, ``(0, n)`` per module."""
        state = super().init_state(ctx, module_shapes, dense)
        state.factors = {k: (B[:, :0], A[:0, :]) for k, (B, A) in state.factors.items()}
        return state

    def client_factors(self, ctx: RoundContext, state: GlobalState) -> Factors:
        """A fresh LoRA init at ``ctx.rank`` (``B = 0``, PEFT's ``A``) drawn from
        ``ctx.generator`` (the client's stream), in sorted module order.
        """
        rank, generator = ctx.rank, ctx.generator
        self._check_rank(rank)
        if generator is None:
            raise ValueError("flora needs a generator for the fresh client init")
        out: Factors = {}
        for name in sorted(state.module_shapes):
            d, n = state.module_shapes[name]
            B_ref = state.factors[name][0]
            A = lora_a_init(rank, n, generator).to(device=B_ref.device, dtype=B_ref.dtype)
            out[name] = (B_ref.new_zeros(d, rank), A)
        return out

    def model_factors(self, state: GlobalState) -> Factors:
        """A zero adapter at ``r_max``: the global model is the merged base itself."""
        out: Factors = {}
        for name in sorted(state.module_shapes):
            d, n = state.module_shapes[name]
            B_ref = state.factors[name][0]
            out[name] = (B_ref.new_zeros(d, self.r_max), B_ref.new_zeros(self.r_max, n))
        return out

    def level_factors(self, ctx: RoundContext, state: GlobalState) -> Factors:
        """The global model whatever ``ctx.rank``: a client merges the whole stack it
        downloads, so every rank holds the merged base (its fresh init has ``B = 0``).
        """
        self._check_rank(ctx.rank)
        return self.model_factors(state)

    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """The whole stack of the last round, ``(d + n) Σ r_k`` per module."""
        return sum(B.numel() + A.numel() for B, A in state.factors.values())

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The stack ``B_s (…, d, Σ r_k)``, ``A_s (…, Σ r_k, n)``: ``B_s A_s = Σ p_k B_k A_k``."""
        return stacked_factors(updates)

    def module_residual(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        new: tuple[Tensor, Tensor],
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """The stack just aggregated: ``B_s A_s`` is merged into the base weights."""
        return new

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Product space from zero (``Δ_k = B_k A_k``). Under privacy only the noised mean is
        released and merged — never a client's own factors — and the "stack" clients download
        is that dense mean, factored by its thin SVD (docs/privacy.md).
        """
        return PrivateRule.product(cumulative=False)
