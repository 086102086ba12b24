"""Per-client state kept across the rounds a client takes part in (ILoRA's ``c_k`` …).

The server side of an engine owns it, whichever engine runs (docs/design.md#layers): the local
engine hands a client its state and keeps what the client's round returns; the Flower engine
sends the state with the train message (a Flower client is stateless across a resume) and keeps
what the reply carries. Only accepted clients' states are kept.

In a run directory each client's state is one file, ``clients/client-<k>.r<round>.pt``, written
only in the rounds the client took part in (a 3B model's ``c_k`` at rank 64 is ~70 MB: rewriting
every client's every round is not an option). The round in the name makes it kill-safe: files of
a round are written before that round's checkpoint, a client's older file is removed only after
the checkpoint, and on resume files newer than the checkpoint are deleted — so a resumed run sees
exactly the states of the checkpoint's round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from raflora.engine.checkpoint import CheckpointError
from raflora.engine.rundir import atomic_write_bytes, remove_leftovers

__all__ = ["CLIENTS_DIR", "ClientStates"]

CLIENTS_DIR = "clients"
_NAME = re.compile(r"^client-(\d+)\.r(\d+)\.pt$")


class ClientStates:
    """The per-client states of a run, in memory or in a run directory's ``clients/``.

    Parameters
    ----------
    run_dir : Path, optional
        Keep the states in ``run_dir/clients/`` (``None``: in memory only).
    rounds_done : int
        Rounds of the run's checkpoint: files of later rounds are deleted (a killed round).
    """

    def __init__(self, run_dir: Path | None = None, *, rounds_done: int = 0) -> None:
        self.directory = None if run_dir is None else Path(run_dir) / CLIENTS_DIR
        self._memory: dict[int, dict[str, Tensor]] = {}
        self._pending: dict[int, tuple[int, dict[str, Tensor]]] = {}
        self._files: dict[int, list[tuple[int, Path]]] = {}
        if self.directory is not None and self.directory.is_dir():
            remove_leftovers(self.directory, any_name=True)
            for path in sorted(self.directory.iterdir()):
                match = _NAME.match(path.name)
                if match is None:
                    continue
                client, round_index = int(match[1]), int(match[2])
                if round_index > rounds_done:
                    path.unlink()  # written by a round whose checkpoint never came
                    continue
                self._files.setdefault(client, []).append((round_index, path))
            for versions in self._files.values():
                versions.sort()

    def __len__(self) -> int:
        clients = set(self._memory) | set(self._pending) | set(self._files)
        return len(clients)

    def get(
        self, client_id: int, *, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor] | None:
        """Client ``client_id``'s state on ``device`` (``None`` before its first kept state)."""
        if client_id in self._pending:
            state = self._pending[client_id][1]
        elif client_id in self._memory:
            state = self._memory[client_id]
        elif self._files.get(client_id):
            path = self._files[client_id][-1][1]
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # any unreadable file gets the same message
                raise CheckpointError(
                    f"{path}: cannot read client {client_id}'s state ({err}); the run cannot "
                    "continue without it"
                ) from None
        else:
            return None
        return {k: v.to(device) for k, v in state.items()}

    def put(self, client_id: int, round_index: int, state: Mapping[str, Tensor]) -> None:
        """Keep ``state`` as client ``client_id``'s after round ``round_index`` (written by
        :meth:`write`).
        """
        copy = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        if self.directory is None:
            self._memory[client_id] = copy
        else:
            self._pending[client_id] = (round_index, copy)

    def write(self) -> None:
        """Write the states kept since the last call (before the round's checkpoint)."""
        if self.directory is None or not self._pending:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for client_id, (round_index, state) in sorted(self._pending.items()):
            path = self.directory / f"client-{client_id}.r{round_index}.pt"
            atomic_write_bytes(path, lambda fh, s=state: torch.save(s, fh))  # type: ignore[misc]
            self._files.setdefault(client_id, []).append((round_index, path))
        self._pending.clear()

    def prune(self) -> None:
        """Remove each client's superseded files (after the round's checkpoint is written)."""
        for versions in self._files.values():
            while len(versions) > 1:
                _, path = versions.pop(0)
                path.unlink(missing_ok=True)
