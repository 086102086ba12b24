r"""Answer extraction and matching for the reasoning tasks (exact-match evaluation).

Mathematical reasoning (GSM8K, MetaMathQA):

* the *reference* is the text after the last ``####`` (GSM8K) or after the last
  ``The answer is:`` (MetaMathQA), or the whole answer when it has neither marker;
* the *prediction* is read from the generated text after the first ``####`` or
  ``The answer is`` marker (the first, because a model that does not stop may go on with a new
  question), else the last number in the text;
* numbers are compared exactly as fractions after normalisation: thousands separators, ``$``,
  ``%``, surrounding spaces and a trailing full stop are dropped, so ``"1,234"``, ``"$1234.00"``
  and ``"1234."`` all equal ``1234``; ``"3/4"`` equals ``"0.75"``; ``"-5"`` and ``"−5"`` are
  negative five. Non-numeric answers (MATH-style ``\frac``, tuples …) compare as normalised
  strings.

Commonsense reasoning (LLM-Adapters format): the first occurrence of one of the sub-task's answer
tokens in the generated response (``true``/``false`` for BoolQ, ``solution1``/``solution2`` for
PIQA, ``answer1``…``answer5`` for SIQA, ARC and OBQA, ``ending1``…``ending4`` for HellaSwag,
``option1``/``option2`` for WinoGrande), as in LLM-Adapters' ``commonsense_evaluate.py``
(matched case-insensitively and as whole words here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "COMMONSENSE_TASKS",
    "CommonsenseSubtask",
    "answers_match",
    "extract_choice",
    "extract_prediction",
    "extract_reference",
    "normalize_answer",
    "parse_number",
]

# A number as written in solutions: optional sign (ASCII or Unicode minus), optional $, digits
# with optional thousands separators, optional decimals, optional /denominator.
_NUMBER = re.compile(
    r"(?<![\w.])[-−]?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s?/\s?\d+)?(?![\w])"
)
_GSM8K_MARKER = re.compile(r"####")
_FORMULA = re.compile(r"[\\{}^()\[\]]")
_ANSWER_IS_MARKER = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written as in math solutions, or ``None``.

    Accepts an optional sign (``-`` or ``−``), ``$`` and ``%`` signs, thousands separators,
    decimals and simple fractions (``"3/4"``); surrounding whitespace and a trailing full stop are
    ignored.

    Parameters
    ----------
    text : str
        The candidate number, e.g. ``"$1,234.50"``.

    Returns
    -------
    Fraction | None
        The value, or ``None`` when ``text`` is not a single number.
    """
    cleaned = text.strip().rstrip(".").strip()
    cleaned = cleaned.replace("−", "-").replace("$", "").replace("%", "").replace(" ", "")
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", cleaned) or re.fullmatch(
        r"-?\.\d+", cleaned
    ):
        return Fraction(cleaned.replace(",", ""))
    match = re.fullmatch(r"(-?\d+)/(\d+)", cleaned)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2)))
    return None


def _canonical(value: Fraction) -> str:
    return (
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )


def normalize_answer(text: str) -> str:
    r"""A final answer in canonical form: a number as ``"p"`` or ``"p/q"``, else cleaned text.

    Examples: ``"$18.00"`` → ``"18"``, ``"1,234"`` → ``"1234"``, ``"0.5"`` → ``"1/2"``,
    ``" \frac{1}{2}. "`` → ``"\frac{1}{2}"`` (lower-cased, inner spaces removed).
    """
    value = parse_number(text)
    if value is not None:
        return _canonical(value)
    cleaned = text.strip().rstrip(".").strip().lower()
    cleaned = cleaned.replace("$", "")
    return re.sub(r"\s+", "", cleaned)


def _numbers(text: str) -> list[str]:
    found = []
    for match in _NUMBER.finditer(text):
        candidate = match.group(0)
        if any(ch.isdigit() for ch in candidate) and parse_number(candidate) is not None:
            found.append(candidate)
    return found


def _after_marker(text: str, *, last: bool) -> str | None:
    """The text after the first (or last) ``####`` / ``The answer is`` marker, or ``None``."""
    hits = [m for pattern in (_GSM8K_MARKER, _ANSWER_IS_MARKER) for m in pattern.finditer(text)]
    if not hits:
        return None
    chosen = max(hits, key=lambda m: m.end()) if last else min(hits, key=lambda m: m.start())
    return text[chosen.end() :]


