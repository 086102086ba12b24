"""RoLoRA: alternating rounds train and average ``B``, then ``A``
(docs/methods.md#rolora).

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA" (2024,
https://arxiv.org/abs/2409.02346). Odd rounds train only ``B`` (``A`` frozen at what the client
received), even rounds only ``A``; the server averages the trained factor zero-padded and keeps
the frozen one:

    odd ``t``:  B_g = Σ_k p_k pad(B_k),  A_g unchanged;
    even ``t``: A_g = Σ_k p_k pad(A_k),  B_g unchanged.

Exact in both phases for any ranks (``pad(B_k) A_g = B_k A_g[:r_k]``,
``B_g pad(A_k) = B_g[:, :r_k] A_k``) — exact aggregation, not freedom from rank collapse.
Round 1 trains ``B`` from ``B_g = 0``, like plain LoRA's first steps.

Traffic (docs/design.md#communication): both factors down, the trained one up. Departures: the
paper uses equal ranks; zero padding for mixed ranks is the project's reading; uncovered indices
are zero-padded (the frozen factor keeps every direction trainable).
"""

from __future__ import annotations

from torch import Tensor

from raflora.methods.base import ClientRound, Method, ModuleUpdates
from raflora.methods.context import RoundContext
from raflora.methods.padding import average_one_factor
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register
from raflora.methods.validation import ClientUpdate

__all__ = ["RoLoRA", "trained_factor"]


def trained_factor(round_index: int) -> str:
    """``"B"`` in odd rounds, ``"A"`` in even ones (1-based)."""
    return "B" if round_index % 2 == 1 else "A"


class RoLoRAClientRound(ClientRound):
    """Plain LoRA training only the round's factor."""

    @property
    def trains(self) -> frozenset[str]:  # type: ignore[override]
        """``{"B"}`` in odd rounds, ``{"A"}`` in even ones."""
        return frozenset({trained_factor(self.round_index)})


@register
class RoLoRA(Method):
    """Alternating ``B``/``A`` rounds; the trained factor zero-padded and averaged."""

    name = "rolora"
    ClientRoundType = RoLoRAClientRound

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Average the round's factor; keep the other from ``previous`` (required)."""
        if previous is None:
            raise ValueError("rolora needs previous=(B_g, A_g): the frozen factor is kept")
        return average_one_factor(updates, previous, self.r_max, trained_factor(ctx.round_index))

    def upload_bytes(self, ctx: RoundContext, update: ClientUpdate) -> int:
        """The factor trained in round ``ctx.round_index`` only."""
        index = 0 if trained_factor(ctx.round_index) == "B" else 1
        return sum(f[index].numel() * f[index].element_size() for f in update.factors.values())

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Factor space, the factor trained in round ``ctx.round_index`` (docs/privacy.md)."""
        return PrivateRule.factor(trained_factor(ctx.round_index))
