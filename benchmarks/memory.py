"""Peak memory of a reasoning run versus model size, clients per round and LoRA rank (CPU).

Each setting runs in a fresh subprocess (so peaks do not mix): it builds a random Llama and a tiny
GSM8K-style data set in a temporary directory, measures the process's peak resident set size
(``ru_maxrss``) after building the task (imports + tokenizer + base model + data), then runs one
federated round through :func:`raflora.engine.run_local` and measures the peak again. The
difference is what training and evaluation add on top of the loaded model.

Usage::

    .venv/bin/python benchmarks/memory.py            # the table in docs/usage.md#memory
    .venv/bin/python benchmarks/memory.py --quick    # tiny model only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "mid": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}

CHILD = r"""
import json, resource, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from hf_fixtures import make_gsm8k_jsonl, make_tiny_llama
import raflora.engine
from raflora.config import config_from_dict
from raflora.tasks import build_task

torch.set_num_threads(1)
spec = json.loads({spec!r})
tmp = Path(tempfile.mkdtemp())
make_tiny_llama(tmp / "llama", **spec["model"])
make_gsm8k_jsonl(tmp / "data", n_train=spec["clients"] * 8, n_test=8)
config = config_from_dict({{
    "method": spec["method"], "task": {{"name": "math-reasoning", "model": str(tmp / "llama"),
    "dataset": str(tmp / "data"), "max_length": 128, "options": {{"max_new_tokens": 16}}}},
    "fl": {{"num_clients": spec["clients"], "clients_per_round": spec["clients"], "rounds": 1,
            "rank_levels": spec["ranks"]}},
    "train": {{"batch_size": 4}}, "eval": {{"batch_size": 8}}, "output": {{"plots": False}},
}})
task = build_task(config)
params = sum(p.numel() for p in task.model.parameters())
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
raflora.engine.run_local(config, tmp / "run", progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"params": params, "loaded_kb": loaded, "peak_kb": peak}}))
"""


def measure(
    model: str, clients: int, ranks: list[int], method: str = "raflora"
) -> dict[str, object]:
    spec = {"model": MODELS[model], "clients": clients, "ranks": ranks, "method": method}
    code = CHILD.format(tests=str(ROOT / "tests"), spec=json.dumps(spec))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    loaded, peak = int(result["loaded_kb"]) / 1024, int(result["peak_kb"]) / 1024
    return {
        "model": model,
        "params_M": round(int(result["params"]) / 1e6, 2),
        "method": method,
        "clients_per_round": clients,
        "ranks": ranks,
        "loaded_MiB": round(loaded),
        "peak_MiB": round(peak),
        "added_MiB": round(peak - loaded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    args = parser.parse_args()
    settings = [(2, [4, 8]), (8, [4, 8]), (2, [32, 64]), (8, [32, 64])]
    models = ["tiny"] if args.quick else ["tiny", "mid"]
    print("| model | params (M) | clients/round | ranks | after load (MiB) | peak (MiB) | added |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        for clients, ranks in settings:
            r = measure(model, clients, ranks)
            print(
                f"| {r['model']} | {r['params_M']} | {r['clients_per_round']} | {r['ranks']} | "
                f"{r['loaded_MiB']} | {r['peak_MiB']} | {r['added_MiB']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
