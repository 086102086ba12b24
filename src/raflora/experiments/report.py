"""Reports over several seeds and settings: ``comparison.md`` of ``raflora compare --seeds`` and
``sweep.md`` of ``raflora sweep``, with their plots.

Metrics are keys of the runs' ``summary.json`` (:func:`raflora.report.summarize`) plus
``traffic`` (``total_upload_bytes + total_download_bytes``); statistics over seeds come from
:mod:`raflora.experiments.stats`. The single-seed ``comparison.md`` stays
:func:`raflora.report.write_comparison`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from matplotlib.ticker import AutoLocator

from raflora.experiments.stats import CONFIDENCE, PairedStats, SeedStats, describe, paired
from raflora.report import (
    _DPI,
    MetricsRow,
    _escape,
    _figure,
    _series,
    format_bytes,
    summarize,
)

__all__ = [
    "DEFAULT_METRICS",
    "TRAFFIC",
    "default_metrics",
    "higher_is_better",
    "known_metrics",
    "metric_label",
    "metric_problems",
    "metric_value",
    "seed_stats",
    "write_seed_comparison",
    "write_sweep_report",
]

TRAFFIC = "traffic"
"""The derived metric ``total_upload_bytes + total_download_bytes``."""

DEFAULT_METRICS = (
    "final_accuracy",
    "best_accuracy",
    "final_higher_rank_energy",
    "mean_higher_rank_energy",
    TRAFFIC,
)
"""The metrics reported when none are asked for (plus per-level accuracies when present)."""

_PER_LEVEL = re.compile(r"^(final|best)_accuracy@(\d+)$")
_NOT_METRICS = frozenset({"method", "time", "final_energy_shares"})
_LOWER_IS_BETTER = frozenset(
    {
        TRAFFIC,
        "total_upload_bytes",
        "total_download_bytes",
        "final_eval_loss",
        "final_train_loss",
        "wall_seconds",
        "clients_rejected",
        "final_epsilon",
    }
)
_LABELS = {
    "final_accuracy": "Final acc.",
    "best_accuracy": "Best acc.",
    "final_higher_rank_energy": "Final HRE",
    "mean_higher_rank_energy": "Mean HRE",
    TRAFFIC: "Traffic",
    "final_eval_loss": "Final eval loss",
    "final_train_loss": "Final train loss",
    "wall_seconds": "Wall (s)",
    "final_epsilon": "ε",
}

Summaries = Mapping[int, Mapping[str, Any]]
"""Seed → a run's summary."""


# --------------------------------------------------------------------------- metrics


def known_metrics() -> list[str]:
    """Every run summary's metric names (:func:`~raflora.report.summarize`) and ``traffic``,
    the defaults first.
    """
    keys = summarize([], method="", wall_seconds=0.0)
    rest = [k for k in keys if k not in _NOT_METRICS and k not in DEFAULT_METRICS]
    return [*DEFAULT_METRICS, *rest]


