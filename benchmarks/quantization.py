"""Quantised base (task.quantization) against float32 on the quickstart: memory and accuracy.

Memory: the bytes of the adapted linear layers' weights (the stored weight plus a quantised
layer's scales; biases, which stay float32, apart) and of the whole base model, as built by the
``digits`` task in float32 and with each quantisation. Accuracy: the quickstart
(configs/quickstart.yaml, raFLoRA, 40 rounds, seed 0) in float32 and in nf4, and FLoRA (its
merges kept as a float32 residual beside the 4-bit layers) in both; final accuracy side by side.

Usage::

    .venv/bin/python benchmarks/quantization.py            # the table in docs/quantization.md
    .venv/bin/python benchmarks/quantization.py --quick    # 4 rounds, raFLoRA only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from raflora.adapters.quantized import is_quantized, layer_bytes
from raflora.config import load_config
from raflora.engine import run_local
from raflora.tasks import build_task
from raflora.tasks.digits import TARGET_MODULES

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def model_bytes(quantization: str) -> tuple[int, int]:
    """``(adapted linear weights, whole model)`` bytes of the digits base model."""
    config = load_config(QUICKSTART, [f"task.quantization={quantization}"])
    model = build_task(config).model
    adapted = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGET_MODULES:
            assert quantization == "none" or is_quantized(module), name
            adapted += layer_bytes(module)
    whole = sum(layer_bytes(m) for m in model.modules() if is_quantized(m))
    whole += sum(
        p.numel() * p.element_size()
        for m in model.modules()
        if not is_quantized(m)
        for p in m.parameters(recurse=False)
    )
    whole += sum(  # a quantised layer's bias
        m.bias.numel() * m.bias.element_size()
        for m in model.modules()
        if is_quantized(m) and m.bias is not None
    )
    return adapted, whole


def final_accuracy(method: str, quantization: str, rounds: int) -> tuple[float, float]:
    """Final accuracy and wall seconds of the quickstart run."""
    config = load_config(
        QUICKSTART,
        [f"method={method}", f"task.quantization={quantization}", f"fl.rounds={rounds}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_local(config, Path(tmp) / "run", progress=False)
        return float(result.summary["final_accuracy"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds, raFLoRA only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| base | adapted linear weights (bytes) | ratio | whole model (bytes) | ratio |")
    print("|---|---:|---:|---:|---:|")
    ref_adapted, ref_whole = model_bytes("none")
    for quantization in ("none", "nf4", "fp4", "int8"):
        adapted, whole = (
            model_bytes(quantization)
            if quantization != "none"
            else (
                ref_adapted,
                ref_whole,
            )
        )
        print(
            f"| {quantization} | {adapted:,} | {ref_adapted / adapted:.2f}× | {whole:,} | "
            f"{ref_whole / whole:.2f}× |",
            flush=True,
        )
    rounds = 4 if args.quick else 40
    methods = ["raflora"] if args.quick else ["raflora", "flora"]
    print()
    print("| method | float32 acc. (%) | nf4 acc. (%) | nf4 − float32 (points) | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for method in methods:
        acc32, t32 = final_accuracy(method, "none", rounds)
        acc4, t4 = final_accuracy(method, "nf4", rounds)
        print(
            f"| {method} | {100 * acc32:.1f} | {100 * acc4:.1f} | {100 * (acc4 - acc32):+.1f} | "
            f"{t32:.0f} / {t4:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
