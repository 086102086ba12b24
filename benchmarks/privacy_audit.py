"""Empirical privacy audit of one round of the private mechanism (docs/privacy.md#audit).

The round is the engine's own code path on a tiny model — three modules (8 × 6, 6 × 8, 8 × 8)
and a head of 4, raFLoRA's product-space rule with rank partitions ``[2, 4]``:
:func:`~raflora.methods.private.private_update` builds each client's ``U_k`` from its factors
and what it was sent, :func:`~raflora.privacy.mechanism.client_contribution` clips it whole to
``C`` and densifies it, :func:`~raflora.privacy.mechanism.sum_contributions` sums the round's
cohort and :func:`~raflora.privacy.mechanism.noised_sums` adds ``N(0, (z C)²)`` per coordinate
from a seeded stream — the release (the next global state is post-processing of it).

Two worlds differ in one client (add-or-remove adjacency): ``m − 1`` fixed clients with random
updates, and the same clients plus a **canary**, a rank-1 update along a fixed direction of the
first partition of one module, scaled ×1000 (and so clipped to exactly ``C`` like everyone's).
With ``--sample-rate q < 1`` every client, the canary included, joins each trial independently
with probability ``q`` (Poisson sampling, which the accountant's amplification assumes).

The test: "canary present?" iff the projection of the released sums onto the canary's
(unit) direction exceeds a threshold. The threshold is chosen on one half of the trials (the one
maximising the empirical ``log(TPR / FPR)``, at least 20 false positives), and the other half's
counts give ``ε_lb`` through :func:`~raflora.privacy.audit.epsilon_lower_bound` (Clopper–Pearson,
both rates one-sided at ``α / 2``; ``ε_lb`` is below the true ε with probability ≥ the stated
confidence). It is compared with the accountant's ε of one round at the same ``z``, ``q``, ``δ``
(:func:`~raflora.privacy.epsilon`, dp-accounting's RDP accountant, Poisson sampling). With the
noise off (``z = 0``) the same test separates the worlds perfectly: it has power, and ``ε_lb`` is
then limited only by the number of trials.

Usage::

    .venv/bin/python benchmarks/privacy_audit.py                 # the table of docs/privacy.md
    .venv/bin/python benchmarks/privacy_audit.py --trials 2000   # faster, looser bounds
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raflora.methods.private import PrivateRule, private_shapes, private_update
from raflora.methods.state import GlobalState
from raflora.methods.validation import ClientUpdate
from raflora.privacy import epsilon, epsilon_lower_bound
from raflora.privacy.mechanism import (
    Contribution,
    client_contribution,
    noised_sums,
    sum_contributions,
)

MODULES = {"m0": (8, 6), "m1": (6, 8), "m2": (8, 8)}
HEAD = 4
R_MAX = 4
RULE = PrivateRule.product(partitions=(2, 4))
CANARY_SCALE = 1000.0


@dataclass(frozen=True)
class AuditResult:
    """One audit: the settings, the test's counts on the evaluation half, and the bounds."""

    noise_multiplier: float
    sample_rate: float
    clients: int
    clip: float
    delta: float
    trials: int
    true_positives: int
    false_positives: int
    epsilon_lb: float
    epsilon_accountant: float
    confidence: float

    @property
    def tpr(self) -> float:
        """True-positive rate on the evaluation half."""
        return self.true_positives / self.trials

    @property
    def fpr(self) -> float:
        """False-positive rate on the evaluation half."""
        return self.false_positives / self.trials


def _state(rng: torch.Generator) -> GlobalState:
    factors = {
        m: (
            0.1 * torch.randn(d, R_MAX, generator=rng, dtype=torch.float64),
            0.1 * torch.randn(R_MAX, n, generator=rng, dtype=torch.float64),
        )
        for m, (d, n) in MODULES.items()
    }
    head = {"head": 0.1 * torch.randn(HEAD, generator=rng, dtype=torch.float64)}
    return GlobalState(factors=factors, module_shapes=dict(MODULES), dense=head)


def _client(state: GlobalState, k: int, rank: int, rng: torch.Generator) -> ClientUpdate:
    """A client of rank ``rank`` that moved its start factors randomly (norm ~ 0.3–1)."""
    factors = {
        m: (
            B[:, :rank] + 0.2 * torch.randn(B[:, :rank].shape, generator=rng, dtype=B.dtype),
            A[:rank] + 0.2 * torch.randn(A[:rank].shape, generator=rng, dtype=A.dtype),
        )
        for m, (B, A) in state.factors.items()
    }
    head = state.dense["head"] + 0.1 * torch.randn(HEAD, generator=rng, dtype=torch.float64)
    return ClientUpdate(k, rank, 1, factors, dense={"head": head})


def _canary(state: GlobalState, k: int) -> ClientUpdate:
    """The canary, of rank 2: ``B_k = B0 + 1000 e_0 e_0ᵀ`` in module m0, every other factor
    and the head as sent — so ``U_k = 1000 e_0 A0[0, :]``, all in partition ``P2:m0``.
    """
    factors = {m: (B[:, :2].clone(), A[:2].clone()) for m, (B, A) in state.factors.items()}
    factors["m0"][0][0, 0] += CANARY_SCALE
    return ClientUpdate(k, 2, 1, factors, dense={"head": state.dense["head"].clone()})


