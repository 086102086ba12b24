"""Run summaries, progress-bar fields and the cross-method comparison (``comparison.md``)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raflora.report.metrics import (
    MetricsRow,
    _energy_levels,
    _num,
    _round_of,
    _series,
    energy_shares,
)
from raflora.report.plots import _overlay

__all__ = [
    "format_bytes",
    "progress_postfix",
    "summarize",
    "write_comparison",
]

_TIME_PHASES = ("train_seconds", "aggregate_seconds", "eval_seconds")


# --------------------------------------------------------------------------- small helpers


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
    if any("epsilon" in row for row in metrics):  # a private run (docs/privacy.md) only
        summary["final_epsilon"] = _last(metrics, "epsilon")
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
        (higher-rank energy, 3 decimals), ``rej`` (rejected clients, when any) and ``ε`` (a
        private run's epsilon so far, 3 significant digits); keys whose value is missing are
        left out.
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
    eps = _num(row, "epsilon")
    if eps is not None:  # a private run: ε spent so far
        out["ε"] = f"{eps:.3g}"
    return out


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


_EPSILON_NOTE = """\
- **ε**: the privacy budget spent by the last round at the run's δ (client-level differential
  privacy, docs/privacy.md); ∞ for a run without privacy (or without noise).
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

    private = any("final_epsilon" in summary for summary, _ in runs.values())
    lines = [
        _COMPARISON_HEADER + (_EPSILON_NOTE if private else ""),
        "| Method | Final acc. | Best acc. (round) | Final HRE | Mean HRE | Upload | Download "
        "| Traffic (× min) | Wall (s) |" + (" ε |" if private else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if private else ""),
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
        if private:  # "∞" for a run without privacy beside private ones
            eps = summary.get("final_epsilon", math.inf)
            cells.append("∞" if eps is None or eps == math.inf else f"{float(eps):.3g}")
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
