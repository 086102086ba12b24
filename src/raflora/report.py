"""Run reports: metrics I/O, summaries, per-run plots and cross-method comparisons.

A run records one metrics row per round (a line of ``metrics.jsonl``)::

    {"round": 3, "lr": 4e-4, "train_loss": 0.71, "accuracy": 0.83, "eval_loss": 0.52,
     "higher_rank_energy": 0.41, "energy_per_level": {"8": 0.59, "16": 0.78, "64": 1.0},
     "upload_bytes": 123456, "download_bytes": 123456, "clients": [4, 17, 2],
     "client_ranks": [8, 64, 16], "accepted": 3, "rejected": 0, "rejected_reasons": {},
     "time": {"train_seconds": 1.2, "aggregate_seconds": 0.01, "eval_seconds": 0.3,
              "round_seconds": 1.6}}

``accuracy`` and ``eval_loss`` appear only on evaluated rounds and ``train_loss`` may be ``null``
(no client accepted). With ``eval.per_level`` an evaluated round also holds ``accuracy@r`` and
``eval_loss@r`` for every rank level ``r``: the metrics of the model a client of rank ``r`` holds
(the global factors truncated to ``r``; for FLoRA the merged model, so equal to the full one).
``energy_per_level`` holds the cumulative energy ratio ``ρ_r`` of the global
update at each rank level (:mod:`raflora.diagnostics`); ``higher_rank_energy`` is ``1 − ρ_{r_1}``.
Both are means over the adapted modules; ``energy.jsonl`` holds them per module, one line per
round (:func:`raflora.diagnostics.module_energy_row`)::

    {"round": 3, "modules": {"vit.layers.0.attention.q_proj": {"higher_rank_energy": 0.41,
     "energy_per_level": {"8": 0.59, "16": 0.78, "64": 1.0}}, "vit.layers.0.mlp.fc1":
     {"higher_rank_energy": null, "energy_per_level": null}}}

(``null``: the module's update is zero). :func:`write_energy_heatmap` draws it.

Everything here works on plain dicts and lists. Plots use :class:`matplotlib.figure.Figure`
directly (rendered by the Agg canvas on ``savefig``), never pyplot's global state, so no display
is needed and nothing leaks between calls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raflora.diagnostics import natural_key

__all__ = [
    "ENERGY_FILE",
    "EnergyRow",
    "append_energy",
    "append_metrics",
    "energy_shares",
    "format_bytes",
    "partition_labels",
    "progress_postfix",
    "read_energy",
    "read_metrics",
    "summarize",
    "truncate_jsonl",
    "write_comparison",
    "write_energy_heatmap",
    "write_run_plots",
]

logger = logging.getLogger(__name__)

MetricsRow = Mapping[str, Any]
"""One round's metrics (see the module docstring for the keys)."""

EnergyRow = Mapping[str, Any]
"""One round's per-module diagnostics (a line of ``energy.jsonl``, see the module docstring)."""

ENERGY_FILE = "energy.jsonl"
"""The per-module diagnostics file of a run directory (read by :func:`write_run_plots`)."""

_TIME_PHASES = ("train_seconds", "aggregate_seconds", "eval_seconds")
_DPI = 120


# --------------------------------------------------------------------------- metrics I/O


