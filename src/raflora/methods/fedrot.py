"""FedRot-LoRA: client-side rotation of the trained factors before upload
(docs/methods.md#fedrot).

FedRot-LoRA (2026, https://arxiv.org/abs/2602.23638). LoRA factors are defined only up to an
invertible ``r × r`` matrix (``B A = (B R)(R⁻¹ A)``), so clients that trained from the same start
can return factors that drifted apart in that gauge, and averaging them factor-wise is lossy.
Before upload a client rotates its trained factors towards what it received: with ``A_0``,
``B_0`` the factors the client received (``A_g[:r_k]``, ``B_g[:, :r_k]``),

- even rounds, the ``A`` side: ``R = U Vᵀ`` from ``SVD(A_k A_0ᵀ) = U Σ Vᵀ``, the rotation
  minimising ``‖Rᵀ A_k − A_0‖_F`` (orthogonal Procrustes);
- odd rounds, the ``B`` side: the same with ``SVD(B_kᵀ B_0)``, minimising ``‖B_k R − B_0‖_F``;

restricted to rotations (``det R = +1``, the Kabsch sign fix on the last singular vector), and
uploads ``(B_k R, Rᵀ A_k)``, whose product is unchanged. No rotation in round 1 (everyone starts
from the same factors). Soft variant (option ``soft_lambda < 1``): ``R ← polar((1 − λ) I + λ R)``,
the orthogonal factor of the blend. The server averages the zero-padded factors with ``p_k``,
the indices no accepted client reaches carried (docs/methods.md#aggregation-rules).

Departures and readings: only the abstract is available to us; the alternation by round parity,
rotations only, the soft variant and the zero padding for mixed ranks are the project's
readings (docs/methods.md#fedrot).
When the cross-product ``A_k A_0ᵀ`` (or ``B_kᵀ B_0``) is zero the rotation is the identity.
Traffic as FedIT (docs/design.md#communication).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raflora.methods.base import ClientRound, ClientUpload, Factors
from raflora.methods.context import RoundContext
from raflora.methods.options import MethodOptions, option
from raflora.methods.padding import CarriedAverageMethod
from raflora.methods.private import PrivateRule
from raflora.methods.registry import register

__all__ = ["FedRotLoRA", "FedRotOptions", "procrustes_rotation"]


def procrustes_rotation(M: Tensor, soft_lambda: float = 1.0) -> Tensor:
    """The rotation ``R`` maximising ``tr(Rᵀ M)`` (``det R = +1``), for ``M (…, r, r)``.

    ``M = U Σ Vᵀ``, ``R = U diag(1, …, 1, det(U Vᵀ)) Vᵀ`` (Kabsch). With ``soft_lambda < 1``,
    ``R ← polar((1 − λ) I + λ R)``. A zero ``M`` gives the identity. Computed in float64.
    """
    M64 = M.double()
    U, _, Vh = torch.linalg.svd(M64)
    sign = torch.linalg.det(U @ Vh).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U = U.clone()
    U[..., :, -1] = U[..., :, -1] * sign[..., None]  # flip the weakest direction: det = +1
    R = U @ Vh
    eye = torch.eye(M.shape[-1], dtype=torch.float64, device=M.device).expand_as(R)
    if soft_lambda < 1.0:
        U2, _, Vh2 = torch.linalg.svd((1.0 - soft_lambda) * eye + soft_lambda * R)
        R = U2 @ Vh2
    zero = (M64.abs().amax(dim=(-2, -1)) == 0)[..., None, None]
    return torch.where(zero, eye, R)


def rotation_side(round_index: int) -> str | None:
    """``None`` in round 1, ``"A"`` in even rounds, ``"B"`` in odd rounds from round 3."""
    if round_index <= 1:
        return None
    return "A" if round_index % 2 == 0 else "B"


@dataclass(frozen=True)
class FedRotOptions(MethodOptions):
    """FedRot-LoRA's options (``method_options`` of a fedrot run)."""

    soft_lambda: float = option(
        1.0,
        "Rotation strength λ: 1 = the hard Procrustes rotation R (default); λ < 1 the soft "
        "variant polar((1 − λ) I + λ R).",
        gt=0,
        le=1,
    )


class FedRotClientRound(ClientRound):
    """Plain LoRA, then the Procrustes rotation of the trained factors before upload."""

    method: FedRotLoRA

    def finish(self, trained: Factors) -> ClientUpload:
        """``(B_k R, Rᵀ A_k)`` per module (unchanged in round 1)."""
        side = rotation_side(self.round_index)
        if side is None:
            return ClientUpload(trained)
        out: Factors = {}
        for name, (B, A) in trained.items():
            B_0, A_0 = self.received.factors[name]
            B64, A64 = B.double(), A.double()
            M = A64 @ A_0.double().T if side == "A" else B64.T @ B_0.double()  # (r, r)
            R = procrustes_rotation(M, self.method.options.soft_lambda)
            out[name] = ((B64 @ R).to(B.dtype), (R.T @ A64).to(A.dtype))
        return ClientUpload(out)


@register
class FedRotLoRA(CarriedAverageMethod):
    """Client-side rotation before upload; zero-padded factor averaging with carry."""

    name = "fedrot"
    Options = FedRotOptions
    ClientRoundType = FedRotClientRound
    options: FedRotOptions

    def private_rule(self, ctx: RoundContext) -> PrivateRule:
        """Factor space: the differences of the rotated factors from those received, both
        factors, averaged over ``q N`` (docs/privacy.md).
        """
        return PrivateRule.factor("BA")
