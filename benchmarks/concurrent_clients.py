"""Concurrent clients (``train.concurrent_clients: K``, docs/concurrency.md): the client phase of
a round at K = 1, 2, 5, 10, side by side in one invocation.

Three federations, 10 clients per round:

(a) ``quickstart`` — configs/quickstart.yaml (the digits ViT, width 64, batch 16), and
    ``uniform``, the same with one rank level (8), an IID partition and FedIT: clients of one
    rank and one size share every batched product (the best case of the slots);
(b) ``bert`` — text classification on a 6-layer, 384-wide BERT (random weights; batch 16,
    32 tokens; the paper's rank levels 8–64);
(c) ``llm`` — math reasoning on a tiny Llama (batch 4, answers of different lengths).

Each case runs in a fresh subprocess that builds one federation per K and times their client
phases of round 1 side by side: one warm-up each, then a phase of every K in turn, at least
``--repeats`` times and until each K has spent ``--min-seconds`` (the minimum of each is
reported, and the ratio K=1 / K; interleaving makes a slow spell of a shared machine hit every K
alike). Peak memory comes from one more fresh subprocess per (case, K): resident set on the CPU
(the process's high-water mark, model included), ``torch.cuda.max_memory_allocated`` on CUDA.
``--modes`` instead times the client phase at K = 10 under each of
:mod:`raflora.adapters.slots`' ways of running mixed ranks in one pass, interleaved likewise.

Usage::

    python benchmarks/concurrent_clients.py                       # CPU, every case
    python benchmarks/concurrent_clients.py --device cuda --cases bert --ks 1,8
    python benchmarks/concurrent_clients.py --modes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES = ("quickstart", "uniform", "bert", "llm")
KS = (1, 2, 5, 10)
MODES = ("buckets", "padded", "segments")


def prepare(root: Path, cases: list[str]) -> dict[str, str]:
    """The models and data the cases need, written under ``root``."""
    from raflora.experiments.gpu_check import make_bert

    paths: dict[str, str] = {}
    if "bert" in cases:
        make_bert(root / "bert", root / "texts")
        paths["bert"], paths["texts"] = str(root / "bert"), str(root / "texts")
    if "llm" in cases:
        sys.path.insert(0, str(ROOT / "tests"))
        from hf_fixtures import make_gsm8k_jsonl, make_tiny_llama

        paths["llama"] = str(make_tiny_llama(root / "llama", hidden_size=64, intermediate_size=128))
        paths["gsm8k"] = str(make_gsm8k_jsonl(root / "gsm8k", n_train=400, n_test=8))
    return paths


def overrides(case: str, paths: dict[str, str], k: int, device: str) -> list[str]:
    common = [
        f"train.concurrent_clients={k}",
        f"device={device}",
        "fl.clients_per_round=10",
        "output.plots=false",
    ]
    if case == "quickstart":
        return common
    if case == "uniform":
        return [*common, "method=fedit", "fl.rank_levels=[8]", "data.partition=iid"]
    if case == "bert":
        return [
            *common,
            "task.name=text-classification",
            f"task.model={paths['bert']}",
            f"task.dataset={paths['texts']}/texts.csv",
            "task.max_length=32",
            "fl.num_clients=50",
            "fl.rank_levels=[8,16,32,48,64]",
            "data.partition=iid",
            "train.batch_size=16",
            "lora.target_modules=[query,key,value,dense]",
        ]
    return [
        *common,
        "task.name=math-reasoning",
        f"task.model={paths['llama']}",
        f"task.dataset={paths['gsm8k']}",
        "task.max_length=96",
        "fl.num_clients=50",
        "fl.rank_levels=[2,4,8]",
        "data.partition=iid",
        "train.batch_size=4",
        "lora.target_modules=[q_proj,v_proj]",
    ]


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def one(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: the client phase at every K of ``--ks``, interleaved (each
    K's federation built once, then a phase of each K in turn, so a slow spell of a shared
    machine hits every K alike), the minimum of each; or, with ``--memory``, the peak memory of
    the one K ``--ks`` names."""
    import torch

    import raflora.adapters.slots as slots
    from raflora.config import load_config
    from raflora.engine import build_federation
    from raflora.experiments.gpu_check import client_phase

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    config = str(ROOT / "configs" / "quickstart.yaml")
    ks = [int(k) for k in args.ks.split(",")]
    feds = {
        k: build_federation(load_config(config, overrides(args.one, paths, k, args.device)))
        for k in ks
    }
    states = {k: fed.initial_state() for k, fed in feds.items()}
    device = next(iter(feds.values())).device
    cuda = device.type == "cuda"

    def phase(k: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        client_phase(feds[k], states[k], 1, k)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for k in ks:  # warm-up (adapters created, kernels chosen)
        phase(k)

    def more(times: list[float]) -> bool:  # at least --repeats, and --min-seconds in all
        return bool(len(times) < args.repeats or sum(times) < args.min_seconds)

    if args.memory:
        (k,) = ks
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        phase(k)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _hwm_kib() / 1024
        return {"peak_mib": peak}
    runs: dict[str, list[float]] = {}
    if args.modes:  # K = 10 under each mode, interleaved
        (k,) = ks
        runs = {mode: [] for mode in MODES}
        while more(runs[MODES[0]]):
            for mode in MODES:
                slots.MODE = mode  # type: ignore[assignment]
                runs[mode].append(phase(k))
    else:
        runs = {str(k): [] for k in ks}
        while any(more(times) for times in runs.values()):
            for k in ks:
                runs[str(k)].append(phase(k))
    return {"seconds": {key: min(times) for key, times in runs.items()}, "device": str(device)}


def spawn(
    case: str, ks: list[int], args: argparse.Namespace, paths: dict[str, str], **flags: bool
) -> Any:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        case,
        "--ks",
        ",".join(map(str, ks)),
        "--repeats",
        str(args.repeats),
        "--min-seconds",
        str(args.min_seconds),
        "--device",
        args.device,
        "--paths",
        json.dumps(paths),
        "--threads",
        str(args.threads),
        *[f"--{flag}" for flag, on in flags.items() if on],
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--repeats", type=int, default=3, help="timed client phases, at least")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="time the client phase again until this many seconds are spent (the minimum of "
        "many is steadier for the fast cases)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (0: torch's default; 1 is steadier on a busy machine)",
    )
    parser.add_argument("--modes", action="store_true", help="compare the mixed-rank modes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paths", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    cases = [c for c in args.cases.split(",") if c]
    ks = [int(k) for k in args.ks.split(",")]
    with TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp), cases)
        if args.modes:
            print("| case | " + " | ".join(MODES) + " |")
            print("|---|" + "---|" * len(MODES))
            for case in cases:
                got = spawn(case, [10], args, paths, modes=True)["seconds"]
                print(f"| {case} | " + " | ".join(f"{got[m]:.3f} s" for m in MODES) + " |")
            return
        print("| case | K | client phase (s) | speed-up vs K=1 | peak memory (MiB) |")
        print("|---|---|---|---|---|")
        for case in cases:
            got = spawn(case, ks, args, paths)
            seconds = got["seconds"]
            base = seconds[str(ks[0])]
            for k in ks:
                peak = spawn(case, [k], args, paths, memory=True)["peak_mib"]
                print(
                    f"| {case} | {k} | {seconds[str(k)]:.3f} | {base / seconds[str(k)]:.2f}× "
                    f"| {peak:.0f} |",
                    flush=True,
                )
        threads = args.threads or "default"
        print(f"device: {got['device']}, torch threads: {threads}")


if __name__ == "__main__":
    main()
