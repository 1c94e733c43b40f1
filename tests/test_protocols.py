"""Named feedback protocols (none, hint, answer) on the simulated user, and how experiments name theirs."""

from __future__ import annotations

import dspy
import pytest

from programs import experiment, experiment_report
from programs.tasks import feedback_for, load_task, resolve_protocol
from rosa2_dspy.feedback import IntentVerifier, MathVerifier, SimulatedUser
from rosa2_dspy.feedback.simulated_user import PROTOCOLS, protocol_of, protocol_settings


def say(user, example, turn, **answer):
    """The user's feedback on a wrong answer at 0-based ``turn`` (history of that length)."""
    return user(example, dspy.Prediction(**answer), None, history=[None] * turn)


def intent_example():
    return next(e for e in load_task("intent") if e.get("intent"))


@pytest.mark.parametrize("turn", [0, 1, 4])
def test_none_gives_only_the_verdict_and_the_verifiers_message(turn):
    example = intent_example()
    user = SimulatedUser.for_protocol(IntentVerifier(), "none")
    result = say(user, example, turn, answer="banana")
    assert result.reference is None and user.protocol == "none"
    assert "What I meant" not in result.feedback and "Hint" not in result.feedback
    assert example.answer not in result.feedback


@pytest.mark.parametrize("turn", [0, 1, 4])
def test_hint_adds_the_hidden_intent_and_a_hint_but_never_the_answer(turn):
    example = intent_example()
    user = SimulatedUser.for_protocol(IntentVerifier(), "hint")
    result = say(user, example, turn, answer="banana")
    assert user.protocol == "hint" and result.reference is None
    assert "What I meant" in result.feedback and "Hint" in result.feedback
    assert "The correct answer is " + example.answer not in result.feedback


def test_answer_hints_first_then_reveals_the_reference_for_the_weights_step():
    example = load_task("math_smoke")[3]
    user = SimulatedUser.for_protocol(MathVerifier(), "answer", reveal_after=1)
    assert user.protocol == "answer" and (user.reveal, user.reveal_after) == ("hint", 1)
    first, later = say(user, example, 0, answer="-1"), say(user, example, 2, answer="-1")
    assert first.reference is None and "Hint" in first.feedback
    assert later.reference == {"answer": example.answer} and f"The correct answer is {example.answer}" in later.feedback
    at_once = SimulatedUser.for_protocol(MathVerifier(), "answer", reveal_after=0)
    assert say(at_once, example, 0, answer="-1").reference == {"answer": example.answer}


def test_protocols_are_settings_of_the_reveal_options_and_named_back():
    assert set(PROTOCOLS) == {"none", "hint", "answer"} and PROTOCOLS["answer"] == "learning a revealed answer"
    for name in PROTOCOLS:
        assert protocol_of(**protocol_settings(name)) == name
    assert protocol_of("answer", None) == protocol_of("hint", 2) == "answer"
    assert feedback_for("code", protocol="none").protocol == "none"
    with pytest.raises(ValueError, match="Unknown feedback protocol"):
        protocol_settings("everything")


def test_experiment_configs_name_their_protocol():
    assert resolve_protocol({"protocol": "hint"}) == ("hint", {"protocol": "hint", "reveal_after": 1})
    # an older config is named by what its reveal options amount to
    assert resolve_protocol({"feedback": {"reveal": "hint", "reveal_after": 1}})[0] == "answer"
    assert resolve_protocol({"feedback": {"reveal": "none"}})[0] == "none"
    assert resolve_protocol({})[0] == "answer"  # feedback_for's defaults: hint, answer from turn 2
    with pytest.raises(ValueError, match="amount to 'answer'"):
        resolve_protocol({"protocol": "hint", "feedback": {"reveal": "hint", "reveal_after": 1}})
    for name in ("default", "math", "math_smoke"):
        assert resolve_protocol(experiment.load_config(name))[0] == "answer"
    assert resolve_protocol(experiment.load_config("code"))[0] == "none"  # HumanEval's headline run
    title = experiment_report.title_for({"config": {"task": "code", "protocol": "answer"}, "protocol": "answer"})
    assert title == "code · embedded · protocol answer (learning a revealed answer)"
