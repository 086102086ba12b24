"""``raflora sweep``: a grid of config values × methods × seeds, with ``sweep.md`` and plots."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raflora.cli.common import CLIError, parse_int_list
from raflora.cli.runs import add_config_arguments, split_config_args

if TYPE_CHECKING:
    from raflora.experiments.sweep import GridAxis, RunOutcome

__all__ = [
    "DEFAULT_SWEEP_METHODS",
    "check_out_dir",
    "failures",
    "finish",
    "keep_going_hint",
    "kept_report",
    "parse_methods",
    "parse_metrics",
    "parse_seeds",
    "progress_printer",
    "register",
    "run",
    "write_failure",
]

DEFAULT_SWEEP_METHODS = ("flexlora", "raflora")
"""The methods of the paper's sensitivity studies (Figure 7)."""


def register(sub: Any) -> None:
    """Add the ``sweep`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "sweep",
        help="run a grid of config values × methods × seeds and tabulate the results",
        description=(
            "Run the cross product of --grid values, methods and seeds, each an ordinary run "
            "directory OUT/<setting>/<method>/seed-<s>, then write OUT/sweep.md, sweep.json "
            "and one PNG per metric. Rerunning the same command skips finished runs and "
            "resumes interrupted ones; a failed run is reported and the others go on (exit "
            "code 1). Runs use threads=1, so their numbers do not depend on --jobs."
        ),
    )
    add_config_arguments(p)
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,…",
        help="a config key and its values (split on commas outside brackets, each parsed as "
        "YAML: fl.rank_levels=[4,8],[8,16]); preset=A,B merges preset files (a bare name is "
        "looked up in configs/paper/ranks/); repeat for a cross product",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_SWEEP_METHODS),
        help="comma-separated methods (default: %(default)s)",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated summary.json keys or 'traffic' (default: final and best accuracy, "
        "final and mean higher-rank energy, traffic, and final per-level accuracies)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--out", type=Path, required=True, help="the sweep's directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start every run over, replacing runs already in --out (e.g. after a config change)",
    )
    p.add_argument("--quiet", action="store_true", help="no line per finished run")
    p.set_defaults(handler=run)


def parse_methods(text: str) -> list[str]:
    """``"flexlora,raflora"`` → distinct method names; :class:`CLIError` otherwise."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise CLIError(f"--methods must name distinct methods, got {text!r}")
    return methods


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → distinct seeds ≥ 0; :class:`CLIError` otherwise."""
    seeds = parse_int_list(text, "--seeds")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise CLIError(f"--seeds must be distinct integers ≥ 0, got {text!r}")
    return seeds


def parse_metrics(text: str | None) -> tuple[list[str] | None, list[str]]:
    """``--metrics`` as names (``None`` when not given) and the problems with them."""
    from raflora.experiments.report import metric_problems

    if text is None:
        return None, []
    names = [m.strip() for m in text.split(",") if m.strip()]
    return names, [f"--metrics: {p}" for p in metric_problems(names)]


def _describe(outcome: RunOutcome) -> str:
    summary = outcome.summary or {}
    acc = summary.get("final_accuracy")
    acc_text = f"final accuracy {acc:.4f}" if isinstance(acc, float) else "not evaluated"
    if outcome.status == "skipped":
        return f"skipped (finished earlier), {acc_text}"
    return f"{outcome.status}, {acc_text}, {outcome.seconds:.1f} s"


def progress_printer(total: int, *, quiet: bool) -> Callable[[RunOutcome], None]:
    """A callback printing one line per run as it ends (failures always, on stderr)."""
    count = 0

    def show(outcome: RunOutcome) -> None:
        nonlocal count
        count += 1
        head = f"[{count}/{total}] {outcome.spec.label}"
        if outcome.status == "failed":
            print(f"{head}: FAILED: {outcome.error}", file=sys.stderr, flush=True)
        elif not quiet:
            print(f"{head}: {_describe(outcome)}", flush=True)

    return show


def check_out_dir(out: Path) -> None:
    """Refuse an output directory that is a file or cannot be written, before anything runs.

    Raises
    ------
    CLIError
        ``out`` (or the nearest of its parents that exists) is not a directory, or cannot be
        written.
    """
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise CLIError(f"--out {out} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out}: cannot write in {existing} (permission denied)")


@contextlib.contextmanager
def keep_going_hint(command: str, out: Path, *, out_given: bool = True) -> Iterator[None]:
    """On Ctrl-C, say which command continues where it stopped.

    Parameters
    ----------
    command : str
        The sub-command (``sweep``, ``compare``).
    out : Path
        Where the runs go.
    out_given : bool
        Whether the user chose ``out`` with ``--out``; if not (a timestamped directory), the
        same command would start a new one, so the hint names the ``--out`` to add.
    """
    try:
        yield
    except KeyboardInterrupt:
        again = "the same command again" if out_given else f"the same command with --out {out}"
        print(
            f"raflora {command}: stopped; finished runs are kept in {out}: run {again} to "
            "continue (finished runs are skipped, interrupted ones resumed)",
            file=sys.stderr,
        )
        raise


def kept_report(outcomes: Sequence[RunOutcome], report: Path) -> bool:
    """Whether to keep ``report`` as it is: no run finished and an earlier one exists (say so).

    A rerun in which every run failed (a config change, a full disk …) would otherwise
    replace the report of the runs that finished before with one of failures only.
    """
    if any(o.summary is not None for o in outcomes) or not report.is_file():
        return False
    print(
        f"raflora: no run finished: kept the previous report {report} (the failures are "
        "listed above)",
        file=sys.stderr,
    )
    return True


def write_failure(out: Path, err: OSError) -> CLIError:
    """A report that cannot be written in ``out``, as one line."""
    where = err.filename or out
    return CLIError(f"cannot write the report in {out}: {where}: {err.strerror or err}")


def failures(outcomes: Sequence[RunOutcome]) -> list[tuple[str, str]]:
    """``(run, error)`` of the failed runs."""
    return [(o.spec.label, o.error or "failed") for o in outcomes if o.status == "failed"]


def _tally(outcomes: Sequence[RunOutcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "resumed", "skipped")}
    failed = len(failures(outcomes))
    parts = [f"{n} {s}" for s, n in counts.items() if n] + ([f"{failed} FAILED"] if failed else [])
    return f"{len(outcomes)} runs: {', '.join(parts)}"


def _axes(specs: Sequence[str]) -> tuple[list[GridAxis], list[str]]:
    from raflora.experiments.sweep import SweepError, parse_grid

    axes: list[GridAxis] = []
    problems: list[str] = []
    for spec in specs:
        try:
            axes.append(parse_grid(spec))
        except SweepError as err:
            problems += err.problems
    return axes, problems


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora sweep``."""
    from raflora.experiments.report import default_metrics, write_sweep_report
    from raflora.experiments.sweep import SweepError, plan_runs, run_plan, settings_of

    files, overrides = split_config_args(args.config, args.overrides)
    if files is None:
        raise CLIError("a CONFIG file is required before the key=value overrides")
    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if args.jobs < 1:
        raise CLIError(f"--jobs must be ≥ 1, got {args.jobs}")
    check_out_dir(args.out)
    axes, problems = _axes(args.grid)
    metrics, metric_problems = parse_metrics(args.metrics)
    problems += metric_problems
    try:
        settings = settings_of(axes)  # the axes that parsed: their problems are reported too
        specs = plan_runs(files, overrides, settings, methods, seeds, args.out)
    except SweepError as err:
        problems += err.problems
    if problems:
        raise CLIError("invalid sweep:\n  " + "\n  ".join(problems))

    with keep_going_hint("sweep", args.out):
        outcomes = run_plan(
            specs,
            jobs=args.jobs,
            overwrite=args.overwrite,
            on_done=progress_printer(len(specs), quiet=args.quiet),
        )
    if kept_report(outcomes, args.out / "sweep.md"):
        return finish(outcomes, f"sweep: {args.out / 'sweep.md'} (kept)", quiet=args.quiet)
    cells: dict[str, dict[str, dict[int, dict[str, Any]]]] = {s.label: {} for s in settings}
    for o in outcomes:
        if o.summary is not None:
            cells[o.spec.setting.label].setdefault(o.spec.method, {})[o.spec.seed] = o.summary
    summaries = [o.summary for o in outcomes if o.summary is not None]
    try:
        report = write_sweep_report(
            args.out,
            cells,
            axes=[a.key for a in axes],
            methods=methods,
            seeds=seeds if seeds is not None else sorted({o.spec.seed for o in outcomes}),
            metrics=metrics if metrics is not None else default_metrics(summaries),
            failed=failures(outcomes),
        )
    except OSError as err:
        raise write_failure(args.out, err) from None
    return finish(outcomes, f"sweep: {report}", quiet=args.quiet)


def finish(outcomes: Sequence[RunOutcome], where: str, *, quiet: bool) -> int:
    """Print the tally of the runs (on stderr when any failed) and return the exit code."""
    failed = bool(failures(outcomes))
    if failed or not quiet:
        print(f"{_tally(outcomes)}; {where}", file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
