"""Gaussian noise on the clipped sums, data-independent weights, and adaptive clipping.

DP-FedAvg (McMahan et al., ICLR 2018, "Learning differentially private recurrent language
models") releases, per round, ``Σ_k clip(U_k) + N(0, (z C)² I)`` divided by a denominator that
does not depend on the data: the noise goes on every coordinate of each **sum**, in the space the
method sums in — a dense ``d × n`` matrix per module for product-space methods (their own
factorisation afterwards is post-processing), padded factors for factor-space methods, and the
heads. Noise comes from a given seeded :class:`torch.Generator`: the server's stream
(``noise: server``), or each sampled client's stream, where each of the ``m`` clients adds
``N(0, (z C)² / m)`` so that only the sum carries the full ``N(0, (z C)²)`` (``noise: client``,
the set-up secure aggregation needs).

Noise is drawn on the CPU in float64 from the generator, tensor by tensor in sorted key order,
so the draws do not depend on a dict's insertion order or on the device, and two engines that
pass generators in the same state add the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from raflora.privacy.clipping import ProductDelta

__all__ = [
    "adaptive_clip_update",
    "add_noise",
    "client_noise_std",
    "coverage_weight",
    "fixed_weight",
    "gaussian_like",
    "noised_unclipped_fraction",
    "poisson_weight",
    "product_sum",
    "split_noise_multiplier",
    "sum_noise_std",
]


def sum_noise_std(noise_multiplier: float, clip: float) -> float:
    """``z C``: the noise std on each coordinate of a round's sum."""
    if noise_multiplier < 0 or clip <= 0:
        raise ValueError(f"need noise_multiplier >= 0 and clip > 0, got {noise_multiplier}, {clip}")
    return noise_multiplier * clip


def client_noise_std(noise_multiplier: float, clip: float, clients: int) -> float:
    """``z C / √m``: one client's share under ``noise: client``, so that the ``m`` shares sum to
    ``N(0, (z C)²)``.
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    return sum_noise_std(noise_multiplier, clip) / math.sqrt(clients)


def gaussian_like(t: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """``N(0, std²)`` noise of ``t``'s shape, drawn in float64 on the CPU from ``generator`` and
    returned in ``t``'s dtype and device.
    """
    noise = torch.randn(tuple(t.shape), generator=generator, dtype=torch.float64)
    return (noise * std).to(dtype=t.dtype, device=t.device)


def add_noise(
    sums: Mapping[str, Tensor], std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Every tensor of ``sums`` plus independent ``N(0, std²)`` noise on each coordinate.

    Keys are visited in sorted order (module docstring). The noise is added in float64 and the
    result returned in each input's dtype. ``std = 0`` returns copies without drawing.
    """
    out: dict[str, Tensor] = {}
    for name in sorted(sums):
        t = sums[name]
        if std == 0:
            out[name] = t.clone()
            continue
        noise = torch.randn(tuple(t.shape), generator=generator, dtype=torch.float64)
        out[name] = (t.double() + (noise * std).to(t.device)).to(t.dtype)
    return out


def product_sum(deltas: Iterable[ProductDelta]) -> Tensor:
    """``Σ_k (B_k A_k − B0_k A0_k)`` as one dense ``d × n`` float64 matrix: the sum that
    product-space noise is added to (each term is formed from its stacked factors).
    """
    total: Tensor | None = None
    for d in deltas:
        dense = d.dense()
        total = dense if total is None else total + dense
    if total is None:
        raise ValueError("product_sum needs at least one update")
    return total


def fixed_weight(clients_per_round: int) -> float:
    """``1 / m``: the average's weight under ``fixed`` sampling of ``m`` clients."""
    if clients_per_round < 1:
        raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
    return 1.0 / clients_per_round


def coverage_weight(sample_rate: float, covering_clients: int) -> float:
    """``1 / (q N_j)``: the weight of an average over what the ``N_j`` clients of the federation
    that cover partition or index ``j`` send, each sampled with probability ``q`` (its expected
    number of contributors; data-independent, unlike the count actually sampled).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if covering_clients < 1:
        raise ValueError(f"covering_clients must be >= 1, got {covering_clients}")
    return 1.0 / (sample_rate * covering_clients)


def poisson_weight(sample_rate: float, num_clients: int) -> float:
    """``1 / (q N)``: the average's weight under Poisson sampling (the expected cohort size)."""
    return coverage_weight(sample_rate, num_clients)


def split_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """The update sum's noise multiplier ``z_Δ`` when adaptive clipping spends part of ``z``.

    Andrew et al., NeurIPS 2021 ("Differentially private learning with adaptive clipping"),
    Section 3: the clipped-count query ``Σ_k (b_k − 1/2)`` (``b_k = 1`` if client ``k`` was not
    clipped) has sensitivity ``1/2``, so its noise ``N(0, σ_b²)`` is a Gaussian mechanism with
    multiplier ``2 σ_b``; released together with the sum noised at ``z_Δ C``, the pair is one
    Gaussian mechanism with ``z^{-2} = z_Δ^{-2} + (2 σ_b)^{-2}``, so
    ``z_Δ = (z^{-2} − (2 σ_b)^{-2})^{-1/2}``. The accountant keeps seeing ``z``. (Under
    replace-one adjacency both sensitivities double, and the same split holds.)
    """
    if noise_multiplier <= 0 or count_noise_std <= 0:
        raise ValueError("noise_multiplier and count_noise_std must be positive")
    rest = noise_multiplier**-2 - (2.0 * count_noise_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"count_noise_std {count_noise_std} leaves nothing of noise multiplier "
            f"{noise_multiplier} for the update (need 2 * count_noise_std > noise_multiplier)"
        )
    return 1.0 / math.sqrt(rest)


def noised_unclipped_fraction(
    unclipped: int,
    clients: int,
    expected_clients: float,
    count_noise_std: float,
    generator: torch.Generator,
) -> float:
    """``b̃``: the noised fraction of sampled clients whose update was not clipped.

    ``b̃ = (Σ_k (b_k − 1/2) + N(0, σ_b²)) / m̄ + 1/2`` with ``m̄`` the expected cohort size
    (``m`` fixed, ``q N`` Poisson) — Andrew et al., NeurIPS 2021, Algorithm 1. One standard normal
    is drawn from ``generator``.
    """
    if not 0 <= unclipped <= clients:
        raise ValueError(f"unclipped must be in [0, clients], got {unclipped} of {clients}")
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be positive, got {expected_clients}")
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise_std
    return (unclipped - 0.5 * clients + noise) / expected_clients + 0.5


def adaptive_clip_update(
    clip: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """``C ← C · exp(−η (b̃ − γ))`` (Andrew et al., NeurIPS 2021, geometric update).

    With more than the target quantile ``γ`` of clients unclipped (``b̃ > γ``) the clip shrinks,
    with fewer it grows; ``b̃`` must be the noised fraction (:func:`noised_unclipped_fraction`)
    for the update to be private.
    """
    if not 0 <= target_quantile <= 1:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
    if learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
    return clip * math.exp(-learning_rate * (unclipped_fraction - target_quantile))
