"""The words step: a textual-gradient rewrite of the instruction a program runs with (spec step 3).

:class:`RefineInstruction` is the DSPy signature ``feedback, history -> refined_instruction``; it also
takes the current ``instruction`` (a rewrite needs its source) and first writes a ``diagnosis`` — the
"gradient": what the user means that the instruction misses — before the rewritten instruction.
:class:`InstructionRefiner` runs it with its own LM (``dspy.context``), so the refiner can be a strong
remote litellm model while the actor stays local, and it refuses unusable output: an empty, overlong,
format-leaking, non-prose, self-repeating or conversation-echoing rewrite, or an LM error, keeps the
previous instruction and records why.

A very small refiner (the embedded 135M model) rarely writes a usable instruction. For such set-ups
``fallback="append"`` turns a rejected rewrite into the simplest textual step there is: the feedback
itself is appended to the instruction as a requirement. The record says which of the two happened.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import dspy

logger = logging.getLogger(__name__)

# DSPy field markers, also half-remembered ones ("[## x ##]"), and the refiner prompt's own placeholders.
_FORMAT_LEAK = re.compile(r"\[+\s*##|\{(instruction|feedback|history|diagnosis|refined_instruction)\}")


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
        fallback: what a rejected rewrite turns into: ``"keep"`` the instruction (default), or
            ``"append"`` the feedback to it as a requirement.
    """

    def __init__(self, lm: dspy.BaseLM | None = None, max_chars: int = 2000,
                 fallback: Literal["keep", "append"] = "keep") -> None:
        super().__init__()
        if fallback not in ("keep", "append"):
            raise ValueError(f"fallback must be 'keep' or 'append', got {fallback!r}.")
        self.predict = dspy.Predict(RefineInstruction)
        self.refiner_lm = lm
        self.max_chars = max_chars
        self.fallback = fallback

    def forward(self, instruction: str, feedback: str, history: str = "") -> dspy.Prediction:
        """Returns ``refined_instruction``, ``accepted`` (did the instruction change), ``reason`` (why the LM's
        rewrite was not used, "" if it was), ``diagnosis`` and ``source`` (``lm``, ``append`` or ``kept``)."""
        try:
            with dspy.context(**({"lm": self.refiner_lm} if self.refiner_lm is not None else {})):
                out = self.predict(instruction=instruction, feedback=feedback, history=history or "(none)")
            candidate, diagnosis = out.refined_instruction, out.get("diagnosis", "")
        except Exception as err:  # an unreachable remote LM or unparsable output must not end the chat
            logger.warning("Refiner failed (%s: %s).", type(err).__name__, err)
            return self._fall_back(instruction, feedback, history, f"refiner error: {type(err).__name__}: {err}")
        reason = self.rejection_reason(instruction, candidate, history)
        if reason:
            return self._fall_back(instruction, feedback, history, reason, diagnosis)
        return dspy.Prediction(refined_instruction=candidate.strip(), accepted=True, reason="", diagnosis=diagnosis,
                               source="lm")

    def rejection_reason(self, instruction: str, candidate: Any, history: str = "") -> str:
        """Why ``candidate`` is not a usable instruction ("" if it is)."""
        if not isinstance(candidate, str) or not candidate.strip():
            return "empty refined instruction"
        text = candidate.strip()
        if _FORMAT_LEAK.search(text):
            return "refined instruction leaks DSPy field markers"
        if len(text) > self.max_chars:
            return f"refined instruction too long ({len(text)} > {self.max_chars} chars)"
        if text == instruction.strip():
            return "refined instruction unchanged"
        visible = [c for c in text if not c.isspace()]
        if len(re.findall(r"[A-Za-z]{2,}", text)) < 3 or sum(c.isalpha() for c in visible) < 0.6 * len(visible):
            return "refined instruction is not prose (too few words)"
        if _repeats_itself(text):
            return "refined instruction repeats itself (a degenerate generation)"
        if "```" in text or "| feedback:" in text or _echoes(text, history):
            return "refined instruction echoes the conversation instead of instructing"
        return ""

    def _fall_back(self, instruction: str, feedback: str, history: str, reason: str,
                   diagnosis: str = "") -> dspy.Prediction:
        # Sentences of the feedback that quote the model's earlier answers are no requirement: drop them.
        kept = [s for s in re.split(r"(?<=[.!?])\s+", feedback.strip()) if s and not _echoes(s, history, span=30)]
        requirement = f"Requirement from the user: {' '.join(kept)}"
        if self.fallback == "append" and kept and requirement not in instruction:
            return dspy.Prediction(refined_instruction=f"{instruction.rstrip()}\n{requirement}", accepted=True,
                                   reason=reason, diagnosis=diagnosis, source="append")
        return dspy.Prediction(refined_instruction=instruction, accepted=False, reason=reason, diagnosis=diagnosis,
                               source="kept")


def _repeats_itself(text: str) -> bool:
    """True when a sentence or line of ``text`` (of a few words at least) occurs more than once."""
    parts = [" ".join(p.split()).lower() for p in re.split(r"(?<=[.!?])\s+|\n+", text)]
    parts = [p for p in parts if len(p) >= 12]
    return len(parts) != len(set(parts))


def _echoes(text: str, history: str, span: int = 40) -> bool:
    """True when ``text`` copies a ``span``-character stretch of an earlier *answer* verbatim.

    History lines read ``Turn k (reward r): answer: ... | feedback: ...``; only the answer part counts,
    since quoting the user's own words in the instruction is fine.
    """
    compact = " ".join(text.split())
    past = " ".join(" ".join(line.split("| feedback:")[0].split()) for line in history.splitlines())
    return len(compact) >= span and any(compact[i : i + span] in past for i in range(0, len(compact) - span + 1, 10))
