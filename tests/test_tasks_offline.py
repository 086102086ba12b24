"""The offline tasks ``synthetic`` and ``digits``: shapes, determinism, caching, PEFT wrapping."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from raflora.adapters import PEFT_PREFIX, wrap_model
from raflora.config import config_from_dict, with_changes
from raflora.tasks import Task, TaskError, available_tasks, build_task
from raflora.tasks.digits import DigitsTask
from raflora.tasks.synthetic import SyntheticTask

CPU = torch.device("cpu")
SMALL_SYNTHETIC = {"num_train": 3000, "num_eval": 500}


def make(name: str, options: dict[str, Any] | None = None, **task: Any) -> Task:
    return build_task(config_from_dict({"task": {"name": name, "options": options or {}, **task}}))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def train_briefly(model: nn.Module, task: Task, params: Any, *, batch_size: int) -> None:
    """Three seeded epochs of AdamW (lr 5e-3, no weight decay) on ``task``; ``model`` ends in
    eval mode."""
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        order = torch.randperm(task.num_train, generator=gen).tolist()
        for start in range(0, task.num_train, batch_size):
            loss = task.loss(model, task.train_batch(order[start : start + batch_size]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def wrapped_names(model: nn.Module, kind: type) -> set[str]:
    return {
        name.removeprefix(PEFT_PREFIX)
        for name, module in model.named_modules()
        if isinstance(module, kind)
    }


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("raflora-cache")


@pytest.fixture
def digits_task(digits_cache: Path, monkeypatch: pytest.MonkeyPatch) -> DigitsTask:
    monkeypatch.setenv("RAFLORA_CACHE", str(digits_cache))
    task = make("digits")
    assert isinstance(task, DigitsTask)
    return task


def test_tasks_are_registered() -> None:
    assert {"synthetic", "digits"} <= set(available_tasks())


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_batches_and_labels() -> None:
    task = make("synthetic", SMALL_SYNTHETIC)
    assert isinstance(task, SyntheticTask)
    assert task.num_train == 3000
    assert task.partition_labels is not None and task.partition_labels.shape == (3000,)
    counts = torch.bincount(torch.as_tensor(task.partition_labels), minlength=10)
    assert (counts > 3000 / 10 / 3).all(), counts  # every class present, none tiny
    batch = task.train_batch([0, 5, 7])
    assert batch["x"].shape == (3, 32) and batch["x"].dtype == torch.float32
    assert batch["labels"].shape == (3,) and batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"], torch.as_tensor(task.partition_labels[[0, 5, 7]]))
    eval_batches = list(task.eval_batches(128))
    assert [b["x"].shape[0] for b in eval_batches] == [128, 128, 128, 116]
    assert task.target_modules == ["layers.0", "layers.1"]
    assert task.modules_to_save is None
    assert task.describe()["num_classes"] == 10


def test_synthetic_is_deterministic_and_independent_of_run_seed() -> None:
    a = make("synthetic", SMALL_SYNTHETIC)
    b = build_task(
        config_from_dict({"seed": 7, "task": {"name": "synthetic", "options": SMALL_SYNTHETIC}})
    )
    assert_same_weights(a.model, b.model)
    idx = list(range(0, 3000, 7))
    for key in ("x", "labels"):
        assert torch.equal(a.train_batch(idx)[key], b.train_batch(idx)[key])
    for ba, bb in zip(a.eval_batches(100), b.eval_batches(100), strict=True):
        assert torch.equal(ba["x"], bb["x"]) and torch.equal(ba["labels"], bb["labels"])
    assert_same_weights(a.load_base_model(), a.model)
    other = make("synthetic", {**SMALL_SYNTHETIC, "model_seed": 1})
    assert not torch.equal(
        other.model.state_dict()["head.weight"], a.model.state_dict()["head.weight"]
    )


def test_synthetic_teacher_shift_has_the_requested_rank() -> None:
    task = make("synthetic", {**SMALL_SYNTHETIC, "shift_rank": 12})
    assert isinstance(task, SyntheticTask)
    for name, dw in task.teacher_shift.items():
        module = task.model.get_submodule(name)
        assert isinstance(module, nn.Linear) and dw.shape == module.weight.shape
        s = torch.linalg.svdvals(dw.double())
        assert int((s > 1e-4 * s[0]).sum()) == 12  # stored in float32: rank up to rounding
        assert float(s[11] / s[0]) > 0.5  # slowly decaying (flat-ish) spectrum


def test_synthetic_options_and_eval_cap() -> None:
    task = make(
        "synthetic", {**SMALL_SYNTHETIC, "input_dim": 8, "num_classes": 4}, num_eval_samples=50
    )
    assert task.train_batch([1])["x"].shape == (1, 8)
    assert sum(b["labels"].numel() for b in task.eval_batches(16)) == 50
    assert set(task.evaluate(task.model, 16, CPU)) >= {"accuracy", "eval_loss"}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_trian": 10}, r"unknown option\(s\) \['num_trian'\]; valid: num_train"),
        ({"hidden_dim": 0}, "hidden_dim: must be ≥ 1"),
        ({"shift_rank": 2.5}, "shift_rank: expected an integer"),
        ({"margin_quantile": 1.0}, "margin_quantile"),
    ],
)
def test_synthetic_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(TaskError, match=match):
        make("synthetic", options)


def test_synthetic_rejects_a_model_name() -> None:
    with pytest.raises(TaskError, match=r"task.model and task.dataset must be null"):
        make("synthetic", model="bert-base-uncased")


def test_synthetic_lora_training_raises_accuracy() -> None:
    task = make("synthetic", {"num_train": 6000, "num_eval": 1000})
    base = task.evaluate(task.model, 500, CPU)
    bank = wrap_model(
        task.model,
        target_modules=task.target_modules,
        max_rank=32,
        modules_to_save=task.modules_to_save,
    )
    assert wrapped_names(bank.model, LoraLayer) == {"layers.0", "layers.1"}
    assert not wrapped_names(bank.model, ModulesToSaveWrapper)
    params = bank.trainable_parameters()
    assert params and all(p.numel() <= 64 * 32 for p in params)  # LoRA factors only
    train_briefly(bank.model, task, params, batch_size=64)
    with torch.no_grad():
        after = task.evaluate(bank.model, 500, CPU)
    assert base["accuracy"] < 0.3
    assert after["accuracy"] > base["accuracy"] + 0.3, (base, after)
    assert after["eval_loss"] < base["eval_loss"]


# --------------------------------------------------------------------------------- digits


def test_digits_cache_is_built_once_and_reused(
    digits_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAFLORA_CACHE", str(digits_cache))
    first = make("digits")
    assert isinstance(first, DigitsTask)
    start = time.perf_counter()
    second = make("digits")
    elapsed = time.perf_counter() - start
    assert isinstance(second, DigitsTask) and not second.built_cache
    assert elapsed < 2.0, elapsed
    assert first.model_id == second.model_id
    assert Path(first.model_id).parent == digits_cache
    assert not [p for p in digits_cache.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert_same_weights(first.model, second.model)


def test_digits_batches_and_splits(digits_task: DigitsTask) -> None:
    task = digits_task
    assert task.num_train == 899
    assert task.describe()["num_eval"] == 359
    assert task.partition_labels is not None
    assert sorted(set(task.partition_labels.tolist())) == list(range(10))
    batch = task.train_batch([0, 1, 2, 3])
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    assert batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(batch["pixel_values"].min()) <= float(batch["pixel_values"].max()) <= 1.0
    assert batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"], torch.as_tensor(task.partition_labels[:4]))
    loss = task.loss(task.model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    metrics = task.evaluate(task.model, 64, CPU)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_loss"] > 0


def test_digits_load_base_model_equals_model(digits_task: DigitsTask) -> None:
    assert_same_weights(digits_task.load_base_model(), digits_task.model)


def test_digits_wraps_backbone_linears_and_trains_the_head(digits_task: DigitsTask) -> None:
    task = digits_task
    model = task.load_base_model()
    expected = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "classifier"
    }
    assert len(expected) == 12  # 2 layers × (q, k, v, o, fc1, fc2)
    bank = wrap_model(
        model, target_modules=task.target_modules, max_rank=8, modules_to_save=task.modules_to_save
    )
    assert isinstance(bank.model, PeftModel)
    assert wrapped_names(bank.model, LoraLayer) == expected
    assert wrapped_names(bank.model, ModulesToSaveWrapper) == {"classifier"}
    assert set(bank.get_dense(8)) == {"classifier.weight", "classifier.bias"}
    names = {n for n, p in bank.model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in names) and any("lora_A" in n for n in names)
    # A short LoRA + head training run learns all ten digits.
    train_briefly(bank.model, task, bank.trainable_parameters(), batch_size=32)
    with torch.no_grad():
        after = task.evaluate(bank.model, 128, CPU)
    assert after["accuracy"] > 0.6, after


def test_digits_pretraining_is_deterministic(tmp_path: Path) -> None:
    options = {"pretrain_epochs": 2}
    a = make("digits", {**options, "cache_dir": str(tmp_path / "a")})
    b = make("digits", {**options, "cache_dir": str(tmp_path / "b")})
    assert isinstance(a, DigitsTask) and a.built_cache
    assert isinstance(b, DigitsTask) and b.built_cache
    assert Path(a.model_id).name == Path(b.model_id).name  # same recipe, same cache key
    assert_same_weights(a.model, b.model)
    c = make("digits", {"pretrain_epochs": 3, "cache_dir": str(tmp_path / "a")})
    assert c.model_id != a.model_id


def test_digits_hidden_dim_sets_the_width_and_the_cache_key(
    digits_task: DigitsTask, tmp_path: Path
) -> None:
    # the default is the 64-wide ViT under the cache key it always had (the quickstart's model)
    assert digits_task.options.hidden_dim == 64
    assert digits_task.model.config.hidden_size == 64
    assert Path(digits_task.model_id).name == "digits-vit-v1-c49e97ca4215"
    wide = make("digits", {"hidden_dim": 96, "pretrain_epochs": 1, "cache_dir": str(tmp_path)})
    assert isinstance(wide, DigitsTask) and wide.built_cache
    q_proj = wide.model.get_submodule("vit.layers.0.attention.q_proj")
    fc1 = wide.model.get_submodule("vit.layers.0.mlp.fc1")
    assert isinstance(q_proj, nn.Linear) and isinstance(fc1, nn.Linear)
    assert (q_proj.in_features, q_proj.out_features) == (96, 96)
    assert (fc1.in_features, fc1.out_features) == (96, 192)
    assert wide.load_base_model().config.hidden_size == 96
    narrow = make("digits", {"pretrain_epochs": 1, "cache_dir": str(tmp_path)})
    assert narrow.model_id != wide.model_id  # the width is part of the cache key


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"hidden_dim": 66}, r"hidden_dim: must be a positive multiple of 4 .*got 66"),
        ({"hidden_dim": 0}, r"hidden_dim: must be a positive multiple of 4 .*got 0"),
        ({"hidden_dim": "wide"}, r"hidden_dim: expected"),
        ({"epochs": 3}, r"unknown option\(s\) \['epochs'\]; valid: pretrain_epochs"),
        ({"pretrain_classes": [0, 12]}, "pretrain_classes"),
        ({"pretrain_lr": -1}, "pretrain_lr"),
    ],
)
def test_digits_bad_options(options: dict[str, Any], match: str, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=match):
        make("digits", {**options, "cache_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())  # nothing pretrained for a bad config


def test_unknown_task_is_a_task_error() -> None:
    good = config_from_dict({"task": {"name": "synthetic"}})
    config = dataclasses.replace(good, task=dataclasses.replace(good.task, name="nope"))
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        build_task(config)


def _paper_figures() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_figures.py"
    spec = importlib.util.spec_from_file_location("paper_figures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [False, True])
def test_paper_figures_grid_is_valid(quick: bool, tmp_path: Path) -> None:
    # benchmarks/paper_figures.py is not run in CI: check that its grid plans valid runs, and
    # that every run's ranks fit the digits ViT width it asks for
    figures = _paper_figures()
    seeds = figures.SEEDS[:1] if quick else figures.SEEDS
    plan = figures.build_plan(tmp_path, quick=quick, seeds=seeds)
    settings = sum(len(s.grid_values(quick)) for s in figures.STUDIES)
    assert len(plan.specs) == settings * len(figures.METHODS) * len(seeds)
    assert settings == (10 if quick else 19)
    assert figures.rank_width_problems(plan.specs) == []
    widths = {
        spec.config.task.options.get("hidden_dim", 64): max(spec.config.fl.rank_levels)
        for spec in plan.specs
    }
    assert widths == {64: 64, 128: 128, 256: 256}
    assert not any(tmp_path.iterdir())  # planning writes nothing


def test_paper_figures_reports_ranks_wider_than_the_vit(tmp_path: Path) -> None:
    figures = _paper_figures()
    plan = figures.build_plan(tmp_path, quick=True, seeds=[0])
    spec = next(s for s in plan.specs if max(s.config.fl.rank_levels) == 256)
    spec = dataclasses.replace(  # the default 64-wide ViT
        spec, config=with_changes(spec.config, {"task.options": {}})
    )
    (problem,) = figures.rank_width_problems([spec])
    assert problem == (
        "preset=conf-8: rank 256 exceeds the ViT width 64 (set task.options.hidden_dim)"
    )
