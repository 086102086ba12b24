"""One metrics schema for both engines: every row carries ``report.ROW_KEYS``.

The Flower side (the same keys, in the same order, as the local engine's rows of the same run) is
checked in ``tests/test_flower.py``; here the local engine's rows, the file they are written to,
and the readers of a ``null`` ``transport_bytes``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import SYNTHETIC, config_with
from raflora.engine import run_local
from raflora.report import ROW_KEYS, metrics_row, read_metrics, summarize, write_comparison
from raflora.report.metrics import EVALUATION_KEYS, METHOD_KEYS
from raflora.report.tensorboard import round_scalars

ROW = {k: 0 for k in ROW_KEYS if k != "transport_bytes"}


def _is_documented(key: str) -> bool:
    """A key beyond ``ROW_KEYS``: an evaluation metric (``accuracy@8`` …) or a method's own."""
    per_level = re.fullmatch(r"(.+)@\d+", key)
    return key in EVALUATION_KEYS or key in METHOD_KEYS or per_level is not None


def test_local_rows_carry_every_key_and_a_null_transport(tmp_path: Path) -> None:
    """FedEx-LoRA (a method key), evaluated on round 2 only, per level: the row keys."""
    over = {"method": "fedex", "eval.every": 2, "eval.per_level": True}
    result = run_local(config_with(SYNTHETIC, **over), tmp_path, progress=False)
    written = read_metrics(tmp_path / "metrics.jsonl")
    assert [list(r) for r in written] == [list(r) for r in result.metrics]
    for row in [*result.metrics, *written]:
        assert set(ROW_KEYS) <= row.keys()
        assert row["transport_bytes"] is None and list(row)[-1] == "transport_bytes"
        assert all(_is_documented(k) for k in row.keys() - ROW_KEYS), row.keys() - ROW_KEYS
        assert "residual_higher_rank_energy" in row
    assert "accuracy" not in written[0] and {"accuracy", "accuracy@2"} <= written[1].keys()
    assert '"transport_bytes": null}' in (tmp_path / "metrics.jsonl").read_text()

    # the readers of a row take the null: summary, TensorBoard scalars, the comparison
    summary = summarize(written, method="fedex", wall_seconds=1.0)
    assert summary["total_upload_bytes"] == sum(r["upload_bytes"] for r in written)
    assert "traffic/transport_bytes" not in round_scalars(written[1])
    assert "traffic/upload_bytes" in round_scalars(written[1])
    report = write_comparison(tmp_path / "compare", {"fedex": (summary, written)})
    assert "fedex" in report.read_text()


def test_metrics_row_fills_transport_last_and_names_a_missing_key() -> None:
    row = metrics_row({**ROW, "accuracy": 0.5})
    assert list(row) == [*ROW, "accuracy", "transport_bytes"] and row["transport_bytes"] is None
    assert metrics_row(ROW, transport_bytes=12)["transport_bytes"] == 12
    # a row that already holds it keeps its value and place
    assert list(metrics_row({"transport_bytes": 3, **ROW})) == ["transport_bytes", *ROW]
    with pytest.raises(KeyError, match="lacks upload_bytes, time"):
        metrics_row({k: v for k, v in ROW.items() if k not in ("upload_bytes", "time")})


def test_every_row_key_has_a_meaning() -> None:
    for keys in (ROW_KEYS, EVALUATION_KEYS, METHOD_KEYS):
        assert all(isinstance(v, str) and len(v) > 10 for v in keys.values())
    assert list(ROW_KEYS)[-1] == "transport_bytes"  # appended: the older keys keep their place
    assert "null with the local engine" in ROW_KEYS["transport_bytes"]
