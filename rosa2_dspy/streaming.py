"""Streaming through ROSA2: DSPy stream listeners bound to the wrapped program hear the copies that run.

ROSA2 runs a per-call copy of the wrapped program (with the session's words). DSPy's streaming matches
a listener to a predictor by object identity twice: ``Predict`` streams only if a listener's
``predict`` *is* that predictor, and ``dspy.streamify`` routes each chunk by the ``id`` of the
predictor that made the call. For the duration of one call, :func:`listening_to_copies` therefore
gives DSPy listeners bound to the copies (so the copies stream) and an adapter that reports the
original predictor as the caller (so the chunks reach the user's listeners).

Example:
    >>> stream = dspy.streamify(rosa2, stream_listeners=[StreamListener("answer")])   # doctest: +SKIP
    >>> for value in stream(question="How far is 3 km?"): ...                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import dspy
from dspy.streaming import StreamListener


class _CallerIsOriginal:
    """Runs an adapter with DSPy's ``caller_predict`` mapped from a per-call copy to its original."""

    def __init__(self, inner: Any, originals: dict[int, dspy.Predict]) -> None:
        self.inner, self.originals = inner, originals

    def _caller(self):
        caller = dspy.settings.caller_predict
        return dspy.settings.context(caller_predict=self.originals.get(id(caller), caller))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._caller():
            return self.inner(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        with self._caller():
            return await self.inner.acall(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def listening_to_copies(original: dspy.Module, copy: dspy.Module, adapter: Any) -> dict[str, Any]:
    """DSPy settings for running ``copy`` in place of ``original`` under the caller's stream listeners
    (``{}`` when nobody listens to one of ``original``'s predictors)."""
    listeners = dspy.settings.stream_listeners or []
    if not listeners:
        return {}
    originals, copies = dict(original.named_predictors()), dict(copy.named_predictors())
    proxies, mapping = [], {}
    for listener in listeners:
        name = next((n for n, p in originals.items() if p is listener.predict), None)
        if name is None or name not in copies:
            proxies.append(listener)
            continue
        proxies.append(StreamListener(listener.signature_field_name, predict=copies[name],
                                      predict_name=listener.predict_name, allow_reuse=listener.allow_reuse))
        mapping[id(copies[name])] = listener.predict
    return {"stream_listeners": proxies, "adapter": _CallerIsOriginal(adapter, mapping)} if mapping else {}
