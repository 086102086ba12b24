"""Commonsense reasoning with a causal LM (paper: Llama on Commonsense15K, Appendix E.4).

Data are in the LLM-Adapters format: JSON (a list of records) or JSON Lines with ``instruction``,
``input`` (may be empty or absent), ``output`` (the response trained on, e.g. ``"the correct
answer is true"``) and ``answer`` (the answer token, e.g. ``"true"``, ``"solution2"``,
``"answer3"``, ``"ending1"``, ``"option2"``).

Layout of ``task.dataset``:

* a **directory** holding the training file — the first of ``train.json``, ``train.jsonl``,
  ``commonsense_15k.json``, ``commonsense_15k.jsonl``, ``train.parquet``, ``train.csv`` — and the
  test sets, either in ``eval/`` or, as in LLM-Adapters' ``dataset/`` folder, next to it;
* a training **file** or a **hub dataset** (``train_split``, ``dataset_config``): then the option
  ``eval_dir`` must name the test-set directory.

The option ``eval_dir`` always wins. A test set is found in that directory as ``<name>.json``,
``<name>.jsonl``, ``<name>/test.json`` or ``<name>/test.jsonl``, where ``<name>`` is its key
(``boolq``, ``piqa``, ``siqa``, ``hellaswag``, ``winogrande``, ``arc_e``, ``arc_c``, ``obqa``) or
its LLM-Adapters folder name (``social_i_qa``, ``ARC-Easy``, ``ARC-Challenge``, ``openbookqa`` …).
By default every one of the eight that is present is evaluated (at least one must be); the option
``eval_tasks`` (a list of keys) requires exactly those. ``task.num_eval_samples`` caps each test
set (its first examples).

Evaluation: greedy generation (``max_new_tokens``, default 32), the first answer token of the
sub-task in the response (:func:`raflora.tasks.answers.extract_choice`) compared with ``answer``.
Metrics: ``accuracy/<key>`` per test set, ``accuracy`` their unweighted mean (the paper's "Avg."),
``answer_rate`` and ``eval_loss``. ``partition_labels`` are the training examples' answer tokens
as class ids (sorted), so ``data.partition: dir-a1`` splits by answer type
(docs/design.md#data-partitions).

Options (``task.options``): ``eval_dir``, ``eval_tasks``, ``input_column`` (default ``input``),
``answer_column`` (default ``answer``), ``max_new_tokens``, ``prompt_template``, and for hub
training data ``train_split`` / ``dataset_config``. Columns: ``task.text_column`` (default
``instruction``) and ``task.label_column`` (default ``output``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raflora.schema import setting
from raflora.tasks.answers import COMMONSENSE_TASKS, CommonsenseSubtask, extract_choice
from raflora.tasks.base import TaskError, register_task
from raflora.tasks.hf import as_splits, attempt_load, encode_labels, load_local, looks_local
from raflora.tasks.reasoning import (
    CausalLMOptions,
    CausalLMTask,
    Example,
    OptionCheck,
    format_prompt,
    non_empty_str,
)

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["TRAIN_FILES", "CommonsenseOptions", "CommonsenseTask"]

TRAIN_FILES = (
    "train.json",
    "train.jsonl",
    "commonsense_15k.json",
    "commonsense_15k.jsonl",
    "train.parquet",
    "train.csv",
)
"""Training file names looked for in a ``task.dataset`` directory, in order."""


def _task_list(key: str, value: Any) -> list[str]:
    keys = [value] if isinstance(value, str) else value
    if (
        not isinstance(keys, list)
        or not keys
        or not all(isinstance(k, str) and k in COMMONSENSE_TASKS for k in keys)
        or len(set(keys)) != len(keys)
    ):
        raise TaskError(
            f"task.options.{key}: a list of distinct test-set keys from "
            f"{', '.join(COMMONSENSE_TASKS)} expected, got {value!r}"
        )
    return list(keys)


def _eval_file(directory: Path, subtask: CommonsenseSubtask) -> Path | None:
    for name in (subtask.key, *subtask.aliases):
        for candidate in (
            directory / f"{name}.json",
            directory / f"{name}.jsonl",
            directory / name / "test.json",
            directory / name / "test.jsonl",
        ):
            if candidate.is_file():
                return candidate
    return None


def _read_file(field: str, path: Path) -> Dataset:
    what = f"{field} {str(path)!r}: could not load this local file"
    loaded = attempt_load(what, lambda: load_local(path))
    return next(iter(as_splits(loaded).values()))


def _column(ds: Dataset, column: str) -> list[str]:
    return ["" if v is None else str(v) for v in ds[column]]


@dataclass(frozen=True)
class CommonsenseOptions(CausalLMOptions):
    """The ``task.options`` of ``commonsense``: their schema, for ``docs/configuration.md`` and
    the JSON Schema (checked by ``CommonsenseTask._extra_options`` and the split options').
    """

    max_new_tokens: int = setting(32, "Most tokens generated per answer.", ge=1)
    eval_dir: str | None = setting(
        None,
        "Directory of the test sets (required when task.dataset is a hub name; null: the "
        "training directory's eval/, or the directory itself).",
    )
    # setting() returns a dataclass field; its default, None, is immutable
    eval_tasks: list[str] | str | None = setting(  # noqa: RUF009
        None,
        f"Test sets that must be evaluated, a list of keys from {', '.join(COMMONSENSE_TASKS)} "
        "(null: every one present).",
    )
    input_column: str = setting("input", "Column of an example's input.")
    answer_column: str = setting("answer", "Column of the answer.")


@register_task("commonsense")
class CommonsenseTask(CausalLMTask):
    """Fine-tune a causal LM on Commonsense15K; exact match on the eight test sets.

    Parameters
    ----------
    config : RunConfig
        Run configuration (see the module docstring).

    Raises
    ------
    TaskError
        The model, tokenizer, training data or a test set cannot be loaded, a column is missing,
        no test set is found, or an option is invalid.
    """

    default_max_new_tokens = 32
    Options = CommonsenseOptions

    def _extra_options(self) -> dict[str, OptionCheck]:
        return {
            "eval_dir": non_empty_str,
            "eval_tasks": _task_list,
            "input_column": non_empty_str,
            "answer_column": non_empty_str,
        }

    # -- data ----------------------------------------------------------------------------

    def _load_train(self, name: str) -> tuple[Dataset, Path | None]:
        """The training split and the default test-set directory."""
        path = Path(name).expanduser()
        if path.is_dir():
            for file_name in TRAIN_FILES:
                if (path / file_name).is_file():
                    eval_dir = path / "eval" if (path / "eval").is_dir() else path
                    return _read_file("task.dataset", path / file_name), eval_dir
            raise TaskError(
                f"task.dataset {name!r}: no training file in this directory; expected one of "
                f"{', '.join(TRAIN_FILES)}"
            )
        if path.is_file():
            return _read_file("task.dataset", path), None
        if looks_local(name):
            raise TaskError(f"task.dataset {name!r}: no such local file or directory")
        import datasets

        opts = self.split_options
        loaded = attempt_load(
            f"task.dataset {name!r}: not a local file or directory and could not be loaded "
            "from the Hugging Face hub (offline?)",
            lambda: datasets.load_dataset(name, opts.dataset_config),
        )
        splits = as_splits(loaded)
        if opts.train_split not in splits:
            raise TaskError(
                f"task.options.train_split {opts.train_split!r}: no such split in dataset "
                f"{name!r}; available: {', '.join(sorted(splits))}"
            )
        return splits[opts.train_split], None

    def _require(self, ds: Dataset, column: str, field: str, where: str) -> None:
        if column not in ds.column_names:
            raise TaskError(
                f"{field} {column!r}: no such column in {where}; available: "
                f"{', '.join(ds.column_names)}"
            )

    def _load_data(self) -> None:
        tc = self.config.task
        if tc.dataset is None:
            raise TaskError(
                "task.dataset: set it to a Commonsense15K directory (train.json + the eight "
                "test sets, LLM-Adapters format) or a training file with task.options.eval_dir"
            )
        self.dataset_name = tc.dataset
        self.instruction_column = tc.text_column or "instruction"
        self.output_column = tc.label_column or "output"
        self.input_column = str(self.options.get("input_column", "input"))
        self.answer_column = str(self.options.get("answer_column", "answer"))

        train, default_eval_dir = self._load_train(self.dataset_name)
        where = f"dataset {self.dataset_name!r}"
        self._require(train, self.instruction_column, "task.text_column", where)
        self._require(train, self.output_column, "task.label_column", where)
        self.train_examples = self.encode(self._prompts(train), _column(train, self.output_column))
        if self.answer_column in train.column_names:
            labels = encode_labels(train, train.select([]), self.answer_column)
            self.partition_labels = labels.train
            self.answer_types = labels.names
        else:
            self.partition_labels = None
            self.answer_types = []

        given = self.options.get("eval_dir")
        eval_dir = Path(given).expanduser() if given is not None else default_eval_dir
        if eval_dir is None:
            raise TaskError(
                f"task.options.eval_dir: required when task.dataset {self.dataset_name!r} is a "
                "file or hub dataset (the directory holding the eight test sets)"
            )
        if not eval_dir.is_dir():
            raise TaskError(f"task.options.eval_dir {str(eval_dir)!r}: no such directory")
        self.eval_dir = eval_dir
        self.eval_tasks, self.eval_files = self._find_eval_sets(eval_dir)
        self.eval_examples = []
        for key in self.eval_tasks:
            self.eval_examples.extend(self._eval_examples(key, self.eval_files[key]))

    def _find_eval_sets(self, eval_dir: Path) -> tuple[list[str], dict[str, Path]]:
        wanted = self.options.get("eval_tasks")
        keys = list(COMMONSENSE_TASKS) if wanted is None else list(wanted)
        found = {k: f for k in keys if (f := _eval_file(eval_dir, COMMONSENSE_TASKS[k]))}
        missing = [k for k in keys if k not in found]
        if (wanted is not None and missing) or not found:
            raise TaskError(
                f"task.options.eval_dir {str(eval_dir)!r}: no test set for "
                f"{', '.join(missing)}; expected <name>.json, <name>.jsonl or <name>/test.json "
                "per test set"
            )
        ordered = [k for k in keys if k in found]
        return ordered, {k: found[k] for k in ordered}

    def _prompts(self, ds: Dataset) -> list[str]:
        instructions = _column(ds, self.instruction_column)
        inputs = (
            _column(ds, self.input_column)
            if self.input_column in ds.column_names
            else [""] * len(instructions)
        )
        return [
            format_prompt(i, x, self.prompt_template)
            for i, x in zip(instructions, inputs, strict=True)
        ]

    def _eval_examples(self, key: str, path: Path) -> list[Example]:
        ds = _read_file(f"test set {key}", path)
        limit = self.config.task.num_eval_samples
        if limit is not None:
            ds = ds.select(range(min(int(limit), len(ds))))
        if len(ds) == 0:
            raise TaskError(f"test set {key} {str(path)!r}: no examples")
        where = f"test set {str(path)!r}"
        self._require(ds, self.instruction_column, "task.text_column", where)
        self._require(ds, self.answer_column, "task.options.answer_column", where)
        answers = [a.strip().lower() for a in _column(ds, self.answer_column)]
        targets = (
            _column(ds, self.output_column)
            if self.output_column in ds.column_names
            else [f"the correct answer is {a}" for a in answers]
        )
        return self.encode(self._prompts(ds), targets, answers, [key] * len(answers))

    # -- scoring -------------------------------------------------------------------------

    def _score(self, example: Example, generated: str) -> tuple[bool, bool]:
        choice = extract_choice(example.group, generated)
        return choice is not None, choice == example.reference

    def _metrics(self, correct: Sequence[bool], found: Sequence[bool]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        per_task: dict[str, list[bool]] = {k: [] for k in self.eval_tasks}
        for example, ok in zip(self.eval_examples, correct, strict=True):
            per_task[example.group].append(ok)
        for key, outcomes in per_task.items():
            metrics[f"accuracy/{key}"] = sum(outcomes) / len(outcomes)
        metrics["accuracy"] = sum(metrics.values()) / len(per_task)
        metrics["answer_rate"] = sum(found) / len(found)
        return metrics

    def describe(self) -> dict[str, Any]:
        """Task facts plus the data locations, test sets and answer types."""
        facts = super().describe()
        facts.update(
            dataset=self.dataset_name,
            eval_dir=str(self.eval_dir),
            eval_tasks=self.eval_tasks,
            num_eval_per_task={
                k: sum(1 for e in self.eval_examples if e.group == k) for k in self.eval_tasks
            },
            answer_types=self.answer_types,
        )
        return facts
