"""Shared machinery of the causal-LM reasoning tasks (``math-reasoning``, ``commonsense``).

* Prompts: the Alpaca / LLM-Adapters template (``### Instruction:`` … ``### Response:``) by
  default, or a plain ``Question: … Answer:`` template (option ``prompt_template``).
* Tokenization: prompt (with the tokenizer's BOS) and target (followed by EOS) are tokenized
  separately and concatenated, so the loss mask is exact: ``labels`` are ``-100`` on every prompt
  and padding position and equal the input ids on the target. When prompt + target exceed
  ``task.max_length`` the target is cut to what fits (at least half the budget) and the prompt
  keeps its *last* tokens (the instruction's end and the response cue).
* Training batches are right-padded; generation batches are left-padded, and each evaluation batch
  is answered by one greedy ``generate`` call (``max_new_tokens`` option) on the unwrapped
  transformers model, so the active LoRA adapter is used without PEFT's per-call overhead.
* The base model is an ``AutoModelForCausalLM`` loaded once (in the run's ``dtype``) with its
  ``AutoTokenizer``; a tokenizer without a pad token pads with EOS (padding is masked). LoRA
  targets ``q_proj`` and ``v_proj`` (paper Tables 8–9) when the config says ``all-linear``.

Subclasses load their data into :class:`Example` lists and decide whether a generated answer is
correct (:meth:`CausalLMTask._score`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raflora.schema import setting
from raflora.tasks.base import Batch, Task, TaskError, concat_batches, move_batch
from raflora.tasks.hf import SplitOptions, check_options, load_pretrained
from raflora.tasks.quantize import one_cpu_path, pretrained_kwargs

if TYPE_CHECKING:
    from raflora.config import RunConfig

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATES",
    "CausalLMOptions",
    "CausalLMTask",
    "Example",
    "collate_prompts",
    "collate_training",
    "encode_examples",
    "format_prompt",
    "generate_texts",
    "generation_model",
    "parse_options",
    "truncate_pair",
]

IGNORE_INDEX = -100
"""Label value ignored by the loss (prompt and padding positions)."""

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_QA_WITH_INPUT = "Question: {instruction}\n{input}\nAnswer: "
_QA = "Question: {instruction}\nAnswer: "

PROMPT_TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (_ALPACA, _ALPACA_WITH_INPUT),
    "qa": (_QA, _QA_WITH_INPUT),
}
"""Template name → (template without input, template with input)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def format_prompt(instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """The prompt of one example (the response is generated/trained right after it).

    Parameters
    ----------
    instruction : str
        The question or instruction.
    input_text : str
        Optional context (LLM-Adapters' ``input`` field); the shorter template is used when empty.
    template : str
        ``"alpaca"`` (LLM-Adapters) or ``"qa"``.
    """
    plain, with_input = PROMPT_TEMPLATES[template]
    if input_text.strip():
        return with_input.format(instruction=instruction.strip(), input=input_text.strip())
    return plain.format(instruction=instruction.strip())


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

OptionCheck = Callable[[str, Any], Any]
"""Validates one option value (``(key, value) -> parsed``); raises :class:`TaskError`."""

_SPLIT_KEYS = ("dataset_config", "eval_fraction", "eval_split", "train_split")


@dataclass(frozen=True)
class CausalLMOptions(SplitOptions):
    """The ``task.options`` of the causal-LM tasks: the split options, and generation.

    The schema of what :func:`parse_options` checks by hand (``docs/configuration.md`` and the
    JSON Schema are generated from it; a test keeps the two in step).
    """

    max_new_tokens: int = setting(256, "Most tokens generated per answer.", ge=1)
    prompt_template: Literal["alpaca", "qa"] = setting(
        "alpaca", "Prompt: alpaca (instruction/response) or qa (Question: … Answer:)."
    )


def positive_int(key: str, value: Any) -> int:
    """An integer ≥ 1 (``task.options.<key>``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskError(f"task.options.{key}: an integer >= 1 expected, got {value!r}")
    return value


def choice(*choices: str) -> OptionCheck:
    """A validator accepting one of ``choices``."""

    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise TaskError(
                f"task.options.{key}: one of {', '.join(map(repr, choices))} expected, "
                f"got {value!r}"
            )
        return str(value)

    return check


def non_empty_str(key: str, value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise TaskError(f"task.options.{key}: a non-empty string expected, got {value!r}")
    return value


def parse_options(
    task: str, options: Mapping[str, Any], extra: Mapping[str, OptionCheck]
) -> tuple[SplitOptions, dict[str, Any]]:
    """The shared split options (:func:`~raflora.tasks.hf.check_options`) plus task-specific ones.

    Parameters
    ----------
    task : str
        Task name (for messages).
    options : Mapping[str, Any]
        ``config.task.options``.
    extra : Mapping[str, OptionCheck]
        Task-specific keys and their validators.

    Returns
    -------
    tuple[SplitOptions, dict[str, Any]]
        Split options and the parsed task-specific options that were given.

    Raises
    ------
    TaskError
        An unknown key (the message lists every valid key) or an invalid value.
    """
    valid = sorted((*_SPLIT_KEYS, *extra))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TaskError(
            f"task.options: unknown key(s) {', '.join(map(repr, unknown))} for task {task!r}; "
            f"valid keys: {', '.join(valid)}"
        )
    split = check_options(task, {k: v for k, v in options.items() if k in _SPLIT_KEYS})
    parsed = {key: check(key, options[key]) for key, check in extra.items() if key in options}
    return split, parsed


# --------------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized example.

    Attributes
    ----------
    prompt_ids : list[int]
        Prompt tokens (with BOS when the tokenizer adds one).
    target_ids : list[int]
        Answer tokens followed by EOS (the only positions with a loss).
    reference : str
        What a generated answer is compared with (evaluation examples only).
    group : str
        Evaluation subset the example belongs to (e.g. ``"boolq"``).
    """

    prompt_ids: list[int]
    target_ids: list[int]
    reference: str = ""
    group: str = ""


def truncate_pair(
    prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Fit prompt + target into ``max_length`` tokens.

    The target keeps ``min(len(target), max(max_length - len(prompt), max_length // 2))`` leading
    tokens (always at least one); the prompt keeps its last tokens in the remaining budget.
    """
    prompt, target = list(prompt_ids), list(target_ids)
    if len(prompt) + len(target) <= max_length:
        return prompt, target
    keep_target = max(1, min(len(target), max(max_length - len(prompt), max_length // 2)))
    target = target[:keep_target]
    budget = max_length - len(target)
    prompt = prompt[len(prompt) - budget :] if budget > 0 else []
    return prompt, target


def encode_examples(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_length: int,
    *,
    references: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> list[Example]:
    """Tokenize prompt/target pairs (prompt with special tokens; target + EOS without).

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer (must have an EOS token).
    prompts, targets : Sequence[str]
        Formatted prompts and the answers to learn.
    max_length : int
        Maximum prompt + target length (:func:`truncate_pair`).
    references, groups : Sequence[str], optional
        Per-example reference answer and evaluation subset.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TaskError("task.model: the tokenizer has no EOS token")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids, strict=True)):
        prompt, target = truncate_pair(p, [*t, int(eos)], max_length)
        out.append(
            Example(
                prompt,
                target,
                "" if references is None else references[i],
                "" if groups is None else groups[i],
            )
        )
    return out


def collate_training(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (labels only on the targets)."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = e.prompt_ids + e.target_ids
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        labels[row, len(e.prompt_ids) : len(ids)] = torch.tensor(e.target_ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_prompts(examples: Sequence[Example], pad_id: int) -> Batch:
    """Left-padded prompts (``input_ids``, ``attention_mask``) for batched generation."""
    width = max(len(e.prompt_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.prompt_ids)
        if n:
            input_ids[row, width - n :] = torch.tensor(e.prompt_ids, dtype=torch.long)
            attention[row, width - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


# --------------------------------------------------------------------------------------------
# Models and generation
# --------------------------------------------------------------------------------------------


def generation_model(model: nn.Module) -> nn.Module:
    """The transformers model to call ``generate`` on.

    A ``PeftModel`` is unwrapped to its base model: LoRA layers are injected in place, so the
    active adapter takes part in generation.
    """
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def generate_texts(
    model: nn.Module,
    prompts: Batch,
    tokenizer: Any,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of a left-padded prompt batch, one ``generate`` call.

    Parameters
    ----------
    model : nn.Module
        A causal LM, possibly wrapped by PEFT (see :func:`generation_model`).
    prompts : Batch
        ``input_ids`` and ``attention_mask`` from :func:`collate_prompts`, on the model's device.
    tokenizer : PreTrainedTokenizerBase
        Decodes the new tokens (special tokens dropped).
    max_new_tokens : int
        Generation budget per example.

    Returns
    -------
    list[str]
        The generated text of each prompt (without the prompt).
    """
    from transformers import GenerationConfig

    lm = generation_model(model)
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    generate: Callable[..., Tensor] = lm.generate  # type: ignore[assignment]
    output = generate(
        input_ids=prompts["input_ids"],
        attention_mask=prompts["attention_mask"],
        generation_config=config,
    )
    new_tokens = output[:, prompts["input_ids"].shape[1] :]
    texts: list[str] = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return texts


def load_tokenizer(model_id: str) -> Any:
    """``AutoTokenizer`` of ``model_id`` with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained("task.model", model_id, AutoTokenizer.from_pretrained)
    if tokenizer.eos_token_id is None:
        raise TaskError(f"task.model {model_id!r}: the tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------
# The common task body
# --------------------------------------------------------------------------------------------


class CausalLMTask(Task):
    """Body shared by the causal-LM reasoning tasks.

    Subclasses parse their options and load their data in :meth:`_load_data` (setting
    :attr:`train_examples`, :attr:`eval_examples` and :attr:`partition_labels`) and judge a
    generated answer in :meth:`_score`.

    Parameters
    ----------
    config : RunConfig
        Run configuration: ``task.model``, ``task.dataset``, columns, ``task.max_length``,
        ``task.num_eval_samples``, ``task.options`` and ``dtype``.

    Raises
    ------
    TaskError
        The model, tokenizer or data cannot be loaded, or an option is invalid.
    """

    default_model = "meta-llama/Llama-3.2-3B"
    default_max_new_tokens: int = 256
    task_type = "CAUSAL_LM"
    Options: ClassVar[type | None] = CausalLMOptions
    supports_quantization = True

    train_examples: list[Example]
    eval_examples: list[Example]

    def __init__(self, config: RunConfig) -> None:
        tc = config.task
        self.config = config
        self.model_id = tc.model or self.default_model
        self.max_length = int(tc.max_length)
        self.dtype = _DTYPES[config.dtype]
        extra: dict[str, OptionCheck] = {
            "max_new_tokens": positive_int,
            "prompt_template": choice(*PROMPT_TEMPLATES),
            **self._extra_options(),
        }
        self.split_options, self.options = parse_options(self.name, tc.options, extra)
        self.max_new_tokens = int(self.options.get("max_new_tokens", self.default_max_new_tokens))
        self.prompt_template = str(self.options.get("prompt_template", "alpaca"))
        self.tokenizer = load_tokenizer(self.model_id)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._load_data()
        if not self.train_examples or not self.eval_examples:
            raise TaskError(
                f"task {self.name!r}: empty data ({len(self.train_examples)} train, "
                f"{len(self.eval_examples)} eval examples)"
            )
        self.num_train = len(self.train_examples)
        self.target_modules = ["q_proj", "v_proj"]
        self.modules_to_save = None
        self.model = self.load_base_model()

    # -- subclass hooks ------------------------------------------------------------------

    def _extra_options(self) -> dict[str, OptionCheck]:
        """Task-specific ``task.options`` keys and their validators."""
        return {}

    @abstractmethod
    def _load_data(self) -> None:
        """Set :attr:`train_examples`, :attr:`eval_examples` and :attr:`partition_labels`."""

    @abstractmethod
    def _score(self, example: Example, generated: str) -> tuple[bool, bool]:
        """``(answer_found, correct)`` of a generated response to ``example``."""

    def _metrics(self, correct: Sequence[bool], found: Sequence[bool]) -> dict[str, float]:
        """Accuracy metrics from per-example outcomes (evaluation order)."""
        n = len(correct)
        return {"accuracy": sum(correct) / n, "answer_rate": sum(found) / n}

    # -- Task interface ------------------------------------------------------------------

    def encode(
        self,
        prompts: Sequence[str],
        targets: Sequence[str],
        references: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> list[Example]:
        """Tokenize with this task's tokenizer and ``task.max_length``."""
        return encode_examples(
            self.tokenizer,
            prompts,
            targets,
            self.max_length,
            references=references,
            groups=groups,
        )

    def load_base_model(self) -> nn.Module:
        """``AutoModelForCausalLM.from_pretrained(model_id)`` in the run's dtype, on the CPU;
        with ``task.quantization``, through transformers' ``BitsAndBytesConfig`` on the run's
        device (docs/quantization.md).
        """
        from transformers import AutoModelForCausalLM

        quantized = pretrained_kwargs(self.config)

        def build(model_dir: str) -> nn.Module:
            if quantized:
                return one_cpu_path(AutoModelForCausalLM.from_pretrained(model_dir, **quantized))
            model: nn.Module = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
            return model.to(device="cpu")

        return load_pretrained("task.model", self.model_id, build)

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """Right-padded training examples ``indices`` with answer-only labels."""
        return collate_training([self.train_examples[int(i)] for i in indices], self.pad_id)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The evaluation examples in order, teacher-forced (labels on the answers)."""
        for start in range(0, len(self.eval_examples), batch_size):
            yield collate_training(self.eval_examples[start : start + batch_size], self.pad_id)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean next-token cross-entropy over the answer tokens of the batch."""
        loss: Tensor = model(**batch).loss
        return loss

    def group_losses(self, model: nn.Module, batches: Sequence[Batch]) -> list[Tensor]:
        """Each batch's :meth:`loss` from one forward pass over their concatenation.

        Batches are right-padded to the group's longest (``attention_mask`` 0, labels ignored):
        with causal attention a real token never sees the padding after it, and the positions
        are those of the batch alone, so each batch's mean cross-entropy over its own answer
        tokens (next-token targets, as the model's loss shifts them) is its sequential loss.
        """
        pad = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        group, bounds = concat_batches(batches, pad)
        inputs = {k: v for k, v in group.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        targets = F.pad(group["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
        return [
            F.cross_entropy(
                logits[lo:hi].reshape(-1, logits.shape[-1]),
                targets[lo:hi].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            for lo, hi in bounds
        ]

    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device) -> dict[str, float]:
        """Exact-match ``accuracy`` of greedy generations, ``answer_rate`` and ``eval_loss``.

        Each batch costs one teacher-forced forward pass (``eval_loss``: mean cross-entropy per
        answer token over the whole split) and one batched ``generate`` call.
        """
        correct: list[bool] = []
        found: list[bool] = []
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.eval_examples), batch_size):
                examples = self.eval_examples[start : start + batch_size]
                batch = move_batch(collate_training(examples, self.pad_id), device)
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss_sum += float(model(**batch).loss.float()) * count
                tokens += count
                prompts = move_batch(collate_prompts(examples, self.pad_id), device)
                texts = generate_texts(model, prompts, self.tokenizer, self.max_new_tokens)
                for example, text in zip(examples, texts, strict=True):
                    ok_found, ok = self._score(example, text)
                    found.append(ok_found)
                    correct.append(ok)
        metrics = self._metrics(correct, found)
        metrics["eval_loss"] = loss_sum / max(tokens, 1)
        return metrics

    def describe(self) -> dict[str, Any]:
        """Task facts plus evaluation size, generation budget and prompt template."""
        facts = super().describe()
        facts.update(
            num_eval=len(self.eval_examples),
            max_length=self.max_length,
            max_new_tokens=self.max_new_tokens,
            prompt_template=self.prompt_template,
        )
        return facts
