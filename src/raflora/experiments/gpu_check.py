"""End-to-end checks of the engine on a device and in each dtype (``scripts/gpu_check.sh``).

``python -m raflora.experiments.gpu_check [--device cuda|cpu]`` builds a tiny random Llama
(byte-level BPE tokenizer trained in-process, GSM8K-style data) and a tiny random ViT
(coloured-noise images) in a temporary directory — fully offline, nothing read from the network or
from ``tests/`` — and
prints one ``PASS name (details)`` or ``FAIL name (reason)`` line per check:

``run MODEL/METHOD/DTYPE``
    Every registered method × {float32, bfloat16} × {llama, vit}: :data:`ROUNDS` rounds through
    :func:`~raflora.engine.run_local` on the device. Metrics are finite; every global state the
    aggregator receives or returns (round 0's included) has all its tensors — factors, heads,
    FLoRA's merged delta — on the device and in float32; the checkpoint's state is float32; the
    PEFT adapter is written. FedIT needs equal ranks, so it runs with one rank level.
``export MODEL/METHOD/DTYPE``
    The run's ``adapter/`` loaded with ``PeftModel.from_pretrained`` onto a fresh base model on
    the device gives the engine's final ``eval_loss`` with the task's own evaluation, within
    :data:`EXPORT_RTOL` (relative) and within :data:`EFFECT_RTOL` of the adapter's effect on
    the loss.
``resume MODEL/METHOD/DTYPE``
    ``raflora run`` in a subprocess (``torch.use_deterministic_algorithms`` and
    ``CUBLAS_WORKSPACE_CONFIG`` set) is killed with SIGKILL once round 1 is checkpointed, then
    continued with ``--resume``; its ``metrics.jsonl`` (without ``time``) and adapter must equal
    those of an uninterrupted run — bit for bit, or within :data:`RESUME_RTOL` on CUDA, where the
    difference is printed.
``quantized llama/nf4/raflora,flora``
    The tiny Llama with ``task.quantization: nf4`` on the device: 4-bit adapted layers there,
    finite metrics, float32 states, FLoRA's merges kept as the float32 residual beside the
    4-bit layers; the adapted weights' memory against float32 is printed.

``concurrent llama K=1 vs K=8``
    ``train.concurrent_clients`` (docs/concurrency.md) on the device: the tiny Llama, 8 clients
    of one round trained one after another and then 8 at once (answers of different lengths
    padded in the group) — every client's upload within :data:`CONCURRENT_RTOL` (relative) of
    its sequential one; the largest difference is printed.
``concurrent speed bert-6x384 / bert-12x768``
    CUDA only (skipped otherwise): the client phase of a round of 8 clients (random-weight BERT
    text classification, batch 16, 32 tokens) at K = 1 and K = 8; the speed-up is printed and
    must reach :data:`CONCURRENT_TARGET` on the ~100M-parameter 12×768 model.

The exit code is 1 if any check fails. Every check is also a function the ``gpu``-marked tests
call (``tests/test_gpu.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from raflora.config import RunConfig
    from raflora.engine.federation import Federation
    from raflora.methods import Aggregator, GlobalState

__all__ = [
    "DTYPES",
    "EFFECT_RTOL",
    "EXPORT_RTOL",
    "MODELS",
    "RESUME_RTOL",
    "ROUNDS",
    "Assets",
    "CheckResult",
    "build_assets",
    "check_concurrent_equal",
    "check_concurrent_speed",
    "check_quantized",
    "check_resume",
    "check_run",
    "client_phase",
    "main",
    "make_bert",
    "run_checks",
    "run_config",
    "state_problems",
]

ROUNDS = 3
MODELS = ("llama", "vit")
DTYPES = ("float32", "bfloat16")
EXPORT_RTOL = {"float32": 1e-4, "bfloat16": 1e-2}
"""Relative tolerance of the PEFT re-evaluation's ``eval_loss``.

