"""``raflora sweep``: grid parsing, the validated plan, and sweeps run, interrupted and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from raflora.cli import main
from raflora.cli.sweep import keep_going_hint
from raflora.config import load_config
from raflora.engine import load_checkpoint, run_local
from raflora.engine.run_files import saved_rounds
from raflora.experiments.sweep import (
    SweepError,
    parse_grid,
    plan_runs,
    resolve_preset,
    settings_of,
    split_values,
)
from raflora.report import read_metrics

CONFIG = {
    "method": "raflora",
    "seed": 0,
    "task": {"name": "synthetic", "options": {"num_train": 200, "num_eval": 100}},
    "fl": {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "rank_levels": [2, 4, 8]},
    "train": {"lr": 5e-3, "batch_size": 32},
    "output": {"plots": False},
}
GRID = ["--grid", "fl.rank_levels=[2,4],[2,8]"]
SWEEP = [*GRID, "--methods", "flexlora,raflora", "--seeds", "0,1"]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/seed-*/config.yaml"))


def _assert_same_runs(a: Path, b: Path) -> None:
    """Both sweeps hold the same runs with the same metrics (but time) and adapters."""
    runs = _run_dirs(a)
    assert [r.relative_to(a) for r in runs] == [r.relative_to(b) for r in _run_dirs(b)]
    for run in runs:
        other = b / run.relative_to(a)
        assert _strip(read_metrics(run / "metrics.jsonl")) == _strip(
            read_metrics(other / "metrics.jsonl")
        ), run
        adapter = Path("adapter") / "adapter_model.safetensors"
        assert (run / adapter).read_bytes() == (other / adapter).read_bytes(), run


# --------------------------------------------------------------------------- the grid


def test_values_split_on_commas_outside_brackets_and_quotes() -> None:
    assert split_values("[4,8],[8, 16]") == ["[4,8]", "[8, 16]"]
    assert split_values("dir-a0.1, dir-a1.0") == ["dir-a0.1", "dir-a1.0"]
    assert split_values("{a: 1, b: 2},'x,y',3") == ["{a: 1, b: 2}", "'x,y'", "3"]
    with pytest.raises(ValueError, match="unclosed bracket"):
        split_values("[4,8")
    with pytest.raises(ValueError, match="unbalanced"):
        split_values("4],8")


def test_parse_grid_reports_malformed_reserved_empty_and_repeated() -> None:
    axis = parse_grid("fl.rank_levels=[4,8],[8,16]")
    assert (axis.key, axis.values) == ("fl.rank_levels", ("[4,8]", "[8,16]"))
    with pytest.raises(SweepError, match="expected KEY=V1"):
        parse_grid("fl.rounds")
    with pytest.raises(SweepError, match="use --seeds"):
        parse_grid("seed=1,2")
    with pytest.raises(SweepError, match="use --methods"):
        parse_grid("method=flexlora,raflora")
    for key in ("output", "output.dir", "output.plots", "output.tensorboard"):
        with pytest.raises(SweepError, match=f"{key} cannot be swept"):
            parse_grid(f"{key}=true,false")
    with pytest.raises(SweepError, match=r"change nothing measured.*override instead"):
        parse_grid("output.plots=true,false")
    with pytest.raises(SweepError) as err:
        parse_grid("fl.rounds=1,,2,1")
    assert err.value.problems == [
        "--grid 'fl.rounds=1,,2,1': empty value",
        "--grid 'fl.rounds=1,,2,1': value '1' is repeated",
    ]


def test_settings_are_the_cross_product_with_safe_names() -> None:
    settings = settings_of(
        [parse_grid("fl.rank_levels=[2,4],[2, 8]"), parse_grid("data.partition=iid,dir-a0.5")]
    )
    assert [s.name for s in settings] == [
        "fl.rank_levels=2-4,data.partition=iid",
        "fl.rank_levels=2-4,data.partition=dir-a0.5",
        "fl.rank_levels=2-8,data.partition=iid",
        "fl.rank_levels=2-8,data.partition=dir-a0.5",
    ]
    assert settings[1].label == "fl.rank_levels=[2,4], data.partition=dir-a0.5"
    assert settings[3].overrides == ("fl.rank_levels=[2, 8]", "data.partition=dir-a0.5")
    # values whose safe names collide stay apart; a key given twice is an error
    names = [s.name for s in settings_of([parse_grid("task.options.tag='a/b','a b'")])]
    assert names == ["task.options.tag=a_b", "task.options.tag=a_b_2"]
    with pytest.raises(SweepError, match="given twice"):
        settings_of([parse_grid("fl.rounds=1,2"), parse_grid("fl.rounds=3")])
    assert [s.name for s in settings_of([])] == [""]


def test_presets_by_bare_name_or_path_from_any_directory(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("fl: {rank_levels: [2, 3]}\n")
    monkeypatch.chdir(tmp_path)  # bare names are still found in the checkout's configs/
    settings = settings_of([parse_grid(f"preset=conf-1,dist-2.yaml,{own}")])
    assert [s.name for s in settings] == ["preset=conf-1", "preset=dist-2", "preset=mine"]
    specs = plan_runs([config_file], ["fl.rounds=1"], settings, ["raflora"], None, tmp_path)
    assert [s.config.fl.rank_levels for s in specs] == [
        [1, 16, 32, 48, 64],
        [8, 16, 32, 48, 64],
        [2, 3],
    ]
    assert specs[1].config.fl.rank_probs == [0.7, 0.1, 0.1, 0.05, 0.05]
    assert specs[0].config.fl.rounds == 1  # the user's overrides apply over a preset
    with pytest.raises(SweepError, match="no preset file 'conf-99'"):
        resolve_preset("conf-99")


def test_preset_values_that_are_not_yaml_lists_are_reported_with_the_others() -> None:
    with pytest.raises(SweepError) as err:
        settings_of([parse_grid("preset=[a]b,[!!int x],conf-99,[conf-1,dist-2]")])
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("--grid preset: value '[a]b' is not a YAML list of preset")
    assert problems[1].startswith("--grid preset: value '[!!int x]' is not a YAML list of")
    assert "no preset file 'conf-99'" in problems[2]
    (merged,) = settings_of([parse_grid("preset=[conf-1,dist-2]")])
    assert merged.name == "preset=conf-1+dist-2" and len(merged.files) == 2


def test_plan_sets_seed_threads_and_directory_per_run(config_file: Path, tmp_path: Path) -> None:
    settings = settings_of([parse_grid("fl.rank_levels=[2,4],[2,8]")])
    specs = plan_runs([config_file], [], settings, ["flexlora", "raflora"], [3, 1], tmp_path)
    assert [(s.setting.name, s.method, s.seed) for s in specs][:3] == [
        ("fl.rank_levels=2-4", "flexlora", 3),
        ("fl.rank_levels=2-4", "flexlora", 1),
        ("fl.rank_levels=2-4", "raflora", 3),
    ]
    last = specs[-1]
    assert last.run_dir == tmp_path / "fl.rank_levels=2-8" / "raflora" / "seed-1"
    assert (last.config.method, last.config.seed, last.config.threads) == ("raflora", 1, 1)
    assert last.config.fl.rank_levels == [2, 8]
    assert last.config.output.dir == str(last.run_dir)


def test_every_problem_of_every_setting_is_reported_before_anything_runs(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "sweep",
            str(config_file),
            "--grid",
            "fl.clients_per_round=2,9",  # 9 > num_clients
            "--grid",
            "train.lr=0.01,-1",
            "--grid",
            "fl.bogus=1",
            "--grid",
            "seed=1,2",
            "--metrics",
            "final_accuracy,final_acc",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "seed cannot be swept (use --seeds)" in err
    assert "unknown metric(s) 'final_acc'; available: " in err and "traffic" in err
    assert err.count("unknown key 'bogus'") == 1  # every setting has it: reported once
    assert "[fl.clients_per_round=9, train.lr=0.01, fl.bogus=1] fl.clients_per_round" in err
    assert "[fl.clients_per_round=2, train.lr=-1, fl.bogus=1] train.lr" in err
    assert "[fl.clients_per_round=9, train.lr=-1, fl.bogus=1] train.lr" in err
    assert not out.exists()


# --------------------------------------------------------------------------- running


def _interrupt_after_first_round(run_dir: Path) -> None:
    """Put ``run_dir`` back to the state a kill after round 1 leaves (checkpoint at round 1)."""

    class KilledError(Exception):
        pass

    def stop(row: dict[str, Any]) -> None:
        raise KilledError

    config = load_config(run_dir / "config.yaml")
    for path in run_dir.iterdir():  # start it over, then stop it after its first round
        subprocess.run(["rm", "-rf", str(path)], check=True)
    with pytest.raises(KilledError):
        run_local(config, run_dir, progress=False, on_round=stop)
    assert load_checkpoint(run_dir).round == 1
    assert not (run_dir / "summary.json").exists()


def test_sweep_end_to_end_then_interrupted_and_rerun(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 rank configurations × 2 methods × 2 seeds in 2 worker processes; then the sweep as a
    kill leaves it, rerun in this process: the same numbers (so they depend neither on
    ``--jobs`` nor on the resume)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["sweep", str(config_file), *SWEEP, "--jobs", "2", "--out", str(full)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": ran, final accuracy") == 8
    assert "8 runs: 8 ran; sweep: " in printed
    assert len(_run_dirs(full)) == 8

    # the report: the statistics of each cell are those of its two runs
    stats = json.loads((full / "sweep.json").read_text())
    cell = stats["settings"]["fl.rank_levels=[2,8]"]["raflora"]["final_accuracy"]
    accs = [
        json.loads(
            (full / "fl.rank_levels=2-8" / "raflora" / f"seed-{s}" / "summary.json").read_text()
        )["final_accuracy"]
        for s in (0, 1)
    ]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(accs) / 2)
    assert cell["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    table = (full / "sweep.md").read_text()
    assert "| Setting | flexlora | raflora |" in table
    assert "| fl.rank_levels=[2,8] | " in table and "## Final acc. (%)" in table
    for metric in ("final_accuracy", "best_accuracy", "mean_higher_rank_energy", "traffic"):
        assert (full / f"sweep_{metric}.png").stat().st_size > 0

    # "killed mid-way": three runs finished, the fourth stopped after its first round
    subprocess.run(["cp", "-r", str(full), str(cut)], check=True)
    runs = _run_dirs(cut)
    _interrupt_after_first_round(runs[3])
    for run in runs[4:]:
        subprocess.run(["rm", "-rf", str(run)], check=True)
    (cut / "sweep.json").unlink()
    assert main(["sweep", str(config_file), *SWEEP, "--jobs", "1", "--out", str(cut)]) == 0
    printed = capsys.readouterr().out
    assert "[8/8] fl.rank_levels=[2,8] raflora seed 1: ran" in printed  # in plan order
    assert printed.count("skipped (finished earlier)") == 3
    assert printed.count(": resumed, final accuracy") == 1
    assert printed.count(": ran, final accuracy") == 4
    assert "8 runs: 4 ran, 1 resumed, 3 skipped" in printed
    _assert_same_runs(full, cut)
    assert (cut / "sweep.json").read_text() == (full / "sweep.json").read_text()

    # a third time: nothing to do
    assert main(["sweep", str(config_file), *SWEEP, "--out", str(cut), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_a_failed_run_does_not_stop_the_sweep_and_the_exit_code_says_so(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    locked = out / "task.options.num_train=300" / "raflora" / "seed-0"
    locked.mkdir(parents=True)
    holder = subprocess.Popen(  # another live process holds one run's directory
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from raflora.engine.rundir import RunLock; "
            f"RunLock(Path({str(locked)!r})).acquire(); print('held', flush=True); "
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code = main(
            [
                "sweep",
                str(config_file),
                "--grid",
                "task.options.num_train=-5,200,300",  # -5 fails when the task is built
                "--methods",
                "raflora",
                "--out",
                str(out),
            ]
        )
    finally:
        holder.kill()
        holder.wait()
    captured = capsys.readouterr()
    assert code == 1
    assert "[1/3] task.options.num_train=-5 raflora seed 0: FAILED: " in captured.err
    assert "num_train: must be ≥ 1, got -5" in captured.err
    assert "task.options.num_train=300 raflora seed 0: FAILED: " in captured.err
    assert "in use by a running raflora process" in captured.err
    assert "3 runs: 1 ran, 2 FAILED" in captured.err
    assert "[2/3] task.options.num_train=200 raflora seed 0: ran" in captured.out
    assert (out / "task.options.num_train=200" / "raflora" / "seed-0" / "summary.json").exists()
    report = (out / "sweep.md").read_text()
    assert "## Failed runs" in report and "| task.options.num_train=-5 | — |" in report
    assert len(json.loads((out / "sweep.json").read_text())["failed"]) == 2


def _default_sigint() -> None:
    """In the child before exec: SIGINT handled by default and not blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_the_sweep_and_the_same_command_continues_it(
    config_file: Path, tmp_path: Path
) -> None:
    """A real interruption (SIGINT to the sweep process) at whatever point it reaches.

    Ten rounds per run leave the sweep busy for a while after its first saved round, so the
    signal lands mid-sweep even when a loaded machine notices that round late (with four, a
    sweep could finish between the check and the signal, and rightly exit 0).
    """
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "raflora.cli", "sweep", str(config_file), "fl.rounds=10"]
    cmd += ["task.options.num_train=1500", "--grid", "train.lr=0.005", "--seeds", "0,1"]
    cmd += ["--methods", "raflora", "--out", str(out)]
    # the sweep starts as from a shell: Ray (earlier tests in this process) adds its own paths
    # to PYTHONPATH and a PYTHONBREAKPOINT; SIGINT at its default disposition and unblocked,
    # whatever this process inherited or set (an ignored SIGINT is inherited across exec)
    polluted = ("PYTHONPATH", "PYTHONBREAKPOINT")
    env = {k: v for k, v in os.environ.items() if k not in polluted}
    env["PYTHONUNBUFFERED"] = "1"
    here = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    first = out / "train.lr=0.005" / "raflora" / "seed-0"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if saved_rounds(first) >= 1:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.skip("the sweep finished before it could be interrupted")
        # CPython drops a KeyboardInterrupt raised inside a finalizer ("Exception ignored in
        # …"), so one Ctrl-C can be lost: like a user, press it again if the sweep goes on
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=3)
                break
            except subprocess.TimeoutExpired:
                continue
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err, here)
    assert "run the same command again to continue" in err
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 runs: " in done.stdout and "FAILED" not in done.stdout
    assert "resumed" in done.stdout or "skipped" in done.stdout
    for seed in (0, 1):
        run = out / "train.lr=0.005" / "raflora" / f"seed-{seed}"
        assert len(read_metrics(run / "metrics.jsonl")) == 10
        assert not (run / "run.lock").exists()


