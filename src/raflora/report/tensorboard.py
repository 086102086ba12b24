"""TensorBoard event files of a run directory (``output.tensorboard: true``).

Each round's metrics row becomes scalars — ``train/loss``, ``train/lr``, ``eval/accuracy``,
``eval/eval_loss`` (and ``eval/accuracy@r`` … with ``eval.per_level``),
``energy/higher_rank_energy``, ``energy/rho@r`` per rank level, ``traffic/upload_bytes``,
``traffic/download_bytes``, ``clients/accepted``, ``clients/rejected`` and ``time/<phase>`` —
at step = round, plus the global
update's energy spectrum as the histogram ``energy/spectrum``: bucket ``i`` (direction index
``1 … r_max``) holds ``σ_i² / Σ_j σ_j²``, the direction's share of the update's energy, averaged
over the adapted modules (so its cumulative sum up to a rank level is ``energy/rho@r``). Under rank
collapse the mass piles up in the first buckets round after round.

The events of a run live in ``RUN_DIR/tensorboard/``, one TensorBoard run per run directory, so
``tensorboard --logdir DIR`` over a ``raflora compare`` (or sweep) directory compares methods and
seeds. Every session (a new run, each ``--resume``) appends to its own event file, whose first
records are the file version and a ``SessionLog.START`` at the session's first round: TensorBoard
then drops whatever an earlier session wrote for that round or later (rounds written past the
last checkpoint by a killed run), so a resumed run shows every round once.

Rows are appended one round at a time with TensorBoard's own record writer (each append opens and
closes the file), rather than through a long-lived ``SummaryWriter``: the engines hand each round
to :func:`write_round` and keep no writer between rounds, and a kill leaves at most one truncated
last record, which TensorBoard's reader skips. Needs the ``tensorboard`` package
(``pip install 'raflora[tensorboard]'``); nothing here imports it until events are written.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raflora.diagnostics import EnergyReport

__all__ = [
    "TENSORBOARD_DIR",
    "TensorBoardMissingError",
    "round_scalars",
    "session_files",
    "spectrum_shares",
    "start_session",
    "write_round",
]

TENSORBOARD_DIR = "tensorboard"
"""The event files' folder inside a run directory."""

_SESSION = re.compile(r"^events\.out\.tfevents\.(\d+)\..*\.raflora$")

# Row keys with a fixed place in the tags; any other numeric key is an evaluation metric.
_TAGS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "higher_rank_energy": "energy/higher_rank_energy",
    "residual_higher_rank_energy": "energy/residual_higher_rank_energy",  # FedEx-LoRA
    "upload_bytes": "traffic/upload_bytes",
    "download_bytes": "traffic/download_bytes",
    "transport_bytes": "traffic/transport_bytes",  # Flower: what the transport moved
    "accepted": "clients/accepted",
    "rejected": "clients/rejected",
    "epsilon": "privacy/epsilon",  # a private run's rows only (docs/privacy.md)
    "delta": "privacy/delta",
    "noise_multiplier": "privacy/noise_multiplier",
    "clip": "privacy/clip",
}
_NOT_SCALARS = {"round", "energy_per_level", "time", "clients", "client_ranks", "rejected_reasons"}


class TensorBoardMissingError(ImportError):
    """``output.tensorboard`` is on but the ``tensorboard`` package is not installed."""


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The scalars one metrics row contributes, tag → value (``None`` and non-finite left out).

    Parameters
    ----------
    row : Mapping[str, Any]
        A round's metrics row (see :mod:`raflora.report`).

    Returns
    -------
    dict[str, float]
        ``train/…``, ``eval/<metric>`` for every evaluation metric (``accuracy``,
        ``eval_loss``, ``accuracy@8`` …), ``energy/higher_rank_energy``, ``energy/rho@<r>``,
        ``traffic/…``, ``clients/…`` and ``time/<phase>``.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        number = _finite(value)
        if key in _NOT_SCALARS or number is None:
            continue
        out[_TAGS.get(key, f"eval/{key}")] = number
    levels = row.get("energy_per_level")
    if isinstance(levels, Mapping):
        for level, rho in levels.items():
            if (number := _finite(rho)) is not None:
                out[f"energy/rho@{level}"] = number
    times = row.get("time")
    if isinstance(times, Mapping):
        for phase, seconds in times.items():
            if (number := _finite(seconds)) is not None:
                out[f"time/{phase}"] = number
    return out


