"""Engine benchmark on the quickstart (CPU): overhead share, raFLoRA vs FlexLoRA time, peak memory.

Prints three measurements, each taken side by side in this one invocation:

1. the share of a run's wall time spent outside client forward/backward/optimizer steps
   (set-up of each client, aggregation, diagnostics, evaluation, checkpoints; target ≤ 10 %);
2. raFLoRA's total run time over FlexLoRA's on the same federation (target ≤ 1.02; the paper
   reports 1.06–1.13), runs interleaved and repeated, median ratio;
3. peak resident memory of a whole run as the number of clients grows with clients per round
   fixed (it must stay flat), and as clients per round grow (it may grow) — each setting in a
   fresh subprocess so peaks do not mix.

Usage::

    python benchmarks/engine.py                 # the quickstart config
    python benchmarks/engine.py --rounds 10 --repeats 3 --config configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    from raflora.config import load_config
    from raflora.engine import run_local

    cfg = load_config(config, [*overrides, "output.plots=false"])
    t0 = time.perf_counter()
    result = run_local(cfg, out, progress=False)
    total = time.perf_counter() - t0
    rows = result.metrics
    compute = sum(r["time"]["client_compute_seconds"] for r in rows)
    return {
        "total_seconds": total,
        "round_seconds": result.summary["wall_seconds"],
        "compute_seconds": compute,
        "train_seconds": sum(r["time"]["train_seconds"] for r in rows),
        "aggregate_seconds": sum(r["time"]["aggregate_seconds"] for r in rows),
        "eval_seconds": sum(r["time"]["eval_seconds"] for r in rows),
    }


def _child(config: str, overrides: list[str]) -> None:
    """Run once and print the peak RSS (MiB) as JSON (used in a fresh subprocess)."""
    import resource

    with TemporaryDirectory() as tmp:
        _run(config, overrides, Path(tmp) / "run")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak_kib / 1024}))


def _peak_in_subprocess(config: str, overrides: list[str]) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--config", config, *overrides],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    """Run the three measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=None, help="override fl.rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs for the ratio")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"fl.rounds={args.rounds}")
    if args.child:
        _child(args.config, overrides)
        return

    from raflora.config import load_config

    base = load_config(args.config, overrides)
    print(f"config: {args.config} {' '.join(overrides)}")
    print(
        f"task {base.task.name}, {base.fl.num_clients} clients, {base.fl.clients_per_round} per "
        f"round, {base.fl.rounds} rounds, ranks {base.fl.rank_levels}\n"
    )
    with TemporaryDirectory() as tmp:
        # Warm-up: builds the digits cache and imports everything once.
        _run(args.config, [*overrides, "fl.rounds=1"], Path(tmp) / "warm")

        # 1 + 2: interleaved raFLoRA / FlexLoRA runs.
        timings: dict[str, list[dict[str, Any]]] = {"raflora": [], "flexlora": []}
        for i in range(args.repeats):
            for method in ("flexlora", "raflora") if i % 2 == 0 else ("raflora", "flexlora"):
                out = Path(tmp) / f"{method}-{i}"
                timings[method].append(_run(args.config, [*overrides, f"method={method}"], out))

    print("1. wall time outside client forward/backward/optimizer steps (target ≤ 10%)")
    for method, runs in timings.items():
        shares = [1 - r["compute_seconds"] / r["round_seconds"] for r in runs]
        best = min(runs, key=lambda r: r["round_seconds"])
        print(
            f"   {method:9s} {100 * statistics.median(shares):5.1f}%  (rounds "
            f"{best['round_seconds']:.2f} s: client compute {best['compute_seconds']:.2f} s, "
            f"client set-up {best['train_seconds'] - best['compute_seconds']:.2f} s, "
            f"aggregation+diagnostics {best['aggregate_seconds']:.2f} s, "
            f"evaluation {best['eval_seconds']:.2f} s)"
        )
    ratios = [
        ra["round_seconds"] / fx["round_seconds"]
        for ra, fx in zip(timings["raflora"], timings["flexlora"], strict=True)
    ]
    agg = [
        ra["aggregate_seconds"] / fx["aggregate_seconds"]
        for ra, fx in zip(timings["raflora"], timings["flexlora"], strict=True)
    ]
    print("\n2. raFLoRA total time / FlexLoRA total time (target ≤ 1.02; paper 1.06–1.13)")
    print(
        f"   median {statistics.median(ratios):.3f} over {len(ratios)} interleaved pairs "
        f"(each: {', '.join(f'{r:.3f}' for r in ratios)}); aggregation alone "
        f"{statistics.median(agg):.3f}"
    )

    print("\n3. peak memory (RSS of a whole run in a fresh process, 2 rounds)")
    per_round = base.fl.clients_per_round
    short = [*overrides, "fl.rounds=2", "data.partition=iid", "data.min_samples=1"]
    for clients in (per_round * 2, per_round * 8, per_round * 32):
        peak = _peak_in_subprocess(
            args.config, [*short, f"fl.num_clients={clients}", f"fl.clients_per_round={per_round}"]
        )
        print(f"   {clients:4d} clients, {per_round:3d} per round: {peak:7.1f} MiB")
    for m in (max(1, per_round // 2), per_round * 2, per_round * 4):
        clients = max(m, per_round * 8)
        peak = _peak_in_subprocess(
            args.config, [*short, f"fl.num_clients={clients}", f"fl.clients_per_round={m}"]
        )
        print(f"   {clients:4d} clients, {m:3d} per round: {peak:7.1f} MiB")


if __name__ == "__main__":
    main()