def _json_default(obj: Any) -> Any:
    """Make numpy / torch scalars and arrays, and paths, JSON-serializable."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _drop_partial_tail(path: Path) -> None:
    """Make ``path`` end with a newline before appending to it.

    A final line without a newline is either a complete row written without one (a newline is
    added) or the partial remains of an interrupted write (it is cut off, as :func:`read_metrics`
    would skip it anyway; appending after it would turn it into a corrupt middle line).
    """
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1  # 0 when the file is a single line
        tail = data[start:]
        try:
            complete = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, ValueError):
            complete = False
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            logger.warning("%s: dropping a partial last line (%d bytes)", path, len(tail))
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def _append_jsonl(path: str | os.PathLike[str], row: Mapping[str, Any], *, allow_nan: bool) -> None:
    """Append ``row`` as one line of a JSONL file, durably (see :func:`append_metrics`)."""
    p = Path(path)
    line = json.dumps(dict(row), default=_json_default, allow_nan=allow_nan) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    _drop_partial_tail(p)
    with p.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def append_metrics(path: str | os.PathLike[str], row: MetricsRow) -> None:
    """Append one metrics row to a JSONL file, durably.

    Parameters
    ----------
    path : str or os.PathLike
        The ``metrics.jsonl`` file; it and its parent directories are created when missing.
    row : Mapping[str, Any]
        The row; numpy / torch scalars and arrays are converted with ``tolist()``. Non-finite
        floats are written as ``NaN`` / ``Infinity``, which :func:`read_metrics` reads back.

    Notes
    -----
    The row is written as one line, then flushed and ``fsync``-ed. A partial last line left by
    an interrupted write is removed first, so the file stays readable after a resume.
    """
    _append_jsonl(path, row, allow_nan=True)


def append_energy(path: str | os.PathLike[str], row: EnergyRow) -> None:
    """Append one round's per-module diagnostics to ``energy.jsonl``, durably.

    Parameters
    ----------
    path : str or os.PathLike
        The ``energy.jsonl`` file; it and its parent directories are created when missing.
    row : Mapping[str, Any]
        A :func:`raflora.diagnostics.module_energy_row`.

    Raises
    ------
    ValueError
        If the row holds a non-finite float (the file is strict JSON: a module without energy
        is ``null``). Nothing is written then.

    Notes
    -----
    Written like :func:`append_metrics` (one fsync-ed line; a partial last line left by an
    interrupted write is removed first).
    """
    try:
        _append_jsonl(path, row, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: energy row of round {row.get('round')!r}: {err}") from None


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics JSONL file, one dict per non-blank line.

    Parameters
    ----------
    path : str or os.PathLike
        The ``metrics.jsonl`` file (``energy.jsonl`` reads the same way, see
        :func:`read_energy`).

    Returns
    -------
    list[dict[str, Any]]
        The rows in file order.

    Raises
    ------
    ValueError
        If a line other than the last non-blank one is not a JSON object (the message names
        the file and the 1-based line number). An invalid *last* line is the remains of an
        interrupted write: it is skipped with a logged warning.
    """
    p = Path(path)
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows: list[dict[str, Any]] = []
    for k, (lineno, line) in enumerate(numbered):
        error: str | None = None
        try:
            value = json.loads(line)
        except ValueError as exc:
            error = f"invalid JSON ({exc})"
        else:
            if isinstance(value, dict):
                rows.append(value)
                continue
            error = f"expected a JSON object, got {type(value).__name__}"
        if k == len(numbered) - 1:
            logger.warning("%s:%d: skipping a truncated last line: %s", p, lineno, error)
            break
        raise ValueError(f"{p}:{lineno}: {error}")
    return rows