def _first_line_answer(segment: str) -> str | None:
    r"""The answer right after a marker.

    The marker's line when it is one number; the line as text when it looks like a formula
    (``\frac{1}{2}``, ``(2, 3)``, ``x^2``); else its first number, else the line as text.
    """
    line = segment.strip().split("\n", 1)[0].strip()
    if not line:
        return None
    if parse_number(line) is not None or _FORMULA.search(line):
        return normalize_answer(line)
    numbers = _numbers(line)
    return normalize_answer(numbers[0]) if numbers else normalize_answer(line)


def extract_reference(answer: str) -> str | None:
    """The normalised final answer of a reference solution.

    GSM8K: ``"… #### 1,234"`` → ``"1234"``; MetaMathQA: ``"… The answer is: 42"`` → ``"42"``; a
    bare answer (``"$18.00"``) → ``"18"``. ``None`` when nothing is left.
    """
    segment = _after_marker(answer, last=True)
    if segment is None:
        stripped = answer.strip()
        if not stripped:
            return None
        value = parse_number(stripped)
        if value is not None:
            return _canonical(value)
        numbers = _numbers(stripped)
        return normalize_answer(numbers[-1]) if numbers else normalize_answer(stripped)
    return _first_line_answer(segment)


def extract_prediction(generated: str) -> str | None:
    """The normalised final answer of a generated solution, or ``None`` when there is none.

    The answer after the first ``####`` or ``The answer is`` marker; without a marker, the last
    number in the text.
    """
    segment = _after_marker(generated, last=False)
    if segment is not None:
        found = _first_line_answer(segment)
        if found is not None:
            return found
    numbers = _numbers(generated)
    return normalize_answer(numbers[-1]) if numbers else None


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two normalised answers (numbers compared by value)."""
    if prediction is None or reference is None:
        return False
    a, b = parse_number(prediction), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalize_answer(prediction) == normalize_answer(reference)


# --------------------------------------------------------------------------------------------
# Commonsense (LLM-Adapters)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommonsenseSubtask:
    """One of the eight commonsense test sets.

    Attributes
    ----------
    key : str
        Name used in metrics (``accuracy/<key>``) and as the evaluation file's stem.
    aliases : tuple[str, ...]
        Other accepted file/folder names (LLM-Adapters' ``dataset/<name>/test.json``).
    choices : tuple[str, ...]
        The answer tokens the model has to produce.
    """

    key: str
    aliases: tuple[str, ...]
    choices: tuple[str, ...]

    @property
    def pattern(self) -> re.Pattern[str]:
        """Regex finding any of :attr:`choices` as a whole word, case-insensitively."""
        return re.compile(
            r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, self.choices)) + r")(?![A-Za-z0-9_])",
            re.IGNORECASE,
        )


_ANSWERS_5 = tuple(f"answer{i}" for i in range(1, 6))

COMMONSENSE_TASKS: dict[str, CommonsenseSubtask] = {
    t.key: t
    for t in (
        CommonsenseSubtask("boolq", ("BoolQ",), ("true", "false")),
        CommonsenseSubtask("piqa", ("PIQA",), ("solution1", "solution2")),
        CommonsenseSubtask("siqa", ("social_i_qa", "SIQA", "social_iqa"), _ANSWERS_5),
        CommonsenseSubtask("hellaswag", ("HellaSwag",), tuple(f"ending{i}" for i in range(1, 5))),
        CommonsenseSubtask("winogrande", ("WinoGrande",), ("option1", "option2")),
        CommonsenseSubtask("arc_e", ("ARC-Easy", "arc-e", "arc_easy"), _ANSWERS_5),
        CommonsenseSubtask("arc_c", ("ARC-Challenge", "arc-c", "arc_challenge"), _ANSWERS_5),
        CommonsenseSubtask("obqa", ("openbookqa", "OBQA", "OpenBookQA"), _ANSWERS_5),
    )
}
"""The eight test sets of LLM-Adapters / Commonsense15K, in the paper's table order."""


def extract_choice(subtask: CommonsenseSubtask | str, response: str) -> str | None:
    """The first answer token of ``subtask`` in a generated response (lower-cased), or ``None``.

    Parameters
    ----------
    subtask : CommonsenseSubtask | str
        The test set (or its key, e.g. ``"boolq"``).
    response : str
        The generated text after the prompt.

    Examples
    --------
    >>> extract_choice("boolq", "the correct answer is true")
    'true'
    >>> extract_choice("piqa", "I think solution3") is None
    True
    """
    task = COMMONSENSE_TASKS[subtask] if isinstance(subtask, str) else subtask
    match = task.pattern.search(response)
    return match.group(1).lower() if match else None
