"""Theorem 4.4 as a calculator, and its Monte Carlo check (docs/methods.md#theory; paper Section 4,
Appendix A).

Closed form (Appendix A, Eqs. 9–20) for vanilla FedLoRA (FlexLoRA's aggregation):

    p_i = |{k : r_k ≥ i}| / K,      τ = (K − M) / (M (K − 1)),      h(p) = p² + τ p (1 − p),
    q_i = β² h(p_i),                e_i(t) = e_i(0) q_i^t,
    γ = q_{r_1+1} / q_{r_1},        C = Σ_{j>r_1} e_j(0) / Σ_{i≤r_1} e_i(0),
    1 − ρ_{r_1}(t) ≤ C γ^t.

raFLoRA under the same assumptions (derived here, not in the paper): a partition ``h`` with at
least one sampled contributor returns ``β σ_i`` for its directions (its weights sum to one), an
empty one is carried unchanged (``empty_partition="carry"``) or dropped (``"drop"``). With
``P_0(h) = C(K − K p_h, M) / C(K, M)`` the probability that no sampled client reaches ``h``:

    carry: q_i^ra = β² (1 − P_0) + P_0,      drop: q_i^ra = β² (1 − P_0),

so with ``β = 1`` and carry every energy is constant — raFLoRA does not collapse. (For ``β ≠ 1``
with carry, directions may swap order after the SVD and the closed form is then approximate.)

Monte Carlo (Assumptions 4.2–4.3): a fixed orthonormal basis, each sampled client returns ``β ×``
the factors it received (truncated to its rank), and the server aggregates with the real
aggregator code. Energies are averaged over simulations and the ratio is taken of the averages
(the theorem's ``e_i = E[σ_i²]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raflora.diagnostics import energy_spectrum
from raflora.methods import RoundContext, get_aggregator
from raflora.methods.options import option_specs
from raflora.methods.registry import method_options_classes

__all__ = [
    "TheoryResult",
    "TheorySetup",
    "add_simulation",
    "assign_client_ranks",
    "coverage",
    "predict",
    "simulate",
]

INITS = ("flat", "decay")


@dataclass(frozen=True)
class TheorySetup:
    """The quantities Theorem 4.4 depends on; validated on construction.

    Parameters
    ----------
    rank_levels : Sequence[int]
        Strictly increasing rank levels ``r_1 < … < r_max``.
    num_clients : int
        ``K``.
    per_round : int
        ``M``, clients sampled per round (uniformly, without replacement).
    probs : Sequence[float], optional
        Probability of each rank level (uniform when omitted); must sum to 1.
    beta : float
        Client scaling ``β`` of Assumption 4.3.
    init : {"flat", "decay"}
        Initial energies: ``e_i(0) = 1`` or ``e_i(0) = 1 / i``.
    empty_partition : {"carry", "drop"}
        raFLoRA's rule for partitions no sampled client reaches.
    """

    rank_levels: tuple[int, ...]
    num_clients: int
    per_round: int
    probs: tuple[float, ...] = ()
    beta: float = 1.0
    init: str = "flat"
    empty_partition: str = "carry"
    client_ranks: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        levels = tuple(int(r) for r in self.rank_levels)
        problems = []
        if not levels:
            problems.append("at least one rank level is needed")
        elif any(r <= 0 for r in levels):
            problems.append(f"ranks must be positive, got {list(levels)}")
        elif list(levels) != sorted(set(levels)):
            problems.append(
                f"ranks must be strictly increasing with no duplicates, got {list(levels)}"
            )
        if self.num_clients < 1:
            problems.append(f"clients must be ≥ 1, got {self.num_clients}")
        if self.per_round < 1:
            problems.append(f"per-round must be ≥ 1, got {self.per_round}")
        elif self.per_round > self.num_clients:
            problems.append(
                f"per-round ({self.per_round}) cannot exceed clients ({self.num_clients})"
            )
        probs = tuple(float(p) for p in self.probs) or tuple(
            [1.0 / max(len(levels), 1)] * len(levels)
        )
        if len(probs) != len(levels):
            problems.append(f"{len(probs)} probabilities given for {len(levels)} rank levels")
        elif any(p < 0 or not math.isfinite(p) for p in probs):
            problems.append(f"probabilities must be finite and non-negative, got {list(probs)}")
        elif abs(sum(probs) - 1.0) > 1e-6:
            problems.append(f"probabilities must sum to 1, got {sum(probs):.6g}")
        if not (self.beta > 0 and math.isfinite(self.beta * self.beta)):  # q_i holds β²
            problems.append(f"beta must be a positive number with a finite square, got {self.beta}")
        if self.init not in INITS:
            problems.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.empty_partition not in ("carry", "drop"):
            problems.append(f"empty_partition must be carry or drop, got {self.empty_partition!r}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "rank_levels", levels)
        object.__setattr__(self, "probs", probs)
        object.__setattr__(
            self, "client_ranks", tuple(assign_client_ranks(levels, probs, self.num_clients))
        )

    @property
    def r_max(self) -> int:
        """Largest rank level."""
        return self.rank_levels[-1]

    @property
    def r_1(self) -> int:
        """Smallest rank level (the shared rank)."""
        return self.rank_levels[0]

    def initial_energy(self) -> np.ndarray:
        """``e_i(0)`` for ``i = 1 … r_max``."""
        i = np.arange(1, self.r_max + 1, dtype=np.float64)
        return np.ones_like(i) if self.init == "flat" else 1.0 / i


def assign_client_ranks(
    rank_levels: Sequence[int], probs: Sequence[float], num_clients: int
) -> list[int]:
    """Deterministic ranks for ``K`` clients in proportion to ``probs`` (largest remainder).

    The coverage ``p_i`` of these clients is what the closed form and the Monte Carlo share.
    """
    quotas = [p * num_clients for p in probs]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda j: (-(quotas[j] - counts[j]), j))
    for j in order[: num_clients - sum(counts)]:
        counts[j] += 1
    return [r for r, c in zip(rank_levels, counts, strict=True) for _ in range(c)]


def coverage(client_ranks: Sequence[int], r_max: int) -> np.ndarray:
    """``p_i = |{k : r_k ≥ i}| / K`` for ``i = 1 … r_max`` (paper Eq. 1)."""
    ranks = np.asarray(client_ranks)
    i = np.arange(1, r_max + 1)
    p: np.ndarray = (ranks[None, :] >= i[:, None]).mean(axis=1)
    return p


def _tau(K: int, M: int) -> float:
    return 0.0 if M >= K else (K - M) / (M * (K - 1))


def _prob_partition_empty(setup: TheorySetup, p: np.ndarray) -> np.ndarray:
    """``P_0`` per direction: no sampled client reaches it (hypergeometric zero count)."""
    K, M = setup.num_clients, setup.per_round
    support = np.rint(p * K).astype(int)
    return np.array([math.comb(K - s, M) / math.comb(K, M) for s in support])


@dataclass(frozen=True)
class TheoryResult:
    """Closed-form quantities, and Monte Carlo estimates when simulated."""

    setup: TheorySetup
    p: np.ndarray
    q: np.ndarray
    q_raflora: np.ndarray
    gamma: float
    C: float
    rounds: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object: ``p``, ``q``, ``gamma``, ``C``, ``rounds`` (+ settings).

        Strict JSON: a non-finite value of a row (a Monte Carlo whose energies overflowed, e.g.
        ``β = 1e200``) is ``None``.
        """
        s = self.setup
        return {
            "p": self.p.tolist(),
            "q": self.q.tolist(),
            "gamma": self.gamma,
            "C": self.C,
            "rounds": [
                {k: v if math.isfinite(v) else None for k, v in row.items()} for row in self.rounds
            ],
            "settings": {
                "ranks": list(s.rank_levels),
                "probs": list(s.probs),
                "clients": s.num_clients,
                "per_round": s.per_round,
                "beta": s.beta,
                "init": s.init,
                "empty_partition": s.empty_partition,
            },
        }


