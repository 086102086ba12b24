"""The engine on real Hugging Face models: tiny random ViT and RoBERTa saved to temp dirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from hf_fixtures import make_image_dataset, make_text_csv, make_tiny_roberta, make_tiny_vit
from raflora.config import config_from_dict
from raflora.engine import run_local
from raflora.tasks import build_task

pytestmark = pytest.mark.usefixtures("hf_offline")


def _config(task: dict[str, Any], method: str) -> Any:
    return config_from_dict(
        {
            "method": method,
            "seed": 0,
            "task": task,
            "fl": {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "rank_levels": [2, 4]},
            "data": {"partition": "dir-a1.0", "min_samples": 1},
            "train": {"lr": 1e-3, "batch_size": 8},
            "eval": {"every": 1, "batch_size": 16},
            "output": {"plots": False},
        }
    )


@pytest.fixture(scope="module")
def vit_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vit")
    model = make_tiny_vit(root / "model", num_labels=3)
    data = make_image_dataset(root / "data", 48, 3)
    return {"name": "image-classification", "model": str(model), "dataset": str(data)}


@pytest.fixture(scope="module")
def roberta_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("roberta")
    model = make_tiny_roberta(root / "model", num_labels=3)
    data = make_text_csv(root / "data.csv", 60, 3)
    return {"name": "text-classification", "model": str(model), "dataset": str(data)}


@pytest.mark.parametrize("method", ["raflora", "flexlora", "hetlora", "flora"])
@pytest.mark.parametrize("which", ["vit", "roberta"])
def test_two_rounds_and_the_peft_adapter_reproduces_the_evaluation(
    which: str, method: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    task_cfg = request.getfixturevalue(f"{which}_task")
    cfg = _config(task_cfg, method)
    result = run_local(cfg, tmp_path, progress=False)
    assert [r["round"] for r in result.metrics] == [1, 2]
    assert all(r["accepted"] == 2 for r in result.metrics)
    assert result.summary["final_higher_rank_energy"] is not None
    # The head is trained fully and travels with the factors.
    assert result.metrics[0]["upload_bytes"] > 0
    task = build_task(cfg)
    model = PeftModel.from_pretrained(task.load_base_model(), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, 16, torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(result.summary["final_accuracy"], abs=1e-9)
    assert metrics["eval_loss"] == pytest.approx(result.summary["final_eval_loss"], rel=1e-4)
