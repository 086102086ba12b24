"""Factored vs dense aggregation, side by side in one run (issue: core, "Performance").

For d = n in {768, 4096} and 10 clients with ranks {8, 16, 32, 48, 64} x 2, times

* dense: form the d x n matrix sum_k p_k B_k A_k, full SVD, truncate to r_max
  (what public FlexLoRA code does);
* factored FlexLoRA and factored raFLoRA (raflora.aggregate, QR + small-core SVD);

and prints the speed ratio, the largest relative difference of the top-64 singular values, and
the peak memory of each path (growth of the process's peak RSS, reset before each path).

    python benchmarks/aggregation.py [--sizes 768,4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import raflora

RANKS = [8, 16, 32, 48, 64] * 2
LEVELS = [8, 16, 32, 48, 64]


def make_updates(d: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(d, r, generator=g) / d**0.5,
            torch.randn(r, d, generator=g) / d**0.5,
            50 + 10 * i,
        )
        for i, r in enumerate(RANKS)
    ]


def dense_flexlora(
    updates: list[tuple[torch.Tensor, torch.Tensor, int]], r_max: int
) -> torch.Tensor:
    total = sum(n for _, _, n in updates)
    delta = sum((n / total) * (B @ A) for B, A, n in updates)
    assert isinstance(delta, torch.Tensor)
    S = torch.linalg.svd(delta, full_matrices=False)[1]  # full SVD, as public FlexLoRA code does
    return S[:r_max]


def timed(fn, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mib(fn) -> float:  # type: ignore[no-untyped-def]
    """Peak resident memory growth while ``fn`` runs (MiB), via VmHWM reset (Linux)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak-RSS high-water mark to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="768,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for d in [int(x) for x in args.sizes.split(",")]:
        updates = make_updates(d)
        # memory first (fresh pages), factored paths before the dense one
        mem_flex = peak_mib(lambda: raflora.aggregate("flexlora", updates, rank_levels=LEVELS))
        mem_ra = peak_mib(lambda: raflora.aggregate("raflora", updates, rank_levels=LEVELS))
        mem_dense = peak_mib(lambda: dense_flexlora(updates, 64))
        t_dense, s_dense = timed(lambda: dense_flexlora(updates, 64), max(1, args.repeats - 1))
        t_flex, (B, A) = timed(
            lambda: raflora.aggregate("flexlora", updates, rank_levels=LEVELS), args.repeats
        )
        t_ra, _ = timed(
            lambda: raflora.aggregate("raflora", updates, rank_levels=LEVELS), args.repeats
        )
        s_fact = raflora.energy_spectrum(B, A).sqrt()[:64]
        rel = float(((s_fact - s_dense).abs() / s_dense.abs().clamp_min(1e-30)).max())
        row = {
            "d=n": d,
            "dense_s": t_dense,
            "flexlora_s": t_flex,
            "raflora_s": t_ra,
            "speedup": t_dense / t_flex,
            "raflora_over_flexlora": t_ra / t_flex,
            "max_rel_diff_top64_sigma": rel,
            "peak_mib_dense": mem_dense,
            "peak_mib_flexlora": mem_flex,
            "peak_mib_raflora": mem_ra,
        }
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"threads={torch.get_num_threads()}  clients ranks={RANKS}  (best of {args.repeats})")
    print(
        f"{'d=n':>6} {'dense s':>9} {'flex s':>8} {'ra s':>8} {'speedup':>8} {'ra/flex':>8} "
        f"{'max rel diff':>12} {'MiB dense':>10} {'MiB flex':>9} {'MiB ra':>7}"
    )
    for r in rows:
        print(
            f"{r['d=n']:>6} {r['dense_s']:>9.3f} {r['flexlora_s']:>8.4f} {r['raflora_s']:>8.4f} "
            f"{r['speedup']:>7.1f}x {r['raflora_over_flexlora']:>8.3f} "
            f"{r['max_rel_diff_top64_sigma']:>12.2e} {r['peak_mib_dense']:>10.1f} "
            f"{r['peak_mib_flexlora']:>9.1f} {r['peak_mib_raflora']:>7.1f}"
        )


if __name__ == "__main__":
    main()