def _tail_ratio(energy: np.ndarray, r_1: int) -> np.ndarray:
    """``1 − ρ_{r_1}`` along the last axis (0 where there is no energy, NaN where it is not
    finite: a Monte Carlo whose energies overflowed).
    """
    total = energy.sum(axis=-1)
    tail = energy[..., r_1:].sum(axis=-1)
    regular = (total > 0) & np.isfinite(total)
    return np.where(
        regular, tail / np.where(regular, total, 1.0), np.where(total == 0, 0.0, np.nan)
    )


def predict(setup: TheorySetup, rounds: int) -> TheoryResult:
    """Closed-form coverage, contraction, ``γ``, ``C`` and curves for ``t = 0 … rounds``."""
    if rounds < 0:
        raise ValueError(f"rounds must be ≥ 0, got {rounds}")
    p = coverage(setup.client_ranks, setup.r_max)
    tau = _tau(setup.num_clients, setup.per_round)
    q = setup.beta**2 * (p**2 + tau * p * (1 - p))
    p_empty = _prob_partition_empty(setup, p)
    stay = p_empty if setup.empty_partition == "carry" else 0.0
    q_ra = setup.beta**2 * (1 - p_empty) + stay
    e0 = setup.initial_energy()
    r_1 = setup.r_1
    gamma = float(q[r_1] / q[r_1 - 1]) if setup.r_max > r_1 and q[r_1 - 1] > 0 else 0.0
    C = float(e0[r_1:].sum() / e0[:r_1].sum())
    t = np.arange(rounds + 1)[:, None]
    flex = _tail_ratio(e0 * q[None, :] ** t, r_1)
    ra = _tail_ratio(e0 * q_ra[None, :] ** t, r_1)
    table = [
        {
            "round": int(i),
            "bound": C * gamma ** int(i),
            "predicted_flexlora": float(flex[i]),
            "predicted_raflora": float(ra[i]),
        }
        for i in range(rounds + 1)
    ]
    return TheoryResult(setup, p, q, q_ra, gamma, C, table)


