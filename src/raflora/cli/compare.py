"""``raflora compare``: the same federation under several methods, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from raflora.cli.common import CLIError
from raflora.cli.runs import (
    add_config_arguments,
    default_run_dir,
    describe_result,
    load_run_config,
    split_config_args,
    user_errors,
)
from raflora.cli.sweep import (
    check_out_dir,
    failures,
    finish,
    keep_going_hint,
    kept_report,
    parse_methods,
    parse_metrics,
    parse_seeds,
    progress_printer,
    write_failure,
)
from raflora.config import ConfigError
from raflora.experiments.sweep import method_config

__all__ = ["DEFAULT_BASELINE", "DEFAULT_METHODS", "method_config", "register", "run"]

DEFAULT_METHODS = ("hetlora", "flora", "flexlora", "raflora")
DEFAULT_BASELINE = "flexlora"


def register(sub: Any) -> None:
    """Add the ``compare`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="run several methods on identical partitions, ranks, sampling and seeds",
        description=(
            "Run each method with the same config (same partitions, client ranks, client "
            "sampling and seeds), one sub-directory per method, then write comparison.md and "
            "overlay plots. With several --seeds, every method × seed runs into "
            "OUT/<method>/seed-<s>/ (finished runs are skipped, interrupted ones resumed) and "
            "comparison.md gives mean ± std, 95% confidence intervals and paired differences "
            "against --baseline."
        ),
    )
    add_config_arguments(p)
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods, or 'all' (every method that supports the config's "
        "ranks; the others are listed as skipped) (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument(
        "--overwrite", action="store_true", help="replace previous runs in the output directory"
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds; two or more give statistics over seeds (default: the "
        "config's seed)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help=f"with several seeds: the method the others are paired with (default: "
        f"{DEFAULT_BASELINE})",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="with several seeds: comma-separated summary.json keys or 'traffic'; the first "
        "decides wins/ties/losses (default: final and best accuracy, final and mean "
        "higher-rank energy, traffic, and final per-level accuracies)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora compare``."""
    config_path, overrides = split_config_args(args.config, args.overrides)
    methods = parse_methods(args.methods)
    skipped: dict[str, str] = {}
    if methods == ["all"]:
        methods, skipped = _every_method(config_path, overrides)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if seeds is not None and len(seeds) > 1:
        return _run_seeds(args, config_path, overrides, methods, seeds)
    if args.baseline is not None or args.metrics is not None:
        raise CLIError("--baseline and --metrics apply to several seeds (e.g. --seeds 0,1,2)")
    if seeds is not None:
        overrides = [*overrides, f"seed={seeds[0]}"]
    return _run_one_seed(args, config_path, overrides, methods, skipped)


def _every_method(
    config_path: list[str] | None, overrides: list[str]
) -> tuple[list[str], dict[str, str]]:
    """``--methods all``: every registered method that supports the config's rank levels, and
    the others → why they are skipped (printed, and listed in ``comparison.md``).
    """
    import sys

    from raflora.methods import available_methods
    from raflora.methods.registry import unsupported_reason

    every = available_methods()
    base = load_run_config(config_path, overrides, methods=every)
    skipped = {
        m: reason
        for m in every
        if (reason := unsupported_reason(m, base.fl.rank_levels)) is not None
    }
    for method, reason in skipped.items():
        print(f"skipping {method}: {reason} (rank levels {base.fl.rank_levels})", file=sys.stderr)
    return [m for m in every if m not in skipped], skipped


def _run_one_seed(
    args: argparse.Namespace,
    config_path: list[str] | None,
    overrides: list[str],
    methods: list[str],
    skipped: dict[str, str] | None = None,
) -> int:
    """One seed: a run per method in ``OUT/<method>/`` and the single-seed ``comparison.md``."""
    from raflora.engine import run_local
    from raflora.report import write_comparison

    base = load_run_config(config_path, overrides, methods=methods)
    out = args.out if args.out is not None else default_run_dir(base, "compare")
    configs = {}
    problems: list[str] = []
    for method in methods:
        try:  # each run's config validated once, here
            configs[method] = method_config(
                base, method, methods, {"output.dir": str(out / method)}
            )
        except ConfigError as err:
            problems += [f"[{method}] {p}" for p in err.problems]
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
    table = write_comparison(out, runs, skipped=skipped)
    if not args.quiet:
        print(table.read_text())
        print(f"comparison: {table}")
    return 0


def _run_seeds(
    args: argparse.Namespace,
    config_path: list[str] | None,
    overrides: list[str],
    methods: list[str],
    seeds: list[int],
) -> int:
    """Several seeds: every method × seed in ``OUT/<method>/seed-<s>/``, then statistics."""
    from raflora.experiments.report import default_metrics, write_seed_comparison
    from raflora.experiments.sweep import SweepError, plan_runs, run_plan, settings_of
    from raflora.report import read_metrics

    baseline = args.baseline if args.baseline is not None else DEFAULT_BASELINE
    metrics, problems = parse_metrics(args.metrics)
    if baseline not in methods:
        problems.append(
            f"--baseline {baseline} is not among the methods ({', '.join(methods)}); "
            "choose one with --baseline"
        )
    if config_path is None:
        problems.append("a CONFIG file is required before the key=value overrides")
    if problems:
        raise CLIError("invalid comparison:\n  " + "\n  ".join(problems))
    out = (
        args.out
        if args.out is not None
        else default_run_dir(load_run_config(config_path, overrides, methods=methods), "compare")
    )
    check_out_dir(out)
    try:
        specs = plan_runs(
            config_path or [], overrides, settings_of([]), methods, seeds, out, threads=None
        )
    except SweepError as err:
        raise CLIError(str(err)) from None
    with keep_going_hint("compare", out, out_given=args.out is not None):
        outcomes = run_plan(
            specs, overwrite=args.overwrite, on_done=progress_printer(len(specs), quiet=args.quiet)
        )
    runs: dict[str, dict[int, tuple[dict[str, Any], list[dict[str, Any]]]]] = {}
    for o in outcomes:
        if o.summary is not None:
            rows = read_metrics(o.spec.run_dir / "metrics.jsonl")
            runs.setdefault(o.spec.method, {})[o.spec.seed] = (o.summary, rows)
    if kept_report(outcomes, out / "comparison.md"):
        return finish(outcomes, f"comparison: {out / 'comparison.md'} (kept)", quiet=args.quiet)
    summaries = [o.summary for o in outcomes if o.summary is not None]
    try:
        table = write_seed_comparison(
            out,
            {m: runs.get(m, {}) for m in methods},
            seeds=seeds,
            metrics=metrics if metrics is not None else default_metrics(summaries),
            baseline=baseline,
            failed=failures(outcomes),
        )
    except OSError as err:
        raise write_failure(out, err) from None
    if not args.quiet:
        print(table.read_text())
    return finish(outcomes, f"comparison: {table}", quiet=args.quiet)
