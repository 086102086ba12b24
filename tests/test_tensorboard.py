"""TensorBoard events (``output.tensorboard``), read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SYNTHETIC, config_with
from raflora.config import ConfigError, environment_problems, validate
from raflora.diagnostics import energy_report
from raflora.engine import run_local
from raflora.report import read_metrics
from raflora.report.tensorboard import (
    TensorBoardMissingError,
    round_scalars,
    session_files,
    spectrum_shares,
    write_round,
)

TENSORBOARD: dict[str, Any] = {
    "fl.rounds": 3,
    "train.lr": 2e-2,
    "eval.every": 2,
    "eval.per_level": True,
    "output.tensorboard": True,
}
"""The engine tests' federation (``conftest.SYNTHETIC``) for 3 rounds with TensorBoard events."""


class StopRunError(RuntimeError):
    pass


def tb_config(**over: Any) -> Any:
    return config_with(SYNTHETIC, **{**TENSORBOARD, **over})


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def scalar_series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_round_scalars_tags_every_number_of_a_row() -> None:
    row = {
        "round": 2,
        "lr": 0.01,
        "train_loss": 0.7,
        "accuracy": 0.8,
        "eval_loss": 0.5,
        "accuracy@4": 0.6,
        "higher_rank_energy": 0.25,
        "energy_per_level": {"4": 0.75, "8": 1.0},
        "upload_bytes": 100,
        "download_bytes": 200,
        "clients": [1, 2],
        "client_ranks": [4, 8],
        "accepted": 2,
        "rejected": 0,
        "rejected_reasons": {},
        "time": {"train_seconds": 1.5, "eval_seconds": None},
    }
    assert round_scalars(row) == {
        "train/lr": 0.01,
        "train/loss": 0.7,
        "eval/accuracy": 0.8,
        "eval/eval_loss": 0.5,
        "eval/accuracy@4": 0.6,
        "energy/higher_rank_energy": 0.25,
        "traffic/upload_bytes": 100.0,
        "traffic/download_bytes": 200.0,
        "clients/accepted": 2.0,
        "clients/rejected": 0.0,
        "energy/rho@4": 0.75,
        "energy/rho@8": 1.0,
        "time/train_seconds": 1.5,
    }
    assert round_scalars({"round": 1, "train_loss": None, "eval_loss": float("nan")}) == {}


def test_spectrum_shares_are_energy_shares_averaged_over_modules() -> None:
    eye = torch.eye(2)
    factors = {
        "a": (torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), eye),  # σ² = 9, 1
        "b": (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), eye),  # σ² = 1, 1
        "c": (torch.zeros(3, 2), eye),  # no energy: left out of the mean
    }
    report = energy_report(factors, [4])
    assert spectrum_shares(report, 4) == pytest.approx([0.7, 0.3, 0.0, 0.0], abs=1e-6)
    assert spectrum_shares(energy_report({"c": factors["c"]}, [4]), 4) == []


