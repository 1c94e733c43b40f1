"""dspy.Evaluate over whole interactions (issue 11, item 7): each example its own session, adaptation inside.

Tiny in-process model, greedy decoding; the refiner is DSPy's DummyLM (the textual side only).
"""

from __future__ import annotations

import dspy
import pytest

from rosa2_dspy.interactions import Interaction, as_interactions, on_task, per_turn, result_of, solved
from rosa2_dspy.rosa2 import ROSA2
from rosa2_dspy.weights import ROSAStep
from conftest import requirement_refiner, requirements_of


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # bit-for-bit comparisons (conftest)


QUESTIONS = ["What is 2+3?", "Name a red fruit.", "Spell cat backwards.", "How many legs has a spider?"]
# example i is accepted at turn i + 1 (the last one never, in 3 turns)
EXAMPLES = [dspy.Example(question=q, answer=str(i)).with_inputs("question") for i, q in enumerate(QUESTIONS)]


def user(example, prediction, trace=None, history=None):
    turn = len(history or []) + 1
    if turn > int(example.answer):
        return dspy.Prediction(score=1.0, feedback="Right.")
    return dspy.Prediction(score=0.0, feedback="Wrong: answer with the number only.",
                           reference={"answer": example.answer})


def build(lm):
    refiner = requirement_refiner("Reply with one number.", n=100)
    return ROSA2(dspy.Predict("question -> answer"), lm, user, mode="joint", refiner_lm=refiner, max_turns=3,
                 weights=ROSAStep(beta=0.5, max_norm=5.0))


def fewer_turns_is_better(example, prediction, trace=None):
    """A metric on the final answer and the trajectory."""
    interaction = result_of(prediction)
    assert interaction.trajectory[-1].outputs["answer"] == prediction.answer
    return float(interaction.solved) / interaction.turns


def view(result):
    return [(example.example.question, score, [(r.turn, r.reward, r.solved, r.outputs, r.instructions,
                                                r.refined_instructions, r.delta_norm,
                                                r.weights and r.weights["applied"])
                                               for r in result_of(prediction).trajectory])
            for example, prediction, score in result.results]


def test_evaluate_with_threads_over_interactions_equals_the_sequential_run(tiny_lm):
    rosa2 = build(tiny_lm)
    devset = as_interactions(EXAMPLES)
    sequential = dspy.Evaluate(devset=devset, metric=fewer_turns_is_better, num_threads=1,
                               display_progress=False)(Interaction(rosa2))
    threaded = dspy.Evaluate(devset=devset, metric=fewer_turns_is_better, num_threads=4,
                             display_progress=False)(rosa2.as_interaction())
    assert view(threaded) == view(sequential)
    assert [score for *_, score in sequential.results] == [1.0, 0.5, 1 / 3, 0.0]
    first = result_of(sequential.results[1][1]).trajectory[0]
    assert first.weights["applied"] and requirements_of(first.refined_instructions) == {"self": ["Reply with one number."]}
    assert rosa2.sessions == {}  # each interaction ran in a session of its own, ended afterwards
    assert per_turn(threaded, 3)["accuracy_per_turn"] == [0.25, 0.5, 0.75]


def test_rosa2_evaluate_returns_per_turn_metrics_and_takes_task_metrics(tiny_lm):
    rosa2 = build(tiny_lm)
    result = rosa2.evaluate(EXAMPLES, num_threads=4)
    assert result.score == 75.0 and result.summary["accuracy_per_turn"] == [0.25, 0.5, 0.75]
    assert result.summary["turns_to_solve"] == 2.0
    kept = rosa2.evaluate(EXAMPLES[:2], metric=on_task(lambda task, pred: pred.answer != task.question),
                          num_threads=2, keep_sessions=True)
    assert kept.score == 100.0 and len(rosa2.sessions) == 2
    assert solved(dspy.Example(), dspy.Prediction(solved=True)) == 1.0
