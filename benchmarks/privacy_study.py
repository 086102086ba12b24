"""The privacy study of docs/privacy.md: accuracy and higher-rank energy against ε, and the
per-partition signal-to-noise ratio raFLoRA gets.

1. **The grid.** For every ε of ``--epsilons`` (``inf``: privacy off) one
   ``raflora compare configs/quickstart.yaml --methods … --seeds …`` with
   ``privacy.enabled=true privacy.target_epsilon=ε`` (``z`` calibrated for ``fl.rounds`` before
   round 1), one ``compare --seeds s`` per seed into ``OUT/eps-<ε>/seed-<s>/<method>/``, seed
   after seed, so a grid cut short has every cell's first seeds. ``--jobs`` runs that many ε's
   at once (one ``compare`` process each, with ``threads=1``).
   HetLoRA runs with ``method_options.hetlora.weighting=samples`` at every ε (its default
   sparsity weights depend on the updates and are refused under privacy; the same option at ∞
   keeps the comparison across ε one method).
2. **Signal-to-noise per partition** (raFLoRA, the first seed, each finite ε): the same
   configuration run in this process for ``--snr-rounds`` rounds, recording each round's
   clipped contributions before the noise. For rank partition ``j`` (columns ``l:h``) the sum
   ``S_j = Σ_k clip(U_k)^(j)`` over the round's clients (densified ``d × n`` per module) gets
   ``N(0, (z C)²)`` per coordinate, and both are divided by the same ``q N_j``, so

       SNR_j = ‖S_j‖_F / (z C √D)

   with ``D = Σ_modules d n`` the coordinates of one partition. The number of contributors to
   ``S_j`` is the number of sampled clients of rank ``≥ h``; the joint clip bounds
   ``Σ_j ‖U_k^(j)‖² ≤ C²``.
3. **The report.** ``OUT/study.md`` (the tables, also printed) and a PNG with two panels (final
   accuracy and final higher-rank energy against ε, mean ± sample std over the seeds).

Usage::

    .venv/bin/python benchmarks/privacy_study.py                     # the study of docs/privacy.md
    .venv/bin/python benchmarks/privacy_study.py --report-only       # tables and plot from OUT
    .venv/bin/python benchmarks/privacy_study.py --seeds 0 --epsilons 4,inf --snr-rounds 2 \
        --out runs/privacy-study-quick --plot runs/privacy-study-quick/study.png   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
METHODS = ("raflora", "flexlora", "hetlora", "ffa")
HETLORA_OPTION = "method_options.hetlora.weighting=samples"


def eps_label(eps: float) -> str:
    """``eps-4`` / ``eps-inf``: the grid's directory names."""
    return "eps-inf" if math.isinf(eps) else f"eps-{eps:g}"


def overrides(eps: float, clip: float, rounds: int | None) -> list[str]:
    """The config overrides of one ε of the grid (privacy off at ``inf``)."""
    out = [HETLORA_OPTION, "threads=1"]
    if math.isinf(eps):
        out.append("privacy.enabled=false")
    else:
        out += ["privacy.enabled=true", f"privacy.target_epsilon={eps:g}", f"privacy.clip={clip:g}"]
    if rounds is not None:
        out.append(f"fl.rounds={rounds}")
    return out


def run_grid(
    out: Path,
    epsilons: Sequence[float],
    methods: Sequence[str],
    seeds: Sequence[int],
    clip: float,
    rounds: int | None,
    jobs: int,
) -> None:
    """One ``raflora compare`` per seed and ε, the ε's of a seed ``jobs`` at a time (module
    docstring, step 1): every cell of the grid gets its first seed before any gets its second.
    """

    def one(eps: float, seed: int) -> int:
        cmd = [
            sys.executable,
            "-m",
            "raflora.cli",
            "compare",
            str(QUICKSTART),
            *overrides(eps, clip, rounds),
            "--methods",
            ",".join(methods),
            "--seeds",
            str(seed),
            "--out",
            str(out / eps_label(eps) / f"seed-{seed}"),
            "--quiet",
        ]
        print("$", " ".join(cmd[2:]), flush=True)
        log = out / f"{eps_label(eps)}-seed-{seed}.log"
        with log.open("a") as fh:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode

    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            codes = list(pool.map(lambda e: one(e, seed), epsilons))
        for eps, code in zip(epsilons, codes, strict=True):
            if code != 0:
                print(f"compare at {eps_label(eps)} seed {seed} exited {code}", flush=True)


