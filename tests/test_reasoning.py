"""The causal-LM reasoning tasks (math-reasoning, commonsense), offline on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import raflora.engine
from hf_fixtures import (
    make_commonsense_dir,
    make_gsm8k_jsonl,
    make_metamath_jsonl,
    make_tiny_llama,
)
from raflora.config import config_from_dict
from raflora.tasks import TaskError, build_task
from raflora.tasks.answers import (
    COMMONSENSE_TASKS,
    answers_match,
    extract_choice,
    extract_prediction,
    extract_reference,
    normalize_answer,
)
from raflora.tasks.reasoning import (
    IGNORE_INDEX,
    CausalLMTask,
    Example,
    collate_prompts,
    collate_training,
    truncate_pair,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    # The models are tiny: extra intra-op threads only add synchronisation cost, which grows
    # badly when the test machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reasoning")
    return {
        "llama": make_tiny_llama(root / "llama"),
        "gsm8k": make_gsm8k_jsonl(root / "gsm8k"),
        "metamath": make_metamath_jsonl(root / "metamath.jsonl"),
        "commonsense": make_commonsense_dir(root / "commonsense"),
        "llm_adapters": make_commonsense_dir(
            root / "llm_adapters", layout="llm-adapters", tasks=("boolq", "siqa", "arc_c")
        ),
    }


def task_dict(files: dict[str, Path], name: str, **task: Any) -> dict[str, Any]:
    data = "gsm8k" if name == "math-reasoning" else "commonsense"
    options = {"max_new_tokens": 4, **task.pop("options", {})}
    return {
        "name": name,
        "model": str(files["llama"]),
        "dataset": str(files[data]),
        "max_length": 96,
        "options": options,
        **task,
    }


def make_task(files: dict[str, Path], name: str, **task: Any) -> CausalLMTask:
    built = build_task(config_from_dict({"task": task_dict(files, name, **task)}))
    assert isinstance(built, CausalLMTask)
    return built


# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "72"),
        ("He earns $1,200 + $34 = $1,234.\n#### 1,234", "1234"),
        ("The loss is 10 - 15 = -5 dollars.\n#### -5", "-5"),
        ("We add 3 and 4 to get 7. The answer is: 7", "7"),
        ("The total cost is $18.00. The answer is: $18.00", "18"),
        ("Half of one is 1/2. The answer is: 0.5", "1/2"),
        ("The answer is: \\frac{1}{2}", "\\frac{1}{2}"),
        ("$18.00", "18"),
        ("", None),
    ],
)
def test_extract_reference(answer: str, expected: str | None) -> None:
    assert extract_reference(answer) == expected


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("She sold 48+24 = 72 clips.\n#### 72\n\n### Instruction:\nTom has 5", "72"),
        ("The answer is 1,234.", "1234"),
        ("so the final answer is: $18.00.", "18"),
        ("It drops by 5 degrees, ending at -3", "-3"),
        ("First 12 then 30 then 4.50", "9/2"),
        ("#### −7", "-7"),
        ("I do not know.", None),
        ("", None),
    ],
)
def test_extract_prediction(generated: str, expected: str | None) -> None:
    assert extract_prediction(generated) == expected


def test_answers_match_by_value() -> None:
    assert answers_match("18", normalize_answer("$18.00"))
    assert answers_match("0.75", "3/4")
    assert answers_match("1234", "1,234")
    assert not answers_match("-5", "5")
    assert not answers_match(None, "5")
    assert answers_match("(2,3)", "(2, 3)")


@pytest.mark.parametrize(
    ("task", "response", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "The correct answer is False.", "false"),
        ("boolq", "it is untrue", None),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "solution3", None),
        ("siqa", "the correct answer is answer3", "answer3"),
        ("hellaswag", "the correct answer is ending4 because ending1 is odd", "ending4"),
        ("hellaswag", "ending5", None),
        ("winogrande", "the correct answer is option1", "option1"),
        ("arc_e", "answer5", "answer5"),
        ("arc_c", "the correct answer is answer2", "answer2"),
        ("obqa", "the correct answer is answer4", "answer4"),
        ("obqa", "answer10", None),
        ("boolq", "lorem ipsum dolor", None),
    ],
)
def test_extract_choice(task: str, response: str, expected: str | None) -> None:
    assert extract_choice(task, response) == expected


def test_eight_commonsense_tasks() -> None:
    assert list(COMMONSENSE_TASKS) == [
        "boolq",
        "piqa",
        "siqa",
        "hellaswag",
        "winogrande",
        "arc_e",
        "arc_c",
        "obqa",
    ]


# --------------------------------------------------------------------------------------------
# Tokenization, masking, batching
# --------------------------------------------------------------------------------------------


def test_truncate_pair_keeps_answer_and_prompt_end() -> None:
    prompt, target = truncate_pair(list(range(10)), [100, 101, 102], 8)
    assert target == [100, 101, 102]
    assert prompt == list(range(5, 10))
    prompt, target = truncate_pair([1, 2], list(range(20)), 8)
    assert len(prompt) + len(target) == 8 and target == list(range(6))


def test_collate_masks_prompt_and_padding() -> None:
    examples = [Example([1, 2, 3], [7, 8, 0]), Example([4], [9, 0])]
    batch = collate_training(examples, pad_id=0)
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 3 + [7, 8, 0],
        [IGNORE_INDEX, 9, 0] + [IGNORE_INDEX] * 3,
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    prompts = collate_prompts(examples, pad_id=0)
    assert prompts["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_loss_only_on_answer_tokens(files: dict[str, Path]) -> None:
    task = make_task(files, "math-reasoning")
    batch = task.train_batch([0, 1, 2])
    tok = task.tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # fallback: the tiny tokenizer has no pad token
    for row in range(3):
        example = task.train_examples[row]
        n_prompt, n_all = len(example.prompt_ids), len(example.prompt_ids) + len(example.target_ids)
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert (labels[n_all:] == IGNORE_INDEX).all()
        assert labels[n_prompt:n_all].tolist() == batch["input_ids"][row, n_prompt:n_all].tolist()
        assert labels[n_all - 1] == tok.eos_token_id
        assert "####" in tok.decode(labels[n_prompt : n_all - 1])
        assert "### Response:" in tok.decode(batch["input_ids"][row, :n_prompt])
    # The loss is the mean cross-entropy over exactly the answer tokens.
    logits = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(task.loss(task.model, batch), manual)


def test_evaluate_batches_generation(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaForCausalLM

    task = make_task(files, "math-reasoning")
    calls: list[tuple[int, ...]] = []
    original = LlamaForCausalLM.generate

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(kwargs["input_ids"].shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", counting)
    task.model.eval()
    metrics = task.evaluate(task.model, batch_size=4, device=CPU)
    assert len(task.eval_examples) == 6
    assert [shape[0] for shape in calls] == [4, 2]  # one generate call per eval batch
    assert {"accuracy", "eval_loss", "answer_rate"} <= set(metrics)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    assert metrics == task.evaluate(task.model, batch_size=4, device=CPU)  # deterministic


def test_evaluate_counts_correct_generations(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import raflora.tasks.reasoning as reasoning

    task = make_task(files, "math-reasoning")
    refs = [e.reference for e in task.eval_examples]

    def fake(model: Any, prompts: Any, tokenizer: Any, max_new_tokens: int) -> list[str]:
        start = fake.seen  # type: ignore[attr-defined]
        n = prompts["input_ids"].shape[0]
        fake.seen += n  # type: ignore[attr-defined]
        # Right answers on even examples, wrong on odd ones.
        return [
            f"... #### {refs[i]}" if i % 2 == 0 else f"... #### {refs[i]}1"
            for i in range(start, start + n)
        ]

    fake.seen = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(reasoning, "generate_texts", fake)
    metrics = task.evaluate(task.model, batch_size=4, device=CPU)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["answer_rate"] == 1.0


def test_metamath_columns(files: dict[str, Path]) -> None:
    task = make_task(
        files, "math-reasoning", dataset=str(files["metamath"]), options={"prompt_template": "qa"}
    )
    assert task.describe()["text_column"] == "query"
    assert task.describe()["label_column"] == "response"
    assert task.partition_labels is None
    assert all(e.reference.isdigit() for e in task.eval_examples)
    assert task.target_modules == ["q_proj", "v_proj"] and task.task_type == "CAUSAL_LM"


def test_commonsense_task(files: dict[str, Path]) -> None:
    task = make_task(files, "commonsense", num_eval_samples=1)
    assert task.describe()["eval_tasks"] == list(COMMONSENSE_TASKS)
    assert len(task.eval_examples) == 8
    assert task.partition_labels is not None and len(task.partition_labels) == task.num_train
    names = task.describe()["answer_types"]
    assert all(names[i] in {"true", "false"} for i in task.partition_labels[:3])
    task.model.eval()
    metrics = task.evaluate(task.model, batch_size=8, device=CPU)
    per_task = [metrics[f"accuracy/{k}"] for k in COMMONSENSE_TASKS]
    assert metrics["accuracy"] == pytest.approx(sum(per_task) / 8)
    assert "eval_loss" in metrics


def test_commonsense_llm_adapters_layout(files: dict[str, Path]) -> None:
    task = make_task(files, "commonsense", dataset=str(files["llm_adapters"]))
    assert task.describe()["eval_tasks"] == ["boolq", "siqa", "arc_c"]
    with pytest.raises(TaskError, match="no test set for piqa"):
        make_task(
            files,
            "commonsense",
            dataset=str(files["llm_adapters"]),
            options={"eval_tasks": ["boolq", "piqa"]},
        )


def test_commonsense_file_needs_eval_dir(files: dict[str, Path]) -> None:
    train = str(files["commonsense"] / "train.json")
    with pytest.raises(TaskError, match="eval_dir: required"):
        make_task(files, "commonsense", dataset=train)
    task = make_task(
        files,
        "commonsense",
        dataset=train,
        options={"eval_dir": str(files["commonsense"] / "eval"), "eval_tasks": "winogrande"},
    )
    assert task.describe()["eval_tasks"] == ["winogrande"]


@pytest.mark.parametrize(
    ("name", "task", "message"),
    [
        ("math-reasoning", {"options": {"beams": 2}}, "unknown key.*'beams'.*max_new_tokens"),
        ("math-reasoning", {"options": {"max_new_tokens": 0}}, "max_new_tokens"),
        ("math-reasoning", {"text_column": "nope"}, "task.text_column 'nope'"),
        ("math-reasoning", {"dataset": "/nonexistent/gsm8k"}, "no such local"),
        ("math-reasoning", {"model": "/nonexistent/llama"}, "task.model"),
        ("commonsense", {"options": {"eval_tasks": ["mmlu"]}}, "eval_tasks"),
        ("commonsense", {"dataset": None}, "task.dataset: set it"),
    ],
)
def test_errors(files: dict[str, Path], name: str, task: dict[str, Any], message: str) -> None:
    with pytest.raises(TaskError, match=message):
        make_task(files, name, **task)


# --------------------------------------------------------------------------------------------
# Two federated rounds through the real engine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["math-reasoning", "commonsense"])
@pytest.mark.parametrize("method", ["raflora", "flexlora"])
def test_two_rounds(files: dict[str, Path], tmp_path: Path, name: str, method: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = config_from_dict(
        {
            "method": method,
            "seed": 1,
            "task": task_dict(files, name, num_eval_samples=2),
            "fl": {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "rank_levels": [2, 4]},
            "data": {
                "partition": "iid" if name == "math-reasoning" else "dir-a1",
                "min_samples": 1,
            },
            "train": {"batch_size": 4, "gradient_checkpointing": name == "commonsense"},
            "lora": {"target_modules": "all-linear"},
            "eval": {"every": 1, "batch_size": 8},
            "output": {"plots": False},
        }
    )
    result = raflora.engine.run_local(config, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["eval_loss"] > 0
        if name == "commonsense":
            assert all(f"accuracy/{k}" in row for k in COMMONSENSE_TASKS)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == result.summary
    assert summary["final_accuracy"] == rows[-1]["accuracy"]

    adapter_dir = tmp_path / "run" / "adapter"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter_config["task_type"] == "CAUSAL_LM"
    base = AutoModelForCausalLM.from_pretrained(str(files["llama"]))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    lora = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert lora and all("q_proj" in n or "v_proj" in n for n in lora)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
