"""The run directory's safety: one writer at a time, atomic outputs, clear write errors.

* :class:`RunLock` — a run holds ``RUN_DIR/run.lock`` for its lifetime. The file is created with
  ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems) and names its holder (PID, host,
  start time). A second run, ``--resume`` or ``--overwrite`` of a live run is refused naming the
  holder; a lock left by a dead process on this host is taken over with a notice (under an
  ``flock`` of the directory, so two processes taking over one stale lock leave one holder); a
  lock from another host is refused unless ``break_lock`` is given (its PID cannot be checked
  from here). The lock is not re-entrant: a second acquire in the same process is refused too.
* :func:`replace_dir` — build a directory (an adapter) under a unique temporary name, move the old
  one aside, rename the new one in, remove the old one: an interruption never leaves a half-written
  directory under the final name.
* :func:`unique_temp` — unique temporary names next to a target, so two writers (or a leftover of
  a killed one) never share a temporary file.
* :class:`RunWriteError` — an ``OSError`` while writing a run's files (disk full, permission) as
  one message naming the file and how to continue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from raflora.engine.errors import EngineError

__all__ = [
    "LOCK_FILE",
    "LockHolder",
    "RunLock",
    "RunLockedError",
    "RunWriteError",
    "atomic_write_bytes",
    "remove_leftovers",
    "replace_dir",
    "unique_temp",
    "write_failure",
    "writing",
]

LOCK_FILE = "run.lock"

_T = TypeVar("_T")


@contextlib.contextmanager
def _directory_guard(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the directory itself while a stale lock is replaced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class RunLockedError(EngineError):
    """Another process holds the run directory's lock."""


class RunWriteError(EngineError):
    """Writing a run's file failed (disk full, permission …); the last checkpoint is kept."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory: process id, host name and start time (seconds since epoch)."""

    pid: int
    host: str
    since: float

    def describe(self) -> str:
        """``PID 123 on host h since 2026-11-28 01:02:03``."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"PID {self.pid} on host {self.host} since {stamp}"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(path: Path) -> LockHolder | None:
    """The holder recorded in a lock file (``None`` when unreadable or half-written)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """The exclusive lock of one run directory (a context manager; see the module docstring).

    Parameters
    ----------
    run_dir : Path
        The run directory (created if missing).
    break_lock : bool
        Take over a lock held from another host (whose process cannot be checked from here).
    notify : Callable[[str], None], optional
        Where the notice of a taken-over lock goes (default: standard error).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        break_lock: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.break_lock = break_lock
        self.notify = notify or (lambda text: print(text, file=sys.stderr))
        self.holder = LockHolder(os.getpid(), socket.gethostname(), time.time())
        self._held = False
        self._created = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._held

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLockedError` naming the holder.

        Raises
        ------
        RunLockedError
            A live process (or one on another host, without ``break_lock``) holds it.
        EngineError
            The run directory cannot be created.
        """
        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EngineError(f"cannot create the run directory {self.run_dir}: {err}") from None
        for _ in range(3):  # a lock created by a racing process meanwhile: look again
            if self._create():
                self._held = True
                return self
            with _directory_guard(self.run_dir):
                # Re-read and remove a stale lock under the guard: two processes that both saw
                # the same dead holder cannot then remove each other's fresh lock.
                if self._take_over_or_refuse() and self._create():
                    self._held = True
                    return self
        raise RunLockedError(f"{self.run_dir}: could not take the run lock {self.path}")

    def _create(self) -> bool:
        payload = json.dumps(
            {"pid": self.holder.pid, "host": self.holder.host, "since": self.holder.since}
        )
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise RunWriteError(
                f"cannot create the run lock {self.path}: {err.strerror or err}"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _take_over_or_refuse(self) -> bool:
        """Remove a stale lock (dead PID here, or another host with ``break_lock``) or raise.

        Returns ``False`` when the lock vanished meanwhile (its holder finished): try again.
        """
        if not self.path.exists():
            return False
        holder = _read_holder(self.path)
        if holder is None:
            # Unreadable: a holder may be between O_EXCL and its write; give it a moment.
            time.sleep(0.2)
            holder = _read_holder(self.path)
        if holder is None:
            if not self.path.exists():
                return False
            raise RunLockedError(
                f"{self.run_dir} is locked ({self.path} exists but cannot be read); if no run "
                f"is using it, delete {self.path}"
            )
        here = holder.host == self.holder.host
        if here and _pid_alive(holder.pid):
            raise RunLockedError(
                f"{self.run_dir} is in use by a running raflora process ({holder.describe()}); "
                f"wait for it to finish or stop it, or choose another output directory"
            )
        if not here and not self.break_lock:
            raise RunLockedError(
                f"{self.run_dir} is locked by {holder.describe()}; this host cannot check "
                f"whether that process still runs. If it does not, run again with --break-lock"
            )
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        reason = "no longer runs" if here else "is on another host (--break-lock)"
        self.notify(
            f"raflora: taking over the lock of {self.run_dir}: its holder "
            f"({holder.describe()}) {reason}"
        )
        return True

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent); a run directory this lock
        created and nothing was written into (the run failed before starting) goes too.
        """
        if not self._held:
            return
        self._held = False
        holder = _read_holder(self.path)
        if holder is not None and (holder.pid, holder.host, holder.since) == (
            self.holder.pid,
            self.holder.host,
            self.holder.since,
        ):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._created:
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                self.run_dir.rmdir()

    def __enter__(self) -> RunLock:
        return self if self._held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def unique_temp(target: Path, suffix: str = ".tmp") -> Path:
    """A temporary path next to ``target`` no other writer uses (PID and a random token)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def replace_dir(target: Path, build: Callable[[Path], _T]) -> _T:
    """Build a directory with ``build(tmp)`` and swap it in for ``target`` atomically.

    The new directory is written under a unique temporary name; then the old ``target`` (if
    any) is renamed aside, the new one renamed in, and the old one removed. A failure while
    building removes the temporary directory and leaves ``target`` untouched; an ``OSError``
    names ``target``. Leftovers of a writer that was killed half-way are removed first.

    Raises
    ------
    NotADirectoryError
        ``target`` exists and is not a directory (it is never replaced).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = unique_temp(target, ".new")
    old = unique_temp(target, ".old")
    try:
        result = build(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as err:
        _undo(tmp, old, target)
        raise _naming(err, target) from err
    except BaseException:
        _undo(tmp, old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return result


def _undo(tmp: Path, old: Path, target: Path) -> None:
    """Remove a half-built directory and put the previous one back if it was moved aside."""
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not target.exists():
        os.replace(old, target)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` when it names no file (or a temporary one of ours)."""
    name = err.filename
    if name is None or any(_LEFTOVER.match(part) for part in Path(str(name)).parts):
        return type(err)(err.errno, err.strerror or str(err), str(path))
    return err


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.(?:tmp|new|old)$")