def partition_snr(
    eps: float, clip: float, seed: int, rounds: int, fl_rounds: int | None
) -> dict[str, Any]:
    """raFLoRA's per-partition ``SNR_j`` over the first ``rounds`` rounds (module docstring,
    step 2): the real engine's round, with the clipped contributions read before the noise.
    """
    import torch

    import raflora.engine.server_round as server_round
    from raflora.config import load_config
    from raflora.engine.private_round import update_noise_multiplier
    from raflora.engine.run_files import open_run
    from raflora.privacy.mechanism import Contribution

    config = load_config(
        QUICKSTART,
        [
            "method=raflora",
            f"seed={seed}",
            "threads=1",
            "output.plots=false",
            *overrides(eps, clip, fl_rounds),
        ],
    )
    levels = [int(h) for h in config.fl.rank_levels]
    records: list[dict[str, Any]] = []
    original = server_round.privatize_results

    def spy(fed: Any, state: Any, round_index: int, results: Any) -> Any:
        contributions = original(fed, state, round_index, results)
        run = fed.privacy
        z = update_noise_multiplier(fed.config, run)
        accepted = [c for c in contributions.values() if isinstance(c, Contribution)]
        row: dict[str, Any] = {"round": round_index, "z": z, "clip": run.clip, "partitions": {}}
        for h in levels:
            prefix = f"P{h}:"
            names = sorted(
                f"{prefix}{m}" for m in state.module_shapes
            )  # the partition's pieces, one per module
            coords = sum(math.prod(state.module_shapes[n[len(prefix) :]]) for n in names)
            sq = 0.0
            for name in names:
                pieces = [c.pieces[name] for c in accepted if name in c.pieces]
                if pieces:
                    sq += float(torch.stack(pieces).sum(dim=0).pow(2).sum())
            contributors = sum(1 for c in accepted if any(n in c.pieces for n in names))
            noise = z * run.clip * math.sqrt(coords)
            row["partitions"][str(h)] = {
                "contributors": contributors,
                "signal_norm": math.sqrt(sq),
                "noise_norm": noise,
                "snr": math.sqrt(sq) / noise if noise > 0 else math.inf,
            }
        records.append(row)
        return contributions

    server_round.privatize_results = spy  # the engine's own round, observed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = open_run(config, Path(tmp) / "snr", resume=False, overwrite=True)
            fed, state = start.fed, start.state
            for r in range(1, rounds + 1):
                state, _, _ = server_round.run_round(fed, state, r)
            ranks = [int(r) for r in fed.client_ranks]
            q = fed.privacy.sample_rate if fed.privacy is not None else 1.0
    finally:
        server_round.privatize_results = original
    coverage = {str(h): sum(1 for r in ranks if r >= h) for h in levels}
    return {"epsilon": eps, "sample_rate": q, "coverage": coverage, "rounds": records}


def load_summaries(
    out: Path, epsilons: Sequence[float], methods: Sequence[str], seeds: Sequence[int]
) -> dict[tuple[float, str], list[dict[str, Any]]]:
    """(ε, method) → the ``summary.json`` of its finished seeds."""
    found: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for eps in epsilons:
        for method in methods:
            rows = []
            for seed in seeds:
                path = out / eps_label(eps) / f"seed-{seed}" / method / "summary.json"
                if path.is_file():
                    rows.append(json.loads(path.read_text()))
            found[(eps, method)] = rows
    return found


