"""The words step: a textual gradient on the instruction a program runs with (spec step 3).

:class:`InstructionRefiner` is the module ``feedback, history -> refined_instruction``. It runs with its
own LM (``dspy.context``), so the refiner can be a strong remote litellm model while the actor stays
local, in one of two styles:

* ``"requirements"`` (default), a **structured gradient**: :class:`MissingRequirements` asks for the
  requirements the instruction misses as a ``list[str]``, and :mod:`rosa2_dspy.requirements` merges them
  into the instruction's ``Requirements:`` block (new ones added, ones on the same topic replaced,
  duplicates dropped), so the instruction stays short and current. The refiner sees the feedback without
  quotes of the model's answers and without a revealed answer, and a requirement that states an answer,
  copies a question's number or a revealed solution, or copies a demo's requirement on a topic this user
  never raised is refused: the words carry the user's intent, never one question's answer (a revealed
  answer goes to the weights step as a reference for its own question). The predictor comes
  with hand-written demos (``rosa2_dspy/data/refiner_demos.json``, attached with DSPy's ``LabeledFewShot``);
  each call shows the ``num_demos`` most similar to the feedback, most similar last, which is what lets a
  135M refiner write usable requirements.
* ``"rewrite"``: :class:`RefineInstruction` writes a ``diagnosis`` and the whole ``refined_instruction``,
  for strong refiners; an empty, overlong, format-leaking, non-prose, self-repeating or
  conversation-echoing rewrite is refused.

An LM error or unusable output keeps the instruction (``fallback="keep"``) or, with ``fallback="append"``,
merges the cleaned feedback itself as a requirement. Every call says what happened (``source``: ``lm``,
``append`` or ``kept``; ``reason``; the requirements added, replaced and rejected, with reasons).

Example (``DummyLM`` stands in for the refiner's LM):
    >>> import dspy
    >>> from dspy.utils.dummies import DummyLM
    >>> refiner = InstructionRefiner(lm=DummyLM([{"requirements": '["Give distances in meters."]'}]))
    >>> refiner(instruction="Answer.", feedback="Not what I meant: meters, please.").refined_instruction
    'Answer.\\n\\nRequirements:\\n- Give distances in meters.'
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, Literal

import dspy
from dspy.teleprompt import LabeledFewShot

from rosa2_dspy import requirements

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


class MissingRequirements(dspy.Signature):
    """From a user's feedback on an assistant's answers, list the requirements that the assistant's
    instruction is missing: what the user wants of every answer (format, units, casing, length,
    constraints, how to work). Each requirement is one short imperative sentence. Never state the answer
    to a specific question and never copy numbers from one."""

    instruction: str = dspy.InputField(desc="the instruction the assistant currently follows")
    feedback: str = dspy.InputField(desc="the user's latest feedback")
    history: str = dspy.InputField(desc="the user's earlier feedback in this conversation")
    requirements: list[str] = dspy.OutputField(desc="the missing requirements, one short sentence each")


DEMOS_FILE = "refiner_demos.json"


def shipped_demos() -> list[dspy.Example]:
    """The hand-written refinement examples (instruction, feedback, history -> requirements)."""
    rows = json.loads(resources.files("rosa2_dspy").joinpath("data", DEMOS_FILE).read_text(encoding="utf-8"))
    return [dspy.Example(**row).with_inputs("instruction", "feedback", "history") for row in rows]


class InstructionRefiner(dspy.Module):
    """The words step; keeps the old instruction when the LM's output is unusable (see the module docstring).

    Args:
        lm: the refiner's LM (any ``dspy.LM``: a litellm model's or a ``LocalLM``). ``None`` uses whatever
            LM is configured when it runs.
        style: ``"requirements"`` (structured gradient, default) or ``"rewrite"`` (free-text rewrite).
        fallback: what unusable output turns into: ``"keep"`` the instruction (default), or ``"append"``
            the cleaned feedback to it as a requirement.
        max_chars: longest acceptable rewritten instruction (``"rewrite"``).
        max_requirements: most requirements an instruction keeps (``"requirements"``; oldest dropped).
        num_demos: demos shown per call (the most similar to the feedback; 0: none). The set is
            ``self.predict.demos``, the shipped one by default; replace it, or ``load`` a compiled refiner.
        adapter: the DSPy adapter the refiner's LM runs under; default: the one in context, except that a
            :class:`~rosa2_dspy.local_lm.LocalLM` refiner uses its own ``default_adapter``.
    """

    def __init__(self, lm: dspy.BaseLM | None = None, style: Literal["requirements", "rewrite"] = "requirements",
                 fallback: Literal["keep", "append"] = "keep", max_chars: int = 2000, max_requirements: int = 6,
                 num_demos: int = 4, adapter: dspy.Adapter | None = None) -> None:
        super().__init__()
        if fallback not in ("keep", "append"):
            raise ValueError(f"fallback must be 'keep' or 'append', got {fallback!r}.")
        if style not in ("requirements", "rewrite"):
            raise ValueError(f"style must be 'requirements' or 'rewrite', got {style!r}.")
        self.style = style
        if style == "requirements":
            demos = shipped_demos()
            self.predict = LabeledFewShot(k=len(demos)).compile(dspy.Predict(MissingRequirements), trainset=demos)
        else:
            self.predict = dspy.Predict(RefineInstruction)
        self.refiner_lm = lm
        self.adapter = adapter
        self.max_chars, self.max_requirements, self.num_demos = max_chars, max_requirements, num_demos
        self.fallback = fallback

    def forward(self, instruction: str, feedback: str, history: str = "", answers: Sequence[str] = (),
                reference: Sequence[str] = (), inputs: Sequence[str] = ()) -> dspy.Prediction:
        """Returns ``refined_instruction``, ``accepted`` (did the instruction change), ``source`` (``lm``: the
        LM's output was used, even if all it proposed was already stated; ``append``; ``kept``), ``reason``
        (why the LM's output was not used, "" if it was), ``diagnosis``
        and, for ``"requirements"``, ``requirements`` (the LM's list), ``added``, ``replaced`` and
        ``rejected`` (``[requirement, reason]`` pairs).

        ``answers`` (the model's answers so far), ``reference`` (a revealed answer's values) and ``inputs``
        (the questions) are what the words must never copy.
        """
        if self.style == "rewrite":
            return self._rewrite(instruction, feedback, history)
        said = requirements.clean_feedback(feedback, answers, reference)
        earlier = [requirements.clean_feedback(part, answers, reference) for part in _feedback_lines(history)]
        forbidden = requirements.forbidden_numbers([*reference, *answers, *inputs], feedback)
        if not said:
            return self._fall_back(instruction, said, history, "no requirement left in the feedback", answers,
                                   forbidden)
        try:
            with self._context():
                out = self.predict(instruction=instruction, feedback=said,
                                   history="\n".join(e for e in earlier if e) or "(none)",
                                   demos=self._nearest_demos(said))
            proposed = [t for r in (out.requirements or []) if (t := _tidy(str(r)))]
        except Exception as err:  # an unreachable remote LM or unparsable output must not end the chat
            logger.warning("Refiner failed (%s: %s).", type(err).__name__, err)
            return self._fall_back(instruction, said, history, f"refiner error: {type(err).__name__}: {err}",
                                   answers, forbidden)
        reasons = [requirements.rejection_reason(r, forbidden, answers, reference)
                   or self._copied_demo(r, [said, *earlier]) for r in proposed]
        rejected = [[r, why] for r, why in zip(proposed, reasons) if why]
        usable = [r for r, why in zip(proposed, reasons) if not why]
        if usable:  # merged; if all of it was already stated, the LM's output is used and changes nothing
            return self._result(requirements.merge(instruction, usable, self.max_requirements), "lm", "", proposed,
                                rejected)
        reason = "; ".join(sorted({why for _, why in rejected})) or "no requirement proposed"
        return self._fall_back(instruction, said, history, reason, answers, forbidden, proposed, rejected)

    def _context(self):
        settings: dict[str, Any] = {}
        if self.refiner_lm is not None:
            settings["lm"] = self.refiner_lm
        adapter = self.adapter or getattr(self.refiner_lm, "default_adapter", None)
        if adapter is not None:
            settings["adapter"] = adapter
        return dspy.context(**settings)

    def _copied_demo(self, requirement: str, feedback: Sequence[str]) -> str:
        """Why ``requirement`` is a demo's, not this user's ("" if it is not): a demo's requirement copied
        word for word that the demo took from its own feedback while this user's feedback shares none of
        the words the two share (:func:`~rosa2_dspy.requirements.carried_over`). Generic demo requirements
        ("Check the calculation step by step before answering." for a bare "No, that's not right.") stay
        allowed. The embedded refiner wrote the casing demo's "Write the whole answer in capital letters."
        into code instructions 17-18 times per words-moving mode over the 64 conversations of the
        HumanEval run under `none` (``most_added`` in results/humaneval_embedded_cpu.json), where no
        feedback mentioned letters."""
        text = " ".join(requirement.split()).lower()
        for demo in self.predict.demos:
            copied = any(text == " ".join(str(r).split()).lower() for r in demo.get("requirements") or [])
            if copied and requirements.carried_over(requirement, demo.get("feedback", ""), feedback):
                return "copies a demo's requirement the user never asked for"
        return ""

    def _nearest_demos(self, feedback: str) -> list[Any]:
        """The ``num_demos`` demos whose feedback shares the most words with ``feedback``, most similar last
        (a small model follows the last example most closely)."""
        words = _word_set(feedback)

        def similarity(demo: Any) -> float:
            theirs = _word_set(demo.get("feedback", ""))
            return len(words & theirs) / (len(theirs) ** 0.5 or 1.0)

        ranked = sorted(self.predict.demos, key=similarity)
        return ranked[len(ranked) - self.num_demos:] if self.num_demos else []

    @staticmethod
    def _result(merged: requirements.Merge, source: str, reason: str, proposed: list[str],
                rejected: list[list[str]]) -> dspy.Prediction:
        return dspy.Prediction(refined_instruction=merged.instruction, accepted=merged.changed, reason=reason,
                               diagnosis="; ".join(proposed), source=source, requirements=proposed,
                               added=merged.added, replaced=merged.replaced, rejected=rejected)

    def _rewrite(self, instruction: str, feedback: str, history: str) -> dspy.Prediction:
        try:
            with self._context():
                out = self.predict(instruction=instruction, feedback=feedback, history=history or "(none)")
            candidate, diagnosis = out.refined_instruction, out.get("diagnosis", "")
        except Exception as err:
            logger.warning("Refiner failed (%s: %s).", type(err).__name__, err)
            return self._fall_back(instruction, feedback, history, f"refiner error: {type(err).__name__}: {err}")
        reason = self.rejection_reason(instruction, candidate, history)
        if reason:
            return self._fall_back(instruction, feedback, history, reason, diagnosis=diagnosis)
        return dspy.Prediction(refined_instruction=candidate.strip(), accepted=True, reason="", diagnosis=diagnosis,
                               source="lm")

    def rejection_reason(self, instruction: str, candidate: Any, history: str = "") -> str:
        """Why ``candidate`` is not a usable rewritten instruction ("" if it is)."""
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
        if "```" in text or "| feedback:" in text or requirements.echoes(text, _answers_in(history), span=40, step=10):
            return "refined instruction echoes the conversation instead of instructing"
        return ""

    def _fall_back(self, instruction: str, feedback: str, history: str, reason: str, answers: Sequence[str] = (),
                   forbidden: set[str] | None = None, proposed: list[str] | None = None,
                   rejected: list[list[str]] | None = None, diagnosis: str = "") -> dspy.Prediction:
        # Sentences of the feedback that quote the model's earlier answers are no requirement: drop them.
        past = _answers_in(history)
        kept = [s for s in requirements.sentences(feedback) if not requirements.echoes(s, past, span=30, step=10)]
        said = " ".join(kept)
        if self.style == "requirements":
            # Each remaining sentence must itself be fit for the words (no example values, no answers).
            fit = [s for s in kept if not requirements.ONLY_COMPLAINT.match(s)
                   and not requirements.rejection_reason(f"The user said: {s}", forbidden or set(), answers)]
            requirement = f"The user said: {' '.join(fit)}"
            usable = self.fallback == "append" and fit and len(requirement) <= requirements.MAX_REQUIREMENT_CHARS
            merged = requirements.merge(instruction, [requirement] if usable else [], self.max_requirements)
            return self._result(merged, "append" if merged.changed else "kept", reason, proposed or [], rejected or [])
        requirement = f"Requirement from the user: {said}"
        if self.fallback == "append" and kept and requirement not in instruction:
            return dspy.Prediction(refined_instruction=f"{instruction.rstrip()}\n{requirement}", accepted=True,
                                   reason=reason, diagnosis=diagnosis, source="append")
        return dspy.Prediction(refined_instruction=instruction, accepted=False, reason=reason, diagnosis=diagnosis,
                               source="kept")


def _tidy(requirement: str) -> str:
    """A requirement without the list syntax a small model leaves around it (``["...",`` of a cut-off list)."""
    return requirement.strip().strip("[]").strip().strip(",").strip().strip("\"'").strip()


def _word_set(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _feedback_lines(history: str) -> list[str]:
    """The user's feedback of each earlier turn in a history text (``Turn k (reward r): answer: ... |
    feedback: ...`` lines)."""
    return [line.split("| feedback:", 1)[1].strip() for line in history.splitlines() if "| feedback:" in line]


def _repeats_itself(text: str) -> bool:
    """True when a sentence or line of ``text`` (of a few words at least) occurs more than once."""
    parts = [" ".join(p.split()).lower() for p in re.split(r"(?<=[.!?])\s+|\n+", text)]
    parts = [p for p in parts if len(p) >= 12]
    return len(parts) != len(set(parts))


def _answers_in(history: str) -> list[str]:
    """The *answers* of a history text, whose lines read ``Turn k (reward r): answer: ... | feedback: ...``
    (quoting the user's own words in the instruction is fine; copying the model's answer is not)."""
    return [line.split("| feedback:")[0] for line in history.splitlines()]
