"""Persistence: a ROSA2 module's sessions to a folder and back, trusting nothing it reads.

Layout of a save folder:

* ``state.json`` — what ROSA2 owns: per predictor its instructions, signature fields and demos; the
  original instructions; every session's instructions, switch state and turns;
* ``adapters/<session id>/`` — each session's adapter, a PEFT folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) written by ``save_pretrained``;
* ``manifest.json`` — the SHA-256 of every other file, written last.

``save`` is atomic from the reader's side: everything is written to a temporary folder beside the
target, and only a complete save replaces the previous one (which is kept until then). ``load`` checks
the manifest (a mixed, partial or edited folder is refused), refuses symlinks and any path outside the
folder, validates every field, and restores only instructions, demos, sessions and adapters — never
LM settings or other attributes (DSPy's own ``load_state`` would set any key it finds, ``config``
included). Every problem raises :class:`AdapterLoadError` and changes nothing.

Example:
    >>> rosa2.save("state/")                                     # doctest: +SKIP
    >>> ROSA2(program, lm, mode="joint").load("state/")          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from rosa2_dspy.errors import AdapterLoadError
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.sessions import Call, Session, Turn, check_session_id

if TYPE_CHECKING:
    from rosa2_dspy.rosa2 import ROSA2

STATE_VERSION = 2
_PREDICTOR_KEYS = {"traces", "train", "demos", "signature", "lm", "fields"}  # what Predict.dump_state writes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def save(rosa2: "ROSA2", path: str | Path) -> Path:
    """Write ``rosa2``'s program state and sessions to the folder ``path`` (atomically, see the module)."""
    path = Path(path)
    program = {}
    for name, predictor in rosa2.program.named_predictors():
        state = predictor.dump_state()
        program[name] = {"signature": state["signature"], "demos": state["demos"]}
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "mode": rosa2.mode,
        "program": program,
        "original_instructions": rosa2.original_instructions,
        "current_session_id": rosa2.current_session_id,
        "sessions": {},
    }
    adapters = {}
    for sid, s in rosa2.sessions.items():
        with s.lock:  # a consistent view of a conversation that may be mid-turn elsewhere
            state["sessions"][sid] = {
                "instructions": dict(s.instructions), "axis": s.axis, "stall": s.stall, "best_reward": s.best_reward,
                "turns": [{"inputs": t.inputs, "calls": [c.__dict__ for c in t.calls], "record": t.record.to_dict()}
                          for t in s.turns],
            }
            adapters[sid] = None if s.adapter is None else s.adapter.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.saving-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        if rosa2.policy:
            for sid, vector in adapters.items():
                rosa2.policy.save_adapter(tmp / "adapters" / sid, vector=vector)
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.previous-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load(rosa2: "ROSA2", path: str | Path) -> None:
    """Replace ``rosa2``'s sessions (and the program's instructions and demos) with what :func:`save` wrote."""
    path = Path(path)
    try:
        plan = _read(rosa2, path)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise AdapterLoadError(f"{path} holds a malformed ROSA2 state ({type(err).__name__}: {err}); "
                               "it was not written by ROSA2.save, or was edited.") from err
    predictors = dict(rosa2.program.named_predictors())
    for name, (instructions, demos) in plan["program"].items():
        predictors[name].signature = predictors[name].signature.with_instructions(instructions)
        predictors[name].demos = demos
    rosa2.original_instructions = plan["original_instructions"]
    rosa2.store.replace_all(plan["sessions"], plan["current_session_id"])


