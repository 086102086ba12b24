"""Metrics I/O: append, read and truncate ``metrics.jsonl`` / ``energy.jsonl``; row fields.

A run records one metrics row per round (a line of ``metrics.jsonl``)::

    {"round": 3, "lr": 4e-4, "train_loss": 0.71, "accuracy": 0.83, "eval_loss": 0.52,
     "higher_rank_energy": 0.41, "energy_per_level": {"8": 0.59, "16": 0.78, "64": 1.0},
     "upload_bytes": 123456, "download_bytes": 123456, "clients": [4, 17, 2],
     "client_ranks": [8, 64, 16], "accepted": 3, "rejected": 0, "rejected_reasons": {},
     "time": {"train_seconds": 1.2, "aggregate_seconds": 0.01, "eval_seconds": 0.3,
              "round_seconds": 1.6},
     "transport_bytes": null}

Every row carries the keys of :data:`ROW_KEYS` whatever the engine — the local engine and the
Flower engine build their rows through :func:`metrics_row` — so one reader serves both;
``transport_bytes`` is ``null`` with the local engine, which serialises nothing
(docs/design.md#communication). Beyond them a row holds :data:`EVALUATION_KEYS` on evaluated
rounds and a method's own entries (:data:`METHOD_KEYS`).

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

(``null``: the module's update is zero). :func:`~raflora.report.write_energy_heatmap` draws it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "ENERGY_FILE",
    "EVALUATION_KEYS",
    "METHOD_KEYS",
    "PRIVACY_KEYS",
    "ROW_KEYS",
    "EnergyRow",
    "MetricsRow",
    "append_energy",
    "append_metrics",
    "energy_shares",
    "metrics_row",
    "partition_labels",
    "read_energy",
    "read_metrics",
    "truncate_jsonl",
]

logger = logging.getLogger(__name__)

MetricsRow = Mapping[str, Any]
"""One round's metrics (see the module docstring for the keys)."""

EnergyRow = Mapping[str, Any]
"""One round's per-module diagnostics (a line of ``energy.jsonl``, see the module docstring)."""

ENERGY_FILE = "energy.jsonl"
"""The per-module diagnostics file of a run directory (read by :func:`write_run_plots`)."""

# --------------------------------------------------------------------------- the row schema

ROW_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "round": "the 1-based round",
        "lr": "the learning rate of the round's local training",
        "train_loss": "the accepted clients' sample-weighted training loss (null: none accepted)",
        "higher_rank_energy": "1 − ρ_{r_1} of the global update, the mean over modules",
        "energy_per_level": "ρ_r at every rank level r (keys: r as text), mean over modules",
        "upload_bytes": "client → server bytes of the method's payload, extras and heads included",
        "download_bytes": "server → client traffic of the broadcast, extras and heads included",
        "clients": "the sampled client ids",
        "client_ranks": "their ranks, in the same order",
        "accepted": "how many updates were aggregated",
        "rejected": "how many sampled clients were left out",
        "rejected_reasons": "client id (text) → why it was left out",
        "time": "seconds per phase: train, client compute, aggregate, eval, round",
        "transport_bytes": (
            "bytes of the round's messages, both ways, as the transport moved them (Flower "
            "engine); null with the local engine: nothing is serialised"
        ),
    }
)
"""The keys every metrics row carries whatever the engine, key → meaning, in the order they
appear in a row (an evaluated round has :data:`EVALUATION_KEYS` after ``train_loss``).

``upload_bytes`` and ``download_bytes`` are the algorithmic traffic, equal for both engines
(docs/design.md#communication); ``transport_bytes`` is what a Flower deployment actually sent.
"""

EVALUATION_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "accuracy": "the task's accuracy of the global model (evaluated rounds)",
        "eval_loss": "its evaluation loss (evaluated rounds)",
        "<metric>@<r>": "with eval.per_level: the metric of the model a client of rank r holds",
    }
)
"""Keys of evaluated rounds only (``eval.every`` and the last round)."""

METHOD_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "residual_higher_rank_energy": (
            "1 − ρ_{r_1} of the round's merged residual, for a method that reports it "
            "(FedEx-LoRA, docs/methods.md#fedex)"
        ),
    }
)
"""Keys a method adds to every row of its runs (the same for both engines)."""

PRIVACY_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "epsilon": (
            "ε spent after this round at the run's δ (client-level DP, docs/privacy.md; null "
            "when the noise multiplier is 0: no finite ε)"
        ),
        "delta": "δ of the guarantee",
        "noise_multiplier": "z: the noise std on each coordinate of a sum is z C",
        "clip": "C: the clip norm of the round's whole client updates",
    }
)
"""Keys of every row of a private run (``privacy.enabled``) after the :data:`ROW_KEYS` but
``transport_bytes``; a run without privacy has none of them, so its rows are as they were.

What the guarantee covers is what the server releases: each round's global state and the final
adapter. The rest of a row is the operator's log and is **not** covered: the sampled
``clients`` and their ranks, ``train_loss`` (the clients' training losses), ``accepted``,
``rejected`` and their reasons, the traffic and the timings. No per-client loss or step count
is written to any file.
"""


def metrics_row(fields: Mapping[str, Any], *, transport_bytes: int | None = None) -> dict[str, Any]:
    """One round's metrics row with every key of :data:`ROW_KEYS`, for either engine.

    Parameters
    ----------
    fields : Mapping[str, Any]
        The round's values: every key of :data:`ROW_KEYS` but ``transport_bytes``, and those
        of :data:`EVALUATION_KEYS` / :data:`METHOD_KEYS` that apply; their order is kept.
    transport_bytes : int, optional
        What the transport moved (``None``: the local engine, nothing is serialised). The
        Flower engine sets it once the round's messages are counted.

    Returns
    -------
    dict[str, Any]
        ``fields`` followed by ``transport_bytes``.

    Raises
    ------
    KeyError
        If a key of :data:`ROW_KEYS` is missing (a programming error, not a user's).
    """
    missing = [k for k in ROW_KEYS if k not in fields and k != "transport_bytes"]
    if missing:
        raise KeyError(f"a metrics row lacks {', '.join(missing)}")
    row = dict(fields)
    row.setdefault("transport_bytes", transport_bytes)
    return row


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
