"""``raflora compare --seeds``: statistics over seeds, paired differences and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from raflora.cli import main
from raflora.experiments.report import (
    default_metrics,
    metric_problems,
    metric_value,
    write_seed_comparison,
    write_sweep_report,
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


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def _summary(acc: float, hre: float, traffic: int, **extra: Any) -> dict[str, Any]:
    return {
        "final_accuracy": acc,
        "best_accuracy": acc,
        "final_higher_rank_energy": hre,
        "mean_higher_rank_energy": hre,
        "total_upload_bytes": traffic // 2,
        "total_download_bytes": traffic - traffic // 2,
        **extra,
    }


# --------------------------------------------------------------------------- metrics


def test_metric_names_values_and_defaults() -> None:
    s = _summary(0.5, 0.2, 3000, **{"final_accuracy@8": 0.4, "final_accuracy@2": 0.3})
    assert metric_value(s, "traffic") == 3000.0
    assert metric_value(s, "final_accuracy") == 0.5
    assert metric_value({"final_accuracy": None}, "final_accuracy") is None
    assert metric_problems(["final_accuracy", "traffic", "wall_seconds", "best_accuracy@16"]) == []
    (problem,) = metric_problems(["final_acc"])
    assert problem.startswith("unknown metric(s) 'final_acc'; available: final_accuracy, ")
    assert "mean_higher_rank_energy" in problem and "final_accuracy@<rank>" in problem
    assert metric_problems(["custom"], [{"custom": 1.0}]) == []  # any numeric summary key
    assert default_metrics([s])[-2:] == ["final_accuracy@2", "final_accuracy@8"]
    assert "final_accuracy@2" not in default_metrics([_summary(0.5, 0.2, 1)])


# --------------------------------------------------------------------------- the report


def test_seed_comparison_tables_against_hand_computed_values(tmp_path: Path) -> None:
    rows = [{"round": 1, "accuracy": 0.5, "higher_rank_energy": 0.2}]
    runs = {
        "flexlora": {0: (_summary(0.80, 0.10, 2048), rows), 1: (_summary(0.82, 0.30, 2048), rows)},
        "raflora": {0: (_summary(0.82, 0.40, 2048), rows), 1: (_summary(0.85, 0.40, 2048), rows)},
    }
    path = write_seed_comparison(
        tmp_path,
        runs,
        seeds=[0, 1],
        metrics=["final_accuracy", "final_higher_rank_energy", "traffic"],
        baseline="flexlora",
    )
    text = path.read_text()
    # flexlora: mean 81.0, std 1.414, half width 12.7062 · 1.414 / √2 = 12.7 → [68.3, 93.7]
    # final HRE: mean 0.200, std 0.141, half 1.271 → [−1.071, 1.471]; traffic 2 KiB, no spread
    assert (
        "| flexlora | 2/2 | 81.0 ± 1.4 [68.3, 93.7] | 0.200 ± 0.141 [−1.071, 1.471] | "
        "2.00 KiB ± 0 B [2.00 KiB, 2.00 KiB] |"
    ) in text
    # raflora − flexlora: +2.0, +3.0 pp → mean +2.5 ± 0.7, half 12.7062 · 0.707 / √2 = 6.35;
    # HRE +0.3, +0.1 → +0.200 ± 0.141 [−1.071, +1.471]; wins on final accuracy: 2 of 2
    assert (
        "| raflora | +2.5 ± 0.7 [−3.9, +8.9] | +0.200 ± 0.141 [−1.071, +1.471] | "
        "+0 B ± 0 B [+0 B, +0 B] | 2 / 0 / 0 |"
    ) in text
    assert "| raflora | Final acc. (pp) | +2.0 | +3.0 |" in text
    assert "| raflora | Final HRE | +0.300 | +0.100 |" in text
    for name in ("comparison_accuracy", "comparison_higher_rank_energy", "accuracy_vs_traffic"):
        assert f"![{name}]({name}.png)" in text
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_wins_follow_the_first_metrics_direction(tmp_path: Path) -> None:
    runs = {
        "flexlora": {s: (_summary(0.8, 0.1, 4000), []) for s in (0, 1, 2)},
        "flora": {s: (_summary(0.8, 0.1, t), []) for s, t in ((0, 5000), (1, 3000), (2, 4000))},
    }
    text = write_seed_comparison(
        tmp_path, runs, seeds=[0, 1, 2], metrics=["traffic"], baseline="flexlora"
    ).read_text()
    assert "equal / worse than flexlora on\nTraffic (lower is better)" in text
    assert "| flora | Traffic | +1000 B | −1000 B | +0 B |" in text
    # no metrics rows: no plot over rounds, only the summaries' accuracy against traffic
    assert "comparison_accuracy" not in text and "![accuracy_vs_traffic]" in text
    assert "| 1 / 1 / 1 |" in text


def test_sweep_report_cells_and_json(tmp_path: Path) -> None:
    cells = {
        "fl.rank_levels=[2,4]": {
            "raflora": {0: _summary(0.80, 0.1, 10), 1: _summary(0.82, 0.1, 10)},
            "flexlora": {0: _summary(0.70, 0.1, 10)},
        },
        "fl.rank_levels=[2,8]": {},  # every run failed
    }
    path = write_sweep_report(
        tmp_path,
        cells,
        axes=["fl.rank_levels"],
        methods=["flexlora", "raflora"],
        seeds=[0, 1],
        metrics=["final_accuracy"],
        failed=[("fl.rank_levels=[2,8] raflora seed 0", "boom")],
    )
    text = path.read_text()
    assert "| fl.rank_levels=[2,4] | 70.0 (1) | 81.0 ± 1.4 (2) |" in text
    assert "| fl.rank_levels=[2,8] | — | — |" in text
    assert "- fl.rank_levels=[2,8] raflora seed 0: boom" in text
    data = json.loads((tmp_path / "sweep.json").read_text())
    cell = data["settings"]["fl.rank_levels=[2,4]"]["raflora"]["final_accuracy"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(0.81)
    assert cell["ci_low"] == pytest.approx(0.682938, abs=1e-5)
    assert data["settings"]["fl.rank_levels=[2,8]"]["raflora"]["final_accuracy"] is None
    assert (tmp_path / "sweep_final_accuracy.png").stat().st_size > 0


# --------------------------------------------------------------------------- the command


def test_compare_over_seeds_end_to_end(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = ["compare", str(config_file), "--methods", "flexlora,raflora", "--seeds", "0,1"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[4/4] raflora seed 1: ran, final accuracy" in printed
    assert "# Method comparison over 2 seeds" in printed
    for method in ("flexlora", "raflora"):
        for seed in (0, 1):
            run = out / method / f"seed-{seed}"
            assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == seed
    # for a given seed both methods sampled the same clients
    a0 = read_metrics(out / "flexlora" / "seed-0" / "metrics.jsonl")
    b0 = read_metrics(out / "raflora" / "seed-0" / "metrics.jsonl")
    assert [r["clients"] for r in a0] == [r["clients"] for r in b0]
    # the paired cell is the difference of the two runs' summaries
    hre = {
        (m, s): json.loads((out / m / f"seed-{s}" / "summary.json").read_text())[
            "final_higher_rank_energy"
        ]
        for m in ("flexlora", "raflora")
        for s in (0, 1)
    }
    diffs = [hre["raflora", s] - hre["flexlora", s] for s in (0, 1)]
    cells = " | ".join(("+" if d >= 0 else "−") + f"{abs(d):.3f}" for d in diffs)
    assert f"| raflora | Final HRE | {cells} |" in (out / "comparison.md").read_text()
    # rerun: every run is already finished
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_compare_problems_are_reported_before_running(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    base = ["compare", str(config_file), "--out", str(out)]
    assert main([*base, "--methods", "raflora,hetlora", "--seeds", "0,1"]) == 2
    assert "--baseline flexlora is not among the methods (raflora, hetlora)" in (
        capsys.readouterr().err
    )
    assert main([*base, "--seeds", "0,1", "--baseline", "fedit", "--metrics", "acc"]) == 2
    err = capsys.readouterr().err
    assert "--baseline fedit is not among the methods" in err and "unknown metric(s) 'acc'" in err
    assert main([*base, "--seeds", "0,0"]) == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert main([*base, "--seeds", "0,1", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main([*base, "--baseline", "raflora"]) == 2  # one seed: nothing to pair
    assert "apply to several seeds" in capsys.readouterr().err
    assert not out.exists()


def test_one_seed_keeps_the_single_run_layout(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = ["compare", str(config_file), "--methods", "flexlora,raflora", "--out", str(out)]
    assert main([*args, "--seeds", "5", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["flexlora", "raflora"]
    assert yaml.safe_load((out / "raflora" / "config.yaml").read_text())["seed"] == 5
    text = (out / "comparison.md").read_text()
    assert text.startswith("# Method comparison\n\nOne row per aggregation method.")
    assert "| flexlora |" in text and "seed" not in text.split("## Plots")[0].lower()
