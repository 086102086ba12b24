"""``raflora run``: one federated fine-tuning run on the local engine (or Flower)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raflora.cli.common import CLIError
from raflora.cli.runs import (
    add_config_arguments,
    default_run_dir,
    describe_result,
    load_run_config,
    split_config_args,
    user_errors,
)

if TYPE_CHECKING:
    from raflora.config import RunConfig
    from raflora.engine import RunResult

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``run`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run federated LoRA fine-tuning from a config file",
        description=(
            "Run federated LoRA fine-tuning with heterogeneous client ranks. CONFIG is a YAML "
            "file; key=value arguments override it (e.g. fl.rounds=20 method=flexlora). "
            "The run directory gets config.yaml, partition.json, metrics.jsonl, summary.json, "
            "plots, adapter/ (PEFT) and checkpoint/."
        ),
    )
    add_config_arguments(p, optional=True)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: output.dir)")
    p.add_argument(
        "--resume", type=Path, default=None, metavar="RUN_DIR", help="continue a stopped run"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in the run directory"
    )
    p.add_argument(
        "--break-lock",
        action="store_true",
        help="take over the run directory's lock held from another host (only if that run is "
        "known to be gone)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, summary lines, library progress bars or Flower/Ray INFO logs",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora run``."""
    from raflora.config import with_changes
    from raflora.engine import run_local

    config_path, overrides = split_config_args(args.config, args.overrides)
    if args.resume is not None:
        saved = args.resume / "config.yaml"
        if not saved.is_file():
            raise CLIError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        if config_path is None:
            config_path = [str(saved)]
        run_dir = args.resume
    elif config_path is None:
        raise CLIError("a CONFIG file is required (or --resume RUN_DIR)")
    config = load_run_config(config_path, overrides)
    if args.resume is None:
        run_dir = args.out if args.out is not None else default_run_dir(config, config.method)
    config = with_changes(config, {"output.dir": str(run_dir)})
    with user_errors():
        try:
            if config.engine == "flower":
                result = _run_flower(config, run_dir, args)
            else:
                result = run_local(config, run_dir, **_engine_options(args))
        except KeyboardInterrupt:
            _interrupted(run_dir)
            raise
    if not args.quiet:
        print(f"{config.method}: {describe_result(result.summary)}")
        print(f"run directory: {run_dir}")
    return 0


def _interrupted(run_dir: Path) -> None:
    """Tell the user what an interrupted run kept and how to continue it."""
    import sys

    from raflora.engine.run_files import saved_rounds

    done = saved_rounds(run_dir)
    if not done:
        return
    print(
        f"raflora run: {done} finished round(s) are saved in {run_dir}; continue with "
        f"`raflora run --resume {run_dir}`",
        file=sys.stderr,
    )


def _run_flower(config: RunConfig, run_dir: Path, args: argparse.Namespace) -> RunResult:
    """``engine=flower``: Flower's simulation engine (needs the ``flower`` extra)."""
    try:
        from raflora.flower import run_flower
    except ImportError as err:
        raise CLIError(
            f"engine=flower needs Flower: pip install 'raflora[flower]' ({err})"
        ) from None
    return run_flower(config, run_dir, **_engine_options(args), quiet=args.quiet)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments both engines take from the command line."""
    return {
        "resume": args.resume is not None,
        "progress": False if args.quiet else None,
        "overwrite": args.overwrite,
        "break_lock": args.break_lock,
    }
