"""The Hugging Face image and text classification tasks, fully offline on tiny random models."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import raflora.tasks.image
import raflora.tasks.text
from hf_fixtures import (
    make_image_dataset,
    make_text_csv,
    make_text_jsonl,
    make_text_parquet,
    make_tiny_roberta,
    make_tiny_vit,
)
from raflora.adapters import get_dense, module_shapes, wrap_model
from raflora.config import RunConfig, TaskConfig
from raflora.tasks.base import Task, TaskError, build_task

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    text_dir = root / "text_dir"
    text_dir.mkdir()
    make_text_csv(text_dir / "train.csv", n=15, seed=1)
    make_text_csv(text_dir / "test.csv", n=6, seed=2)
    return {
        "vit": make_tiny_vit(root / "vit"),
        "images": make_image_dataset(root / "images", n=12, num_classes=3),
        "imagefolder": make_image_dataset(
            root / "imagefolder", n=9, num_classes=3, layout="imagefolder"
        ),
        "roberta": make_tiny_roberta(root / "roberta"),
        "csv": make_text_csv(root / "t.csv", n=20, num_classes=3, string_labels=True),
        "jsonl": make_text_jsonl(root / "t.jsonl", n=20, num_classes=4),
        "parquet": make_text_parquet(root / "t.parquet", n=20, num_classes=3, string_labels=True),
        "text_dir": text_dir,
    }


def config(
    name: str, model: Path | str, dataset: Path | str, seed: int = 0, **task: object
) -> RunConfig:
    task_config = TaskConfig(name=name, model=str(model), dataset=str(dataset), **task)  # type: ignore[arg-type]
    return RunConfig(seed=seed, task=task_config)


def image_task(files: dict[str, Path], seed: int = 0, **task: object) -> Task:
    return build_task(config("image-classification", files["vit"], files["images"], seed, **task))


def text_task(files: dict[str, Path], data: str = "csv", seed: int = 0, **task: object) -> Task:
    task.setdefault("max_length", 16)
    return build_task(config("text-classification", files["roberta"], files[data], seed, **task))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def adapted(task: Task) -> tuple[list[str], dict[str, torch.Tensor]]:
    bank = wrap_model(
        task.model,
        target_modules=task.target_modules,
        max_rank=4,
        modules_to_save=task.modules_to_save,
        task_type=task.task_type,
    )
    return sorted(module_shapes(bank.model, "r4")), get_dense(bank.model, "r4")


def test_registered() -> None:
    assert raflora.tasks.image.ImageClassificationTask.name == "image-classification"
    assert raflora.tasks.text.TextClassificationTask.name == "text-classification"


# ---------------------------------------------------------------------------------------------
# Image classification
# ---------------------------------------------------------------------------------------------


def test_image_task_loads_batches_and_evaluates(files: dict[str, Path]) -> None:
    task = image_task(files)
    assert task.model_id == str(files["vit"])
    assert task.num_train == 12
    assert task.partition_labels is not None
    assert task.partition_labels.tolist() == [i % 3 for i in range(12)]
    assert task.describe()["num_classes"] == 3
    assert task.model.config.num_labels == 3
    batch = task.train_batch([0, 4, 7])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"].tolist() == [0, 1, 1]
    eval_sizes = [len(b["labels"]) for b in task.eval_batches(4)]
    assert eval_sizes == [4, 2]
    metrics = task.evaluate(task.model, 4, CPU)
    assert set(metrics) >= {"accuracy", "eval_loss"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    assert task.evaluate(task.model, 5, CPU) == pytest.approx(metrics)
    loss = task.loss(task.model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_image_task_adapts_backbone_and_trains_head(files: dict[str, Path]) -> None:
    task = image_task(files)
    assert task.modules_to_save == ["classifier"]
    assert task.task_type is None
    names, dense = adapted(task)
    assert len(names) == 12  # 2 layers × (q, k, v, o, fc1, fc2)
    assert all(n.startswith("vit.layers.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "fc1",
        "fc2",
    }
    assert set(dense) == {"classifier.weight", "classifier.bias"}
    assert dense["classifier.weight"].shape == (3, 32)


def test_image_head_is_seeded_and_rebuilt_exactly(files: dict[str, Path]) -> None:
    rng_before = torch.get_rng_state()
    task = image_task(files, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert same_state(task.load_base_model(), task.model)
    assert same_state(image_task(files, seed=3).model, task.model)
    other = image_task(files, seed=4).model
    assert not torch.equal(other.classifier.weight, task.model.classifier.weight)
    assert torch.equal(
        other.vit.layers[0].attention.q_proj.weight,
        task.model.vit.layers[0].attention.q_proj.weight,
    )


def test_image_imagefolder_and_eval_cap(files: dict[str, Path]) -> None:
    cfg = config("image-classification", files["vit"], files["imagefolder"], num_eval_samples=2)
    task = build_task(cfg)
    assert task.describe()["data_column"] == "image"
    assert task.describe()["label_column"] == "label"
    assert task.num_train == 9
    assert [len(b["labels"]) for b in task.eval_batches(8)] == [2]


def test_image_single_split_is_held_out_deterministically(files: dict[str, Path]) -> None:
    single = files["images"] / "train"  # one Dataset saved with save_to_disk (12 images)
    a = build_task(config("image-classification", files["vit"], single))
    assert (a.num_train, a.describe()["num_eval"]) == (9, 3)  # eval_fraction 0.2, rounded up
    b = build_task(config("image-classification", files["vit"], single, seed=9))
    assert np.array_equal(a.partition_labels, b.partition_labels)  # type: ignore[arg-type]
    c = build_task(
        config("image-classification", files["vit"], single, options={"eval_fraction": 0.5})
    )
    assert c.num_train == 6


# ---------------------------------------------------------------------------------------------
# Text classification
# ---------------------------------------------------------------------------------------------


def test_text_csv_string_labels_mapped_sorted(files: dict[str, Path]) -> None:
    task = text_task(files, "csv")
    assert task.num_train == 16  # 20 rows, eval_fraction 0.2
    assert task.model.config.id2label == {0: "topic_a", 1: "topic_b", 2: "topic_c"}
    assert task.partition_labels is not None
    assert set(task.partition_labels.tolist()) == {0, 1, 2}
    again = text_task(files, "csv", seed=5)
    assert np.array_equal(again.partition_labels, task.partition_labels)  # type: ignore[arg-type]
    batch = task.train_batch([0, 1, 2, 3])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    assert batch["labels"].dtype == torch.long
    metrics = task.evaluate(task.model, 3, CPU)
    assert set(metrics) >= {"accuracy", "eval_loss"}
    assert torch.isfinite(task.loss(task.model, batch))


@pytest.mark.parametrize(
    ("data", "num_train", "num_classes"),
    [("jsonl", 16, 4), ("parquet", 16, 3), ("text_dir", 15, 3)],
)
def test_text_file_formats(
    files: dict[str, Path], data: str, num_train: int, num_classes: int
) -> None:
    task = text_task(files, data)
    assert task.num_train == num_train
    assert task.describe()["num_classes"] == num_classes


def test_text_truncates_to_max_length(files: dict[str, Path]) -> None:
    task = text_task(files, "csv", max_length=5)
    assert task.train_batch(range(8))["input_ids"].shape[1] == 5


def test_text_adapts_encoder_not_head(files: dict[str, Path]) -> None:
    task = text_task(files, "csv")
    assert task.task_type == "SEQ_CLS"
    assert task.modules_to_save == ["classifier"]
    assert isinstance(task.target_modules, str)
    names, dense = adapted(task)
    assert len(names) == 12  # 2 layers × (query, key, value, 3 dense)
    assert all(re.match(r"roberta\.encoder\.layer\.\d+\.", n) for n in names)
    assert not any(n.startswith("classifier") for n in names)
    assert set(dense) == {
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    }


def test_text_base_model_rebuilt_exactly(files: dict[str, Path]) -> None:
    task = text_task(files, "csv", seed=7)
    assert same_state(task.load_base_model(), task.model)
    other = text_task(files, "csv", seed=8)
    assert not same_state(other.model, task.model)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "overrides", "expected"),
    [
        (
            "text",
            {"model": "{root}/missing-model"},
            r"task\.model '.*missing-model': no such local directory",
        ),
        (
            "text",
            {"model": "nobody/no-such-model"},
            r"task\.model 'nobody/no-such-model': not a local directory and could not be loaded "
            r"from the Hugging Face hub \(offline\?\): OSError",
        ),
        (
            "image",
            {"model": "nobody/no-such-vit"},
            r"task\.model 'nobody/no-such-vit': not a local directory",
        ),
        ("text", {"model": "{csv}"}, r"task\.model '.*t\.csv': a directory expected"),
        (
            "text",
            {"dataset": "nobody/no-such-data"},
            r"task\.dataset 'nobody/no-such-data': not a local file or directory and could not be "
            r"loaded from the Hugging Face hub \(offline\?\)",
        ),
        (
            "text",
            {"dataset": "{root}/missing.csv"},
            r"task\.dataset '.*missing\.csv': no such local file or directory",
        ),
        ("text", {"dataset": "{root}/vit/config.txt"}, r"no such local file"),
        (
            "text",
            {"text_column": "body"},
            r"task\.text_column 'body': no such column .*available: text, label",
        ),
        (
            "text",
            {"label_column": "topic"},
            r"task\.label_column 'topic': no such column .*available: text, label",
        ),
        (
            "image",
            {"image_column": "picture"},
            r"task\.image_column 'picture': no such column .*available: img, fine_label",
        ),
        (
            "image",
            {"dataset": "{csv}"},
            r"task\.image_column: dataset .* has none of the default columns 'img', 'image'; "
            r"set task\.image_column; available: text, label",
        ),
        (
            "text",
            {"options": {"eval_fracton": 0.1}},
            r"task\.options: unknown key\(s\) 'eval_fracton' for task 'text-classification'; "
            r"valid keys: dataset_config, eval_fraction, eval_split, train_split",
        ),
        (
            "text",
            {"options": {"eval_fraction": 1.5}},
            r"task\.options\.eval_fraction: a number in \(0, 1\)",
        ),
        (
            "image",
            {"options": {"eval_split": "dev"}},
            r"task\.options\.eval_split 'dev': no such split .*available: test, train",
        ),
    ],
)
def test_errors_name_what_was_asked(
    files: dict[str, Path], kind: str, overrides: dict[str, object], expected: str
) -> None:
    values = {k: str(files[k]) for k in ("vit", "csv")} | {"root": str(files["vit"].parent)}
    task_fields: dict[str, object] = {
        k: v.format(**values) if isinstance(v, str) else v for k, v in overrides.items()
    }
    name = "text-classification" if kind == "text" else "image-classification"
    model = task_fields.pop("model", files["roberta" if kind == "text" else "vit"])
    dataset = task_fields.pop("dataset", files["csv" if kind == "text" else "images"])
    with pytest.raises(TaskError, match=expected) as info:
        build_task(config(name, model, dataset, **task_fields))  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_unsupported_file_type(files: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(TaskError, match=r"unsupported file type '\.txt'"):
        text_task({**files, "txt": path}, "txt")


def test_labels_must_be_class_like(files: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\n" + "".join(f"space {i},{i + 0.5}\n" for i in range(10)))
    with pytest.raises(
        TaskError,
        match=r"task\.label_column 'label': labels must be strings or non-negative integers",
    ):
        text_task({**files, "bad": path}, "bad")
