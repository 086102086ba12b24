"""AFLoRA: ``B_i Λ_i A`` adapters with a learnable diagonal, rank pruning by ``|λ|``, a shared
``A`` and per-column (rank-aware) aggregation (docs/methods.md#aflora).

Zhou, Pang and Wang, "AFLoRA: Adaptive Federated Fine-Tuning of Large Language Models with
Resource-Aware Low-Rank Adaption" (2025, https://arxiv.org/abs/2505.24773; v2 "Adaptive LoRA for
Resource-Efficient Federated Fine-Tuning …"). Only the abstracts of v1 and v2 were available to
us. **What is the paper's** (its abstracts): a client's update is ``ΔW_i = B_i Λ_i A`` with a
learnable diagonal ``Λ_i`` that guides the client's rank (pruning to its resource budget), the
updates of ``A`` (shared) and of the client-specific factors are decoupled between the clients
and the server, the server aggregates the zero-padded heterogeneous updates column by column
with rank-aware weights ("lossless matrix expansion"), and v1 refines on a public set on the
server. **Everything below that is more precise is our reading.**

Rule, per module, with ``R = r_max`` components (columns of ``B̃ = B Λ``, rows of ``A``):

- *Shared ``A``.* ``A_g = c S``, ``S ∈ {±1}^{R×n}`` drawn once from the run's seed,
  ``c = 1/√(3n)`` (the standard deviation of PEFT's default ``lora_A``). No client changes it; the
  server would update it only in the public-set refinement, which is not available here (below),
  so ``A_g`` stays its round-0 draw (FFA-LoRA's frozen ``A``).
- *What a client trains.* Client ``i`` with budget ``r_i`` keeps the components ``S_i`` (``r_i``
  of the ``R``) with the largest ``|λ_ij|`` — its last ``λ_ij`` for a component it trained
  before, ``1`` for one it never trained; ties go to the lower index, so a newcomer's ``S_i`` is
  ``{1 … r_i}``. It receives ``B̃_g[:, S_i]`` and starts from ``B_i = B̃_g[:, S_i]``,
  ``Λ_i = I``, and trains ``B_i`` and ``λ_i`` (``r_i`` numbers) on ``B_i Λ_i A_g[S_i]``.
- *Upload.* ``B_i Λ_i`` (``Λ`` folded into ``B``), the ``A`` rows it was sent (identical across
  clients, never read by the server) and ``λ_i`` (``r_i`` numbers), from which the server keeps
  the client's scores for its next selection.
- *Aggregation (rank-aware, per column).* ``C_j = {i : j ∈ S_i}``,
  ``B̃_g[:, j] ← Σ_{i∈C_j} n_i (B_i Λ_i)[:, j] / Σ_{i∈C_j} n_i``; a column nobody kept is carried.
  Every component's average is exact — ``B̃_g A_g = Σ_j B̃_g[:, j] a_jᵀ`` has no cross terms,
  since ``A`` is shared — and the product is FedAvg's ``Σ p_i ΔW_i`` when every client kept every
  column.
- The global model and the exported adapter are ``(B̃_g, A_g)``: ``Λ`` is folded into ``B``.

How ``Λ`` is learned within the client hooks (the adapter has only ``lora_B`` and ``lora_A``):
``lora_A`` holds ``Λ_i A_g[S_i]``, whose row ``j`` is ``λ_j a_j``. The raw gradient ``g_j`` of
that row gives ``∂L/∂λ_j = g_j · a_j``, and :meth:`AFLoRAClientRound.correct_gradients` replaces
the row's gradient by ``(∂L/∂λ_j) a_j``. Because every entry of ``a_j`` has the same magnitude
``c``, every optimizer step keeps the row on the line ``λ a_j``, entry for entry and in floating
point: plain SGD is exactly SGD on ``λ_j`` (and on ``B``); AdamW (elementwise) moves each entry by
the AdamW step of ``∂L/∂λ_j`` in units of ``c``, i.e. ``λ_j`` with learning rate ``η / c`` — the
relative pace at which plain LoRA's ``A`` entries move — and its weight decay scales the row
along the line; gradient clipping sees the row's norm ``|∂L/∂λ_j| ‖a_j‖ = |∂L/∂λ_j| / √3``.

Departures and readings (docs/methods.md#aflora): ``A`` is a scaled sign matrix (so the
reparametrisation above is exact) and is never updated (no server data); ``Λ_i`` restarts at
``I`` every round (``B̃_g`` already carries the last ``Λ``s) and its end-of-round values are the
client's pruning scores; the selection is made from the reported ``λ`` by the server, with the
same rule the client would apply, so that what a client is sent needs no client state; the
per-column weights are sample counts; the public-set refinement (``public_refine``) is refused —
the server would have to train the adapter on a public set, and the method hooks are model-free.
``selection: nested`` (always ``{1 … r_i}``) is an ablation without the ``Λ``-guided pruning.
Privacy (docs/privacy.md): refused with the pruning (its columns are chosen from the client's
data); with ``selection: nested``, factor space on ``B Λ`` per rank index.

Traffic (docs/design.md#communication): down ``B̃_g[:, S_i]`` and the ``r_i`` indices of
``S_i`` (a client regenerates ``A_g`` from the run's seed, as FFA-LoRA's does); up
``B_i Λ_i`` and ``λ_i``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

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
from raflora.methods.padding import pad_rank
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register
from raflora.methods.state import FactorAggregation, tensor_bytes
from raflora.methods.validation import ClientUpdate

__all__ = [
    "AFLoRA",
    "AFLoRAClientRound",
    "AFLoRAOptions",
    "column_average",
    "shared_a_init",
    "top_components",
]

_LAMBDA = "lambda/"


def shared_a_init(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """The shared ``A = c S``: ``S`` uniform random signs, ``c = 1/√(3 cols)`` (the standard
    deviation of PEFT's default ``lora_A``), ``(rows, cols)`` float32 on the CPU.

    Every entry has the magnitude ``c``: what keeps ``lora_A = Λ A`` exact under the optimizer
    (module docstring).
    """
    signs = torch.randint(0, 2, (rows, cols), generator=generator).to(torch.float32) * 2 - 1
    return signs * (1.0 / math.sqrt(3 * cols))


def top_components(scores: Tensor, budget: int) -> Tensor:
    """The ``budget`` indices of the largest ``|scores|``, ascending; ties go to the lower index
    (a stable sort), so equal scores give ``0 … budget − 1``.
    """
    order = torch.sort(-scores.abs(), stable=True).indices
    return torch.sort(order[:budget]).values


def column_average(updates: ModuleUpdates, previous: tuple[Tensor, Tensor], rank: int) -> Tensor:
    """``B̃_g[:, j] = Σ_{k∈C_j} n_k B_k[:, j] / Σ_{k∈C_j} n_k`` over ``C_j``, the updates whose
    ``A_k`` row ``j`` is non-zero (the components they kept); a column no update kept is
    carried from ``previous``. Factors zero-padded to ``rank``; sums in float64.
    """
    B_prev = previous[0]
    num = torch.zeros(B_prev.shape, dtype=torch.float64, device=B_prev.device)
    den = torch.zeros((*B_prev.shape[:-2], rank), dtype=torch.float64, device=B_prev.device)
    for B_k, A_k, n_k in updates:
        kept = (pad_rank(A_k, rank, -2) != 0).any(dim=-1)  # (…, rank)
        weight = float(n_k) * kept.double()
        num = num + pad_rank(B_k, rank, -1).double() * weight[..., None, :]
        den = den + weight
    covered = den > 0
    mean = num / torch.where(covered, den, torch.ones_like(den))[..., None, :]
    return torch.where(covered[..., None, :], mean, B_prev.double()).to(B_prev.dtype)


@dataclass(frozen=True)
class AFLoRAOptions(MethodOptions):
    """AFLoRA's options (``method_options`` of an aflora run)."""

    selection: Literal["lambda", "nested"] = option(
        "lambda",
        "Which components a client of budget r_i trains: 'lambda' (the r_i with the largest |λ|, "
        "AFLoRA's pruning) or 'nested' (always the first r_i: an ablation without it).",
    )
    public_refine: bool = option(
        False,
        "The server's refinement on a small public set (AFLoRA v1): not available — the server "
        "would have to train the adapter, and the method hooks have no model; true is refused.",
    )
    public_dataset: str = option(
        "", "The public set of public_refine (read only with it; refused while it is refused)."
    )

    def check(self) -> list[str]:
        """``public_refine`` is refused; ``public_dataset`` only goes with it."""
        problems = []
        if self.public_refine:
            problems.append(
                "public_refine: the public-set refinement is not available: the server would "
                "have to train the adapter on "
                + (
                    f"public_dataset {self.public_dataset!r}"
                    if self.public_dataset
                    else "a public set"
                )
                + ", and the method hooks are model-free (docs/methods.md#aflora); set "
                "public_refine: false"
            )
        elif self.public_dataset:
            problems.append("public_dataset: read only with public_refine: true")
        return problems


class AFLoRAClientRound(ClientRound):
    """Trains ``B_i`` and ``λ_i`` on ``B_i Λ_i A_g[S_i]``; uploads ``B_i Λ_i`` and ``λ_i``.

    ``lora_A`` holds ``Λ_i A_g[S_i]`` (``Λ_i = I`` at the start): its gradient is replaced by
    the gradient of ``λ`` along the shared rows (module docstring).
    """

    method: AFLoRA
    trains = frozenset({"B", "A"})
    corrects_gradients = True

    def __init__(
        self,
        method: Method,
        ctx: RoundContext,
        received: ClientMessage,
        state: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(method, ctx, received, state)
        # the shared rows a_j of the components this client trains (A_g[S_i])
        self._rows = {name: A.detach().clone() for name, (_, A) in received.factors.items()}

    def correct_gradients(self, grads: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> None:
        """Row ``j`` of ``lora_A``'s gradient ← ``(g_j · a_j) a_j`` (``g_j · a_j = ∂L/∂λ_j``)."""
        for name, (_, g_A) in grads.items():
            if g_A is None:
                raise ValueError(f"aflora: {name}'s lora_A (holding Λ A) has no gradient")
            a = self._rows[name].to(device=g_A.device, dtype=g_A.dtype)
            dlam = (g_A * a).sum(dim=-1, keepdim=True)  # (r, 1): ∂L/∂λ_j
            g_A.copy_(dlam * a)

    def finish(self, trained: Factors) -> ClientUpload:
        """``(B_i Λ_i, A_g[S_i])`` and, when the method prunes, ``λ_i`` (``lambda/<module>``),
        with ``λ_j = (lora_A[j] · a_j) / ‖a_j‖²``.
        """
        factors: Factors = {}
        extras: dict[str, Tensor] = {}
        for name, (B, A) in trained.items():
            a = self._rows[name].to(device=A.device, dtype=torch.float64)
            lam = (A.double() * a).sum(dim=-1) / (a * a).sum(dim=-1)  # (r,)
            factors[name] = ((B.double() * lam).to(B.dtype), self._rows[name].to(A.dtype))
            if self.method.prunes:  # the server's pruning scores; nothing to keep without it
                extras[_LAMBDA + name] = lam.to(torch.float32)
        return ClientUpload(factors, extras)


@register
class AFLoRA(Method):
    """``B Λ A`` with a learnable diagonal, ``|λ|``-guided pruning, a shared ``A`` and
    per-column aggregation over the clients that kept each column.
    """

    name = "aflora"
    Options = AFLoRAOptions
    ClientRoundType = AFLoRAClientRound
    options: AFLoRAOptions

    @property
    def prunes(self) -> bool:
        """Whether clients train the components of largest ``|λ|`` (``selection: lambda``)."""
        return self.options.selection == "lambda"

    # ------------------------------------------------------------------ server: state
    def init_state(
        self,
        ctx: RoundContext,
        module_shapes: Mapping[str, tuple[int, int]],
        dense: Mapping[str, Tensor] | None = None,
    ) -> GlobalState:
        """``B̃_g = 0`` and the shared ``A_g = c S`` (:func:`shared_a_init`, modules in sorted
        name order from ``ctx.generator``); no client scores yet.
        """
        state = super().init_state(ctx, module_shapes, dense)  # A from initial_a, below
        return replace(state, extras={"scores": {}})

    def initial_a(self, n: int, generator: torch.Generator) -> Tensor:
        """The shared ``A = c S`` of one module (:func:`shared_a_init`)."""
        return shared_a_init(self.r_max, n, generator)

    def scores(self, state: GlobalState, client_id: int | None, module: str) -> Tensor:
        """Client ``client_id``'s pruning scores of ``module``'s ``R`` components: its last
        ``λ_j`` for the components it trained, 1 for the others (``(R,)`` float32).
        """
        own: dict[int, dict[str, Tensor]] = state.extras.get("scores", {})
        kept = own.get(client_id, {}).get(module) if client_id is not None else None
        if kept is not None:
            return kept
        return torch.ones(self.r_max, dtype=torch.float32, device=state.device)

    def selection(
        self, state: GlobalState, client_id: int | None, module: str, budget: int
    ) -> Tensor:
        """``S_i``: the ``budget`` components client ``client_id`` trains in ``module``
        (ascending indices): the largest ``|λ|`` (:func:`top_components`), or ``0 … budget − 1``
        with ``selection: nested``.
        """
        self._check_rank(budget)
        if not self.prunes:
            return torch.arange(budget, device=state.device)
        return top_components(self.scores(state, client_id, module), budget)

    # ------------------------------------------------------- server: what a client gets
    def client_message(self, ctx: RoundContext, state: GlobalState) -> ClientMessage:
        """``B̃_g[:, S_i]`` and ``A_g[S_i]`` per module (``S_i`` from the client's scores)."""
        factors: Factors = {}
        for name, (B, A) in state.factors.items():
            sel = self.selection(state, ctx.client_id, name, ctx.rank)
            factors[name] = (B[:, sel].clone(), A[sel].clone())
        return ClientMessage(factors)

    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """``B̃_g[:, S_i]`` and the indices of ``S_i``: ``(d + 1) r_i`` per module (the client
        regenerates ``A_g`` from the run's seed); ``d r_i`` with ``selection: nested``.
        """
        extra = 1 if self.prunes else 0
        return sum((d + extra) * ctx.rank for d, _ in state.module_shapes.values())

    def upload_bytes(self, ctx: RoundContext, update: ClientUpdate) -> int:
        """``B_i Λ_i`` and ``λ_i`` (the ``A`` rows are the server's own)."""
        return sum(B.numel() * B.element_size() for B, _ in update.factors.values()) + (
            tensor_bytes(update.extras)
        )

    def upload_extra_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        """``λ_i``: ``lambda/<module> (r_i,)`` (none with ``selection: nested``)."""
        if not self.prunes:
            return {}
        return {_LAMBDA + name: (ctx.rank,) for name in state.module_shapes}

    # ------------------------------------------------------------- server: aggregation
    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(B̃_g, A_g)``: :func:`column_average` of the updates, placed at their components
        (``B_k``'s column ``j`` counts where ``A_k``'s row ``j`` is non-zero; narrower updates are
        zero-padded, i.e. the nested components), ``A_g`` kept from ``previous`` (required).
        """
        if previous is None:
            raise ValueError("aflora needs previous=(B_g, A_g): A_g is the shared A")
        return column_average(updates, previous, self.r_max), previous[1].clone()

    def aggregate_factors(
        self, ctx: RoundContext, state: GlobalState, accepted: Sequence[ClientUpdate]
    ) -> FactorAggregation:
        """Each update spread to ``R`` components first (:meth:`spread`), then per module."""
        spread = [replace(u, factors=self.spread(state, u)) for u in accepted]
        return super().aggregate_factors(ctx, state, spread)

    def spread(self, state: GlobalState, update: ClientUpdate) -> Factors:
        """An update at its components: ``B_k`` in columns ``S_k`` of a zero ``(d, R)``, and
        ``A_g``'s rows ``S_k`` in a zero ``(R, n)`` (what marks the components it kept).
        """
        out: Factors = {}
        for name, (B, _) in update.factors.items():
            A_g = state.factors[name][1]
            sel = self.selection(state, update.client_id, name, update.rank)
            B_pad = B.new_zeros(B.shape[0], self.r_max)
            A_pad = A_g.new_zeros(self.r_max, A_g.shape[1])
            B_pad[:, sel] = B
            A_pad[sel] = A_g[sel]
            out[name] = (B_pad, A_pad)
        return out

    def finish_state(
        self,
        ctx: RoundContext,
        previous: GlobalState,
        state: GlobalState,
        accepted: Sequence[ClientUpdate],
    ) -> GlobalState:
        """Each accepted client's scores: its reported ``λ_i`` at ``S_i``
        (``extras["scores"][client][module]``, ``(R,)``); nothing with ``selection: nested``.
        """
        if not self.prunes:
            return state
        before: dict[int, dict[str, Tensor]] = previous.extras.get("scores", {})
        scores: dict[int, dict[str, Tensor]] = {k: dict(v) for k, v in before.items()}
        for u in accepted:
            own = scores.setdefault(u.client_id, {})
            for name in sorted(u.factors):
                row = self.scores(previous, u.client_id, name).clone()
                sel = self.selection(previous, u.client_id, name, u.rank)
                row[sel] = u.extras[_LAMBDA + name].to(row)
                own[name] = row
        extras: dict[str, Any] = {**state.extras, "scores": scores}
        return replace(state, extras=extras)

    # ---------------------------------------------------------------------- privacy
    def private_rule(self, ctx: RoundContext) -> PrivateRule | None:
        """``selection: nested``: factor space, ``B Λ`` only (``A`` is shared and public), column
        ``j``'s noised sum divided by ``q N_j``, the clients of the federation reaching it —
        RBLA's per-index rule on ``B``, which is this rule with the nested selection. ``None``
        with the ``|λ|``-guided pruning (:meth:`privacy_refusal`).
        """
        if self.prunes:
            return None
        return PrivateRule.factor("B", per_index=True)

    def privacy_refusal(self) -> str | None:
        """The ``|λ|``-guided pruning picks a client's columns from its data: refused."""
        if self.prunes:
            return (
                "aflora's pruning picks the columns a client trains from its learned λ (its "
                "data), and the server needs the λ to pick them, so the per-column counts and "
                "the λ travel outside the private update; run aflora with selection: nested "
                "(B Λ per column over the clients reaching it, divided by the public q·N_j)"
            )
        return super().privacy_refusal()
