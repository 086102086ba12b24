"""HAFLQ: importance-based freezing of rank-1 components and per-component aggregation
(docs/methods.md#haflq).

Su, Yan, Deng, Dohler, Schober, "HAFLQ: Heterogeneous Adaptive Federated LoRA Fine-tuned LLM
with Quantization" (arXiv 2411.06581, v2); v1 is the conference version, "Federated LLMs
Fine-tuned with Adaptive Importance-Aware LoRA" (HAFL, IEEE ICC 2025). Only the two abstracts
were available to us. **What is the paper's** (from the abstracts): every client and the server
hold the same LoRA rank ``R``; a client updates only its most important rank-1 matrices
``b_j a_jᵀ`` and keeps the rest frozen (importance-based parameter *freezing*); importance is the
smoothed sensitivity score; the server aggregates at the rank-1 matrix level, averaging only the
rank-1 matrices that clients updated (against the dilution of zero padding); the *truncation*
scheme, where clients hold different ranks chosen by importance, is the alternative the paper
compares with. Its salience-driven block-wise quantisation of the base and its bandwidth-adaptive
quantisation of the upload are not part of this method (the frozen base in 4 bits is
``task.quantization``, docs/configuration.md).

**What is our reading** (none of it is in the abstracts):

- *Ranks.* ``R = r_max``. Client ``k`` trains at rank ``R`` (:meth:`HAFLQ.client_rank`), its
  budget ``n_k`` is its declared rank ``r_k`` (its level from ``fl.rank_levels``): it trains
  ``n_k`` of the ``R`` components of every adapted module and freezes the rest.
- *Importance* — AdaLoRA's smoothed sensitivity (Zhang et al., ICLR 2023, §3.2), per
  entry ``w`` of ``B`` and ``A`` at every local step::

      I = |w ∇_w L|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|

  (``Ū`` with the updated ``Ī``), and per component, as AdaLoRA's triplet score without its
  singular value term, ``S_j = mean_i (Ī Ū)[B_{ij}] + mean_i (Ī Ū)[A_{ji}]``. ``Ī`` and ``Ū``
  are the client's per-client state, kept across the rounds it takes part in (zero before its
  first).
  Every component's sensitivity is measured, frozen ones included (their gradient is computed
  before it is zeroed), so a client can change what it trains from one round to the next.
- *Selection.* At the start of a round the client trains the ``n_k`` components of largest
  ``S_j`` in each module; ties go to the lower index, so before any measurement (a client's
  first round) it trains the first ``n_k``.
- *Freezing* is per component: the gradients of the frozen columns of ``B`` and rows of ``A``
  are zeroed every step (:meth:`HAFLQClientRound.correct_gradients`, before clipping and the
  optimizer step). With zero gradients Adam's moments stay zero and its step is zero, but a
  decoupled weight decay (``train.weight_decay``, 0 by default) still shrinks a frozen entry by
  ``1 − lr·λ`` per step during the local steps; the upload therefore carries the frozen
  components exactly as received (:meth:`HAFLQClientRound.finish`), and which components were
  trained travels as a 0/1 mask.
- *Aggregation* (the paper's rank-1 matrix-level aggregation, our reading): per module and
  component ``j``, ``C_j`` = the accepted clients that trained ``j``::

      b_j ← Σ_{k∈C_j} n_k b_{k,j} / Σ_{k∈C_j} n_k,   a_j likewise,

  and a component nobody trained keeps its previous ``b_j``, ``a_j``. The two factors are
  averaged separately (a rank-1 average of rank-1 matrices is not rank-1), so the rule is not
  exact: ``B_g A_g ≠ Σ p_k B_k A_k`` in general.
- *Truncation variant* (option ``truncate``): a client of rank ``r_k`` is sent its top-``r_k``
  components (by the server's importance, ties to the lower index) as a rank-``r_k`` adapter,
  trains all of it, and uploads it with its components' scores ``S_j``; the server scatters the
  columns back to their indices, averages as above, and keeps, per component, the sample-weighted
  mean of the scores of the clients that trained it (the others keep theirs).
- *Sensitivity's weights.* The hooks hand the client the live *effective* factors
  (:meth:`HAFLQClientRound.penalty`, every step before backward: ``s · lora_B``, ``lora_A`` at
  their current values) and the gradients of the PEFT parameters; ``I`` pairs the two. With
  the paper's ``lora.alpha = rank`` (``s = 1``, the default) that is exactly ``|w ∇_w L|`` of the
  trained weights; with another alpha ``B``'s sensitivities are ``s`` times AdaLoRA's (``s`` is
  the same for every component of a module, but ``S_j`` then weighs ``B``'s term by ``s²``).
  AdaLoRA's code multiplies the gradient with the weights *after* the optimizer step; we use the
  weights the gradient was computed at (the sensitivity's definition).

Every level's model is the global model (every client holds the whole adapter; with
``truncate`` a level holds its top-``r`` components). Traffic (docs/design.md#communication): the
whole adapter down (``(d + n) R`` per module), the trained components and the mask up
(``(d + n) n_k + R``); with ``truncate`` ``(d + n + 1) r_k`` down (the indices) and
``(d + n + 1) r_k`` up (the scores). Privacy (docs/privacy.md): refused — the components a
client trains are chosen from its data (:meth:`HAFLQ.privacy_refusal`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from raflora.methods.base import (
    ClientMessage,
    ClientRound,
    ClientUpload,
    Factors,
    GlobalState,
    Method,
    ModuleUpdates,
)
from raflora.methods.context import RoundContext
from raflora.methods.options import MethodOptions, option
from raflora.methods.registry import register
from raflora.methods.validation import ClientUpdate, InvalidUpdateError

__all__ = [
    "HAFLQ",
    "HAFLQClientRound",
    "HAFLQOptions",
    "component_average",
    "component_scores",
    "smooth_sensitivity",
    "top_components",
]

Contribution = tuple[Tensor, Tensor, Tensor, int]
"""One client's trained components of one module: ``(B_k (d, m), A_k (m, n), S_k (m,), n_k)``,
column ``i`` of ``B_k`` and row ``i`` of ``A_k`` being component ``S_k[i]``."""


@dataclass(frozen=True)
class HAFLQOptions(MethodOptions):
    """HAFLQ's options (``method_options`` of a haflq run)."""

    truncate: bool = option(
        False,
        "The truncation variant: a rank-r_k client is sent its top-r_k components (server "
        "importance) and trains at r_k; off: every client holds rank r_max and trains its r_k "
        "most important components, the others frozen.",
    )
    beta1: float = option(
        0.85, "AdaLoRA's smoothing β₁ of the sensitivity Ī (its default).", gt=0, lt=1
    )
    beta2: float = option(
        0.85, "AdaLoRA's smoothing β₂ of the uncertainty Ū (its default).", gt=0, lt=1
    )


