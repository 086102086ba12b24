"""Clipping a client's whole update to norm ``C`` from its factors (DP-FedAvg's clipping step).

A client's private update ``U_k`` is what the server sums, as the method declares it
(docs/methods.md#aggregation-rules):

- **product space** (FlexLoRA, raFLoRA, FLoRA): per module ``Δ_k = B_k A_k − B_0 A_0`` with
  ``(B_0, A_0)`` the factors the client started from (FLoRA: none, it starts from zero). Held as a
  :class:`ProductDelta`; no ``d × n`` matrix is formed to take its norm.
- **factor space** (HetLoRA, FedIT, FFA, …): the zero-padded differences of the factors the method
  averages, plus extras that travel up — plain tensors.
- **dense** tensors (trained heads): their difference — plain tensors.

The norm is taken over all of them together, ``‖U_k‖² = Σ ‖pieces‖²_F``, and the whole update is
scaled by ``min(1, C / ‖U_k‖)`` (McMahan et al., ICLR 2018, "Learning differentially private
recurrent language models", Algorithm 1's ``ClipFn``), so one client moves the sum by at most
``C``.

Product norms from factors: with ``X = [B_k, −B_0]`` and ``Y = [A_k; A_0]``, ``X Y = Δ_k`` and
``‖X Y‖²_F = tr((XᵀX)(Y Yᵀ)) = Σ (XᵀX) ⊙ (Y Yᵀ)`` (both Gram matrices are symmetric), at cost
``O((d + n) R²)`` for ``R = r_k + r_0``. Norms are accumulated in float64.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ClientUpdate",
    "ClippedUpdate",
    "ProductDelta",
    "clip_scale",
    "clip_update",
    "padded_difference",
    "product_sq_norm",
    "product_sq_norms",
    "sq_norm",
]


class ProductDelta(NamedTuple):
    """``Δ = B A − B0 A0`` held as factors: ``B (…, d, r)``, ``A (…, r, n)``, ``B0 (…, d, r0)``,
    ``A0 (…, r0, n)`` (``r0 = 0`` for an update that starts from zero).
    """

    B: Tensor
    A: Tensor
    B0: Tensor
    A0: Tensor

    @classmethod
    def from_zero(cls, B: Tensor, A: Tensor) -> ProductDelta:
        """``Δ = B A`` (FLoRA's update, which starts from a zero adapter)."""
        return cls(
            B, A, B.new_zeros((*B.shape[:-1], 0)), A.new_zeros((*A.shape[:-2], 0, A.shape[-1]))
        )

    def stacked(self) -> tuple[Tensor, Tensor]:
        """``(X, Y)`` with ``X = [B, −B0]``, ``Y = [A; A0]``, so ``X Y = Δ``."""
        return torch.cat([self.B, -self.B0], dim=-1), torch.cat([self.A, self.A0], dim=-2)

    def scaled(self, scale: float) -> ProductDelta:
        """``s B A − s B0 A0``: the scale goes on both ``B`` factors, the update stays factored."""
        return ProductDelta(self.B * scale, self.A, self.B0 * scale, self.A0)

    def dense(self) -> Tensor:
        """``B A − B0 A0`` as a ``d × n`` matrix (float64): for the noised sum and for tests."""
        X, Y = self.stacked()
        return X.double() @ Y.double()


def product_sq_norm(delta: ProductDelta) -> Tensor:
    """``‖B A − B0 A0‖²_F`` from the factors (float64; batched over leading dimensions).

    ``tr((XᵀX)(Y Yᵀ))`` with ``X = [B, −B0]``, ``Y = [A; A0]`` (module docstring); rounding can
    make a true zero slightly negative, so the result is clamped at 0.
    """
    X, Y = delta.stacked()
    if X.shape[-1] != Y.shape[-2]:
        raise ValueError(f"factor ranks disagree: B is {tuple(X.shape)}, A is {tuple(Y.shape)}")
    X, Y = X.double(), Y.double()
    gram_x = X.transpose(-1, -2) @ X  # (…, R, R)
    gram_y = Y @ Y.transpose(-1, -2)  # (…, R, R)
    return (gram_x * gram_y).sum(dim=(-1, -2)).clamp_min(0)


def product_sq_norms(deltas: Mapping[str, ProductDelta]) -> dict[str, Tensor]:
    """:func:`product_sq_norm` of every module, one batched call per group of equal shapes."""
    groups: dict[tuple[tuple[int, ...], ...], list[str]] = defaultdict(list)
    for name, d in deltas.items():
        groups[tuple(tuple(t.shape) for t in d)].append(name)
    out: dict[str, Tensor] = {}
    for names in groups.values():
        if len(names) == 1:
            out[names[0]] = product_sq_norm(deltas[names[0]])
            continue
        batch = ProductDelta(*(torch.stack([deltas[n][i] for n in names]) for i in range(4)))
        for name, value in zip(names, product_sq_norm(batch).unbind(0), strict=True):
            out[name] = value
    return out


def sq_norm(t: Tensor) -> Tensor:
    """``‖t‖²_F`` in float64 (a padded factor difference, a head's difference, an extra)."""
    t = t.double()
    return (t * t).sum()


def padded_difference(new: Tensor, old: Tensor, rank: int, dim: int) -> Tensor:
    """``pad(new) − pad(old)``: both zero-padded along ``dim`` to ``rank`` (the factor-space
    update of a client that trained ``new`` from ``old``; ranks may differ, e.g. a client's
    ``B_k (d, r_k)`` against the global ``B_g[:, :r_k]``).
    """
    return _pad(new, rank, dim) - _pad(old, rank, dim)


def _pad(t: Tensor, rank: int, dim: int) -> Tensor:
    missing = rank - t.shape[dim]
    if missing < 0:
        raise ValueError(f"cannot pad a tensor of length {t.shape[dim]} along {dim} to {rank}")
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


@dataclass
class ClientUpdate:
    """One client's private update ``U_k``, name-keyed in each space.

    Attributes
    ----------
    product : dict[str, ProductDelta]
        Product-space pieces (per module, or per module and rank partition for raFLoRA).
    factors : dict[str, Tensor]
        Factor-space pieces: padded factor differences and extras.
    dense : dict[str, Tensor]
        Dense differences (heads).
    """

    product: dict[str, ProductDelta] = field(default_factory=dict)
    factors: dict[str, Tensor] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)

    def sq_norm(self) -> Tensor:
        """``‖U_k‖²``: the sum of squares over every piece in every space (float64)."""
        total = torch.zeros((), dtype=torch.float64)
        for value in product_sq_norms(self.product).values():
            total = total + value.sum().cpu()
        for space in (self.factors, self.dense):
            for t in space.values():
                total = total + sq_norm(t).cpu()
        return total

    def norm(self) -> float:
        """``‖U_k‖``."""
        return math.sqrt(float(self.sq_norm()))

    def scaled(self, scale: float) -> ClientUpdate:
        """``s U_k``; product pieces stay factored (:meth:`ProductDelta.scaled`)."""
        return ClientUpdate(
            product={k: d.scaled(scale) for k, d in self.product.items()},
            factors={k: t * scale for k, t in self.factors.items()},
            dense={k: t * scale for k, t in self.dense.items()},
        )


class ClippedUpdate(NamedTuple):
    """The result of :func:`clip_update`: the clipped update, its norm before, the scale used."""

    update: ClientUpdate
    norm: float
    scale: float

    @property
    def clipped(self) -> bool:
        """Whether the update was scaled down (``‖U_k‖ > C``)."""
        return self.scale < 1.0


def clip_scale(norm: float, clip: float) -> float:
    """``min(1, C / ‖U‖)`` (``1`` for a zero update)."""
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"clip must be positive and finite, got {clip}")
    if not math.isfinite(norm):
        raise ValueError(f"update norm is not finite ({norm}): the client's training diverged")
    return 1.0 if norm <= clip else clip / norm


def clip_update(update: ClientUpdate, clip: float) -> ClippedUpdate:
    """``U_k · min(1, C / ‖U_k‖)`` over the whole update (all modules, heads, extras)."""
    norm = update.norm()
    scale = clip_scale(norm, clip)
    return ClippedUpdate(update if scale == 1.0 else update.scaled(scale), norm, scale)
