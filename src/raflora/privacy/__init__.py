"""Client-level differential privacy for heterogeneous-rank LoRA: the library layer.

- :mod:`raflora.privacy.clipping` — a client's whole update clipped to norm ``C`` from its factors
  (no ``d × n`` matrix formed for a norm).
- :mod:`raflora.privacy.noise` — Gaussian noise on the sums (server or client streams),
  data-independent weights, adaptive clipping (Andrew et al., NeurIPS 2021).
- :mod:`raflora.privacy.accountant` — ε of the rounds with Google's ``dp-accounting`` (the
  ``privacy`` extra), noise calibration, a ledger saved as JSON.
- :mod:`raflora.privacy.audit` — Clopper–Pearson bounds and an empirical lower bound on ε.

The mechanism is DP-FedAvg's (McMahan et al., ICLR 2018): clip each sampled client's update,
sum, add ``N(0, (z C)²)`` per coordinate, divide by a data-independent denominator. This package
sits at the adapters' level (docs/design.md#layers): it imports only torch, numpy, scipy and the
accountant library, never an engine, Flower, the config or the CLI.
"""

from __future__ import annotations

from raflora.privacy.accountant import (
    PrivacyLedger,
    calibrate_noise,
    default_delta,
    epsilon,
)
from raflora.privacy.audit import clopper_pearson, epsilon_lower_bound
from raflora.privacy.clipping import (
    ClientUpdate,
    ClippedUpdate,
    ProductDelta,
    clip_scale,
    clip_update,
    padded_difference,
    product_sq_norm,
    product_sq_norms,
)
from raflora.privacy.noise import (
    adaptive_clip_update,
    add_noise,
    client_noise_std,
    coverage_weight,
    fixed_weight,
    noised_unclipped_fraction,
    poisson_weight,
    product_sum,
    split_noise_multiplier,
    sum_noise_std,
)

__all__ = [
    "ClientUpdate",
    "ClippedUpdate",
    "PrivacyLedger",
    "ProductDelta",
    "adaptive_clip_update",
    "add_noise",
    "calibrate_noise",
    "client_noise_std",
    "clip_scale",
    "clip_update",
    "clopper_pearson",
    "coverage_weight",
    "default_delta",
    "epsilon",
    "epsilon_lower_bound",
    "fixed_weight",
    "noised_unclipped_fraction",
    "padded_difference",
    "poisson_weight",
    "product_sq_norm",
    "product_sq_norms",
    "product_sum",
    "split_noise_multiplier",
    "sum_noise_std",
]
