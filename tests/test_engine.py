"""The local engine end to end on the synthetic task: every method, outputs, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from conftest import SYNTHETIC, config_with
from raflora.config import RunConfig
from raflora.engine import build_federation, load_checkpoint, run_local, seeds
from raflora.engine.client_round import train_client
from raflora.methods import available_methods
from raflora.report import read_metrics
from raflora.tasks import build_task


def synthetic_config(**over: Any) -> RunConfig:
    return config_with(SYNTHETIC, **over)


def without_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def method_config(method: str, **over: Any) -> RunConfig:
    if method == "fedit":
        over.setdefault("fl.rank_levels", [4])
    return synthetic_config(method=method, **over)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_runs_two_rounds_and_writes_its_run_directory(
    method: str, tmp_path: Path
) -> None:
    cfg = method_config(method, **{"output.plots": True})
    result = run_local(cfg, tmp_path, progress=False)
    for name in (
        "config.yaml",
        "partition.json",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoint/state.pt",
        "accuracy.png",
        "loss.png",
        "higher_rank_energy.png",
    ):
        assert (tmp_path / name).is_file(), name
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("train_loss", "higher_rank_energy", "upload_bytes", "download_bytes"):
            assert key in row
        assert row["accepted"] == 3 and row["rejected"] == 0
        assert 0.0 <= row["accuracy"] <= 1.0
        assert set(row["time"]) >= {"train_seconds", "aggregate_seconds", "eval_seconds"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "final_accuracy",
        "best_accuracy",
        "final_higher_rank_energy",
        "total_upload_bytes",
        "total_download_bytes",
        "wall_seconds",
    ):
        assert summary[key] is not None, key
    assert summary == result.summary
    assert summary["total_upload_bytes"] == sum(r["upload_bytes"] for r in rows)


def test_training_improves_accuracy_over_the_untrained_base(tmp_path: Path) -> None:
    cfg = synthetic_config(
        **{"fl.rounds": 4, "eval.every": 4, "train.local_epochs": 5, "train.lr": 1e-2}
    )
    fed = build_federation(cfg)
    base = fed.task.evaluate(fed.task.model, 256, torch.device("cpu"))["accuracy"]
    result = run_local(cfg, tmp_path, progress=False, fed=fed)
    assert result.summary["final_accuracy"] > base + 0.1


def test_same_seed_same_numbers_and_methods_share_sampling(tmp_path: Path) -> None:
    a = run_local(synthetic_config(), tmp_path / "a", progress=False)
    b = run_local(synthetic_config(), tmp_path / "b", progress=False)
    assert without_time(a.metrics) == without_time(b.metrics)
    flex = run_local(synthetic_config(method="flexlora"), tmp_path / "c", progress=False)
    assert [r["clients"] for r in flex.metrics] == [r["clients"] for r in a.metrics]
    assert [r["client_ranks"] for r in flex.metrics] == [r["client_ranks"] for r in a.metrics]
    assert json.loads((tmp_path / "a" / "partition.json").read_text()) == json.loads(
        (tmp_path / "c" / "partition.json").read_text()
    )
    other = run_local(synthetic_config(seed=4), tmp_path / "d", progress=False)
    assert [r["clients"] for r in other.metrics] != [r["clients"] for r in a.metrics]


def test_partition_summary_has_client_ranks_and_requested_classes(tmp_path: Path) -> None:
    cfg = synthetic_config(**{"data.partition": "patho-c2a1.0"})
    run_local(cfg, tmp_path, progress=False)
    summary = json.loads((tmp_path / "partition.json").read_text())
    assert summary["client_ranks"] == seeds.client_ranks(3, 6, [2, 4, 8], None)
    assert all(c["num_classes"] == 2 for c in summary["clients"])


def test_traffic_follows_spec_section_8(tmp_path: Path) -> None:
    flex = run_local(synthetic_config(method="flexlora"), tmp_path / "f", progress=False)
    flora = run_local(synthetic_config(method="flora"), tmp_path / "s", progress=False)
    fed = build_federation(synthetic_config())
    shapes = fed.bank.module_shapes()
    for row in flex.metrics:
        per_rank = [sum((d + n) * r * 4 for d, n in shapes.values()) for r in row["client_ranks"]]
        assert row["upload_bytes"] == sum(per_rank) == row["download_bytes"]
    # FLoRA: round 1 downloads nothing (fresh init), round 2 the whole stack of round 1.
    first, second = flora.metrics
    assert first["download_bytes"] == 0
    stack = sum((d + n) * sum(first["client_ranks"]) * 4 for d, n in shapes.values())
    assert second["download_bytes"] == stack * len(second["clients"])


def test_exported_adapter_loads_with_peft_and_reproduces_the_final_accuracy(
    tmp_path: Path,
) -> None:
    for method in available_methods():  # every registered method, FLoRA's and FedEx's merges too
        cfg = method_config(method)
        result = run_local(cfg, tmp_path / method, progress=False)
        task = build_task(cfg)
        model = PeftModel.from_pretrained(task.load_base_model(), tmp_path / method / "adapter")
        model.eval()
        metrics = task.evaluate(model, 64, torch.device("cpu"))
        assert metrics["accuracy"] == pytest.approx(result.summary["final_accuracy"], abs=1e-9)
        assert metrics["eval_loss"] == pytest.approx(result.summary["final_eval_loss"], rel=1e-4)


class StopRunError(Exception):
    pass


def assert_same_tree(a: Any, b: Any) -> None:
    """Nested dicts/lists/tuples equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("method", available_methods())
