"""Small helpers shared by the feedback sources, and how a feedback source is called (:func:`metric_caller`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import dspy


def field_text(obj: Any, name: str) -> str | None:
    """Read field ``name`` of an example, prediction or dict as text; None when absent or empty."""
    getter = getattr(obj, "get", None)
    value = getter(name) if callable(getter) else getattr(obj, name, None)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# -- calling a feedback source the way DSPy calls a metric ----------------------------------------------

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
# How many positional arguments to pass, in order of preference: DSPy's metric (example, pred, trace),
# the evaluation-only (example, pred), GEPA's (gold, pred, trace, pred_name, pred_trace).
_ARITIES = (3, 2, 5)

FeedbackCall = Callable[[Any, Any, Any, Any], Any]


def _describe(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def metric_caller(fn: Any) -> FeedbackCall:
    """How to call ``fn`` as a feedback source: returns ``call(example, prediction, trace, history)``.

    ``fn`` may be any DSPy metric: ``(example, pred)``, ``(example, pred, trace)``, GEPA's
    ``(gold, pred, trace, pred_name, pred_trace)`` (called with ``pred_name=pred_trace=None``: a score for
    the whole program), defaults and ``*args`` allowed; or a ``dspy.Module`` judge whose ``forward`` has
    one of these shapes (it is called like any module, so callbacks and usage tracking see it).
    ``history`` (the earlier turns' records) is passed, by keyword, only when the signature names it.

    Raises ``TypeError`` (with what to write instead) for shapes that cannot be called that way: not
    callable, a bare ``dspy.Predict`` (it takes its signature's fields as keywords), fewer than two
    positional parameters, more than five required ones, or required keyword-only parameters.
    """
    if isinstance(fn, dspy.Predict):
        raise TypeError(
            "A dspy.Predict cannot be a feedback source: it takes its signature's fields as keywords, not "
            "(example, prediction). Wrap it in a dspy.Module whose forward(example, prediction) calls it and "
            "returns dspy.Prediction(score=..., feedback=...)."
        )
    if not callable(fn):
        raise TypeError(f"A feedback source must be callable like a DSPy metric, got {type(fn).__name__}.")
    target = fn.forward if isinstance(fn, dspy.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: call it the way DSPy calls a metric
        return lambda example, prediction, trace, history: fn(example, prediction, trace)
    names = [p.name for p in params]
    takes_history = "history" in names and params[names.index("history")].kind is not inspect.Parameter.POSITIONAL_ONLY
    before_history = params[: names.index("history")] if takes_history else params
    positional = [p for p in before_history if p.kind in _POSITIONAL]
    required = [p for p in params if p.kind in _POSITIONAL and p.default is p.empty and p.name != "history"]
    required_keywords = [p.name for p in params
                         if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty and p.name != "history"]
    most = float("inf") if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in before_history) else len(positional)
    shape = f"{_describe(fn)}({', '.join(names)})"
    if required_keywords:
        raise TypeError(f"Feedback source {shape} needs keyword arguments {required_keywords} that a metric is "
                        "never given; give them defaults (or bind them with functools.partial).")
    arity = next((n for n in _ARITIES if len(required) <= n <= most), None)
    if arity is None:
        raise TypeError(
            f"Feedback source {shape} cannot be called as a DSPy metric: it must take (example, prediction), "
            "(example, prediction, trace) or GEPA's (gold, pred, trace, pred_name, pred_trace), plus optionally "
            "history=..."
        )

    def call(example: Any, prediction: Any, trace: Any = None, history: Any = None) -> Any:
        args = (example, prediction, trace, None, None)[:arity]
        return fn(*args, history=history) if takes_history else fn(*args)

    return call
