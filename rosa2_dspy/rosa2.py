"""ROSA2: a ``dspy.Module`` that wraps any DSPy program and co-adapts its words and weights per turn.

One turn (spec, "Turn t of ROSA2"):

1. **forward** — run the wrapped program with the session's instruction(s) and adapter;
2. **feedback** — a DSPy-metric-style source (or a person, via :meth:`ROSA2.adapt`) scores it;
3. **words** — :class:`~rosa2_dspy.words.InstructionRefiner` rewrites each predictor's instruction;
4. **weights** — a :class:`~rosa2_dspy.weights.WeightOptimizer` (ROSA's one step by default) updates
   the LoRA adapter, with gradients taken under the *refined* instructions: every response of the
   conversation is re-formatted with the new instruction before ``log pi(y | x*)`` is differentiated.

Modes (one switch, ``mode=``):

===============  ==============================================  =========================
mode             words                                           weights
===============  ==============================================  =========================
``static``       earlier turns + feedback replayed as chat turns  fixed
``prompt-only``  textual step                                    fixed
``param-only``   original instruction                            ROSA step
``switch``       one axis until reward stalls ``switch_patience`` turns, then the other
``joint``        textual step                                    ROSA step under new words
===============  ==============================================  =========================

Sessions (``rosa2_dspy.sessions``): each conversation has its own state — instructions, adapter
vector, turns. The model is shared and never holds a session's adapter: each call carries its
session's adapter to the LM (``lm_scope``), where the batching engine runs concurrent conversations
in one pass, each row under its own adapter. Which session a call runs in belongs to the call:
``with rosa2.in_session(sid):``, the session ``interact()`` opens for itself, else the default
session (one user in a notebook). So one instance serves many users from threads
(``dspy.Parallel``, ``dspy.Evaluate(num_threads=...)``, a thread pool over ``interact``) or asyncio
(``acall``, ``ainteract``). ``start_session(carry_over_from=...)`` carries adaptation across
conversations of one user.

This file is the turn loop. ROSA2's other methods come from small mixins beside it, one concern each:
which LM answers (``actor``, ``adapter``, ``policy``: ``rosa2_dspy.actors.ActorMixin``); the sessions API
(``start_session``, ``in_session``...: ``rosa2_dspy.sessions.SessionsMixin``); whole interactions
(``interact``, ``ainteract``, ``evaluate``: ``rosa2_dspy.interactions.InteractionsMixin``); saving,
loading and DSPy's copy/pickle hooks (``rosa2_dspy.persistence.PersistenceMixin``).
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from typing import Any

import dspy

from rosa2_dspy import persistence, theorem41
from rosa2_dspy.actors import ActorMixin
from rosa2_dspy.adapter import ConversationAdapter, LenientChatAdapter
from rosa2_dspy.attribution import CallRecorder, extend_parent_trace, tag_predictors
from rosa2_dspy.errors import FeedbackError, TurnFailedError
from rosa2_dspy.feedback import Feedback, FeedbackFn, as_feedback, metric_caller
from rosa2_dspy.interactions import InteractionsMixin
from rosa2_dspy.local_lm import LocalLM, lm_scope
from rosa2_dspy.streaming import listening_to_copies
from rosa2_dspy.turn import adapt_turn
from rosa2_dspy.persistence import PersistenceMixin
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.sessions import Session, SessionsMixin, SessionStore, Turn
from rosa2_dspy.weights import ROSAStep, WeightOptimizer
from rosa2_dspy.words import InstructionRefiner

MODES = ("static", "prompt-only", "param-only", "switch", "joint")


class _Hidden:
    """Holds a value out of sight of DSPy's ``named_parameters()`` (as ``dspy.Refine`` hides its reward
    function), so a ``dspy.Module`` judge used as the feedback source is not tuned or saved with the program."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class ROSA2(ActorMixin, SessionsMixin, InteractionsMixin, PersistenceMixin, dspy.Module):
    """Wrap a DSPy program so that it adapts its instructions and LoRA weights from feedback, turn by turn.

    Args:
        program: any DSPy module (``dspy.Predict``, ``dspy.ChainOfThought``, ``dspy.ReAct``, ``dspy.BestOfN``,
            ``dspy.Refine``, a multi-stage pipeline), optimized or not: each session starts from the
            program's instructions and demos as they are when it starts (see "Sessions" below).
        lm: the actor. ``None`` (default): the LM configured in DSPy when the module is called
            (``dspy.configure(lm=...)`` / ``dspy.context(lm=...)``), as for any DSPy module. A :class:`LocalLM`
            for the modes that move weights; any ``dspy.LM`` (e.g. a served model) for ``static`` and
            ``prompt-only``.
        feedback: a feedback source for :meth:`interact`: any DSPy metric (``(example, pred)``,
            ``(example, pred, trace)``, GEPA's five arguments) or a ``dspy.Module`` judge; it gets ``history=``
            only if its signature names it (see ``rosa2_dspy.feedback``).
        mode: one of ``static``, ``prompt-only``, ``param-only``, ``switch``, ``joint`` (ROSA2).
        refiner_lm: the words step's LM (e.g. ``dspy.LM("openai/gpt-4o-mini")``); default: the actor.
        refiner_style: ``"requirements"`` (default: the refiner lists the missing requirements, which are
            merged into the instruction) or ``"rewrite"`` (it rewrites the whole instruction; for strong
            refiners). See :class:`~rosa2_dspy.words.InstructionRefiner`.
        refiner_fallback: when the refiner's output is unusable, ``"keep"`` the instruction (default) or
            ``"append"`` the feedback to it as a requirement.
        weights: the weights step; default :class:`ROSAStep`.
        adapter: DSPy adapter for the actor (and the refiner); default: a :class:`LocalLM` actor's
            ``default_adapter`` (``LocalLM(adapter=...)``), else :class:`LenientChatAdapter`.
        max_turns: turns per interaction in :meth:`interact`.
        threshold: score at which a task counts as solved, when the source does not say.
        switch_patience: ``switch`` mode moves to the other axis after this many turns without a better reward.
        compare_words: also compute the weights step under the *original* words (not applied) and record
            its ``‖Δθ‖`` (``delta_norm_original_words``): the *step-norm comparison*, ROSA's own step under both
            contexts (not Theorem 4.1's quantity; see ``measure_theorem41``); costs one extra gradient pass,
            timed apart (``times["compare_words"]``), not as adaptation.
        measure_theorem41: on every turn whose words and weights both move, measure Theorem 4.1 as stated:
            the smallest parameter shift raising ``log π(reference | context)`` by ``theorem41_delta`` nats,
            under the original and the refined words, at the adapter the step starts from; recorded as
            ``TurnRecord.theorem41`` (see ``rosa2_dspy.theorem41``). Costs one batched gradient pass over the
            reference under both contexts per such turn, timed apart (``times["theorem41"]``). Off by default.
        theorem41_delta: the gain ``δ`` in nats (the ratio of the two shifts does not depend on it).
        expose_refiner: show the refiner's predictor to a parent's ``named_predictors()`` (so a parent's
            optimizer tunes and saves it). Off by default: like ``dspy.Refine``'s reward function, the
            refiner is ROSA2's machinery, not part of the program.

    Sessions: a new session takes the wrapped program's instructions and demos as they are when it starts,
    and keeps following the program until its first turn closes (so an optimizer that changes the program,
    even through this wrapper, is always evaluated and adapted from its current state); from then on the
    session owns its words. Sessions carried over or loaded keep the words they had.

    Example:
        >>> rosa2 = ROSA2(dspy.ChainOfThought("question -> answer"), lm=LocalLM(),   # doctest: +SKIP
        ...               feedback=my_metric, mode="joint")
        >>> result = rosa2.interact(dspy.Example(question="...", answer="...").with_inputs("question"))
        >>> result.answer, [r.reward for r in result.rosa2.trajectory]
        >>> with ThreadPoolExecutor(8) as pool:                   # many users, one instance, batched
        ...     results = list(pool.map(rosa2.interact, examples))
    """

    def __init__(
        self,
        program: dspy.Module,
        lm: dspy.BaseLM | None = None,
        feedback: FeedbackFn | None = None,
        *,
        mode: str = "joint",
        refiner_lm: dspy.BaseLM | None = None,
        refiner_style: str = "requirements",
        refiner_fallback: str = "keep",
        weights: WeightOptimizer | None = None,
        adapter: dspy.Adapter | None = None,
        max_turns: int = 5,
        threshold: float = 1.0,
        switch_patience: int = 1,
        compare_words: bool = False,
        measure_theorem41: bool = False,
        theorem41_delta: float = theorem41.DEFAULT_DELTA,
        expose_refiner: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if lm is not None:
            self._check_actor(lm, mode)
        if not program.named_predictors():
            raise ValueError("The wrapped program has no dspy.Predict inside; ROSA2 adapts predictors' instructions.")
        self.program = program
        self.lm = lm
        self.feedback_fn = feedback  # an unsupported shape fails here, not after the first turn
        self.mode = mode
        self.refiner = InstructionRefiner(lm=refiner_lm or lm, style=refiner_style, fallback=refiner_fallback)
        # DSPy's way to keep a sub-module away from optimizers: a compiled (frozen) module is left out of
        # a parent's named_parameters()/named_predictors(), and so from its optimizers and saves.
        self.refiner._compiled = not expose_refiner
        self.weights = weights or ROSAStep()
        self._adapter = adapter
        self._fallback_adapter = LenientChatAdapter()
        self.max_turns = max_turns
        self.threshold = threshold
        self.switch_patience = switch_patience
        self.compare_words = compare_words
        if not (math.isfinite(theorem41_delta) and theorem41_delta > 0):
            raise ValueError(f"theorem41_delta must be a finite number > 0 (nats to gain), got {theorem41_delta!r}.")
        self.measure_theorem41, self.theorem41_delta = measure_theorem41, theorem41_delta
        self.store = SessionStore(self._fresh_state)
        self.adaptation = persistence.AdaptationState(self)  # the sessions, as a DSPy parameter (save/load)

    @property
    def feedback_fn(self) -> FeedbackFn | None:
        """The feedback source :meth:`interact` calls (kept out of ``named_predictors()``)."""
        return self._feedback.value

    @feedback_fn.setter
    def feedback_fn(self, feedback: FeedbackFn | None) -> None:
        if feedback is not None:
            metric_caller(feedback)
        self._feedback = _Hidden(feedback)

    # ------------------------------------------------------------------ one turn: forward

    def _program_with(self, instructions: dict[str, str]) -> dspy.Module:
        """A copy of the wrapped program (its current demos included) running ``instructions``, each predictor
        tagged with its name so that calls of its copies are attributed to it. The original is never
        modified, so concurrent sessions each see their own words."""
        program = self.program.deepcopy()
        for name, predictor in program.named_predictors():
            if name in instructions:
                predictor.signature = predictor.signature.with_instructions(instructions[name])
        tag_predictors(program)
        return program

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Run the wrapped program once in the calling context's session. Its feedback goes to :meth:`adapt`."""
        actor = self._weights_actor()
        policy = actor.policy if isinstance(actor, LocalLM) else None
        session = self.store.current()
        with session.lock:  # a consistent snapshot; the answer itself is computed outside the lock
            if session.follows_program and not session.turns:
                session.instructions = self.original_instructions
            if session.adapter is None and policy is not None:  # started before a LocalLM was configured
                with policy.lock:
                    session.adapter = policy.adapter_vector()
            instructions, adapter_vector, turns = dict(session.instructions), session.adapter, list(session.turns)
        program = self._program_with(instructions)
        adapter = self._conversation_adapter(program, turns) if self.mode == "static" else self.adapter
        raw: list = []
        recorder = CallRecorder(raw)
        callbacks = [*(dspy.settings.get("callbacks") or []), recorder]
        parent_trace = dspy.settings.trace
        start = time.perf_counter()
        settings = {"lm": actor, "adapter": adapter, "trace": [], "track_usage": True, "callbacks": callbacks,
                    **listening_to_copies(self.program, program, adapter)}
        with lm_scope(adapter_vector, raw), dspy.context(**settings):
            prediction = program(**inputs)
            trace = list(dspy.settings.trace)
        elapsed = time.perf_counter() - start
        calls = recorder.calls(trace)
        extend_parent_trace(parent_trace, trace, self.program)
        record = TurnRecord(turn=len(turns) + 1, mode=self.mode, instructions=instructions,
                            outputs={k: v for k, v in prediction.items()})
        record.times["generate"] = elapsed
        for usage in (prediction.get_lm_usage() or {}).values():
            record.tokens["prompt"] += int(usage.get("prompt_tokens") or 0)
            record.tokens["completion"] += int(usage.get("completion_tokens") or 0)
        with session.lock:
            session.pending = Turn(dict(inputs), calls, record)
        return prediction

    def _conversation_adapter(self, program: dspy.Module, turns: list[Turn]) -> ConversationAdapter:
        return ConversationAdapter.bound([
            (predictor.signature,
             [(c.inputs, c.outputs, t.record.feedback) for t in turns for c in t.calls if c.predictor == name])
            for name, predictor in program.named_predictors()
        ], base=self.adapter)

    # ------------------------------------------------------------------ one turn: feedback, words, weights

    def adapt(self, feedback: Feedback | str | dict | float, score: float | None = None,
              reference: dict[str, Any] | None = None) -> TurnRecord:
        """Take feedback on the last answer of the calling context's session and run the words/weights steps.

        ``feedback`` is a text (with ``score`` in [0, 1], default 0: "not it"), or what a feedback source
        returns. Empty or malformed feedback raises :class:`FeedbackError` and the turn stays pending,
        so nothing is lost and the call can be repeated with valid feedback.
        """
        self._weights_actor()  # a weight mode needs a LocalLM now too: fail before the turn is touched
        session = self.store.current()
        with session.lock:
            if session.pending is None:
                raise RuntimeError("No answer awaits feedback: call the module (forward) first.")
            if isinstance(feedback, str):
                if not feedback.strip() and score is None:
                    raise FeedbackError("Empty feedback: say what is wrong, or give a score in [0, 1].")
                feedback = {"score": 0.0 if score is None else score, "feedback": feedback, "reference": reference}
            verdict = feedback if isinstance(feedback, Feedback) else as_feedback(feedback, self.threshold)
            return self._close_turn(session, verdict, adapt=True).record

    def _close_turn(self, session: Session, verdict: Feedback, adapt: bool,
                    accepted: tuple[dict[str, Any] | None, str | None] = (None, None)) -> Turn:
        """Record the verdict on the pending turn and (unless solved, or ``adapt`` is False) run the words and
        weights steps — all or nothing: if a step fails, the session is exactly as before (the turn pending
        again) and :class:`TurnFailedError` says so; calling ``adapt`` again retries."""
        saved = (session.pending, list(session.turns), dict(session.instructions), session.adapter, session.axis,
                 session.stall, session.best_reward, copy.deepcopy(session.pending.record.__dict__))
        turn = self._record_feedback(session, verdict)
        if verdict.solved or not adapt:
            return turn
        try:
            self._adapt(session, turn, verdict.reference, accepted)
        except Exception as err:
            (session.pending, session.turns, session.instructions, session.adapter, session.axis, session.stall,
             session.best_reward, record_state) = saved
            session.pending.record.__dict__.update(record_state)
            raise TurnFailedError(
                f"Adapting to the feedback failed ({type(err).__name__}: {err}). The session is unchanged and the "
                "answer still awaits feedback: fix the cause and call adapt() again."
            ) from err
        return turn

    @staticmethod
    def _record_feedback(session: Session, verdict: Feedback) -> Turn:
        """Close the pending turn with its verdict and add it to the session's turns."""
        turn, session.pending = session.pending, None
        turn.record.reward, turn.record.solved, turn.record.feedback = verdict.score, verdict.solved, verdict.feedback
        session.turns.append(turn)
        return turn

    def _adapt(self, session: Session, turn: Turn, reference: dict[str, Any] | None,
               accepted: tuple[dict[str, Any] | None, str | None] = (None, None)) -> None:
        """The words and weights steps of a closed turn (see :mod:`rosa2_dspy.turn`)."""
        adapt_turn(self, session, turn, reference, accepted)

    # ------------------------------------------------------------------ async twins

    async def aforward(self, **inputs: Any) -> dspy.Prediction:
        """``await rosa2.acall(...)``: :meth:`forward` without blocking the event loop.

        The turn runs on a worker thread that keeps the task's context (its session); a LocalLM actor
        batches it with every other conversation in flight.
        """
        return await asyncio.to_thread(self.forward, **inputs)

    async def aadapt(self, feedback: Feedback | str | dict | float, score: float | None = None,
                     reference: dict[str, Any] | None = None) -> TurnRecord:
        """Async twin of :meth:`adapt`."""
        return await asyncio.to_thread(self.adapt, feedback, score, reference)