bfloat16: PEFT keeps the loaded LoRA factors in float32 and adds ``B A x`` to a bf16 base
output, while FLoRA's engine model holds ``bf16(W_0 + ΔW)``; a bf16 rounding (2⁻⁸ relative) of
the adapted weights moves a tiny model's loss by well under 1 %.
"""
EFFECT_RTOL = 0.1
"""The PEFT model's ``eval_loss`` must also be within this fraction of the adapter's effect
``|eval_loss(base) − eval_loss(engine)|`` from the engine's (so a lost adapter cannot pass)."""
CONCURRENT_RTOL = {"cpu": 1e-5, "cuda": 1e-4}
"""Largest relative difference between a client's upload trained in a group of 8 and alone
(float32, dropout off): the batched products sum in another order (on the CPU they are
usually bit-identical; CUDA picks kernels by the batch's size)."""
CONCURRENT_TARGET = 3.0
"""Speed-up of the client phase at K = 8 over K = 1 the ~100M-parameter model must reach."""
RESUME_RTOL = 1e-4
"""Largest relative difference accepted between a resumed and an uninterrupted run on CUDA
when they are not bit-identical (a kernel without a deterministic implementation); on the CPU
they must be bit-identical."""

DETERMINISTIC_MAIN = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "from raflora.cli import main; sys.exit(main(sys.argv[1:]))"
)
"""``python -c`` entry point of the resume check's runs: the CLI with deterministic kernels."""


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome; ``str()`` is its ``PASS``/``FAIL`` line."""

    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name} ({self.detail})"


# --------------------------------------------------------------------------------------------
# Tiny offline models and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    """Model and dataset directories per model kind (``"llama"``, ``"vit"``)."""

    models: dict[str, Path]
    datasets: dict[str, Path]


def _gsm8k_rows(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        rows.append(
            {
                "question": f"Natalia sold {a} clips in April and {b} clips in May. How many?",
                "answer": f"Natalia sold {a}+{b} = {a + b} clips.\n#### {a + b}",
            }
        )
    return rows


def make_llama(model_dir: Path, data_dir: Path, *, seed: int = 0) -> None:
    """A random 2-layer ``LlamaForCausalLM`` and GSM8K-style data.

    ``data_dir`` gets ``train.jsonl``/``test.jsonl`` (``question``/``answer`` with ``#### n``);
    the byte-level BPE tokenizer is trained on that data.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = np.random.default_rng(seed)
    splits = {"train": _gsm8k_rows(24, rng), "test": _gsm8k_rows(8, rng)}
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (data_dir / f"{split}.jsonl").write_text(text, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [value for rows in splits.values() for row in rows for value in row.values()],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", model_max_length=256
    )
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(model_dir)


def make_vit(model_dir: Path, data_dir: Path, *, num_classes: int = 3, seed: int = 0) -> None:
    """A random 2-layer ViT (32×32 images) and a dataset of class-coloured noise images.

    The dataset is saved with ``save_to_disk`` with CIFAR-100's columns ``img``/``fine_label``.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_classes,  # type: ignore[call-arg]  # a PretrainedConfig keyword
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    names = [f"class{c}" for c in range(num_classes)]
    features = Features({"img": Image(), "fine_label": ClassLabel(names=names)})
    splits = {}
    for split, n in (("train", 32), ("test", 12)):
        labels = [i % num_classes for i in range(n)]
        images = [
            PILImage.fromarray(
                np.clip(40 + 80 * y + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            )
            for y in labels
        ]
        splits[split] = Dataset.from_dict({"img": images, "fine_label": labels}, features=features)
    DatasetDict(splits).save_to_disk(str(data_dir))


_BUILDERS: dict[str, Callable[[Path, Path], None]] = {"llama": make_llama, "vit": make_vit}


def build_assets(root: Path, models: Iterable[str] = MODELS) -> Assets:
    """Write the tiny models and datasets of ``models`` under ``root``."""
    assets = Assets({}, {})
    for kind in models:
        assets.models[kind], assets.datasets[kind] = root / kind / "model", root / kind / "data"
        _BUILDERS[kind](assets.models[kind], assets.datasets[kind])
    return assets


def run_config(
    assets: Assets, model: str, method: str, dtype: str, device: str, *, seed: int = 0
) -> dict[str, Any]:
    """The check's run configuration (a plain dict, as in a YAML file).

    Four clients, two per round, rank levels {2, 4, 8} ({4} for FedIT, which needs equal ranks).
    With seed 0 the client ranks are [4, 8, 8, 4] and round 2 samples clients 0 and 3 (both
    rank 4), so raFLoRA's top partition (4, 8] is empty and carried over from the state: the
    case that mixes the carried state with new updates.
    """
    from raflora.methods.registry import unsupported_reason

    if model == "llama":
        task: dict[str, Any] = {
            "name": "math-reasoning",
            "max_length": 64,
            "num_eval_samples": 4,
            "options": {"max_new_tokens": 4},
        }
    else:
        task = {"name": "image-classification"}
    task.update(model=str(assets.models[model]), dataset=str(assets.datasets[model]))
    return {
        "method": method,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "task": task,
        "fl": {
            "num_clients": 4,
            "clients_per_round": 2,
            "rounds": ROUNDS,
            # a method that needs one rank level (FedIT) runs with [4]
            "rank_levels": [4] if unsupported_reason(method, [2, 4, 8]) else [2, 4, 8],
        },
        "data": {"partition": "iid", "min_samples": 1},
        "train": {"lr": 1e-2, "batch_size": 4},
        "eval": {"every": 1, "batch_size": 8},
        "output": {"plots": False},
    }


# --------------------------------------------------------------------------------------------
# Check 1: every method runs on the device, state on the device in float32
# --------------------------------------------------------------------------------------------


def _state_tensors(state: GlobalState) -> Iterable[tuple[str, Tensor]]:
    for name, (B, A) in state.factors.items():
        yield f"factors[{name}].B", B
        yield f"factors[{name}].A", A
    for name, value in state.dense.items():
        yield f"dense[{name}]", value
    for name, value in state.base_delta.items():
        yield f"base_delta[{name}]", value
    from raflora.methods.base import map_tensors

    found: list[Tensor] = []

    def keep(tensor: Tensor) -> Tensor:
        found.append(tensor)
        return tensor

    map_tensors(state.extras, keep)  # the method's own state: ILoRA's control variate …
    for tensor in found:
        yield "extras", tensor


def state_problems(state: GlobalState, device: torch.device | None, where: str = "") -> list[str]:
    """Tensors of ``state`` that are not float32, or not on ``device`` (``None``: any device).

    Returns one short line per kind of problem, naming the first offending tensor.
    """
    found: dict[str, str] = {}
    for name, tensor in _state_tensors(state):
        if device is not None and tensor.device.type != device.type:
            found.setdefault("device", f"{where}{name} on {tensor.device}, not {device.type}")
        if tensor.dtype != torch.float32:
            found.setdefault("dtype", f"{where}{name} is {tensor.dtype}, not float32")
    return list(found.values())


def _probe_states(aggregator: Aggregator, device: torch.device, problems: list[str]) -> None:
    """Check every state ``aggregator.aggregate`` receives and returns (the run's own calls)."""
    inner = aggregator.aggregate

    def aggregate(state: GlobalState, *args: Any, **kwargs: Any) -> Any:
        problems.extend(state_problems(state, device, f"state before round {state.round + 1}: "))
        outcome = inner(state, *args, **kwargs)
        problems.extend(
            state_problems(outcome.state, device, f"state after round {state.round + 1}: ")
        )
        return outcome

    # On this instance only: the run is otherwise untouched.
    setattr(aggregator, "aggregate", aggregate)  # noqa: B010


def _metric_problems(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    problems = []
    for row in metrics:
        for key in ("train_loss", "eval_loss", "accuracy", "higher_rank_energy"):
            value = row.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"round {row.get('round')}: {key} = {value}")
    if len(metrics) != ROUNDS:
        problems.append(f"{len(metrics)} metrics rows, not {ROUNDS}")
    return problems


def _error(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class _InterruptionError(Exception):
    """Ends the first part of a run after round :data:`RESUME_AFTER` (an interruption)."""


RESUME_AFTER = ROUNDS - 1
"""The run check stops after this round and resumes in a fresh federation (state from the
checkpoint, which must come back onto the device)."""


def _stop_after(round_index: int) -> Callable[[dict[str, Any]], None]:
    def on_round(row: dict[str, Any]) -> None:
        if row["round"] == round_index:
            raise _InterruptionError

    return on_round


def _federation(config: RunConfig, problems: list[str]) -> Federation:
    """The run's federation with every global state its aggregator sees checked."""
    from raflora.engine import build_federation

    fed = build_federation(config)
    _probe_states(fed.aggregator, fed.device, problems)
    return fed


def check_run(
    assets: Assets, model: str, method: str, dtype: str, device: str, work: Path
) -> tuple[CheckResult, CheckResult]:
    """Check 1 (``run``) and check 3 (``export``) for one model, method and dtype.

    The run stops after round :data:`RESUME_AFTER` and is resumed in a fresh federation for
    the last round, so the state loaded from the checkpoint is checked too.

    Parameters
    ----------
    assets : Assets
        From :func:`build_assets`.
    model, method, dtype, device : str
        ``llama``/``vit``, a registered method, ``float32``/``bfloat16``, ``cuda``/``cpu``.
    work : Path
        The run directory is ``work / MODEL-METHOD-DTYPE`` (a previous one is replaced).
    """
    from raflora.config import config_from_dict
    from raflora.engine import load_checkpoint, run_local

    label = f"{model}/{method}/{dtype}"
    t0 = time.perf_counter()
    run_dir = work / label.replace("/", "-")
    problems: list[str] = []
    try:
        config = config_from_dict(run_config(assets, model, method, dtype, device))
        fed = _federation(config, problems)
        with contextlib.suppress(_InterruptionError):
            run_local(
                config,
                run_dir,
                progress=False,
                fed=fed,
                overwrite=True,
                on_round=_stop_after(RESUME_AFTER),
            )
        fed = _federation(config, problems)
        result = run_local(config, run_dir, resume=True, progress=False, fed=fed)
        problems += _metric_problems(result.metrics)
        problems += state_problems(load_checkpoint(run_dir).state, None, "checkpoint: ")
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (run_dir / "adapter" / name).is_file():
                problems.append(f"no adapter/{name}")
    except Exception as err:
        failed = CheckResult(f"run {label}", False, "; ".join([*problems[:2], _error(err)]))
        return failed, CheckResult(f"export {label}", False, "no finished run")
    seconds = time.perf_counter() - t0
    row = result.metrics[-1]
    detail = (
        "; ".join(problems[:3])
        if problems
        else f"{ROUNDS} rounds (resumed after {RESUME_AFTER}) in {seconds:.1f} s, state on "
        f"{fed.device.type} in float32, eval_loss {row['eval_loss']:.4f}, higher-rank energy "
        f"{row['higher_rank_energy']:.3f}"
    )
    ran = CheckResult(f"run {label}", not problems, detail)
    return ran, check_export(fed, run_dir, result.summary, label)


# --------------------------------------------------------------------------------------------
# Check 3: the exported adapter reproduces the engine's eval_loss under PEFT
# --------------------------------------------------------------------------------------------


def check_export(
    fed: Federation, run_dir: Path, summary: Mapping[str, Any], label: str
) -> CheckResult:
    """Load ``run_dir/adapter`` with PEFT on a fresh base model and re-evaluate it."""
    from peft import PeftModel

    name = f"export {label}"
    batch_size = fed.config.eval.batch_size
    try:
        base = fed.task.load_base_model().to(device=fed.device, dtype=fed.dtype).eval()
        with torch.no_grad():
            untrained = float(fed.task.evaluate(base, batch_size, fed.device)["eval_loss"])
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
        model.eval()
        with torch.no_grad():
            peft = float(fed.task.evaluate(model, batch_size, fed.device)["eval_loss"])
    except Exception as err:
        return CheckResult(name, False, _error(err))
    engine = float(summary["final_eval_loss"])
    rel = abs(peft - engine) / max(abs(engine), 1e-12)
    tol = EXPORT_RTOL[fed.config.dtype]
    detail = (
        f"eval_loss engine {engine:.6f}, PEFT {peft:.6f}, rel. diff {rel:.1e} (tol {tol:g}); "
        f"base model {untrained:.6f}"
    )
    # A tiny model's loss may move little in a few rounds: an adapter lost on the way would
    # then still be within tol, so PEFT must also reproduce the adapter's effect on the loss.
    effect = abs(untrained - engine)
    if abs(peft - engine) > EFFECT_RTOL * effect:
        return CheckResult(
            name, False, f"{detail}: PEFT misses over {EFFECT_RTOL:.0%} of the adapter's effect"
        )
    return CheckResult(name, rel <= tol, detail)


# --------------------------------------------------------------------------------------------
# Check 2: kill -9 after round 1, --resume, same metrics and adapter
# --------------------------------------------------------------------------------------------


def _cli(args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DETERMINISTIC_MAIN, *args],
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], what: str, timeout: float) -> None:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail[0]}")


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines if line]


