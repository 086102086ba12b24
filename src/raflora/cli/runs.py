"""Helpers shared by ``raflora run`` and ``raflora compare``: configs, run directories, errors."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from raflora.cli.common import CLIError
from raflora.config import ConfigError, RunConfig, load_config

__all__ = [
    "add_config_arguments",
    "default_run_dir",
    "load_run_config",
    "split_config_args",
    "user_errors",
]


def add_config_arguments(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """The ``CONFIG [CONFIG …] [key=value …]`` arguments every config-reading sub-command takes
    (separated again by :func:`split_config_args`); ``optional``: CONFIG may be left out.
    """
    parser.add_argument(
        "config",
        nargs="?" if optional else None,
        help="YAML config; more files (presets) may follow, merged in order",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def split_config_args(
    config: str | None, rest: Sequence[str]
) -> tuple[list[str] | None, list[str]]:
    """Separate CONFIG files (one or more, merged in order) from ``key=value`` overrides.

    An argument is a config file when it has no ``=`` or names an existing file; files must come
    before the overrides. Returns ``None`` for the files when there are none.
    """
    args = ([config] if config is not None else []) + list(rest)
    files: list[str] = []
    for i, arg in enumerate(args):
        if "=" in arg and not Path(arg).exists():
            overrides = args[i:]
            stray = [a for a in overrides if "=" not in a]
            if stray:
                raise CLIError(f"config file {stray[0]!r} must come before the key=value overrides")
            return files or None, overrides
        files.append(arg)
    return files or None, []


def load_run_config(
    paths: str | Sequence[str] | None,
    overrides: Sequence[str],
    *,
    methods: Sequence[str] | None = None,
) -> RunConfig:
    """:func:`~raflora.config.load_config`, with every problem as one :class:`CLIError`.

    ``methods``: the methods the config is used with (``raflora compare``), against which
    ``method_options`` are checked (default: the config's own ``method``).
    """
    files = [paths] if isinstance(paths, str) else list(paths or [])
    for path in files:
        if not Path(path).is_file():
            raise CLIError(f"config file {path!r} does not exist")
    try:
        return load_config(files, overrides, methods=methods)
    except ConfigError as err:
        raise CLIError(str(err)) from None


def default_run_dir(config: RunConfig, kind: str) -> Path:
    """``output.dir`` or ``runs/<kind>-<task>-<timestamp>``."""
    if config.output.dir:
        return Path(config.output.dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{kind}-{config.task.name}-{stamp}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (config, task, data, checkpoint) into :class:`CLIError`."""
    from raflora.engine import CheckpointError, EngineError
    from raflora.tasks import TaskError

    try:
        yield
    except (TaskError, EngineError, CheckpointError, ConfigError) as err:
        raise CLIError(str(err)) from None


def describe_result(summary: dict[str, Any]) -> str:
    """Two lines on a finished run for the terminal."""
    from raflora.report import format_bytes

    acc = summary.get("final_accuracy")
    hre = summary.get("final_higher_rank_energy")
    parts = [
        f"final accuracy {acc:.4f}" if isinstance(acc, float) else "not evaluated",
        f"best {summary['best_accuracy']:.4f}" if summary.get("best_accuracy") is not None else "",
        f"higher-rank energy {hre:.3f}" if isinstance(hre, float) else "",
        f"traffic ↑{format_bytes(summary['total_upload_bytes'])} "
        f"↓{format_bytes(summary['total_download_bytes'])}",
        f"{summary['wall_seconds']:.1f} s",
    ]
    return ", ".join(p for p in parts if p)
