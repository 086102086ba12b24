"""Engine benchmark on the quickstart (CPU): overhead share, raFLoRA vs FlexLoRA time, peak memory.

Prints three measurements, each taken side by side in this one invocation:

1. the share of a run's wall time spent outside client forward/backward/optimizer steps
   (set-up of each client, aggregation, diagnostics, evaluation, checkpoints; target ≤ 10 %);
2. raFLoRA's total run time over FlexLoRA's on the same federation (target ≤ 1.02; the paper
   reports 1.06–1.13), runs interleaved and repeated, median ratio;
3. peak resident memory during the rounds as the number of clients grows with clients per round
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
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_local(cfg, out, progress=False)
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    rows = result.metrics
    compute = sum(r["time"]["client_compute_seconds"] for r in rows)
    return {
        "total_seconds": total,
        "cpu_seconds": cpu,
        "round_seconds": result.summary["wall_seconds"],
        "compute_seconds": compute,
        "train_seconds": sum(r["time"]["train_seconds"] for r in rows),
        "aggregate_seconds": sum(r["time"]["aggregate_seconds"] for r in rows),
        "eval_seconds": sum(r["time"]["eval_seconds"] for r in rows),
    }


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(config: str, overrides: list[str]) -> None:
    """Run once in this fresh process and print memory figures (MiB) as JSON.

    The peak-RSS mark is reset (``/proc/self/clear_refs``) after the task, model and partitions
    are built, so ``run_peak_mib`` is the highest RSS *during the rounds* and ``added_mib`` what
    the rounds added on top of the built federation.
    """
    from raflora.config import load_config
    from raflora.engine import build_federation, run_local

    cfg = load_config(config, [*overrides, "output.plots=false"])
    fed = build_federation(cfg)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with TemporaryDirectory() as tmp:
        run_local(cfg, Path(tmp) / "run", progress=False, fed=fed)
    peak = _status_kib("VmHWM")
    print(json.dumps({"run_peak_mib": peak / 1024, "added_mib": (peak - before) / 1024}))


def _peak_in_subprocess(config: str, overrides: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--config", config, *overrides],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Run the three measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=None, help="override fl.rounds")
    parser.add_argument("--repeats", type=int, default=4, help="timed pairs for the ratio")
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
    best = {m: min(r["round_seconds"] for r in runs) for m, runs in timings.items()}
    agg = [
        ra["aggregate_seconds"] / fx["aggregate_seconds"]
        for ra, fx in zip(timings["raflora"], timings["flexlora"], strict=True)
    ]
    print("\n2. raFLoRA total time / FlexLoRA total time (target ≤ 1.02; paper 1.06–1.13)")
    cpu = {m: min(r["cpu_seconds"] for r in runs) for m, runs in timings.items()}
    print(
        f"   CPU time (less sensitive to a shared machine), best of {len(ratios)}: "
        f"{cpu['raflora'] / cpu['flexlora']:.3f} ({cpu['raflora']:.2f} s / {cpu['flexlora']:.2f} s)"
    )
    print(
        f"   wall time, best of {len(ratios)}: {best['raflora'] / best['flexlora']:.3f} "
        f"({best['raflora']:.2f} s / {best['flexlora']:.2f} s); median of interleaved pairs "
        f"{statistics.median(ratios):.3f} (each: {', '.join(f'{r:.3f}' for r in ratios)}); "
        f"aggregation alone {statistics.median(agg):.3f}"
    )

    print("\n3. peak memory during the rounds (fresh process per setting, 2 rounds; RSS)")
    per_round = base.fl.clients_per_round
    short = [*overrides, "fl.rounds=2", "data.partition=iid", "data.min_samples=1"]
    settings = [(c, per_round) for c in (per_round * 2, per_round * 8, per_round * 32)]
    settings += [(per_round * 8, m) for m in (max(1, per_round // 2), per_round * 2, per_round * 4)]
    for clients, m in settings:
        mem = _peak_in_subprocess(
            args.config, [*short, f"fl.num_clients={clients}", f"fl.clients_per_round={m}"]
        )
        print(
            f"   {clients:4d} clients, {m:3d} per round: peak {mem['run_peak_mib']:7.1f} MiB, "
            f"rounds added {mem['added_mib']:6.1f} MiB"
        )


if __name__ == "__main__":
    main()
