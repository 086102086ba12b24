"""Set-up cost of a simulated federation's data split: time and memory versus the number of clients.

"Set-up" is what the engine does for the data before round 1: :func:`raflora.data.partition` and
:func:`raflora.data.summarize_partition` (what ``partition.json`` holds), on the labels of the
``synthetic`` task (``task.options.num_train``, default 60,000 here) with the engine's partition
seed for run seed 0 and ``data.min_samples`` 2. For every partitioner and client count it prints,
side by side:

- ``time``: best wall time of ``--repeats`` set-ups (``time.perf_counter``);
- ``peak``: peak memory traced by ``tracemalloc`` during one set-up (NumPy reports its array
  buffers to ``tracemalloc``; the labels, built once beforehand, are not counted);
- ``B/client``: memory still held after the set-up (the index arrays and the summary) per client;
- ``path``: ``draw`` when the partitioner's first draw met the minimum, ``built`` when the
  minimum was reached by construction (top-up / maximum flow).

The last column, ``x(K)``, is the time at the largest client count over the time at the
previous one, next to the ratio of client counts: linear growth keeps it at or below that
ratio.

Usage::

    .venv/bin/python benchmarks/partition.py
    .venv/bin/python benchmarks/partition.py --clients 100 1000 5000 10000 --repeats 5
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Any

import numpy as np

from raflora.data import partition, summarize_partition

SPECS = ("iid", "dir-a0.5", "dir-a0.1", "patho-c2a1")
MIN_SAMPLES = 2


def synthetic_labels(num_train: int) -> np.ndarray:
    """Training labels of the real ``synthetic`` task (built once, not timed)."""
    from raflora.config import config_from_dict
    from raflora.tasks import build_task

    config = config_from_dict({"task": {"name": "synthetic", "options": {"num_train": num_train}}})
    labels = build_task(config).partition_labels
    assert labels is not None
    return labels


def set_up(spec: str, labels: np.ndarray, clients: int, seed: int) -> Any:
    parts = partition(spec, labels, clients, seed, min_samples=MIN_SAMPLES)
    return parts, summarize_partition(parts, labels)


def measure(spec: str, labels: np.ndarray, clients: int, seed: int, repeats: int) -> dict[str, Any]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        set_up(spec, labels, clients, seed)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = set_up(spec, labels, clients, seed)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    first = partition(spec, labels, clients, seed, min_samples=0)
    return {
        "time": min(times),
        "peak": (peak - before) / 2**20,
        "per_client": (current - before) / clients,
        "path": "draw" if min(len(p) for p in first) >= MIN_SAMPLES else "built",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--num-train", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from raflora.engine import seeds

    labels = synthetic_labels(args.num_train)
    seed = seeds.partition_seed(0)
    print(
        f"synthetic task: {len(labels)} samples, {len(np.unique(labels))} classes; "
        f"min_samples {MIN_SAMPLES}; time = best of {args.repeats}; memory by tracemalloc"
    )
    head = "".join(f" | {f'K={k}':>34}" for k in args.clients)
    sub = "".join(f" | {'time':>9} {'peak':>8} {'B/client':>8} {'path':>5}" for _ in args.clients)
    print(f"{'partition':<11}{head} | x(K)")
    print(f"{'':<11}{sub} |")
    growth = args.clients[-1] / args.clients[-2] if len(args.clients) > 1 else 1.0
    for spec in SPECS:
        rows = [measure(spec, labels, k, seed, args.repeats) for k in args.clients]
        cells = "".join(
            f" | {r['time'] * 1e3:7.1f}ms {r['peak']:6.1f}MB {r['per_client']:8.0f} {r['path']:>5}"
            for r in rows
        )
        ratio = rows[-1]["time"] / rows[-2]["time"] if len(rows) > 1 else 1.0
        print(f"{spec:<11}{cells} | {ratio:.1f} (K x{growth:g})")


if __name__ == "__main__":
    main()