def _stat(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _cell(values: Sequence[float], scale: float, digits: int) -> str:
    if not values:
        return "—"
    mean, std = _stat([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({len(values)})"


def _value(summary: dict[str, Any], key: str) -> float | None:
    value = summary.get(key)
    return float(value) if isinstance(value, int | float) else None


def grid_table(
    found: dict[tuple[float, str], list[dict[str, Any]]],
    epsilons: Sequence[float],
    methods: Sequence[str],
) -> str:
    """Markdown: final accuracy (%) and final higher-rank energy per method and ε."""
    head = "| Method | " + " | ".join(
        "ε = ∞ (off)" if math.isinf(e) else f"ε = {e:g}" for e in epsilons
    )
    lines = []
    for key, title, scale, digits in (
        ("final_accuracy", "Final accuracy (%)", 100.0, 1),
        ("final_higher_rank_energy", "Final higher-rank energy", 1.0, 3),
    ):
        lines += [f"**{title}** (mean ± sample std (seeds))", "", head + " |"]
        lines.append("|---|" + "---:|" * len(epsilons))
        for method in methods:
            cells = []
            for eps in epsilons:
                vals = [v for s in found[(eps, method)] if (v := _value(s, key)) is not None]
                cells.append(_cell(vals, scale, digits))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    noise = []
    for eps in epsilons:
        zs = {
            s["privacy"]["noise_multiplier"]
            for m in methods
            for s in found[(eps, m)]
            if isinstance(s.get("privacy"), dict)
        }
        if zs:
            noise.append(f"ε = {eps:g}: z = {', '.join(f'{z:.3f}' for z in sorted(zs))}")
    if noise:
        lines += ["Calibrated noise multipliers: " + "; ".join(noise) + ".", ""]
    return "\n".join(lines)


def snr_table(snr: Sequence[dict[str, Any]]) -> str:
    """Markdown: per partition, mean contributors per round, ‖S_j‖, z C √D and SNR_j."""
    if not snr:
        return ""
    levels = list(snr[0]["coverage"])
    lines = [
        "| ε | partition (columns) | clients of the federation covering it (N_j) | "
        "contributors per round | ‖S_j‖_F | z C √D | SNR_j |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in snr:
        rounds = entry["rounds"]
        prev = 0
        for h in levels:
            parts = [r["partitions"][h] for r in rounds]
            mean = {
                k: sum(p[k] for p in parts) / len(parts)
                for k in ("contributors", "signal_norm", "noise_norm", "snr")
            }
            lines.append(
                f"| {entry['epsilon']:g} | {prev + 1}–{h} | {entry['coverage'][h]} | "
                f"{mean['contributors']:.1f} | {mean['signal_norm']:.3f} | "
                f"{mean['noise_norm']:.1f} | {mean['snr']:.4f} |"
            )
            prev = int(h)
    return "\n".join(lines) + "\n"


def plot(
    found: dict[tuple[float, str], list[dict[str, Any]]],
    epsilons: Sequence[float],
    methods: Sequence[str],
    path: Path,
) -> None:
    """Two panels against ε (∞ last): final accuracy and final higher-rank energy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    xs = list(range(len(epsilons)))
    labels = ["∞ (off)" if math.isinf(e) else f"{e:g}" for e in epsilons]
    for i, (key, title, scale) in enumerate(
        (
            ("final_accuracy", "final accuracy (%)", 100.0),
            ("final_higher_rank_energy", "final higher-rank energy", 1.0),
        )
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for method in methods:
            means, stds, where = [], [], []
            for x, eps in zip(xs, epsilons, strict=True):
                vals = [
                    v * scale for s in found[(eps, method)] if (v := _value(s, key)) is not None
                ]
                if vals:
                    mean, std = _stat(vals)
                    means.append(mean)
                    stds.append(std)
                    where.append(x)
            if where:
                ax.errorbar(where, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("ε (δ = 1 / N^1.1)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    rounds = sorted({int(x["rounds"]) for rows in found.values() for x in rows if "rounds" in x})
    seeds = max((len(rows) for rows in found.values()), default=0)
    fig.suptitle(
        f"Client-level DP on the quickstart: {', '.join(map(str, rounds))} rounds, "
        f"mean ± std over {seeds} seed(s)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _floats(text: str) -> list[float]:
    return [math.inf if v.strip() in ("inf", "∞") else float(v) for v in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "privacy-study")
    p.add_argument("--epsilons", type=_floats, default=[1.0, 4.0, 8.0, math.inf])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--clip", type=float, default=0.5, help="privacy.clip C (default 0.5)")
    p.add_argument("--rounds", type=int, default=None, help="fl.rounds (default: the config's)")
    p.add_argument("--jobs", type=int, default=4, help="ε's run at once (default 4)")
    p.add_argument("--snr-rounds", type=int, default=3, help="rounds of the SNR runs (0: none)")
    p.add_argument("--report-only", action="store_true", help="no runs: tables and plot")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "figures" / "privacy_study.png")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out: Path = args.out
    snr_path = out / "snr.json"
    if not args.report_only:
        run_grid(out, args.epsilons, methods, seeds, args.clip, args.rounds, args.jobs)
        if args.snr_rounds > 0:
            snr = [
                partition_snr(e, args.clip, seeds[0], args.snr_rounds, args.rounds)
                for e in args.epsilons
                if not math.isinf(e)
            ]
            snr_path.write_text(json.dumps(snr, indent=1))
    found = load_summaries(out, args.epsilons, methods, seeds)
    snr = json.loads(snr_path.read_text()) if snr_path.is_file() else []
    text = grid_table(found, args.epsilons, methods) + "\n" + snr_table(snr)
    (out / "study.md").write_text(text)
    print(text)
    plot(found, args.epsilons, methods, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
