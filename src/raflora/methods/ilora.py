"""ILoRA: QR initialisation, concatenated-QR aggregation and rank-aware control variates
(docs/methods.md#ilora).

Zhou et al., "ILoRA" (2025, https://arxiv.org/abs/2511.16069). Only the abstract is available to
us; the three rules below are our readings of it, **the project's, not the paper's exact
algorithm** — in particular the initialisation for mixed ranks and the control-variate update.

(a) **QR initialisation.** Reduced QR ``W_0 = Q R`` of each adapted base weight;
``B_g = Q[:, :r_max]`` (orthonormal and nested, so every rank's client starts in the same
subspace), ``A_g = 0``, the base unchanged: every client's round-0 model is the pretrained one
(``qr_init: subspace``, default). The paper's variant also moves ``R[:r]`` into ``A`` and shifts
the base by ``−Q_r R_r`` (``qr_init: shift``); with mixed ranks a rank-``r_k`` client would then
start far from ``W_0``, so it is refused unless every client has the same rank.

(b) **Concatenated-QR aggregation.** ``ΔW = Σ p_k B_k A_k`` (exact) is re-factorised by its
reduced QR, ``B_g = Q[:, :r_max]``, ``A_g = R[:r_max, :]``, computed from the factors: ``Q_r``
from the QR of ``ΔW[:, :r_max] = B_cat A_cat[:, :r_max]`` (``d × r_max``), then
``R_r = Q_rᵀ B_cat A_cat``. Needs ``r_max ≤ min(d, n)`` (checked before the first round).
Truncating a QR is not the best rank-``r_max`` approximation; it is the published rule.

(c) **Rank-aware control variates** (option ``control_variates``, default on) — SCAFFOLD
(Karimireddy et al. 2020) in gradient units, valid for AdamW as for SGD:

- the server keeps ``c`` (factor-shaped at ``r_max``), client ``k`` keeps ``c_k`` (its rank's
  shape, zero at first) in its per-client state, across the rounds it takes part in;
- every local step adds ``c[:r_k] − c_k`` to the raw minibatch gradient of the factors, before
  clipping and the optimizer step (heads get none);
- after the round ``c_k⁺`` = the mean of the raw minibatch gradients; the client uploads
  ``Δc_k = c_k⁺ − c_k`` and keeps ``c_k⁺``;
- the server, per rank index ``j``: ``c[j] ← c[j] + (1 / K_j) Σ_{k ∈ S_t, r_k ≥ j} Δc_k[j]``,
  ``K_j`` the number of clients *in the federation* with ``r_k ≥ j``, which keeps ``c[j]`` the
  mean of the ``c_k[j]`` of every client holding index ``j``.

The gradients are those of the trained PEFT parameters (``lora_B.weight``, ``lora_A.weight``):
with the paper's ``lora_alpha = r`` they equal the effective factors' gradients. Known
limitation: the QR re-factorisation changes the factors' basis every round, so a stored ``c_k``
refers to the previous round's directions. Traffic (docs/design.md#communication): as FedIT,
plus ``c[:r_k]`` down and ``Δc_k`` up when the control variates are on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

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
from raflora.methods.context import Capabilities, RoundContext
from raflora.methods.options import MethodOptions, option
from raflora.methods.padding import stacked_factors
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register
from raflora.methods.validation import ClientUpdate

__all__ = ["ILoRA", "ILoRAOptions", "qr_aggregate"]


@dataclass(frozen=True)
class ILoRAOptions(MethodOptions):
    """ILoRA's options (``method_options`` of an ilora run)."""

    qr_init: Literal["subspace", "shift"] = option(
        "subspace",
        "'subspace': B_g = Q[:, :r_max], A_g = 0, base unchanged (the project's reading for mixed "
        "ranks); 'shift': the paper's, A_g = R[:r_max] and the base shifted by −Q_r R_r "
        "(a single rank level only).",
    )
    control_variates: bool = option(
        True, "Rank-aware control variates (SCAFFOLD in gradient units, docs/methods.md#ilora)."
    )


