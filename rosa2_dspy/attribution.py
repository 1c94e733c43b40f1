"""Turn attribution: which of the wrapped program's predictors made each call of a turn, and what the model wrote.

A call is attributed to a predictor by its *name* — its place in the program, as ``named_predictors()``
gives it — not by object identity. Before a turn runs, every predictor of the turn's copy of the program is
tagged with its name; a copy of a predictor carries the tag, so calls made by the copies that
``dspy.BestOfN`` and ``dspy.Refine`` run (``module.deepcopy()`` per attempt) count as calls of the
original predictor. Predictors that are not part of the program (``Refine``'s advice step, a predictor made
on the fly) carry no tag and are not attributed.

The calls of a turn are those of DSPy's trace — the calls that produced the returned answer (for
``BestOfN``/``Refine``: the chosen attempt's). Each is paired with the raw completion the model wrote for it
(a :class:`~rosa2_dspy.local_lm.RawCompletion` recorded by ``lm_scope``), through a DSPy callback that sees
every predictor call start and end; a call that made other than exactly one LM call keeps no raw completion,
and the weights step formats its parsed outputs instead.

Example:
    >>> program = dspy.BestOfN(dspy.Predict("question -> answer"), N=2, reward_fn=..., threshold=1.0)  # doctest: +SKIP
    >>> tag_predictors(program)                                                 # doctest: +SKIP
    >>> recorder = CallRecorder(raw)                                             # doctest: +SKIP
    >>> with lm_scope(adapter, raw), dspy.context(trace=[], callbacks=[recorder]):  # doctest: +SKIP
    ...     program(question="...")
    ...     calls = recorder.calls(dspy.settings.trace)   # [Call("module", ...)]
"""

from __future__ import annotations

import threading
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from rosa2_dspy.sessions import Call

# The attribute that carries a predictor's name in the program. Deep copies keep it.
NAME_ATTR = "_rosa2_predictor_name"


def tag_predictors(program: dspy.Module) -> None:
    """Tag every predictor of ``program`` with its name (its place in the program)."""
    for name, predictor in program.named_predictors():
        setattr(predictor, NAME_ATTR, name)


def predictor_name(predictor: Any) -> str | None:
    """The name a predictor (or a copy of one) was tagged with; None for predictors outside the program."""
    return getattr(predictor, NAME_ATTR, None)


class CallRecorder(BaseCallback):
    """A DSPy callback that pairs each tagged predictor call with the raw completions made during it.

    Args:
        raw: the list that ``lm_scope`` appends the model's raw completions to, for this turn.
    """

    def __init__(self, raw: list) -> None:
        self.raw = raw
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}  # call id -> len(raw) when the call started
        self._completions: list[tuple[Any, str | None]] = []  # (outputs, the raw text) per finished call

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if isinstance(instance, dspy.Predict) and predictor_name(instance) is not None:
            with self._lock:
                self._open[call_id] = len(self.raw)

    def on_module_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        with self._lock:
            start = self._open.pop(call_id, None)
            if start is None or outputs is None:
                return
            made = self.raw[start:]
            # Exactly one LM call inside this predictor call: that is what the model wrote for it.
            self._completions.append((outputs, made[0].text if len(made) == 1 else None))

    def completion_of(self, outputs: Any) -> str | None:
        with self._lock:
            return next((text for out, text in self._completions if out is outputs), None)

    def calls(self, trace: list[tuple[Any, dict[str, Any], Any]]) -> list[Call]:
        """The trace's calls of the program's predictors, by name, each with its raw completion if known."""
        calls = []
        for predictor, inputs, outputs in trace:
            name = predictor_name(predictor)
            if name is not None:
                calls.append(Call(name, dict(inputs), dict(outputs.items()), self.completion_of(outputs)))
        return calls


def extend_parent_trace(parent_trace: list | None, trace: list, program: dspy.Module) -> None:
    """Report a turn's predictor calls to the caller's DSPy trace as calls of ``program``'s own predictors
    (found by name), so that a parent's optimizer that bootstraps from traces (``BootstrapFewShot``, GEPA)
    sees the wrapped program's calls: the turn itself runs on a tagged copy, under a trace of its own."""
    limit = dspy.settings.max_trace_size
    if parent_trace is None or limit <= 0:
        return
    originals = dict(program.named_predictors())
    for predictor, inputs, outputs in trace:
        original = originals.get(predictor_name(predictor))
        if original is not None:
            if len(parent_trace) >= limit:  # as dspy.Predict bounds it
                parent_trace.pop(0)
            parent_trace.append((original, inputs, outputs))