def remove_leftovers(target: Path, *, any_name: bool = False) -> list[Path]:
    """Remove temporary siblings of ``target`` (see :func:`unique_temp`) left by dead writers.

    With ``any_name``, ``target`` is a directory and the temporary files of any file in it go.
    """
    removed: list[Path] = []
    folder = target if any_name else target.parent
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _LEFTOVER.match(path.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        if not any_name and match["name"] != target.name:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def _describe_os_error(err: OSError) -> str:
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        what = "no space left on the device"
    return what


@contextlib.contextmanager
def writing(run_dir: Path, done_rounds: Callable[[], int]) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into one :class:`RunWriteError` line.

    The message names the file (when the error says which), the rounds saved in the last good
    checkpoint (``done_rounds()``) and the command that continues the run.
    """
    try:
        yield
    except OSError as err:
        name = err.filename if err.filename is not None else "a file"
        done = done_rounds()
        then = (
            f"{done} finished round(s) are kept in {run_dir}; fix the problem, then continue "
            f"with `raflora run --resume {run_dir}`"
            if done
            else f"no round was saved in {run_dir} yet; fix the problem and run again"
        )
        raise RunWriteError(f"cannot write {name}: {_describe_os_error(err)}. {then}") from None


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file through ``write(fh)`` under a unique temporary name, fsync, rename in.

    Any failure removes the temporary file and leaves ``path`` as it was. A failed write is an
    ``OSError`` naming ``path`` — also when the writer reports it otherwise (``torch.save``'s
    zip writer raises a ``RuntimeError`` when the disk is full).
    """
    remove_leftovers(path)
    tmp = unique_temp(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise _naming(err, path) from err
    except RuntimeError as err:
        _remove(tmp)
        if not _is_write_failure(err):
            raise
        raise write_failure(path, err) from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _is_write_failure(err: BaseException) -> bool:
    """A writer library's way of saying a write failed (torch's zip writer, safetensors)."""
    text = str(err)
    return any(
        key in text
        for key in ("unexpected pos", "PytorchStreamWriter", "file write failed", "os error")
    )


def write_failure(path: Path, err: BaseException) -> OSError:
    """An ``OSError`` naming ``path`` for a write a library reported failed in its own way."""
    try:
        full = shutil.disk_usage(path.parent if path.parent.exists() else ".").free < 2**20
    except OSError:
        full = False
    if full or "No space left" in str(err):
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OSError(errno.EIO, f"the write failed ({first})", str(path))
