"""FedHL: the untruncated global update as the aggregation basis, each client's change added to
it (docs/methods.md#fedhl).

Peng et al., "FedHL: Federated Learning for Heterogeneous Low-Rank Adaptation via Unbiased
Aggregation" (2025, https://arxiv.org/abs/2505.18494). Only the abstract was available to us; the
rule below is read from it ("the full-rank global model as a calibrated aggregation basis",
"optimal aggregation weights" that minimise a gradient-drift term) and from a public
reimplementation (``shock-xiaoke/FedHera``, ``fed_utils/model_aggregation.py``, its "unbiased"
server mode). What is the paper's and what is ours:

* **Basis (paper, as the reimplementation does it).** The server keeps the untruncated global
  update ``W_t`` (never truncated to ``r_max``). Client ``i`` of rank ``r_i`` starts from its
  truncated SVD ``W_t^{r_i} = U_r Σ_r V_rᵀ`` in FlexLoRA's split ``B = U_r Σ_r^{1/2}``,
  ``A = Σ_r^{1/2} V_rᵀ``, trains, returns ``B_i A_i``, and

      W_{t+1} = W_t + Σ_i p_i (B_i A_i − W_t^{r_i}),

  so what truncation left out of a client's start is never lost from ``W_t``: with equal client
  changes the global change is that change, whatever the ranks ("unbiased").
* **What a client subtracts (ours).** ``W_t^{r_i}`` is taken as the factors the client was
  actually sent (float32, ``B_g[:, :r_i] A_g[:r_i]``), so a client that returns what it got adds
  exactly nothing.
* **Weights (options; the paper's Eq. are not available to us).** ``weights: samples``
  (``p_i = n_i / Σ n_j``, default), ``truncation`` (``p_i ∝ 1 / (ê_i² + ε)`` with
  ``ê_i = Σ_modules ‖W_t − W_t^{r_i}‖²_F``, the reimplementation's reading) and ``relative``
  (``p_i ∝ 1 / ((ê_i / ‖W_t‖²_F)² + ε)``, scale-free). ``ê_i`` is 0 for a client whose rank
  reaches the rank of ``W_t``, so both error weights give such a client ``1/ε``: ``weight_cap``
  bounds the ratio of two clients' weights (``w_i ← min(w_i, cap · min_j w_j)``). The default
  is ``samples``: on the quickstart (seed 0, 10 rounds) it reached 58.2% against 57.7% for
  both error weights, ``truncation`` depends on the scale of the update, and the claim we can
  check (the unbiased change) holds for any weights summing to 1.
* **State (ours).** ``W_t = B_g A_g + T_t``: the global factors ``B_g (d, r_max)``,
  ``A_g (r_max, n)`` are the best rank-``r_max`` part of ``W_t`` in FlexLoRA's split (so the
  nested truncation every method sends *is* ``W_t^{r_i}``), and the rest ``T_t`` is merged into
  the base weights as a residual, as FedEx-LoRA merges its own
  (:meth:`~raflora.methods.Method.module_residual`): the merged base plus the global factors
  evaluate ``W_0 + W_t`` exactly, and the exported adapter is ``W_t`` (its SVD; with
  ``--rank r`` its best rank-``r`` approximation, the relative error stated). The round's
  residual is ``ΔW_t + B_g A_g − B_g' A_g'`` (``ΔW_t`` the weighted change above, primes the
  new factors): rank ``2 Σ r_i + 2 r_max``, whatever the rank of ``W_t``, and the merged model
  stays ``W_0 + Σ_t ΔW_t`` independently of the SVD's accuracy. ``T_t`` itself is kept
  factored in ``state.extras`` while the numerical rank of ``W_t`` is below
  ``factored_below · min(d, n)`` (default ½: above it factors cost more than the matrix), and
  the SVD of ``W_{t+1}`` is then the exact one of the stacked factors (QR + small SVD,
  :func:`raflora.linalg.factored_svd`, never the ``d × n`` matrix); above it the module
  switches to dense for good, and ``T_t`` is the merged ``state.base_delta``.
* **Departure (ours, forced by one shared base).** In the reimplementation a client trains on
  ``W_0 + W_t^{r_i}``; here it trains on the merged base, ``W_0 + T_t + W_t^{r_i}``: the engines
  keep one base for training and evaluation (docs/design.md#layers), and the evaluated model
  must be ``W_0 + W_t``. A rank-``r_max`` client thus starts from the global model itself. The
  client's change, and so the rule, is unchanged.
* Directions of ``W_t`` whose singular value is below ``1e-10 σ_1`` (what an exactly cancelled
  change leaves in float64) are dropped; a direction of ``B_g, A_g`` with zero singular value
  keeps a unit row of ``A`` (as FlexLoRA's completion does) so that it still trains.

Privacy (docs/privacy.md): refused (:meth:`FedHL.privacy_refusal`).

Traffic (docs/design.md#communication): factors up; factors down plus the last round's
factored residual, which the merged base needs (counted like FedEx-LoRA's, the round's own).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raflora.linalg import factored_svd, frobenius_norm, guarded_svd
from raflora.methods.averaging import sample_weights
from raflora.methods.base import FactorAggregation, Factors, GlobalState, Method, ModuleUpdates
from raflora.methods.context import RoundContext
from raflora.methods.options import MethodOptions, option
from raflora.methods.registry import register
from raflora.methods.validation import ClientUpdate

__all__ = ["FedHL", "FedHLOptions", "fedhl_step", "fedhl_weights", "split_factors"]

_LIVE_TOL = 1e-10
"""Singular values below this fraction of the largest are numerically zero (float64 sums)."""

_TAIL = "tail"
_DENSE = "dense"
_RESIDUAL_RANK = "residual_rank"


@dataclass(frozen=True)
class FedHLOptions(MethodOptions):
    """FedHL's options (``method_options`` of a fedhl run)."""

    weights: Literal["samples", "truncation", "relative"] = option(
        "samples",
        "Aggregation weights: 'samples' (p_i = n_i / Σ n_j), 'truncation' (p_i ∝ 1/(ê_i² + ε), "
        "ê_i = ‖W_t − W_t^{r_i}‖²_F summed over modules: the public reimplementation's) or "
        "'relative' (p_i ∝ 1/((ê_i / ‖W_t‖²_F)² + ε), scale-free).",
    )
    epsilon: float = option(1e-8, "ε of the truncation-error weights.", gt=0)
    weight_cap: float = option(
        100.0,
        "Largest ratio between two clients' truncation-error weights (w_i ≤ cap · min_j w_j).",
        ge=1,
    )
    factored_below: float = option(
        0.5,
        "W_t is kept factored while its numerical rank is below this fraction of min(d, n), "
        "dense above (0: always dense). The rule's result is the same either way.",
        ge=0,
        le=1,
    )