def metric_problems(names: Sequence[str], summaries: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """Problems with the metric names asked for (empty when all are known).

    Parameters
    ----------
    names : Sequence[str]
        The ``--metrics`` names.
    summaries : Sequence[Mapping[str, Any]]
        Run summaries whose numeric keys are also accepted.

    Returns
    -------
    list[str]
        One message per unknown or repeated name, listing the available ones. Per-level
        accuracies ``final_accuracy@<rank>`` / ``best_accuracy@<rank>`` are accepted before any
        run exists (they are present when the runs evaluate per level).
    """
    available = known_metrics()
    for summary in summaries:
        available += [
            k
            for k, v in summary.items()
            if k not in available and isinstance(v, int | float) and not isinstance(v, bool)
        ]
    problems = [f"metric {n!r} is repeated" for i, n in enumerate(names) if n in names[:i]]
    unknown = [n for n in names if n not in available and not _PER_LEVEL.match(n)]
    if unknown:
        problems.append(
            f"unknown metric(s) {', '.join(map(repr, unknown))}; available: "
            f"{', '.join(available)}, final_accuracy@<rank>, best_accuracy@<rank>"
        )
    if not names:
        problems.append("at least one metric is needed")
    return problems


def _level(name: str) -> int:
    match = _PER_LEVEL.match(name)
    return int(match.group(2)) if match else 0


def default_metrics(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """:data:`DEFAULT_METRICS`, then ``final_accuracy@<r>`` for each level any summary has, then
    ``final_epsilon`` when some run is private (docs/privacy.md).
    """
    levels = {k for s in summaries for k in s if k.startswith("final_accuracy@") and _level(k)}
    private = ["final_epsilon"] if any("final_epsilon" in s for s in summaries) else []
    return [*DEFAULT_METRICS, *sorted(levels, key=_level), *private]


def metric_value(summary: Mapping[str, Any], name: str) -> float | None:
    """The metric ``name`` of one run's summary (``None`` when absent, null or not finite)."""
    if name == TRAFFIC:
        up, down = summary.get("total_upload_bytes"), summary.get("total_download_bytes")
        if up is None or down is None:
            return None
        return float(up) + float(down)
    value = summary.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def higher_is_better(name: str) -> bool:
    """The metric's direction (traffic, losses and time: lower is better)."""
    return name not in _LOWER_IS_BETTER


def _is_pct(name: str) -> bool:
    return "accuracy" in name


def _is_bytes(name: str) -> bool:
    return name == TRAFFIC or name.endswith("_bytes")


def metric_label(name: str) -> str:
    """A column title: ``Final acc. (%)``, ``Final acc. @8 (%)``, ``Mean HRE``, ``Traffic``."""
    match = _PER_LEVEL.match(name)
    if match:
        base = f"{_LABELS[f'{match.group(1)}_accuracy']} @{match.group(2)}"
    else:
        base = _LABELS.get(name, name)
    return f"{base} (%)" if _is_pct(name) else base


def _fmt(name: str, value: float, *, signed: bool = False) -> str:
    """One number of a metric: accuracy in % (1 decimal), bytes in binary units, else 3 decimals.

    ``signed`` (differences): a leading ``+`` or ``−``.
    """
    sign = ("+" if value >= 0 else "−") if signed else ("" if value >= 0 else "−")
    magnitude = abs(value)
    if _is_bytes(name):
        return sign + format_bytes(magnitude)
    if _is_pct(name):
        return f"{sign}{100.0 * magnitude:.1f}"
    return f"{sign}{magnitude:.3f}"


def seed_stats(summaries: Summaries, name: str) -> SeedStats | None:
    """:func:`~raflora.experiments.stats.describe` of a metric over the seeds that have it
    (``None``: none).
    """
    values = [v for s in summaries.values() if (v := metric_value(s, name)) is not None]
    return describe(values) if values else None


def _cell(name: str, stats: SeedStats | None, *, signed: bool = False, ci: bool = True) -> str:
    """``mean ± std [low, high]`` (``—`` without data; no spread or interval for one seed)."""
    if stats is None:
        return "—"
    text = _fmt(name, stats.mean, signed=signed)
    if stats.std is not None:
        text += f" ± {_fmt(name, stats.std)}"
    if ci and stats.ci_low is not None and stats.ci_high is not None:
        low, high = (
            _fmt(name, stats.ci_low, signed=signed),
            _fmt(name, stats.ci_high, signed=signed),
        )
        text += f" [{low}, {high}]"
    return text


def _values(summaries: Summaries, name: str) -> dict[int, float]:
    return {seed: v for seed, s in summaries.items() if (v := metric_value(s, name)) is not None}


# --------------------------------------------------------------------------- multi-seed compare

_SEEDS_HEADER = """\
# Method comparison over {n} seeds

Seeds: {seeds}. For a given seed every method ran on the same client partitions, client ranks
and client sampling. Each cell: mean ± sample standard deviation over the seeds, then the
{pct:g} % confidence interval of the mean in brackets (Student t, n − 1 degrees of freedom).

- **acc.**: accuracy in % (final: last evaluated round; best: highest over evaluated rounds);
  `@r`: the global model truncated to rank level r.
- **HRE**: higher-rank energy `1 − ρ_{{r1}}` of the global update at the last round (final) or
  averaged over rounds (mean): the share of its energy beyond the smallest client rank. Higher
  is better; rank collapse drives it to 0.
- **Traffic**: client→server plus server→client bytes over the run (binary units).
"""


def _method_table(
    runs: Mapping[str, Summaries], metrics: Sequence[str], seeds: Sequence[int]
) -> list[str]:
    lines = [
        "| Method | Seeds | " + " | ".join(metric_label(m) for m in metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for method, summaries in runs.items():
        cells = [_cell(m, seed_stats(summaries, m)) for m in metrics]
        lines.append(f"| {_escape(method)} | {len(summaries)}/{len(seeds)} | {' | '.join(cells)} |")
    return lines


def _diff_label(name: str) -> str:
    return metric_label(name).replace("(%)", "(pp)")


def _paired_section(
    runs: Mapping[str, Summaries], metrics: Sequence[str], baseline: str, seeds: Sequence[int]
) -> list[str]:
    """Per method: mean difference to ``baseline`` [CI] per metric, W/T/L, per-seed table."""
    first = metrics[0]
    direction = "higher" if higher_is_better(first) else "lower"
    lines = [
        "",
        f"## Paired differences against {_escape(baseline)}",
        "",
        f"Each method minus {_escape(baseline)}, seed by seed (accuracy in percentage points,\n"
        "pp): the mean difference ± standard deviation and its confidence interval.\n"
        f"**W / T / L**: seeds where the method is better / equal / worse than {baseline} on\n"
        f"{metric_label(first).removesuffix(' (%)')} ({direction} is better).",
        "",
        "| Method | " + " | ".join(_diff_label(m) for m in metrics) + " | W / T / L |",
        "|---|" + "---:|" * (len(metrics) + 1),
    ]
    base = runs.get(baseline, {})
    pairs: dict[str, dict[str, PairedStats]] = {}
    for method, summaries in runs.items():
        if method == baseline:
            continue
        pairs[method] = {
            m: paired(a, b, higher_is_better=higher_is_better(m))
            for m in metrics
            if set(a := _values(summaries, m)) & set(b := _values(base, m))
        }
        found = pairs[method]
        cells = [_cell(m, found[m].stats, signed=True) if m in found else "—" for m in metrics]
        wtl = f"{found[first].wins} / {found[first].ties} / {found[first].losses}"
        lines.append(
            f"| {_escape(method)} | {' | '.join(cells)} | {wtl if first in found else '—'} |"
        )
    lines += ["", "### Per-seed differences", ""]
    lines += ["| Method | Metric | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines += ["|---|---|" + "---:|" * len(seeds)]
    for method, found in pairs.items():
        for m, stats in found.items():
            diffs = stats.differences
            cells = [_fmt(m, diffs[s], signed=True) if s in diffs else "—" for s in seeds]
            lines.append(f"| {_escape(method)} | {_diff_label(m)} | {' | '.join(cells)} |")
    return lines


def _failed_section(failed: Sequence[tuple[str, str]]) -> list[str]:
    if not failed:
        return []
    lines = ["", "## Failed runs", ""]
    lines += [f"- {_escape(label)}: {_escape(error)}" for label, error in failed]
    return lines


def write_seed_comparison(
    out_dir: str | os.PathLike[str],
    runs: Mapping[str, Mapping[int, tuple[Mapping[str, Any], Sequence[MetricsRow]]]],
    *,
    seeds: Sequence[int],
    metrics: Sequence[str],
    baseline: str,
    failed: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``comparison.md`` and its plots for methods run over several seeds.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output directory (created when missing).
    runs : Mapping[str, Mapping[int, tuple[Mapping, Sequence[Mapping]]]]
        Method → seed → ``(summary, metrics rows)`` of its finished runs; methods appear in
        this order.
    seeds : Sequence[int]
        The seeds asked for (a run that failed is missing from ``runs``).
    metrics : Sequence[str]
        Metric names (:func:`metric_value`); the first decides wins / ties / losses.
    baseline : str
        The method every other one is paired with.
    failed : Sequence[tuple[str, str]]
        ``(run, error)`` of the runs that failed, listed at the end.

    Returns
    -------
    Path
        The Markdown file: a header, a table of mean ± std [CI] per method and metric, the
        paired differences against ``baseline`` (mean ± std [CI] per metric, W / T / L on the
        first metric, then every seed's difference), links to ``comparison_accuracy.png`` and
        ``comparison_higher_rank_energy.png`` (mean over seeds per round, shaded ± one std)
        and ``accuracy_vs_traffic.png`` (one point per method, error bars: ± one std); a plot
        without data is skipped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {m: {s: summ for s, (summ, _) in by_seed.items()} for m, by_seed in runs.items()}
    seed_text = ", ".join(str(s) for s in seeds)
    lines = [_SEEDS_HEADER.format(n=len(seeds), seeds=seed_text, pct=100 * CONFIDENCE)]
    lines += _method_table(summaries, metrics, seeds)
    lines += _paired_section(summaries, metrics, baseline, seeds)
    rows = {m: [rows for _, rows in by_seed.values()] for m, by_seed in runs.items()}
    plots = [
        _band_plot(out / "comparison_accuracy.png", rows, "accuracy", "accuracy (%)", 100.0),
        _band_plot(
            out / "comparison_higher_rank_energy.png",
            rows,
            "higher_rank_energy",
            "higher-rank energy 1 − ρ$_{r_1}$",
            1.0,
        ),
        _traffic_plot(out / "accuracy_vs_traffic.png", summaries),
    ]
    written = [p for p in plots if p is not None]
    if written:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})\n" for p in written]
    lines += _failed_section(failed)
    path = out / "comparison.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mean_band(
    runs: Sequence[Sequence[MetricsRow]], key: str
) -> tuple[list[int], list[float], list[float]]:
    """Per round with data: the mean over runs and the sample std (0 for one run)."""
    by_round: dict[int, list[float]] = {}
    for rows in runs:
        for rnd, value in zip(*_series(rows, key), strict=True):
            by_round.setdefault(rnd, []).append(value)
    xs = sorted(by_round)
    stats = [describe(by_round[x]) for x in xs]
    return xs, [s.mean for s in stats], [s.std or 0.0 for s in stats]


def _band_plot(
    path: Path,
    runs: Mapping[str, Sequence[Sequence[MetricsRow]]],
    key: str,
    label: str,
    scale: float,
) -> Path | None:
    """One line per method (mean over seeds) with a shaded ± one std band."""
    bands = {m: _mean_band(rows, key) for m, rows in runs.items()}
    if not any(xs for xs, _, _ in bands.values()):
        return None
    fig, (ax,) = _figure()
    for i, (method, (xs, mean, std)) in enumerate(bands.items()):
        if not xs:
            continue
        color = f"C{i % 10}"  # by method index, as in the single-seed overlays
        ax.plot(xs, [scale * y for y in mean], label=method, color=color, marker=".")
        low = [scale * (y - s) for y, s in zip(mean, std, strict=True)]
        high = [scale * (y + s) for y, s in zip(mean, std, strict=True)]
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"{label.split(' 1 −')[0]}: mean over seeds, band ± 1 std")
    fig.savefig(path, dpi=_DPI)
    return path


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, size in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if largest >= size:
            return unit, size
    return "B", 1.0


def _traffic_plot(path: Path, runs: Mapping[str, Summaries]) -> Path | None:
    """Final accuracy against traffic: one point per method, ± one std error bars."""
    points = {
        m: (t, a)
        for m, s in runs.items()
        if (t := seed_stats(s, TRAFFIC)) is not None
        and (a := seed_stats(s, "final_accuracy")) is not None
    }
    if not points:
        return None
    unit, size = _byte_unit(max(t.mean for t, _ in points.values()))
    fig, (ax,) = _figure()
    for i, (method, (t, a)) in enumerate(points.items()):
        x, y = t.mean / size, 100.0 * a.mean
        ax.errorbar(
            x,
            y,
            xerr=(t.std or 0.0) / size,
            yerr=100.0 * (a.std or 0.0),
            fmt=_MARKERS[i % len(_MARKERS)],  # distinct shapes: equal points stay visible
            markersize=11 - 2 * (i % 4),
            color=f"C{i % 10}",
            capsize=4,
            label=method,
        )
    ax.xaxis.set_major_locator(AutoLocator())  # traffic, not rounds
    ax.set_xlabel(f"traffic per run ({unit}, upload + download)")
    ax.set_ylabel("final accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle("accuracy vs traffic: mean over seeds, bars ± 1 std")
    fig.savefig(path, dpi=_DPI)
    return path


# --------------------------------------------------------------------------- sweep


def _plot_name(metric: str) -> str:
    return "sweep_" + re.sub(r"[^A-Za-z0-9_]+", "_", metric.replace("@", "_at")) + ".png"


def write_sweep_report(
    out_dir: str | os.PathLike[str],
    cells: Mapping[str, Mapping[str, Summaries]],
    *,
    axes: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    metrics: Sequence[str],
    failed: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``sweep.md``, ``sweep.json`` and one ``sweep_<metric>.png`` per metric.

    Parameters
    ----------
    out_dir : str or os.PathLike
        The sweep's directory.
    cells : Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]]
        Setting label (``KEY=VALUE, …``) → method → seed → summary of its finished runs, in
        grid order (every setting present, possibly with no runs).
    axes : Sequence[str]
        The grid's keys.
    methods, seeds : Sequence
        What was run (for the headers and the columns).
    metrics : Sequence[str]
        Metric names.
    failed : Sequence[tuple[str, str]]
        ``(run, error)`` of the runs that failed.

    Returns
    -------
    Path
        ``sweep.md``: per metric a table setting × method of ``mean ± std (n)`` over seeds,
        then links to the plots (metric against setting, a line per method, error bars ± one
        std) and the failed runs. ``sweep.json`` holds the same statistics (``n``, ``mean``,
        ``std``, ``ci_low``, ``ci_high``) for scripts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {
        setting: {m: {k: seed_stats(by_method.get(m, {}), k) for k in metrics} for m in methods}
        for setting, by_method in cells.items()
    }
    lines = [
        f"# Sweep over {', '.join(f'`{a}`' for a in axes) or 'no grid'}",
        "",
        f"Methods: {', '.join(methods)}. Seeds: {', '.join(map(str, seeds))}. Each cell: mean ± "
        "sample standard deviation over the seeds that finished (n); accuracy in %.",
    ]
    plots: list[Path] = []
    for metric in metrics:
        lines += ["", f"## {metric_label(metric)}", ""]
        lines += ["| Setting | " + " | ".join(map(_escape, methods)) + " |"]
        lines += ["|---|" + "---:|" * len(methods)]
        for setting, by_method in stats.items():
            row = [_sweep_cell(metric, by_method[m][metric]) for m in methods]
            lines.append(f"| {_escape(setting)} | {' | '.join(row)} |")
        plot = _sweep_plot(out / _plot_name(metric), stats, metric, axes, methods)
        if plot is not None:
            plots.append(plot)
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})\n" for p in plots]
    lines += _failed_section(failed)
    path = out / "sweep.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_sweep_json(out / "sweep.json", stats, axes, methods, seeds, failed)
    return path


def _sweep_cell(metric: str, stats: SeedStats | None) -> str:
    return "—" if stats is None else f"{_cell(metric, stats, ci=False)} ({stats.n})"


def _write_sweep_json(
    path: Path,
    stats: Mapping[str, Mapping[str, Mapping[str, SeedStats | None]]],
    axes: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    failed: Sequence[tuple[str, str]],
) -> None:
    data = {
        "axes": list(axes),
        "methods": list(methods),
        "seeds": list(seeds),
        "settings": {
            setting: {
                m: {k: asdict(s) if s is not None else None for k, s in by_metric.items()}
                for m, by_metric in by_method.items()
            }
            for setting, by_method in stats.items()
        },
        "failed": [{"run": label, "error": error} for label, error in failed],
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _tick(setting: str, axes: Sequence[str]) -> str:
    """The x tick of a setting: its values, one line per grid key (the keys label the axis)."""
    values = []
    for i, key in enumerate(axes):
        start = setting.find(f"{key}=") + len(key) + 1
        end = setting.find(f", {axes[i + 1]}=", start) if i + 1 < len(axes) else len(setting)
        values.append(setting[start:end])
    return "\n".join(values) if axes else setting


def _sweep_plot(
    path: Path,
    stats: Mapping[str, Mapping[str, Mapping[str, SeedStats | None]]],
    metric: str,
    axes: Sequence[str],
    methods: Sequence[str],
) -> Path | None:
    """The metric against the setting, a line per method, error bars ± one std."""
    settings = list(stats)
    if not any(stats[s][m][metric] is not None for s in settings for m in methods):
        return None
    scale = 100.0 if _is_pct(metric) else 1.0
    unit, size = ("", 1.0)
    if _is_bytes(metric):
        largest = max(
            st.mean for s in settings for m in methods if (st := stats[s][m][metric]) is not None
        )
        unit, size = _byte_unit(largest)
        scale = 1.0 / size
    fig, (ax,) = _figure()
    fig.set_figwidth(max(6.4, 1.2 * len(settings)))
    step = 0.06
    for i, method in enumerate(methods):
        offset = step * (i - (len(methods) - 1) / 2)  # error bars side by side
        found = [stats[s][method][metric] for s in settings]
        if not any(found):
            continue
        # nan where a setting has no finished run: the line breaks there
        ax.errorbar(
            [j + offset for j in range(len(settings))],
            [scale * st.mean if st else math.nan for st in found],
            yerr=[scale * (st.std or 0.0) if st else math.nan for st in found],
            marker="o",
            capsize=3,
            color=f"C{i % 10}",
            label=method,
        )
    ax.set_xticks(range(len(settings)), [_tick(s, axes) for s in settings], fontsize="small")
    ax.set_xlabel(" / ".join(axes) if axes else "setting")
    ylabel = metric_label(metric) + (f" ({unit})" if unit else "")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"{ylabel}: mean over seeds, bars ± 1 std")
    fig.savefig(path, dpi=_DPI)
    return path
