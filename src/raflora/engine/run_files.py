"""The run directory's files: open a run, record a round, finish it (local and Flower engines).

A run directory has one writer (:func:`lock_run_dir`). :func:`open_run` prepares it for a new or
resumed run (``config.yaml``, ``partition.json``, the checkpoint loaded on resume, ``metrics.jsonl``
rewritten to mirror it); after each round :func:`record_round` replaces the checkpoint atomically
and appends the round's metrics line, so a killed run loses nothing it finished;
:func:`finish_run` writes the summary, the plots and the final PEFT adapter.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raflora.adapters import adapter_name, base_weights
from raflora.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    environment_problems,
    load_config,
    require_validated,
    save_config,
)
from raflora.diagnostics import EnergyReport, module_energy_row
from raflora.engine.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from raflora.engine.client_states import CLIENTS_DIR, ClientStates
from raflora.engine.export import write_adapter
from raflora.engine.federation import EngineError, Federation, build_federation
from raflora.engine.private_round import start_privacy
from raflora.engine.rundir import RunLock, atomic_write_bytes, remove_leftovers, writing
from raflora.methods import GlobalState
from raflora.report import (
    ENERGY_FILE,
    append_energy,
    append_metrics,
    summarize,
    truncate_jsonl,
    write_run_plots,
)
from raflora.report.provenance import ENVIRONMENT_FILE, add_session, session_info
from raflora.report.tensorboard import TENSORBOARD_DIR, spectrum_shares, start_session, write_round

__all__ = [
    "METRICS_FILE",
    "RUN_FILES",
    "SUMMARY_FILE",
    "RunResult",
    "RunStart",
    "adapter_meta",
    "check_config",
    "check_resume_config",
    "clear_run_dir",
    "config_difference",
    "finish_run",
    "lock_run_dir",
    "locked_run",
    "make_checkpoint",
    "open_run",
    "prepare_run_dir",
    "record_round",
    "saved_rounds",
]


METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class RunResult:
    """A finished run: where it is and what it measured."""

    run_dir: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]


def adapter_meta(fed: Federation) -> dict[str, Any]:
    """What :func:`~raflora.engine.export.write_adapter` needs, kept in the checkpoint."""
    peft_config = fed.bank.config(fed.aggregator.r_max)
    target = peft_config.target_modules
    return {
        "model_id": fed.task.model_id,
        "task": fed.task.name,
        "target_modules": sorted(target) if isinstance(target, set) else target,
        "modules_to_save": fed.bank.modules_to_save,
        "task_type": fed.task.task_type,
        "quantization": fed.config.task.quantization,  # export records the base it needs
        **_bitsandbytes_config(fed),
    }


def _bitsandbytes_config(fed: Federation) -> dict[str, Any]:
    """``{"bitsandbytes_config": …}`` as the quantised base was loaded (its compute dtype, the
    modules left unquantised), read from the model's own config; empty for a float base.
    """
    if fed.config.task.quantization == "none":
        return {}
    base = fed.bank.model.get_base_model()
    quant = getattr(getattr(base, "config", None), "quantization_config", None)
    if quant is None:
        return {}
    text = quant.to_json_string() if hasattr(quant, "to_json_string") else json.dumps(quant)
    return {"bitsandbytes_config": json.loads(text)}


def make_checkpoint(
    fed: Federation, state: GlobalState, metrics: list[dict[str, Any]], wall: float
) -> Checkpoint:
    """The checkpoint after ``len(metrics)`` rounds (with the merged base weights of a method
    that merges a residual into them: FLoRA, FedEx-LoRA).
    """
    merges = bool(state.base_delta)
    weights = base_weights(fed.bank.model, adapter_name(fed.aggregator.r_max)) if merges else {}
    return Checkpoint(
        round=len(metrics),
        state=state,
        metrics=metrics,
        wall_seconds=wall,
        base_weights=weights,
        meta=adapter_meta(fed),
        privacy=fed.privacy.to_json() if fed.privacy is not None else None,
    )


def config_difference(run_dir: Path, config: RunConfig) -> list[str]:
    """The config sections (``output`` aside) in which ``run_dir``'s saved run differs from
    ``config``; empty when they agree or the directory saved no ``config.yaml``.
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    a, b = config_to_dict(load_config(saved)), config_to_dict(config)
    return sorted(k for k in set(a) | set(b) if k != "output" and a.get(k) != b.get(k))


def check_resume_config(run_dir: Path, config: RunConfig) -> None:
    """Refuse to resume ``run_dir`` under a configuration other than the one it was started with.

    Raises
    ------
    EngineError
        Naming the sections that differ (``output`` may differ).
    """
    diff = config_difference(run_dir, config)
    if diff:
        raise EngineError(
            f"--resume {run_dir}: the configuration differs from the run's saved config.yaml "
            f"(in: {', '.join(diff)}); resume with the same config"
        )


@dataclass
class RunStart:
    """Where a (new or resumed) run starts: the federation, state, metrics and time so far."""

    fed: Federation
    state: GlobalState
    metrics: list[dict[str, Any]]
    wall_before: float


