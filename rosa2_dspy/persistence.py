"""Persistence: a ROSA2 module's sessions to a folder and back.

Layout: ``state.json`` (the program's DSPy state, the original instructions, every session's
instructions, switch state and turns) and ``adapters/<session id>/`` per session, a PEFT folder
(``adapter_config.json`` + ``adapter_model.safetensors``) written by ``save_pretrained``.
Loading reads and checks everything before anything is replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rosa2_dspy.errors import AdapterLoadError
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.sessions import Call, Session, Turn

if TYPE_CHECKING:
    from rosa2_dspy.rosa2 import ROSA2

STATE_VERSION = 1


def save(rosa2: "ROSA2", path: str | Path) -> Path:
    """Write ``rosa2``'s program state and sessions to the folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sessions = rosa2.sessions
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "mode": rosa2.mode,
        "program": rosa2.program.dump_state(),
        "original_instructions": rosa2.original_instructions,
        "current_session_id": rosa2.current_session_id,
        "sessions": {},
    }
    adapters = {}
    for sid, s in sessions.items():
        with s.lock:  # a consistent view of a conversation that may be mid-turn elsewhere
            state["sessions"][sid] = {
                "instructions": dict(s.instructions), "axis": s.axis, "stall": s.stall, "best_reward": s.best_reward,
                "turns": [{"inputs": t.inputs, "calls": [c.__dict__ for c in t.calls], "record": t.record.to_dict()}
                          for t in s.turns],
            }
            adapters[sid] = None if s.adapter is None else s.adapter.clone()
    (path / "state.json").write_text(json.dumps(state, indent=2, default=str))
    if rosa2.policy:
        for sid, vector in adapters.items():
            rosa2.policy.save_adapter(path / "adapters" / sid, vector=vector)
    return path


def load(rosa2: "ROSA2", path: str | Path) -> None:
    """Replace ``rosa2``'s sessions (and program state) with what :func:`save` wrote to ``path``."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{path} holds no readable ROSA2 state.json ({err}).") from err
    if state.get("version") != STATE_VERSION:
        raise AdapterLoadError(f"{path}: unsupported ROSA2 state version {state.get('version')}.")
    if set(state["original_instructions"]) != set(rosa2.original_instructions):
        raise AdapterLoadError(
            f"{path} was saved from a program with predictors {sorted(state['original_instructions'])}, "
            f"this one has {sorted(rosa2.original_instructions)}."
        )
    policy = rosa2.policy
    adapters = {sid: policy.read_adapter(path / "adapters" / sid) if policy else None for sid in state["sessions"]}
    sessions = {}
    for sid, s in state["sessions"].items():
        turns = [Turn(t["inputs"], [Call(**c) for c in t["calls"]], TurnRecord(**t["record"])) for t in s["turns"]]
        sessions[sid] = Session(sid, s["instructions"], adapters[sid], turns, None, s["axis"], s["stall"],
                                s["best_reward"])
    rosa2.program.load_state(state["program"])
    rosa2.original_instructions = state["original_instructions"]
    rosa2.store.replace_all(sessions, state["current_session_id"])
