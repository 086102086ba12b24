"""LoRA-FAIR: server-side refinement of the averaged ``B`` towards the exact update
(docs/methods.md#lora-fair).

Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement" (ICCV 2025, https://arxiv.org/abs/2411.14961). Averaging the factors separately
gives ``B̄ Ā ≠ ΔW* = Σ_k p_k B_k A_k``. LoRA-FAIR keeps ``Ā`` and corrects ``B̄`` by a residual
``ΔB`` found by gradient descent on

    f(ΔB) = 1 − cos(ΔW*, (B̄ + ΔB) Ā) + λ ‖ΔB‖²_F,

with ``B̄ = Σ p_k pad(B_k)``, ``Ā = Σ p_k pad(A_k)`` (the indices no accepted client reaches
carried, docs/methods.md#aggregation-rules), and the global factors become ``(B̄ + ΔB, Ā)``.
Every inner product is computed from factors (``⟨X Y, U V⟩_F = tr((Uᵀ X)(Y Vᵀ))``, with
``ΔW* = B_cat A_cat``), so no ``d × n`` matrix is formed: with ``P = B_cat (A_cat Āᵀ)`` and
``S = Ā Āᵀ``, ``⟨ΔW*, X Ā⟩ = ⟨X, P⟩`` and ``‖X Ā‖² = tr(Xᵀ X S)``.

Defaults of the public reimplementation: ``λ = 1``, step size ``0.01``, at most 1000
plain gradient steps; the best iterate (lowest ``f``, the unrefined ``ΔB = 0`` included) is kept,
so the refinement never does worse on its own objective; when ``B̄ Ā`` or ``ΔW*`` is zero the
refinement is skipped (the cosine is undefined). Deterministic (no random draw). The gradient of
``f`` is taken by autograd on the factored expression.

Departures: the paper's client-side initialisation refinement is not part of the project's reading
(plain LoRA on the client); zero padding for mixed ranks and the carry are the project's.
Traffic as FedIT (docs/design.md#communication).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raflora.methods.base import Method, ModuleUpdates
from raflora.methods.context import RoundContext
from raflora.methods.options import MethodOptions, option
from raflora.methods.padding import carried_factor_average, stacked_factors
from raflora.methods.registry import register

__all__ = ["LoRAFAIR", "LoRAFAIROptions", "fair_objective", "refine_b"]


@dataclass(frozen=True)
class LoRAFAIROptions(MethodOptions):
    """LoRA-FAIR's options (``method_options`` of a lora-fair run)."""

    fair_lambda: float = option(1.0, "Weight λ of ‖ΔB‖²_F in the refinement objective.", ge=0)
    fair_step: float = option(0.01, "Gradient-descent step size of the refinement.", gt=0)
    fair_steps: int = option(1000, "Most gradient steps of the refinement.", ge=0)


def _terms(B_cat: Tensor, A_cat: Tensor, A_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``P = B_cat (A_cat Āᵀ)`` (…, d, r), ``S = Ā Āᵀ`` (…, r, r) and ``‖ΔW*‖_F`` (…)."""
    P = B_cat @ (A_cat @ A_bar.transpose(-1, -2))
    S = A_bar @ A_bar.transpose(-1, -2)
    gram = (B_cat.transpose(-1, -2) @ B_cat) * (A_cat @ A_cat.transpose(-1, -2)).transpose(-1, -2)
    target = gram.sum(dim=(-2, -1)).clamp_min(0).sqrt()
    return P, S, target


def fair_objective(
    X: Tensor, delta: Tensor, P: Tensor, S: Tensor, target: Tensor, lam: float
) -> Tensor:
    """``1 − cos(ΔW*, X Ā) + λ ‖ΔB‖²`` per module, from the factored terms (``X = B̄ + ΔB``)."""
    inner = (X * P).sum(dim=(-2, -1))
    norm = ((X.transpose(-1, -2) @ X) * S).sum(dim=(-2, -1)).clamp_min(0).sqrt()
    return 1 - inner / (target * norm) + lam * (delta * delta).sum(dim=(-2, -1))


def refine_b(
    B_bar: Tensor,
    A_bar: Tensor,
    B_cat: Tensor,
    A_cat: Tensor,
    *,
    lam: float = 1.0,
    step: float = 0.01,
    steps: int = 1000,
) -> Tensor:
    """``B̄ + ΔB`` with the best ``ΔB`` of ``steps`` gradient steps on :func:`fair_objective`.

    Works on a batch of modules (leading dimensions); modules whose ``B̄ Ā`` or ``ΔW*`` is zero
    keep ``B̄``. Computed in float64.
    """
    B_bar64, A_bar64 = B_bar.double(), A_bar.double()
    P, S, target = _terms(B_cat.double(), A_cat.double(), A_bar64)
    start = ((B_bar64.transpose(-1, -2) @ B_bar64) * S).sum(dim=(-2, -1))
    active = (target > 0) & (start > 0)  # the cosine is defined
    if not bool(active.any()) or steps == 0:
        return B_bar
    safe_target = torch.where(active, target, torch.ones_like(target))
    delta = torch.zeros_like(B_bar64, requires_grad=True)
    best = B_bar64.clone()
    with torch.no_grad():
        best_f = fair_objective(B_bar64, delta, P, S, safe_target, lam)
    for _ in range(steps):
        f = fair_objective(B_bar64 + delta, delta, P, S, safe_target, lam)
        (grad,) = torch.autograd.grad(f.sum(), delta)
        with torch.no_grad():
            delta -= step * grad
            f_new = fair_objective(B_bar64 + delta, delta, P, S, safe_target, lam)
            better = torch.isfinite(f_new) & (f_new < best_f) & active
            best = torch.where(better[..., None, None], B_bar64 + delta, best)
            best_f = torch.where(better, f_new, best_f)
    return best.to(B_bar.dtype)


@register
class LoRAFAIR(Method):
    """Padded factor averaging with carry, then ``B̄`` refined towards ``Σ p_k B_k A_k``."""

    name = "lora-fair"
    Options = LoRAFAIROptions
    options: LoRAFAIROptions

    def privacy_refusal(self) -> str | None:
        """The refinement's target needs the clients' products besides their factors."""
        return (
            "lora-fair refines B̄ towards Σ p_k B_k A_k, which needs each client's product "
            "besides its factors, and privacy releases only the noised sum of one of them; use "
            "a factor method (fedit, hetlora, rbla, ffa, rolora, fedrot) or flexlora"
        )

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(B̄ + ΔB, Ā)``."""
        B_bar, A_bar = carried_factor_average(updates, previous, self.r_max)
        B_cat, A_cat = stacked_factors(updates)
        opts = self.options
        B = refine_b(
            B_bar,
            A_bar,
            B_cat,
            A_cat,
            lam=opts.fair_lambda,
            step=opts.fair_step,
            steps=opts.fair_steps,
        )
        return B, A_bar