def read_energy(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``energy.jsonl``: one :func:`~raflora.diagnostics.module_energy_row` per round.

    Parameters
    ----------
    path : str or os.PathLike
        The ``energy.jsonl`` file.

    Returns
    -------
    list[dict[str, Any]]
        The rows in file order (a truncated last line is skipped, as by :func:`read_metrics`).

    Raises
    ------
    ValueError
        If a middle line is not a JSON object, or a row has no ``modules`` object (the message
        names the file and the row's position).
    """
    rows = read_metrics(path)
    for i, row in enumerate(rows):
        if not isinstance(row.get("modules"), Mapping):
            raise ValueError(f"{path}: row {i + 1} (round {row.get('round')!r}) has no modules")
    return rows


def truncate_jsonl(path: str | os.PathLike[str], rounds: int) -> int:
    """Keep the rows of rounds ``1 … rounds`` of a per-round JSONL file (``energy.jsonl``).

    A resumed run calls this with its checkpoint's round count, so rows written after the
    checkpoint by the killed run (and a partial last line) are dropped before the run appends
    again; a new run calls it with ``0`` (an empty file).

    Parameters
    ----------
    path : str or os.PathLike
        The file; created (empty) when missing.
    rounds : int
        The last round to keep (≥ 0). A row's round is its ``round`` key (its 1-based position
        when the key is missing).

    Returns
    -------
    int
        The number of rows kept.

    Notes
    -----
    The file is replaced atomically (a uniquely named temporary file in the same directory,
    fsync-ed, then renamed over it), so an interruption leaves the old or the new file whole.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be ≥ 0, got {rounds}")
    p = Path(path)
    rows = read_metrics(p) if p.exists() else []
    kept = [row for i, row in enumerate(rows) if _round_of(row, i) <= rounds]
    text = "".join(json.dumps(row, default=_json_default) + "\n" for row in kept)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the file from others
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(kept)


# --------------------------------------------------------------------------- small helpers


def _num(row: MetricsRow, key: str) -> float | None:
    """``row[key]`` as a float; ``None`` when missing, ``null`` or not a number."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _round_of(row: MetricsRow, index: int) -> int:
    """The row's 1-based round number (its position when the key is missing)."""
    value = row.get("round")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return index + 1
    return int(value)


def _series(metrics: Sequence[MetricsRow], key: str) -> tuple[list[int], list[float]]:
    """``(rounds, values)`` of the rows where ``key`` holds a finite number."""
    xs: list[int] = []
    ys: list[float] = []
    for i, row in enumerate(metrics):
        value = _num(row, key)
        if value is not None and math.isfinite(value):
            xs.append(_round_of(row, i))
            ys.append(value)
    return xs, ys


def _last(metrics: Sequence[MetricsRow], key: str) -> float | None:
    """The last finite value of ``key`` (``None`` if it never has one)."""
    _, ys = _series(metrics, key)
    return ys[-1] if ys else None


def _total(metrics: Sequence[MetricsRow], key: str) -> int:
    """Sum of an integer counter over rounds (missing / null count as 0)."""
    return int(sum(v for row in metrics if (v := _num(row, key)) is not None))


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``"512 B"``, ``"1.50 KiB"``, ``"12.34 MiB"``, ``"2.00 GiB"``.

    Parameters
    ----------
    n : float
        A byte count (≥ 0).

    Returns
    -------
    str
        Whole bytes below 1 KiB, otherwise the largest unit up to TiB with 2 decimals.
    """
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"byte count must be finite and ≥ 0, got {n}")
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if value < 1024.0 or unit == "TiB":
            break
    return f"{value:.2f} {unit}"


# --------------------------------------------------------------------------- energy breakdown


def _energy_levels(row: MetricsRow) -> dict[int, float]:
    """``{rank level: ρ}`` of a row, ascending; empty when the row has no energy data.

    Reads ``energy_per_level`` (falling back to ``energy_at_rank``, the key of
    :meth:`raflora.diagnostics.EnergyReport.to_dict`).
    """
    raw = row.get("energy_per_level")
    if raw is None:
        raw = row.get("energy_at_rank")
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"energy_per_level must be a mapping, got {type(raw).__name__}")
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            level = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"energy_per_level key {key!r} is not a rank") from None
        if level < 1:
            raise ValueError(f"energy_per_level key {key!r} is not a positive rank")
        out[level] = float(value)
    return dict(sorted(out.items()))


def partition_labels(levels: Sequence[int]) -> list[str]:
    """Legend labels of the rank partitions ``(prev, h]``: ``["ranks 1–8", "ranks 9–16", …]``.

    Parameters
    ----------
    levels : Sequence[int]
        Ascending rank levels.

    Returns
    -------
    list[str]
        One label per level; a partition of a single rank reads ``"rank 9"``.
    """
    labels: list[str] = []
    prev = 0
    for h in levels:
        labels.append(f"rank {h}" if h == prev + 1 else f"ranks {prev + 1}–{h}")
        prev = h
    return labels


def energy_shares(row: MetricsRow) -> dict[str, float]:
    """Share of the global update's energy in each rank partition (paper Figure 2).

    Partition ``h`` covers ranks ``(prev(h), h]`` and holds ``ρ_h − ρ_prev`` (``ρ_0 = 0``), so
    the shares sum to ``ρ`` at the largest level, which is 1 when it is ``r_max``.

    Parameters
    ----------
    row : Mapping[str, Any]
        A metrics row with ``energy_per_level`` (string rank keys, any order).

    Returns
    -------
    dict[str, float]
        Rank level (as a string, e.g. ``"16"``) → share, in ascending rank order; empty when the
        row has no energy data. Tiny negative differences (rounding in the per-module means) are
        clipped to 0.

    Raises
    ------
    ValueError
        If a key is not a positive integer rank.
    """
    shares: dict[str, float] = {}
    prev = 0.0
    for level, rho in _energy_levels(row).items():
        shares[str(level)] = max(0.0, rho - prev)
        prev = rho
    return shares


# --------------------------------------------------------------------------- summary


_LEVEL_ACCURACY = re.compile(r"^accuracy@(\d+)$")


def _accuracy_levels(metrics: Sequence[MetricsRow]) -> list[int]:
    """Rank levels ``r`` with an ``accuracy@r`` key in any row, ascending."""
    found = {int(m.group(1)) for row in metrics for key in row if (m := _LEVEL_ACCURACY.match(key))}
    return sorted(found)


def _per_level_summary(metrics: Sequence[MetricsRow]) -> dict[str, float | None]:
    """``final_accuracy@r`` and ``best_accuracy@r`` of every level evaluated (per-level rows)."""
    out: dict[str, float | None] = {}
    for rank in _accuracy_levels(metrics):
        _, accs = _series(metrics, f"accuracy@{rank}")
        out[f"final_accuracy@{rank}"] = accs[-1] if accs else None
        out[f"best_accuracy@{rank}"] = max(accs) if accs else None
    return out


def summarize(
    metrics: Sequence[MetricsRow],
    *,
    method: str,
    wall_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Summary of a run's metrics (JSON-ready).

    Parameters
    ----------
    metrics : Sequence[Mapping[str, Any]]
        One row per round, in round order.
    method : str
        The aggregation method's name.
    wall_seconds : float
        Wall-clock duration of the whole run.
    extra : Mapping[str, Any], optional
        More entries (task, model, seed, …) merged into the summary.

    Returns
    -------
    dict[str, Any]
        ``method``, ``rounds`` (the last round number, 0 without rows), ``evaluated_rounds``;
        ``final_accuracy`` / ``final_eval_loss`` (last evaluated round), ``best_accuracy`` and
        ``best_round`` (earliest round reaching it); ``final_train_loss`` (last round with a
        train loss); ``final_higher_rank_energy`` (last round with the value),
        ``mean_higher_rank_energy`` (mean over rounds with it) and ``final_energy_shares``
        (:func:`energy_shares` of the last row with energy data); ``total_upload_bytes``,
        ``total_download_bytes``; ``clients_accepted``, ``clients_rejected`` (totals);
        ``wall_seconds`` and ``time`` = per-phase totals ``train_seconds``,
        ``aggregate_seconds``, ``eval_seconds``, ``round_seconds`` and ``other_seconds``
        (``wall − train − aggregate − eval``, clipped at 0). With per-level evaluation
        (``accuracy@r`` in the rows) also ``final_accuracy@r`` and ``best_accuracy@r`` for
        every rank level ``r``, in rank order. Values are ``None`` when the data never appears;
        non-finite values (a diverged loss) are ignored.

    Raises
    ------
    ValueError
        If ``extra`` sets a computed key to a different value.
    """
    acc_rounds, accs = _series(metrics, "accuracy")
    best_accuracy: float | None = None
    best_round: int | None = None
    for rnd, acc in zip(acc_rounds, accs, strict=True):
        if best_accuracy is None or acc > best_accuracy:
            best_accuracy, best_round = acc, rnd
    eval_rounds = {
        _round_of(row, i)
        for i, row in enumerate(metrics)
        if _num(row, "accuracy") is not None or _num(row, "eval_loss") is not None
    }
    _, hre = _series(metrics, "higher_rank_energy")
    phases = {name: 0.0 for name in (*_TIME_PHASES, "round_seconds")}
    for row in metrics:
        times = row.get("time")
        if isinstance(times, Mapping):
            for name in phases:
                value = _num(times, name)
                if value is not None and math.isfinite(value):
                    phases[name] += value
    wall = float(wall_seconds)
    phases["other_seconds"] = max(0.0, wall - sum(phases[name] for name in _TIME_PHASES))
    energy_rows = [row for row in metrics if _energy_levels(row)]

    summary: dict[str, Any] = {
        "method": method,
        "rounds": max((_round_of(row, i) for i, row in enumerate(metrics)), default=0),
        "evaluated_rounds": len(eval_rounds),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": best_accuracy,
        "best_round": best_round,
        "final_eval_loss": _last(metrics, "eval_loss"),
        "final_train_loss": _last(metrics, "train_loss"),
        "final_higher_rank_energy": hre[-1] if hre else None,
        "mean_higher_rank_energy": sum(hre) / len(hre) if hre else None,
        "final_energy_shares": energy_shares(energy_rows[-1]) if energy_rows else None,
        "total_upload_bytes": _total(metrics, "upload_bytes"),
        "total_download_bytes": _total(metrics, "download_bytes"),
        "clients_accepted": _total(metrics, "accepted"),
        "clients_rejected": _total(metrics, "rejected"),
        "wall_seconds": wall,
        "time": phases,
    }
    summary.update(_per_level_summary(metrics))
    for key, value in (extra or {}).items():
        if key in summary and summary[key] != value:
            raise ValueError(
                f"extra[{key!r}] = {value!r} conflicts with the computed {summary[key]!r}"
            )
        summary[key] = value
    return summary


def progress_postfix(row: MetricsRow) -> dict[str, str]:
    """Short fields of one metrics row for a progress bar (``tqdm.set_postfix``).

    Parameters
    ----------
    row : Mapping[str, Any]
        A metrics row.

    Returns
    -------
    dict[str, str]
        ``loss`` (train loss, 4 decimals), ``acc`` (accuracy in %, evaluated rounds only),
        ``acc@r`` (the smallest rank level's accuracy in %, with per-level evaluation), ``hre``
        (higher-rank energy, 3 decimals) and ``rej`` (rejected clients, when any); keys whose
        value is missing are left out.
    """
    out: dict[str, str] = {}
    loss = _num(row, "train_loss")
    if loss is not None:
        out["loss"] = f"{loss:.4f}"
    acc = _num(row, "accuracy")
    if acc is not None:
        out["acc"] = f"{100.0 * acc:.1f}%"
    levels = _accuracy_levels([row])
    if levels and (low := _num(row, f"accuracy@{levels[0]}")) is not None:
        out[f"acc@{levels[0]}"] = f"{100.0 * low:.1f}%"
    hre = _num(row, "higher_rank_energy")
    if hre is not None:
        out["hre"] = f"{hre:.3f}"
    rejected = _num(row, "rejected")
    if rejected:
        out["rej"] = str(int(rejected))
    return out


# --------------------------------------------------------------------------- plots


def _figure(nrows: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(6.4, 4.0 if nrows == 1 else 3.2 * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    return fig, axes


def _save(fig: Figure, path: Path, title: str, *, axis_title: str) -> Path:
    fig.suptitle(f"{title}: {axis_title}" if title else axis_title)
    fig.savefig(path, dpi=_DPI)
    return path


def _plot_accuracy(path: Path, metrics: Sequence[MetricsRow], title: str) -> Path | None:
    xs, ys = _series(metrics, "accuracy")
    if not xs:
        return None
    fig, (ax,) = _figure()
    ax.plot(xs, [100.0 * y for y in ys], marker="o", markersize=3)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    return _save(fig, path, title, axis_title="accuracy")


def _plot_loss(path: Path, metrics: Sequence[MetricsRow], title: str) -> Path | None:
    train = _series(metrics, "train_loss")
    evals = _series(metrics, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    fig, (ax,) = _figure()
    if train[0]:
        ax.plot(*train, label="train loss")
    if evals[0]:
        ax.plot(*evals, marker="o", markersize=3, label="eval loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, title, axis_title="loss")


def _plot_hre(path: Path, metrics: Sequence[MetricsRow], title: str) -> Path | None:
    xs, ys = _series(metrics, "higher_rank_energy")
    if not xs:
        return None
    fig, (ax,) = _figure()
    ax.plot(xs, ys)
    ax.set_xlabel("round")
    ax.set_ylabel("higher-rank energy 1 − ρ$_{r_1}$")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    return _save(fig, path, title, axis_title="higher-rank energy")


def _plot_energy_breakdown(path: Path, metrics: Sequence[MetricsRow], title: str) -> Path | None:
    """Stacked energy shares per rank partition over rounds.

    Rows whose rank levels differ from the last row's are left out (the partitions would not
    line up).
    """
    rows = [(_round_of(row, i), energy_shares(row)) for i, row in enumerate(metrics)]
    rows = [(rnd, shares) for rnd, shares in rows if shares]
    if not rows:
        return None
    keys = list(rows[-1][1])
    rows = [(rnd, shares) for rnd, shares in rows if list(shares) == keys]
    xs = [rnd for rnd, _ in rows]
    stacks = [[shares[k] for _, shares in rows] for k in keys]
    fig, (ax,) = _figure()
    labels = partition_labels([int(k) for k in keys])
    if len(xs) == 1:  # an area needs two points: draw a bar instead
        bottom = 0.0
        for ys, label in zip(stacks, labels, strict=True):
            ax.bar(xs, ys, bottom=bottom, width=0.6, label=label)
            bottom += ys[0]
    else:
        ax.stackplot(xs, *stacks, labels=labels, alpha=0.85)
        ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("round")
    ax.set_ylabel("share of update energy")
    ax.legend(loc="lower left", fontsize="small", title="partition")
    return _save(fig, path, title, axis_title="energy per rank partition")


_HEATMAP_MAX_LABELS = 50
"""At most this many module names on the heat map's y axis (every k-th beyond it)."""


def _common_prefix(names: Sequence[str]) -> str:
    """The longest common prefix of dotted ``names`` ending at a dot (``""`` for one name)."""
    if len(names) < 2:
        return ""
    parts = [name.split(".")[:-1] for name in names]  # the last part always stays
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if any(part != column[0] for part in column):
            break
        common.append(column[0])
    return "".join(f"{part}." for part in common)


def _energy_grid(rows: Sequence[EnergyRow]) -> tuple[list[str], list[int], list[list[float]]]:
    """``(modules, rounds, grid)``: higher-rank energy per module (row) and round (column).

    Modules in natural name order, rounds from the first to the last row's (every round, so the
    x axis is linear); a round without a row, a module absent from a row and a ``null`` value
    are ``nan``.
    """
    by_round: dict[int, Mapping[str, Any]] = {}
    names: set[str] = set()
    for i, row in enumerate(rows):
        modules = row.get("modules")
        if isinstance(modules, Mapping):
            by_round[_round_of(row, i)] = modules
            names.update(modules)
    if not names:
        return [], [], []
    modules = sorted(names, key=natural_key)
    rounds = list(range(min(by_round), max(by_round) + 1))
    grid = []
    for name in modules:
        line = []
        for rnd in rounds:
            entry = by_round.get(rnd, {}).get(name)
            value = _num(entry, "higher_rank_energy") if isinstance(entry, Mapping) else None
            line.append(value if value is not None and math.isfinite(value) else math.nan)
        grid.append(line)
    return modules, rounds, grid


def write_energy_heatmap(
    run_dir: str | os.PathLike[str], rows: Sequence[EnergyRow], *, title: str = ""
) -> Path | None:
    """Write ``energy_heatmap.png``: higher-rank energy per module (y) and round (x).

    Parameters
    ----------
    run_dir : str or os.PathLike
        Output directory (created when missing).
    rows : Sequence[Mapping[str, Any]]
        ``energy.jsonl`` rows (:func:`raflora.diagnostics.module_energy_row`).
    title : str, optional
        Prefix of the figure title.

    Returns
    -------
    Path or None
        The PNG, or ``None`` (nothing written) when no row has a module. Colour is
        ``1 − ρ_{r_1}`` on a fixed ``[0, 1]`` scale (dark: collapsed), grey where a module has
        no energy (``null``) or a round has no row. Modules are in natural name order; a prefix
        common to all names is moved into the axis label, and beyond 50 modules every k-th name
        is shown.
    """
    modules, rounds, grid = _energy_grid(rows)
    if not modules:
        return None
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(modules)
    step = math.ceil(n / _HEATMAP_MAX_LABELS)
    shown = math.ceil(n / step)
    fig = Figure(figsize=(8.0, 1.8 + 0.17 * max(shown, 8)), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(
        np.ma.masked_invalid(np.asarray(grid, dtype=float)),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
        extent=(rounds[0] - 0.5, rounds[-1] + 0.5, n - 0.5, -0.5),
    )
    prefix = _common_prefix(modules)
    ax.set_yticks(range(0, n, step), [m[len(prefix) :] for m in modules[::step]], fontsize=7)
    ylabel = f"module: {prefix}*" if prefix else "module"
    ax.set_ylabel(ylabel + (f" ({n} modules, 1 in {step} named)" if step > 1 else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round" + (" (grey: no energy data)" if np.isnan(grid).any() else ""))
    fig.colorbar(image, ax=ax, label="higher-rank energy 1 − ρ$_{r_1}$")
    return _save(fig, out / "energy_heatmap.png", title, axis_title="higher-rank energy per module")


def _plot_energy_file(run_dir: Path, title: str) -> Path | None:
    """The heat map of ``run_dir``'s ``energy.jsonl`` (``None`` without the file or its data)."""
    path = run_dir / ENERGY_FILE
    if not path.exists():
        return None
    try:
        rows = read_energy(path)
    except (OSError, ValueError) as err:  # a damaged diagnostics file must not fail the run
        logger.warning("no energy heat map: %s", err)
        return None
    return write_energy_heatmap(run_dir, rows, title=title)


def write_run_plots(
    run_dir: str | os.PathLike[str], metrics: Sequence[MetricsRow], *, title: str = ""
) -> list[Path]:
    """Write a run's PNG plots into ``run_dir`` (created when missing).

    Parameters
    ----------
    run_dir : str or os.PathLike
        Output directory.
    metrics : Sequence[Mapping[str, Any]]
        One row per round.
    title : str, optional
        Prefix of every figure title (e.g. the method and task).

    Returns
    -------
    list[Path]
        The files written, among ``accuracy.png`` (evaluated rounds), ``loss.png`` (train loss
        per round, eval loss on evaluated rounds), ``higher_rank_energy.png`` (``1 − ρ_{r_1}``)
        and ``energy_breakdown.png`` (paper Figure 2: stacked share of the update's energy in
        each rank partition, see :func:`energy_shares`). A plot whose data never appears is
        skipped (an existing file of that name is left alone). When ``run_dir`` holds an
        ``energy.jsonl``, also ``energy_heatmap.png`` (:func:`write_energy_heatmap`; a file that
        cannot be read is skipped with a logged warning).
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, plot in (
        ("accuracy.png", _plot_accuracy),
        ("loss.png", _plot_loss),
        ("higher_rank_energy.png", _plot_hre),
        ("energy_breakdown.png", _plot_energy_breakdown),
    ):
        path = plot(out / name, metrics, title)
        if path is not None:
            written.append(path)
    heatmap = _plot_energy_file(out, title)
    if heatmap is not None:
        written.append(heatmap)
    return written


def _overlay(
    path: Path,
    runs: Mapping[str, Sequence[MetricsRow]],
    keys: Sequence[tuple[str, str]],
    *,
    scale: float = 1.0,
    title: str,
) -> Path | None:
    """One panel per ``(metric key, y label)`` with data, one line per method."""
    panels = [
        (key, label, {m: _series(rows, key) for m, rows in runs.items()}) for key, label in keys
    ]
    panels = [p for p in panels if any(xs for xs, _ in p[2].values())]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (_, label, series) in zip(axes, panels, strict=True):
        for i, (method, (xs, ys)) in enumerate(series.items()):
            if xs:  # colour by method index: the same method keeps its colour in every panel
                ax.plot(
                    xs,
                    [scale * y for y in ys],
                    label=method,
                    color=f"C{i % 10}",
                    marker="." if len(xs) < 30 else None,
                )
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=_DPI)
    return path


# --------------------------------------------------------------------------- comparison


_COMPARISON_HEADER = """\
# Method comparison

One row per aggregation method.

- **Final acc.**: accuracy at the last evaluated round; **Best acc. (round)**: the highest
  accuracy over evaluated rounds and the (earliest) round reaching it.
- **Final HRE** / **Mean HRE**: the higher-rank energy `1 − ρ_{r1}` of the global update at the
  last round / averaged over rounds: the share of the update's energy in directions beyond the
  smallest client rank `r1` (mean over adapted modules). Higher is better: it shows that the
  extra rank capacity of high-rank clients is used; rank collapse drives it to 0.
- **Upload** / **Download**: total client→server / server→client traffic over the run (binary
  units). **Traffic (× min)**: upload + download relative to the method with the least traffic.
- **Wall (s)**: wall-clock time of the whole run.
"""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100.0 * float(value):.1f}%"


def _fixed(value: Any, digits: int) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def _per_level_table(
    runs: Mapping[str, tuple[Mapping[str, Any], Sequence[MetricsRow]]],
) -> list[str]:
    """Final accuracy of what a client of each rank level holds (``eval.per_level``), if any."""
    levels = sorted(
        {
            int(key.split("@", 1)[1])
            for summary, _ in runs.values()
            for key in summary
            if key.startswith("final_accuracy@") and key.split("@", 1)[1].isdigit()
        }
    )
    if not levels:
        return []
    lines = [
        "",
        "### Final accuracy per rank level",
        "",
        "What a client of rank r holds: the global model truncated to r (`eval.per_level`).",
        "",
        "| Method | " + " | ".join(f"r = {r}" for r in levels) + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for method, (summary, _) in runs.items():
        cells = [_pct(summary.get(f"final_accuracy@{r}")) for r in levels]
        lines.append(f"| {_escape(method)} | " + " | ".join(cells) + " |")
    return lines


def write_comparison(
    out_dir: str | os.PathLike[str],
    runs: Mapping[str, tuple[Mapping[str, Any], Sequence[MetricsRow]]],
    *,
    skipped: Mapping[str, str] | None = None,
) -> Path:
    """Write ``comparison.md`` and overlay plots comparing several methods' runs.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output directory (created when missing).
    runs : Mapping[str, tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]]
        Method → ``(summary, metrics)``, with the summary from :func:`summarize`; rows appear in
        this order.
    skipped : Mapping[str, str], optional
        Methods that were not run → why (``raflora compare --methods all``), listed after the
        table.

    Returns
    -------
    Path
        The Markdown file: a header explaining the columns, then a table with, per method,
        final and best accuracy (%, 1 decimal), final and mean higher-rank energy (3 decimals),
        total upload and download (:func:`format_bytes`), the traffic ratio to the lightest
        method and the wall time (and, when the summaries have ``final_accuracy@r``, a table of
        the final accuracy per rank level), then links to the overlay plots written next to it:
        ``comparison_accuracy.png``, ``comparison_higher_rank_energy.png`` and
        ``comparison_loss.png`` (train loss, and eval loss in a second panel when recorded);
        a plot whose data no run has is skipped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traffic = {
        method: int(summary.get("total_upload_bytes") or 0)
        + int(summary.get("total_download_bytes") or 0)
        for method, (summary, _) in runs.items()
    }
    positive = [t for t in traffic.values() if t > 0]
    least = min(positive) if positive else 0

    lines = [
        _COMPARISON_HEADER,
        "| Method | Final acc. | Best acc. (round) | Final HRE | Mean HRE | Upload | Download "
        "| Traffic (× min) | Wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, (summary, _) in runs.items():
        best = _pct(summary.get("best_accuracy"))
        if summary.get("best_accuracy") is not None and summary.get("best_round") is not None:
            best += f" ({int(summary['best_round'])})"
        ratio = f"{traffic[method] / least:.2f}×" if least > 0 and traffic[method] > 0 else "—"
        cells = [
            _escape(method),
            _pct(summary.get("final_accuracy")),
            best,
            _fixed(summary.get("final_higher_rank_energy"), 3),
            _fixed(summary.get("mean_higher_rank_energy"), 3),
            format_bytes(int(summary.get("total_upload_bytes") or 0)),
            format_bytes(int(summary.get("total_download_bytes") or 0)),
            ratio,
            _fixed(summary.get("wall_seconds"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines.extend(["", "Skipped:", ""])
        lines.extend(f"- {_escape(m)}: {reason}" for m, reason in skipped.items())
    lines.extend(_per_level_table(runs))

    series = {method: rows for method, (_, rows) in runs.items()}
    plots = [
        _overlay(
            out / "comparison_accuracy.png",
            series,
            [("accuracy", "accuracy (%)")],
            scale=100.0,
            title="accuracy",
        ),
        _overlay(
            out / "comparison_higher_rank_energy.png",
            series,
            [("higher_rank_energy", "1 − ρ$_{r_1}$")],
            title="higher-rank energy",
        ),
        _overlay(
            out / "comparison_loss.png",
            series,
            [("train_loss", "train loss"), ("eval_loss", "eval loss")],
            title="loss",
        ),
    ]
    written = [p for p in plots if p is not None]
    if written:
        lines.extend(["", "## Plots", ""])
        lines.extend(f"![{p.stem}]({p.name})\n" for p in written)
    path = out / "comparison.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
