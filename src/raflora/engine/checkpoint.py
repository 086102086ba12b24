"""Atomic per-round checkpoints of a run (``RUN_DIR/checkpoint/state.pt``).

A checkpoint holds everything a run needs to continue bit-for-bit on the CPU: the global state
(factors, heads, the merged base delta, the method's extras), the base weights when the method
merges into them, the rounds done (which fixes the learning-rate schedule position) and the
metrics so far. Every random stream is derived from ``(seed, round, client)``
(:mod:`raflora.engine.seeds`), so no generator state needs saving: the next round draws exactly
what it would have drawn without the interruption. A method's per-client state (ILoRA's
``c_k``) lives beside it, one file per client (:mod:`raflora.engine.client_states`), so a round
rewrites only the files of its own clients.

The file is written to a unique temporary name, flushed to disk and renamed over the previous
one, so a kill (or a full disk) at any moment leaves either the old or the new checkpoint, never a
torn one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from raflora.engine.rundir import atomic_write_bytes
from raflora.methods import GlobalState

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = Path("checkpoint") / "state.pt"
_VERSION = 2
"""Format 2 (raflora 0.2): the state's method extras (``GlobalState.extras``) replace 0.1's
HetLoRA-only ``client_ranks``; format 1 (0.1) is migrated on load."""


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
    privacy : dict or None
        A private run's noise, clip and privacy ledger
        (:meth:`~raflora.engine.private_round.PrivacyRun.to_json`), so a resumed run continues
        its accounting; ``None`` (and absent from the file) without privacy.
    """

    round: int
    state: GlobalState
    metrics: list[dict[str, Any]]
    wall_seconds: float
    base_weights: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically under ``run_dir``; return the file's path.

    Tensors are saved from wherever they live and come back on the device
    :func:`load_checkpoint` is asked for.
    """
    path = run_dir / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": _VERSION,
        "round": checkpoint.round,
        "state": checkpoint.state.state_dict(clone=False),
        "metrics": checkpoint.metrics,
        "wall_seconds": checkpoint.wall_seconds,
        "base_weights": {k: v.detach().cpu() for k, v in checkpoint.base_weights.items()},
        "meta": checkpoint.meta,
    }
    if checkpoint.privacy is not None:  # only a private run's file has the key
        payload["privacy"] = checkpoint.privacy
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))
    return path


def _migrate_v1_state(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 state (0.1) as format 2: HetLoRA's ``client_ranks`` becomes an extra."""
    out = {k: v for k, v in state.items() if k != "client_ranks"}
    ranks = {int(k): int(v) for k, v in state["client_ranks"].items()}
    out["extras"] = {"client_ranks": ranks} if ranks else {}
    return out


def load_checkpoint(run_dir: Path, *, device: torch.device | str = "cpu") -> Checkpoint:
    """Read the checkpoint of ``run_dir``, its global state on ``device``.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    device : torch.device or str
        Where the global state goes (the run's device on resume); base weights stay on the CPU
        until they are copied into the model.

    Raises
    ------
    CheckpointError
        If there is none, it cannot be read, was written by another version, or lacks a key.
    """
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint ({CHECKPOINT_FILE}) to resume from")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same message
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a raflora checkpoint")
    version = data.get("version")
    if version not in (1, _VERSION):
        raise CheckpointError(
            f"{path}: written by checkpoint format version {version!r}; this raflora reads "
            f"versions 1 (raflora 0.1, migrated) and {_VERSION}"
        )
    try:
        if version == 1:
            data = {**data, "state": _migrate_v1_state(data["state"])}
        return Checkpoint(
            round=int(data["round"]),
            state=GlobalState.from_state_dict(data["state"]).to(device),
            metrics=list(data["metrics"]),
            wall_seconds=float(data["wall_seconds"]),
            base_weights=dict(data["base_weights"]),
            meta=dict(data["meta"]),
            privacy=data.get("privacy"),
        )
    except KeyError as err:
        raise CheckpointError(
            f"{path}: incomplete checkpoint, the key {err.args[0]!r} is missing"
        ) from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: malformed checkpoint ({err})") from None
