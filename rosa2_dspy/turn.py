"""One turn's adaptation, after the user's feedback: words, then weights under the new words (spec steps 3-4).

:func:`adapt_turn` is what :class:`~rosa2_dspy.rosa2.ROSA2` runs when a turn closes unsolved:

1. **which axes move** (:func:`choose_axes`): the mode's (``prompt-only`` words, ``param-only``
   weights, ``joint`` both), or in ``switch`` mode one of them, changing after ``switch_patience``
   turns without a better reward;
2. **words** (:func:`words_step`): the refiner rewrites every predictor's instruction from the
   feedback and the conversation (:func:`history_text`); it is shown the model's answers, a revealed
   reference and the questions only as what the words must never copy;
3. **weights**: every answer of the conversation, and a revealed reference, as responses to prompts
   under the *refined* words (:func:`scored_responses`), then one weights step from the session's
   adapter. Measurements that are not adaptation (the step under the original words, the Theorem 4.1
   shifts, the weights step's ``logprob_after`` of responses its KL check did not score) are timed apart.

The functions read the module's settings (``mode``, ``refiner``, ``weights``, ``adapter``, ``program``...)
and change only the session and the turn's record.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import dspy
from dspy.adapters.chat_adapter import field_header_pattern

from rosa2_dspy import theorem41
from rosa2_dspy.local_lm import lm_scope
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.sessions import Session, Turn
from rosa2_dspy.weights import ScoredResponse

if TYPE_CHECKING:
    from rosa2_dspy.rosa2 import ROSA2


def adapt_turn(rosa2: ROSA2, session: Session, turn: Turn, reference: dict[str, Any] | None,
               accepted: tuple[dict[str, Any] | None, str | None] = (None, None)) -> None:
    """Run the words and weights steps for ``turn`` (just closed, with its feedback) in ``session``."""
    record = turn.record
    move_words, move_weights = choose_axes(rosa2, session, record.reward)
    refined = dict(session.instructions)
    if move_words:
        start = time.perf_counter()
        refined = words_step(rosa2, session, record, reference)
        record.refined_instructions = dict(refined)
        record.times["words"] = time.perf_counter() - start
    if move_words and move_weights and rosa2.measure_theorem41:
        start = time.perf_counter()
        target, source = theorem41.choose_reference(reference, *accepted)
        original, new = ([r for r in scored_responses(rosa2, session, words, target) if r.source == "reference"]
                         for words in (session.instructions, refined))
        record.theorem41 = theorem41.measure(rosa2.policy, original, new, session.adapter, rosa2.theorem41_delta,
                                             source, words_changed=refined != session.instructions)
        record.times["theorem41"] = time.perf_counter() - start
    if move_weights:
        policy = rosa2.policy
        if rosa2.compare_words and refined != session.instructions:
            start = time.perf_counter()
            dry = rosa2.weights.step(policy, scored_responses(rosa2, session, session.instructions, reference),
                                     apply=False, adapter=session.adapter)
            record.delta_norm_original_words = dry.raw_delta_norm
            record.times["compare_words"] = time.perf_counter() - start
        start = time.perf_counter()
        step = rosa2.weights.step(policy, scored_responses(rosa2, session, refined, reference), adapter=session.adapter)
        if step.applied:
            session.adapter = step.adapter
        record.weights = step.summary()
        record.delta_norm = step.delta_norm if step.applied else 0.0
        # logprob_after of the responses the KL check did not score is a measurement, not adaptation.
        record.times["weights"] = time.perf_counter() - start - step.measure_seconds
        if step.measure_seconds:
            record.times["measure_after"] = step.measure_seconds
    session.instructions = refined


def choose_axes(rosa2: ROSA2, session: Session, reward: float) -> tuple[bool, bool]:
    """``(move words, move weights)`` this turn; in ``switch`` mode also advances the session's axis."""
    if rosa2.mode == "switch":
        if reward <= session.best_reward:
            session.stall += 1
            if session.stall >= rosa2.switch_patience:
                session.axis = "weights" if session.axis == "words" else "words"
                session.stall = 0
        else:
            session.stall = 0
        session.best_reward = max(session.best_reward, reward)
        return session.axis == "words", session.axis == "weights"
    return rosa2.mode in {"prompt-only", "joint"}, rosa2.mode in {"param-only", "joint"}


def words_step(rosa2: ROSA2, session: Session, record: TurnRecord,
               reference: dict[str, Any] | None) -> dict[str, str]:
    """Every predictor's refined instruction; what the refiner did goes into ``record.words``."""
    refined = dict(session.instructions)
    if not record.feedback:
        record.words = {n: {"accepted": False, "reason": "no feedback text"} for n in refined}
        return refined
    revealed = [str(v) for v in (reference or {}).values()]
    for name in refined:
        calls = [c for t in session.turns for c in t.calls if c.predictor == name]
        # The refiner runs under the model's own adapter, not the conversation's.
        with lm_scope(), dspy.context(adapter=rosa2.adapter):
            out = rosa2.refiner(instruction=refined[name], feedback=record.feedback,
                                history=history_text(session, name),
                                answers=[str(v) for c in calls for v in c.outputs.values()],
                                reference=revealed,
                                inputs=[str(v) for c in calls for v in c.inputs.values()])
        refined[name] = out.refined_instruction
        record.words[name] = {"accepted": out.accepted, "reason": out.reason, "source": out.source,
                              "diagnosis": out.diagnosis, "chars": len(out.refined_instruction),
                              **{k: out.get(k) for k in ("requirements", "added", "replaced", "rejected")
                                 if out.get(k) is not None}}
    return refined


def history_text(session: Session, predictor: str) -> str:
    """The conversation so far, one line per turn: the predictor's answer, the reward, the feedback."""
    lines = []
    for t in session.turns:
        outputs = "; ".join(f"{k}: {v}" for c in t.calls if c.predictor == predictor for k, v in c.outputs.items())
        lines.append(f"Turn {t.record.turn} (reward {t.record.reward}): answer: {outputs} | feedback: {t.record.feedback}")
    return "\n".join(lines)


def scored_responses(rosa2: ROSA2, session: Session, instructions: dict[str, str],
                     reference: dict[str, Any] | None) -> list[ScoredResponse]:
    """Every answer of the conversation (and the reference) as responses to prompts under ``instructions``.

    The model's own answers are its raw completions (the ``y`` it actually produced); the reference is
    written the way the model writes: a bare value when the model's own completion had no field
    markers and one output field suffices, else in the adapter's field format.
    """
    predictors = dict(rosa2.program.named_predictors())
    adapter = rosa2.adapter
    responses = []
    last = session.turns[-1]
    for turn in session.turns:
        source = "current" if turn is last else "history"
        for call in turn.calls:
            signature = predictors[call.predictor].signature.with_instructions(instructions[call.predictor])
            messages = adapter.format(signature, demos=predictors[call.predictor].demos, inputs=call.inputs)
            own = call.completion
            if own is None:
                own = adapter.format_assistant_message_content(signature, call.outputs)
            responses.append(ScoredResponse(messages, own, float(turn.record.reward), source))
            if reference and turn is last and set(reference) & set(signature.output_fields):
                outputs = {**call.outputs, **{k: v for k, v in reference.items() if k in signature.output_fields}}
                bare = len(signature.output_fields) == 1 and not field_header_pattern.search(own)
                completion = (str(next(iter(outputs.values()))) if bare
                              else adapter.format_assistant_message_content(signature, outputs))
                responses.append(ScoredResponse(messages, completion, 1.0, "reference"))
    return responses
