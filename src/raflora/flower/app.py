"""The Flower ``ServerApp`` and ``ClientApp`` of raflora (docs/flower.md).

``client_app`` (module level, named in ``[tool.flwr.app.components]``) answers two messages:

- ``query``: its node's ``partition-id`` and ``num-partitions`` (node config), which the strategy
  uses to map client ``k`` of the local engine to the node with ``partition-id = k``;
- ``train``: builds (once per process, cached by the configuration's hash) a
  :class:`~raflora.engine.federation.Federation` from the run configuration the server sends in the
  message, checks that the message is for its own partition, loads the received factors, extras
  and per-client state (and, for methods that merge into the base, the server's merged base
  weights), decoded onto its own federation's device, and calls
  :func:`~raflora.engine.client_round.train_client` — the one training loop of the package.

Clients therefore need no configuration file: only the package, and the model and data the task
names. ``server_app`` reads its configuration from the Flower run config
(``[tool.flwr.app.config]``: ``config-file``, ``overrides``, ``run-dir``, ``round-timeout``,
``node-wait``; see ``pyproject.toml``), builds the server federation and runs
:class:`~raflora.flower.strategy.RankStrategy` for ``fl.rounds`` rounds, writing the same run
directory as the local engine. :func:`make_server_app` builds one bound to a configuration in
memory instead (the simulation, whose ``context.run_config`` is empty).
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from raflora.adapters import adapter_name, load_base_weights
from raflora.config import RunConfig, config_from_dict, load_config, with_changes
from raflora.engine.client_round import ClientResult, train_client
from raflora.engine.federation import EngineError, Federation, build_federation
from raflora.engine.private_round import PrivacyRun, privatize_client
from raflora.engine.run_files import RunResult, check_config, finish_run, lock_run_dir, open_run
from raflora.flower.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    PRIVATE,
    DecodedArrays,
    decode_arrays,
    encode_arrays,
    encode_contribution,
    encode_result,
)
from raflora.flower.strategy import (
    PRIVACY_CLIP,
    PRIVACY_COHORT,
    PRIVACY_DELTA,
    PRIVACY_RATE,
    PRIVACY_Z,
    QUERY_PARTITION,
    RankStrategy,
)
from raflora.methods import ClientMessage, GlobalState

__all__ = [
    "FAULTS",
    "client_app",
    "make_client_app",
    "make_server_app",
    "run_server",
    "server_app",
]

FAULTS = ("raise", "nan", "inflate")
"""Fault-injection kinds of :func:`make_client_app` (tests only): the client raises in its train
handler, trains and then replaces its factors with NaN, or trains and reports ten times its
sample count (to inflate its weight in the average)."""

# ---------------------------------------------------------------------------------- client side

_CACHE: dict[str, Federation] = {}


def federation_for(run_config: str) -> Federation:
    """The federation of a run configuration (JSON), built once per process and cached.

    Only the most recent configuration is kept (a process serves one run at a time; a new run
    frees the previous base model).
    """
    key = hashlib.sha256(run_config.encode()).hexdigest()
    fed = _CACHE.get(key)
    if fed is None:
        _CACHE.clear()
        fed = build_federation(config_from_dict(json.loads(run_config)))
        _CACHE[key] = fed
    return fed


def _partition_id(context: Context) -> tuple[int, int | None]:
    node_config = context.node_config
    pid = node_config.get("partition-id")
    parts = node_config.get("num-partitions")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise ValueError(
            "this SuperNode has no integer partition-id in its node config; start it with "
            "--node-config 'partition-id=I num-partitions=N'"
        )
    return pid, parts if isinstance(parts, int) and not isinstance(parts, bool) else None


def _query(message: Message, context: Context) -> Message:
    config = message.content.get(CONFIG)
    action = config.get("action") if isinstance(config, ConfigRecord) else None
    if action != QUERY_PARTITION:
        raise ValueError(f"unknown query {action!r}")
    pid, parts = _partition_id(context)
    answer: dict[str, ConfigRecordValues] = {"partition-id": pid}
    if parts is not None:
        answer["num-partitions"] = parts
    return Message(RecordDict({CONFIG: ConfigRecord(answer)}), reply_to=message)


def _int(config: ConfigRecord, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"train message: {key!r} must be an integer, got {value!r}")
    return value


def _train(message: Message, context: Context, faults: Mapping[int, str]) -> Message:
    config = message.content.get(CONFIG)
    if not isinstance(config, ConfigRecord):
        raise ValueError("train message without a config record")
    run_config = config.get("run-config")
    lr = config.get("lr")
    if not isinstance(run_config, str) or not isinstance(lr, float):
        raise ValueError("train message: 'run-config' (str) and 'lr' (float) are required")
    client_id, rank, round_index = (
        _int(config, "client-id"),
        _int(config, "rank"),
        _int(config, "round"),
    )
    pid, _ = _partition_id(context)
    if pid != client_id:
        raise ValueError(f"message for client {client_id} reached partition-id {pid}")
    fault = faults.get(client_id)
    if fault == "raise":
        raise RuntimeError(f"fault injection: client {client_id} raises in round {round_index}")
    fed = federation_for(run_config)
    received = decode_arrays(message.content.get(ARRAYS), device=fed.device)
    if received.base:
        load_base_weights(fed.bank.model, adapter_name(fed.aggregator.r_max), received.base)
    result = train_client(
        fed,
        client_id,
        rank,
        ClientMessage(received.factors, received.extras),
        received.dense,
        round_index,
        lr,
        state=received.state or None,
    )
    if fault == "nan":
        poisoned = {
            name: (torch.full_like(B, math.nan), A)
            for name, (B, A) in result.update.factors.items()
        }
        result = replace(result, update=replace(result.update, factors=poisoned))
    elif fault == "inflate":
        inflated = replace(result.update, num_samples=10 * result.update.num_samples)
        result = replace(result, update=inflated)
    if PRIVACY_CLIP in config:  # privacy.noise: client — only the noised contribution travels
        pieces = _private_contribution(fed, config, received, result, round_index)
        _, metrics = encode_result(result)
        content = RecordDict(
            {
                PRIVATE: encode_contribution(pieces),
                ARRAYS: encode_arrays({}, {}, state=result.state),
                METRICS: metrics,
            }
        )
        return Message(content, reply_to=message)
    arrays, metrics = encode_result(result)
    return Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=message)


def _float(config: ConfigRecord, key: str) -> float:
    value = config.get(key)
    if not isinstance(value, float):
        raise ValueError(f"train message: {key!r} must be a float, got {value!r}")
    return value


def _private_contribution(
    fed: Federation,
    config: ConfigRecord,
    received: DecodedArrays,
    result: ClientResult,
    round_index: int,
) -> dict[str, Tensor]:
    """``privacy.noise: client`` (docs/privacy.md): this client's ``U_k`` clipped to ``C``,
    densified, plus its noise share ``N(0, (z C)² / m)`` from its own seeded stream —
    :func:`~raflora.engine.private_round.privatize_client`, the local engine's function, with the
    round's ``z``, ``C`` and cohort size ``m`` the server sent.

    The client knows the global state only through what it was sent (its start factors and the
    global heads): the module shapes and the heads' starting point are read from them.
    """
    fed.privacy = PrivacyRun(
        noise_multiplier=_float(config, PRIVACY_Z),
        clip=_float(config, PRIVACY_CLIP),
        delta=_float(config, PRIVACY_DELTA),
        sample_rate=_float(config, PRIVACY_RATE),
        target_epsilon=None,  # the budget is the server's to enforce
    )
    state = GlobalState(
        factors=dict(received.factors),
        module_shapes={m: (B.shape[0], A.shape[1]) for m, (B, A) in received.factors.items()},
        dense=dict(received.dense),
        round=round_index - 1,
    )
    sent = ClientMessage(received.factors, received.extras)
    cohort = _int(config, PRIVACY_COHORT)
    contribution = privatize_client(fed, state, round_index, result.update, sent, cohort)
    return contribution.pieces


def make_client_app(*, faults: Mapping[int, str] | None = None) -> ClientApp:
    """The raflora ``ClientApp``.

    Parameters
    ----------
    faults : Mapping[int, str], optional
        **Fault injection for tests only**: client id → ``"raise"`` (the train handler raises),
        ``"nan"`` (the client replies NaN factors) or ``"inflate"`` (the client reports ten times
        its sample count). The deployed ``client_app`` has none.
    """
    bad = {k: v for k, v in (faults or {}).items() if v not in FAULTS}
    if bad:
        raise ValueError(f"faults: unknown kind(s) {bad}; use one of {FAULTS}")
    injected = dict(faults or {})
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return _query(message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _train(message, context, injected)

    return app


client_app = make_client_app()

# ---------------------------------------------------------------------------------- server side


def run_server(
    grid: Grid,
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    round_timeout: float = 3600.0,
    node_wait: float = 600.0,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    fed: Federation | None = None,
    lock_held: bool = False,
) -> RunResult:
    """Run (or resume) the federation's rounds over a Flower grid and write the run directory.

    The files are those of :func:`~raflora.engine.local.run_local`: ``config.yaml``,
    ``partition.json``, ``metrics.jsonl`` and ``checkpoint/`` after every round, then
    ``summary.json``, plots and ``adapter/``.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    config : RunConfig
        The run configuration.
    run_dir : Path
        The run directory.
    resume : bool
        Continue from ``run_dir``'s checkpoint.
    round_timeout : float
        Seconds to wait for a round's replies; clients that miss it are counted as failed.
    node_wait : float
        Seconds to wait for all SuperNodes to connect.
    on_round : callable, optional
        Called with each round's metrics row after it is saved.
    fed : Federation, optional
        The server federation, already built from ``config``.
    lock_held : bool
        The caller holds ``run_dir``'s lock already (the simulation's :func:`run_flower`);
        otherwise the ServerApp takes it, as the run directory's one writer.
    """
    check_config(config)
    args = (grid, config, run_dir, resume, round_timeout, node_wait, on_round, fed)
    if lock_held:
        return _serve(*args)
    with lock_run_dir(run_dir):
        return _serve(*args)


def _serve(
    grid: Grid,
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    round_timeout: float,
    node_wait: float,
    on_round: Callable[[dict[str, Any]], None] | None,
    fed: Federation | None,
) -> RunResult:
    """:func:`run_server`'s body, inside the run directory's lock."""
    start = open_run(config, run_dir, resume=resume, fed=fed)
    fed, state, metrics, wall_before = start.fed, start.state, start.metrics, start.wall_before
    strategy = RankStrategy(
        fed,
        state,
        metrics=metrics,
        run_dir=run_dir,
        wall_before=wall_before,
        node_wait=node_wait,
        on_round=on_round,
    )
    started = time.perf_counter()
    remaining = config.fl.rounds - len(metrics)
    if remaining > 0:
        strategy.start(grid, ArrayRecord(), num_rounds=remaining, timeout=round_timeout)
    wall = wall_before + time.perf_counter() - started
    summary = finish_run(fed, strategy.state, strategy.metrics, run_dir, wall)
    return RunResult(run_dir, summary, strategy.metrics)


def _number(run_config: Mapping[str, Any], key: str, default: float) -> float:
    value = run_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise EngineError(f"run config {key!r} must be a positive number, got {value!r}")
    return float(value)


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, Path, float, float]:
    """``(config, run_dir, round_timeout, node_wait)`` from a ``flwr run`` run config.

    Keys (declared in ``[tool.flwr.app.config]``): ``config-file`` (a raflora YAML, relative to the
    SuperLink's working directory unless absolute), ``overrides`` (``key=value`` overrides,
    shell-quoted, space-separated), ``run-dir`` (default: ``output.dir`` or
    ``runs/flower-<time>``), ``round-timeout`` and ``node-wait`` (seconds).
    """
    path = str(run_config.get("config-file", ""))
    if not path:
        raise EngineError(
            "the Flower run config has no 'config-file'; pass "
            "--run-config \"config-file='configs/quickstart.yaml'\" to flwr run"
        )
    if not Path(path).is_file():
        raise EngineError(f"config-file {path!r} does not exist (cwd: {Path.cwd()})")
    config = load_config(path, shlex.split(str(run_config.get("overrides", ""))))
    run_dir_value = str(run_config.get("run-dir", "")) or config.output.dir
    run_dir = (
        Path(run_dir_value)
        if run_dir_value
        else Path("runs") / f"flower-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    config = with_changes(config, {"engine": "flower", "output.dir": str(run_dir)})
    return (
        config,
        run_dir,
        _number(run_config, "round-timeout", 3600.0),
        _number(run_config, "node-wait", 600.0),
    )


def make_server_app(
    config: RunConfig | None = None,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    round_timeout: float = 3600.0,
    results: list[RunResult] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    fed: Federation | None = None,
    lock_held: bool = False,
) -> ServerApp:
    """The raflora ``ServerApp``.

    Parameters
    ----------
    config : RunConfig, optional
        Run this configuration (the simulation); when omitted, the app reads
        ``context.run_config`` (:func:`config_from_run_config`, the deployment engine).
    run_dir : Path, optional
        The run directory (required with ``config``).
    resume : bool
        Continue from ``run_dir``'s checkpoint.
    round_timeout : float
        Seconds to wait for a round's replies.
    results : list[RunResult], optional
        The finished run's :class:`RunResult` is appended here.
    on_round : callable, optional
        Called with each round's metrics row.
    fed : Federation, optional
        The server federation, already built from ``config``.
    lock_held : bool
        The caller holds the run directory's lock (:func:`run_server`).
    """
    if config is not None and run_dir is None:
        raise ValueError("make_server_app: run_dir is required with config")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is not None and run_dir is not None:
            cfg, out, timeout, wait = config, run_dir, round_timeout, 600.0
        else:
            cfg, out, timeout, wait = config_from_run_config(context.run_config)
        result = run_server(
            grid,
            cfg,
            out,
            resume=resume,
            round_timeout=timeout,
            node_wait=wait,
            on_round=on_round,
            fed=fed if config is not None else None,
            lock_held=lock_held,
        )
        if results is not None:
            results.append(result)

    return app


server_app = make_server_app()
