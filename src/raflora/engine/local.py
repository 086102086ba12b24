"""The local engine: every client trained one after another in this process (DESIGN layer 6).

One round (paper Algorithm 1): sample ``M`` clients with the run's own stream; for each, load the
factors the server sends for its rank onto the one base model, train locally, read back its
effective factors; validate and aggregate; merge into the base when the method says so (FLoRA);
record the energy diagnostics (SPEC §4), traffic (SPEC §8) and timings; evaluate every
``eval.every`` rounds and at the last one. After each round the checkpoint is replaced atomically
and the round's metrics line is appended, so a killed run loses nothing it finished.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from raflora.adapters import adapter_name, base_weights
from raflora.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    environment_problems,
    load_config,
    save_config,
    validate,
)
from raflora.diagnostics import EnergyReport, energy_report, module_energy_row
from raflora.engine import seeds
from raflora.engine.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from raflora.engine.client_states import CLIENTS_DIR, ClientStates
from raflora.engine.export import write_adapter
from raflora.engine.federation import (
    ClientResult,
    EngineError,
    Federation,
    build_federation,
    device_clock,
    evaluate_round,
    learning_rate,
    tensor_bytes,
    train_client,
)
from raflora.engine.rundir import RunLock, atomic_write_bytes, remove_leftovers, writing
from raflora.methods import GlobalState
from raflora.provenance import ENVIRONMENT_FILE, add_session, session_info
from raflora.report import (
    ENERGY_FILE,
    append_energy,
    append_metrics,
    progress_postfix,
    summarize,
    truncate_jsonl,
    write_run_plots,
)
from raflora.tensorboard import TENSORBOARD_DIR, spectrum_shares, start_session, write_round

__all__ = [
    "CompletedRound",
    "RoundPlan",
    "RunResult",
    "RunStart",
    "adapter_meta",
    "check_config",
    "check_resume_config",
    "complete_round",
    "config_difference",
    "energy_metrics",
    "finish_run",
    "lock_run_dir",
    "make_checkpoint",
    "open_run",
    "plan_round",
    "prepare_run_dir",
    "record_round",
    "run_local",
    "run_round",
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


def energy_metrics(state: GlobalState, levels: list[int]) -> tuple[dict[str, Any], EnergyReport]:
    """The round's rank-collapse diagnostics (SPEC §4), from one SVD per module.

    Returns the metrics row's ``higher_rank_energy`` (1 − ρ_{r_1}, mean over modules) and
    ``energy_per_level`` (ρ at every rank level), and the report they come from (per-module
    spectra: ``energy.jsonl`` and the TensorBoard spectrum are read off it, no second SVD).
    """
    report = energy_report(state.factors, levels)
    if not state.factors or all(B.shape[-1] == 0 for B, _ in state.factors.values()):
        return {"higher_rank_energy": None, "energy_per_level": None}, report
    means = {
        "higher_rank_energy": report.higher_rank_energy,
        "energy_per_level": {str(r): v for r, v in report.cumulative.items()},
    }
    return means, report


class CompletedRound(NamedTuple):
    """A finished round: the new global state, its metrics row and its energy report."""

    state: GlobalState
    row: dict[str, Any]
    energy: EnergyReport


def _weighted_loss(results: Sequence[ClientResult], accepted: tuple[int, ...]) -> float | None:
    chosen = [r for r in results if r.update.client_id in accepted and math.isfinite(r.train_loss)]
    total = sum(r.update.num_samples for r in chosen)
    if not chosen or total == 0:
        return None
    return sum(r.train_loss * r.update.num_samples for r in chosen) / total


@dataclass(frozen=True)
class RoundPlan:
    """Who trains in a round and what it costs to send them the global state.

    Attributes
    ----------
    round_index : int
        1-based round.
    lr : float
        The round's learning rate.
    clients : list[int]
        Sampled client ids, ascending.
    ranks : list[int]
        The rank each trains at.
    download_bytes : int
        Bytes sent down to all of them (factors and heads, SPEC §8).
    """

    round_index: int
    lr: float
    clients: list[int]
    ranks: list[int]
    download_bytes: int


def plan_round(fed: Federation, state: GlobalState, round_index: int) -> RoundPlan:
    """Sample round ``round_index``'s clients (the run's own stream) and count the download."""
    cfg = fed.config
    clients = seeds.sample_clients(
        fed.seed, round_index, cfg.fl.num_clients, cfg.fl.clients_per_round
    )
    ranks = [fed.rank_of(state, k) for k in clients]
    element = next(iter(state.factors.values()))[0].element_size()
    head = tensor_bytes(state.dense)
    download = sum(fed.aggregator.download_numel(state, r) * element + head for r in ranks)
    return RoundPlan(round_index, learning_rate(cfg, round_index), clients, ranks, download)


def complete_round(
    fed: Federation,
    state: GlobalState,
    plan: RoundPlan,
    results: Sequence[ClientResult],
    *,
    train_seconds: float,
    failures: Mapping[int, str] | None = None,
) -> CompletedRound:
    """Validate and aggregate the round's client results, evaluate, and build its metrics row.

    Parameters
    ----------
    fed : Federation
        The federation (its base model receives FLoRA's merge and the evaluation).
    state : GlobalState
        The state the round started from.
    plan : RoundPlan
        The round's plan.
    results : Sequence[ClientResult]
        What the clients sent back (invalid updates are rejected here and counted).
    train_seconds : float
        Wall time of the client phase.
    failures : Mapping[int, str], optional
        Clients that sent nothing usable (raised, timed out) → reason; counted as rejected.
    """
    cfg = fed.config
    t1 = device_clock(fed.device)
    # Client order never changes the result: aggregate in client-id order whatever order the
    # clients trained or replied in (the local engine groups them by rank, Flower by arrival).
    results = sorted(results, key=lambda r: r.update.client_id)
    outcome = fed.aggregator.aggregate(
        state, [r.update for r in results], wire_dtypes=fed.wire_dtypes
    )
    new_state = outcome.state
    if outcome.residual is not None:
        fed.bank.merge_into_base(outcome.residual, new_state.base_delta)
    for result in results:  # the per-client state of the accepted clients only
        if result.state is not None and result.update.client_id in outcome.accepted:
            fed.client_states.put(result.update.client_id, plan.round_index, result.state)
    energy, report = energy_metrics(new_state, list(cfg.fl.rank_levels))
    t2 = device_clock(fed.device)
    row: dict[str, Any] = {
        "round": plan.round_index,
        "lr": plan.lr,
        "train_loss": _weighted_loss(results, outcome.accepted),
    }
    if plan.round_index % cfg.eval.every == 0 or plan.round_index == cfg.fl.rounds:
        row.update(evaluate_round(fed, new_state))
    t3 = device_clock(fed.device)
    rejected = {**outcome.rejected, **(failures or {})}
    row.update(energy)
    row.update(
        {
            "upload_bytes": sum(
                fed.aggregator.upload_bytes(r.update, plan.round_index)
                + tensor_bytes(r.update.dense)
                for r in results
            ),
            "download_bytes": plan.download_bytes,
            "clients": plan.clients,
            "client_ranks": plan.ranks,
            "accepted": len(outcome.accepted),
            "rejected": len(rejected),
            "rejected_reasons": {str(k): v for k, v in sorted(rejected.items())},
            "time": {
                "train_seconds": train_seconds,
                "client_compute_seconds": sum(r.compute_seconds for r in results),
                "aggregate_seconds": t2 - t1,
                "eval_seconds": t3 - t2,
                "round_seconds": train_seconds + (t3 - t1),
            },
        }
    )
    return CompletedRound(new_state, row, report)


def run_round(fed: Federation, state: GlobalState, round_index: int) -> CompletedRound:
    """Run round ``round_index`` (1-based) from ``state``: the new state and its metrics."""
    t0 = device_clock(fed.device)
    plan = plan_round(fed, state, round_index)
    # Trained grouped by rank so the shared model switches adapters as rarely as possible.
    order = sorted(zip(plan.ranks, plan.clients, strict=True))
    results = [
        train_client(
            fed,
            client_id,
            rank,
            fed.client_message(state, client_id, round_index),
            state.dense,
            round_index,
            plan.lr,
            state=fed.client_states.get(client_id, device=fed.device),
        )
        for rank, client_id in order
    ]
    return complete_round(fed, state, plan, results, train_seconds=device_clock(fed.device) - t0)


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
    }


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
    """Validate ``config`` as the CLI does (API users reach the engines without it), and check
    that this installation can run it (:func:`~raflora.config.environment_problems`).

    Raises
    ------
    ConfigError
        With every problem found.
    """
    problems = validate(config)
    if not problems:
        problems = environment_problems(config)
    if problems:
        raise ConfigError(problems)


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
    if resume:
        state = checkpoint.state.to(fed.device)
        if checkpoint.base_weights:
            fed.bank.load_base_weights(checkpoint.base_weights)
        metrics = checkpoint.metrics
        wall_before = checkpoint.wall_seconds
    else:
        state = fed.initial_state()
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
    """Add this session to ``environment.json`` (see :mod:`raflora.provenance`)."""
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


def run_local(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    label: str = "",
    fed: Federation | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    break_lock: bool = False,
) -> RunResult:
    """Run (or resume) a federated fine-tuning run on the local engine.

    Parameters
    ----------
    config : RunConfig
        A validated configuration.
    run_dir : Path
        The run directory (created; a resumed run must hold a checkpoint).
    resume : bool
        Continue from ``run_dir``'s checkpoint.
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).
    label : str
        Prefix of the progress bar (the method in ``raflora compare``).
    fed : Federation, optional
        A pre-built federation (tests, benchmarks).
    on_round : callable, optional
        Called with each round's metrics row after it is saved.
    overwrite : bool
        Replace a previous run in ``run_dir`` (otherwise that is an error).
    break_lock : bool
        Take over a lock on ``run_dir`` held from another host.

    Returns
    -------
    RunResult
        The summary and metrics; the files are in ``run_dir``.

    Raises
    ------
    ConfigError
        The configuration is invalid (nothing is written).
    EngineError
        The run cannot start (another process holds ``run_dir``, a bad partition …) or a
        file cannot be written (:class:`~raflora.engine.rundir.RunWriteError`; the last good
        checkpoint is kept).
    """
    check_config(config)
    with lock_run_dir(run_dir, break_lock=break_lock):
        return _run_locked(config, run_dir, resume, progress, label, fed, on_round, overwrite)


def _run_locked(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    progress: bool | None,
    label: str,
    fed: Federation | None,
    on_round: Callable[[dict[str, Any]], None] | None,
    overwrite: bool,
) -> RunResult:
    """:func:`run_local`'s body, inside the run directory's lock."""
    from tqdm import tqdm

    start = open_run(config, run_dir, resume=resume, fed=fed, overwrite=overwrite)
    fed, state, metrics, wall_before = start.fed, start.state, start.metrics, start.wall_before
    total = config.fl.rounds
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(
        total=total,
        initial=len(metrics),
        desc=label or config.method,
        unit="round",
        disable=not show,
        file=sys.stderr,
        leave=True,
    )
    started = time.perf_counter()
    try:
        for round_index in range(len(metrics) + 1, total + 1):
            state, row, energy = run_round(fed, state, round_index)
            wall = wall_before + time.perf_counter() - started
            record_round(fed, state, metrics, row, run_dir, wall, energy)
            bar.set_postfix(progress_postfix(row), refresh=False)
            bar.update(1)
            if on_round is not None:
                on_round(row)
    finally:
        bar.close()
    wall = wall_before + time.perf_counter() - started
    return RunResult(run_dir, finish_run(fed, state, metrics, run_dir, wall), metrics)


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
    summary = summarize(metrics, method=config.method, wall_seconds=wall, extra=extra)
    text = json.dumps(summary, indent=1).encode("utf-8")
    atomic_write_bytes(run_dir / SUMMARY_FILE, lambda fh: fh.write(text))  # whole or absent
    if config.output.plots:
        write_run_plots(run_dir, metrics, title=f"{config.method} · {fed.task.name}")
    return summary
