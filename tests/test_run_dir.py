"""One writer per run directory, atomic outputs, write errors, the CLI."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import TINY_SYNTHETIC
from raflora.cli import main
from raflora.engine import CheckpointError, load_checkpoint
from raflora.engine import checkpoint as checkpoint_module
from raflora.engine.rundir import LOCK_FILE, RunLock, RunLockedError, replace_dir
from raflora.report import read_metrics

CONFIG = {**TINY_SYNTHETIC, "seed": 1}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "since": 0.0}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------ the lock


def test_a_run_holds_its_lock_while_it_runs_and_removes_it_after(
    config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    seen: list[dict[str, Any]] = []

    def on_round(row: dict[str, Any]) -> None:
        seen.append(json.loads((out / LOCK_FILE).read_text()))

    from raflora.config import load_config
    from raflora.engine import run_local

    run_local(load_config(config_file), out, progress=False, on_round=on_round)
    assert [h["pid"] for h in seen] == [os.getpid(), os.getpid()]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]])
def test_a_live_run_directory_is_refused_naming_its_holder(
    flag: list[str],
    config_file: Path,
    tmp_path: Path,
    live_pid: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert main(["run", str(config_file), "fl.rounds=1", "--out", str(out), "--quiet"]) == 0
    write_lock(out, live_pid)
    before = sorted(p.name for p in out.iterdir())
    args = ["run", "--resume", str(out)] if flag == ["--resume"] else ["run", str(config_file)]
    if flag != ["--resume"]:
        args += ["--out", str(out), *flag]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"PID {live_pid}" in err and "in use" in err
    assert sorted(p.name for p in out.iterdir()) == before  # --overwrite deleted nothing
    assert load_checkpoint(out).round == 1


def test_a_lock_of_a_dead_process_is_taken_over_with_a_notice(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    write_lock(out, pid)
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"PID {pid}" in err
    assert not (out / LOCK_FILE).exists()


def test_a_lock_from_another_host_needs_break_lock(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    write_lock(out, 1, host="elsewhere.example")
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 2
    assert "--break-lock" in capsys.readouterr().err
    assert main(["run", str(config_file), "--out", str(out), "--quiet", "--break-lock"]) == 0
    assert "another host" in capsys.readouterr().err


def test_the_lock_is_exclusive_even_within_one_process(tmp_path: Path) -> None:
    with RunLock(tmp_path) as outer:
        assert outer.held and (tmp_path / LOCK_FILE).exists()
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match="in use"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    write_lock(tmp_path, os.getppid())  # a live process that is not us
    with pytest.raises(RunLockedError, match="in use"):
        RunLock(tmp_path).acquire()


def test_two_takeovers_of_one_stale_lock_leave_one_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from raflora.engine import rundir

    write_lock(tmp_path, dead_pid())
    outcome: dict[str, Any] = {}

    def second() -> None:
        try:
            outcome["b"] = RunLock(tmp_path, notify=lambda text: None).acquire()
        except RunLockedError as err:
            outcome["b"] = err

    real_alive = rundir._pid_alive
    started: list[threading.Thread] = []

    def alive(pid: int) -> bool:
        if not started:  # A has read the dead holder: B tries to take over right now
            started.append(threading.Thread(target=second))
            started[0].start()
            time.sleep(0.3)
        return real_alive(pid)

    monkeypatch.setattr(rundir, "_pid_alive", alive)
    a = RunLock(tmp_path, notify=lambda text: None).acquire()
    started[0].join(timeout=10)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert a.held and holder["since"] == a.holder.since
    assert isinstance(outcome["b"], RunLockedError)  # B saw A's fresh lock, did not remove it
    a.release()


# ---------------------------------------------------------------------------- atomic outputs


def test_replace_dir_swaps_in_a_complete_directory_or_leaves_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "adapter"

    def build(content: str) -> Any:
        def write(tmp: Path) -> None:
            tmp.mkdir()
            (tmp / "a.txt").write_text(content)
            if content == "boom":
                raise KeyboardInterrupt  # interrupted halfway

        return write

    replace_dir(target, build("one"))
    replace_dir(target, build("two"))
    assert (target / "a.txt").read_text() == "two"
    with pytest.raises(KeyboardInterrupt):
        replace_dir(target, build("boom"))
    assert (target / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left


def test_export_rewrites_an_adapter_atomically(
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    dest = tmp_path / "exported"
    assert main(["export", str(out), "--out", str(dest)]) == 0
    files = sorted(p.name for p in dest.iterdir())
    import raflora.engine.export as export_module

    def broken(*args: Any, **kwargs: Any) -> None:
        Path(args[3]).mkdir()
        (Path(args[3]) / "adapter_config.json").write_text("{")  # half written
        raise OSError(errno.ENOSPC, "No space left on device", str(args[3]))

    monkeypatch.setattr(export_module, "export_peft_adapter", broken)
    assert main(["export", str(out), "--out", str(dest), "--rank", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"cannot write {dest}: No space left on device")
    assert sorted(p.name for p in dest.iterdir()) == files
    json.loads((dest / "adapter_config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------- write errors


def test_a_full_disk_ends_with_one_line_and_keeps_the_last_checkpoint(
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj: Any, fh: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # round 2's checkpoint: half written, then the disk is full
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, fh)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no space left" in err and "1 finished round(s)" in err
    assert f"raflora run --resume {out}" in err
    assert load_checkpoint(out).round == 1
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["state.pt"]
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 2


def test_a_checkpoint_with_missing_keys_is_a_checkpoint_error(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", str(config_file), "fl.rounds=1", "--out", str(out), "--quiet"]) == 0
    path = out / "checkpoint" / "state.pt"
    data = torch.load(path, weights_only=True)
    del data["metrics"]
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="'metrics' is missing"):
        load_checkpoint(out)
    data = torch.load(path, weights_only=True)
    data["version"] = 99
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "version 99" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- the CLI


def test_options_and_overrides_in_any_order(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", str(config_file), "--quiet", "fl.rounds=1", "--out", str(out), "seed=5"]
    assert main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["fl"]["rounds"] == 1 and saved["seed"] == 5
    out2 = tmp_path / "out2"
    assert main(["run", "--out", str(out2), "--quiet", str(config_file), "fl.rounds=1"]) == 0
    assert len(read_metrics(out2 / "metrics.jsonl")) == 1


def test_an_unknown_option_is_still_an_error(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["run", str(config_file), "--quiet", "--nope", "fl.rounds=1"])
    assert stop.value.code == 2
    assert "--nope" in capsys.readouterr().err


def test_quiet_silences_library_progress_bars_and_flower_info(config_file: Path) -> None:
    import logging

    import datasets
    from flwr.common.logger import FLOWER_LOGGER
    from transformers.utils import logging as hf_logging

    from raflora.cli import _quiet_libraries

    _quiet_libraries(True)
    try:
        assert not hf_logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
        levels = [h.level for h in FLOWER_LOGGER.handlers]
        assert levels and all(level >= logging.WARNING for level in levels)
    finally:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
        from flwr.common.logger import update_console_handler

        update_console_handler(level=logging.INFO)


def test_quiet_flower_simulation_asks_ray_for_errors_only(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.simulation

    from raflora.config import load_config
    from raflora.engine import EngineError
    from raflora.flower import run_flower

    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        flwr.simulation, "run_simulation", lambda **kw: seen.update(kw["backend_config"])
    )
    with pytest.raises(EngineError):  # the fake simulation finishes nothing
        run_flower(load_config(config_file), tmp_path / "run", progress=False, quiet=True)
    assert seen["init_args"] == {"logging_level": 40, "log_to_driver": False}


def test_a_write_error_before_any_round_says_to_run_again(
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import raflora.engine.run_files as run_files_module

    def save_config(config: Any, path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(run_files_module, "save_config", save_config)
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"cannot write {out / 'config.yaml'}: Permission denied" in err
    assert "no round was saved" in err and "run again" in err
    assert not (out / LOCK_FILE).exists()


def test_export_refuses_to_replace_a_file_and_names_it(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", str(config_file), "fl.rounds=1", "--out", str(out), "--quiet"]) == 0
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["export", str(out), "--out", str(target)]) == 2
    assert f"cannot write {target}: exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_writers_that_fail_their_own_way_become_os_errors_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raflora.engine.rundir import atomic_write_bytes

    target = tmp_path / "state.pt"

    def zip_writer_failure(fh: Any) -> None:  # what torch.save raises when the disk fills up
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, zip_writer_failure)
    assert err.value.filename == str(target) and "write failed" in str(err.value)
    assert list(tmp_path.iterdir()) == []

    def flush_failure(fh: Any) -> None:  # an OSError without a file name (write/flush/fsync)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, flush_failure)
    assert err.value.filename == str(target)

    def bug(fh: Any) -> None:  # any other RuntimeError is not disguised as a write error
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        atomic_write_bytes(target, bug)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    from raflora.engine.rundir import replace_dir

    target = tmp_path / "adapter"
    stale = tmp_path / f".adapter.{dead_pid()}-0123abcd.old"
    stale.mkdir()
    (stale / "x").write_text("old")
    replace_dir(target, lambda tmp: tmp.mkdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
