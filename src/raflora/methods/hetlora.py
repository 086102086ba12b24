"""HetLoRA: zero-padding aggregation of heterogeneous ranks (Cho et al., 2024;
docs/methods.md#hetlora).

Every client's factors are zero-padded to ``r_max`` and averaged factor-wise:

    B_g = Σ_k w_k pad(B_k),   A_g = Σ_k w_k pad(A_k).

Weights are HetLoRA's *sparsity-weighted* aggregation by default, ``w_k ∝ ‖B_k A_k‖_F`` (computed
per module from the factors), or ``w_k = p_k = n_k / Σ n_j`` with ``weighting="samples"``. When
every client's update of a module is zero the sparsity weights fall back to ``p_k``.

Rank self-pruning (HetLoRA §3.3, off by default): clients add the loss
``λ ‖B[:, ⌊γr⌋:]‖_F ‖A[⌊γr⌋:, :]‖_F`` (summed over modules; the gradient flows through it), and a
client whose tail norm shrank over the round — the tail of what it returned is smaller than the
tail of what it was sent — trains at rank ``⌊γ r_k⌋`` from the next round on. The comparison is
summed over modules; the paper does not say whether it is per module or per model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raflora.linalg import frobenius_norm
from raflora.methods.averaging import sample_weights
from raflora.methods.base import ClientRound, GlobalState, Method, ModuleUpdates
from raflora.methods.context import RoundContext
from raflora.methods.options import MethodOptions, option
from raflora.methods.padding import pad_rank
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register
from raflora.methods.validation import ClientUpdate

__all__ = ["HetLoRA", "HetLoRAOptions", "tail_norm"]


def tail_norm(factors: Mapping[str, tuple[Tensor, Tensor]], start: int) -> Tensor:
    """``Σ_modules ‖B[:, start:]‖_F ‖A[start:, :]‖_F`` (HetLoRA's pruning term)."""
    total = torch.zeros(())
    for B, A in factors.values():
        term = torch.linalg.norm(B[:, start:]) * torch.linalg.norm(A[start:, :])
        total = total.to(term.device) + term
    return total


@dataclass(frozen=True)
class HetLoRAOptions(MethodOptions):
    """HetLoRA's options (``method_options`` of a hetlora run)."""

    weighting: Literal["sparsity", "samples"] = option(
        "sparsity",
        "Aggregation weights: 'sparsity' (w_k ∝ ‖B_k A_k‖_F, HetLoRA's) or 'samples' (w_k = p_k).",
    )
    self_pruning: bool = option(
        False,
        "Rank self-pruning (HetLoRA §3.3): clients add λ‖B[:, ⌊γr⌋:]‖_F‖A[⌊γr⌋:, :]‖_F to their "
        "loss, and one whose tail shrank over a round trains at rank ⌊γ r_k⌋ from then on.",
    )
    pruning_gamma: float = option(
        0.99, "Kept fraction γ of the rank when a client prunes (rank ⌊γ r_k⌋).", gt=0, lt=1
    )
    pruning_lambda: float = option(1e-3, "Weight λ of the pruning loss term.", ge=0)


class HetLoRAClientRound(ClientRound):
    """Plain LoRA, plus the pruning loss term when rank self-pruning is on."""

    method: HetLoRA

    @property
    def uses_penalty(self) -> bool:  # type: ignore[override]
        """True when rank self-pruning is on."""
        return self.method.self_pruning

    def penalty(self, live: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor | None:
        """:meth:`HetLoRA.local_penalty` of the live factors."""
        return self.method.local_penalty(live, self.rank)


@register
class HetLoRA(Method):
    """Zero-padding aggregation; sparsity-weighted by default.

    Parameters
    ----------
    rank_levels : Sequence[int]
        Configured rank levels; the server keeps ``r_max``.
    options : HetLoRAOptions, optional
        ``weighting``, ``self_pruning``, ``pruning_gamma``, ``pruning_lambda``.
    """

    name = "hetlora"
    Options = HetLoRAOptions
    ClientRoundType = HetLoRAClientRound
    options: HetLoRAOptions

    @property
    def weighting(self) -> str:
        """``"sparsity"`` or ``"samples"``."""
        return self.options.weighting

    @property
    def self_pruning(self) -> bool:
        """Whether rank self-pruning is on."""
        return self.options.self_pruning

    @property
    def pruning_gamma(self) -> float:
        """Kept fraction ``γ`` of the rank when pruning."""
        return self.options.pruning_gamma

    @property
    def pruning_lambda(self) -> float:
        """Weight ``λ`` of the pruning loss term."""
        return self.options.pruning_lambda

    def pruned_rank(self, rank: int) -> int:
        """``⌊γ r⌋`` (at least 1)."""
        return max(1, int(self.pruning_gamma * rank))

    @staticmethod
    def pruned_ranks(state: GlobalState) -> dict[int, int]:
        """Clients whose rank was pruned → their current rank (``state.extras``)."""
        ranks: dict[int, int] = state.extras.get("client_ranks", {})
        return ranks

    def client_rank(self, ctx: RoundContext, state: GlobalState, declared_rank: int) -> int:
        """``⌊γ r_k⌋`` for a client that pruned, else its declared rank."""
        if ctx.client_id is None:
            return declared_rank
        return self.pruned_ranks(state).get(ctx.client_id, declared_rank)

    def local_penalty(
        self, factors: Mapping[str, tuple[Tensor, Tensor]], rank: int
    ) -> Tensor | None:
        """``λ Σ ‖B[:, ⌊γr⌋:]‖ ‖A[⌊γr⌋:, :]‖`` when self-pruning is on."""
        if not self.self_pruning:
            return None
        return self.pruning_lambda * tail_norm(factors, self.pruned_rank(rank))

    def weights(self, updates: ModuleUpdates) -> Tensor:
        """Aggregation weights ``(…, K)`` summing to one over clients."""
        p = sample_weights([n for _, _, n in updates], like=updates[0][0])
        if self.weighting == "samples":
            return p
        norms = torch.stack([frobenius_norm(B, A).double() for B, A, _ in updates], dim=-1)
        total = norms.sum(dim=-1, keepdim=True)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        return torch.where(total > 0, norms / safe, p.expand_as(norms))

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(Σ w_k pad(B_k), Σ w_k pad(A_k))``: ``(…, d, r_max)``, ``(…, r_max, n)``."""
        w = self.weights(updates)  # (K,) or (…, K): per-module weights under "sparsity"
        dtype = updates[0][0].dtype
        B = torch.zeros(1, dtype=torch.float64, device=w.device)
        A = torch.zeros(1, dtype=torch.float64, device=w.device)
        for w_k, (B_k, A_k, _) in zip(w.unbind(-1), updates, strict=True):
            B = B + w_k[..., None, None] * pad_rank(B_k, self.r_max, -1).double()
            A = A + w_k[..., None, None] * pad_rank(A_k, self.r_max, -2).double()
        return B.to(dtype), A.to(dtype)

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Factor space: both padded factor differences, averaged over ``q N``
        (docs/privacy.md).
        """
        return PrivateRule.factor("BA")

    def privacy_refusal(self) -> str | None:
        """Self-pruning and sparsity weights depend on the clients' data."""
        if self.self_pruning:
            return (
                "hetlora's rank self-pruning changes a client's rank from its data, which "
                "privacy cannot release; set method_options.hetlora.self_pruning: false"
            )
        if self.weighting == "sparsity":
            return (
                "hetlora's sparsity weights w_k ∝ ‖B_k A_k‖ depend on the clients' updates; set "
                "method_options.hetlora.weighting: samples (under privacy every client then "
                "counts 1 / (q N))"
            )
        return super().privacy_refusal()

    def finish_state(
        self,
        ctx: RoundContext,
        previous: GlobalState,
        state: GlobalState,
        accepted: Sequence[ClientUpdate],
    ) -> GlobalState:
        """Record the clients whose tail shrank (self-pruning): ``extras["client_ranks"]``."""
        if not self.self_pruning:
            return state
        before = self.pruned_ranks(previous)
        ranks = dict(before)
        for u in accepted:
            if u.client_id in before:
                continue  # pruned once, from its own rank r_k: keeps ⌊γ r_k⌋ from then on
            start = self.pruned_rank(u.rank)
            if start >= u.rank:
                continue
            sent = {k: (B[:, : u.rank], A[: u.rank]) for k, (B, A) in previous.factors.items()}
            if tail_norm(u.factors, start) < tail_norm(sent, start):
                ranks[u.client_id] = start
        state.extras = {**state.extras, "client_ranks": ranks}
        return state
