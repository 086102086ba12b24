"""Tests of raflora.report: summaries, energy breakdown, plots, comparison table, metrics I/O."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import raflora.report as report_module
from raflora.report import (
    ENERGY_FILE,
    append_energy,
    append_metrics,
    energy_shares,
    format_bytes,
    partition_labels,
    progress_postfix,
    read_energy,
    read_metrics,
    summarize,
    truncate_jsonl,
    write_comparison,
    write_energy_heatmap,
    write_run_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(rnd: int, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "round": rnd,
        "lr": 4e-4,
        "train_loss": 1.0 / rnd,
        "higher_rank_energy": 0.1 * rnd,
        "energy_per_level": {
            "8": 1.0 - 0.1 * rnd,
            "16": 1.0 - 0.05 * rnd,
            "32": 1.0 - 0.02 * rnd,
            "64": 1.0,
        },
        "upload_bytes": 1000 * rnd,
        "download_bytes": 500,
        "clients": [1, 2, 3],
        "client_ranks": [8, 64, 16],
        "accepted": 3,
        "rejected": 0,
        "rejected_reasons": {},
        "time": {
            "train_seconds": 1.0,
            "aggregate_seconds": 0.5,
            "eval_seconds": 0.0,
            "round_seconds": 1.5,
        },
    }
    row.update(kw)
    return row


def _metrics() -> list[dict[str, Any]]:
    rows = [_row(r) for r in range(1, 6)]
    # evaluated on rounds 2, 4 and 5; best on round 4
    for rnd, acc, loss in ((2, 0.6, 0.9), (4, 0.8, 0.5), (5, 0.7, 0.6)):
        rows[rnd - 1]["accuracy"] = acc
        rows[rnd - 1]["eval_loss"] = loss
        rows[rnd - 1]["time"]["eval_seconds"] = 0.25
    rows[2]["rejected"] = 2
    rows[2]["accepted"] = 1
    rows[2]["rejected_reasons"] = {"7": "non-finite", "9": "bad shape"}
    return rows


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


# --------------------------------------------------------------------------- summarize


def test_summarize_by_hand() -> None:
    s = summarize(_metrics(), method="raflora", wall_seconds=10.0, extra={"task": "sst2"})
    assert s["method"] == "raflora"
    assert s["task"] == "sst2"
    assert s["rounds"] == 5
    assert s["evaluated_rounds"] == 3
    assert s["final_accuracy"] == pytest.approx(0.7)
    assert s["best_accuracy"] == pytest.approx(0.8)
    assert s["best_round"] == 4
    assert s["final_eval_loss"] == pytest.approx(0.6)
    assert s["final_train_loss"] == pytest.approx(0.2)
    assert s["final_higher_rank_energy"] == pytest.approx(0.5)
    assert s["mean_higher_rank_energy"] == pytest.approx(0.3)
    assert s["total_upload_bytes"] == 15000
    assert s["total_download_bytes"] == 2500
    assert s["clients_rejected"] == 2
    assert s["clients_accepted"] == 13
    assert s["wall_seconds"] == 10.0
    t = s["time"]
    assert t["train_seconds"] == pytest.approx(5.0)
    assert t["aggregate_seconds"] == pytest.approx(2.5)
    assert t["eval_seconds"] == pytest.approx(0.75)
    assert t["round_seconds"] == pytest.approx(7.5)
    assert t["other_seconds"] == pytest.approx(10.0 - 5.0 - 2.5 - 0.75)
    assert s["final_energy_shares"] == pytest.approx({"8": 0.5, "16": 0.25, "32": 0.15, "64": 0.1})
    json.dumps(s)  # JSON-ready


def test_summarize_other_seconds_clipped_and_missing_data() -> None:
    rows: list[dict[str, Any]] = [
        {"round": 1, "train_loss": None, "time": {"train_seconds": 3.0}},
        {"round": 2, "train_loss": 0.4, "time": {"train_seconds": 3.0}},
        {"round": 3, "train_loss": None},
    ]
    s = summarize(rows, method="fedit", wall_seconds=5.0)
    assert s["time"]["other_seconds"] == 0.0
    assert s["time"]["train_seconds"] == pytest.approx(6.0)
    assert s["final_accuracy"] is None
    assert s["best_accuracy"] is None
    assert s["best_round"] is None
    assert s["final_eval_loss"] is None
    assert s["final_train_loss"] == pytest.approx(0.4)  # last round that had one
    assert s["final_higher_rank_energy"] is None
    assert s["mean_higher_rank_energy"] is None
    assert s["final_energy_shares"] is None
    assert s["total_upload_bytes"] == 0
    assert s["clients_rejected"] == 0
    assert s["evaluated_rounds"] == 0


def test_summarize_empty_and_extra_conflict() -> None:
    s = summarize([], method="flora", wall_seconds=0.0)
    assert s["rounds"] == 0
    assert s["final_accuracy"] is None
    with pytest.raises(ValueError, match="rounds"):
        summarize(_metrics(), method="m", wall_seconds=1.0, extra={"rounds": 99})
    # a consistent duplicate is fine
    assert summarize(_metrics(), method="m", wall_seconds=1.0, extra={"method": "m"})["method"]


def test_summarize_best_round_tie_is_earliest() -> None:
    rows = [_row(1, accuracy=0.5), _row(2, accuracy=0.9), _row(3, accuracy=0.9)]
    s = summarize(rows, method="m", wall_seconds=1.0)
    assert (s["best_accuracy"], s["best_round"], s["final_accuracy"]) == (0.9, 2, 0.9)


# --------------------------------------------------------------------------- energy shares


def test_energy_shares_sum_to_one_and_match_rho_differences() -> None:
    rho = {"64": 1.0, "8": 0.59, "32": 0.93, "16": 0.78}  # unordered on purpose
    shares = energy_shares({"energy_per_level": rho})
    assert list(shares) == ["8", "16", "32", "64"]
    assert shares["8"] == pytest.approx(0.59)
    assert shares["16"] == pytest.approx(0.78 - 0.59)
    assert shares["32"] == pytest.approx(0.93 - 0.78)
    assert shares["64"] == pytest.approx(1.0 - 0.93)
    assert sum(shares.values()) == pytest.approx(1.0)
    for row in _metrics():
        assert sum(energy_shares(row).values()) == pytest.approx(1.0)


def test_energy_shares_edge_cases() -> None:
    assert energy_shares({}) == {}
    assert energy_shares({"energy_per_level": None}) == {}
    # the diagnostics' key is accepted too
    assert energy_shares({"energy_at_rank": {"4": 1.0}}) == {"4": 1.0}
    # rounding noise never yields negative shares
    assert energy_shares({"energy_per_level": {"8": 0.5, "16": 0.5 - 1e-12}})["16"] == 0.0
    with pytest.raises(ValueError, match="not a rank"):
        energy_shares({"energy_per_level": {"r8": 0.5}})


def test_partition_labels() -> None:
    assert partition_labels([8, 16, 32, 64]) == [
        "ranks 1–8",
        "ranks 9–16",
        "ranks 17–32",
        "ranks 33–64",
    ]
    assert partition_labels([1, 2, 4]) == ["rank 1", "rank 2", "ranks 3–4"]


# --------------------------------------------------------------------------- plots


def test_write_run_plots_all(tmp_path: Path) -> None:
    out = tmp_path / "run"
    paths = write_run_plots(out, _metrics(), title="raflora / sst2")
    names = {p.name for p in paths}
    assert names == {"accuracy.png", "loss.png", "higher_rank_energy.png", "energy_breakdown.png"}
    for p in paths:
        assert p.parent == out
        assert _is_png(p)


def test_write_run_plots_skips_absent_data(tmp_path: Path) -> None:
    rows = [
        {"round": r, "train_loss": 1.0 / r, "upload_bytes": 10, "download_bytes": 10}
        for r in range(1, 4)
    ]
    paths = write_run_plots(tmp_path, rows)
    assert [p.name for p in paths] == ["loss.png"]
    assert _is_png(paths[0])
    assert not (tmp_path / "accuracy.png").exists()
    assert not (tmp_path / "energy_breakdown.png").exists()
    assert write_run_plots(tmp_path / "empty", []) == []


def test_write_run_plots_single_round(tmp_path: Path) -> None:
    paths = write_run_plots(tmp_path, [_row(1, accuracy=0.5, eval_loss=0.7)])
    assert len(paths) == 4
    assert all(_is_png(p) for p in paths)


# --------------------------------------------------------------------------- comparison


def test_write_comparison(tmp_path: Path) -> None:
    a = _metrics()
    b = [
        _row(r, upload_bytes=3 * 2**20, download_bytes=2**30, higher_rank_energy=0.0)
        for r in (1, 2)
    ]
    b[1]["accuracy"] = 0.55
    runs = {
        "raflora": (summarize(a, method="raflora", wall_seconds=12.34), a),
        "het|lora": (summarize(b, method="het|lora", wall_seconds=3.0), b),
    }
    md = write_comparison(tmp_path / "cmp", runs)
    assert md == tmp_path / "cmp" / "comparison.md"
    text = md.read_text(encoding="utf-8")
    assert "1 − ρ_{r1}" in text and "rank collapse" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header + one row per method
    rows = {
        cells[0]: cells
        for cells in ([c.strip() for c in ln.strip("|").split(" | ")] for ln in table[1:])
    }
    assert set(rows) == {"raflora", "het\\|lora"}
    r = rows["raflora"]
    assert r[1:5] == ["70.0%", "80.0% (4)", "0.500", "0.300"]
    assert r[5] == format_bytes(15000) == "14.65 KiB"
    assert r[6] == "2.44 KiB"
    assert r[7] == "1.00×"
    assert r[8] == "12.3"
    h = rows["het\\|lora"]
    assert h[1:5] == ["55.0%", "55.0% (2)", "0.000", "0.000"]
    assert h[5] == "6.00 MiB"
    assert h[6] == "2.00 GiB"
    ratio = (6 * 2**20 + 2 * 2**30) / (15000 + 2500)
    assert h[7] == f"{ratio:.2f}×"
    for name in (
        "comparison_accuracy.png",
        "comparison_higher_rank_energy.png",
        "comparison_loss.png",
    ):
        assert _is_png(tmp_path / "cmp" / name)
        assert f"({name})" in text


def test_write_comparison_adds_the_per_level_accuracy_when_recorded(tmp_path: Path) -> None:
    rows = [_row(1, accuracy=0.7, eval_loss=0.5)]
    rows[0].update({"accuracy@4": 0.6, "accuracy@8": 0.7})
    plain = [_row(1, accuracy=0.5, eval_loss=0.5)]
    runs = {
        "raflora": (summarize(rows, method="raflora", wall_seconds=1.0), rows),
        "flexlora": (summarize(plain, method="flexlora", wall_seconds=1.0), plain),
    }
    text = write_comparison(tmp_path, runs).read_text(encoding="utf-8")
    assert "| Method | r = 4 | r = 8 |" in text
    assert "| raflora | 60.0% | 70.0% |" in text
    assert "| flexlora | — | — |" in text
    off = {"flexlora": runs["flexlora"]}
    assert "per rank level" not in write_comparison(tmp_path / "off", off).read_text()


def test_write_comparison_missing_values(tmp_path: Path) -> None:
    rows = [{"round": 1, "train_loss": 0.5}]
    runs = {"fedit": (summarize(rows, method="fedit", wall_seconds=1.0), rows)}
    text = write_comparison(tmp_path, runs).read_text(encoding="utf-8")
    row = next(ln for ln in text.splitlines() if ln.startswith("| fedit"))
    assert row.count("—") == 5  # final/best acc, 2 × HRE, traffic ratio
    assert not (tmp_path / "comparison_accuracy.png").exists()
    assert _is_png(tmp_path / "comparison_loss.png")


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (5 * 2**20, "5.00 MiB"),
        (int(2.5 * 2**30), "2.50 GiB"),
        (3 * 2**40, "3.00 TiB"),
        (2**50, "1024.00 TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_bytes_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_bytes(-1)


def test_progress_postfix() -> None:
    row = _metrics()[3]
    assert progress_postfix(row) == {"loss": "0.2500", "acc": "80.0%", "hre": "0.400"}
    assert progress_postfix(_metrics()[2]) == {"loss": "0.3333", "hre": "0.300", "rej": "2"}
    assert progress_postfix({"round": 1, "train_loss": None}) == {}


# --------------------------------------------------------------------------- metrics I/O


def test_append_and_read_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.jsonl"
    rows = _metrics()
    for row in rows:
        append_metrics(path, row)
    assert read_metrics(path) == rows
    assert path.read_text(encoding="utf-8").count("\n") == len(rows)


def test_append_converts_numpy_and_keeps_nan(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"round": np.int64(1), "train_loss": np.float32(0.5), "v": np.arange(2)})
    append_metrics(path, {"round": 2, "train_loss": float("nan")})
    got = read_metrics(path)
    assert got[0] == {"round": 1, "train_loss": 0.5, "v": [0, 1]}
    assert math.isnan(got[1]["train_loss"])


def test_read_metrics_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps(_row(1)), json.dumps(_row(2))]
    path.write_text("\n".join(good) + "\n" + json.dumps(_row(3))[:40], encoding="utf-8")
    assert [r["round"] for r in read_metrics(path)] == [1, 2]
    # trailing blank lines after the partial line do not make it a middle line
    path.write_text("\n".join(good) + '\n{"round": 3,\n\n', encoding="utf-8")
    assert [r["round"] for r in read_metrics(path)] == [1, 2]
    # appending after a partial line drops it, so the file stays readable
    path.write_text("\n".join(good) + '\n{"round": 3, "tr', encoding="utf-8")
    append_metrics(path, _row(3))
    assert [r["round"] for r in read_metrics(path)] == [1, 2, 3]
    # a complete last row without its newline is kept
    path.write_text("\n".join(good), encoding="utf-8")
    append_metrics(path, _row(3))
    assert [r["round"] for r in read_metrics(path)] == [1, 2, 3]


def test_read_metrics_raises_on_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(_row(1)), '{"round": 2, oops', json.dumps(_row(3))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
        read_metrics(path)
    path.write_text(
        "\n".join([json.dumps(_row(1)), "[1, 2]", json.dumps(_row(3))]), encoding="utf-8"
    )
    with pytest.raises(ValueError, match=":2: expected a JSON object"):
        read_metrics(path)


def test_read_metrics_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("", encoding="utf-8")
    assert read_metrics(path) == []


# --------------------------------------------------------------------------- energy.jsonl


MODULES = ("vit.layers.0.attn.q", "vit.layers.0.mlp.fc1", "vit.layers.1.attn.q")


def _energy_row(rnd: int) -> dict[str, Any]:
    """Module 0 collapses over rounds, module 1 keeps its energy, module 2 is never updated."""
    hre = [0.5 / rnd, 0.4, None]
    return {
        "round": rnd,
        "modules": {
            name: {
                "higher_rank_energy": h,
                "energy_per_level": None if h is None else {"8": 1.0 - h, "16": 1.0},
            }
            for name, h in zip(MODULES, hre, strict=True)
        },
    }


def test_append_and_read_energy_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "run" / ENERGY_FILE
    rows = [_energy_row(r) for r in range(1, 4)]
    for row in rows:
        append_energy(path, row)
    assert read_energy(path) == rows
    assert "NaN" not in path.read_text(encoding="utf-8")


def test_append_energy_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / ENERGY_FILE
    append_energy(path, _energy_row(1))
    bad = _energy_row(2)
    bad["modules"][MODULES[0]]["higher_rank_energy"] = float("nan")
    with pytest.raises(ValueError, match=r"energy\.jsonl: energy row of round 2"):
        append_energy(path, bad)
    assert read_energy(path) == [_energy_row(1)]  # nothing written


def test_append_energy_repairs_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / ENERGY_FILE
    whole = json.dumps(_energy_row(1)) + "\n"
    path.write_text(whole + json.dumps(_energy_row(2))[:50], encoding="utf-8")  # killed mid-write
    assert [r["round"] for r in read_energy(path)] == [1]
    append_energy(path, _energy_row(2))
    assert read_energy(path) == [_energy_row(1), _energy_row(2)]


def test_read_energy_rejects_rows_without_modules(tmp_path: Path) -> None:
    path = tmp_path / ENERGY_FILE
    append_energy(path, _energy_row(1))
    append_energy(path, {"round": 2, "higher_rank_energy": 0.3})  # a metrics row by mistake
    with pytest.raises(ValueError, match=r"row 2 \(round 2\) has no modules"):
        read_energy(path)


def test_truncate_jsonl_keeps_checkpointed_rounds(tmp_path: Path) -> None:
    """A resume after a kill: rows beyond the checkpoint's round and a partial line go."""
    path = tmp_path / ENERGY_FILE
    for rnd in range(1, 5):
        append_energy(path, _energy_row(rnd))
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(_energy_row(5))[:30])
    assert truncate_jsonl(path, 2) == 2
    assert read_energy(path) == [_energy_row(1), _energy_row(2)]
    append_energy(path, _energy_row(3))  # the resumed run goes on
    assert [r["round"] for r in read_energy(path)] == [1, 2, 3]
    assert truncate_jsonl(path, 10) == 3  # nothing beyond: unchanged
    assert [r["round"] for r in read_energy(path)] == [1, 2, 3]
    assert truncate_jsonl(path, 0) == 0  # a new run over an old file
    assert path.read_text(encoding="utf-8") == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [ENERGY_FILE]  # no temporary left


