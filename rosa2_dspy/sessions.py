"""Sessions: one conversation's state, and which conversation a call belongs to.

A :class:`Session` holds what one conversation has adapted: the instruction of each predictor, the
adapter vector, the turns so far. The model is shared; a session's adapter is never written into it,
it travels with the session's calls (``lm_scope``), so any number of sessions run at once.

Which session a call runs in belongs to the *call*, not to the ROSA2 instance: the session named by
the innermost ``with store.use(session_id):`` of the calling thread or asyncio task (a context
variable), else the store's default session — the single-user convenience: ``rosa2(...)`` then
``rosa2.adapt(...)`` in a notebook. Concurrent users name their session, or let ``interact()`` open one.

:class:`SessionsMixin` is ROSA2's side of it (``start_session``, ``in_session``, ``session``...): thin
methods over the module's :class:`SessionStore`.

Example:
    >>> store = SessionStore(lambda: ({"predict": "Answer."}, None))
    >>> sid = store.start()
    >>> with store.use(sid):
    ...     store.current().session_id == sid
    True
"""

from __future__ import annotations

import contextlib
import copy
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from rosa2_dspy.records import TurnRecord


_SESSION_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def check_session_id(session_id: Any) -> str:
    """A session id is also a folder name in a save: 1-64 of ``A-Z a-z 0-9 _ . -``, not starting with a dot."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ValueError(
            f"Invalid session id {session_id!r}: use 1-64 letters, digits, '_', '-' or '.', not starting with '.'."
        )
    return session_id


@dataclass
class Call:
    """One predictor call inside a turn, as DSPy's trace records it, with the LM's raw completion."""

    predictor: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    completion: str | None = None


@dataclass
class Turn:
    inputs: dict[str, Any]
    calls: list[Call]
    record: TurnRecord


@dataclass
class Session:
    """One conversation's state: instructions per predictor, adapter vector, turns so far.

    ``lock`` serialises the turns of this one conversation; different sessions never wait for each other.
    """

    session_id: str
    instructions: dict[str, str]
    adapter: torch.Tensor | None
    turns: list[Turn] = field(default_factory=list)
    pending: Turn | None = None
    axis: str = "words"  # switch mode: the axis being moved
    stall: int = 0
    best_reward: float = -1.0
    # True for a fresh session: until its first turn closes it runs the program's *current* instructions
    # (an optimizer may still be changing them); False for carried-over and loaded sessions, which keep theirs.
    follows_program: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def history(self) -> list[TurnRecord]:
        return [t.record for t in self.turns]

    def __deepcopy__(self, memo: dict) -> "Session":
        with self.lock:
            return Session(self.session_id, copy.deepcopy(self.instructions, memo), _clone(self.adapter),
                           copy.deepcopy(self.turns, memo), copy.deepcopy(self.pending, memo), self.axis,
                           self.stall, self.best_reward, self.follows_program)


class SessionStore:
    """The sessions of one ROSA2 module, safe to use from many threads and tasks at once.

    Args:
        fresh: returns the starting ``(instructions, adapter)`` of a new conversation.
    """

    def __init__(self, fresh: Callable[[], tuple[dict[str, str], torch.Tensor | None]]) -> None:
        self._fresh = fresh
        self._sessions: dict[str, Session] = {}
        self._lock = threading.RLock()
        self._context: ContextVar[str | None] = ContextVar(f"rosa2_session_{id(self)}", default=None)
        self.default_id: str | None = None

    def __deepcopy__(self, memo: dict) -> "SessionStore":
        clone = SessionStore(copy.deepcopy(self._fresh, memo))
        with self._lock:
            clone._sessions = {sid: copy.deepcopy(s, memo) for sid, s in self._sessions.items()}
            clone.default_id = self.default_id
        return clone

    # -- reading
    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def snapshot(self) -> dict[str, Session]:
        with self._lock:
            return dict(self._sessions)

    def get(self, session_id: str) -> Session:
        with self._lock:
            if session_id not in self._sessions:
                raise KeyError(f"No session {session_id!r}; known: {sorted(self._sessions)}.")
            return self._sessions[session_id]

    def current_id(self) -> str | None:
        """The calling context's session: the innermost ``use()``, else the default session."""
        return self._context.get() or self.default_id

    def current(self) -> Session:
        """The calling context's session; a default session is started on first use."""
        session_id = self.current_id()
        if session_id is None:
            with self._lock:
                if self.default_id is None:
                    self.default_id = self.start(make_default=True)
                session_id = self.default_id
        return self.get(session_id)

    # -- changing
    def start(self, session_id: str | None = None, carry_over_from: str | None = None,
              make_default: bool = False) -> str:
        """A new conversation: fresh instructions and adapter, or, with ``carry_over_from``, a copy of
        that session's. It becomes the default session when ``make_default`` or when none is set."""
        with self._lock:
            session_id = check_session_id(uuid.uuid4().hex[:12] if session_id is None else session_id)
            if session_id in self._sessions:
                raise ValueError(f"Session {session_id!r} exists; use use_session() or reset_session().")
            if carry_over_from is not None:
                source = self.get(carry_over_from)
                with source.lock:
                    instructions, adapter = dict(source.instructions), _clone(source.adapter)
            else:
                instructions, adapter = self._fresh()
            self._sessions[session_id] = Session(session_id, instructions, adapter,
                                                 follows_program=carry_over_from is None)
            if make_default:
                self.default_id = session_id
            return session_id

    def reset(self, session_id: str) -> None:
        """Back to fresh instructions and adapter; the turns are forgotten."""
        with self._lock:
            old = self.get(session_id)
            instructions, adapter = self._fresh()
            self._sessions[session_id] = Session(old.session_id, instructions, adapter, follows_program=True)

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)
            if self.default_id == session_id:
                self.default_id = None

    def replace_all(self, sessions: dict[str, Session], default_id: str | None) -> None:
        with self._lock:
            self._sessions = dict(sessions)
            self.default_id = default_id

    @contextlib.contextmanager
    def use(self, session_id: str) -> Iterator[Session]:
        """Within this block, this thread's or task's calls run in ``session_id``."""
        session = self.get(session_id)
        token = self._context.set(session_id)
        try:
            yield session
        finally:
            self._context.reset(token)


