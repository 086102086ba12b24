"""The local engine: every client trained one after another in this process
(docs/design.md#layers).

A thin loop over the other modules: :func:`~raflora.engine.run_files.open_run` prepares the run
directory (new or resumed), then each round is :func:`~raflora.engine.server_round.run_round`
(paper Algorithm 1: sample, train the clients locally, validate and aggregate, evaluate) and
:func:`~raflora.engine.run_files.record_round` (the checkpoint replaced atomically and the round's
metrics line appended, so a killed run loses nothing it finished), and
:func:`~raflora.engine.run_files.finish_run` writes the summary, plots and adapter.

The round and run-directory names are re-exported here, so ``from raflora.engine.local import X``
keeps working.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raflora.config import RunConfig
from raflora.engine.federation import Federation
from raflora.engine.run_files import (
    METRICS_FILE,
    SUMMARY_FILE,
    RunResult,
    RunStart,
    adapter_meta,
    check_config,
    check_resume_config,
    config_difference,
    finish_run,
    lock_run_dir,
    locked_run,
    make_checkpoint,
    open_run,
    prepare_run_dir,
    record_round,
    saved_rounds,
)
from raflora.engine.server_round import (
    CompletedRound,
    RoundPlan,
    complete_round,
    energy_metrics,
    plan_round,
    run_round,
)
from raflora.report import progress_postfix

__all__ = [
    "METRICS_FILE",
    "SUMMARY_FILE",
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
        The configuration was not validated (:func:`~raflora.config.load_config` validates it,
        once) or this installation cannot run it; nothing is written.
    EngineError
        The run cannot start (another process holds ``run_dir``, a bad partition …) or a
        file cannot be written (:class:`~raflora.engine.rundir.RunWriteError`; the last good
        checkpoint is kept).
    """
    with locked_run(config, run_dir, break_lock=break_lock):
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
