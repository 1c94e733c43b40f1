"""Generated intent tasks: underspecified questions with a computable value and a hidden preference on its form.

A task is a question whose value the code computes ("How many minutes are in 3 hours?" -> 180) crossed
with an **intent kind**: how the user wants the answer written, which the question does not say. Each
kind has

* a hidden preference, stated in plain words (``intent``: what the ``hint`` protocol tells and what the
  oracle instruction writes in, see :func:`programs.tasks.oracle_text`);
* a gold answer in that form (``answer``: what the ``answer`` protocol reveals);
* a checker that scores the **format** and the **value** separately (:func:`check`): ``format_ok`` (the
  answer has the wanted form, whatever its number), ``value_ok`` (the last number the answer states is the
  right one: shown work counts, a list of guesses ending elsewhere does not), ``solved`` = both.

Kinds (:data:`KINDS`): some a small model can follow once told plainly (``prefix``, ``parens``, ``bare``,
``unit``, ``caps``), some hard (``words``, ``decimals``, ``bold``).

Splits: each question belongs to ``dev`` or ``test`` by a hash of its text (never by the seed), so the
splits are disjoint for every seed. Tuning and the generator's own tests use ``dev``; reported runs use
``test``. The seed picks which questions of the split a run gets and which kind each is paired with.

Example:
    >>> rows = generate("dev", per_kind=2, seed=0)
    >>> len(rows) == 2 * len(KINDS) and {r["split"] for r in rows} == {"dev"}
    True
    >>> check("parens", "(180)", 180, "How many minutes are in 3 hours?")
    (True, True)
    >>> check("parens", "180 minutes", 180, "How many minutes are in 3 hours?")
    (False, True)
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy

from rosa2_dspy.feedback._common import field_text

SPLITS = ("dev", "test")
EXAMPLE_NUMBER = 5  # the number the hint's format example uses; no question uses it and no value equals it


# ------------------------------------------------------------------------------------------- numbers in words

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_WORD_VALUES = {w: i for i, w in enumerate(_ONES)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
_NUMBER_WORD = re.compile(r"\b(?:" + "|".join(sorted([*_WORD_VALUES, *_SCALES], key=len, reverse=True)) + r")\b",
                          re.IGNORECASE)
_WORD_RUN = re.compile(r"\b(?:{w})(?:(?:\s+|\s*-\s*|\s+and\s+)(?:{w}))*\b".format(
    w="|".join(sorted([*_WORD_VALUES, *_SCALES], key=len, reverse=True))), re.IGNORECASE)
_DIGITS = re.compile(r"(?<![\d.,])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![\d.,])-?\d+(?:\.\d+)?(?![\d])")


def number_to_words(n: int) -> str:
    """``120`` -> ``"one hundred twenty"`` (0 to 999,999,999)."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    for scale, size in (("million", 1_000_000), ("thousand", 1000), ("hundred", 100)):
        if n >= size:
            rest = n % size
            return f"{number_to_words(n // size)} {scale}" + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def words_to_number(text: str) -> int | None:
    """``"one hundred and twenty"`` -> ``120``; None for text that is not one run of number words."""
    tokens = [t for t in re.split(r"[\s-]+", text.lower().strip()) if t and t != "and"]
    if not tokens:
        return None
    total, current = 0, 0
    for token in tokens:
        if token in _WORD_VALUES:
            current += _WORD_VALUES[token]
        elif token == "hundred":
            current = (current or 1) * 100
        elif token in _SCALES:
            total += (current or 1) * _SCALES[token]
            current = 0
        else:
            return None
    return total + current


def numbers_in(text: str) -> list[float]:
    """Every number ``text`` states, in digits (``1,500``, ``120.00``) or in English words (``twelve``), in
    the order they appear."""
    found = [(m.start(), float(m.group().replace(",", ""))) for m in _DIGITS.finditer(text)]
    for run in _WORD_RUN.finditer(text):
        value = words_to_number(run.group())
        if value is not None:
            found.append((run.start(), float(value)))
    return [value for _, value in sorted(found)]


# ------------------------------------------------------------------------------------------------ the kinds

@dataclass(frozen=True)
class Kind:
    """An intent kind: the hidden preference in plain words, how to write a value that way, and the format check."""

    name: str
    intent: str  # "{unit}" is the question's unit
    render: Callable[[int, str], str]
    format_ok: Callable[[str, str], bool]  # (answer, unit) -> has the wanted form
    plain: bool  # expected to be followable by a small model once stated plainly (a guess the oracle row tests)