def split_factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """FlexLoRA's split of the top ``rank`` triplets: ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ``.

    A triplet whose singular value is numerically zero (below ``1e-10 σ_1``) gets a zero column
    of ``B`` and the unit row ``v_j`` in ``A`` (a LoRA pair with both factors zero would never
    train); missing triplets (``min(d, n) < rank``) are zero columns and rows.
    ``U (d, k)``, ``S (k,)`` descending, ``Vh (k, n)``; returns ``B (d, rank)``, ``A (rank, n)``.
    """
    k = min(rank, S.shape[-1])
    top = float(S[0]) if S.numel() else 0.0
    live = S[:k] > _LIVE_TOL * top if top > 0 else torch.zeros_like(S[:k], dtype=torch.bool)
    root = S[:k].clamp_min(0).sqrt()
    B = U[:, :k] * torch.where(live, root, torch.zeros_like(root))
    A = Vh[:k] * torch.where(live, root, torch.ones_like(root))[:, None]
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    return B, A


def _numerical_rank(S: Tensor) -> int:
    """Singular values above ``1e-10 σ_1``."""
    if S.numel() == 0 or float(S[0]) <= 0:
        return 0
    return int(torch.count_nonzero(_LIVE_TOL * S[0] < S))


def fedhl_weights(
    samples: Sequence[int],
    errors: Sequence[float],
    total: float,
    options: FedHLOptions,
) -> list[float]:
    """The clients' weights ``p_i`` (summing to 1).

    Parameters
    ----------
    samples : Sequence[int]
        ``n_i``.
    errors : Sequence[float]
        ``ê_i = Σ_modules ‖W_t − W_t^{r_i}‖²_F``.
    total : float
        ``‖W_t‖²_F`` summed over modules.
    options : FedHLOptions
        ``weights``, ``epsilon``, ``weight_cap``.
    """
    if options.weights == "samples":
        return [float(w) for w in sample_weights(list(samples), like=torch.empty(0)).tolist()]
    if options.weights == "truncation":
        x = [float(e) for e in errors]
    else:  # relative: the share of W_t's energy the client's start lacks (0 while W_t = 0)
        x = [float(e) / total if total > 0 else 0.0 for e in errors]
    w = [1.0 / (v * v + options.epsilon) for v in x]
    cap = options.weight_cap * min(w)
    w = [min(v, cap) for v in w]
    s = sum(w)
    return [v / s for v in w]


