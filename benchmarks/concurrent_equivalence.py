"""The whole quickstart comparison with K = 10 concurrent clients against K = 1
(``train.concurrent_clients``, docs/concurrency.md).

Runs ``raflora compare CONFIG --methods all`` twice — ``train.concurrent_clients=1`` and ``=10``
— and prints, per method, the final accuracy and final higher-rank energy of both and their
differences. Targets: accuracy within 0.5 points, energy within 0.01; the exit code is 1 if a
method misses one. It takes as long as two comparisons (minutes on a 2-core CPU).

Usage::

    python benchmarks/concurrent_equivalence.py                       # configs/quickstart.yaml
    python benchmarks/concurrent_equivalence.py --methods raflora,flexlora --out /tmp/eq
    python benchmarks/concurrent_equivalence.py fl.rounds=8 eval.every=4   # a shorter check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
ACCURACY_POINTS = 0.5
ENERGY = 0.01


def compare(
    config: str, methods: str, k: int, out: Path, overrides: list[str]
) -> dict[str, dict[str, float]]:
    """``raflora compare`` at ``K = k``: method → its summary."""
    cmd = [
        sys.executable,
        "-m",
        "raflora.cli",
        "compare",
        config,
        *overrides,
        f"train.concurrent_clients={k}",
        "--methods",
        methods,
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
    ]
    subprocess.run(cmd, check=True)
    return {
        path.parent.name: json.loads(path.read_text())
        for path in sorted(out.glob("*/summary.json"))
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--methods", default="all")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    with TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        one = compare(args.config, args.methods, 1, root / "k1", args.overrides)
        many = compare(args.config, args.methods, args.k, root / f"k{args.k}", args.overrides)
    print(
        f"| method | accuracy K=1 | K={args.k} | Δ points | energy K=1 | K={args.k} | Δ | ok |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    failed = 0
    for method in sorted(one):
        a, b = one[method], many[method]
        acc = 100 * (b["final_accuracy"] - a["final_accuracy"])
        e1, e2 = a.get("final_higher_rank_energy"), b.get("final_higher_rank_energy")
        energy = 0.0 if e1 is None or e2 is None else e2 - e1
        ok = abs(acc) <= ACCURACY_POINTS and abs(energy) <= ENERGY
        failed += not ok
        print(
            f"| {method} | {100 * a['final_accuracy']:.2f} | {100 * b['final_accuracy']:.2f} "
            f"| {acc:+.2f} | {e1 if e1 is None else f'{e1:.4f}'} "
            f"| {e2 if e2 is None else f'{e2:.4f}'} | {energy:+.4f} | {'yes' if ok else 'NO'} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