def qr_aggregate(B_cat: Tensor, A_cat: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(Q_r, Q_rᵀ B_cat A_cat)`` with ``Q_r`` the Q of the reduced QR of
    ``B_cat A_cat[:, :rank]`` — the first ``rank`` columns of the QR of ``ΔW = B_cat A_cat``,
    without forming ``ΔW`` (``B_cat (…, d, R)``, ``A_cat (…, R, n)``). In float64.
    """
    B64, A64 = B_cat.double(), A_cat.double()
    Q, _ = torch.linalg.qr(B64 @ A64[..., :, :rank])  # (…, d, rank)
    R = (Q.transpose(-1, -2) @ B64) @ A64  # (…, rank, n)
    return Q, R


def _names(module: str) -> tuple[str, str]:
    return f"c.B/{module}", f"c.A/{module}"


class ILoRAClientRound(ClientRound):
    """Plain LoRA plus the control-variate correction ``c[:r_k] − c_k`` of every gradient."""

    method: ILoRA

    def __init__(
        self,
        method: Method,
        ctx: RoundContext,
        received: ClientMessage,
        state: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(method, ctx, received, state)
        self.corrects_gradients = self.method.options.control_variates
        self._c_k: dict[str, tuple[Tensor, Tensor]] = {}
        self._correction: dict[str, tuple[Tensor, Tensor]] = {}
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}
        self._steps = 0
        if not self.corrects_gradients:
            return
        for module in received.factors:
            kb, ka = _names(module)
            c_B, c_A = received.extras[kb], received.extras[ka]
            own = (
                (state[kb].to(c_B.dtype), state[ka].to(c_A.dtype))
                if state is not None
                else (torch.zeros_like(c_B), torch.zeros_like(c_A))
            )
            self._c_k[module] = own
            self._correction[module] = (c_B - own[0], c_A - own[1])
            self._sums[module] = (torch.zeros_like(c_B), torch.zeros_like(c_A))

    def correct_gradients(self, grads: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> None:
        """Record the raw gradients, then add ``c[:r_k] − c_k``."""
        self._steps += 1
        for module, (g_B, g_A) in grads.items():
            if g_B is None or g_A is None:
                raise ValueError(f"ilora: {module} has a factor without gradient")
            sum_B, sum_A = self._sums[module]
            sum_B.add_(g_B.to(sum_B.dtype))
            sum_A.add_(g_A.to(sum_A.dtype))
            corr_B, corr_A = self._correction[module]
            g_B.add_(corr_B.to(g_B.dtype))
            g_A.add_(corr_A.to(g_A.dtype))

    def finish(self, trained: Factors) -> ClientUpload:
        """Upload the factors and ``Δc_k``; keep ``c_k⁺`` (the mean raw gradient)."""
        if not self.corrects_gradients:
            return ClientUpload(trained)
        extras: dict[str, Tensor] = {}
        state: dict[str, Tensor] = {}
        for module, (old_B, old_A) in self._c_k.items():
            kb, ka = _names(module)
            if self._steps == 0:  # no local step: nothing measured, c_k stays
                new_B, new_A = old_B, old_A
            else:
                sum_B, sum_A = self._sums[module]
                new_B, new_A = sum_B / self._steps, sum_A / self._steps
            state[kb], state[ka] = new_B, new_A
            extras["d" + kb], extras["d" + ka] = new_B - old_B, new_A - old_A
        return ClientUpload(trained, extras=extras, state=state)


@register
class ILoRA(Method):
    """QR initialisation, concatenated-QR aggregation, rank-aware control variates."""

    name = "ilora"
    capabilities = Capabilities(reads_base_weights=True, quantized_base="residual")
    Options = ILoRAOptions
    ClientRoundType = ILoRAClientRound
    options: ILoRAOptions

    def __init__(self, rank_levels: Sequence[int], options: MethodOptions | None = None) -> None:
        super().__init__(rank_levels, options)
        if self.options.qr_init == "shift" and len(self.rank_levels) > 1:
            raise ValueError(
                "ilora's qr_init 'shift' needs a single rank level (with mixed ranks a client "
                f"would start far from the base model), got {list(self.rank_levels)}; use "
                "qr_init 'subspace'"
            )

    # ------------------------------------------------------------------ server: state
    def module_shape_problem(self, module_shapes: Mapping[str, tuple[int, int]]) -> str | None:
        """``r_max ≤ min(d, n)`` for every module (the QR of ``ΔW[:, :r_max]``)."""
        small = sorted(k for k, (d, n) in module_shapes.items() if self.r_max > min(d, n))
        if small:
            d, n = module_shapes[small[0]]
            return (
                f"ilora needs r_max ≤ min(d, n) for every adapted module; {small[0]} is "
                f"({d}, {n}) with r_max {self.r_max}"
                + (f" (and {len(small) - 1} more)" if len(small) > 1 else "")
            )
        return None

    def init_state(
        self,
        ctx: RoundContext,
        module_shapes: Mapping[str, tuple[int, int]],
        dense: Mapping[str, Tensor] | None = None,
    ) -> GlobalState:
        """QR initialisation from ``ctx.base_weights`` (required); zero control variates, with
        the federation's ``ctx.client_ranks`` (required with them) counted per rank index.
        """
        if ctx.base_weights is None:
            raise ValueError("ilora's QR initialisation needs the base weights")
        client_ranks, dtype, device = ctx.client_ranks, ctx.dtype, ctx.device
        if self.options.control_variates and not client_ranks:
            raise ValueError(
                "ilora's control variates need client_ranks (every client's rank: K_j counts "
                "the clients holding index j)"
            )
        problem = self.module_shape_problem(module_shapes)
        if problem is not None:
            raise ValueError(problem)
        state = super().init_state(ctx, module_shapes, dense)
        base_weights = ctx.base_weights()
        r = self.r_max
        factors: Factors = {}
        for name, (_, n) in sorted(module_shapes.items()):
            Q, R = torch.linalg.qr(base_weights[name].to(device=device, dtype=torch.float64))
            A = R[:r] if self.options.qr_init == "shift" else Q.new_zeros(r, n)
            factors[name] = (Q[:, :r].to(dtype).contiguous(), A.to(dtype).contiguous())
        state.factors = factors
        extras: dict[str, object] = {}
        if self.options.control_variates:
            extras["c"] = {
                name: (
                    torch.zeros(d, r, dtype=dtype, device=device),
                    torch.zeros(r, n, dtype=dtype, device=device),
                )
                for name, (d, n) in module_shapes.items()
            }
            extras["holders"] = [sum(1 for k in client_ranks if k > j) for j in range(r)]
        state.extras = extras
        return state

    def initial_residual(self, state: GlobalState) -> Factors | None:
        """``qr_init: shift``: the base shift ``−Q_r R_r = −B_g A_g`` of round 0 (factored)."""
        if self.options.qr_init != "shift" or state.round != 0:
            return None
        return {name: (-B, A) for name, (B, A) in state.factors.items()}

    # ------------------------------------------------------- server: what a client gets
    def client_message(self, ctx: RoundContext, state: GlobalState) -> ClientMessage:
        """The nested truncation, and ``c[:r_k]`` when the control variates are on."""
        rank = ctx.rank
        factors = self.client_factors(ctx, state)
        extras: dict[str, Tensor] = {}
        if self.options.control_variates:
            for name, (c_B, c_A) in state.extras["c"].items():
                kb, ka = _names(name)
                extras[kb], extras[ka] = c_B[:, :rank].clone(), c_A[:rank].clone()
        return ClientMessage(factors, extras)

    def download_numel(self, ctx: RoundContext, state: GlobalState) -> int:
        """Factors, and ``c[:r_k]`` (as many elements again) with control variates."""
        numel = super().download_numel(ctx, state)
        return 2 * numel if self.options.control_variates else numel

    def upload_extra_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        """``Δc_k``: ``dc.B/<module> (d, r_k)``, ``dc.A/<module> (r_k, n)``."""
        return {"d" + k: v for k, v in self.client_state_shapes(ctx, state).items()}

    def client_state_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        """``c_k``: ``c.B/<module> (d, r_k)``, ``c.A/<module> (r_k, n)``."""
        if not self.options.control_variates:
            return {}
        rank = ctx.rank
        out: dict[str, tuple[int, ...]] = {}
        for name, (d, n) in state.module_shapes.items():
            kb, ka = _names(name)
            out[kb], out[ka] = (d, rank), (rank, n)
        return out

    # ---------------------------------------------------------------------- privacy
    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Product space (``ΔW = Σ p_k B_k A_k`` is a product rule): the noised mean is added to
        ``B_g A_g`` and re-factorised by the concatenated QR (docs/privacy.md).
        """
        return PrivateRule.product()

    def privacy_refusal(self) -> str | None:
        """The control variates' ``Δc_k`` is not part of the private update yet."""
        if self.options.control_variates:
            return (
                "ilora's control variates upload Δc_k, a gradient statistic outside the private "
                "update; set method_options.ilora.control_variates: false"
            )
        return super().privacy_refusal()

    # ------------------------------------------------------------- server: aggregation
    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The reduced QR of ``Σ p_k B_k A_k`` truncated to ``r_max`` (from factors)."""
        B_cat, A_cat = stacked_factors(updates)
        Q, R = qr_aggregate(B_cat, A_cat, self.r_max)
        dtype = updates[0][0].dtype
        return Q.to(dtype), R.to(dtype)

    def finish_state(
        self,
        ctx: RoundContext,
        previous: GlobalState,
        state: GlobalState,
        accepted: Sequence[ClientUpdate],
    ) -> GlobalState:
        """``c[j] ← c[j] + (1 / K_j) Σ_{k ∈ S_t, r_k ≥ j} Δc_k[j]``."""
        if not self.options.control_variates:
            return state
        holders = previous.extras["holders"]
        scale = torch.tensor([1.0 / h if h else 0.0 for h in holders], dtype=torch.float64)
        c_new = {}
        for name, (c_B, c_A) in previous.extras["c"].items():
            kb, ka = _names(name)
            sum_B = torch.zeros(c_B.shape, dtype=torch.float64, device=c_B.device)
            sum_A = torch.zeros(c_A.shape, dtype=torch.float64, device=c_A.device)
            for u in accepted:
                sum_B[:, : u.rank] += u.extras["d" + kb].double()
                sum_A[: u.rank] += u.extras["d" + ka].double()
            s = scale.to(c_B.device)
            c_new[name] = (
                (c_B.double() + sum_B * s[None, :]).to(c_B.dtype),
                (c_A.double() + sum_A * s[:, None]).to(c_A.dtype),
            )
        state.extras = {**state.extras, "c": c_new}
        return state