def _kill_after_round_one(proc: subprocess.Popen[str], run_dir: Path, timeout: float) -> None:
    """SIGKILL ``proc`` as soon as round 1's metrics line (written after its checkpoint) exists."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not metrics.is_file() or not metrics.stat().st_size:
        if proc.poll() is not None:
            _finish(proc, "the run to be killed", timeout)
            raise RuntimeError("the run to be killed ended before round 1 was saved")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"round 1 not saved within {timeout:.0f} s")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run finished (exit {proc.returncode}) before SIGKILL reached it")


def _max_rel_diff(a: Any, b: Any) -> float:
    """Largest relative difference between the numbers of two equal-shaped JSON values."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((_max_rel_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max((_max_rel_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) / max(abs(a), abs(b), 1e-12) if a != b else 0.0
    return 0.0 if a == b else math.inf


def _adapter_diff(a: Path, b: Path) -> float:
    """Largest relative difference between two adapters' tensors (``inf``: different keys)."""
    from safetensors.torch import load_file

    ta, tb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    if ta.keys() != tb.keys():
        return math.inf
    worst = 0.0
    for key, x in ta.items():
        y = tb[key]
        if x.shape != y.shape:
            return math.inf
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-12)
        worst = max(worst, float((x.double() - y.double()).abs().max()) / scale if x.numel() else 0)
    return worst