def _change_factors(
    updates: ModuleUpdates, top: tuple[Tensor, Tensor], p: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """``ΔW = Σ_i p_i (B_i A_i − B_g[:, :r_i] A_g[:r_i])`` as stacked float64 factors
    ``(d, 2 Σ r_i)``, ``(2 Σ r_i, n)``: each client's change from what it was sent.
    """
    B_g, A_g = top[0].double(), top[1].double()
    Bs, As = [], []
    for (B, A, _), w in zip(updates, p, strict=True):
        r = int(B.shape[-1])
        Bs += [B.double() * w, B_g[:, :r] * -w]
        As += [A.double(), A_g[:r]]
    return torch.cat(Bs, dim=-1), torch.cat(As, dim=-2)


def fedhl_step(
    top: tuple[Tensor, Tensor],
    tail: tuple[Tensor, Tensor] | Tensor,
    updates: ModuleUpdates,
    p: Sequence[float],
    r_max: int,
    factored_below: float,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """One module's FedHL round on ``W_t = B_g A_g + T_t``.

    Parameters
    ----------
    top : tuple[Tensor, Tensor]
        ``B_g (d, r_max)``, ``A_g (r_max, n)``: the best rank-``r_max`` part of ``W_t`` (split).
    tail : tuple[Tensor, Tensor] or Tensor
        ``T_t`` factored ``(d, k), (k, n)``, or dense ``(d, n)`` (then the result is dense too).
    updates : ModuleUpdates
        ``(B_i, A_i, n_i)`` of the accepted clients (2-D factors).
    p : Sequence[float]
        The weights ``p_i``.
    r_max : int
        Rank of the global factors.
    factored_below : float
        Keep ``T`` factored while the numerical rank of ``W_{t+1}`` is below this fraction of
        ``min(d, n)``.

    Returns
    -------
    tuple
        The new global factors ``(B_g', A_g')`` (state dtype), the round's residual
        ``ΔW + B_g A_g − B_g' A_g'`` factored (state dtype), and the new ``T`` factored in float
        (``U S, Vh`` of the directions past ``r_max``) or ``None`` when the module is dense.
    """
    dtype = top[0].dtype
    d, n = int(top[0].shape[0]), int(top[1].shape[1])
    B_d, A_d = _change_factors(updates, top, p)
    B_g, A_g = top[0].double(), top[1].double()
    new_tail: tuple[Tensor, Tensor] | None
    if isinstance(tail, Tensor):
        W = tail.double() + B_g @ A_g + B_d @ A_d  # dense W_{t+1}
        U, S, Vh = guarded_svd(W)
        new_tail = None
    else:
        B_t, A_t = tail
        U, S, Vh = factored_svd(
            torch.cat([B_g, B_t.double(), B_d], dim=-1),
            torch.cat([A_g, A_t.double(), A_d], dim=-2),
        )
        k = _numerical_rank(S)
        if k >= factored_below * min(d, n):
            new_tail = None  # dense from now on: T is the merged base delta
        else:
            # exactly cancelled directions dropped; T keeps what lies past r_max
            new_tail = (
                (U[:, r_max:k] * S[r_max:k]).to(dtype),
                Vh[r_max:k].to(dtype),
            )
    B_new, A_new = split_factors(U, S, Vh, r_max)
    B_new, A_new = B_new.to(dtype), A_new.to(dtype)
    residual = (
        torch.cat([B_d, B_g, -B_new.double()], dim=-1).to(dtype),
        torch.cat([A_d, A_g, A_new.double()], dim=-2).to(dtype),
    )
    return (B_new, A_new), residual, new_tail


@register
class FedHL(Method):
    """The untruncated ``W_t`` as the basis, ``W_{t+1} = W_t + Σ p_i (B_i A_i − W_t^{r_i})``."""

    name = "fedhl"
    Options = FedHLOptions
    options: FedHLOptions

    # ------------------------------------------------------------------ server: state
    def init_state(
        self,
        ctx: RoundContext,
        module_shapes: Mapping[str, tuple[int, int]],
        dense: Mapping[str, Tensor] | None = None,
    ) -> GlobalState:
        """``W_0 = 0``: the usual round-0 factors (``B_g = 0``, PEFT's ``A``) and an empty tail."""
        state = super().init_state(ctx, module_shapes, dense)
        state.extras = {
            _TAIL: {
                name: (B[:, :0].clone(), A[:0].clone()) for name, (B, A) in state.factors.items()
            },
            _DENSE: [],
        }
        return state

    def global_update(self, state: GlobalState) -> dict[str, Tensor]:
        """``W_t`` per module, formed densely (for tests and inspection)."""
        out: dict[str, Tensor] = {}
        for name, (B, A) in state.factors.items():
            W = B.double() @ A.double()
            tail = self._tail(state, name)
            T = tail.double() if isinstance(tail, Tensor) else tail[0].double() @ tail[1].double()
            out[name] = W + T
        return out

    def _tail(self, state: GlobalState, name: str) -> tuple[Tensor, Tensor] | Tensor:
        """``T_t`` of one module: factored from the extras, or the merged base delta."""
        if name in state.extras.get(_DENSE, []):
            B, A = state.factors[name]
            delta = state.base_delta.get(name)
            return delta if delta is not None else B.new_zeros(B.shape[0], A.shape[1])
        tail: tuple[Tensor, Tensor] = state.extras[_TAIL][name]
        return tail

    def truncation_errors(
        self, state: GlobalState, ranks: Sequence[int]
    ) -> tuple[list[float], float]:
        """``ê(r) = Σ_modules ‖W_t − W_t^{r}‖²_F`` for each rank, and ``‖W_t‖²_F``."""
        errors = [0.0] * len(ranks)
        total = 0.0
        for name, (B, A) in state.factors.items():
            tail = self._tail(state, name)
            t2 = float(
                torch.linalg.vector_norm(tail.double()) ** 2
                if isinstance(tail, Tensor)
                else frobenius_norm(*tail) ** 2
            )
            total += float(frobenius_norm(B, A)) ** 2 + t2
            for i, r in enumerate(ranks):
                errors[i] += float(frobenius_norm(B[:, r:], A[r:])) ** 2 + t2
        return errors, total

    # ------------------------------------------------------------- server: aggregation
    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One module (batch) on its own: ``W_t`` is ``previous``'s product (no tail), its
        clients were sent ``previous``'s nested truncation; the new best rank-``r_max`` part of
        ``W_{t+1}`` in FlexLoRA's split (a run keeps the tail: :meth:`aggregate`).
        """
        return self._standalone(updates, previous)[0]

    def module_residual(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        new: tuple[Tensor, Tensor],
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """``ΔW + B_g A_g − B_g' A_g'``: what lies past ``r_max``, merged into the base."""
        return self._standalone(updates, previous)[1]

    def _standalone(
        self, updates: ModuleUpdates, previous: tuple[Tensor, Tensor] | None
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """:func:`fedhl_step` for each module of a batch, ``W_t`` = ``previous``'s product."""
        B0, A0 = updates[0][0], updates[0][1]
        batch, d, n, r = B0.shape[:-2], int(B0.shape[-2]), int(A0.shape[-1]), self.r_max
        if previous is None:  # W_t = 0, and every client was sent zero factors
            previous = (B0.new_zeros(*batch, d, r), B0.new_zeros(*batch, r, n))
        size = math.prod(batch)
        prev_B, prev_A = previous[0].reshape(size, d, r), previous[1].reshape(size, r, n)
        flat = [(B.reshape(size, d, -1), A.reshape(size, -1, n), m) for B, A, m in updates]
        outs = []
        for j in range(size):
            top = (prev_B[j], prev_A[j])
            ups = [(B[j], A[j], m) for B, A, m in flat]
            ranks = [int(B.shape[-1]) for B, _, _ in ups]
            errors = [float(frobenius_norm(top[0][:, k:], top[1][k:])) ** 2 for k in ranks]
            total = float(frobenius_norm(*top)) ** 2
            p = fedhl_weights([m for _, _, m in ups], errors, total, self.options)
            empty = (top[0][:, :0], top[1][:0])
            outs.append(fedhl_step(top, empty, ups, p, r, self.options.factored_below))
        new = (
            torch.stack([o[0][0] for o in outs]).reshape(*batch, d, r),
            torch.stack([o[0][1] for o in outs]).reshape(*batch, r, n),
        )
        res = (
            torch.stack([o[1][0] for o in outs]).reshape(*batch, d, -1),
            torch.stack([o[1][1] for o in outs]).reshape(*batch, -1, n),
        )
        return new, res

    def aggregate_factors(
        self, ctx: RoundContext, state: GlobalState, accepted: Sequence[ClientUpdate]
    ) -> FactorAggregation:
        """The run's aggregation: every module with its tail, one set of weights for all; the
        new tail (factored modules), the dense modules and the residual's rank as ``extras``.
        """
        ranks = [u.rank for u in accepted]
        errors, total = self.truncation_errors(state, ranks)
        p = fedhl_weights([u.num_samples for u in accepted], errors, total, self.options)
        dense = set(state.extras.get(_DENSE, []))
        factors: Factors = {}
        residual: Factors = {}
        tails: dict[str, tuple[Tensor, Tensor]] = {}
        for name in sorted(state.module_shapes):
            tail = self._tail(state, name)
            ups = [(u.factors[name][0], u.factors[name][1], u.num_samples) for u in accepted]
            top, res, new_tail = fedhl_step(
                state.factors[name], tail, ups, p, self.r_max, self.options.factored_below
            )
            factors[name], residual[name] = top, res
            if new_tail is None:
                dense.add(name)
            else:
                tails[name] = new_tail
        extras = {
            _TAIL: tails,
            _DENSE: sorted(dense),
            _RESIDUAL_RANK: 2 * sum(ranks) + 2 * self.r_max,
        }
        return FactorAggregation(factors, residual, extras)

    # --------------------------------------------------------- privacy (docs/privacy.md)
    def privacy_refusal(self) -> str | None:
        """The client's change is a product-space update, but the noised mean must be added to
        the untruncated ``W_t``, whose part past ``r_max`` the private aggregation never sees.
        """
        return (
            "fedhl adds the clients' mean change to its untruncated W_t, whose part past r_max "
            "lives in the server state and the merged base, and the private aggregation "
            "(Method.private_aggregate_module) is given only the global factors; use a "
            "product-space method (flexlora, raflora) or a factor one (docs/privacy.md)"
        )

    # ------------------------------------------------------------- server: traffic
    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """The client's factors plus the last round's factored residual, per module."""
        residual = int(state.extras.get(_RESIDUAL_RANK, 0))
        return sum((d + n) * (ctx.rank + residual) for d, n in state.module_shapes.values())
