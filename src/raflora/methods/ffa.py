"""FFA-LoRA: ``A`` frozen at its initialisation, only ``B`` trained and averaged
(docs/methods.md#ffa).

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024,
https://arxiv.org/abs/2403.12313). The global ``A_g`` is the round-0 init (PEFT's default ``A``
at ``r_max``, drawn from the run's seed) and never changes; a client of rank ``r_k`` trains only
``B`` on top of ``A_g[:r_k]``; the server averages the zero-padded ``B``:

    B_g = Σ_k p_k pad(B_k),   A_g unchanged.

Exact for any ranks: ``Σ_k p_k B_k A_g[:r_k] = B_g A_g`` (the padded columns meet rows of
``A_g`` that the client did not use, with zero weight) — exact *aggregation*, not freedom from
rank collapse: a direction ``j`` is still shrunk by ``Σ_{r_k ≥ j} p_k`` each round.

Traffic (docs/design.md#communication): ``B`` only, each way — a client regenerates ``A`` exactly
as the server's round-0 init draws it (same generator, module order, ``r_max``, float32). The
engines still hand the client ``A`` (the local engine shares memory; Flower's message carries it,
counted in ``transport_bytes``), and the server ignores the ``A`` a client returns.

Departures: the paper studies equal ranks (with differential privacy); zero padding for mixed
ranks is the project's reading. Uncovered indices are zero-padded, not carried: the frozen,
non-zero ``A`` keeps every direction trainable.
"""

from __future__ import annotations

from torch import Tensor

from raflora.methods.base import ClientRound, GlobalState, Method, ModuleUpdates
from raflora.methods.context import RoundContext
from raflora.methods.padding import average_one_factor
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register
from raflora.methods.validation import ClientUpdate

__all__ = ["FFALoRA"]


class FFAClientRound(ClientRound):
    """Plain LoRA with ``A`` frozen: only ``B`` trains."""

    trains = frozenset({"B"})


@register
class FFALoRA(Method):
    """``A`` frozen at the round-0 init; ``B`` zero-padded and averaged."""

    name = "ffa"
    ClientRoundType = FFAClientRound

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(Σ p_k pad(B_k), A_g)`` with ``A_g`` the previous global ``A`` (required)."""
        if previous is None:
            raise ValueError("ffa needs previous=(B_g, A_g): A_g is frozen at its round-0 init")
        return average_one_factor(updates, previous, self.r_max, "B")

    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """``B`` only: ``d r_k`` per module (the client regenerates ``A``)."""
        return sum(d * ctx.rank for d, _ in state.module_shapes.values())

    def upload_bytes(self, ctx: RoundContext, update: ClientUpdate) -> int:
        """``B`` only."""
        return sum(B.numel() * B.element_size() for B, _ in update.factors.values())

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Factor space, ``B`` only (``A`` is frozen and public): the setting FFA-LoRA was made
        for (docs/privacy.md).
        """
        return PrivateRule.factor("B")