def check_resume(
    assets: Assets,
    device: str,
    work: Path,
    *,
    model: str = "llama",
    method: str = "raflora",
    dtype: str = "float32",
    timeout: float = 240.0,
) -> CheckResult:
    """Check 2: a CLI run killed with SIGKILL after round 1, then resumed, equals a whole run.

    Compared: ``metrics.jsonl`` without ``time``, and the adapter's tensors.
    """
    import yaml

    label = f"{model}/{method}/{dtype}"
    name = f"resume {label}"
    t0 = time.perf_counter()
    root = work / f"resume-{label.replace('/', '-')}"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(assets, model, method, dtype, device)))
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_OFFLINE"] = "1"
    full, killed = root / "uninterrupted", root / "killed"
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        started.append(_cli(args, env))
        return started[-1]

    try:
        reference = start("run", str(config), "--out", str(full), "--quiet", "--overwrite")
        victim = start("run", str(config), "--out", str(killed), "--quiet", "--overwrite")
        _kill_after_round_one(victim, killed, timeout)
        saved = len(_rows(killed))
        _finish(start("run", "--resume", str(killed), "--quiet"), "--resume", timeout)
        _finish(reference, "the uninterrupted run", timeout)
        metrics_diff = _max_rel_diff(_rows(full), _rows(killed))
        adapter_diff = _adapter_diff(full, killed)
    except Exception as err:
        return CheckResult(name, False, _error(err))
    finally:
        for proc in started:  # only after a failure is one still running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    where = f"killed after {saved} saved round(s), resumed to {ROUNDS}"
    seconds = f"{time.perf_counter() - t0:.1f} s"
    if metrics_diff == 0.0 and adapter_diff == 0.0:
        return CheckResult(name, True, f"{where}; metrics and adapter bit-identical; {seconds}")
    tol = RESUME_RTOL if device != "cpu" else 0.0
    worst = max(metrics_diff, adapter_diff)
    detail = (
        f"{where}; not bit-identical: max rel. diff metrics {metrics_diff:.1e}, adapter "
        f"{adapter_diff:.1e} (tol {tol:g}); {seconds}"
    )
    return CheckResult(name, worst <= tol, detail)


