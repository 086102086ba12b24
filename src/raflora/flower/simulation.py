"""``run_flower``: a raflora run on Flower's simulation engine (Ray) (docs/flower.md).

The ``ServerApp`` runs in this process (bound to the configuration in memory, since
``run_simulation`` gives an empty ``context.run_config``); each of the ``fl.num_clients`` virtual
SuperNodes has ``partition-id = k``, and Ray runs their ``ClientApp`` s in worker processes with
``flower.cpus_per_client`` CPUs and ``flower.gpus_per_client`` GPUs each. The run directory is the
local engine's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecordValues

from raflora.config import RunConfig
from raflora.engine.federation import EngineError, build_federation
from raflora.engine.run_files import RunResult, locked_run, prepare_run_dir
from raflora.report import progress_postfix

__all__ = ["num_supernodes", "run_flower"]


def num_supernodes(config: RunConfig) -> int:
    """``flower.supernodes`` (default ``fl.num_clients``); it must equal ``fl.num_clients``.

    Raises
    ------
    EngineError
        When it differs: each client is one SuperNode (its ``partition-id``).
    """
    clients = int(config.fl.num_clients)
    nodes = clients if config.flower.supernodes is None else int(config.flower.supernodes)
    if nodes != clients:
        raise EngineError(
            f"flower.supernodes={nodes} but fl.num_clients={clients}: each client is one "
            f"SuperNode (its partition-id); set flower.supernodes={clients} or leave it unset"
        )
    return nodes


def run_flower(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    round_timeout: float = 3600.0,
    faults: Mapping[int, str] | None = None,
    overwrite: bool = False,
    break_lock: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Run (or resume) ``config`` on Flower's simulation engine; same results as ``run_local``.

    Parameters
    ----------
    config : RunConfig
        A validated configuration.
    run_dir : Path
        The run directory.
    resume : bool
        Continue from ``run_dir``'s checkpoint.
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).
    round_timeout : float
        Seconds to wait for a round's replies; late clients are left out and counted.
    faults : Mapping[int, str], optional
        **Fault injection for tests only** (see :func:`raflora.flower.app.make_client_app`).
    overwrite : bool
        Replace a previous run in ``run_dir`` (otherwise that is an error).
    break_lock : bool
        Take over a lock on ``run_dir`` held from another host.
    quiet : bool
        No Ray or Flower INFO logs (warnings and errors still show).

    Returns
    -------
    RunResult
        The summary and metrics; the files are in ``run_dir``.
    """
    nodes = num_supernodes(config)
    with locked_run(config, run_dir, break_lock=break_lock):
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)  # before Ray starts
        return _simulate(config, run_dir, nodes, resume, progress, round_timeout, faults, quiet)


def _simulate(
    config: RunConfig,
    run_dir: Path,
    nodes: int,
    resume: bool,
    progress: bool | None,
    round_timeout: float,
    faults: Mapping[int, str] | None,
    quiet: bool,
) -> RunResult:
    """:func:`run_flower`'s body, inside the run directory's lock."""
    from flwr.simulation import run_simulation
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from raflora.flower.app import make_client_app, make_server_app

    # Built here, in the main thread, before Ray starts its worker processes: NumPy's OpenBLAS
    # can deadlock when a thread is inside a BLAS call while another thread forks.
    fed = build_federation(config)
    results: list[RunResult] = []
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=config.fl.rounds, desc=config.method, unit="round", disable=not show)

    def on_round(row: dict[str, Any]) -> None:
        bar.n = int(row["round"])
        bar.set_postfix(progress_postfix(row), refresh=False)
        bar.refresh()

    server = make_server_app(
        config,
        run_dir,
        resume=resume,
        round_timeout=round_timeout,
        results=results,
        on_round=on_round,
        fed=fed,
        lock_held=True,  # run_flower holds it, in this process
    )
    client = make_client_app(faults=faults)
    resources: dict[str, ConfigRecordValues] = {
        "num_cpus": config.flower.cpus_per_client,
        "num_gpus": config.flower.gpus_per_client,
    }
    backend: dict[str, Any] = {"client_resources": resources}
    if quiet:  # Ray's own INFO lines, and the workers' logs relayed to this terminal
        backend["init_args"] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        # Single-threaded BLAS in the server thread for the same reason (Ray may fork workers
        # while the server aggregates); PyTorch's own thread pool is unaffected.
        with threadpool_limits(limits=1, user_api="blas"):
            run_simulation(
                server_app=server,
                client_app=client,
                num_supernodes=nodes,
                backend_config=backend,
            )
    finally:
        bar.close()
    if not results:
        raise EngineError("the Flower simulation ended without finishing the run (see its log)")
    return results[0]
