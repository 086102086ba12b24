"""Atomic per-round checkpoints of a run (``RUN_DIR/checkpoint/state.pt``).

A checkpoint holds everything a run needs to continue bit-for-bit on the CPU: the global state
(factors, heads, FLoRA's merged delta, HetLoRA's pruned ranks), the base weights when the method
merges into them, the rounds done (which fixes the learning-rate schedule position) and the
metrics so far. Every random stream is derived from ``(seed, round, client)``
(:mod:`raflora.engine.seeds`), so no generator state needs saving: the next round draws exactly
what it would have drawn without the interruption.

The file is written to a temporary name, flushed to disk and renamed over the previous one, so a
kill at any moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from raflora.aggregators import GlobalState

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = Path("checkpoint") / "state.pt"
_VERSION = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint in a run directory."""


@dataclass
class Checkpoint:
    """A run after ``round`` finished rounds.

    Attributes
    ----------
    round : int
        Rounds completed.
    state : GlobalState
        Global state after that round.
    metrics : list[dict]
        One metrics row per completed round.
    wall_seconds : float
        Wall time spent in the rounds so far.
    base_weights : dict[str, Tensor]
        Base weights of the adapted modules when the method merges into them (FLoRA).
    meta : dict
        What exporting needs without rebuilding the task (model id, target modules …).
    """

    round: int
    state: GlobalState
    metrics: list[dict[str, Any]]
    wall_seconds: float
    base_weights: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically under ``run_dir``; return the file's path."""
    path = run_dir / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {
        "version": _VERSION,
        "round": checkpoint.round,
        "state": checkpoint.state.state_dict(clone=False),
        "metrics": checkpoint.metrics,
        "wall_seconds": checkpoint.wall_seconds,
        "base_weights": {k: v.detach().cpu() for k, v in checkpoint.base_weights.items()},
        "meta": checkpoint.meta,
    }
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the checkpoint of ``run_dir`` (tensors on the CPU).

    Raises
    ------
    CheckpointError
        If there is none or it cannot be read.
    """
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint ({CHECKPOINT_FILE}) to resume from")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same message
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err})") from None
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        raise CheckpointError(f"{path}: not a raflora checkpoint of version {_VERSION}")
    return Checkpoint(
        round=int(data["round"]),
        state=GlobalState.from_state_dict(data["state"]),
        metrics=list(data["metrics"]),
        wall_seconds=float(data["wall_seconds"]),
        base_weights=dict(data["base_weights"]),
        meta=dict(data["meta"]),
    )