def contributions(
    clients: int, clip: float, seed: int
) -> tuple[list[Contribution], Contribution, dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """The ``m − 1`` fixed clients' and the canary's clipped contributions (the engine's
    functions), the canary's unit direction and the round's public layout.
    """
    rng = torch.Generator().manual_seed(seed)
    state = _state(rng)
    shapes = private_shapes(RULE, state, R_MAX)

    def contribution(update: ClientUpdate) -> Contribution:
        r = update.rank
        sent = {m: (B[:, :r], A[:r]) for m, (B, A) in state.factors.items()}
        return client_contribution(private_update(RULE, sent, update, state, R_MAX), clip, shapes)

    others = [contribution(_client(state, k, (2, 4)[k % 2], rng)) for k in range(clients - 1)]
    canary = contribution(_canary(state, clients - 1))
    norm = math.sqrt(sum(float(p.pow(2).sum()) for p in canary.pieces.values()))
    direction = {name: p / norm for name, p in canary.pieces.items()}
    return others, canary, direction, shapes


def _statistics(
    others: Sequence[Contribution],
    canary: Contribution | None,
    direction: dict[str, Tensor],
    shapes: dict[str, tuple[int, ...]],
    std: float,
    sample_rate: float,
    trials: int,
    seed: int,
) -> np.ndarray:
    """The test statistic ``⟨release, direction⟩`` of ``trials`` independent rounds."""
    cohort = np.random.default_rng(seed)  # who joins each trial (Poisson, rate q)
    fixed = sum_contributions(others, shapes) if sample_rate >= 1 else None
    out = np.empty(trials)
    for t in range(trials):
        if fixed is not None:
            sums = {k: v.clone() for k, v in fixed.items()}
        else:
            joined = [c for c in others if cohort.random() < sample_rate]
            sums = sum_contributions(joined, shapes)
        if canary is not None and (sample_rate >= 1 or cohort.random() < sample_rate):
            for name, piece in canary.pieces.items():
                sums[name] += piece
        released = noised_sums(sums, std, torch.Generator().manual_seed(seed * 1_000_003 + t))
        out[t] = sum(float((released[n] * d).sum()) for n, d in direction.items())
    return out


def _choose_threshold(with_canary: np.ndarray, without: np.ndarray) -> float:
    """The threshold maximising the empirical ``log(TPR / FPR)`` on the selection half, among
    the values of the no-canary trials that leave at least 20 false positives (a rate from
    fewer would be noise); the largest no-canary value + tiny when the worlds separate.
    """
    if without.max() < with_canary.min():  # perfectly separated: any gap works
        return float((without.max() + with_canary.min()) / 2)
    ordered = np.sort(without)[::-1]
    best, best_t = -math.inf, float(ordered[min(19, len(ordered) - 1)])
    for fp in range(20, len(ordered), max(1, len(ordered) // 400)):
        t = float(ordered[fp - 1])
        tpr = float((with_canary >= t).mean())
        score = math.log(max(tpr, 1e-12) / (fp / len(ordered)))
        if score > best:
            best, best_t = score, t
    return best_t


def audit(
    noise_multiplier: float = 1.0,
    *,
    sample_rate: float = 1.0,
    clients: int = 8,
    clip: float = 1.0,
    delta: float = 1e-5,
    trials: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> AuditResult:
    """One audit (module docstring): ``trials`` rounds per world, half to choose the threshold,
    half to count.
    """
    others, canary, direction, shapes = contributions(clients, clip, seed)
    std = noise_multiplier * clip
    args = (direction, shapes, std, sample_rate, trials)
    present = _statistics(others, canary, *args, seed=2 * seed + 1)
    absent = _statistics(others, None, *args, seed=2 * seed + 2)
    half = trials // 2
    threshold = _choose_threshold(present[:half], absent[:half])
    tp = int((present[half:] >= threshold).sum())
    fp = int((absent[half:] >= threshold).sum())
    n = trials - half
    lb = epsilon_lower_bound(tp, n, fp, n, delta, confidence)
    eps = epsilon(noise_multiplier, sample_rate, 1, delta, sampling="poisson")
    return AuditResult(
        noise_multiplier, sample_rate, clients, clip, delta, n, tp, fp, lb, eps, confidence
    )


def table(results: Sequence[AuditResult]) -> str:
    """Markdown: one row per audit."""
    lines = [
        "| z | q | TPR | FPR | ε_lb (audit) | ε (accountant, one round) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        acc = "∞" if math.isinf(r.epsilon_accountant) else f"{r.epsilon_accountant:.2f}"
        lines.append(
            f"| {r.noise_multiplier:g} | {r.sample_rate:g} | {r.tpr:.4f} | {r.fpr:.4f} | "
            f"{r.epsilon_lb:.2f} | {acc} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10_000, help="rounds per world (default 10000)")
    p.add_argument("--clients", type=int, default=8, help="m, the canary included (default 8)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument(
        "--settings",
        default="0.5:1,1:1,2:1,1:0.5,0:1",
        help="comma-separated z:q pairs (default 0.5:1,1:1,2:1,1:0.5,0:1; z = 0: noise off)",
    )
    args = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's convergence notes
    settings = [tuple(float(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    start = time.perf_counter()
    results = [
        audit(
            z,
            sample_rate=q,
            clients=args.clients,
            clip=args.clip,
            delta=args.delta,
            trials=args.trials,
            confidence=args.confidence,
        )
        for z, q in settings
    ]
    print(
        f"One round, m = {args.clients} clients (the canary included), C = {args.clip:g}, "
        f"δ = {args.delta:g}, {args.trials} trials per world (half choose the threshold, half "
        f"count); ε_lb holds with confidence {args.confidence:g} (Clopper–Pearson).\n"
    )
    print(table(results))
    bad = [r for r in results if r.epsilon_lb > r.epsilon_accountant]
    for r in bad:
        print(f"\nVIOLATION: z = {r.noise_multiplier:g}: ε_lb {r.epsilon_lb:.3f} > ε (accountant)")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