# --------------------------------------------------------------------------------------------
# Check 4: a 4-bit (nf4) base on the device (task.quantization, docs/quantization.md)
# --------------------------------------------------------------------------------------------


def check_quantized(
    assets: Assets,
    device: str,
    work: Path,
    *,
    model: str = "llama",
    quantization: str = "nf4",
    methods: Sequence[str] = ("raflora", "flora"),
) -> CheckResult:
    """Check 4: each method over a ``quantization`` base on ``device``: the adapted layers are
    bitsandbytes layers on the device, the run's metrics finite and its states float32 on the
    device, FLoRA's merges the float32 residual beside the quantised layers (equal to the
    state's ``base_delta``); the detail gives the adapted weights' memory against float32.
    """
    from raflora.adapters.quantized import RESIDUAL, is_quantized, layer_bytes
    from raflora.config import config_from_dict
    from raflora.engine import load_checkpoint, run_local

    name = f"quantized {model}/{quantization}/{','.join(methods)}"
    t0 = time.perf_counter()
    problems: list[str] = []
    ratio = 0.0
    try:
        for method in methods:
            data = run_config(assets, model, method, "float32", device)
            data["task"]["quantization"] = quantization
            config = config_from_dict(data)
            fed = _federation(config, problems)
            root: Any = fed.bank.model.get_base_model()
            layers: dict[str, Any] = {
                n: root.get_submodule(n).get_base_layer() for n in fed.bank.module_shapes()
            }
            plain = [n for n, layer in layers.items() if not is_quantized(layer)]
            away = [n for n, layer in layers.items() if layer.weight.device.type != device]
            problems += [f"{method}: {n} not quantised" for n in plain[:1]]
            problems += [f"{method}: {n} not on {device}" for n in away[:1]]
            stored = sum(layer_bytes(layer) for layer in layers.values())
            ratio = sum(4 * d * n for d, n in fed.bank.module_shapes().values()) / stored
            run_dir = work / f"quantized-{model}-{method}"
            result = run_local(config, run_dir, progress=False, fed=fed, overwrite=True)
            problems += [f"{method}: {p}" for p in _metric_problems(result.metrics)]
            state = load_checkpoint(run_dir).state
            for module, delta in state.base_delta.items():
                kept = getattr(layers[module], RESIDUAL, None)
                if kept is None or not torch.equal(kept, delta.to(kept.device)):
                    problems.append(f"{method}: {module}'s residual is not the merged delta")
                    break
    except Exception as err:
        return CheckResult(name, False, "; ".join([*problems[:2], _error(err)]))
    detail = (
        "; ".join(problems[:3])
        if problems
        else f"adapted weights {ratio:.2f}× smaller than float32, {ROUNDS} rounds each, "
        f"merges in a float32 residual; {time.perf_counter() - t0:.1f} s"
    )
    return CheckResult(name, not problems, detail)