# ----------------------------------------------------------------------------- the rules
def smooth_sensitivity(
    weight: Tensor,
    grad: Tensor,
    ipt: Tensor,
    unc: Tensor,
    beta1: float,
    beta2: float,
) -> tuple[Tensor, Tensor]:
    """One step of AdaLoRA's smoothed sensitivity (its §3.2), entrywise:
    ``I = |w ∇_w L|``, ``Ī ← β₁ Ī + (1 − β₁) I``, ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|`` (the new
    ``Ī``). Returns the new ``(Ī, Ū)`` in ``ipt``'s dtype.
    """
    sensitivity = (weight.to(ipt.dtype) * grad.to(ipt.dtype)).abs()
    ipt = beta1 * ipt + (1 - beta1) * sensitivity
    unc = beta2 * unc + (1 - beta2) * (sensitivity - ipt).abs()
    return ipt, unc


def component_scores(ipt_B: Tensor, unc_B: Tensor, ipt_A: Tensor, unc_A: Tensor) -> Tensor:
    """``S_j = mean_i (Ī Ū)[B_{ij}] + mean_i (Ī Ū)[A_{ji}]`` per component ``j`` (``(R,)``):
    AdaLoRA's triplet score (its §3.2) without its singular-value term.
    """
    return (ipt_B * unc_B).mean(dim=-2) + (ipt_A * unc_A).mean(dim=-1)


def top_components(scores: Tensor, count: int) -> Tensor:
    """The indices of the ``count`` largest ``scores``, ties to the lower index, ascending."""
    order = torch.sort(-scores.detach().cpu().double(), stable=True).indices
    return torch.sort(order[:count]).values


