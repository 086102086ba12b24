#!/usr/bin/env python
"""Large-message check of the Flower deployment (docs/flower.md): FLoRA's train messages > 600 MB.

FLoRA sends the merged base weights of the adapted modules with every Flower train message from
round 2 on; for a billion-parameter model that is more than gRPC's usual 512 MB limit. This
script builds, offline, a random RoBERTa whose adapted weights (``query``, ``key``, ``value`` of
every layer, float32) exceed 600 MB, runs 2 FLoRA rounds with one client through
``scripts/flower_local.sh`` (SuperLink + SuperNode on loopback, TLS and SuperNode authentication
unless ``--insecure``), and reports the message size, the wall time, the peak memory of the
deployment's processes and PASS/FAIL (exit status 0/1). Not part of CI: it needs a few GB of
memory and a few minutes.

Flower 1.41 cuts arrays into 5 MB chunks, so no gRPC/HTTP message limit is hit. Measured on a
shared 2-core machine (654 MB per train message, TLS): the rounds go through with the SuperLink's
state in memory (the default of ``flower_local.sh``); with ``--sqlite`` (``flower-superlink
--database FILE``) the SuperLink's SQLite stayed locked past its 5 s busy timeout while storing
the message and the ServerApp failed ("database is locked").

    .venv/bin/python scripts/large_message_check.py [--layers 13] [--hidden 2048] [--insecure]
                                                    [--sqlite] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "space", "rocket", "orbit", "launch", "car", "engine", "wheel", "goal"]


def build_model(directory: Path, hidden: int, layers: int, intermediate: int) -> int:
    """Save a random RoBERTa classifier and its word-level tokenizer; return adapted bytes."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=32,
    ).save_pretrained(directory)
    config = RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        intermediate_size=intermediate,
        max_position_embeddings=40,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        num_labels=3,
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config)
    model.save_pretrained(directory)
    adapted = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("query", "key", "value")
    ]
    return sum(w.numel() * 4 for w in adapted)  # float32 on the wire


def write_data(path: Path, rows: int) -> None:
    """A CSV of short sentences with 3 classes."""
    lines = ["text,label"]
    for i in range(rows):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 5)]
        lines.append(f"{' '.join(words)},{i % 3}")
    path.write_text("\n".join(lines) + "\n")


def write_config(path: Path, model: Path, data: Path) -> None:
    """2 FLoRA rounds, one client: round 2's train message carries the merged base weights."""
    path.write_text(
        "method: flora\n"
        "dtype: float32\n"
        f"task: {{name: text-classification, model: '{model}', dataset: '{data}'}}\n"
        "lora: {target_modules: [query, key, value]}\n"
        "fl: {num_clients: 1, clients_per_round: 1, rounds: 2, rank_levels: [4]}\n"
        "data: {partition: iid, min_samples: 1}\n"
        "train: {batch_size: 8}\n"
        "eval: {batch_size: 8}\n"
        "output: {plots: false}\n"
    )


class PeakMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_total = 0
        self.peak_process = (0, "")
        self._done = threading.Event()

    def run(self) -> None:
        """Sample until :meth:`stop` (or until the root process is gone)."""
        import psutil

        root = psutil.Process(self.pid)
        while not self._done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline()[:2])[-60:]
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peak_process[0]:
                    self.peak_process = (rss, name)
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.interval)

    def stop(self) -> None:
        """Stop sampling."""
        self._done.set()


def main() -> int:
    """Build, run, measure, report; 0 when the rounds went through."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048, help="RoBERTa hidden size")
    parser.add_argument("--layers", type=int, default=13, help="RoBERTa layers")
    parser.add_argument("--intermediate", type=int, default=256, help="MLP width (not adapted)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temp dir)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode auth")
    parser.add_argument(
        "--sqlite", action="store_true", help="SuperLink state in SQLite (default: in memory)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="raflora-large-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adapted = build_model(work / "model", args.hidden, args.layers, args.intermediate)
    write_data(work / "data.csv", 24)
    write_config(work / "large.yaml", work / "model", work / "data.csv")
    build_seconds = time.perf_counter() - t0
    print(f"adapted weights: {adapted / 1e6:.0f} MB ({adapted / 2**20:.0f} MiB) in float32")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAFLORA_FLOWER_WORKDIR": str(work / "flower"),
    }
    env.pop("RAFLORA_FLOWER_DATABASE", None)
    if args.sqlite:
        env["RAFLORA_FLOWER_DATABASE"] = str(work / "flower" / "state.db")
    command = ["bash", str(ROOT / "scripts" / "flower_local.sh")]
    command += ["--insecure"] if args.insecure else []
    command += [str(work / "large.yaml"), "1", str(work / "run")]
    t1 = time.perf_counter()
    with (work / "deployment.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        monitor = PeakMemory(proc.pid)
        monitor.start()
        try:
            returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            returncode = proc.wait(timeout=60)
        monitor.stop()
    seconds = time.perf_counter() - t1
    rows = []
    metrics = work / "run" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    passed = returncode == 0 and len(rows) == 2 and all(r["accepted"] == 1 for r in rows)
    result = {
        "adapted_bytes": adapted,
        "message_bytes_round_2_at_least": adapted,
        "tls": not args.insecure,
        "superlink_state": "sqlite" if args.sqlite else "memory",
        "returncode": returncode,
        "rounds": len(rows),
        "accepted": [r["accepted"] for r in rows],
        "rejected_reasons": [r["rejected_reasons"] for r in rows],
        "build_seconds": round(build_seconds, 1),
        "deployment_seconds": round(seconds, 1),
        "peak_rss_all_processes_bytes": monitor.peak_total,
        "peak_rss_one_process_bytes": monitor.peak_process[0],
        "peak_rss_one_process": monitor.peak_process[1],
        "passed": passed,
    }
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"{'PASS' if passed else 'FAIL'}: FLoRA deployment round with {adapted / 1e6:.0f} MB of "
        f"base weights per train message, {seconds:.0f} s, peak RSS "
        f"{monitor.peak_total / 2**30:.1f} GiB (all processes); log: {work / 'deployment.log'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