# --------------------------------------------------------------------------------------------
# The whole check
# --------------------------------------------------------------------------------------------


def run_checks(
    device: str,
    work: Path,
    *,
    models: Sequence[str] = MODELS,
    methods: Sequence[str] | None = None,
    dtypes: Sequence[str] = DTYPES,
    resume: bool = True,
    concurrent: bool = True,
    report: Callable[[CheckResult], None] = print,
) -> list[CheckResult]:
    """Build the assets under ``work`` and run every check, reporting each result as it ends."""
    from raflora.methods import available_methods

    assets = build_assets(work / "assets", models)
    results: list[CheckResult] = []

    def keep(result: CheckResult) -> None:
        results.append(result)
        report(result)

    for model in models:
        for method in methods or available_methods():
            for dtype in dtypes:
                for result in check_run(assets, model, method, dtype, device, work / "runs"):
                    keep(result)
    if resume:
        keep(check_resume(assets, device, work, model=models[0]))
    if "llama" in models:
        keep(check_quantized(assets, device, work / "runs"))
    if concurrent and "llama" in models:
        keep(check_concurrent_equal(assets, device))
    if concurrent:
        for layers, width in ((6, 384), (12, 768)):
            keep(check_concurrent_speed(device, work / "bert", layers, width))
    return results


