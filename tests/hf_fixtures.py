"""Tiny offline Hugging Face models and datasets for tests (no network needed).

Every builder writes into a directory the caller owns (``tmp_path``) and returns the path to
pass as ``task.model`` / ``task.dataset``. Models are random (seeded) and a few kB in size; they
load through the same ``from_pretrained`` code as real checkpoints.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

WORDS = [
    "the",
    "a",
    "space",
    "rocket",
    "orbit",
    "nasa",
    "launch",
    "car",
    "engine",
    "wheel",
    "drive",
    "hockey",
    "goal",
    "team",
    "season",
    "game",
    "god",
    "church",
    "belief",
    "bible",
    "computer",
    "graphics",
    "image",
    "file",
    "windows",
    "driver",
    "printer",
    "disk",
    "sale",
    "price",
    "offer",
    "gun",
    "law",
    "right",
    "government",
    "doctor",
    "disease",
    "patient",
    "medicine",
]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_tiny_vit(directory: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A random 2-layer ViT (32×32 images, 8×8 patches) with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    directory = Path(directory)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _images(n: int, num_classes: int, seed: int) -> tuple[list[object], list[int]]:
    from PIL import Image

    rng = _rng(seed)
    labels = [i % num_classes for i in range(n)]
    images = []
    for label in labels:
        # A class-dependent colour plus noise, so tiny models can learn something.
        base = np.full((32, 32, 3), 40 + 200 * label / max(num_classes - 1, 1), dtype=np.float64)
        pixels = np.clip(base + rng.normal(0, 30, size=base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="RGB"))
    return images, labels


def make_image_dataset(
    directory: Path,
    n: int = 12,
    num_classes: int = 3,
    *,
    layout: str = "disk",
    num_eval: int | None = None,
    seed: int = 0,
) -> Path:
    """A tiny image classification dataset with ``train`` and ``test`` splits.

    ``layout="disk"``: a ``DatasetDict`` saved with ``save_to_disk`` with CIFAR-100's column
    names (``img``, ``fine_label`` as a ``ClassLabel``). ``layout="imagefolder"``:
    ``train/<class>/<i>.png`` and ``test/<class>/<i>.png`` (columns ``image``, ``label``).
    ``num_eval`` test images (default ``n // 2``).
    """
    directory = Path(directory)
    num_eval = n // 2 if num_eval is None else num_eval
    names = [f"class{c}" for c in range(num_classes)]
    if layout == "disk":
        from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

        features = Features({"img": Image(), "fine_label": ClassLabel(names=names)})
        splits = {}
        for split, count, s in (("train", n, seed), ("test", num_eval, seed + 1)):
            images, labels = _images(count, num_classes, s)
            splits[split] = Dataset.from_dict(
                {"img": images, "fine_label": labels}, features=features
            )
        DatasetDict(splits).save_to_disk(str(directory))
    elif layout == "imagefolder":
        for split, count, s in (("train", n, seed), ("test", num_eval, seed + 1)):
            images, labels = _images(count, num_classes, s)
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                path = directory / split / names[label] / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)  # type: ignore[attr-defined]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return directory


def _sentences(n: int, num_classes: int, seed: int) -> tuple[list[str], list[int]]:
    rng = _rng(seed)
    per_class = max(len(WORDS) // max(num_classes, 1), 1)
    texts, labels = [], []
    for i in range(n):
        label = i % num_classes
        vocab = WORDS[label * per_class : (label + 1) * per_class] or WORDS
        length = int(rng.integers(3, 12))
        texts.append(" ".join(str(w) for w in rng.choice(vocab, size=length)))
        labels.append(label)
    return texts, labels


def make_tiny_roberta(directory: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A random 2-layer RoBERTa with a word-level tokenizer trained offline on :data:`WORDS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    directory = Path(directory)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=60,
    )
    tokenizer.save_pretrained(directory)
    config = RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    RobertaForSequenceClassification(config).save_pretrained(directory)
    return directory


def _text_rows(n: int, num_classes: int, string_labels: bool, seed: int) -> list[dict[str, object]]:
    texts, labels = _sentences(n, num_classes, seed)
    return [
        {"text": t, "label": f"topic_{chr(ord('a') + y)}" if string_labels else y}
        for t, y in zip(texts, labels, strict=True)
    ]


def make_text_csv(
    path: Path, n: int = 20, num_classes: int = 3, *, string_labels: bool = False, seed: int = 0
) -> Path:
    """A CSV file with columns ``text`` and ``label`` (ints, or ``topic_a`` … strings)."""
    path = Path(path)
    rows = _text_rows(n, num_classes, string_labels, seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_text_jsonl(
    path: Path, n: int = 20, num_classes: int = 3, *, string_labels: bool = False, seed: int = 0
) -> Path:
    """A JSON Lines file with keys ``text`` and ``label``."""
    path = Path(path)
    rows = _text_rows(n, num_classes, string_labels, seed)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_text_parquet(
    path: Path, n: int = 20, num_classes: int = 3, *, string_labels: bool = False, seed: int = 0
) -> Path:
    """A Parquet file with columns ``text`` and ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    rows = _text_rows(n, num_classes, string_labels, seed)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


# --------------------------------------------------------------------------------------------
# Causal LMs and reasoning data (math-reasoning, commonsense)
# --------------------------------------------------------------------------------------------

REASONING_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction:\n### Input:\n### Response:\nQuestion: Answer: ",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. #### 72",
    "The answer is: 1,234 $18.00 -5 0.5 3/4",
    "Please answer the following question with true or false. the correct answer is true false",
    "solution1 solution2 answer1 answer2 answer3 answer4 answer5 ending1 ending2 ending3 "
    "ending4 option1 option2",
    "0123456789 +-*/=.,$#:?!",
]


