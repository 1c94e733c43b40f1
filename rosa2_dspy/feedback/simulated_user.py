"""A simulated user: turns a verifier's verdict into the feedback a person would give, hinting before telling.

How much the user gives away is the experiment's knob: ``reveal="none"`` (only "wrong" and why),
``"hint"`` (also a hint, and the hidden intent of an underspecified task), ``"answer"`` (also the gold,
which is returned as ``reference`` so the weights step can use it as a high-reward response).
"""

from __future__ import annotations

from typing import Any, Literal

import dspy

from rosa2_dspy.feedback import FeedbackFn, call_feedback
from rosa2_dspy.feedback._common import field_text
from rosa2_dspy.feedback.math import extract_answer, to_number

Reveal = Literal["none", "hint", "answer"]
REVEALS = ("none", "hint", "answer")


def numeric_hint(gold: str, answer: str | None) -> str | None:
    """A hint that narrows a numeric gold without stating it: larger/smaller, or its number of digits."""
    target = to_number(extract_answer(gold))
    if target is None:
        return None
    guess = to_number(extract_answer(answer))
    if guess is not None and guess != target:
        return f"The correct answer is {'larger' if target > guess else 'smaller'} than {extract_answer(answer)}."
    if target == int(target):
        digits = len(str(abs(int(target))))
        sign = "a negative" if target < 0 else "a"
        return f"The correct answer is {sign} whole number with {digits} digit{'s' * (digits > 1)}."
    return "The correct answer is not a whole number."


class SimulatedUser:
    """Wraps any feedback source; phrases its verdict as a user would, revealing more as turns go by.

    ``reveal`` sets how much a wrong answer's feedback gives away. With ``reveal_after=k`` (and reveal
    "hint" or "answer") the user hints on turns before ``k`` and reveals the answer from turn ``k`` on,
    where the turn is ``len(history)``; ``reveal="none"`` never gives anything away.
    """

    def __init__(self, verifier: FeedbackFn, reveal: Reveal = "hint", reveal_after: int | None = None,
                 answer_field: str = "answer", gold_field: str = "answer", hint_field: str = "hint",
                 intent_field: str = "intent") -> None:
        if reveal not in REVEALS:
            raise ValueError(f"reveal must be one of {REVEALS}, got {reveal!r}.")
        if reveal_after is not None and reveal_after < 0:
            raise ValueError(f"reveal_after must be a turn index >= 0 or None, got {reveal_after}.")
        self.verifier, self.reveal, self.reveal_after = verifier, reveal, reveal_after
        self.answer_field, self.gold_field = answer_field, gold_field
        self.hint_field, self.intent_field = hint_field, intent_field

    def level(self, turn: int) -> Reveal:
        """How much to give away at ``turn`` (0-based)."""
        if self.reveal == "none" or self.reveal_after is None:
            return self.reveal
        return "answer" if turn >= self.reveal_after else "hint"

    def __call__(self, example: Any, prediction: Any, trace: Any = None,
                 history: list[Any] | None = None) -> dspy.Prediction:
        verdict = call_feedback(self.verifier, example, prediction, trace, history=history)
        if verdict.solved:
            return dspy.Prediction(score=verdict.score, solved=True, reference=verdict.reference,
                                   feedback=verdict.feedback or "That's right, thanks!")
        level = self.level(len(history) if history else 0)
        gold = field_text(example, self.gold_field)
        parts = ["Not quite." if verdict.score > 0 else "No, that's not right.", verdict.feedback]
        if level != "none":
            intent = field_text(example, self.intent_field)
            if intent:
                parts.append(f"What I meant: {intent.rstrip('.')}.")
        if level == "hint" or (level == "answer" and gold is None):
            hint = field_text(example, self.hint_field)
            if hint is None and gold is not None:
                hint = numeric_hint(gold, field_text(prediction, self.answer_field))
            parts.append(f"Hint: {hint}" if hint else "Check your work step by step.")
        reference = verdict.reference
        if level == "answer" and gold is not None:
            multiline = "\n" in gold
            parts.append(f"Here is a correct solution:\n{gold}" if multiline else f"The correct answer is {gold}.")
            reference = {self.answer_field: gold}
        text = " ".join(p.strip() for p in parts if p and p.strip())
        return dspy.Prediction(score=verdict.score, solved=False, feedback=text, reference=reference)