def _unit_pattern(unit: str) -> str:
    singular = unit[:-1] if unit.endswith("s") else unit
    return rf"(?:{re.escape(unit)}|{re.escape(singular)})"


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("prefix", "the answer to start with the phrase \"Answer:\"", lambda v, u: f"Answer: {v}",
         lambda a, u: a.strip().lower().startswith("answer:"), True),
    Kind("parens", "the answer wrapped in parentheses, with nothing outside them", lambda v, u: f"({v})",
         lambda a, u: bool(re.fullmatch(r"\(.*\)", a.strip(), re.DOTALL)), True),
    Kind("bare", "the number only, in digits, with no words at all", lambda v, u: str(v),
         lambda a, u: bool(re.fullmatch(r"-?\d[\d,]*(?:\.\d+)?", a.strip())), True),
    Kind("unit", "the number in digits followed by the word {unit}", lambda v, u: f"{v} {u}",
         lambda a, u: bool(re.search(rf"\d\s*{_unit_pattern(u)}\b", a, re.IGNORECASE)), True),
    Kind("caps", "the answer in capital letters only, the number followed by the unit",
         lambda v, u: f"{v} {u.upper()}",
         lambda a, u: sum(c.isalpha() for c in a) >= 2 and not any(c.islower() for c in a), True),
    Kind("words", "the number written out in English words, with no digits",
         lambda v, u: number_to_words(v),
         lambda a, u: not re.search(r"\d", a) and bool(_NUMBER_WORD.search(a)), False),
    Kind("decimals", "the number written with exactly two decimal places", lambda v, u: f"{v}.00",
         lambda a, u: bool(re.search(r"\d\.\d{2}(?!\d)", a)), False),
    Kind("bold", "the number in bold markdown, between double asterisks", lambda v, u: f"**{v}**",
         lambda a, u: bool(re.search(r"\*\*[^*\n]+\*\*", a)), False),
]}


def value_ok(answer: str, value: float, question: str = "") -> bool:
    """The answer's last stated number is ``value`` (shown work such as "19 * 100 = 1900" counts; a list of
    guesses ending in another number does not). ``question`` is kept for callers that pass it."""
    stated = numbers_in(answer)
    return bool(stated) and stated[-1] == float(value)


def check(kind: str, answer: str | None, value: float, question: str, unit: str = "") -> tuple[bool, bool]:
    """``(format_ok, value_ok)`` of ``answer`` for an intent ``kind``; both False for no answer."""
    if not answer or not answer.strip():
        return False, False
    return bool(KINDS[kind].format_ok(answer, unit)), value_ok(answer, value, question)


# --------------------------------------------------------------------------------------------- the questions

# (question, unit, fact given as a hint, factor): value = x * factor
_CONVERSIONS = [
    ("How many minutes are in {x} hours?", "minutes", "An hour has 60 minutes.", 60),
    ("How many seconds are in {x} minutes?", "seconds", "A minute has 60 seconds.", 60),
    ("How many hours are in {x} days?", "hours", "A day has 24 hours.", 24),
    ("How many days are in {x} weeks?", "days", "A week has 7 days.", 7),
    ("How many months are in {x} years?", "months", "A year has 12 months.", 12),
    ("How many grams are in {x} kilograms?", "grams", "A kilogram is 1000 grams.", 1000),
    ("How many centimeters are in {x} meters?", "centimeters", "A meter is 100 centimeters.", 100),
    ("How many meters are in {x} kilometers?", "meters", "A kilometer is 1000 meters.", 1000),
    ("How many milliliters are in {x} liters?", "milliliters", "A liter is 1000 milliliters.", 1000),
    ("How many inches are in {x} feet?", "inches", "A foot is 12 inches.", 12),
    ("How many eggs are in {x} dozen?", "eggs", "A dozen is 12.", 12),
    ("How many legs do {x} spiders have?", "legs", "A spider has 8 legs.", 8),
    ("How many wheels do {x} cars have?", "wheels", "A car has 4 wheels.", 4),
    ("How many legs do {x} dogs have?", "legs", "A dog has 4 legs.", 4),
]
_XS = [x for x in range(2, 31) if x != EXAMPLE_NUMBER]


def split_of(question: str) -> str:
    """``dev`` or ``test``, from a hash of the question's text alone (so no seed can move a question)."""
    return SPLITS[hashlib.sha256(question.encode()).digest()[0] % 2]