def _kill_a_worker_mid_run(proc: subprocess.Popen[str], out: Path) -> Path:
    """SIGKILL the worker process holding a run's lock once that run saved a round."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for lock in out.glob("*/*/seed-*/run.lock"):
            try:
                pid = json.loads(lock.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue  # being written, or gone
            if pid != proc.pid and saved_rounds(lock.parent) >= 1:
                os.kill(pid, signal.SIGKILL)
                return lock.parent
        time.sleep(0.02)
    pytest.skip("the sweep finished before a worker could be killed")


def test_a_killed_worker_fails_nothing_its_run_resumes_in_a_new_one(
    config_file: Path, tmp_path: Path
) -> None:
    """A worker killed mid-run (as the OOM killer would) broke the whole pool: every pending
    and running run failed. Now only its run is affected, and it resumes in a fresh process."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "raflora.cli", "sweep", str(config_file), "fl.rounds=3"]
    cmd += ["task.options.num_train=1500", "--grid", "train.lr=0.005", "--seeds", "0,1,2"]
    cmd += ["--methods", "raflora", "--jobs", "2", "--metrics", "final_accuracy", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_a_worker_mid_run(proc, out)
        printed, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "died (killed, or out of memory?); running it again in a new one" in err
    assert "FAILED" not in err and "3 runs: " in printed
    assert ": resumed, final accuracy" in printed
    for run in _run_dirs(out):
        assert len(read_metrics(run / "metrics.jsonl")) == 3, run
        assert (run / "summary.json").is_file() and not (run / "run.lock").exists()
    assert killed in _run_dirs(out)


def _one_run_sweep(config_file: Path, out: Path, *extra: str) -> int:
    return main(
        [
            *("sweep", str(config_file), "--grid", "train.lr=0.005", "--methods", "raflora"),
            *("--out", str(out), *extra),
        ]
    )


def test_a_damaged_summary_is_rewritten_by_a_resume(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated summary.json (a kill while it was written) counted as finished, so every
    rerun failed reading it; now the run is resumed and its summary written again."""
    out = tmp_path / "out"
    assert _one_run_sweep(config_file, out, "--quiet") == 0
    summary = out / "train.lr=0.005" / "raflora" / "seed-0" / "summary.json"
    good = json.loads(summary.read_text())
    summary.write_text(summary.read_text()[:20])
    capsys.readouterr()
    assert _one_run_sweep(config_file, out) == 0
    assert "1 runs: 1 resumed" in capsys.readouterr().out
    again = json.loads(summary.read_text())
    for key in ("final_accuracy", "best_accuracy", "final_higher_rank_energy", "rounds"):
        assert again[key] == good[key], key


def test_a_config_change_names_the_way_forward_and_keeps_the_report(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _one_run_sweep(config_file, out, "--quiet") == 0
    report = (out / "sweep.md").read_text(), (out / "sweep.json").read_text()
    capsys.readouterr()
    assert _one_run_sweep(config_file, out, "train.batch_size=16") == 1
    err = capsys.readouterr().err
    run_dir = out / "train.lr=0.005" / "raflora" / "seed-0"
    assert f"{run_dir} holds a run with another config (in: train); use another --out or " in err
    assert "--resume" not in err
    assert f"no run finished: kept the previous report {out / 'sweep.md'}" in err
    assert ((out / "sweep.md").read_text(), (out / "sweep.json").read_text()) == report
    # --overwrite starts it over with the new config
    assert _one_run_sweep(config_file, out, "train.batch_size=16", "--overwrite") == 0
    assert "1 runs: 1 ran" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 16


def test_an_out_that_cannot_hold_the_sweep_is_refused_before_running(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert _one_run_sweep(config_file, a_file) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {a_file} is a file")
    assert _one_run_sweep(config_file, a_file / "sub") == 2
    assert f"--out {a_file / 'sub'} cannot be created: {a_file} is a file" in (
        capsys.readouterr().err
    )
    compare = ["compare", str(config_file), "--methods", "flexlora,raflora", "--seeds", "0,1"]
    assert main([*compare, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file" in capsys.readouterr().err
    # a report that cannot be written is one line, exit 2 (not a traceback)
    out = tmp_path / "out"
    (out / "sweep.md").mkdir(parents=True)
    assert _one_run_sweep(config_file, out, "--quiet") == 2
    err = capsys.readouterr().err
    assert f"cannot write the report in {out}: {out / 'sweep.md'}: Is a directory" in err
    assert "Traceback" not in err


def test_the_ctrl_c_hint_names_the_out_to_add_when_none_was_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs" / "compare-20260101-000000"
    with pytest.raises(KeyboardInterrupt), keep_going_hint("compare", out, out_given=False):
        raise KeyboardInterrupt
    assert f"run the same command with --out {out} to continue" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt), keep_going_hint("sweep", out):
        raise KeyboardInterrupt
    assert "run the same command again to continue" in capsys.readouterr().err