def make_tiny_llama(
    directory: Path,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
) -> Path:
    """A random ``LlamaForCausalLM`` with a byte-level BPE tokenizer trained offline.

    The tokenizer adds ``<s>`` in front, has ``</s>`` as EOS and no pad token (the tasks fall
    back to EOS). Defaults give a ~30k-parameter model; larger sizes are for benchmarks.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(REASONING_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _gsm8k_row(i: int, rng: np.random.Generator) -> dict[str, str]:
    a, b = (int(x) for x in rng.integers(2, 60, size=2))
    total = a + b
    answer = f"{total:,}" if i % 3 else str(total)
    return {
        "question": f"Natalia sold {a} clips in April and {b} clips in May. How many clips?",
        "answer": f"Natalia sold {a}+{b} = {total} clips altogether.\n#### {answer}",
    }


def make_gsm8k_jsonl(directory: Path, n_train: int = 16, n_test: int = 6, *, seed: int = 0) -> Path:
    """A directory with GSM8K-style ``train.jsonl`` and ``test.jsonl`` (``question``/``answer``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        rows = [_gsm8k_row(i, rng) for i in range(n)]
        (directory / f"{name}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
        )
    return directory


def make_metamath_jsonl(path: Path, n: int = 12, *, seed: int = 0) -> Path:
    """A MetaMathQA-style JSON Lines file (``query``/``response`` ending in "The answer is: X")."""
    path = Path(path)
    rng = _rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        rows.append(
            {
                "query": f"What is {a} plus {b}?",
                "response": f"We add {a} and {b} to get {a + b}. The answer is: {a + b}",
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


COMMONSENSE_CHOICES = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "siqa": ["answer1", "answer2", "answer3"],
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
    "arc_e": ["answer1", "answer2", "answer3", "answer4"],
    "arc_c": ["answer1", "answer2", "answer3", "answer4"],
    "obqa": ["answer1", "answer2", "answer3", "answer4"],
}
"""Answer tokens of each test set (as in LLM-Adapters' data)."""

LLM_ADAPTERS_FOLDERS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_e": "ARC-Easy",
    "arc_c": "ARC-Challenge",
    "obqa": "openbookqa",
}


def _commonsense_rows(task: str, n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    choices = COMMONSENSE_CHOICES[task]
    rows = []
    for i in range(n):
        answer = choices[int(rng.integers(len(choices)))]
        rows.append(
            {
                "instruction": f"Please answer the following question {i} with "
                f"{' or '.join(choices)}.\n\nAnswer format: {'/'.join(choices)}",
                "input": "",
                "output": f"the correct answer is {answer}",
                "answer": answer,
            }
        )
    return rows


def make_commonsense_dir(
    directory: Path,
    n_train_per_task: int = 3,
    n_eval: int = 2,
    *,
    layout: str = "eval",
    tasks: tuple[str, ...] = tuple(COMMONSENSE_CHOICES),
    seed: int = 0,
) -> Path:
    """A Commonsense15K-style directory: ``train.json`` (a JSON list) plus test sets.

    ``layout="eval"``: ``eval/<key>.json``; ``layout="llm-adapters"``: ``<folder>/test.json`` next
    to the training file, with LLM-Adapters' folder names (``social_i_qa``, ``ARC-Easy`` …).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    train = [row for task in tasks for row in _commonsense_rows(task, n_train_per_task, rng)]
    (directory / "train.json").write_text(json.dumps(train), encoding="utf-8")
    for task in tasks:
        rows = _commonsense_rows(task, n_eval, rng)
        if layout == "eval":
            path = directory / "eval" / f"{task}.json"
        elif layout == "llm-adapters":
            path = directory / LLM_ADAPTERS_FOLDERS[task] / "test.json"
        else:
            raise ValueError(f"unknown layout {layout!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows), encoding="utf-8")
    return directory