def test_killed_and_resumed_run_equals_an_uninterrupted_run(method: str, tmp_path: Path) -> None:
    over: dict[str, Any] = {"fl.rounds": 4, "train.lr_schedule": "linear", "lora.dropout": 0.1}
    if method == "hetlora":
        over["method_options"] = {"self_pruning": True}
    full = run_local(method_config(method, **over), tmp_path / "full", progress=False)

    def stop_after_two(row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise StopRunError

    cut = tmp_path / "cut"
    with pytest.raises(StopRunError):
        run_local(method_config(method, **over), cut, progress=False, on_round=stop_after_two)
    assert load_checkpoint(cut).round == 2
    assert not (cut / "summary.json").exists()
    resumed = run_local(method_config(method, **over), cut, resume=True, progress=False)
    assert without_time(resumed.metrics) == without_time(full.metrics)
    assert without_time(read_metrics(cut / "metrics.jsonl")) == without_time(full.metrics)
    ca, cb = load_checkpoint(tmp_path / "full"), load_checkpoint(cut)
    a, b = ca.state, cb.state
    for name, (B, A) in a.factors.items():
        assert torch.equal(B, b.factors[name][0]) and torch.equal(A, b.factors[name][1])
    assert ca.base_weights.keys() == cb.base_weights.keys()  # FLoRA's, FedEx-LoRA's merges
    assert all(torch.equal(w, cb.base_weights[k]) for k, w in ca.base_weights.items())
    assert_same_tree(a.extras, b.extras)  # the method's own state (ILoRA's c …)
    from safetensors.torch import load_file

    fa = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    fb = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert fa.keys() == fb.keys()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_resume_repairs_a_metrics_file_with_a_partial_last_line(tmp_path: Path) -> None:
    cfg = synthetic_config(**{"fl.rounds": 3})

    def stop(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            raise StopRunError

    with pytest.raises(StopRunError):
        run_local(cfg, tmp_path, progress=False, on_round=stop)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 2, "train_lo')  # killed while writing
    result = run_local(cfg, tmp_path, resume=True, progress=False)
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert len(result.metrics) == 3


def test_a_nan_update_is_rejected_and_the_round_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import raflora.engine.server_round as server_round

    cfg = synthetic_config()
    bad = seeds.sample_clients(3, 1, 6, 3)[0]

    def poisoned(fed: Any, client_id: int, *args: Any, **kwargs: Any) -> Any:
        result = train_client(fed, client_id, *args, **kwargs)
        if client_id == bad:
            for B, _ in result.update.factors.values():
                B.fill_(float("nan"))
        return result

    monkeypatch.setattr(server_round, "train_client", poisoned)
    result = run_local(cfg, tmp_path, progress=False)
    first = result.metrics[0]
    assert first["accepted"] == 2 and first["rejected"] == 1
    assert "non-finite" in first["rejected_reasons"][str(bad)]
    state = load_checkpoint(tmp_path).state
    assert all(
        torch.isfinite(B).all() and torch.isfinite(A).all() for B, A in state.factors.values()
    )


def test_learning_rate_decays_linearly_over_rounds(tmp_path: Path) -> None:
    result = run_local(synthetic_config(**{"fl.rounds": 4}), tmp_path, progress=False)
    assert [r["lr"] for r in result.metrics] == pytest.approx([5e-3, 3.75e-3, 2.5e-3, 1.25e-3])


def test_a_new_run_refuses_a_directory_holding_a_run_unless_overwriting(tmp_path: Path) -> None:
    from raflora.engine import EngineError

    run_local(synthetic_config(), tmp_path, progress=False)
    with pytest.raises(EngineError, match="already holds a run"):
        run_local(synthetic_config(method="flexlora"), tmp_path, progress=False)
    result = run_local(
        synthetic_config(method="flexlora"), tmp_path, progress=False, overwrite=True
    )
    assert result.summary["method"] == "flexlora"
    assert load_checkpoint(tmp_path).meta["model_id"]
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_unknown_modules_to_save_is_an_error() -> None:
    from raflora.engine import EngineError

    with pytest.raises(EngineError, match="modules_to_save: no module named 'nope'"):
        build_federation(synthetic_config(**{"lora.modules_to_save": ["nope"]}))