def _read(rosa2: "ROSA2", path: Path) -> dict[str, Any]:
    """Read and check everything; return what to apply. Raises on anything unexpected."""
    if path.is_symlink() or not path.is_dir():
        raise AdapterLoadError(f"{path} is not a ROSA2 save folder (a real folder, not a symlink).")
    root = path.resolve()
    files = _files(path)
    if any(p.is_symlink() for p in path.rglob("*")):
        raise AdapterLoadError(f"{path} contains symlinks; a ROSA2 save never does. Refusing it.")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{path} holds no readable ROSA2 state.json and manifest.json ({err}).") from err
    listed = {str(p.relative_to(path)) for p in files} - {"manifest.json"}
    if not isinstance(manifest, dict) or set(manifest) != listed:
        raise AdapterLoadError(f"{path} does not match its manifest (files missing or added): a partial or "
                               "mixed save. Save again.")
    for name, digest in manifest.items():
        if _sha256(path / name) != digest:
            raise AdapterLoadError(f"{path}/{name} changed after it was saved (checksum mismatch); refusing it.")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise AdapterLoadError(f"{path}: unsupported ROSA2 state version {state.get('version') if isinstance(state, dict) else None}.")
    original = state["original_instructions"]
    if not isinstance(original, dict) or set(original) != set(rosa2.original_instructions):
        raise AdapterLoadError(
            f"{path} was saved from a program with predictors {sorted(original) if isinstance(original, dict) else original}, "
            f"this one has {sorted(rosa2.original_instructions)}."
        )
    program = _check_program(rosa2, state["program"], path)
    sessions = {}
    for sid, s in state["sessions"].items():
        check_session_id(sid)
        instructions = _check_instructions(s["instructions"], original, f"session {sid!r}")
        adapter = None
        if rosa2.policy:
            folder = (path / "adapters" / sid).resolve()
            if folder.parent != root / "adapters":
                raise AdapterLoadError(f"Session {sid!r} points outside {path}; refusing it.")
            adapter = rosa2.policy.read_adapter(folder)
        turns = [Turn(dict(t["inputs"]), [Call(**c) for c in t["calls"]], TurnRecord(**t["record"])) for t in s["turns"]]
        if s["axis"] not in ("words", "weights"):
            raise AdapterLoadError(f"Session {sid!r} has an unknown switch axis {s['axis']!r}.")
        sessions[sid] = Session(sid, instructions, adapter, turns, None, s["axis"], int(s["stall"]),
                                float(s["best_reward"]))
    current = state["current_session_id"]
    if current is not None and current not in sessions:
        raise AdapterLoadError(f"{path}: the current session {current!r} is not among the saved sessions.")
    return {"program": program, "original_instructions": dict(original), "sessions": sessions,
            "current_session_id": current}


def _check_instructions(instructions: Any, original: dict[str, str], where: str) -> dict[str, str]:
    if not isinstance(instructions, dict) or set(instructions) != set(original):
        raise AdapterLoadError(f"The instructions of {where} do not name this program's predictors.")
    for name, text in instructions.items():
        if not isinstance(text, str) or not text.strip():
            raise AdapterLoadError(f"The instruction of predictor {name!r} in {where} is empty or not text.")
    return dict(instructions)


def _check_program(rosa2: "ROSA2", program: Any, path: Path) -> dict[str, tuple[str, list]]:
    """Per predictor: its saved instructions and demos, after checking the signature matches field for field."""
    predictors = dict(rosa2.program.named_predictors())
    if not isinstance(program, dict) or set(program) != set(predictors):
        raise AdapterLoadError(f"{path}: the saved program state does not name this program's predictors.")
    plan = {}
    for name, saved in program.items():
        unknown = set(saved) - _PREDICTOR_KEYS
        if unknown:
            raise AdapterLoadError(f"{path}: predictor {name!r} carries {sorted(unknown)}, which ROSA2 never saves "
                                   "(e.g. LM settings); refusing the state rather than applying them.")
        live = predictors[name].signature.dump_state()
        if saved["signature"].get("fields") != live["fields"]:
            raise AdapterLoadError(f"{path}: predictor {name!r} was saved with other signature fields than this "
                                   "program's; load it into the program it was saved from.")
        instructions = saved["signature"]["instructions"]
        if not isinstance(instructions, str) or not instructions.strip():
            raise AdapterLoadError(f"{path}: predictor {name!r} has an empty instruction.")
        demos = saved.get("demos", [])
        if not isinstance(demos, list) or not all(isinstance(d, dict) and all(isinstance(k, str) for k in d)
                                                  for d in demos):
            raise AdapterLoadError(f"{path}: predictor {name!r} has malformed demos.")
        plan[name] = (instructions, [dspy.Example(**d) for d in demos])
    return plan