def test_run_events_read_back_with_tensorboards_reader(tmp_path: Path) -> None:
    result = run_local(tb_config(), tmp_path, progress=False)
    acc = events(tmp_path)
    rows = result.metrics
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "eval/accuracy",
        "eval/eval_loss",
        "energy/higher_rank_energy",
        "traffic/upload_bytes",
        "traffic/download_bytes",
        "time/train_seconds",
        "time/eval_seconds",
    }
    expected |= {f"eval/accuracy@{r}" for r in (2, 4, 8)} | {f"energy/rho@{r}" for r in (2, 4, 8)}
    assert expected <= tags
    assert scalar_series(acc, "train/loss") == [
        (r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in rows
    ]
    assert scalar_series(acc, "eval/accuracy@2") == [
        (r["round"], pytest.approx(r["accuracy@2"], rel=1e-6)) for r in rows[1:]
    ]
    assert scalar_series(acc, "energy/rho@2") == [
        (r["round"], pytest.approx(r["energy_per_level"]["2"], rel=1e-5)) for r in rows
    ]
    histograms = acc.Histograms("energy/spectrum")
    assert [h.step for h in histograms] == [1, 2, 3]
    for h, row in zip(histograms, rows, strict=True):
        value = h.histogram_value
        assert value.bucket_limit == [1.5 + i for i in range(8)]  # one bucket per direction
        assert sum(value.bucket) == pytest.approx(1.0)
        assert sum(value.bucket[:2]) == pytest.approx(row["energy_per_level"]["2"], rel=1e-5)


def test_a_resumed_run_shows_every_round_once(tmp_path: Path) -> None:
    config = tb_config(**{"fl.rounds": 4})

    def stop(row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise StopRunError

    with pytest.raises(StopRunError):
        run_local(config, tmp_path, progress=False, on_round=stop)
    # A kill after round 3's events but before its checkpoint, then one mid-way through a record.
    write_round(tmp_path, {"round": 3, "train_loss": 99.0})
    with session_files(tmp_path)[-1].open("ab") as handle:
        handle.write(struct.pack("<Q", 100) + b"\x00" * 10)
    run_local(config, tmp_path, resume=True, progress=False)
    assert len(session_files(tmp_path)) == 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    acc = events(tmp_path)
    assert scalar_series(acc, "train/loss") == [
        (r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in rows
    ]
    assert [h.step for h in acc.Histograms("energy/spectrum")] == [1, 2, 3, 4]


def test_overwrite_removes_the_events_and_tensorboard_off_writes_none(tmp_path: Path) -> None:
    run_local(tb_config(**{"fl.rounds": 1}), tmp_path, progress=False)
    assert session_files(tmp_path)
    off = tb_config(**{"fl.rounds": 1, "output.tensorboard": False})
    run_local(off, tmp_path, progress=False, overwrite=True)
    assert not (tmp_path / "tensorboard").exists()


def test_missing_tensorboard_is_a_config_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on, off = tb_config(), tb_config(**{"output.tensorboard": False})
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    message = (
        "output.tensorboard: the 'tensorboard' package is not installed; "
        "pip install 'raflora[tensorboard]' (or set output.tensorboard=false)"
    )
    assert validate(on) == []  # a valid config: a saved one still loads (export, inspection)
    tb_config()
    assert environment_problems(on) == [message]
    assert environment_problems(off) == []
    with pytest.raises(ConfigError, match=r"output\.tensorboard"):
        run_local(on, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TensorBoardMissingError, match=r"raflora\[tensorboard\]"):
        write_round(tmp_path, {"round": 1})


@pytest.mark.slow  # Ray's start-up: about 30 s on 2 cores
def test_flower_engine_writes_the_same_events_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raflora.flower import run_flower

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    threads = torch.get_num_threads()
    try:
        over = {"fl.rounds": 2, "threads": 1, "flower.cpus_per_client": 1}
        local = run_local(tb_config(**over), tmp_path / "local", progress=False)
        flower_config = tb_config(engine="flower", **over)
        flower = run_flower(flower_config, tmp_path / "flower", progress=False)
    finally:
        torch.set_num_threads(threads)
    skip = {"time", "transport_bytes"}  # Flower also records what its transport moved
    strip = [{k: v for k, v in r.items() if k not in skip} for r in local.metrics]
    assert [{k: v for k, v in r.items() if k not in skip} for r in flower.metrics] == strip
    assert "accuracy@2" in flower.metrics[-1]
    a, b = events(tmp_path / "local"), events(tmp_path / "flower")
    tags = [t for t in a.Tags()["scalars"] if not t.startswith("time/")]
    flower_tags = [t for t in b.Tags()["scalars"] if not t.startswith("time/")]
    assert sorted([*tags, "traffic/transport_bytes"]) == sorted(flower_tags)
    for tag in tags:
        assert scalar_series(b, tag) == scalar_series(a, tag), tag
    for ha, hb in zip(
        a.Histograms("energy/spectrum"), b.Histograms("energy/spectrum"), strict=True
    ):
        assert (hb.step, hb.histogram_value) == (ha.step, ha.histogram_value)
    env = json.loads((tmp_path / "flower" / "environment.json").read_text())
    assert [s["engine"] for s in env["sessions"]] == ["flower"]