def test_truncate_jsonl_missing_file_and_rows_without_round(tmp_path: Path) -> None:
    path = tmp_path / "new" / ENERGY_FILE
    assert truncate_jsonl(path, 3) == 0
    assert path.read_text(encoding="utf-8") == ""
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n', encoding="utf-8")  # position = round
    assert truncate_jsonl(path, 2) == 2
    assert read_metrics(path) == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError, match="rounds must be"):
        truncate_jsonl(path, -1)


def test_energy_grid_orders_modules_and_marks_missing() -> None:
    rows = [_energy_row(1), _energy_row(2), _energy_row(4)]  # round 3 has no row
    rows[1]["modules"]["vit.layers.10.attn.q"] = {"higher_rank_energy": 0.9}
    modules, rounds, grid = report_module._energy_grid(rows)
    assert modules == [*MODULES, "vit.layers.10.attn.q"]  # layer 10 after layer 1
    assert rounds == [1, 2, 3, 4]
    assert grid[0][:2] == [0.5, 0.25] and grid[0][3] == 0.125
    assert grid[1][:2] == [0.4, 0.4]
    assert all(math.isnan(v) for v in grid[2])  # never updated
    assert all(math.isnan(line[2]) for line in grid)  # missing round
    assert math.isnan(grid[3][0]) and grid[3][1] == 0.9  # module only in round 2
    assert report_module._energy_grid([]) == ([], [], [])
    assert report_module._energy_grid([{"round": 1, "modules": {}}]) == ([], [], [])