# --------------------------------------------------------------------------------------------
# Concurrent clients: the same uploads in a group, and the speed-up on the device
# --------------------------------------------------------------------------------------------

_WORDS = [
    "the",
    "a",
    "space",
    "rocket",
    "orbit",
    "launch",
    "car",
    "engine",
    "wheel",
    "drive",
    "hockey",
    "goal",
    "team",
    "season",
    "game",
    "god",
    "church",
    "belief",
    "computer",
    "graphics",
    "image",
    "file",
    "windows",
    "driver",
    "printer",
    "disk",
    "sale",
    "price",
    "offer",
    "gun",
    "law",
    "right",
    "government",
    "doctor",
    "disease",
    "patient",
    "medicine",
]


def make_bert(
    model_dir: Path, data_dir: Path, *, layers: int = 6, width: int = 384, seed: int = 0
) -> None:
    """A random BERT (``layers`` × ``width``, 12 heads, MLP 4× wide, no dropout, 20 classes)
    with a word-level tokenizer, and ``data_dir/texts.csv``: 2000 texts of 40 words (32 tokens
    after truncation).
    """
    import csv

    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(_WORDS)], trainers.WordLevelTrainer(special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    tokenizer.save_pretrained(model_dir)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=4 * width,
        num_labels=20,  # type: ignore[call-arg]  # a PretrainedConfig keyword
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertForSequenceClassification(config).save_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "texts.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        for i in range(2000):
            writer.writerow({"text": " ".join(rng.choice(_WORDS, 40)), "label": i % 20})


def bert_config(model_dir: Path, data_dir: Path, device: str, clients: int) -> dict[str, Any]:
    """Text classification on :func:`make_bert`'s model: 50 clients, ``clients`` per round,
    batch 16, 32 tokens, the paper's rank levels 8–64, LoRA on every encoder linear layer.
    """
    return {
        "method": "raflora",
        "device": device,
        "task": {
            "name": "text-classification",
            "model": str(model_dir),
            "dataset": str(data_dir / "texts.csv"),
            "max_length": 32,
        },
        "fl": {
            "num_clients": 50,
            "clients_per_round": clients,
            "rounds": 1,
            "rank_levels": [8, 16, 32, 48, 64],
        },
        "data": {"partition": "iid"},
        "train": {"batch_size": 16},
        "lora": {"target_modules": ["query", "key", "value", "dense"]},
        "output": {"plots": False},
    }


def client_phase(fed: Federation, state: GlobalState, round_index: int, k: int) -> list[Any]:
    """Round ``round_index``'s client phase as ``run_round`` runs it, ``k`` clients at a time
    (``k = 1``: the sequential loop); the clients' results.
    """
    from raflora.engine.server_round import plan_round, train_clients

    return train_clients(fed, state, plan_round(fed, state, round_index), capacity=k)


def _upload_rel_diff(one: Any, other: Any) -> float:
    """Largest relative (Frobenius) difference between two uploads' factors and heads."""
    worst = 0.0
    pairs = [
        (x, y)
        for name, (B, A) in one.update.factors.items()
        for x, y in ((B, other.update.factors[name][0]), (A, other.update.factors[name][1]))
    ] + [(v, other.update.dense[k]) for k, v in one.update.dense.items()]
    for x, y in pairs:
        scale = max(float(x.double().norm()), 1e-30)
        worst = max(worst, float((x.double() - y.double()).norm()) / scale)
    return worst


def check_concurrent_equal(assets: Assets, device: str) -> CheckResult:
    """The tiny Llama's 8 clients of round 1 one after another and 8 at once: equal uploads."""
    from raflora.config import config_from_dict
    from raflora.engine import build_federation

    name = "concurrent llama K=1 vs K=8"
    t0 = time.perf_counter()
    try:
        data = run_config(assets, "llama", "raflora", "float32", device)
        data["fl"].update(num_clients=8, clients_per_round=8, rounds=1)
        data["train"].update(batch_size=2, concurrent_clients=8)
        fed = build_federation(config_from_dict(data))
        state = fed.initial_state()
        alone = {r.update.client_id: r for r in client_phase(fed, state, 1, 1)}
        grouped = client_phase(fed, state, 1, 8)
        worst = max(_upload_rel_diff(alone[r.update.client_id], r) for r in grouped)
    except Exception as err:  # a check reports, the next one runs
        return CheckResult(name, False, _error(err))
    tol = CONCURRENT_RTOL["cuda" if device.startswith("cuda") else "cpu"]
    detail = f"max relative difference {worst:.1e}, tolerance {tol:g}"
    return CheckResult(name, worst <= tol, f"{detail}, {time.perf_counter() - t0:.1f} s")


def check_concurrent_speed(device: str, work: Path, layers: int, width: int) -> CheckResult:
    """The client phase at K = 1 and K = 8 on a random BERT (CUDA only); the speed-up."""
    from raflora.config import config_from_dict
    from raflora.engine import build_federation

    name = f"concurrent speed bert-{layers}x{width}"
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return CheckResult(name, True, "skipped: CUDA only")
    try:
        root = work / f"{layers}x{width}"
        make_bert(root / "model", root / "data", layers=layers, width=width)
        fed = build_federation(
            config_from_dict(bert_config(root / "model", root / "data", device, 8))
        )
        state = fed.initial_state()
        seconds: dict[int, float] = {}
        for k in (1, 8, 1, 8):  # warm-up, then the timed pair
            torch.cuda.synchronize(fed.device)
            t0 = time.perf_counter()
            client_phase(fed, state, 1, k)
            torch.cuda.synchronize(fed.device)
            seconds[k] = time.perf_counter() - t0
        params = sum(p.numel() for p in fed.bank.model.parameters()) / 1e6
    except Exception as err:
        return CheckResult(name, False, _error(err))
    ratio = seconds[1] / seconds[8]
    target = CONCURRENT_TARGET if layers >= 12 else 1.0
    detail = (
        f"{params:.0f}M parameters: K=1 {seconds[1]:.2f} s, K=8 {seconds[8]:.2f} s, "
        f"speed-up {ratio:.2f}× (target ≥ {target:g}×)"
    )
    return CheckResult(name, ratio >= target, detail)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_check",
        description="Every method in float32 and bfloat16 on tiny offline Llama and ViT models, "
        "a SIGKILL + --resume run, and the PEFT export; one PASS/FAIL line per check.",
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a rehearsal)")
    p.add_argument("--models", default="", help="comma-separated (default: llama,vit)")
    p.add_argument("--methods", default="", help="comma-separated (default: every method)")
    p.add_argument("--dtypes", default="", help="comma-separated (default: float32,bfloat16)")
    p.add_argument("--no-resume", action="store_true", help="skip the SIGKILL + resume check")
    p.add_argument(
        "--no-concurrent", action="store_true", help="skip the concurrent-clients checks"
    )
    p.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    return p