RUN_FILES = (
    "config.yaml",
    "partition.json",
    METRICS_FILE,
    ENERGY_FILE,
    SUMMARY_FILE,
    ENVIRONMENT_FILE,
    TENSORBOARD_DIR,
    "adapter",
    "checkpoint",
    CLIENTS_DIR,
)
"""What a run writes into its directory (besides ``*.png`` plots)."""


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's files from ``run_dir`` (only the files a run writes)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for plot in run_dir.glob("*.png"):
        plot.unlink()
    for name in RUN_FILES:  # temporary files of a writer that was killed
        remove_leftovers(run_dir / name)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Create ``run_dir``; refuse to start a new run over an old one unless ``overwrite``.

    Call it while holding the directory's :class:`~raflora.engine.rundir.RunLock`: with
    ``overwrite`` it removes the previous run's files.

    Raises
    ------
    EngineError
        ``run_dir`` is a file or cannot be created, or already holds a run (not resuming,
        not overwriting).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise EngineError(f"run directory {run_dir} is a file")
    if not resume and (run_dir / CHECKPOINT_FILE).exists():
        if not overwrite:
            raise EngineError(
                f"{run_dir} already holds a run (checkpoint/); continue it with --resume "
                f"{run_dir}, replace it with --overwrite, or choose another output directory"
            )
        try:
            clear_run_dir(run_dir)
        except OSError as err:
            raise EngineError(
                f"--overwrite: cannot remove the previous run's {err.filename or 'files'}: "
                f"{err.strerror or err}"
            ) from None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EngineError(f"cannot create the run directory {run_dir}: {err}") from None


def check_config(config: RunConfig) -> None:
    """Check that ``config`` was validated (it is not validated again: that happened once,
    when it was loaded) and that this installation can run it
    (:func:`~raflora.config.environment_problems`).

    Raises
    ------
    ConfigError
        ``config`` was not validated (:func:`~raflora.config.require_validated`), or what this
        installation lacks to run it.
    """
    problems = environment_problems(require_validated(config))
    if problems:
        raise ConfigError(problems)


@contextlib.contextmanager
def locked_run(config: RunConfig, run_dir: Path, *, break_lock: bool = False) -> Iterator[None]:
    """The engines' preamble (``run_local``, ``run_flower``): ``config`` checked
    (:func:`check_config`, before anything is written), then ``run_dir``'s lock held for the run.

    Raises
    ------
    ConfigError
        ``config`` was not validated, or this installation cannot run it.
    EngineError
        ``run_dir`` is a file, or another process holds its lock.
    """
    check_config(config)
    with lock_run_dir(run_dir, break_lock=break_lock):
        yield


