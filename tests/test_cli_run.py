"""``raflora run | compare | export`` as a user calls them: outputs, errors, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raflora.cli import main
from raflora.engine import load_checkpoint
from raflora.report import read_metrics

CONFIG = {
    "method": "raflora",
    "seed": 1,
    "task": {"name": "synthetic", "options": {"num_train": 400, "num_eval": 200}},
    "fl": {"num_clients": 6, "clients_per_round": 3, "rounds": 2, "rank_levels": [2, 4, 8]},
    "data": {"partition": "iid"},
    "train": {"lr": 5e-3, "batch_size": 32},
    "output": {"plots": False},
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_run_writes_the_run_directory_and_prints_a_summary(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", str(config_file), "fl.rounds=3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final accuracy" in printed and str(out) in printed
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["fl"]["rounds"] == 3


def test_invalid_config_lists_every_problem_and_exits_2(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "run",
            str(config_file),
            "fl.clients_per_round=60",
            "train.lr=-1",
            "method=nope",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "fl.clients_per_round" in err and "train.lr" in err and "method" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["task.name=text-classification", "task.options={}", "task.dataset=/no/data.csv"],
            "/no/data.csv",
        ),
        (["task.name=nope"], "task.name"),
        (["data.partition=patho-c99a1"], "data.partition"),
    ],
)
def test_bad_task_or_data_is_one_line_and_exit_2(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    needle: str,
) -> None:
    code = main(["run", str(config_file), *overrides, "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_missing_model_directory_is_named(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hf_fixtures import make_text_csv

    data = make_text_csv(tmp_path / "t.csv", 40, 3)
    args = ["task.name=text-classification", "task.options={}", f"task.dataset={data}"]
    out = tmp_path / "run"
    code = main(["run", str(config_file), *args, "task.model=/no/such/model", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "/no/such/model" in err and "Traceback" not in err
    assert not out.exists()  # a run that never started leaves no empty run directory


def test_missing_config_and_missing_resume_dir_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_resume_under_another_config_is_refused(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["run", str(config_file), "--out", str(run), "--quiet"]) == 0
    code = main(["run", str(config_file), "method=flexlora", "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "differs" in err and "method" in err and "Traceback" not in err


def test_export_truncates_for_a_client_rank_and_reports_kept_energy(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["run", str(config_file), "--out", str(run), "--quiet"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "r2"), "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "rank-2" in printed and "% of the global" in printed
    cfg = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["r"] == 2
    assert main(["export", str(run), "--out", str(tmp_path / "r9"), "--rank", "99"]) == 2
    assert "--rank" in capsys.readouterr().err


def test_compare_runs_methods_side_by_side(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", str(config_file), "--methods", "flexlora,raflora", "--out", str(out)])
    assert code == 0
    table = (out / "comparison.md").read_text()
    assert "| flexlora |" in table and "| raflora |" in table
    a = read_metrics(out / "flexlora" / "metrics.jsonl")
    b = read_metrics(out / "raflora" / "metrics.jsonl")
    assert [r["clients"] for r in a] == [r["clients"] for r in b]
    assert main(["compare", str(config_file), "--methods", "fedit,raflora"]) == 2
    assert "[fedit]" in capsys.readouterr().err


def _strip(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(
    config_file: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "raflora.cli", "run", str(config_file), "fl.rounds=6"]
    args += ["task.options.num_train=1500", "--quiet"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([*args, "--out", str(full)], check=True, env=env, timeout=300)
    proc = subprocess.Popen([*args, "--out", str(cut)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if load_checkpoint(cut).round >= 2:
                    break
            except Exception:  # not written yet
                pass
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be killed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = load_checkpoint(cut).round
    assert 2 <= done < 6
    subprocess.run(
        [sys.executable, "-m", "raflora.cli", "run", "--resume", str(cut), "--quiet"],
        check=True,
        env=env,
        timeout=300,
    )
    assert _strip(read_metrics(cut / "metrics.jsonl")) == _strip(
        read_metrics(full / "metrics.jsonl")
    )
    assert (cut / "adapter" / "adapter_model.safetensors").read_bytes() == (
        full / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    # the per-module diagnostics too: rows beyond the checkpoint were dropped, none is missing
    assert (cut / "energy.jsonl").read_text() == (full / "energy.jsonl").read_text()
    assert not (cut / "run.lock").exists()  # the killed run's lock was taken over and released
