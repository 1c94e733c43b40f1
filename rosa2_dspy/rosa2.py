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

Sessions: each conversation has its own state — instructions, adapter vector, turns. The model is
shared; a session's adapter is loaded into it only while that session runs (under the model's lock)
and the previous adapter is put back afterwards, so one session's adaptation never leaks into another
or into plain uses of the LM. ``start_session(carry_over_from=...)`` carries adaptation across
conversations of one user.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import torch
from dspy.adapters.chat_adapter import field_header_pattern

from rosa2_dspy.adapter import LenientChatAdapter
from rosa2_dspy.errors import AdapterLoadError, FeedbackError
from rosa2_dspy.feedback import Feedback, FeedbackFn, as_feedback, call_feedback
from rosa2_dspy.local_lm import LocalLM, LoRAPolicy
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.weights import ROSAStep, ScoredResponse, WeightOptimizer
from rosa2_dspy.words import InstructionRefiner

MODES = ("static", "prompt-only", "param-only", "switch", "joint")
_WEIGHT_MODES = {"param-only", "switch", "joint"}
_STATE_VERSION = 1
_SERVED_LM_LOCK = threading.RLock()  # serialises sessions when the actor is a served model (no policy lock)


@dataclass
class _Call:
    """One predictor call inside a turn, as DSPy's trace records it, with the LM's raw completion."""

    predictor: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    completion: str | None = None


@dataclass
class _Turn:
    inputs: dict[str, Any]
    calls: list[_Call]
    record: TurnRecord


@dataclass
class Session:
    """One conversation's state: instructions per predictor, adapter vector, turns so far."""

    session_id: str
    instructions: dict[str, str]
    adapter: torch.Tensor | None
    turns: list[_Turn] = field(default_factory=list)
    pending: _Turn | None = None
    axis: str = "words"  # switch mode: the axis being moved
    stall: int = 0
    best_reward: float = -1.0

    @property
    def history(self) -> list[TurnRecord]:
        return [t.record for t in self.turns]