class SessionsMixin:
    """ROSA2's sessions API (mixed into :class:`~rosa2_dspy.rosa2.ROSA2`): what a new session starts from,
    and which session a call runs in; reads ``program``, ``policy`` and ``store`` (a :class:`SessionStore`)."""

    @property
    def original_instructions(self) -> dict[str, str]:
        """The wrapped program's current instruction per predictor: what a new session starts from.

        Read from the program each time, so instructions an optimizer, ``load_state`` or a parent's ``load``
        set after wrapping are what new sessions start from. Setting it sets the program's instructions.
        """
        return {n: p.signature.instructions for n, p in self.program.named_predictors()}

    @original_instructions.setter
    def original_instructions(self, instructions: dict[str, str]) -> None:
        for name, predictor in self.program.named_predictors():
            if name in instructions:
                predictor.signature = predictor.signature.with_instructions(instructions[name])

    def _fresh_state(self) -> tuple[dict[str, str], torch.Tensor | None]:
        """A new session starts from the program's current words and the model's own adapter (the initial
        one, unless the model was trained offline, e.g. by ``ROSAStep().compile``, or loaded)."""
        policy = self.policy
        if policy is None:
            return self.original_instructions, None
        with policy.lock:
            return self.original_instructions, policy.adapter_vector()

    @property
    def sessions(self) -> dict[str, Session]:
        """Every session by id (a snapshot; the sessions themselves are live)."""
        return self.store.snapshot()

    @property
    def current_session_id(self) -> str | None:
        """The session a call from here would run in (see :meth:`in_session`)."""
        return self.store.current_id()

    @property
    def session(self) -> Session:
        """The calling context's session (one is started on first use)."""
        return self.store.current()

    def start_session(self, session_id: str | None = None, carry_over_from: str | None = None) -> str:
        """Start a conversation and make it the default session: the program's current instructions and the initial
        adapter, or, with ``carry_over_from``, that session's instructions and adapter."""
        return self.store.start(session_id, carry_over_from, make_default=True)

    def use_session(self, session_id: str) -> None:
        """Make ``session_id`` the default session (for calls that name none)."""
        self.store.get(session_id)
        self.store.default_id = session_id

    def in_session(self, session_id: str) -> contextlib.AbstractContextManager[Session]:
        """``with rosa2.in_session(sid): ...`` — calls from this thread or task run in ``sid``; other
        threads are unaffected. The way to serve several users from one instance."""
        return self.store.use(session_id)

    def reset_session(self, session_id: str | None = None) -> None:
        """Back to the program's current instructions and the initial adapter; the turns are forgotten."""
        self.store.reset(session_id or self.session.session_id)

    def end_session(self, session_id: str) -> None:
        self.store.end(session_id)


def _clone(vector: torch.Tensor | None) -> torch.Tensor | None:
    return None if vector is None else vector.clone()