def lock_run_dir(run_dir: Path, *, break_lock: bool = False) -> RunLock:
    """Take ``run_dir``'s lock (a run directory has one writer), refusing a file path first.

    Raises
    ------
    EngineError
        ``run_dir`` is a file, or another process holds the lock
        (:class:`~raflora.engine.rundir.RunLockedError`).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise EngineError(f"run directory {run_dir} is a file")
    return RunLock(run_dir, break_lock=break_lock).acquire()


def saved_rounds(run_dir: Path) -> int:
    """Rounds in ``run_dir``'s last good checkpoint (0 when there is none or it is unreadable).

    The file is memory-mapped: only the round number is read, not the (possibly large) tensors.
    """
    path = run_dir / CHECKPOINT_FILE
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(data["round"])
    except Exception:  # no checkpoint, or not a readable one: nothing is saved
        return 0


def open_run(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool,
    fed: Federation | None = None,
    overwrite: bool = False,
) -> RunStart:
    """Prepare ``run_dir`` for a run, shared by the local and Flower engines.

    The caller holds the directory's lock (:func:`lock_run_dir`). A new run refuses a directory
    that already holds a run unless ``overwrite`` (then that run's files are removed) and writes
    ``config.yaml`` and ``partition.json``; a resumed one checks the config and loads the
    checkpoint onto the run's device (and FLoRA's merged base weights). Either way
    ``metrics.jsonl`` is rewritten to mirror the checkpoint (a kill may have left a partial
    line). The session's provenance is added to ``environment.json`` (a new run starts it
    afresh) and, with ``output.tensorboard``, a TensorBoard session starts at the first round
    to run (hiding anything an earlier session wrote from that round on).
    """
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        check_resume_config(run_dir, config)
        checkpoint = load_checkpoint(run_dir)
    fed = fed if fed is not None else build_federation(config)
    fed.client_states = ClientStates(run_dir, rounds_done=checkpoint.round if resume else 0)
    # a private run's noise (calibrated here, before round 1) and ledger (docs/privacy.md)
    if resume and config.privacy.enabled and checkpoint.privacy is None:
        raise EngineError(f"--resume {run_dir}: the checkpoint holds no privacy ledger")
    fed.privacy = start_privacy(config, checkpoint.privacy if resume else None)
    if resume:
        state = checkpoint.state.to(fed.device)
        if checkpoint.base_weights:
            fed.bank.load_base_weights(checkpoint.base_weights)
        metrics = checkpoint.metrics
        wall_before = checkpoint.wall_seconds
    else:
        state = fed.merge_initial_residual(fed.initial_state())
        metrics = []
        wall_before = 0.0
    with writing(run_dir, lambda: len(metrics)):
        if not resume:
            save_config(config, run_dir / "config.yaml")
            (run_dir / "partition.json").write_text(json.dumps(fed.partition_summary, indent=1))
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in metrics))
        try:
            truncate_jsonl(run_dir / ENERGY_FILE, len(metrics))
        except ValueError as err:  # a damaged line in the middle, not a kill's partial tail
            raise EngineError(
                f"{run_dir / ENERGY_FILE} is damaged ({err}); delete it to resume (the "
                f"per-module diagnostics of the finished rounds are then lost)"
            ) from None
        _record_environment(fed, run_dir, first_round=len(metrics) + 1, resume=resume)
        if config.output.tensorboard:
            start_session(run_dir, len(metrics) + 1)
    return RunStart(fed, state, metrics, wall_before)


def _record_environment(fed: Federation, run_dir: Path, *, first_round: int, resume: bool) -> None:
    """Add this session to ``environment.json`` (see :mod:`raflora.report.provenance`)."""
    path = run_dir / ENVIRONMENT_FILE
    session = session_info(
        device=fed.device,
        threads=fed.config.threads,
        first_round=first_round,
        engine=fed.config.engine,
    )
    previous = path.read_text(encoding="utf-8") if resume and path.is_file() else None
    text = add_session(previous, session, resume=resume)
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def record_round(
    fed: Federation,
    state: GlobalState,
    metrics: list[dict[str, Any]],
    row: dict[str, Any],
    run_dir: Path,
    wall: float,
    energy: EnergyReport | None = None,
) -> None:
    """Keep a finished round: its per-module energy row (and TensorBoard events, with
    ``output.tensorboard``), the checkpoint, then its metrics row.

    The energy row and the events come first and the checkpoint before ``metrics.jsonl``: a
    kill in between leaves rows beyond the checkpoint, which :func:`open_run` drops on resume
    (TensorBoard hides them behind the resumed session's start; the other order would leave a
    gap).
    """
    metrics.append(row)
    with writing(run_dir, lambda: saved_rounds(run_dir)):
        if energy is not None:
            append_energy(run_dir / ENERGY_FILE, module_energy_row(int(row["round"]), energy))
            if fed.config.output.tensorboard:
                write_round(run_dir, row, spectrum_shares(energy, fed.aggregator.r_max))
        fed.client_states.write()  # this round's files first: a resume drops them if no
        save_checkpoint(run_dir, make_checkpoint(fed, state, metrics, wall))  # checkpoint follows
        fed.client_states.prune()
        append_metrics(run_dir / METRICS_FILE, row)


def finish_run(
    fed: Federation, state: GlobalState, metrics: list[dict[str, Any]], run_dir: Path, wall: float
) -> dict[str, Any]:
    """Write the summary, plots and the final PEFT adapter; return the summary."""
    with writing(run_dir, lambda: len(metrics)):
        return _finish_run(fed, state, metrics, run_dir, wall)


def _finish_run(
    fed: Federation, state: GlobalState, metrics: list[dict[str, Any]], run_dir: Path, wall: float
) -> dict[str, Any]:
    config = fed.config
    exported = write_adapter(run_dir / "adapter", fed.aggregator, state, adapter_meta(fed))
    extra = {
        **fed.task.describe(),
        "seed": config.seed,
        "num_clients": config.fl.num_clients,
        "clients_per_round": config.fl.clients_per_round,
        "rank_levels": list(config.fl.rank_levels),
        "partition": config.data.partition,
        "adapter": {"path": "adapter", "rank": exported.rank},
    }
    if fed.privacy is not None:  # a run without privacy keeps its summary as it was
        extra["privacy"] = {
            "epsilon": _finite_or_none(fed.privacy.epsilon()),
            "delta": fed.privacy.delta,
            "noise_multiplier": fed.privacy.noise_multiplier,
            "clip": config.privacy.clip,
            "final_clip": fed.privacy.clip,
            "sampling": config.privacy.sampling,
            "noise": config.privacy.noise,
            "accountant": config.privacy.accountant,
            "target_epsilon": fed.privacy.target_epsilon,
        }
    summary = summarize(metrics, method=config.method, wall_seconds=wall, extra=extra)
    text = json.dumps(summary, indent=1).encode("utf-8")
    atomic_write_bytes(run_dir / SUMMARY_FILE, lambda fh: fh.write(text))  # whole or absent
    if config.output.plots:
        write_run_plots(run_dir, metrics, title=f"{config.method} · {fed.task.name}")
    return summary


def _finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` for ``inf`` (no noise: no finite ε; strict JSON has no infinity)."""
    return value if value != float("inf") else None
