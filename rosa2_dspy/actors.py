"""Which LM answers for a :class:`~rosa2_dspy.rosa2.ROSA2` module, with which DSPy adapter and torch policy.

ROSA2 follows DSPy's rule for the LM: the one it was given (``ROSA2(..., lm=...)``), else the one the
wrapped program's predictors were set to, else the one configured at call time (``dspy.configure`` /
``dspy.context``). The modes that move weights need that actor to be a :class:`LocalLM` (a transformers +
PEFT model whose adapter the weights step updates); :func:`check_actor` says so, with what to do, before
anything is touched. :class:`ActorMixin` gives ROSA2 its ``actor``, ``adapter`` and ``policy``
properties; they read the module's settings (``lm``, ``mode``, ``program``, the adapter it was given) and
change nothing.

Example:
    >>> rosa2 = ROSA2(dspy.Predict("question -> answer"), mode="prompt-only")     # doctest: +SKIP
    >>> with dspy.context(lm=LocalLM()):                                           # doctest: +SKIP
    ...     rosa2.actor, rosa2.policy          # the configured LocalLM and its LoRAPolicy
"""

from __future__ import annotations

from typing import Any

import dspy

from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.policy import LoRAPolicy

WEIGHT_MODES = {"param-only", "switch", "joint"}  # the modes (of rosa2.MODES) whose weights step needs a LocalLM


def check_actor(lm: Any, mode: str) -> None:
    """Raise TypeError, saying what to do, when ``mode`` moves weights and ``lm`` is not a LocalLM."""
    if mode in WEIGHT_MODES and not isinstance(lm, LocalLM):
        got = "no LM" if lm is None else type(lm).__name__
        raise TypeError(
            f"mode={mode!r} updates weights, which needs a LocalLM actor (a transformers + PEFT model); "
            f"got {got}. Pass ROSA2(..., lm=LocalLM(...)) or configure one with dspy.configure(lm=LocalLM(...)) "
            "/ dspy.context(lm=LocalLM(...)); or use mode='prompt-only' or 'static' with a served model."
        )


class ActorMixin:
    """ROSA2's actor side (mixed into :class:`~rosa2_dspy.rosa2.ROSA2`): reads ``lm``, ``mode``, ``program``,
    ``_adapter`` and ``_fallback_adapter``."""

    _check_actor = staticmethod(check_actor)

    @property
    def actor(self) -> dspy.BaseLM | None:
        """The LM that answers: ``lm`` if given, else the LM the program's predictors were set to (if they
        share one), else the one configured in DSPy at call time (``dspy.configure`` / ``dspy.context``)."""
        if self.lm is not None:
            return self.lm
        try:
            own = self.program.get_lm()
        except ValueError:  # predictors set to different LMs: each runs its own, the configured LM is the actor
            own = None
        return own or dspy.settings.lm

    def _weights_actor(self) -> dspy.BaseLM | None:
        """The actor, checked for this mode: a weight mode needs a LocalLM (raises TypeError saying what to do)."""
        actor = self.actor
        self._check_actor(actor, self.mode)
        return actor

    @property
    def adapter(self) -> dspy.Adapter:
        """The actor's DSPy adapter (used by the refiner too): the one given, else the actor's
        ``default_adapter`` (a :class:`LocalLM`'s, ``LocalLM(adapter=...)``), else :class:`LenientChatAdapter`."""
        return self._adapter or getattr(self.actor, "default_adapter", None) or self._fallback_adapter

    @adapter.setter
    def adapter(self, adapter: dspy.Adapter | None) -> None:
        self._adapter = adapter

    @property
    def policy(self) -> LoRAPolicy | None:
        """The actor's torch side (its :class:`LoRAPolicy`), or None when the actor is not a LocalLM."""
        actor = self.actor
        return actor.policy if isinstance(actor, LocalLM) else None
