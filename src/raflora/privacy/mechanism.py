"""One round of the private mechanism on name-keyed pieces: clip, densify, sum, noise.

DP-FedAvg (McMahan et al., ICLR 2018, "Learning differentially private recurrent language
models", Algorithm 1) releases per round ``Σ_k clip(U_k) + N(0, (z C)² I)``. Here:

1. :func:`client_contribution` — one client's whole ``U_k`` (a
   :class:`~raflora.privacy.clipping.ClientUpdate`: product pieces as factors, padded factor
   differences, head differences) is clipped to ``C`` from its factors
   (:func:`~raflora.privacy.clipping.clip_update`), then made dense in float64: a product piece
   becomes its ``d × n`` matrix, the space its sum and noise live in. With ``noise: client``
   the client adds its own share ``N(0, (z C)² / m)`` to *every* piece of the public layout
   (``shapes``), those it did not touch included, from its own seeded stream — so only the sum
   carries the full noise, and what a client sends has the same shape whoever it is (the
   set-up secure aggregation needs). This function is what a client process calls.
2. :func:`sum_contributions` — the sums over the sampled clients, one tensor per piece of the
   layout (zeros where nobody contributed: a piece's presence reveals nothing).
3. :func:`noised_sums` — with ``noise: server``, ``N(0, (z C)²)`` on every coordinate of every
   sum from the server's seeded stream (:func:`~raflora.privacy.noise.add_noise`: sorted keys,
   float64 on the CPU, so a rerun adds the same noise on any device).

What the sums mean and how they become the next global state is the method's
(:mod:`raflora.methods.private`); this module only knows names and shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from raflora.privacy.clipping import ClientUpdate, clip_update
from raflora.privacy.noise import add_noise

__all__ = [
    "Contribution",
    "client_contribution",
    "dense_pieces",
    "noised_sums",
    "sum_contributions",
]


class Contribution(NamedTuple):
    """What one client adds to the round's sums.

    Attributes
    ----------
    pieces : dict[str, Tensor]
        Name → its clipped piece, dense float64 (plus its noise share under ``noise: client``).
    norm : float
        ``‖U_k‖`` before clipping (not released: the server sees only the sums).
    scale : float
        ``min(1, C / ‖U_k‖)``.
    """

    pieces: dict[str, Tensor]
    norm: float
    scale: float

    @property
    def clipped(self) -> bool:
        """Whether the update was scaled down."""
        return self.scale < 1.0


def dense_pieces(update: ClientUpdate) -> dict[str, Tensor]:
    """Every piece of ``update`` as a dense float64 tensor (a product piece as ``B A − B0 A0``)."""
    out = {name: delta.dense() for name, delta in update.product.items()}
    for space in (update.factors, update.dense):
        for name, t in space.items():
            out[name] = t.double()
    return out


def client_contribution(
    update: ClientUpdate,
    clip: float,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Contribution:
    """Client ``k``'s clipped, densified ``U_k``, with its own noise share when ``noise_std > 0``.

    Parameters
    ----------
    update : ClientUpdate
        The client's unclipped ``U_k``; its piece names must be among ``shapes``.
    clip : float
        ``C``.
    shapes : Mapping[str, tuple[int, ...]]
        The round's public layout: every piece any client may send, name → shape.
    noise_std : float
        ``z C / √m`` under ``noise: client`` (:func:`~raflora.privacy.noise.client_noise_std`);
        ``0``: none (the server adds the noise).
    generator : torch.Generator, optional
        The client's own noise stream (required when ``noise_std > 0``).
    """
    unknown = sorted((set(update.product) | set(update.factors) | set(update.dense)) - set(shapes))
    if unknown:
        raise ValueError(f"pieces outside the round's layout: {', '.join(unknown[:3])}")
    result = clip_update(update, clip)
    pieces = dense_pieces(result.update)
    if noise_std > 0:
        if generator is None:
            raise ValueError("a client's noise share needs its generator")
        device = next(iter(pieces.values())).device if pieces else torch.device("cpu")
        zeros = {
            name: pieces.get(name, torch.zeros(shape, dtype=torch.float64, device=device))
            for name, shape in shapes.items()
        }
        pieces = add_noise(zeros, noise_std, generator)
    return Contribution(pieces, result.norm, result.scale)


def sum_contributions(
    contributions: Iterable[Contribution],
    shapes: Mapping[str, tuple[int, ...]],
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """``Σ_k`` of the contributions' pieces, one float64 tensor per name of ``shapes`` (zeros
    where no client contributed).
    """
    sums = {
        name: torch.zeros(shape, dtype=torch.float64, device=device)
        for name, shape in shapes.items()
    }
    for contribution in contributions:
        for name, piece in contribution.pieces.items():
            sums[name] += piece.to(sums[name].device)
    return sums


def noised_sums(
    sums: Mapping[str, Tensor], std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """The sums plus ``N(0, std²)`` on every coordinate (``std = z C``; ``0``: unchanged)."""
    return add_noise(sums, std, generator)