def spectrum_shares(report: EnergyReport, r_max: int) -> list[float]:
    """``σ_i² / Σ_j σ_j²`` of the global update ``B A`` (top ``r_max``), mean over modules.

    Modules without energy (a zero update, FLoRA's empty initial stack) are left out of the
    mean; an empty list when no module has any.

    Parameters
    ----------
    report : EnergyReport
        :func:`raflora.diagnostics.energy_report` of the state's global factors (FLoRA: the
        round's stack): the engine's diagnostics of the round, read again, not recomputed.
    r_max : int
        The largest rank level (number of directions kept).
    """
    totals = [0.0] * r_max
    count = 0
    for module in report.modules.values():
        total = math.fsum(module.spectrum)
        if not (math.isfinite(total) and total > 0.0):
            continue
        count += 1
        for i, energy in enumerate(module.spectrum):
            totals[i] += energy / total
    return [t / count for t in totals] if count else []


def _require() -> Any:
    """TensorBoard's event protos and record writer, or a one-line error naming the extra."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        raise TensorBoardMissingError(
            "output.tensorboard needs the 'tensorboard' package: pip install 'raflora[tensorboard]'"
        ) from None
    return event_pb2, summary_pb2, RecordWriter


def session_files(run_dir: Path) -> list[Path]:
    """The run's event files written by :func:`start_session`, in session order."""
    folder = run_dir / TENSORBOARD_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _SESSION.match(p.name)), key=_session_number)


def _session_number(path: Path) -> int:
    match = _SESSION.match(path.name)
    return int(match.group(1)) if match else 0


def _append(path: Path, events: Sequence[Any]) -> None:
    _, _, RecordWriter = _require()
    with path.open("ab") as handle:
        writer = RecordWriter(handle)
        for event in events:
            writer.write(event.SerializeToString())
        writer.flush()


def start_session(run_dir: Path, first_round: int) -> Path:
    """Open a new event file for a session of the run starting at round ``first_round``.

    Its first records are the file version and a ``SessionLog.START`` at step
    ``first_round``, which makes TensorBoard drop every event an earlier session wrote at that
    round or later.

    Returns
    -------
    Path
        The new event file (``RUN_DIR/tensorboard/events.out.tfevents.<session>.<time>.<host>
        .raflora``; the session number orders the files as TensorBoard reads them).

    Raises
    ------
    TensorBoardMissingError
        The ``tensorboard`` package is not installed.
    """
    event_pb2, _, _ = _require()
    previous = session_files(run_dir)
    last = _session_number(previous[-1]) if previous else 0
    folder = run_dir / TENSORBOARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path = folder / (
        f"events.out.tfevents.{last + 1:04d}.{int(now):010d}.{socket.gethostname()}.raflora"
    )
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    _append(
        path,
        [
            event_pb2.Event(wall_time=now, step=first_round, file_version="brain.Event:2"),
            event_pb2.Event(wall_time=now, step=first_round, session_log=start),
        ],
    )
    return path


def _histogram(summary_pb2: Any, shares: Sequence[float]) -> Any:
    """A histogram whose bucket ``(i − ½, i + ½]`` holds direction ``i``'s energy share."""
    indices = range(1, len(shares) + 1)
    return summary_pb2.HistogramProto(
        min=0.5,
        max=len(shares) + 0.5,
        num=math.fsum(shares),
        sum=math.fsum(i * s for i, s in zip(indices, shares, strict=True)),
        sum_squares=math.fsum(i * i * s for i, s in zip(indices, shares, strict=True)),
        bucket_limit=[i + 0.5 for i in indices],
        bucket=list(shares),
    )


def write_round(
    run_dir: Path, row: Mapping[str, Any], shares: Sequence[float] | None = None
) -> None:
    """Append one round's scalars (and energy spectrum) to the current session's event file.

    Parameters
    ----------
    run_dir : Path
        The run directory (a session is started at this round when none exists).
    row : Mapping[str, Any]
        The round's metrics row (its ``round`` is the step).
    shares : Sequence[float], optional
        :func:`spectrum_shares` of the round's global update (no histogram when empty).

    Raises
    ------
    TensorBoardMissingError
        The ``tensorboard`` package is not installed.
    """
    event_pb2, summary_pb2, _ = _require()
    step = int(row["round"])
    sessions = session_files(run_dir)
    path = sessions[-1] if sessions else start_session(run_dir, step)
    values = [
        summary_pb2.Summary.Value(tag=tag, simple_value=value)
        for tag, value in round_scalars(row).items()
    ]
    if shares:
        values.append(
            summary_pb2.Summary.Value(tag="energy/spectrum", histo=_histogram(summary_pb2, shares))
        )
    summary = summary_pb2.Summary(value=values)
    _append(path, [event_pb2.Event(wall_time=time.time(), step=step, summary=summary)])