def _quiet() -> None:
    """No library progress bars or notices: the check's lines are the output."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()


def _selection(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], list[str], list[str]]:
    """The models, methods and dtypes asked for (an unknown name is a usage error)."""
    from raflora.methods import available_methods

    chosen = []
    for option, allowed in (
        ("models", MODELS),
        ("methods", tuple(available_methods())),
        ("dtypes", DTYPES),
    ):
        names = [s for s in getattr(args, option).split(",") if s] or list(allowed)
        unknown = [s for s in names if s not in allowed]
        if unknown:
            parser.error(f"--{option}: unknown {unknown[0]!r} (choose from {', '.join(allowed)})")
        chosen.append(names)
    return chosen[0], chosen[1], chosen[2]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; print one line per check and the total time; 1 if any failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    models, methods, dtypes = _selection(parser, args)
    t0 = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"FAIL {args.device} (no CUDA device is available; --device cpu rehearses)")
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _quiet()
    with tempfile.TemporaryDirectory(prefix="raflora-gpu-check-") as tmp:
        results = run_checks(
            args.device,
            args.keep if args.keep is not None else Path(tmp),
            models=models,
            methods=methods,
            dtypes=dtypes,
            resume=not args.no_resume,
            concurrent=not args.no_concurrent,
            report=lambda r: print(r, flush=True),
        )
    failed = sum(not r.ok for r in results)
    print(
        f"{len(results) - failed} passed, {failed} failed on {args.device} in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
