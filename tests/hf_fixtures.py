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
