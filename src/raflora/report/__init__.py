"""Run reports: metrics I/O, summaries, per-run plots and cross-method comparisons.

Everything here works on plain dicts and lists. :mod:`~raflora.report.metrics` appends, reads and
truncates ``metrics.jsonl`` and ``energy.jsonl`` (its docstring describes the rows);
:mod:`~raflora.report.summaries` summarizes a run and writes the comparison of several;
:mod:`~raflora.report.plots` draws a run's plots and the comparison overlays.
"""

from raflora.report.metrics import (
    ENERGY_FILE,
    ROW_KEYS,
    EnergyRow,
    append_energy,
    append_metrics,
    energy_shares,
    metrics_row,
    partition_labels,
    read_energy,
    read_metrics,
    truncate_jsonl,
)
from raflora.report.metrics import MetricsRow as MetricsRow
from raflora.report.metrics import _series as _series
from raflora.report.plots import _DPI as _DPI
from raflora.report.plots import _common_prefix as _common_prefix
from raflora.report.plots import _energy_grid as _energy_grid
from raflora.report.plots import _figure as _figure
from raflora.report.plots import write_energy_heatmap, write_run_plots
from raflora.report.summaries import _escape as _escape
from raflora.report.summaries import (
    format_bytes,
    progress_postfix,
    summarize,
    write_comparison,
)

__all__ = [
    "ENERGY_FILE",
    "ROW_KEYS",
    "EnergyRow",
    "append_energy",
    "append_metrics",
    "energy_shares",
    "format_bytes",
    "metrics_row",
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