def questions(split: str) -> list[dict[str, Any]]:
    """Every question of a split, in a fixed order: ``question``, ``value``, ``unit``, ``fact``, ``template``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS} (tune on dev, report on test).")
    pool = []
    for template, (text, unit, fact, factor) in enumerate(_CONVERSIONS):
        for x in _XS:
            question = text.format(x=x)
            if split_of(question) == split:
                pool.append({"question": question, "value": x * factor, "unit": unit, "fact": fact,
                             "template": template})
    return pool


def make_task(question: dict[str, Any], kind: str, split: str, index: int) -> dict[str, Any]:
    """One task row: the question with a hidden intent ``kind``, its gold answer, intent, hint and example."""
    spec = KINDS[kind]
    unit = question["unit"]
    example = spec.render(EXAMPLE_NUMBER, unit)
    return {
        "id": f"{split}-{kind}-{index:03d}", "split": split, "kind": kind,
        "question": question["question"], "value": question["value"], "unit": unit,
        "answer": spec.render(question["value"], unit), "intent": spec.intent.format(unit=unit),
        "hint": f"{question['fact']} Written the way I want, {EXAMPLE_NUMBER} would be: {example}",
        "example": example, "template": question["template"],
    }


def generate(split: str = "test", per_kind: int = 12, seed: int = 0,
             kinds: list[str] | tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """``per_kind`` tasks for each kind (``len(KINDS) * 12 = 96`` by default), each on a distinct question of
    ``split``; rows grouped by kind in :data:`KINDS` order. Same arguments, same rows."""
    kinds = list(kinds or KINDS)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"Unknown intent kinds {sorted(unknown)}; choose from {list(KINDS)}.")
    pool = questions(split)
    if per_kind * len(kinds) > len(pool):
        raise ValueError(f"The {split} split has {len(pool)} questions; {per_kind} per kind for {len(kinds)} "
                         f"kinds needs {per_kind * len(kinds)}. Lower per_kind.")
    random.Random(f"intentgen-{seed}").shuffle(pool)
    return [make_task(pool[j * len(kinds) + k], kind, split, j)
            for k, kind in enumerate(kinds) for j in range(per_kind)]


def users(split: str = "test", per_kind: int = 1, new_questions: int = 4, seed: int = 0,
          kinds: list[str] | tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Simulated users for the carry-over protocol: each has one hidden intent kind, a first question and
    ``new_questions`` more (same kind, other questions, every value different from the others)."""
    kinds = list(kinds or KINDS)
    pool = questions(split)
    random.Random(f"intentgen-users-{seed}").shuffle(pool)
    out, used = [], 0
    for u in range(per_kind):
        for kind in kinds:
            chosen: list[dict[str, Any]] = []
            while len(chosen) < new_questions + 1:
                if used >= len(pool):
                    raise ValueError(f"The {split} split has too few questions for {per_kind * len(kinds)} users "
                                     f"with {new_questions} new questions each; ask for fewer.")
                candidate = pool[used]
                used += 1
                if all(candidate["value"] != c["value"] for c in chosen):
                    chosen.append(candidate)
            tasks = [make_task(q, kind, split, i) for i, q in enumerate(chosen)]
            out.append({"user": f"{split}-{kind}-{u}", "kind": kind, "first": tasks[0], "new": tasks[1:]})
    return out


# ---------------------------------------------------------------------------------------------- the verifier

class FormatValueVerifier:
    """A DSPy metric for generated intent tasks: ``format_ok`` and ``value_ok`` scored separately.

    ``score`` is the share of the two that hold (``solved`` = both). The feedback says which is wrong
    without saying the hidden intent or the value (the simulated user adds those per protocol).

    Example:
        >>> task = dspy.Example(**generate("dev", per_kind=1)[0]).with_inputs("question")
        >>> FormatValueVerifier()(task, dspy.Prediction(answer=task.answer)).solved
        True
    """

    def __init__(self, answer_field: str = "answer") -> None:
        self.answer_field = answer_field

    def __call__(self, example: Any, prediction: Any, trace: Any = None,
                 history: list[Any] | None = None) -> dspy.Prediction:
        for name in ("kind", "value", "question"):
            if example.get(name) is None:
                raise ValueError(f"FormatValueVerifier needs the example's '{name}' field (rows of "
                                 "programs.intentgen.generate have it).")
        answer = field_text(prediction, self.answer_field)
        fmt, val = check(example.kind, answer, example.value, example.question, example.get("unit") or "")
        score = (fmt + val) / 2
        if answer is None:
            text = "I got no answer; please answer the question."
        elif fmt and val:
            text = "That is what I meant, thanks."
        elif val:
            text = "The number is right, but it is not written the way I want it."
        elif fmt:
            text = "That is written the way I want, but the number is wrong."
        else:
            text = "The number is wrong, and it is not written the way I want it."
        return dspy.Prediction(score=score, solved=fmt and val, feedback=text, format_ok=fmt, value_ok=val)
