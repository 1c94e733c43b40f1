"""Feedback sources on the shipped data: real verifiers, real subprocesses, no model."""

from __future__ import annotations

import os
import re
import sys

import dspy
import pytest

from programs.tasks import TASKS, feedback_for, load_task, signature_for
from rosa2_dspy.feedback import (
    CodeVerifier,
    IntentVerifier,
    MathVerifier,
    SimulatedUser,
    answers_match,
    as_feedback,
    call_feedback,
    extract_answer,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="memory limits use POSIX rlimits")


def ask(source, example, history=None, **outputs):
    return source(example, dspy.Prediction(**outputs), None, history=history)


# --- math -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gold, answer", [
    (r"\frac{1}{2}", "0.5"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{3}{4}", "3/4"),
    (r"\frac{\sqrt{2}}{2}", r"$\frac{1}{\sqrt{2}}$"),
    ("1000", "1,000"),
])
def test_math_equivalences(gold: str, answer: str) -> None:
    assert answers_match(gold, extract_answer(answer))


@pytest.mark.parametrize("text, expected", [
    ("The answer to this question is 7 + 5 = 12.", "12"),
    ("The answer is 12.", "12"),
    ("Answer: 12. Check: 12 - 5 = 7", "12"),
    (r"so it is \boxed{2\sqrt{2}}, done", r"2\sqrt{2}"),
    (r"The area is $9\pi$ square units.", r"9\pi"),
    ("3 bags of 4 apples (12 apples) minus 2 gives 10 apples", "10"),
    ("I don't know.", None),
    ("", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_math_verifier_scores_and_never_states_the_gold() -> None:
    verifier, example = MathVerifier(), dspy.Example(question="What is 7 + 5?", answer="12")
    right = ask(verifier, example, answer="The answer is 12.")
    assert (right.score, right.solved) == (1.0, True)
    wrong = ask(verifier, example, answer="I think it is 88.")
    assert (wrong.score, wrong.solved) == (0.0, False)
    assert "88" in wrong.feedback and "incorrect" in wrong.feedback and "12" not in wrong.feedback
    echo = ask(verifier, example, answer="What is 7 + 5?\n\nRespond with the fields.")  # = 12 for sympy
    assert echo.score == 0.0 and "restated 7 + 5" in echo.feedback
    assert ask(verifier, example, answer="7 + 5 = 12").score == 1.0
    missing = ask(verifier, example, answer="Let me think about it.")
    assert missing.score == 0.0 and "could not find a final answer" in missing.feedback
    with pytest.raises(ValueError, match="gold_field"):
        ask(verifier, dspy.Example(question="q"), answer="1")


def test_shipped_math_golds_verify_against_themselves() -> None:
    verifier = MathVerifier()
    for example in load_task("math_smoke") + load_task("math"):
        assert ask(verifier, example, answer=f"The answer is ${example.answer}$.").solved, example.question


# --- code -------------------------------------------------------------------------------------------------

def test_reference_solutions_pass_their_tests() -> None:
    verifier = CodeVerifier()
    for example in load_task("code"):
        result = ask(verifier, example, code=f"```python\n{example.reference}```")
        assert (result.score, result.solved) == (1.0, True), (example.entry_point, result.feedback)


def add_example() -> dspy.Example:
    return next(e for e in load_task("code") if e.entry_point == "add")


def test_wrong_solution_names_the_failing_assert() -> None:
    result = ask(CodeVerifier(), add_example(), code="def add(a, b):\n    return a * b")
    assert 0.0 < result.score < 1.0 and not result.solved
    assert "assert add(2, 3) == 5" in result.feedback and "AssertionError" in result.feedback


def test_infinite_loop_is_stopped_by_the_timeout() -> None:
    result = ask(CodeVerifier(timeout=1.0), add_example(), code="def add(a, b):\n    while True:\n        pass")
    assert result.score == 0.0 and "did not finish within 1 s" in result.feedback


@posix_only
def test_memory_hog_is_stopped() -> None:
    result = ask(CodeVerifier(memory_mb=256), add_example(), code="x = bytearray(10**10)")
    assert result.score == 0.0 and "out of memory" in result.feedback


def test_syntax_error_and_missing_function_score_zero() -> None:
    broken = ask(CodeVerifier(), add_example(), code="def add(a, b)\n    return a + b")
    assert broken.score == 0.0 and "SyntaxError" in broken.feedback
    other = ask(CodeVerifier(), add_example(), code="def plus(a, b):\n    return a + b")
    assert other.score == 0.0 and "`add`" in other.feedback
    empty = ask(CodeVerifier(), add_example(), code="")
    assert empty.score == 0.0 and "could not find any code" in empty.feedback


def test_candidate_code_runs_in_a_child_not_here() -> None:
    code = "import os\ndef pid():\n    return os.getpid()\ndef add(a, b):\n    return a + b"
    outcome = CodeVerifier().run(code, ["assert add(1, 2) == 3", f"assert pid() != {os.getpid()}"], "add")
    assert outcome == {"results": [None, None]}


# --- intent -----------------------------------------------------------------------------------------------

def test_intent_accept_regexes_take_the_gold_and_refuse_wrong_formats() -> None:
    verifier = IntentVerifier()
    for example in load_task("intent"):
        assert ask(verifier, example, answer=example.answer).solved, example.question
        assert example.reject, f"{example.question}: add plausible wrong answers to 'reject'"
        for wrong in example.reject:
            result = ask(verifier, example, answer=wrong)
            assert not result.solved, (example.question, wrong)
            assert example.intent not in result.feedback


# --- simulated user ---------------------------------------------------------------------------------------

def test_reveal_none_never_states_the_gold() -> None:
    user = feedback_for("math", reveal="none")
    for example in load_task("math_smoke") + load_task("math", limit=20):
        for history in (None, [1], [1, 2, 3, 4]):
            result = ask(user, example, history=history, answer="The answer is 1234567.")
            assert not result.solved and result.reference is None
            assert not re.search(rf"(?<![\d\\]){re.escape(example.answer)}(?!\d)", result.feedback), result.feedback


def test_reveal_answer_states_the_gold_and_sets_reference() -> None:
    example = load_task("math_smoke")[16]
    result = ask(SimulatedUser(MathVerifier(), reveal="answer"), example, answer="0.5")
    assert example.answer in result.feedback and result.reference == {"answer": example.answer}
    code = add_example()
    result = ask(feedback_for("code", reveal="answer", reveal_after=None), code, code="def add(a, b): return 0")
    assert code.reference.strip() in result.feedback and result.reference == {"code": code.reference.strip()}


def test_reveal_after_switches_from_hint_to_answer_by_turn() -> None:
    example = load_task("intent")[0]
    user = feedback_for("intent", reveal="hint", reveal_after=2)
    early = [ask(user, example, history=h, answer="3 km") for h in (None, [], ["turn 0"])]
    for result in early:
        assert example.intent in result.feedback and example.hint in result.feedback
        assert example.answer not in result.feedback and result.reference is None
    late = ask(user, example, history=["turn 0", "turn 1"], answer="3 km")
    assert example.answer in late.feedback and late.reference == {"answer": example.answer}
    none = ask(feedback_for("intent", reveal="none"), example, answer="3 km")
    assert example.intent not in none.feedback


def test_generic_numeric_hint_without_a_hint_field() -> None:
    user = SimulatedUser(MathVerifier(), reveal="hint")
    example = dspy.Example(question="What is 30 + 12?", answer="42")
    assert "larger than 8" in ask(user, example, answer="8").feedback
    assert "2 digits" in ask(user, example, answer="no idea").feedback
    solved = ask(user, example, answer="42")
    assert solved.solved and solved.score == 1.0


def test_simulated_user_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="reveal must be one of"):
        SimulatedUser(MathVerifier(), reveal="all")


def test_as_feedback_accepts_every_source() -> None:
    cases = [
        (MathVerifier(), load_task("math_smoke")[0], {"answer": "12"}),
        (CodeVerifier(), add_example(), {"code": "def add(a, b): return a - b"}),
        (IntentVerifier(), load_task("intent")[0], {"answer": "3 km"}),
        (feedback_for("math", reveal="answer", reveal_after=0), load_task("math_smoke")[0], {"answer": "13"}),
    ]
    for source, example, outputs in cases:
        for history in (None, [1, 2]):
            normalised = call_feedback(source, example, dspy.Prediction(**outputs), history=history)
            assert 0.0 <= normalised.score <= 1.0 and isinstance(normalised.feedback, str)
            assert as_feedback(source(example, dspy.Prediction(**outputs))).score == normalised.score


# --- datasets ---------------------------------------------------------------------------------------------

NEEDED = {
    "math": {"question", "answer", "hint", "steps", "template", "numbers"},
    "math_smoke": {"question", "answer", "hint", "level"},
    "code": {"question", "entry_point", "tests", "hint", "reference"},
    "humaneval": {"question", "prompt", "entry_point", "tests", "reference", "task_id"},
    "intent": {"question", "intent", "answer", "accept", "reject", "hint", "kind"},
    "intentgen": {"question", "intent", "answer", "hint", "kind", "value", "unit", "split", "example"},
}


@pytest.mark.parametrize("name", TASKS)
def test_datasets_load_with_the_fields_the_verifiers_need(name: str) -> None:
    examples = load_task(name)
    assert len(examples) == {"math": 96, "math_smoke": 24, "code": 12, "humaneval": 164, "intent": 24,
                             "intentgen": 96}[name]
    for example in examples:
        assert NEEDED[name] <= set(example.keys()), example
        assert set(example.inputs().keys()) == {"question"}
    assert len(load_task(name, limit=3)) == 3
    assert signature_for(name).startswith("question -> ")
    if name == "math":
        assert [e.steps for e in load_task(name, limit=5)] == [2, 3, 4, 5, 6]
    if name == "math_smoke":
        assert sorted({e.level for e in examples}) == [1, 2, 3]
        assert [e.level for e in load_task(name, limit=6, spread=True)] == [1, 1, 2, 2, 3, 3]
    if name == "intent":
        assert {e.kind for e in examples} == {"format", "units", "constraint"}


def test_unknown_task_says_which_exist() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        load_task("chess")
