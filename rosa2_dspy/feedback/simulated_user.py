"""A simulated user: turns a verifier's verdict into the feedback a person would give, hinting before telling.

How much the user gives away is the experiment's knob: ``reveal="none"`` (only "wrong" and why),
``"hint"`` (also a hint, and the hidden intent of an underspecified task), ``"answer"`` (also the gold,
which is returned as ``reference`` so the weights step can use it as a high-reward response).

Experiments name what the user gives away as a **feedback protocol** (:data:`PROTOCOLS`), each one a
setting of these same reveal options (:func:`protocol_settings`; :attr:`SimulatedUser.protocol` names a
user's settings back):

* ``none``: only "wrong" and the verifier's message (``reveal="none"``);
* ``hint``: also a hint, and the hidden intent of an underspecified task; never the answer
  (``reveal="hint"``, no ``reveal_after``);
* ``answer``: also the reference answer from turn ``reveal_after`` on (a hint before; ``reveal="hint"``
  with ``reveal_after``, 1 by default), which the weights step may use. A win under this protocol shows
  that the model can *learn a revealed answer*, not that it corrects itself from feedback.
"""

from __future__ import annotations

from typing import Any, Literal

import dspy

from rosa2_dspy.feedback import FeedbackFn, call_feedback
from rosa2_dspy.feedback._common import field_text
from rosa2_dspy.feedback.math import extract_answer, to_number

Reveal = Literal["none", "hint", "answer"]
REVEALS = ("none", "hint", "answer")
# How the ``answer`` protocol reveals a one-line reference (the last sentence of its feedback) and a
# multi-line one (a solution: the rest of its feedback).
REVEAL = "The correct answer is {}."
SOLUTION = "Here is a correct solution:\n{}"

Protocol = Literal["none", "hint", "answer"]
PROTOCOLS: dict[str, str] = {
    "none": "no reveal: only \"wrong\" and the verifier's message",
    "hint": "hints and the hidden intent, never the answer",
    "answer": "learning a revealed answer",
}


def protocol_settings(protocol: str, reveal_after: int | None = 1) -> dict[str, Any]:
    """The :class:`SimulatedUser` reveal options of a named protocol (``reveal_after`` counts for
    ``answer`` only: the turn from which the answer is told; 0 tells it with the first feedback)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown feedback protocol {protocol!r}; choose one of {tuple(PROTOCOLS)}.")
    if protocol == "answer":
        return {"reveal": "hint", "reveal_after": 1 if reveal_after is None else reveal_after}
    return {"reveal": protocol, "reveal_after": None}


def protocol_of(reveal: str, reveal_after: int | None) -> Protocol:
    """The protocol that reveal options amount to (``reveal="hint"`` with ``reveal_after`` is ``answer``)."""
    if reveal not in REVEALS:
        raise ValueError(f"reveal must be one of {REVEALS}, got {reveal!r}.")
    if reveal == "hint" and reveal_after is not None:
        return "answer"
    return reveal  # type: ignore[return-value]


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

    @classmethod
    def for_protocol(cls, verifier: FeedbackFn, protocol: str, reveal_after: int | None = 1,
                     **fields: str) -> SimulatedUser:
        """A user following a named protocol (see :data:`PROTOCOLS`); ``fields`` as in the constructor."""
        return cls(verifier, **protocol_settings(protocol, reveal_after), **fields)

    @property
    def protocol(self) -> Protocol:
        """The named protocol this user's reveal options amount to."""
        return protocol_of(self.reveal, self.reveal_after)

    def level(self, turn: int) -> Reveal:
        """How much to give away at ``turn`` (0-based)."""
        if self.reveal == "none" or self.reveal_after is None:
            return self.reveal
        return "answer" if turn >= self.reveal_after else "hint"

    def reference_for(self, example: Any) -> dict[str, str] | None:
        """The task's accepted answer as output-field values (``{answer_field: gold}``), what the ``answer``
        protocol reveals; None when the example has no gold."""
        gold = field_text(example, self.gold_field)
        return None if gold is None else {self.answer_field: gold}

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
            if hint is None and gold is not None and "\n" not in gold:  # a multi-line gold is a solution, not a number
                hint = numeric_hint(gold, field_text(prediction, self.answer_field))
            parts.append(f"Hint: {hint}" if hint else "Check your work step by step.")
        reference = verdict.reference
        if level == "answer" and gold is not None:
            multiline = "\n" in gold
            parts.append((SOLUTION if multiline else REVEAL).format(gold))
            reference = self.reference_for(example)
        text = " ".join(p.strip() for p in parts if p and p.strip())
        return dspy.Prediction(score=verdict.score, solved=False, feedback=text, reference=reference)
