"""Rule-based feedback for math answers: extract the final answer, check it against the gold with math_verify.

Small models rarely answer with the bare number ("The answer to this question is 7 + 5 = 12."), so the
final answer is extracted first (:func:`extract_answer`), then compared symbolically, so that
``\\frac{1}{2}`` equals ``0.5`` and ``2\\sqrt{2}`` equals ``\\sqrt{8}``.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import dspy

from rosa2_dspy.feedback._common import field_text

# One "atom" of a LaTeX-ish expression: a number, a command with its brace groups (\frac{1}{2}, \sqrt{8},
# \pi), a brace group, or a parenthesised group of those; atoms may be joined by operators (2\sqrt{2}, 3/4, 9\pi).
_ATOM = (r"(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+|\\[a-zA-Z]+(?:\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})*|\{[^{}]*\}|"
         r"\((?:[\d\s,.+\-*/^{}]|\\[a-zA-Z]+)*\))")
_EXPR = re.compile(rf"-?{_ATOM}(?:\s*[-+*/^_]?\s*{_ATOM})*")
_MATH_DELIMS = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_MARKER = re.compile(r"\banswer\b[^.\n]{0,40}?(?:\bis\b|:|=)", re.I)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip() or None
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer in a possibly verbose reply, or None if there is none.

    Rule, first match wins:
      1. the content of the last ``\\boxed{...}``;
      2. otherwise, if the reply says "answer is" / "Answer:", only the first sentence after the last such
         marker is searched, else the whole reply;
      3. in that span, the last math-delimited segment (``$...$``, ``\\(...\\)``, ``\\[...\\]``), or else
         the last number or LaTeX-ish expression (``12``, ``-3.5``, ``\\frac{3}{4}``, ``2\\sqrt{2}``, ``3/4``);
         an equation keeps its right-hand side ("7 + 5 = 12" -> "12"), and thousands commas are dropped.
    """
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    markers = list(_MARKER.finditer(text))
    span = text
    if markers:
        span = text[markers[-1].end():]
        end = _SENTENCE_END.search(span)
        span = span[: end.start()] if end and span[: end.start()].strip() else span
    delimited = [next(g for g in m.groups() if g is not None) for m in _MATH_DELIMS.finditer(span)]
    candidates = [delimited[-1].split("=")[-1]] if delimited else [m.group(0) for m in _EXPR.finditer(span)]
    if not candidates:
        return None
    answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", candidates[-1]).strip()
    return answer or None


def to_number(text: str | None) -> float | None:
    """A plain number in ``text`` (e.g. "1,000", "-2.5"), or None if it is not one."""
    if text is None:
        return None
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.strip().strip("$").rstrip("."))
    try:
        return float(cleaned)
    except ValueError:
        return None


def _normalise(expr: str) -> str:
    expr = re.sub(r"\\[dt]frac", r"\\frac", expr)
    expr = re.sub(r"\\left|\\right|\\!|\\,|\s|\$", "", expr)
    return expr.rstrip(".")


def answers_match(gold: str, answer: str) -> bool:
    """Are two final answers equivalent? math_verify first; numbers, then normalised strings, as fallback."""
    try:
        from math_verify import parse, verify

        # math_verify times out with signal.alarm, which only works in the main thread; elsewhere (dspy's
        # thread pools) run without its timeout: the inputs here are short extracted answers.
        limit = 5 if threading.current_thread() is threading.main_thread() else None
        parsed_gold = parse(f"${gold}$", parsing_timeout=limit)
        parsed_answer = parse(f"${answer}$", parsing_timeout=limit)
        if parsed_gold and parsed_answer:
            return bool(verify(parsed_gold, parsed_answer, timeout_seconds=limit))
    except Exception:  # noqa: BLE001 - any math_verify failure falls back to the plain comparison below
        pass
    a, b = to_number(gold), to_number(answer)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(a))
    return _normalise(gold) == _normalise(answer)


def _restates(answer: str, question: str, gold: str) -> bool:
    """Is ``answer`` an expression (not a plain number) copied from ``question``, other than the gold itself?"""
    expression = _normalise(answer)
    return (to_number(answer) is None and expression != _normalise(gold)
            and expression in _normalise(question))


class MathVerifier:
    """Feedback source for math: score 1 if the final answer equals the gold, else 0, with a reason.

    The feedback never states the gold answer; wrap it in a SimulatedUser to hint at or reveal it. An
    expression copied from the question ("What is 9 - 4?" answered with "9 - 4") is no answer, although
    it is symbolically equal to the gold: it scores 0.
    """

    def __init__(self, answer_field: str = "answer", gold_field: str = "answer",
                 question_field: str = "question") -> None:
        self.answer_field, self.gold_field, self.question_field = answer_field, gold_field, question_field

    def __call__(self, example: Any, prediction: Any, trace: Any = None,
                 history: list[Any] | None = None) -> dspy.Prediction:
        gold = field_text(example, self.gold_field)
        if gold is None:
            raise ValueError(f"MathVerifier needs the gold answer in the example's '{self.gold_field}' field; "
                             "set gold_field= to the field that holds it.")
        answer = extract_answer(field_text(prediction, self.answer_field))
        if answer is None:
            return dspy.Prediction(score=0.0, solved=False,
                                   feedback="I could not find a final answer; end with the final answer only.")
        gold = extract_answer(gold) or gold
        question = field_text(example, self.question_field)
        if question and _restates(answer, question, gold):
            return dspy.Prediction(score=0.0, solved=False,
                                   feedback=f"You restated {answer} from the question instead of working it out; "
                                            "end with the value.")
        if answers_match(gold, answer):
            return dspy.Prediction(score=1.0, solved=True, feedback=f"Your final answer {answer} is correct.")
        return dspy.Prediction(score=0.0, solved=False, feedback=f"Your final answer {answer} is incorrect.")
