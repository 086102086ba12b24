"""``raflora theory``: Theorem 4.4's coverage, contraction, bound and predicted curves.

See docs/methods.md#theory. Standard output holds the report only (with ``--json`` one JSON
object): whatever else the computation writes to file descriptor 1 — a native library's messages
included — goes to standard error (:func:`stdout_to_stderr`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raflora.cli.common import CLIError, parse_float_list, parse_int_list
from raflora.theory import TheoryResult, TheorySetup, add_simulation, predict

__all__ = ["format_table", "register", "run", "stdout_to_stderr"]


def register(sub: Any) -> None:
    """Add the ``theory`` sub-command to ``sub`` (an argparse sub-parsers object)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "theory",
        help="predict rank collapse (Theorem 4.4) and check it by Monte Carlo",
        description=(
            "Coverage p_i, contraction q_i, gamma, C, the bound C*gamma^t and the closed-form "
            "higher-rank energy ratio 1-rho_{r1}(t) of vanilla FedLoRA (FlexLoRA) and raFLoRA; "
            "with --simulate N also Monte Carlo estimates through the real aggregators."
        ),
    )
    p.add_argument(
        "--ranks", default="8,16,32,48,64", help="rank levels, increasing (default: %(default)s)"
    )
    p.add_argument(
        "--clients", type=int, default=100, help="total clients K (default: %(default)s)"
    )
    p.add_argument(
        "--per-round",
        type=int,
        default=10,
        help="clients sampled per round M (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=50, help="rounds T (default: %(default)s)")
    p.add_argument(
        "--probs", default=None, help="probability of each rank level (default: uniform)"
    )
    p.add_argument(
        "--beta", type=float, default=1.0, help="client scaling beta (default: %(default)s)"
    )
    p.add_argument(
        "--init",
        choices=("flat", "decay"),
        default="flat",
        help="initial energies e_i(0): 1 or 1/i",
    )
    p.add_argument(
        "--empty-partition",
        choices=("carry", "drop"),
        default="carry",
        help="raFLoRA's rule for partitions no sampled client reaches (default: %(default)s)",
    )
    p.add_argument(
        "--simulate", type=int, default=0, metavar="N", help="Monte Carlo with N simulations"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the Monte Carlo (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--plot", type=Path, default=None, metavar="PNG", help="also save a plot to this file"
    )
    p.set_defaults(handler=run)


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers (where a native library's ``printf`` waits), where C is loadable."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # no such C library (Windows)
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at standard error while the body runs.

    Native code writes to the process's stdout directly, past ``sys.stdout`` (MKL's LAPACK
    prints ``Intel oneMKL ERROR: …`` there): inside this block it lands on stderr, so what the
    command prints afterwards is all that stdout holds. Python's and C's buffers are flushed on
    entry and exit, so nothing buffered crosses to the other stream.
    """
    sys.stdout.flush()
    _flush_c_stdio()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)


def _fmt(x: float) -> str:
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def format_table(result: TheoryResult) -> str:
    """Human-readable report: the setting, per-partition coverage/contraction, per-round curves."""
    s = result.setup
    lines = [
        "Theorem 4.4: higher-rank energy ratio 1-rho_r1 of the global update",
        f"K={s.num_clients} clients, M={s.per_round} per round, beta={s.beta}, init={s.init}, "
        f"rank levels {','.join(map(str, s.rank_levels))} "
        f"(probs {','.join(f'{p:g}' for p in s.probs)})",
        "",
        f"{'level':>6} {'directions':>11} {'clients':>8} {'p_i':>8} {'q_i':>8} {'q_i raFLoRA':>12}",
    ]
    prev = 0
    for h in s.rank_levels:
        clients = sum(1 for r in s.client_ranks if r >= h)
        lines.append(
            f"{h:>6} {f'{prev + 1}-{h}':>11} {clients:>8} {result.p[h - 1]:>8.4f} "
            f"{result.q[h - 1]:>8.4f} {result.q_raflora[h - 1]:>12.4f}"
        )
        prev = h
    lines += [
        "",
        f"gamma = q_{s.r_1 + 1} / q_{s.r_1} = {result.gamma:.4f}    C = {result.C:.4f}",
        "",
    ]
    simulated = "simulated_flexlora" in result.rounds[0]
    header = f"{'round':>5} {'bound C*g^t':>12} {'FlexLoRA':>10} {'raFLoRA':>10}"
    if simulated:
        header += f" {'FlexLoRA MC':>12} {'raFLoRA MC':>11}"
    lines.append(header)
    for row in result.rounds:
        line = (
            f"{row['round']:>5} {_fmt(row['bound']):>12} {_fmt(row['predicted_flexlora']):>10} "
            f"{_fmt(row['predicted_raflora']):>10}"
        )
        if simulated:
            line += f" {_fmt(row['simulated_flexlora']):>12} {_fmt(row['simulated_raflora']):>11}"
        lines.append(line)
    return "\n".join(lines)


def _plot(result: TheoryResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [row["round"] for row in result.rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, [row["bound"] for row in result.rounds], "k:", label="bound $C\\gamma^t$")
    ax.plot(t, [row["predicted_flexlora"] for row in result.rounds], label="FlexLoRA (closed form)")
    ax.plot(t, [row["predicted_raflora"] for row in result.rounds], label="raFLoRA (closed form)")
    for key, label in (
        ("simulated_flexlora", "FlexLoRA (MC)"),
        ("simulated_raflora", "raFLoRA (MC)"),
    ):
        if key in result.rounds[0]:
            ax.plot(t, [row[key] for row in result.rounds], "o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_ylim(1e-8, 1.5)
    ax.set_xlabel("round t")
    ax.set_ylabel("higher-rank energy ratio $1-\\rho_{r_1}$")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora theory``."""
    if args.rounds < 0:
        raise CLIError(f"--rounds must be ≥ 0, got {args.rounds}")
    if args.simulate < 0:
        raise CLIError(f"--simulate must be ≥ 0, got {args.simulate}")
    try:
        setup = TheorySetup(
            rank_levels=tuple(parse_int_list(args.ranks, "--ranks")),
            num_clients=args.clients,
            per_round=args.per_round,
            probs=tuple(parse_float_list(args.probs, "--probs")) if args.probs else (),
            beta=args.beta,
            init=args.init,
            empty_partition=args.empty_partition,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    with stdout_to_stderr():  # stdout holds the report only (a JSON object with --json)
        result = predict(setup, args.rounds)
        if args.simulate:
            result = add_simulation(result, args.simulate, seed=args.seed)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    if args.plot is not None:
        _plot(result, args.plot)
    return 0
