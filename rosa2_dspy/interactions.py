"""Evaluate whole interactions the DSPy way: ``dspy.Evaluate`` over conversations, not single answers.

``dspy.Evaluate`` calls ``program(**example.inputs())`` once per example and scores that one answer. An
interaction needs more: the feedback source must see the example's labels, every example needs its own
session (its own instructions and adapter, adapted turn by turn), and the metric should see the final
answer *and* the trajectory. Three small pieces give exactly that without changing ``dspy.Evaluate``:

* :func:`as_interactions` wraps each task as ``dspy.Example(example=task).with_inputs("example")``, so the
  whole task (labels included) reaches the program;
* :class:`Interaction` is the program: ``Interaction(rosa2)(example=task)`` runs ``rosa2.interact(task)``
  in a session of its own (words and weights adapt inside) and returns the final prediction: the program's
  fields, and ROSA2's data under ``prediction.rosa2`` (``trajectory``: one
  :class:`~rosa2_dspy.records.TurnRecord` per turn, ``solved``, ``turns``, ``session_id``);
* metrics on that prediction: :func:`solved` (was the task solved within the turns), or :func:`on_task`
  to apply any ordinary task metric to the final answer; a metric of your own reads the interaction as
  ``prediction.rosa2.trajectory`` (or :func:`result_of(prediction) <result_of>`, which also reads older
  predictions that carried these as fields).

``num_threads`` works as usual: one ROSA2 instance serves every thread, each interaction in its own
session, their model work batched together; greedy decoding gives the same results as a sequential run.
:func:`per_turn` turns an evaluation's trajectories into the per-turn metrics (accuracy per turn,
turns to solve, correction uplift...), and :func:`evaluate` (also ``ROSA2.evaluate``) does it all::

    result = rosa2.evaluate(devset, num_threads=4)            # or, spelled out:
    result = dspy.Evaluate(devset=as_interactions(devset), metric=solved, num_threads=4)(Interaction(rosa2))
    result.score, per_turn(result)["accuracy_per_turn"]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dspy

from rosa2_dspy.records import summarize

if TYPE_CHECKING:
    from rosa2_dspy.rosa2 import ROSA2


def result_of(prediction: Any) -> Any:
    """What an interaction did (``trajectory``, ``solved``, ``turns``, ``session_id``), from the prediction
    :meth:`ROSA2.interact` returned: its reserved ``rosa2`` attribute where it has one, else its fields."""
    result = getattr(prediction, "rosa2", None)
    return result if result is not None and hasattr(result, "trajectory") else prediction


class Interaction(dspy.Module):
    """One whole interaction per call, as a DSPy program: ``forward(example)`` -> ``rosa2.interact(example)``.

    Args:
        rosa2: the ROSA2 module (with its feedback source) that runs the interactions.
        max_turns: turns per interaction (default: the module's).
        keep_sessions: keep each interaction's session (its adapter and turns) in ``rosa2`` afterwards; off by
            default, so an evaluation over many examples does not keep one adapter per example in memory (the
            prediction carries the trajectory either way).
    """

    def __init__(self, rosa2: "ROSA2", max_turns: int | None = None, keep_sessions: bool = False) -> None:
        super().__init__()
        self.rosa2 = rosa2
        self.max_turns = max_turns
        self.keep_sessions = keep_sessions

    def forward(self, example: dspy.Example) -> dspy.Prediction:
        if not isinstance(example, dspy.Example):
            raise TypeError("Interaction(rosa2) takes example=<dspy.Example>; wrap a devset with as_interactions().")
        prediction = self.rosa2.interact(example, max_turns=self.max_turns)
        if not self.keep_sessions:
            self.rosa2.end_session(result_of(prediction).session_id)
        return prediction


def as_interactions(devset: Sequence[dspy.Example]) -> list[dspy.Example]:
    """Each task as one example whose single input is the whole task: what :class:`Interaction` takes."""
    return [dspy.Example(example=task).with_inputs("example") for task in devset]


def solved(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    """1.0 when the interaction solved its task (by the feedback source's verdict), else 0.0."""
    return float(bool(getattr(result_of(prediction), "solved", False)))


def on_task(metric: Callable[..., Any]) -> Callable[..., Any]:
    """An ordinary task metric ``metric(task, prediction[, trace])`` applied to an interaction's final answer."""
    try:
        params = inspect.signature(metric).parameters.values()
        two = len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) == 2 and not any(
            p.kind is p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        two = False

    def final_answer(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> Any:
        task = example.example if "example" in example else example
        return metric(task, prediction) if two else metric(task, prediction, trace)

    final_answer.__name__ = getattr(metric, "__name__", "on_task")
    return final_answer


def per_turn(result: Any, max_turns: int) -> dict[str, Any]:
    """The per-turn metrics (``rosa2_dspy.records.summarize``) of an evaluation over interactions."""
    trajectories = [getattr(result_of(prediction), "trajectory", None) or [] for _, prediction, _ in result.results]
    return summarize(trajectories, max_turns)


def evaluate(rosa2: "ROSA2", devset: Sequence[dspy.Example], metric: Callable[..., Any] | None = None, *,
             num_threads: int | None = None, max_turns: int | None = None, keep_sessions: bool = False,
             **evaluate_kwargs: Any) -> Any:
    """``dspy.Evaluate`` over whole interactions of ``rosa2`` on ``devset`` (plain task examples).

    ``metric`` scores each interaction (``(interaction_example, prediction[, trace])``, the prediction with
    ``trajectory``/``solved``/``turns``); default :func:`solved`. Returns DSPy's ``EvaluationResult`` with
    ``summary`` added: the per-turn metrics of :func:`per_turn`.
    """
    evaluate_kwargs.setdefault("display_progress", False)
    evaluator = dspy.Evaluate(devset=as_interactions(devset), metric=metric or solved, num_threads=num_threads,
                              **evaluate_kwargs)
    result = evaluator(Interaction(rosa2, max_turns=max_turns, keep_sessions=keep_sessions))
    result.summary = per_turn(result, max_turns or rosa2.max_turns)
    return result
