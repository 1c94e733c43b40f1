"""Feedback sources: who tells the model "no, that's not it", and how.

A feedback source is any callable in DSPy's metric style, as GEPA metrics are::

    feedback_fn(example, prediction, trace=None, history=None) -> float | dspy.Prediction

(any DSPy metric shape works: ``(example, pred)``, ``(example, pred, trace)``, GEPA's
``(gold, pred, trace, pred_name, pred_trace)``, or a ``dspy.Module`` judge with such a ``forward``),
returning either a bare score in [0, 1] or a prediction with ``score`` and ``feedback`` (text), and
optionally ``solved`` (bool; default ``score >= threshold``) and ``reference`` (a dict of output-field
values when the feedback reveals the answer, which the weights step uses as a high-reward response).
``history`` (the earlier turns' records) is passed only to callables whose signature names it, so plain
DSPy and GEPA metrics plug in unchanged. Verifiers, simulated users and
LLM judges all fit this shape; :func:`as_feedback` checks and normalises what they return.
"""

from __future__ import annotations

import math as _math  # aliased: the submodule rosa2_dspy.feedback.math would shadow the name
from collections.abc import Callable
from typing import Any

import dspy

from rosa2_dspy.errors import FeedbackError
from rosa2_dspy.feedback._common import metric_caller

FeedbackFn = Callable[..., "float | dspy.Prediction"]


class Feedback(dspy.Prediction):
    """A normalised feedback: ``score`` in [0, 1], ``feedback`` text, ``solved``, optional ``reference``."""

    score: float
    feedback: str
    solved: bool
    reference: dict[str, Any] | None


def as_feedback(result: Any, threshold: float = 1.0) -> Feedback:
    """Check and normalise what a feedback source returned. Raises :class:`FeedbackError` if unusable."""
    if isinstance(result, bool) or isinstance(result, (int, float)):
        score, text, solved, reference = float(result), "", None, None
    elif isinstance(result, (dspy.Prediction, dict)):
        get = result.get
        if get("score") is None:
            raise FeedbackError(
                f"Feedback must carry a 'score' in [0, 1]; got fields {sorted(result.keys())}. "
                "Return dspy.Prediction(score=..., feedback='...')."
            )
        score, text, solved, reference = get("score"), get("feedback") or "", get("solved"), get("reference")
        if not isinstance(text, str):
            raise FeedbackError(f"Feedback text must be a string, got {type(text).__name__}.")
        if reference is not None and not isinstance(reference, dict):
            raise FeedbackError("Feedback 'reference' must be a dict of output-field values, e.g. {'answer': '42'}.")
    else:
        raise FeedbackError(
            f"A feedback source returned {type(result).__name__}; return a float score or "
            "dspy.Prediction(score=..., feedback='...')."
        )
    try:
        score = float(score)
    except (TypeError, ValueError) as err:
        raise FeedbackError(f"Feedback score {score!r} is not a number.") from err
    if not _math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise FeedbackError(f"Feedback score must be a finite number in [0, 1], got {score}.")
    solved = bool(score >= threshold) if solved is None else bool(solved)
    return Feedback(score=score, feedback=text.strip(), solved=solved, reference=reference)


def call_feedback(fn: FeedbackFn, example: Any, prediction: Any, trace: Any = None,
                  history: list[Any] | None = None, threshold: float = 1.0) -> Feedback:
    """Call a feedback source the DSPy-metric way (any metric arity, or a ``dspy.Module`` judge; see
    :func:`~rosa2_dspy.feedback._common.metric_caller`), passing ``history`` only if its signature names it."""
    return as_feedback(metric_caller(fn)(example, prediction, trace, history), threshold)


__all__ = ["Feedback", "FeedbackFn", "as_feedback", "call_feedback", "metric_caller"]

# The concrete sources, imported last: they build on the protocol above.
from rosa2_dspy.feedback.code import CodeVerifier  # noqa: E402
from rosa2_dspy.feedback.intent import IntentVerifier  # noqa: E402
from rosa2_dspy.feedback.math import MathVerifier, answers_match, extract_answer  # noqa: E402
from rosa2_dspy.feedback.simulated_user import SimulatedUser  # noqa: E402

__all__ += ["CodeVerifier", "IntentVerifier", "MathVerifier", "SimulatedUser", "answers_match", "extract_answer"]