def simulate(
    setup: TheorySetup,
    rounds: int,
    num_simulations: int,
    *,
    method: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """Monte Carlo energies ``σ_i²(t)``, shape ``(num_simulations, rounds + 1, r_max)``.

    Each simulation starts from ``ΔW(0) = Σ_i √e_i(0) u_i v_iᵀ`` in a fixed random orthonormal
    basis; every round samples ``M`` of ``K`` clients without replacement, each returns
    ``(β B_g[:, :r_k], A_g[:r_k, :])`` with one sample, and ``method``'s real aggregator builds the
    next global factors. One seeded generator drives the basis and all client sampling.
    """
    if num_simulations < 1:
        raise ValueError(f"the number of simulations must be ≥ 1, got {num_simulations}")
    # only a method that declares empty_partition (raFLoRA) gets it
    cls = method_options_classes().get(method)  # an unknown method: get_aggregator says so
    declared = {spec.name for spec in option_specs(cls)} if cls is not None else set()
    options = {"empty_partition": setup.empty_partition} if "empty_partition" in declared else {}
    aggregator = get_aggregator(method, setup.rank_levels, **options)
    gen = torch.Generator().manual_seed(seed)
    r_max, K, M = setup.r_max, setup.num_clients, setup.per_round
    d = n = r_max
    U, _ = torch.linalg.qr(torch.randn(d, r_max, generator=gen, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, r_max, generator=gen, dtype=dtype))
    sigma0 = torch.tensor(np.sqrt(setup.initial_energy()), dtype=dtype)
    ranks = torch.tensor(setup.client_ranks)
    out = np.zeros((num_simulations, rounds + 1, r_max))
    for s in range(num_simulations):
        B_g, A_g = U * sigma0, V.T.clone()
        out[s, 0] = energy_spectrum(B_g, A_g).numpy()[:r_max]
        for t in range(1, rounds + 1):
            sampled = torch.randperm(K, generator=gen)[:M]
            updates = [(setup.beta * B_g[:, :r], A_g[:r, :], 1) for r in ranks[sampled].tolist()]
            B_g, A_g = aggregator.aggregate_module(RoundContext(t), updates, (B_g, A_g))
            spectrum = energy_spectrum(B_g, A_g).numpy()
            out[s, t, : spectrum.shape[0]] = spectrum[:r_max]
    return out


def add_simulation(result: TheoryResult, num_simulations: int, *, seed: int = 0) -> TheoryResult:
    """Attach ``simulated_flexlora`` and ``simulated_raflora`` (ratio of averaged energies)."""
    rounds = len(result.rounds) - 1
    table = [dict(row) for row in result.rounds]
    for method in ("flexlora", "raflora"):
        energies = simulate(result.setup, rounds, num_simulations, method=method, seed=seed)
        ratio = _tail_ratio(energies.mean(axis=0), result.setup.r_1)
        for row, value in zip(table, ratio.tolist(), strict=True):
            row[f"simulated_{method}"] = value
    return TheoryResult(
        result.setup, result.p, result.q, result.q_raflora, result.gamma, result.C, table
    )
