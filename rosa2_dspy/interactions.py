"""Whole interactions: the loop of turns with a feedback source, and ``dspy.Evaluate`` over such conversations.

:func:`interact` (also ``ROSA2.interact``) is the loop: in a new session of its own, call the module, let
the feedback source score the answer, close the turn (words and weights adapt, see ``rosa2_dspy.turn``),
until the task is solved or the turns run out. :class:`InteractionsMixin` gives ROSA2 ``interact``,
``ainteract``, ``as_interaction`` and ``evaluate``.

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

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dspy

from rosa2_dspy import theorem41
from rosa2_dspy.feedback import call_feedback
from rosa2_dspy.records import InteractionPrediction, InteractionResult, summarize

if TYPE_CHECKING:
    from rosa2_dspy.rosa2 import ROSA2


def interact(rosa2: "ROSA2", example: dspy.Example, max_turns: int | None = None, session_id: str | None = None,
             carry_over_from: str | None = None) -> dspy.Prediction:
    """The loop behind ``ROSA2.interact`` (see there): new session, then turns of call, feedback, close
    (adapting words and weights unless solved or last), until solved or ``max_turns``."""
    if rosa2.feedback_fn is None:
        raise ValueError("interact() needs a feedback source: ROSA2(..., feedback=my_metric).")
    rosa2._weights_actor()  # before a session is opened
    max_turns = max_turns or rosa2.max_turns
    session_id = rosa2.store.start(session_id, carry_over_from=carry_over_from)
    rosa2.store.default_id = session_id
    inputs = example.inputs()
    # The task's accepted answer, for the Theorem 4.1 measurement only (never given to the weights step).
    accepted = theorem41.accepted_answer(rosa2.feedback_fn, example) if rosa2.measure_theorem41 else (None, None)
    prediction = None
    with rosa2.store.use(session_id) as session:
        for turn in range(max_turns):
            prediction = rosa2(**inputs)
            with session.lock:
                pending = session.pending
                start = time.perf_counter()
                # trace=None: DSPy metrics read a trace as "we are bootstrapping" and may change their result.
                verdict = call_feedback(rosa2.feedback_fn, example, prediction, None, history=session.history,
                                        threshold=rosa2.threshold)
                pending.record.times["feedback"] = time.perf_counter() - start
                # after the last turn no answer would use an adaptation
                rosa2._close_turn(session, verdict, adapt=turn < max_turns - 1, accepted=accepted)
                if verdict.solved:
                    break
        trajectory = session.history
    result = InteractionPrediction(**dict(prediction.items()))
    result.set_lm_usage(prediction.get_lm_usage())
    result.rosa2 = InteractionResult(trajectory=trajectory, solved=bool(trajectory[-1].solved),
                                     turns=len(trajectory), session_id=session_id)
    return result


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


class InteractionsMixin:
    """ROSA2's whole-interaction methods (mixed into :class:`~rosa2_dspy.rosa2.ROSA2`), over this module's functions."""

    def interact(self, example: dspy.Example, max_turns: int | None = None, session_id: str | None = None,
                 carry_over_from: str | None = None) -> dspy.Prediction:
        """Run a whole interaction on ``example`` with the feedback source, in a new session of its own.

        Returns the last prediction: the wrapped program's fields as it returned them, and ROSA2's data under
        the reserved attribute ``rosa2`` (an :class:`~rosa2_dspy.records.InteractionResult`: ``trajectory``,
        one :class:`TurnRecord` per turn, ``solved``, ``turns``, ``session_id``), so it never collides with
        the program's own fields (ReAct's ``trajectory``). Stops once solved or after ``max_turns``. Safe to call
        from many threads at once on one instance: each interaction runs in its own session, and their
        model work is batched together. The new session also becomes the default one (for a single user
        who then calls ``rosa2(...)`` / ``rosa2.session``).
        """
        return interact(self, example, max_turns, session_id, carry_over_from)

    async def ainteract(self, example: dspy.Example, max_turns: int | None = None, session_id: str | None = None,
                        carry_over_from: str | None = None) -> dspy.Prediction:
        """Async twin of :meth:`interact`: ``await asyncio.gather(*(rosa2.ainteract(e) for e in examples))``."""
        return await asyncio.to_thread(self.interact, example, max_turns, session_id, carry_over_from)

    def as_interaction(self, max_turns: int | None = None, keep_sessions: bool = False) -> dspy.Module:
        """This module as a DSPy program that runs one whole interaction per call, for ``dspy.Evaluate``
        (see ``rosa2_dspy.interactions``)."""
        return Interaction(self, max_turns=max_turns, keep_sessions=keep_sessions)

    def evaluate(self, devset: list[dspy.Example], metric: Any = None, **kwargs: Any) -> Any:
        """``dspy.Evaluate`` over whole interactions, each example its own session; the result carries the
        per-turn metrics as ``summary`` (see ``rosa2_dspy.interactions.evaluate``)."""
        return evaluate(self, devset, metric, **kwargs)
