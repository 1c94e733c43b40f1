"""Feedback for underspecified tasks: the answer must fit what the user meant (format, units, constraints)."""

from __future__ import annotations

import re
from typing import Any

import dspy

from rosa2_dspy.feedback._common import field_text


class IntentVerifier:
    """Score 1 if the answer matches the example's ``accept`` regex (searched, case-insensitive), else 0.

    The feedback says only that the answer misses what was meant; the hidden intent is the user's to tell
    (see SimulatedUser), so that the words step has to earn it from the conversation.
    """

    def __init__(self, answer_field: str = "answer", accept_field: str = "accept") -> None:
        self.answer_field, self.accept_field = answer_field, accept_field

    def __call__(self, example: Any, prediction: Any, trace: Any = None,
                 history: list[Any] | None = None) -> dspy.Prediction:
        pattern = field_text(example, self.accept_field)
        if pattern is None:
            raise ValueError(f"IntentVerifier needs a regex of accepted answers in the example's "
                             f"'{self.accept_field}' field; set accept_field= to the field that holds it.")
        answer = field_text(prediction, self.answer_field)
        if answer is None:
            return dspy.Prediction(score=0.0, solved=False, feedback="I got no answer; please answer the question.")
        if re.search(pattern, answer, re.IGNORECASE):
            return dspy.Prediction(score=1.0, solved=True, feedback="That is what I meant, thanks.")
        shown = answer if len(answer) <= 80 else answer[:77] + "..."
        return dspy.Prediction(score=0.0, solved=False,
                               feedback=f"Your answer \"{shown}\" is not what I meant.")
