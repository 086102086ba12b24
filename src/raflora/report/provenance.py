"""Where a run's numbers came from: ``RUN_DIR/environment.json``.

Every session of a run — the new run, then each ``--resume`` — appends one entry to the file's
``sessions`` list (a new run starts the list afresh), so a resumed run records every machine and
code version that produced a part of it::

    {"sessions": [
      {"started": "2026-05-01T09:12:44.105+00:00", "first_round": 1, "engine": "local",
       "argv": ["raflora", "run", "configs/quickstart.yaml"],
       "raflora": {"version": "0.1.0", "git_commit": "1b03a7b…", "git_dirty": false},
       "python": {"version": "3.11.9", "implementation": "CPython", "executable": "/…/python"},
       "packages": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.0",
                    "datasets": "5.2.0", "numpy": "2.4.6", "flwr": "1.41.0"},
       "device": {"type": "cpu", "name": "AMD EPYC", "cuda": null},
       "threads": {"torch": 2, "config": null},
       "hostname": "node-3", "platform": "Linux-6.8.0-x86_64-with-glibc2.39"}]}

``git_commit`` and ``git_dirty`` (uncommitted changes to tracked files) are those of the checkout
raflora is imported from, and ``null`` when it is not imported from a git checkout (an installed
wheel) or git is unavailable — never an error. A package that is not installed is ``null``;
``raflora.version`` is the installed distribution's (pyproject.toml's, equal to
``raflora.__version__``), ``null`` for a source tree that was never installed. With the Flower
engine this is the server's environment (where the run directory is written).
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ENVIRONMENT_FILE",
    "PACKAGES",
    "add_session",
    "cpu_name",
    "device_name",
    "git_revision",
    "package_versions",
    "session_info",
]

ENVIRONMENT_FILE = "environment.json"
"""The provenance file of a run directory."""

PACKAGES = ("torch", "transformers", "peft", "datasets", "numpy", "flwr")
"""The libraries whose versions every session records."""

_GIT_TIMEOUT = 10.0


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(directory: Path, *args: str) -> str | None:
    """``git -C directory args…``'s stripped output, ``None`` when it fails or git is missing."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_revision(source: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout that tracks the file ``source``.

    ``(None, None)`` when ``source`` is not a tracked file of a checkout (an installed package,
    even one inside another project's repository) or git cannot be run.
    """
    directory = source.parent
    if _git(directory, "ls-files", "--error-unmatch", "--", source.name) is None:
        return None, None
    commit = _git(directory, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def cpu_name() -> str | None:
    """The CPU model (``/proc/cpuinfo``'s ``model name`` on Linux, else ``platform``'s)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def device_name(device: torch.device) -> str | None:
    """The accelerator's name for a CUDA device, the CPU model otherwise."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return cpu_name()


def session_info(
    *,
    device: torch.device,
    threads: int | None,
    first_round: int,
    engine: str,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One session's provenance (an entry of ``environment.json``'s ``sessions``).

    Parameters
    ----------
    device : torch.device
        The run's device.
    threads : int, optional
        The configured ``threads`` (``None``: torch's default); torch's actual count is
        recorded beside it.
    first_round : int
        The first round this session runs (1 for a new run).
    engine : str
        ``"local"`` or ``"flower"``.
    argv : Sequence[str], optional
        The command line (default: ``sys.argv``).
    """
    # this file, not the package root: a report module imports nothing above its layer
    # (docs/design.md#layers); it is tracked in the same checkout as raflora/__init__.py
    commit, dirty = git_revision(Path(__file__))
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "first_round": int(first_round),
        "engine": engine,
        "argv": list(sys.argv if argv is None else argv),
        "raflora": {
            "version": package_versions(["raflora"])["raflora"],
            "git_commit": commit,
            "git_dirty": dirty,
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "packages": package_versions(),
        "device": {
            "type": device.type,
            "name": device_name(device),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
        },
        "threads": {"torch": torch.get_num_threads(), "config": threads},
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }


def add_session(previous: str | None, session: Mapping[str, Any], *, resume: bool) -> str:
    """The text of ``environment.json`` after a session starts.

    Parameters
    ----------
    previous : str, optional
        The file's current text (``None`` when there is none).
    session : Mapping[str, Any]
        :func:`session_info` of the starting session.
    resume : bool
        Whether the session resumes the run: its entry is appended to the earlier sessions
        (a missing or unreadable file starts a new list); a new run starts the list afresh.
    """
    sessions: list[Any] = []
    if resume and previous is not None:
        try:
            earlier = json.loads(previous).get("sessions")
        except (ValueError, AttributeError):
            earlier = None
        if isinstance(earlier, list):
            sessions = earlier
    sessions.append(dict(session))
    return json.dumps({"sessions": sessions}, indent=1) + "\n"
