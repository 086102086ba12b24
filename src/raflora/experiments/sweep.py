"""Sweeps: a grid of config values × methods × seeds, each an ordinary run directory.

``raflora sweep`` and ``raflora compare --seeds`` are thin commands over this module:

1. :func:`parse_grid` reads ``KEY=V1,V2,…`` (values split on commas outside brackets, braces and
   quotes, each parsed as YAML by the config loader; ``preset=A,B`` names preset files merged
   over the config), :func:`settings_of` takes the cross product of the grid's axes.
2. :func:`plan_runs` loads and validates every setting × method config before anything runs
   (every problem of every setting in one :class:`SweepError`) and gives one :class:`RunSpec`
   per run, its directory ``OUT/<setting>/<method>/seed-<s>``.
3. :func:`run_plan` runs them, in this process or ``jobs`` spawned worker processes. A finished
   run directory is skipped, an interrupted one resumed, and a run that fails (a bad value that
   only shows when the task is built, a directory locked by a live process, one holding a run
   with another config …) is recorded as failed while the others go on. A worker process that
   dies (killed, out of memory) takes only its own run with it, and that run resumes in a new
   process (failed after a second death). Sweeps run with ``threads=1`` so that a run's
   numbers depend neither on ``jobs`` nor on whether it was resumed.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from raflora.config import ConfigError, RunConfig, load_config, with_changes

if TYPE_CHECKING:
    from raflora.engine.run_files import RunResult

__all__ = [
    "PRESET_DIR",
    "PRESET_KEY",
    "GridAxis",
    "RunOutcome",
    "RunSpec",
    "Setting",
    "SweepError",
    "execute_run",
    "method_config",
    "parse_grid",
    "plan_runs",
    "resolve_preset",
    "run_plan",
    "run_state",
    "settings_of",
    "split_values",
]

PRESET_KEY = "preset"
"""The grid key whose values are preset files merged over the config."""

PRESET_DIR = Path("configs") / "paper" / "ranks"
"""Where a bare preset name is looked up (from the working directory, then the checkout)."""

_RESERVED = {
    "method": "use --methods",
    "seed": "use --seeds",
    "threads": "sweeps run every run with threads=1",
    "engine": "sweeps run on the local engine",
    "output.dir": "the sweep sets each run's directory",
}
"""Grid keys a sweep sets itself, and what to do instead."""

_OUTPUT = "output"
"""The config section of what a run writes: its keys change nothing measured."""


def _reserved(key: str) -> str | None:
    """Why ``key`` cannot be a grid key (``None`` when it can)."""
    if key in _RESERVED:
        return _RESERVED[key]
    if key == _OUTPUT or key.startswith(f"{_OUTPUT}."):
        return (
            "output settings change nothing measured and settings must differ in what is; "
            "use the config or an override instead"
        )
    return None


RunStatus = Literal["ran", "resumed", "skipped", "failed"]


class SweepError(ValueError):
    """Every problem with a sweep's grid, methods, seeds or the configs of its settings.

    Parameters
    ----------
    problems : Sequence[str]
        Self-contained messages, one per problem.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid sweep:\n" + "\n".join(f"  - {p}" for p in self.problems))


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid KEY=V1,V2,…``: a config key (or ``preset``) and its values as typed."""

    key: str
    values: tuple[str, ...]


def split_values(text: str) -> list[str]:
    """Split ``text`` on the commas outside brackets, braces and quotes.

    Parameters
    ----------
    text : str
        E.g. ``"[4,8],[8,16]"`` or ``"dir-a0.1,dir-a1.0"``.

    Returns
    -------
    list[str]
        The stripped pieces: ``["[4,8]", "[8,16]"]``.

    Raises
    ------
    ValueError
        Unbalanced brackets, braces or quotes.
    """
    pieces: list[str] = []
    current: list[str] = []
    depth = 0
    quote: str | None = None
    for ch in text:
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {ch!r} in {text!r}")
        elif ch == "," and depth == 0:
            pieces.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if quote is not None or depth != 0:
        raise ValueError(f"unclosed {'quote' if quote else 'bracket'} in {text!r}")
    pieces.append("".join(current).strip())
    return pieces


def parse_grid(spec: str) -> GridAxis:
    """Parse one ``--grid`` argument.

    Parameters
    ----------
    spec : str
        ``KEY=V1,V2,…`` (``fl.rank_levels=[4,8],[8,16]``, ``preset=conf-1,conf-2``).

    Returns
    -------
    GridAxis
        The key and the value texts (parsed as YAML when the configs are loaded).

    Raises
    ------
    SweepError
        A malformed argument, a key the sweep sets itself, an empty or repeated value.
    """
    key, sep, rest = spec.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise SweepError([f"--grid {spec!r}: expected KEY=V1,V2,…"])
    reason = _reserved(key)
    if reason is not None:
        raise SweepError([f"--grid {spec!r}: {key} cannot be swept ({reason})"])
    try:
        values = split_values(rest)
    except ValueError as err:
        raise SweepError([f"--grid {spec!r}: {err}"]) from None
    problems = [f"--grid {spec!r}: empty value"] if "" in values else []
    problems += [
        f"--grid {spec!r}: value {v!r} is repeated"
        for i, v in enumerate(values)
        if v and v in values[:i]
    ]
    if problems:
        raise SweepError(problems)
    return GridAxis(key, tuple(values))


def _preset_dirs() -> list[Path]:
    """The working directory's ``configs/paper/ranks`` and the checkout's (when installed -e)."""
    checkout = Path(__file__).resolve().parents[3] / PRESET_DIR
    return [PRESET_DIR, checkout] if checkout.resolve() != PRESET_DIR.resolve() else [PRESET_DIR]


def resolve_preset(name: str, *, search: Sequence[Path] | None = None) -> Path:
    """The preset file ``name`` refers to.

    Parameters
    ----------
    name : str
        A path to a YAML file, or a bare name (``conf-1`` or ``conf-1.yaml``) looked up in
        ``search``.
    search : Sequence[Path], optional
        Directories for bare names (default: ``configs/paper/ranks`` under the working
        directory, then under the checkout this package runs from).

    Returns
    -------
    Path
        An existing file.

    Raises
    ------
    SweepError
        No such file.
    """
    path = Path(name)
    if path.is_file():
        return path
    dirs = list(search) if search is not None else _preset_dirs()
    if path.parent == Path("."):
        for directory in dirs:
            for candidate in (directory / name, directory / f"{name}.yaml"):
                if candidate.is_file():
                    return candidate
    where = ", ".join(str(d) for d in dirs)
    raise SweepError([f"--grid {PRESET_KEY}: no preset file {name!r} (also looked in {where})"])


_UNSAFE = re.compile(r"[^A-Za-z0-9._+@-]+")


def _safe(text: str) -> str:
    """``text`` as part of a directory name: ``[4, 8]`` → ``4-8``, ``a/b c`` → ``a_b_c``."""
    text = re.sub(r"\s*,\s*", "-", text.strip()).replace(":", "-")
    text = _UNSAFE.sub("_", re.sub(r"[\[\]{}]", "", text)).strip("_")
    return text if text and not text.startswith(".") else f"_{text}"


@dataclass(frozen=True)
class Setting:
    """One point of the grid.

    Attributes
    ----------
    name : str
        Its directory name, ``KEY=VALUE`` per axis made filesystem-safe and joined with commas
        (``""`` without a grid).
    choices : tuple[tuple[str, str], ...]
        ``(key, value as typed)`` per axis, in grid order.
    files : tuple[Path, ...]
        Preset files merged over the config (``preset`` axis).
    overrides : tuple[str, ...]
        ``key=value`` overrides applied after the user's.
    """

    name: str
    choices: tuple[tuple[str, str], ...]
    files: tuple[Path, ...]
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        """``KEY=VALUE`` per axis as typed, comma-separated (``""`` without a grid)."""
        return ", ".join(f"{key}={value}" for key, value in self.choices)


def _preset_names(text: str) -> list[str]:
    """The names of one preset value: a name, or a YAML list of names (``[conf-1,dist-2]``).

    Raises
    ------
    SweepError
        A value starting with ``[`` that is not a YAML list.
    """
    if not text.startswith("["):
        return [text]
    try:
        parsed = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise SweepError(
            [f"--grid {PRESET_KEY}: value {text!r} is not a YAML list of preset names ({reason})"]
        ) from None
    if not isinstance(parsed, list) or not parsed:
        raise SweepError(
            [f"--grid {PRESET_KEY}: value {text!r} is not a non-empty list of preset names"]
        )
    return [str(name) for name in parsed]


def _preset_files(text: str) -> tuple[list[Path], list[str]]:
    """The files of one preset value (a name, or a YAML list of names merged in order)."""
    try:
        names = _preset_names(text)
    except SweepError as err:
        return [], err.problems
    files: list[Path] = []
    problems: list[str] = []
    for name in names:
        try:
            files.append(resolve_preset(str(name)))
        except SweepError as err:
            problems += err.problems
    return files, problems


def _value_label(key: str, text: str) -> str:
    """A value's part of a directory name (:class:`SweepError` for a malformed preset list)."""
    if key != PRESET_KEY:
        return _safe(text)
    return "+".join(_safe(Path(name).stem) for name in _preset_names(text))


def settings_of(axes: Sequence[GridAxis]) -> list[Setting]:
    """The cross product of the grid's axes, the first axis varying slowest.

    Parameters
    ----------
    axes : Sequence[GridAxis]
        The parsed ``--grid`` arguments (none: a single setting named ``""``).

    Returns
    -------
    list[Setting]
        One per combination of values, with distinct names (a value whose safe label repeats
        another's gets a ``_2`` … suffix).

    Raises
    ------
    SweepError
        A key given twice, or preset files that do not exist (all reported).
    """
    keys = [axis.key for axis in axes]
    problems = [f"--grid {k}: given twice" for i, k in enumerate(keys) if k in keys[:i]]
    labels: list[dict[str, str]] = []
    for axis in axes:
        seen: dict[str, int] = {}
        axis_labels = {}
        for text in axis.values:
            try:
                label = _value_label(axis.key, text)
            except SweepError as err:  # reported with the preset files' problems below
                label = _safe(text)
                problems += [p for p in err.problems if p not in problems]
            seen[label] = seen.get(label, 0) + 1
            axis_labels[text] = label if seen[label] == 1 else f"{label}_{seen[label]}"
        labels.append(axis_labels)
    settings: list[Setting] = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        files: list[Path] = []
        overrides: list[str] = []
        for axis, text in zip(axes, combo, strict=True):
            if axis.key == PRESET_KEY:
                found, missing = _preset_files(text)
                files += found
                problems += [p for p in missing if p not in problems]
            else:
                overrides.append(f"{axis.key}={text}")
        name = ",".join(
            f"{axis.key}={axis_labels[text]}"
            for axis, axis_labels, text in zip(axes, labels, combo, strict=True)
        )
        choices = tuple((axis.key, text) for axis, text in zip(axes, combo, strict=True))
        settings.append(Setting(name, choices, tuple(files), tuple(overrides)))
    if problems:
        raise SweepError(problems)
    return settings


# --------------------------------------------------------------------------- the run plan


def method_config(
    base: RunConfig,
    method: str,
    methods: Sequence[str],
    changes: Mapping[str, Any] | None = None,
) -> RunConfig:
    """``base`` for one method of a comparison, with only that method's own options.

    ``method_options`` becomes the options ``method`` takes from ``base`` (a plain key only
    where ``method`` declares it, a key named after a method only for that method), so each
    run's saved ``config.yaml`` holds what the run used and ``--resume`` / ``raflora export`` of
    its directory reproduce it. ``base`` must have been validated with ``methods``. ``changes``
    are further dotted keys (``{"output.dir": …}``).

    Returns
    -------
    RunConfig
        A new config, validated once (:func:`~raflora.config.with_changes`).

    Raises
    ------
    ConfigError
        With every problem of the method's config (its rank levels, its options).
    """
    from raflora.methods.registry import options_for

    options = options_for(method, base.method_options, methods_in_run=list(methods))
    return with_changes(base, {"method": method, "method_options": options, **(changes or {})})


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: where it goes and its complete configuration."""

    setting: Setting
    method: str
    seed: int
    run_dir: Path
    config: RunConfig

    @property
    def label(self) -> str:
        """``setting method seed s`` for progress lines and error reports."""
        return " ".join(p for p in (self.setting.label, self.method, f"seed {self.seed}") if p)


def _setting_base(
    files: Sequence[str | Path],
    overrides: Sequence[str],
    setting: Setting,
    methods: Sequence[str],
) -> tuple[RunConfig | None, list[str]]:
    """The setting's validated config (``None``) and its problems."""
    try:
        base = load_config(
            [*files, *setting.files], [*overrides, *setting.overrides], methods=methods
        )
    except ConfigError as err:
        return None, err.problems
    if base.engine != "local":
        return None, [f"engine: sweeps run on the local engine, got {base.engine!r}"]
    return base, []


def plan_runs(
    files: Sequence[str | Path],
    overrides: Sequence[str],
    settings: Sequence[Setting],
    methods: Sequence[str],
    seeds: Sequence[int] | None,
    out: Path,
    *,
    threads: int | None = 1,
) -> list[RunSpec]:
    """Every run of a sweep, each config loaded and validated before anything runs.

    Parameters
    ----------
    files : Sequence[str | Path]
        The config file(s), merged in order; a setting's preset files come after them.
    overrides : Sequence[str]
        The user's ``key=value`` overrides; a setting's grid values come after them.
    settings : Sequence[Setting]
        :func:`settings_of`.
    methods : Sequence[str]
        Distinct method names.
    seeds : Sequence[int], optional
        Distinct seeds ≥ 0 (default: each setting's configured ``seed``).
    out : Path
        The sweep's directory: runs go to ``out/<setting>/<method>/seed-<s>``.
    threads : int, optional
        Torch threads of every run (``None``: keep the config's).

    Returns
    -------
    list[RunSpec]
        Setting by setting, method by method, seed by seed.

    Raises
    ------
    SweepError
        With every problem: of the methods and seeds, and of each setting's config (prefixed by
        the setting, and by the method for method-specific ones). A problem every setting has
        is reported once.
    """
    problems = _list_problems(methods, seeds)
    if problems:
        raise SweepError(problems)
    specs: list[RunSpec] = []
    per_setting: list[tuple[Setting, list[str]]] = []
    for setting in settings:
        base, found = _setting_base(files, overrides, setting, methods)
        if base is not None:
            for method in methods:
                threads_ = threads if threads is not None else base.threads
                changes: dict[str, Any] = {"threads": threads_}
                for seed in seeds if seeds is not None else [base.seed]:
                    run_dir = out / setting.name / method / f"seed-{seed}"
                    changes |= {"seed": seed, "output.dir": str(run_dir)}
                    try:  # each run's config validated once, here
                        cfg = method_config(base, method, methods, changes)
                    except ConfigError as err:
                        found += [f"[{method}] {p}" for p in err.problems]
                        break  # the method's problems once, not once per seed
                    specs.append(RunSpec(setting, method, seed, run_dir, cfg))
        per_setting.append((setting, found))
    problems = _merge_problems(per_setting)
    if problems:
        raise SweepError(problems)
    return specs


def _list_problems(methods: Sequence[str], seeds: Sequence[int] | None) -> list[str]:
    problems = []
    if not methods or len(set(methods)) != len(methods):
        problems.append(f"methods must be distinct and at least one, got {list(methods)}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        problems.append(f"seeds must be distinct and at least one, got {list(seeds)}")
    if seeds is not None and any(s < 0 for s in seeds):
        problems.append(f"seeds must be ≥ 0, got {list(seeds)}")
    return problems


def _merge_problems(per_setting: Sequence[tuple[Setting, list[str]]]) -> list[str]:
    """Problems prefixed by their setting; those every setting (of several) has, once."""
    if not per_setting:
        return []
    common = set(per_setting[0][1]) if len(per_setting) > 1 else set()
    for _, found in per_setting[1:]:
        common &= set(found)
    merged = [p for p in dict.fromkeys(per_setting[0][1]) if p in common]
    for setting, found in per_setting:
        prefix = f"[{setting.label}] " if setting.label else ""
        merged += [f"{prefix}{p}" for p in dict.fromkeys(found) if p not in common]
    return merged


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class RunOutcome:
    """What became of one run.

    Attributes
    ----------
    spec : RunSpec
        The run.
    status : {"ran", "resumed", "skipped", "failed"}
        Started and finished / continued from its checkpoint and finished / already finished /
        did not finish.
    summary : dict or None
        Its ``summary.json`` (``None`` when it failed).
    error : str or None
        Why it failed, in one line.
    seconds : float
        Wall time spent on it here.
    """

    spec: RunSpec
    status: RunStatus
    summary: dict[str, Any] | None
    error: str | None
    seconds: float


def run_state(run_dir: Path, rounds: int) -> Literal["new", "partial", "finished"]:
    """Whether ``run_dir`` holds nothing, an unfinished run or a finished one.

    A run is finished when its ``summary.json`` holds a JSON object and its checkpoint holds
    all ``rounds``; a checkpoint otherwise (even an unreadable one, which resuming reports) is
    unfinished: resuming a run whose rounds are all saved only rewrites its summary.
    """
    from raflora.engine.checkpoint import CHECKPOINT_FILE
    from raflora.engine.run_files import SUMMARY_FILE, saved_rounds

    if not (run_dir / CHECKPOINT_FILE).exists():
        return "new"
    if _read_summary(run_dir / SUMMARY_FILE) is not None and saved_rounds(run_dir) >= rounds:
        return "finished"
    return "partial"


def _read_summary(path: Path) -> dict[str, Any] | None:
    """``path`` as a JSON object (``None`` when missing, unreadable, truncated or not one)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_same_config(run_dir: Path, config: RunConfig) -> None:
    """Refuse to reuse a run started with another config, naming the way forward.

    Raises
    ------
    SweepError
        Naming the sections that differ.
    """
    from raflora.engine.run_files import config_difference

    diff = config_difference(run_dir, config)
    if diff:
        raise SweepError(
            [
                f"{run_dir} holds a run with another config (in: {', '.join(diff)}); use "
                "another --out or --overwrite"
            ]
        )


def _one_line(err: BaseException) -> str:
    """An exception as one line; its type is named unless it is a user-facing error."""
    from raflora.engine import CheckpointError, EngineError
    from raflora.tasks import TaskError

    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, SweepError):
        return "; ".join(err.problems)
    if isinstance(err, (ConfigError, EngineError, CheckpointError, TaskError)):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def execute_run(spec: RunSpec, *, overwrite: bool = False) -> RunOutcome:
    """Run, resume or skip one run of a sweep, holding its run directory's lock.

    Parameters
    ----------
    spec : RunSpec
        The run.
    overwrite : bool
        Start over even where the directory holds a run.

    Returns
    -------
    RunOutcome
        ``skipped`` for a finished run with the same config (a finished or unfinished one with
        another config fails, saying to use another directory or ``overwrite``: it cannot be
        reused), ``resumed`` / ``ran`` otherwise, ``failed`` with the error in one
        line when anything goes wrong (a config problem, a task that cannot be built, a
        directory another live process holds …). Only ``KeyboardInterrupt`` propagates.
    """
    from raflora.engine.run_files import SUMMARY_FILE, lock_run_dir

    started = time.perf_counter()
    try:
        # the state is read under the lock (a live writer is refused); run_local takes it anew
        with lock_run_dir(spec.run_dir):
            state = "new" if overwrite else run_state(spec.run_dir, spec.config.fl.rounds)
            if state != "new":
                _check_same_config(spec.run_dir, spec.config)
            summary = _read_summary(spec.run_dir / SUMMARY_FILE)
            if state == "finished" and summary is not None:
                return RunOutcome(spec, "skipped", summary, None, time.perf_counter() - started)
        result = _run_keeping_threads(spec, resume=state == "partial", overwrite=overwrite)
    except Exception as err:  # a failed run is reported; the sweep goes on
        return RunOutcome(spec, "failed", None, _one_line(err), time.perf_counter() - started)
    status: RunStatus = "resumed" if state == "partial" else "ran"
    return RunOutcome(spec, status, result.summary, None, time.perf_counter() - started)


def _run_keeping_threads(spec: RunSpec, *, resume: bool, overwrite: bool) -> RunResult:
    """:func:`~raflora.engine.run_local`, leaving this process's torch thread count as it was
    (a run sets it from its config; the caller may run other work after it).
    """
    import torch

    from raflora.engine.local import run_local

    threads = torch.get_num_threads()
    # as the CLI does: PEFT triggers a transformers deprecation warning once per run (workers
    # are fresh processes, so the CLI's filter does not reach them)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        return run_local(
            spec.config,
            spec.run_dir,
            resume=resume,
            progress=False,
            label=spec.label,
            overwrite=overwrite,
        )
    finally:
        torch.set_num_threads(threads)


def run_plan(
    specs: Sequence[RunSpec],
    *,
    jobs: int = 1,
    overwrite: bool = False,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every run of a plan (:func:`execute_run`), ``jobs`` at a time.

    Parameters
    ----------
    specs : Sequence[RunSpec]
        :func:`plan_runs`.
    jobs : int
        1: one after another in this process; more: that many worker processes (started with
        ``spawn``, each run in one of them). Runs already finished are skipped here either way.
    overwrite : bool
        Start every run over.
    on_done : Callable[[RunOutcome], None], optional
        Called in this process as each run ends (in completion order).

    Returns
    -------
    list[RunOutcome]
        In the order of ``specs``.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    outcomes: dict[int, RunOutcome] = {}

    def done(index: int, outcome: RunOutcome) -> None:
        outcomes[index] = outcome
        if on_done is not None:
            on_done(outcome)

    pending = list(range(len(specs)))
    if jobs > 1 and not overwrite:  # no worker for what is only to be skipped
        finished = [i for i in pending if _finished(specs[i])]
        for i in finished:
            done(i, execute_run(specs[i]))
        pending = [i for i in pending if i not in set(finished)]
    if jobs == 1 or len(pending) <= 1:
        for i in pending:
            done(i, execute_run(specs[i], overwrite=overwrite))
    else:
        _run_parallel(specs, pending, min(jobs, len(pending)), overwrite, done)
    return [outcomes[i] for i in range(len(specs))]


def _finished(spec: RunSpec) -> bool:
    return run_state(spec.run_dir, spec.config.fl.rounds) == "finished"


WORKER_TRIES = 2
"""How many worker processes may die running one run before it is reported failed."""


def _run_parallel(
    specs: Sequence[RunSpec],
    pending: Sequence[int],
    workers: int,
    overwrite: bool,
    done: Callable[[int, RunOutcome], None],
) -> None:
    """``pending`` runs in ``workers`` spawned processes, each its own one-process pool.

    A process that dies (killed, out of memory) breaks only its own pool, so the death is
    that run's alone: the run goes back to the front of the queue in a fresh process (it
    resumes from its checkpoint) and is reported failed when its worker has died
    :data:`WORKER_TRIES` times. The other runs go on meanwhile.
    """
    context = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=context)

    idle = [new_pool() for _ in range(workers)]
    busy: dict[Future[RunOutcome], tuple[int, ProcessPoolExecutor]] = {}
    queue = deque(pending)
    deaths: dict[int, int] = {}
    try:
        while queue or busy:
            while queue and idle:
                index, pool = queue.popleft(), idle.pop()
                busy[pool.submit(execute_run, specs[index], overwrite=overwrite)] = (index, pool)
            finished, _ = wait(busy, return_when=FIRST_COMPLETED)
            for future in finished:
                index, pool = busy.pop(future)
                try:
                    outcome: RunOutcome | None = future.result()
                except BrokenProcessPool:  # its process died: only this run was in it
                    pool.shutdown(wait=True)
                    pool = new_pool()
                    deaths[index] = deaths.get(index, 0) + 1
                    outcome = _after_death(specs[index], deaths[index])
                except Exception as err:  # e.g. a result that cannot be sent back
                    error = f"worker process failed: {_one_line(err)}"
                    outcome = RunOutcome(specs[index], "failed", None, error, 0.0)
                idle.append(pool)
                if outcome is None:
                    queue.appendleft(index)  # resumes from its checkpoint
                else:
                    done(index, outcome)
    except KeyboardInterrupt:
        for pool in [*idle, *(pool for _, pool in busy.values())]:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    for pool in idle:
        pool.shutdown(wait=True)


def _after_death(spec: RunSpec, deaths: int) -> RunOutcome | None:
    """``None`` (run it again, saying so) or, after :data:`WORKER_TRIES` deaths, its failure."""
    if deaths < WORKER_TRIES:
        print(
            f"raflora: the worker process running {spec.label} died (killed, or out of "
            "memory?); running it again in a new one",
            file=sys.stderr,
            flush=True,
        )
        return None
    error = (
        f"its worker process died {deaths} times (killed, or out of memory?); run the same "
        "command again to retry it"
    )
    return RunOutcome(spec, "failed", None, error, 0.0)
