"""The words step: a textual-gradient rewrite of the instruction a program runs with (spec step 3).

:class:`RefineInstruction` is the DSPy signature ``feedback, history -> refined_instruction``; it also
takes the current ``instruction`` (a rewrite needs its source) and first writes a ``diagnosis`` — the
"gradient": what the user means that the instruction misses — before the rewritten instruction.
:class:`InstructionRefiner` runs it with its own LM (``dspy.context``), so the refiner can be a strong
remote litellm model while the actor stays local, and it refuses unusable output: an empty, overlong or
format-leaking rewrite, or an LM error, keeps the previous instruction and records why.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import dspy

logger = logging.getLogger(__name__)

_FIELD_MARKER = re.compile(r"\[\[\s*##.*?##\s*\]\]")


class RefineInstruction(dspy.Signature):
    """You improve the instruction that an AI assistant follows, using a user's feedback on its answers.

    Work like a gradient step on text. First diagnose: from the feedback and the history of answers and
    rewards, say what the user actually wants (format, units, constraints, level of detail, the kind of
    reasoning) that the current instruction fails to state, and which mistakes keep recurring. Then
    rewrite the instruction so that an assistant following it would give the answer the user wants:
    keep what already works, state the missing requirements explicitly and concretely, and do not
    include the answer to any specific question. Return only the new instruction text."""

    instruction: str = dspy.InputField(desc="the instruction the assistant currently follows")
    feedback: str = dspy.InputField(desc="the user's latest feedback on the assistant's answer")
    history: str = dspy.InputField(desc="earlier turns: the assistant's answers, the user's feedback, rewards")
    diagnosis: str = dspy.OutputField(desc="what the user means that the instruction misses")
    refined_instruction: str = dspy.OutputField(desc="the rewritten instruction, plain text")


class InstructionRefiner(dspy.Module):
    """Runs :class:`RefineInstruction`; keeps the old instruction when the new one is unusable.

    Args:
        lm: the refiner's LM (any ``dspy.LM``: a litellm model string's LM or a ``LocalLM``). ``None``
            uses whatever LM is configured when it runs.
        max_chars: longest acceptable instruction.
    """

    def __init__(self, lm: dspy.BaseLM | None = None, max_chars: int = 2000) -> None:
        super().__init__()
        self.predict = dspy.Predict(RefineInstruction)
        self.refiner_lm = lm
        self.max_chars = max_chars

    def forward(self, instruction: str, feedback: str, history: str = "") -> dspy.Prediction:
        """Returns ``refined_instruction`` (the old one if rejected), ``accepted``, ``reason``, ``diagnosis``."""
        try:
            with dspy.context(**({"lm": self.refiner_lm} if self.refiner_lm is not None else {})):
                out = self.predict(instruction=instruction, feedback=feedback, history=history or "(none)")
            candidate, diagnosis = out.refined_instruction, out.get("diagnosis", "")
        except Exception as err:  # an unreachable remote LM or unparsable output must not end the chat
            logger.warning("Refiner failed (%s: %s); keeping the instruction.", type(err).__name__, err)
            return self._keep(instruction, f"refiner error: {type(err).__name__}: {err}")
        reason = self.rejection_reason(instruction, candidate)
        if reason:
            return self._keep(instruction, reason, diagnosis)
        return dspy.Prediction(refined_instruction=candidate.strip(), accepted=True, reason="", diagnosis=diagnosis)

    def rejection_reason(self, instruction: str, candidate: Any) -> str:
        """Why ``candidate`` is not a usable instruction ("" if it is)."""
        if not isinstance(candidate, str) or not candidate.strip():
            return "empty refined instruction"
        text = candidate.strip()
        if _FIELD_MARKER.search(text):
            return "refined instruction leaks DSPy field markers"
        if len(text) > self.max_chars:
            return f"refined instruction too long ({len(text)} > {self.max_chars} chars)"
        if text == instruction.strip():
            return "refined instruction unchanged"
        return ""

    @staticmethod
    def _keep(instruction: str, reason: str, diagnosis: str = "") -> dspy.Prediction:
        return dspy.Prediction(refined_instruction=instruction, accepted=False, reason=reason, diagnosis=diagnosis)
