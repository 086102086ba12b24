"""Mathematical reasoning with a causal LM (paper: Llama-3.2-3B on GSM8K, Appendix E.3).

``task.model`` (default ``meta-llama/Llama-3.2-3B``) is an ``AutoModelForCausalLM`` hub name or
local directory. ``task.dataset`` (default ``openai/gsm8k`` with configuration ``main``) is a hub
name, a CSV / JSON Lines / JSON / Parquet file (``eval_fraction`` held out with a fixed seed) or a
directory with ``train.*``/``test.*`` files, read by :func:`raflora.tasks.hf.load_splits`.

Columns: ``task.text_column`` is the question (default: the first of ``question``, ``query``,
``instruction``, ``problem`` present), ``task.label_column`` the worked solution trained on
(default: ``answer``, ``response``, ``output``, ``solution``). GSM8K solutions end in
``#### <number>``; MetaMathQA responses in ``The answer is: <answer>``. The loss is on the
solution tokens only.

Evaluation: greedy generation (``max_new_tokens``, default 256), the final answer extracted with
:func:`raflora.tasks.answers.extract_prediction` and compared exactly with the reference's
(:func:`raflora.tasks.answers.extract_reference`; numbers by value). The data has no labels to
partition by, so only ``data.partition: iid`` is possible.

Options (``task.options``): ``train_split``, ``eval_split``, ``eval_fraction``,
``dataset_config``, ``max_new_tokens``, ``prompt_template`` (``alpaca`` or ``qa``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raflora.tasks.answers import answers_match, extract_prediction, extract_reference
from raflora.tasks.base import TaskError, register_task
from raflora.tasks.hf import SplitOptions, load_splits, pick_column
from raflora.tasks.reasoning import CausalLMTask, Example, format_prompt

__all__ = ["MathReasoningTask"]

_GSM8K = "openai/gsm8k"


@register_task("math-reasoning")
class MathReasoningTask(CausalLMTask):
    """Fine-tune a causal LM on math word problems; exact match of the final answer.

    Parameters
    ----------
    config : RunConfig
        Run configuration (see the module docstring).

    Raises
    ------
    TaskError
        The model, tokenizer or dataset cannot be loaded, a column is missing, an option is
        unknown, or an evaluation solution has no final answer.
    """

    default_dataset = _GSM8K
    default_max_new_tokens = 256

    def _load_data(self) -> None:
        tc = self.config.task
        self.dataset_name = tc.dataset or self.default_dataset
        options = self.split_options
        if options.dataset_config is None and self.dataset_name == _GSM8K:
            options = SplitOptions(
                options.train_split, options.eval_split, options.eval_fraction, "main"
            )
        train, eval_ = load_splits(self.dataset_name, options)
        splits = [train, eval_]
        self.question_column = pick_column(
            "task.text_column",
            tc.text_column,
            ("question", "query", "instruction", "problem"),
            splits,
            self.dataset_name,
        )
        self.answer_column = pick_column(
            "task.label_column",
            tc.label_column,
            ("answer", "response", "output", "solution"),
            splits,
            self.dataset_name,
        )
        if tc.num_eval_samples is not None:
            eval_ = eval_.select(range(min(int(tc.num_eval_samples), len(eval_))))
        self.train_examples = self._examples(
            train[self.question_column], train[self.answer_column], None
        )
        eval_answers = [str(a or "") for a in eval_[self.answer_column]]
        references = []
        for i, answer in enumerate(eval_answers):
            ref = extract_reference(answer)
            if ref is None:
                raise TaskError(
                    f"task.label_column {self.answer_column!r}: evaluation example {i} of "
                    f"{self.dataset_name!r} has no final answer ({answer[:60]!r})"
                )
            references.append(ref)
        self.eval_examples = self._examples(eval_[self.question_column], eval_answers, references)
        self.partition_labels = None

    def _examples(
        self,
        questions: Sequence[object],
        answers: Sequence[object],
        references: list[str] | None,
    ) -> list[Example]:
        prompts = [format_prompt(str(q or ""), template=self.prompt_template) for q in questions]
        targets = [str(a or "").strip() for a in answers]
        return self.encode(prompts, targets, references)

    def _score(self, example: Example, generated: str) -> tuple[bool, bool]:
        prediction = extract_prediction(generated)
        return prediction is not None, answers_match(prediction, example.reference)

    def describe(self) -> dict[str, Any]:
        """Task facts plus the dataset and its columns."""
        facts = super().describe()
        facts.update(
            dataset=self.dataset_name,
            text_column=self.question_column,
            label_column=self.answer_column,
        )
        return facts