def component_average(
    previous: tuple[Tensor, Tensor], contributions: Sequence[Contribution]
) -> tuple[Tensor, Tensor]:
    """The rank-1 component-level average (docs/methods.md#haflq): per component ``j``,
    ``b_j = Σ_{k∈C_j} n_k b_{k,j} / Σ_{k∈C_j} n_k`` and ``a_j`` likewise, ``C_j`` the
    contributions holding ``j``; a component in no contribution keeps ``previous``.

    ``previous`` is ``(B_g (d, R), A_g (R, n))``; sums in float64, the result in its dtype.
    """
    B_g, A_g = previous
    rank = B_g.shape[-1]
    sum_B = torch.zeros(B_g.shape, dtype=torch.float64, device=B_g.device)
    sum_A = torch.zeros(A_g.shape, dtype=torch.float64, device=A_g.device)
    total = torch.zeros(rank, dtype=torch.float64, device=B_g.device)
    for B_k, A_k, S_k, n_k in contributions:
        index = S_k.to(device=B_g.device, dtype=torch.long)
        sum_B.index_add_(-1, index, float(n_k) * B_k.double())
        sum_A.index_add_(-2, index, float(n_k) * A_k.double())
        total.index_add_(0, index, torch.full_like(index, n_k, dtype=torch.float64))
    kept = total == 0
    safe = torch.where(kept, torch.ones_like(total), total)
    B = torch.where(kept[None, :], B_g.double(), sum_B / safe[None, :])
    A = torch.where(kept[:, None], A_g.double(), sum_A / safe[:, None])
    return B.to(B_g.dtype), A.to(A_g.dtype)


# ------------------------------------------------------------------------ client half
def _state_names(module: str) -> tuple[str, str, str, str]:
    return f"ipt.B/{module}", f"unc.B/{module}", f"ipt.A/{module}", f"unc.A/{module}"


