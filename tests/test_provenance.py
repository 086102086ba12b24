"""Provenance of a run directory: ``environment.json``."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

import raflora
from conftest import TINY_SYNTHETIC, config_with
from raflora.engine import run_local
from raflora.report.provenance import add_session, git_revision, package_versions

SYNTHETIC: dict[str, Any] = {**TINY_SYNTHETIC, "threads": 1}


class StopRunError(RuntimeError):
    pass


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def sessions(run_dir: Path) -> list[dict[str, Any]]:
    data = json.loads((run_dir / "environment.json").read_text())
    assert list(data) == ["sessions"]
    result: list[dict[str, Any]] = data["sessions"]
    return result


def test_a_new_run_records_its_environment(tmp_path: Path) -> None:
    before = datetime.now().astimezone()
    run_local(config_with(SYNTHETIC), tmp_path, progress=False)
    [session] = sessions(tmp_path)
    assert set(session) == {
        "started",
        "first_round",
        "engine",
        "argv",
        "raflora",
        "python",
        "packages",
        "device",
        "threads",
        "hostname",
        "platform",
    }
    assert before <= datetime.fromisoformat(session["started"]) <= datetime.now().astimezone()
    assert (session["first_round"], session["engine"]) == (1, "local")
    assert session["raflora"]["version"] == raflora.__version__
    commit, dirty = git_revision(Path(raflora.__file__))
    assert session["raflora"]["git_commit"] == commit
    assert session["raflora"]["git_dirty"] == dirty
    assert session["python"]["version"] == platform.python_version()
    assert session["packages"]["torch"] == torch.__version__
    assert set(session["packages"]) == {
        "torch",
        "transformers",
        "peft",
        "datasets",
        "numpy",
        "flwr",
    }
    assert all(isinstance(v, str) and v[0].isdigit() for v in session["packages"].values())
    assert session["device"]["type"] == "cpu" and session["device"]["cuda"] is None
    assert isinstance(session["device"]["name"], str) and session["device"]["name"]
    assert session["threads"] == {"torch": 1, "config": 1}
    assert session["hostname"] == socket.gethostname()


def test_raflora_is_imported_from_this_checkout_so_its_commit_is_recorded() -> None:
    source = Path(raflora.__file__)
    commit, dirty = git_revision(source)
    assert commit == git(source.parent, "rev-parse", "HEAD")
    assert len(commit) == 40 and isinstance(dirty, bool)


def test_each_resume_adds_a_session_and_overwrite_starts_over(tmp_path: Path) -> None:
    config = config_with(SYNTHETIC)

    def stop(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            raise StopRunError

    with pytest.raises(StopRunError):
        run_local(config, tmp_path, progress=False, on_round=stop)
    run_local(config, tmp_path, resume=True, progress=False)
    assert [s["first_round"] for s in sessions(tmp_path)] == [1, 2]
    run_local(config, tmp_path, progress=False, overwrite=True)
    assert [s["first_round"] for s in sessions(tmp_path)] == [1]


def test_git_revision_of_tracked_untracked_and_outside_files(tmp_path: Path) -> None:
    outside = tmp_path / "plain" / "mod.py"
    outside.parent.mkdir()
    outside.write_text("x = 1\n")
    assert git_revision(outside) == (None, None)  # not in a checkout
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git(repo, "init", "-q")
    source = repo / "pkg" / "mod.py"
    source.write_text("x = 1\n")
    assert git_revision(source) == (None, None)  # in a checkout, but not tracked
    git(repo, "add", "pkg/mod.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert git_revision(source) == (head, False)
    source.write_text("x = 2\n")
    assert git_revision(source) == (head, True)


def test_a_missing_package_is_null() -> None:
    assert package_versions(["torch", "no-such-distribution-raflora"]) == {
        "torch": torch.__version__,
        "no-such-distribution-raflora": None,
    }


def test_add_session_appends_on_resume_and_starts_afresh_otherwise() -> None:
    one = add_session(None, {"first_round": 1}, resume=False)
    two = add_session(one, {"first_round": 5}, resume=True)
    assert json.loads(two) == {"sessions": [{"first_round": 1}, {"first_round": 5}]}
    assert json.loads(add_session(two, {"first_round": 1}, resume=False)) == {
        "sessions": [{"first_round": 1}]
    }
    # an unreadable file (or a run from before provenance) on resume: this session alone
    assert json.loads(add_session("{not json", {"first_round": 3}, resume=True)) == {
        "sessions": [{"first_round": 3}]
    }
