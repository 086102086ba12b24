"""``raflora privacy``: plan a private run — ε for a noise multiplier, or the noise multiplier for
a target ε — before running it.

The accounting is :mod:`raflora.privacy.accountant`'s (Google's ``dp-accounting``; the
``privacy`` extra): each round is one subsampled Gaussian mechanism, composed over the rounds.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from raflora.cli.common import CLIError
from raflora.privacy.accountant import (
    ACCOUNTANTS,
    SAMPLINGS,
    calibrate_noise,
    default_delta,
    epsilon,
    library_version,
)

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``privacy`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "privacy",
        help="client-level DP accounting: epsilon for a noise multiplier, or the reverse",
        description=(
            "Epsilon at delta after T rounds of the subsampled Gaussian mechanism (noise "
            "multiplier Z, each client sampled with rate Q), accounted with dp-accounting; with "
            "--target-epsilon the smallest noise multiplier reaching it instead. The sample rate "
            "is --sample-rate, or --clients-per-round / --num-clients. delta defaults to "
            "1/num_clients^1.1."
        ),
    )
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, metavar="Z", help="noise multiplier z")
    noise.add_argument(
        "--target-epsilon",
        type=float,
        metavar="E",
        help="print the smallest noise multiplier whose epsilon is at most E",
    )
    p.add_argument("--sample-rate", type=float, metavar="Q", help="sampling rate q per round")
    p.add_argument("--clients-per-round", type=int, metavar="M", help="clients sampled per round")
    p.add_argument("--num-clients", type=int, metavar="N", help="clients in the federation")
    p.add_argument("--rounds", type=int, required=True, metavar="T", help="rounds composed")
    p.add_argument("--delta", type=float, metavar="D", help="delta (default: 1/num_clients^1.1)")
    p.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="poisson",
        help=(
            "poisson (add-or-remove-one adjacency) or fixed: m of N without replacement "
            "(replace-one adjacency; needs --num-clients) (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="rdp",
        help="dp-accounting's RDP or PLD accountant (pld: poisson only) (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def _sample_rate(args: argparse.Namespace) -> float:
    """``q`` from ``--sample-rate`` or ``--clients-per-round / --num-clients``."""
    if args.num_clients is not None and args.num_clients < 1:
        raise CLIError(f"--num-clients must be at least 1, got {args.num_clients}")
    if args.sample_rate is not None:
        if args.clients_per_round is not None:
            raise CLIError("give --sample-rate or --clients-per-round, not both")
        q: float = args.sample_rate
    elif args.clients_per_round is not None:
        if args.num_clients is None:
            raise CLIError("--clients-per-round needs --num-clients")
        if not 1 <= args.clients_per_round <= args.num_clients:
            raise CLIError(
                f"--clients-per-round must be between 1 and --num-clients ({args.num_clients}), "
                f"got {args.clients_per_round}"
            )
        q = args.clients_per_round / args.num_clients
    else:
        raise CLIError("give --sample-rate Q, or --clients-per-round M with --num-clients N")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise CLIError(f"the sample rate must be in (0, 1], got {q}")
    return q


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora privacy``."""
    q = _sample_rate(args)
    if args.rounds < 1:
        raise CLIError(f"--rounds must be at least 1, got {args.rounds}")
    if args.delta is None:
        if args.num_clients is None:
            raise CLIError("--delta is needed when --num-clients is not given")
        delta = default_delta(args.num_clients)
    else:
        delta = args.delta
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise CLIError(f"--delta must be in (0, 1), got {delta}")
    if args.sampling == "fixed" and args.num_clients is None:
        raise CLIError("--sampling fixed needs --num-clients")
    common: dict[str, Any] = {
        "sampling": args.sampling,
        "num_clients": args.num_clients,
        "accountant": args.accountant,
    }
    try:
        if args.target_epsilon is not None:
            if not (math.isfinite(args.target_epsilon) and args.target_epsilon > 0):
                raise CLIError(f"--target-epsilon must be positive, got {args.target_epsilon}")
            z = calibrate_noise(args.target_epsilon, q, args.rounds, delta, **common)
        else:
            z = args.noise_multiplier
            if not (math.isfinite(z) and z >= 0):
                raise CLIError(f"--noise-multiplier must be >= 0, got {z}")
        eps = epsilon(z, q, args.rounds, delta, **common)
    except ValueError as err:  # the accountant's own checks (e.g. m not a whole number)
        raise CLIError(str(err)) from None
    except ImportError as err:
        raise CLIError(str(err)) from None
    result = {
        "epsilon": eps,
        "delta": delta,
        "noise_multiplier": z,
        "sample_rate": q,
        "rounds": args.rounds,
        "sampling": args.sampling,
        "num_clients": args.num_clients,
        "accountant": args.accountant,
        "target_epsilon": args.target_epsilon,
        "library": f"dp-accounting {_version()}",
    }
    if args.json:
        # strict JSON: an infinite epsilon (no noise) is null
        strict = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in result.items()
        }
        print(json.dumps(strict, allow_nan=False))
        return 0
    setting = (
        f"(q = {q:g}, {args.rounds} rounds, delta = {delta:.3g}, {args.sampling} sampling, "
        f"{args.accountant} accountant)"
    )
    if args.target_epsilon is not None:
        print(
            f"noise multiplier {z:.4f} gives epsilon = {eps:.4f} "
            f"<= {args.target_epsilon:g} {setting}"
        )
    else:
        print(f"epsilon = {eps:.4f} for noise multiplier {z:g} {setting}")
    return 0


def _version() -> str:
    """The accountant library's version, or why there is none (the ``privacy`` extra)."""
    try:
        return library_version()
    except Exception:
        return "(not installed)"
