"""Text classification with a pretrained encoder (paper: RoBERTa-base on 20 Newsgroups).

``task.model`` (default ``FacebookAI/roberta-base``) is loaded with
``AutoModelForSequenceClassification`` and a new head sized to the data's classes, seeded from the
run seed so :meth:`TextClassificationTask.load_base_model` rebuilds the same model.
``task.dataset`` (default ``SetFit/20_newsgroups``, columns ``text`` and ``label``) is a hub name,
a CSV / JSON Lines / Parquet file (split into train/eval by ``eval_fraction``) or a directory
(``train.*``/``test.*`` files or ``save_to_disk`` output). String labels are mapped to ids in
sorted order. Texts are tokenized per batch (padded to the batch's longest, truncated to
``task.max_length``). The PEFT task type is ``SEQ_CLS``: LoRA adapts the encoder's linear layers,
the classification head is trained in full.

Options (``task.options``): ``train_split``, ``eval_split``, ``eval_fraction`` (default 0.2) and
``dataset_config`` (a hub dataset's configuration name).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from raflora.tasks.base import register_task
from raflora.tasks.hf import HFClassificationTask, load_pretrained

__all__ = ["TextClassificationTask"]


@register_task("text-classification")
class TextClassificationTask(HFClassificationTask):
    """Fine-tune a sequence classifier (RoBERTa by default) on a labelled text dataset.

    Parameters
    ----------
    config : RunConfig
        Run configuration: ``task.model``, ``task.dataset``, ``task.text_column`` (default
        ``text``, else ``sentence``), ``task.label_column`` (default ``label``, else ``labels``),
        ``task.max_length``, ``task.num_eval_samples``, ``task.options`` and ``seed``.

    Raises
    ------
    TaskError
        The model, tokenizer or dataset cannot be loaded, a column is missing, or an option is
        unknown.
    """

    default_model = "FacebookAI/roberta-base"
    default_dataset = "SetFit/20_newsgroups"
    data_column_field = "task.text_column"
    data_column_defaults = ("text", "sentence")
    task_type = "SEQ_CLS"

    def _setup(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = load_pretrained("task.model", self.model_id, AutoTokenizer.from_pretrained)
        if self.tokenizer.pad_token is None:
            # Decoder-style tokenizers have no pad token; padding positions are masked anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # a group of clients' batches is right-padded to its longest (docs/concurrency.md),
        # with the pad id: a classifier that finds the last real token by it still does
        self.group_pad_values = {"input_ids": int(self.tokenizer.pad_token_id)}

    def _create_model(self, model_dir: str, label_kwargs: dict[str, Any]) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            ignore_mismatched_sizes=True,
            dtype="float32",
            pad_token_id=self.tokenizer.pad_token_id,
            **label_kwargs,
        )
        return model

    def _collate(self, values: list[Any]) -> dict[str, Tensor]:
        texts = ["" if value is None else str(value) for value in values]
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {key: value for key, value in encoded.items() if isinstance(value, Tensor)}