def test_common_prefix() -> None:
    assert report_module._common_prefix(list(MODULES)) == "vit.layers."
    assert report_module._common_prefix(["a.b", "a.b.c"]) == "a."
    assert report_module._common_prefix(["a.b", "c.d"]) == ""
    assert report_module._common_prefix(["a.b.c"]) == ""  # one module keeps its full name


@pytest.mark.parametrize("count", [3, 200])
def test_write_energy_heatmap(tmp_path: Path, count: int) -> None:
    names = [f"model.layers.{i}.proj" for i in range(count)]
    rows = [
        {
            "round": rnd,
            "modules": {
                name: {"higher_rank_energy": (i % 7) / 7 / rnd if i % 11 else None}
                for i, name in enumerate(names)
            },
        }
        for rnd in range(1, 6)
    ]
    path = write_energy_heatmap(tmp_path / "run", rows, title="hetlora · digits")
    assert path == tmp_path / "run" / "energy_heatmap.png"
    assert _is_png(path)
    assert write_energy_heatmap(tmp_path / "none", []) is None
    assert not (tmp_path / "none" / "energy_heatmap.png").exists()


def test_write_run_plots_draws_energy_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for rnd in range(1, 4):
        append_energy(tmp_path / ENERGY_FILE, _energy_row(rnd))
    losses = [{"round": rnd, "train_loss": 1.0 / rnd} for rnd in range(1, 4)]
    paths = write_run_plots(tmp_path, losses)
    assert [p.name for p in paths] == ["loss.png", "energy_heatmap.png"]
    assert _is_png(paths[-1])
    # a damaged file costs the heat map only, with a warning
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ENERGY_FILE).write_text('{"round": 1, oops\n{"round": 2, "modules": {}}\n')
    assert [p.name for p in write_run_plots(broken, losses)] == ["loss.png"]
    assert "no energy heat map" in caplog.text
