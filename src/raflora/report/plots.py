"""Run plots: accuracy, loss, higher-rank energy, energy breakdown and heat map; overlays.

Plots use :class:`matplotlib.figure.Figure` directly (rendered by the Agg canvas on ``savefig``),
never pyplot's global state, so no display is needed and nothing leaks between calls.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raflora.diagnostics import natural_key
from raflora.report.metrics import (
    ENERGY_FILE,
    EnergyRow,
    MetricsRow,
    _num,
    _round_of,
    _series,
    energy_shares,
    partition_labels,
    read_energy,
)

__all__ = [
    "write_energy_heatmap",
    "write_run_plots",
]

logger = logging.getLogger(__name__)

_DPI = 120


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