class HAFLQClientRound(ClientRound):
    """Train the client's most important components, measure every component's sensitivity.

    Without ``truncate`` the client holds rank ``R`` and its budget is its declared rank
    (``ctx.client_ranks[ctx.client_id]``); with ``truncate`` it holds its rank-``r_k`` top
    components (their indices come as the message's ``index/<module>``) and trains them all.
    """

    method: HAFLQ
    uses_penalty = True
    corrects_gradients = True

    def __init__(
        self,
        method: Method,
        ctx: RoundContext,
        received: ClientMessage,
        state: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(method, ctx, received, state)
        opts = self.method.options
        self._beta = (opts.beta1, opts.beta2)
        self._live: dict[str, tuple[Tensor, Tensor]] = {}
        #: module → the global indices of the adapter's columns (truncate) or ``None`` (all R)
        self._columns: dict[str, Tensor | None] = {}
        #: module → ``(Ī_B, Ū_B, Ī_A, Ū_A)`` at rank R, indexed by global component
        self._ema: dict[str, list[Tensor]] = {}
        #: module → the trained components (indices into the adapter's columns, ascending)
        self.trained: dict[str, Tensor] = {}
        #: module → the frozen components (``None``: none is frozen)
        self._frozen: dict[str, Tensor | None] = {}
        budget = self._budget()
        for module, (B, A) in received.factors.items():
            d, n, R, dev = B.shape[0], A.shape[1], self.method.r_max, B.device
            if state is not None:
                names = _state_names(module)
                ema = [state[k].to(device=dev, dtype=torch.float32).clone() for k in names]
            else:
                ema = [
                    torch.zeros(*shape, device=dev) for shape in ((d, R), (d, R), (R, n), (R, n))
                ]
            self._ema[module] = ema
            width = B.shape[-1]
            if opts.truncate:
                columns = received.extras[f"index/{module}"].to(device=dev, dtype=torch.long)
                self._columns[module] = columns
                self.trained[module] = torch.arange(width)
            else:
                self._columns[module] = None
                self.trained[module] = top_components(component_scores(*ema), budget)
            frozen = torch.ones(width, dtype=torch.bool)
            frozen[self.trained[module]] = False
            self._frozen[module] = torch.nonzero(frozen).flatten().to(dev) if frozen.any() else None

    def _budget(self) -> int:
        """``n_k``: the components trained per module."""
        if self.method.options.truncate:
            return self.rank
        ranks, client = self.ctx.client_ranks, self.ctx.client_id
        if client is None or client >= len(ranks):
            raise ValueError(
                "haflq: a client's budget is its declared rank, ctx.client_ranks[client_id]; "
                f"client {client} is not in client_ranks {list(ranks)}"
            )
        return min(int(ranks[client]), self.rank)

    def penalty(self, live: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor | None:
        """No loss term: record the live effective factors, the ``w`` of the sensitivity."""
        self._live = {k: (B.detach(), A.detach()) for k, (B, A) in live.items()}
        return None

    def correct_gradients(self, grads: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> None:
        """Update ``Ī``, ``Ū`` of every component from the raw gradients, then zero the
        gradients of the frozen components (columns of ``B``, rows of ``A``).
        """
        beta1, beta2 = self._beta
        for module, (g_B, g_A) in grads.items():
            if g_B is None or g_A is None:
                raise ValueError(f"haflq: {module} has a factor without gradient")
            B, A = self._live[module]
            ipt_B, unc_B, ipt_A, unc_A = self._ema[module]
            col = self._columns[module]
            if col is None:  # the adapter's columns are the R global components
                ipt_B, unc_B = smooth_sensitivity(B, g_B, ipt_B, unc_B, beta1, beta2)
                ipt_A, unc_A = smooth_sensitivity(A, g_A, ipt_A, unc_A, beta1, beta2)
            else:  # truncate: they are the global components ``col``
                ipt_B[:, col], unc_B[:, col] = smooth_sensitivity(
                    B, g_B, ipt_B[:, col], unc_B[:, col], beta1, beta2
                )
                ipt_A[col], unc_A[col] = smooth_sensitivity(
                    A, g_A, ipt_A[col], unc_A[col], beta1, beta2
                )
            self._ema[module] = [ipt_B, unc_B, ipt_A, unc_A]
            frozen = self._frozen[module]
            if frozen is not None:
                g_B[:, frozen] = 0
                g_A[frozen, :] = 0

    def finish(self, trained: Factors) -> ClientUpload:
        """Upload the factors with the frozen components exactly as received and the mask of
        the trained ones (``truncate``: the adapter and its components' scores); keep
        ``Ī``, ``Ū``.
        """
        factors: Factors = {}
        extras: dict[str, Tensor] = {}
        state: dict[str, Tensor] = {}
        for module, (B_t, A_t) in trained.items():
            B_0, A_0 = self.received.factors[module]
            B = B_t.detach().to(B_0.dtype).clone()
            A = A_t.detach().to(A_0.dtype).clone()
            columns, frozen, ema = self._columns[module], self._frozen[module], self._ema[module]
            if frozen is not None:  # exactly as received, whatever weight decay did to them
                B[:, frozen] = B_0[:, frozen]
                A[frozen, :] = A_0[frozen, :]
            if columns is None:
                mask = torch.zeros(B.shape[-1], dtype=B_0.dtype, device=B.device)
                mask[self.trained[module].to(B.device)] = 1
                extras[f"mask/{module}"] = mask
            else:
                scores = component_scores(*ema)[columns]
                extras[f"score/{module}"] = scores.to(device=B.device, dtype=B_0.dtype)
            factors[module] = (B, A)
            for key, value in zip(_state_names(module), ema, strict=True):
                state[key] = value
        return ClientUpload(factors, extras=extras, state=state)


# ------------------------------------------------------------------------ server half
@register
class HAFLQ(Method):
    """Equal rank ``R = r_max``; each client trains its ``r_k`` most important components;
    per-component averaging over the clients that trained them.
    """

    name = "haflq"
    Options = HAFLQOptions
    ClientRoundType = HAFLQClientRound
    options: HAFLQOptions

    # ------------------------------------------------------------------ server: state
    def init_state(
        self,
        ctx: RoundContext,
        module_shapes: Mapping[str, tuple[int, int]],
        dense: Mapping[str, Tensor] | None = None,
    ) -> GlobalState:
        """The default round-0 state; with ``truncate`` also a zero importance per component
        (``extras["importance"]``: module → ``(R,)``), so round 1 sends the first ``r_k``.
        """
        state = super().init_state(ctx, module_shapes, dense)
        if self.options.truncate:
            state.extras = {
                "importance": {
                    name: torch.zeros(self.r_max, dtype=ctx.dtype, device=ctx.device)
                    for name in module_shapes
                }
            }
        return state

    def client_rank(self, ctx: RoundContext, state: GlobalState, declared_rank: int) -> int:
        """``R = r_max`` for every client (its budget is its declared rank); with ``truncate``
        the declared rank.
        """
        return declared_rank if self.options.truncate else self.r_max

    # ------------------------------------------------------- server: what a client gets
    def sent_components(self, state: GlobalState, module: str, rank: int) -> Tensor:
        """``truncate``: the indices (ascending) of the top-``rank`` components of ``module``
        by the server's importance, ties to the lower index.
        """
        return top_components(state.extras["importance"][module], rank)

    def client_factors(self, ctx: RoundContext, state: GlobalState) -> Factors:
        """The whole global adapter (rank ``R``); with ``truncate`` the top-``r_k`` components
        ``B_g[:, S]``, ``A_g[S, :]``.
        """
        rank = ctx.rank
        self._check_rank(rank)
        if not self.options.truncate:
            return {k: (B.clone(), A.clone()) for k, (B, A) in state.factors.items()}
        out: Factors = {}
        for name, (B, A) in state.factors.items():
            index = self.sent_components(state, name, rank).to(B.device)
            out[name] = (B[:, index].clone(), A[index, :].clone())
        return out

    def client_message(self, ctx: RoundContext, state: GlobalState) -> ClientMessage:
        """:meth:`client_factors`; with ``truncate`` also the indices (``index/<module>``)."""
        factors = self.client_factors(ctx, state)
        if not self.options.truncate:
            return ClientMessage(factors)
        extras = {
            f"index/{name}": self.sent_components(state, name, ctx.rank).to(
                device=B.device, dtype=B.dtype
            )
            for name, (B, _) in state.factors.items()
        }
        return ClientMessage(factors, extras)

    def level_factors(self, ctx: RoundContext, state: GlobalState) -> Factors:
        """Every level holds the global model (its clients hold the whole adapter); with
        ``truncate`` level ``r`` holds the top-``r`` components.
        """
        if self.options.truncate:
            return super().level_factors(ctx, state)
        return self.model_factors(state)

    # ------------------------------------------------------------- server: aggregation
    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The per-component average with client ``k`` read as having trained components
        ``0 … r_k − 1`` (its factors' columns): what a bare ``(B_k, A_k, n_k)`` says.

        In a run the components each client trained come with its upload (the mask, or the
        server's top-``r_k`` with ``truncate``): :meth:`finish_state` aggregates with them.
        """
        if previous is None:
            raise ValueError("haflq needs previous=(B_g, A_g): an untrained component is kept")
        out_B, out_A = [], []
        batch = previous[0].dim() == 3
        prev_list = list(zip(*previous, strict=True)) if batch else [previous]
        for i, prev in enumerate(prev_list):
            contributions = [
                (
                    B[i] if batch else B,
                    A[i] if batch else A,
                    torch.arange(B.shape[-1]),
                    n,
                )
                for B, A, n in updates
            ]
            B_new, A_new = component_average(prev, contributions)
            out_B.append(B_new)
            out_A.append(A_new)
        if batch:
            return torch.stack(out_B), torch.stack(out_A)
        return out_B[0], out_A[0]

    def contributions(
        self, previous: GlobalState, module: str, accepted: Sequence[ClientUpdate]
    ) -> list[Contribution]:
        """What each accepted client trained of ``module``: the masked components of its
        rank-``R`` upload, or (``truncate``) its whole adapter at the server's top-``r_k``.
        """
        out: list[Contribution] = []
        for u in accepted:
            B, A = u.factors[module]
            if self.options.truncate:
                index = self.sent_components(previous, module, u.rank)
                out.append((B, A, index, u.num_samples))
                continue
            index = torch.nonzero(u.extras[f"mask/{module}"].cpu() > 0.5).flatten()
            dev = index.to(B.device)
            out.append((B[:, dev], A[dev, :], index, u.num_samples))
        return out

    def finish_state(
        self,
        ctx: RoundContext,
        previous: GlobalState,
        state: GlobalState,
        accepted: Sequence[ClientUpdate],
    ) -> GlobalState:
        """The per-component average over the clients that trained each component
        (:func:`component_average`; an untrained component keeps its previous value); with
        ``truncate`` also the importance (sample-weighted mean of the uploaded scores).
        """
        factors: Factors = {}
        importance: dict[str, Tensor] = {}
        for name, prev in previous.factors.items():
            parts = self.contributions(previous, name, accepted)
            factors[name] = component_average(prev, parts)
            if self.options.truncate:  # the scores averaged like a component: a (1, r) "B"
                old = previous.extras["importance"][name]
                scores = [
                    (u.extras[f"score/{name}"][None, :], u.extras[f"score/{name}"][:, None], S, n)
                    for u, (_, _, S, n) in zip(accepted, parts, strict=True)
                ]
                importance[name] = component_average((old[None, :], old[:, None]), scores)[0][0]
        if not self.options.truncate:
            return replace(state, factors=factors)
        return replace(state, factors=factors, extras={**state.extras, "importance": importance})

    def validate(
        self,
        state: GlobalState,
        update: ClientUpdate,
        *,
        ctx: RoundContext | None = None,
        wire_dtypes: Sequence[torch.dtype] = (),
    ) -> None:
        """The default checks, and every mask entry 0 or 1."""
        super().validate(state, update, ctx=ctx, wire_dtypes=wire_dtypes)
        for key, mask in update.extras.items():
            if key.startswith("mask/") and not bool(((mask == 0) | (mask == 1)).all()):
                raise InvalidUpdateError(update.client_id, f"{key}: entries must be 0 or 1")

    # ---------------------------------------------------------------------- privacy
    def privacy_refusal(self) -> str | None:
        """Which components a client trains is chosen from its data, so neither the rule's
        per-component divisors nor the mask (or, with ``truncate``, the scores) can be released.
        """
        what = "its uploaded scores steer what" if self.options.truncate else "its mask says what"
        return (
            "haflq averages each component over the clients that trained it, and a client picks "
            f"those from its own data (importance; {what} it trained): the per-component counts "
            "are data-dependent and travel outside the private update, and dividing by the "
            "public q·N instead is zero-padded averaging; use rbla (per-index, public ranks) or "
            "another factor method (fedit, hetlora, ffa, rolora, fedrot)"
        )

    # ------------------------------------------------------------- server: traffic
    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """The whole adapter, ``(d + n) R`` per module; with ``truncate`` ``(d + n + 1) r_k``
        (the components and their indices).
        """
        if self.options.truncate:
            return sum((d + n + 1) * ctx.rank for d, n in state.module_shapes.values())
        return sum((d + n) * self.r_max for d, n in state.module_shapes.values())

    def upload_bytes(self, ctx: RoundContext, update: ClientUpdate) -> int:
        """The trained components and the mask (``truncate``: the adapter and the scores)."""
        if self.options.truncate:
            return super().upload_bytes(ctx, update)
        total = 0
        for name, (B, A) in update.factors.items():
            mask = update.extras[f"mask/{name}"]
            trained = int((mask > 0.5).sum())
            total += trained * (B.shape[0] * B.element_size() + A.shape[1] * A.element_size())
            total += mask.numel() * mask.element_size()
        return total

    # ------------------------------------------------------------------ client half
    def upload_extra_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        """``mask/<module> (r,)``, 1 where a component was trained (``truncate``:
        ``score/<module> (r_k,)``, its components' scores).
        """
        key = "score" if self.options.truncate else "mask"
        return {f"{key}/{name}": (ctx.rank,) for name in state.module_shapes}

    def client_state_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        """``Ī``, ``Ū`` of ``B`` (``(d, R)``) and of ``A`` (``(R, n)``) per module."""
        R = self.r_max
        out: dict[str, tuple[int, ...]] = {}
        for name, (d, n) in state.module_shapes.items():
            ib, ub, ia, ua = _state_names(name)
            out[ib] = out[ub] = (d, R)
            out[ia] = out[ua] = (R, n)
        return out