class ConversationAdapter(LenientChatAdapter):
    """Static mode's context: earlier turns and their feedback replayed as chat messages.

    For each predictor, its own earlier inputs/outputs become user/assistant turns, each later user turn
    starting with the feedback the previous answer got.
    """

    def __init__(self, turns_by_signature: dict[int, list[tuple[dict, dict, str]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.turns_by_signature = turns_by_signature

    def format(self, signature: Any, demos: list, inputs: dict) -> list[dict[str, Any]]:
        messages = super().format(signature, demos, inputs)
        turns = self.turns_by_signature.get(id(signature), [])
        if not turns:
            return messages
        conversation, previous_feedback = [], ""
        for past_inputs, past_outputs, feedback in turns:
            user = self.format_user_message_content(signature, past_inputs)
            conversation.append({"role": "user", "content": _with_feedback(previous_feedback, user)})
            conversation.append(
                {"role": "assistant", "content": self.format_assistant_message_content(signature, past_outputs)}
            )
            previous_feedback = feedback
        last = dict(messages[-1])
        last["content"] = _with_feedback(previous_feedback, last["content"])
        return messages[:-1] + conversation + [last]


def _with_feedback(feedback: str, content: str) -> str:
    return f"Feedback on your previous answer: {feedback}\n\n{content}" if feedback else content


class ROSA2(dspy.Module):
    """Wrap a DSPy program so that it adapts its instructions and LoRA weights from feedback, turn by turn.

    Args:
        program: any DSPy module (``dspy.Predict``, ``dspy.ChainOfThought``, a multi-stage pipeline).
        lm: the actor. A :class:`LocalLM` for the modes that move weights; any ``dspy.LM`` (e.g. a served
            model) for ``static`` and ``prompt-only``.
        feedback: a feedback source for :meth:`interact` (DSPy-metric style, see ``rosa2_dspy.feedback``).
        mode: one of ``static``, ``prompt-only``, ``param-only``, ``switch``, ``joint`` (ROSA2).
        refiner_lm: the words step's LM (e.g. ``dspy.LM("openai/gpt-4o-mini")``); default: the actor.
        refiner_fallback: when the refiner's rewrite is unusable, ``"keep"`` the instruction (default) or
            ``"append"`` the feedback to it (see :class:`~rosa2_dspy.words.InstructionRefiner`).
        weights: the weights step; default :class:`ROSAStep`.
        adapter: DSPy adapter for the actor; default :class:`LenientChatAdapter`.
        max_turns: turns per interaction in :meth:`interact`.
        threshold: score at which a task counts as solved, when the source does not say.
        switch_patience: ``switch`` mode moves to the other axis after this many turns without a better reward.
        compare_words: also compute the weights step under the *original* words (not applied) and record
            its ``‖Δθ‖`` — the Theorem 4.1 comparison; costs one extra gradient pass per response.

    Example:
        >>> rosa2 = ROSA2(dspy.ChainOfThought("question -> answer"), lm=LocalLM(),   # doctest: +SKIP
        ...               feedback=my_metric, mode="joint")
        >>> result = rosa2.interact(dspy.Example(question="...", answer="...").with_inputs("question"))
        >>> [r.reward for r in result.trajectory]
    """

    def __init__(
        self,
        program: dspy.Module,
        lm: dspy.BaseLM,
        feedback: FeedbackFn | None = None,
        *,
        mode: str = "joint",
        refiner_lm: dspy.BaseLM | None = None,
        refiner_fallback: str = "keep",
        weights: WeightOptimizer | None = None,
        adapter: dspy.Adapter | None = None,
        max_turns: int = 5,
        threshold: float = 1.0,
        switch_patience: int = 1,
        compare_words: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if mode in _WEIGHT_MODES and not isinstance(lm, LocalLM):
            raise TypeError(
                f"mode={mode!r} updates weights, which needs a LocalLM actor (a transformers + PEFT model); "
                f"got {type(lm).__name__}. Use mode='prompt-only' or 'static' with a served model."
            )
        if not program.named_predictors():
            raise ValueError("The wrapped program has no dspy.Predict inside; ROSA2 adapts predictors' instructions.")
        self.program = program
        self.lm = lm
        self.feedback_fn = feedback
        self.mode = mode
        self.refiner = InstructionRefiner(lm=refiner_lm or lm, fallback=refiner_fallback)
        self.weights = weights or ROSAStep()
        self.adapter = adapter or LenientChatAdapter()
        self.max_turns = max_turns
        self.threshold = threshold
        self.switch_patience = switch_patience
        self.compare_words = compare_words
        self.original_instructions = {n: p.signature.instructions for n, p in program.named_predictors()}
        self.sessions: dict[str, Session] = {}
        self.current_session_id: str | None = None

    # ------------------------------------------------------------------ sessions

    @property
    def policy(self) -> LoRAPolicy | None:
        return self.lm.policy if isinstance(self.lm, LocalLM) else None

    def start_session(self, session_id: str | None = None, carry_over_from: str | None = None) -> str:
        """Start a conversation (and make it current): original instructions and the initial adapter,
        or, with ``carry_over_from``, that session's instructions and adapter."""
        session_id = session_id or uuid.uuid4().hex[:12]
        if session_id in self.sessions:
            raise ValueError(f"Session {session_id!r} exists; use use_session() or reset_session().")
        if carry_over_from is not None:
            source = self._session(carry_over_from)
            instructions, adapter = dict(source.instructions), _clone(source.adapter)
        else:
            instructions = dict(self.original_instructions)
            adapter = self.policy.initial_adapter_vector if self.policy else None
        self.sessions[session_id] = Session(session_id, instructions, adapter)
        self.current_session_id = session_id
        return session_id

    def use_session(self, session_id: str) -> None:
        self._session(session_id)
        self.current_session_id = session_id

    def reset_session(self, session_id: str | None = None) -> None:
        """Back to the original instructions and initial adapter; the turns are forgotten."""
        session = self._session(session_id)
        fresh = Session(session.session_id, dict(self.original_instructions),
                        self.policy.initial_adapter_vector if self.policy else None)
        self.sessions[session.session_id] = fresh

    def end_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        if self.current_session_id == session_id:
            self.current_session_id = None

    @property
    def session(self) -> Session:
        """The current session (one is started on first use)."""
        if self.current_session_id is None:
            self.start_session()
        return self.sessions[self.current_session_id]

    def _session(self, session_id: str | None) -> Session:
        if session_id is None:
            return self.session
        if session_id not in self.sessions:
            raise KeyError(f"No session {session_id!r}; known: {sorted(self.sessions)}.")
        return self.sessions[session_id]

    @contextlib.contextmanager
    def _activated(self, session: Session, instructions: dict[str, str] | None = None) -> Iterator[None]:
        """Run with the session's instructions and adapter; put the program and model back afterwards."""
        instructions = instructions or session.instructions
        predictors = dict(self.program.named_predictors())
        policy = self.policy
        with policy.lock if policy else _SERVED_LM_LOCK:
            saved_signatures = {n: p.signature for n, p in predictors.items()}
            saved_adapter = policy.adapter_vector() if policy else None
            try:
                for name, predictor in predictors.items():
                    predictor.signature = predictor.signature.with_instructions(instructions[name])
                if policy:
                    policy.set_adapter_vector(session.adapter)
                yield
            finally:
                for name, predictor in predictors.items():
                    predictor.signature = saved_signatures[name]
                if policy:
                    policy.set_adapter_vector(saved_adapter)

    # ------------------------------------------------------------------ one turn

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Run the wrapped program once in the current session. Its feedback goes to :meth:`adapt`."""
        session = self.session
        with self._activated(session):
            adapter = self._conversation_adapter(session) if self.mode == "static" else self.adapter
            marker = self.lm.history[-1] if self.lm.history else None
            start = time.perf_counter()
            with dspy.context(lm=self.lm, adapter=adapter, trace=[]):
                prediction = self.program(**inputs)
                trace = list(dspy.settings.trace)
            elapsed = time.perf_counter() - start
            names = {id(p): n for n, p in self.program.named_predictors()}
        calls = [_Call(names[id(p)], dict(i), dict(o.items())) for p, i, o in trace if id(p) in names]
        entries = _entries_after(self.lm.history, marker)
        if len(entries) == len(calls):  # one LM call per predictor call: keep what the model really wrote
            for call, entry in zip(calls, entries):
                output = (entry.get("outputs") or [None])[0]
                call.completion = output.get("text") if isinstance(output, dict) else output
        record = TurnRecord(
            turn=len(session.turns) + 1,
            mode=self.mode,
            instructions=dict(session.instructions),
            outputs={k: v for k, v in prediction.items()},
        )
        record.times["generate"] = elapsed
        for entry in entries:
            usage = entry.get("usage") or {}
            record.tokens["prompt"] += int(usage.get("prompt_tokens") or 0)
            record.tokens["completion"] += int(usage.get("completion_tokens") or 0)
        session.pending = _Turn(dict(inputs), calls, record)
        return prediction

    def _conversation_adapter(self, session: Session) -> ConversationAdapter:
        turns: dict[int, list] = {}
        for name, predictor in self.program.named_predictors():
            turns[id(predictor.signature)] = [
                (c.inputs, c.outputs, t.record.feedback) for t in session.turns for c in t.calls if c.predictor == name
            ]
        return ConversationAdapter(turns)

    def adapt(self, feedback: Feedback | str | dict | float, score: float | None = None,
              reference: dict[str, Any] | None = None) -> TurnRecord:
        """Take feedback on the last answer of the current session and run the words/weights steps.

        ``feedback`` is a text (with ``score`` in [0, 1], default 0: "not it"), or what a feedback source
        returns. Empty or malformed feedback raises :class:`FeedbackError` and the turn stays pending,
        so nothing is lost and the call can be repeated with valid feedback.
        """
        session = self.session
        if session.pending is None:
            raise RuntimeError("No answer awaits feedback: call the module (forward) first.")
        if isinstance(feedback, str):
            if not feedback.strip() and score is None:
                raise FeedbackError("Empty feedback: say what is wrong, or give a score in [0, 1].")
            feedback = {"score": 0.0 if score is None else score, "feedback": feedback, "reference": reference}
        verdict = feedback if isinstance(feedback, Feedback) else as_feedback(feedback, self.threshold)
        turn = self._record_feedback(session, verdict)
        if not verdict.solved:
            self._adapt(session, turn, verdict.reference)
        return turn.record

    @staticmethod
    def _record_feedback(session: Session, verdict: Feedback) -> _Turn:
        """Close the pending turn with its verdict and add it to the session's turns."""
        turn, session.pending = session.pending, None
        turn.record.reward, turn.record.solved, turn.record.feedback = verdict.score, verdict.solved, verdict.feedback
        session.turns.append(turn)
        return turn

    def _axes(self, session: Session, reward: float) -> tuple[bool, bool]:
        if self.mode == "switch":
            if reward <= session.best_reward:
                session.stall += 1
                if session.stall >= self.switch_patience:
                    session.axis = "weights" if session.axis == "words" else "words"
                    session.stall = 0
            else:
                session.stall = 0
            session.best_reward = max(session.best_reward, reward)
            return session.axis == "words", session.axis == "weights"
        return self.mode in {"prompt-only", "joint"}, self.mode in {"param-only", "joint"}

    def _adapt(self, session: Session, turn: _Turn, reference: dict[str, Any] | None) -> None:
        record = turn.record
        move_words, move_weights = self._axes(session, record.reward)
        refined = dict(session.instructions)
        if move_words:
            start = time.perf_counter()
            if not record.feedback:
                record.words = {n: {"accepted": False, "reason": "no feedback text"} for n in refined}
            else:
                for name in refined:
                    with dspy.context(adapter=self.adapter):
                        out = self.refiner(instruction=refined[name], feedback=record.feedback,
                                           history=self._history_text(session, name))
                    refined[name] = out.refined_instruction
                    record.words[name] = {"accepted": out.accepted, "reason": out.reason, "source": out.source,
                                          "diagnosis": out.diagnosis}
            record.refined_instructions = dict(refined)
            record.times["words"] = time.perf_counter() - start
        if move_weights:
            start = time.perf_counter()
            policy = self.policy
            responses = self._responses(session, refined, reference)
            with self._activated(session, refined):
                if self.compare_words and refined != session.instructions:
                    dry = self.weights.step(policy, self._responses(session, session.instructions, reference),
                                            apply=False)
                    record.delta_norm_original_words = dry.raw_delta_norm
                step = self.weights.step(policy, responses)
                if step.applied:
                    session.adapter = policy.adapter_vector()
            record.weights = step.summary()
            record.delta_norm = step.delta_norm if step.applied else 0.0
            record.times["weights"] = time.perf_counter() - start
        session.instructions = refined

    def _history_text(self, session: Session, predictor: str) -> str:
        lines = []
        for t in session.turns:
            outputs = "; ".join(f"{k}: {v}" for c in t.calls if c.predictor == predictor for k, v in c.outputs.items())
            lines.append(f"Turn {t.record.turn} (reward {t.record.reward}): answer: {outputs} | feedback: {t.record.feedback}")
        return "\n".join(lines)

    def _responses(self, session: Session, instructions: dict[str, str],
                   reference: dict[str, Any] | None) -> list[ScoredResponse]:
        """Every answer of the conversation (and the reference) as responses to prompts under ``instructions``.

        The model's own answers are its raw completions (the ``y`` it actually produced); the reference is
        written the way the model writes: a bare value when the model's own completion had no field
        markers and one output field suffices, else in the adapter's field format.
        """
        predictors = dict(self.program.named_predictors())
        responses = []
        last = session.turns[-1]
        for turn in session.turns:
            source = "current" if turn is last else "history"
            for call in turn.calls:
                signature = predictors[call.predictor].signature.with_instructions(instructions[call.predictor])
                messages = self.adapter.format(signature, demos=predictors[call.predictor].demos, inputs=call.inputs)
                own = call.completion
                if own is None:
                    own = self.adapter.format_assistant_message_content(signature, call.outputs)
                responses.append(ScoredResponse(messages, own, float(turn.record.reward), source))
                if reference and turn is last and set(reference) & set(signature.output_fields):
                    outputs = {**call.outputs, **{k: v for k, v in reference.items() if k in signature.output_fields}}
                    bare = len(signature.output_fields) == 1 and not field_header_pattern.search(own)
                    completion = (str(next(iter(outputs.values()))) if bare
                                  else self.adapter.format_assistant_message_content(signature, outputs))
                    responses.append(ScoredResponse(messages, completion, 1.0, "reference"))
        return responses

    # ------------------------------------------------------------------ whole interactions

    def interact(self, example: dspy.Example, max_turns: int | None = None, session_id: str | None = None,
                 carry_over_from: str | None = None) -> dspy.Prediction:
        """Run a whole interaction on ``example`` with the feedback source, in a new session.

        Returns the last prediction's fields plus ``trajectory`` (one :class:`TurnRecord` per turn),
        ``solved``, ``turns`` and ``session_id``. Stops once solved or after ``max_turns``.
        """
        if self.feedback_fn is None:
            raise ValueError("interact() needs a feedback source: ROSA2(..., feedback=my_metric).")
        max_turns = max_turns or self.max_turns
        session_id = self.start_session(session_id, carry_over_from=carry_over_from)
        inputs = example.inputs()
        prediction = None
        for turn in range(max_turns):
            prediction = self(**inputs)
            pending = self.session.pending
            start = time.perf_counter()
            # trace=None: DSPy metrics read a trace as "we are bootstrapping" and may change what they return.
            verdict = call_feedback(self.feedback_fn, example, prediction, None, history=self.session.history,
                                    threshold=self.threshold)
            pending.record.times["feedback"] = time.perf_counter() - start
            turn_done = self._record_feedback(self.session, verdict)
            if verdict.solved:
                break
            if turn < max_turns - 1:  # after the last turn no answer would use an adaptation
                self._adapt(self.session, turn_done, verdict.reference)
        trajectory = self.session.history
        return dspy.Prediction(**dict(prediction.items()), trajectory=trajectory, solved=bool(trajectory[-1].solved),
                               turns=len(trajectory), session_id=session_id)

    # ------------------------------------------------------------------ saving and loading

    def save(self, path: str | Path, **_: Any) -> Path:
        """Save the program's state and every session (instructions, turns, adapter) to a folder.

        ``state.json`` holds the program state (DSPy's ``dump_state``) and the sessions; each session's
        adapter is a PEFT folder (``adapter_model.safetensors`` + ``adapter_config.json``).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "program": self.program.dump_state(),
            "original_instructions": self.original_instructions,
            "current_session_id": self.current_session_id,
            "sessions": {
                sid: {
                    "instructions": s.instructions, "axis": s.axis, "stall": s.stall, "best_reward": s.best_reward,
                    "turns": [{"inputs": t.inputs, "calls": [c.__dict__ for c in t.calls], "record": t.record.to_dict()}
                              for t in s.turns],
                }
                for sid, s in self.sessions.items()
            },
        }
        (path / "state.json").write_text(json.dumps(state, indent=2, default=str))
        if self.policy:
            for sid, s in self.sessions.items():
                self.policy.save_adapter(path / "adapters" / sid, vector=s.adapter)
        return path

    def load(self, path: str | Path, **_: Any) -> "ROSA2":
        """Load what :meth:`save` wrote. Everything is read and checked before anything is replaced."""
        path = Path(path)
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AdapterLoadError(f"{path} holds no readable ROSA2 state.json ({err}).") from err
        if state.get("version") != _STATE_VERSION:
            raise AdapterLoadError(f"{path}: unsupported ROSA2 state version {state.get('version')}.")
        if set(state["original_instructions"]) != set(self.original_instructions):
            raise AdapterLoadError(
                f"{path} was saved from a program with predictors {sorted(state['original_instructions'])}, "
                f"this one has {sorted(self.original_instructions)}."
            )
        adapters = {sid: self.policy.read_adapter(path / "adapters" / sid) if self.policy else None
                    for sid in state["sessions"]}
        sessions = {}
        for sid, s in state["sessions"].items():
            turns = [_Turn(t["inputs"], [_Call(**c) for c in t["calls"]], TurnRecord(**t["record"])) for t in s["turns"]]
            sessions[sid] = Session(sid, s["instructions"], adapters[sid], turns, None, s["axis"], s["stall"],
                                    s["best_reward"])
        self.program.load_state(state["program"])
        self.original_instructions = state["original_instructions"]
        self.sessions, self.current_session_id = sessions, state["current_session_id"]
        return self


def _entries_after(history: list[dict], marker: dict | None) -> list[dict]:
    """The LM history entries recorded after ``marker`` (DSPy caps the history by dropping the oldest, so an
    index taken before the call can be stale afterwards; the entry object itself is not)."""
    entries = []
    for entry in reversed(history):
        if entry is marker:
            break
        entries.append(entry)
    return entries[::-1]


def _clone(vector: torch.Tensor | None) -> torch.Tensor | None:
    return None if vector is None else vector.clone()
