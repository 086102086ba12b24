"""``raflora compare``: the same federation under several methods, side by side."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from raflora.cli.common import CLIError
from raflora.cli.runs import (
    default_run_dir,
    describe_result,
    load_run_config,
    split_config_args,
    user_errors,
)
from raflora.config import RunConfig, validate

__all__ = ["DEFAULT_METHODS", "method_config", "register", "run"]

DEFAULT_METHODS = ("hetlora", "flora", "flexlora", "raflora")


def register(sub: Any) -> None:
    """Add the ``compare`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="run several methods on identical partitions, ranks, sampling and seeds",
        description=(
            "Run each method with the same config (same partitions, client ranks, client "
            "sampling and seeds), one sub-directory per method, then write comparison.md and "
            "overlay plots."
        ),
    )
    p.add_argument("config", help="YAML config; more files (presets) may follow, merged in order")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument(
        "--overwrite", action="store_true", help="replace previous runs in the output directory"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    p.set_defaults(handler=run)


def method_config(base: RunConfig, method: str, methods: list[str]) -> RunConfig:
    """``base`` for one method of the comparison, with only that method's own options.

    ``method_options`` becomes the options ``method`` takes from ``base`` (a plain key only
    where ``method`` declares it, a key named after a method only for that method), so each
    run's saved ``config.yaml`` holds what the run used and ``--resume`` / ``raflora export`` of
    its directory reproduce it. ``base`` must have been validated with ``methods``.
    """
    from raflora.aggregators.base import options_for

    cfg = copy.deepcopy(base)
    cfg.method = method
    cfg.method_options = options_for(method, base.method_options, methods_in_run=methods)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora compare``."""
    from raflora.engine import run_local
    from raflora.report import write_comparison

    config_path, overrides = split_config_args(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise CLIError(f"--methods must name distinct methods, got {args.methods!r}")
    base = load_run_config(config_path, overrides, methods=methods)
    out = args.out if args.out is not None else default_run_dir(base, "compare")
    configs = {}
    problems: list[str] = []
    for method in methods:
        cfg = method_config(base, method, methods)
        cfg.output.dir = str(out / method)
        problems += [f"[{method}] {p}" for p in validate(cfg)]
        configs[method] = cfg
    if problems:
        raise CLIError("invalid configuration:\n  " + "\n  ".join(problems))
    if base.engine != "local":
        raise CLIError("compare runs on the local engine; set engine=local")
    runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for method, cfg in configs.items():
        with user_errors():
            result = run_local(
                cfg,
                out / method,
                progress=False if args.quiet else None,
                label=method,
                overwrite=args.overwrite,
            )
        runs[method] = (result.summary, result.metrics)
        if not args.quiet:
            print(f"{method}: {describe_result(result.summary)}")
    table = write_comparison(out, runs)
    if not args.quiet:
        print(table.read_text())
        print(f"comparison: {table}")
    return 0
