"""Persistence: a ROSA2 module's sessions to disk (or into a parent program's state) and back, trusting nothing it reads.

Three forms, one schema (the *state*: per predictor its instructions, signature fields and demos; the
original instructions; every session's instructions, switch state and turns) and one loader:

* **a folder** (``rosa2.save("state/")``, any path without a ``.json`` suffix):

  * ``state.json`` — the state;
  * ``adapters/<session id>/`` — each session's adapter, a PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) written by ``save_pretrained``;
  * ``manifest.json`` — the SHA-256 of every other file, written last.

  Atomic from the reader's side: everything is written to a temporary folder beside the target, and
  only a complete save replaces the previous one (which is kept until then).

* **a JSON file** (``rosa2.save("x.json")``, DSPy's state-file convention): ``x.json`` is the state,
  its adapters lie beside it in ``x.adapters/<save id>/<session id>/`` (the same PEFT files). The JSON
  names its save id and carries the SHA-256 of each adapter file and a checksum of itself. A save
  writes a new ``<save id>`` folder first, then replaces ``x.json`` in one ``os.replace``, then removes
  older save folders: at every instant ``x.json`` names a complete folder, so an interrupted save
  leaves the previous one loadable.

* **embedded** (:func:`dump_state` / :func:`load_state`): the state as one JSON-ready dict with the
  adapters inside it as base64 of the same safetensors files (never pickled tensors) and a checksum.
  This is what ``ROSA2.dump_state()`` and a *parent* program's ``save``/``load`` carry (ROSA2 exposes
  it as its ``adaptation`` parameter, see :class:`AdaptationState`), and what ``save_program=True``
  pickles instead of live tensors and locks.

:class:`PersistenceMixin` gives ROSA2 its ``save`` and ``load`` over these forms (and DSPy's pickle forms)
and the hooks DSPy calls by name: ``named_parameters``, ``__deepcopy__``, ``__getstate__``, ``__setstate__``.

Every form is read the same untrusting way: checksums first (a mixed, partial or edited save is
refused), no symlinks and no path outside the save, every field validated, and only instructions,
demos, sessions and adapters restored — never LM settings or other attributes (DSPy's own
``load_state`` would set any key it finds, ``config`` included). Every problem raises
:class:`AdapterLoadError` and changes nothing.

Example:
    >>> rosa2.save("state/")                                     # doctest: +SKIP
    >>> rosa2.save("rosa2.json")          # rosa2.json + rosa2.adapters/   # doctest: +SKIP
    >>> ROSA2(program, lm, mode="joint").load("rosa2.json")      # doctest: +SKIP
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import dspy
from dspy.predict.parameter import Parameter

from rosa2_dspy.actors import WEIGHT_MODES
from rosa2_dspy.errors import AdapterLoadError
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.sessions import Call, Session, SessionStore, Turn, check_session_id

if TYPE_CHECKING:
    from rosa2_dspy.rosa2 import ROSA2

STATE_VERSION = 2
_PREDICTOR_KEYS = {"traces", "train", "demos", "signature", "lm", "fields"}  # what Predict.dump_state writes
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_SAVE_ID = re.compile(r"[0-9a-f]{16}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a state's canonical JSON, its own ``checksum`` key left out."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _snapshot(rosa2: "ROSA2") -> tuple[dict[str, Any], dict[str, torch.Tensor | None]]:
    """The state (JSON types only) and each session's adapter vector, from a consistent view of each session."""
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
    if rosa2.policy is None and any(a is not None for a in adapters.values()):
        raise TypeError(  # the adapters would be lost
            "Saving the sessions' adapters needs the LocalLM they belong to, and none is set: save under "
            "dspy.context(lm=LocalLM(...)) / dspy.configure(lm=...), or pass ROSA2(..., lm=LocalLM(...)).")
    return json.loads(json.dumps(state, default=str)), adapters


# ---------------------------------------------------------------------------------------------- saving

def save(rosa2: "ROSA2", path: str | Path) -> Path:
    """Write ``rosa2``'s state: to ``path`` + ``<stem>.adapters/`` when it ends in ``.json``, else to the
    folder ``path`` (atomically either way, see the module)."""
    path = Path(path)
    if path.suffix == ".json" and not path.is_dir():
        return _save_file(rosa2, path)
    return _save_folder(rosa2, path)


def _save_folder(rosa2: "ROSA2", path: Path) -> Path:
    state, adapters = _snapshot(rosa2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.saving-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
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


def adapters_folder(path: str | Path) -> Path:
    """Where ``save("x.json")`` puts the adapters: ``x.adapters/`` beside the file."""
    path = Path(path)
    return path.with_name(f"{path.stem}.adapters")


def _save_file(rosa2: "ROSA2", path: Path) -> Path:
    state, adapters = _snapshot(rosa2)
    path.parent.mkdir(parents=True, exist_ok=True)
    root, save_id = adapters_folder(path), uuid.uuid4().hex[:16]
    written = None
    if rosa2.policy:
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise FileExistsError(f"{root} exists and is not a folder; it is where {path.name}'s adapters go.")
        root.mkdir(exist_ok=True)
        tmp = root / f".{save_id}.saving"
        tmp.mkdir()
        try:
            for sid, vector in adapters.items():
                for name, data in rosa2.policy.adapter_files(vector).items():  # the two PEFT files, no README
                    (tmp / sid).mkdir(exist_ok=True)
                    (tmp / sid / name).write_bytes(data)
            digests = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
            written = root / save_id
            os.replace(tmp, written)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        state["adapters"] = {"format": "folder", "save_id": save_id, "sha256": digests}
    else:
        state["adapters"] = None
    state["checksum"] = _checksum(state)
    tmp_file = path.with_name(f".{path.name}.saving-{save_id[:8]}")
    try:
        tmp_file.write_text(json.dumps(state, indent=2))
        os.replace(tmp_file, path)  # the one step that switches readers to the new save
    except BaseException:
        tmp_file.unlink(missing_ok=True)
        if written is not None:
            shutil.rmtree(written, ignore_errors=True)
        raise
    if root.is_dir() and not root.is_symlink():
        for child in root.iterdir():  # earlier saves' adapters (and leftovers of interrupted saves)
            name = child.name.lstrip(".").removesuffix(".saving")
            if child.name != save_id and _SAVE_ID.fullmatch(name) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
    return path


def dump_state(rosa2: "ROSA2") -> dict[str, Any]:
    """The embedded form: the state with every session's adapter inside it (base64 of its safetensors
    files) and a checksum. JSON-ready; what a parent program's ``save`` writes for this ROSA2."""
    state, adapters = _snapshot(rosa2)
    if rosa2.policy:
        sessions = {}
        for sid, vector in adapters.items():
            files = rosa2.policy.adapter_files(vector)
            sessions[sid] = {name: base64.b64encode(files[name]).decode("ascii") for name in ADAPTER_FILES}
        state["adapters"] = {"format": "base64-safetensors", "sessions": sessions}
    else:
        state["adapters"] = None
    state["checksum"] = _checksum(state)
    return state


# ---------------------------------------------------------------------------------------------- loading

def load(rosa2: "ROSA2", path: str | Path) -> None:
    """Replace ``rosa2``'s sessions (and the program's instructions and demos) with what :func:`save` wrote,
    a folder or a ``.json`` file."""
    path = Path(path)
    if path.suffix == ".json" and not path.is_dir():
        _guarded(rosa2, path, lambda: _read_file(rosa2, path))
    else:
        _guarded(rosa2, path, lambda: _read_folder(rosa2, path))


def load_state(rosa2: "ROSA2", state: Any, where: str = "the ROSA2 state") -> None:
    """Load the embedded form (:func:`dump_state`), with the same checks as a save on disk."""
    _guarded(rosa2, where, lambda: _read_embedded(rosa2, state, where))


def _guarded(rosa2: "ROSA2", where: Any, read: Callable[[], dict[str, Any]]) -> None:
    try:
        plan = read()
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise AdapterLoadError(f"{where} holds a malformed ROSA2 state ({type(err).__name__}: {err}); "
                               "it was not written by ROSA2.save, or was edited.") from err
    _apply(rosa2, plan)


def _apply(rosa2: "ROSA2", plan: dict[str, Any]) -> None:
    predictors = dict(rosa2.program.named_predictors())
    for name, (instructions, demos) in plan["program"].items():
        predictors[name].signature = predictors[name].signature.with_instructions(instructions)
        predictors[name].demos = demos
    rosa2.original_instructions = plan["original_instructions"]
    rosa2.store.replace_all(plan["sessions"], plan["current_session_id"])


def _read_folder(rosa2: "ROSA2", path: Path) -> dict[str, Any]:
    """Read and check a save folder; return what to apply. Raises on anything unexpected."""
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

    def adapter(sid: str) -> torch.Tensor:
        folder = (path / "adapters" / sid).resolve()
        if folder.parent != root / "adapters":
            raise AdapterLoadError(f"Session {sid!r} points outside {path}; refusing it.")
        return rosa2.policy.read_adapter(folder)

    return _plan(rosa2, state, path, adapter)


def _read_file(rosa2: "ROSA2", path: Path) -> dict[str, Any]:
    """Read and check ``x.json`` and its ``x.adapters/<save id>/`` folder."""
    if path.is_symlink() or not path.is_file():
        raise AdapterLoadError(f"{path} is not a ROSA2 state file (a real file, not a symlink).")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{path} holds no readable ROSA2 state ({err}).") from err
    _check_checksum(state, path)
    for sid in state["sessions"]:
        check_session_id(sid)
    files: dict[str, dict[str, bytes]] = {}
    adapters = state.get("adapters")
    if rosa2.policy:
        if not isinstance(adapters, dict) or adapters.get("format") != "folder":
            raise AdapterLoadError(f"{path} was saved without adapters (from a ROSA2 without a LocalLM).")
        save_id, digests = adapters["save_id"], adapters["sha256"]
        if not isinstance(save_id, str) or not _SAVE_ID.fullmatch(save_id) or not isinstance(digests, dict):
            raise AdapterLoadError(f"{path} names its adapters folder in a way ROSA2.save never does.")
        root = adapters_folder(path)
        folder = root / save_id
        if root.is_symlink() or folder.is_symlink() or not folder.is_dir():
            raise AdapterLoadError(f"{path}'s adapters ({folder}) are missing or a symlink: a partial save.")
        if any(p.is_symlink() for p in folder.rglob("*")):
            raise AdapterLoadError(f"{folder} contains symlinks; a ROSA2 save never does. Refusing it.")
        present = {str(p.relative_to(folder)) for p in _files(folder)}
        expected = {f"{sid}/{name}" for sid in state["sessions"] for name in ADAPTER_FILES}
        if set(digests) != expected or present != expected:
            raise AdapterLoadError(f"{folder} does not match {path.name} (adapter files missing or added): a "
                                   "partial or mixed save. Save again.")
        for name in sorted(expected):
            data = (folder / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digests[name]:
                raise AdapterLoadError(f"{folder}/{name} changed after it was saved (checksum mismatch); "
                                       "refusing it.")
            sid, file = name.split("/")
            files.setdefault(sid, {})[file] = data
    return _plan(rosa2, state, path, lambda sid: rosa2.policy.read_adapter_bytes(
        files[sid]["adapter_config.json"], files[sid]["adapter_model.safetensors"], where=f"{path} (session {sid!r})"))


def _read_embedded(rosa2: "ROSA2", state: Any, where: str) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise AdapterLoadError(f"{where} is not a ROSA2 state (got {type(state).__name__}).")
    _check_checksum(state, where)
    for sid in state["sessions"]:
        check_session_id(sid)
    adapters = state.get("adapters")
    if rosa2.policy:
        if not isinstance(adapters, dict) or adapters.get("format") != "base64-safetensors":
            raise AdapterLoadError(f"{where} was saved without adapters (from a ROSA2 without a LocalLM).")
        encoded = adapters["sessions"]
        if not isinstance(encoded, dict) or set(encoded) != set(state["sessions"]):
            raise AdapterLoadError(f"{where}: the adapters do not match the sessions (missing or added).")

    def adapter(sid: str) -> torch.Tensor:
        files = encoded[sid]
        if not isinstance(files, dict) or set(files) != set(ADAPTER_FILES):
            raise AdapterLoadError(f"{where}: session {sid!r}'s adapter is not {list(ADAPTER_FILES)}.")
        data = {name: base64.b64decode(files[name], validate=True) for name in ADAPTER_FILES}
        return rosa2.policy.read_adapter_bytes(data["adapter_config.json"], data["adapter_model.safetensors"],
                                               where=f"{where} (session {sid!r})")

    return _plan(rosa2, state, where, adapter)


def _check_checksum(state: Any, where: Any) -> None:
    if not isinstance(state, dict) or state.get("checksum") != _checksum(state):
        raise AdapterLoadError(f"{where} changed after it was saved (checksum mismatch), or was not written by "
                               "ROSA2; refusing it.")


def _plan(rosa2: "ROSA2", state: Any, path: Any,
          read_adapter: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    """Check a state's fields against ``rosa2``; return what to apply. ``read_adapter(sid)`` reads and
    checks a session's adapter (called only when ``rosa2`` has a policy)."""
    if rosa2.policy is None and rosa2.mode in WEIGHT_MODES:
        raise AdapterLoadError(f"Loading {path} in mode {rosa2.mode!r} reads adapters into the actor's LocalLM, and "
                               "none is set: load under dspy.context(lm=LocalLM(...)) or give ROSA2 an lm.")
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
        adapter = read_adapter(sid) if rosa2.policy else None
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


class AdaptationState(Parameter):
    """A ROSA2's sessions (instructions per session, current session, adapters) as a DSPy parameter.

    DSPy saves a program as ``{name: parameter.dump_state()}`` over its ``named_parameters()``, and loads it
    with ``parameter.load_state(...)``. ROSA2 holds one of these as its ``adaptation`` attribute, so a
    parent program that contains a ROSA2 carries the ROSA2's state (key ``"<path>.adaptation"``) through
    its own ``save``/``load``/``dump_state``/``load_state``, in the embedded form of :func:`dump_state`,
    read back by the same untrusting loader. It is not a ``dspy.Predict``: optimizers never tune it.
    """

    def __init__(self, rosa2: "ROSA2") -> None:
        self.rosa2 = rosa2

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        return dump_state(self.rosa2)

    def load_state(self, state: dict[str, Any]) -> "AdaptationState":
        load_state(self.rosa2, state, where="the saved ROSA2 adaptation state")
        return self

    def reset(self) -> None:
        """``reset_copy()`` (what optimizers start a student from): no sessions, nothing adapted."""
        self.rosa2.store.replace_all({}, None)

    def __repr__(self) -> str:
        return f"AdaptationState({len(self.rosa2.store)} sessions)"


class PersistenceMixin:
    """ROSA2's saving, loading and DSPy's copy/pickle hooks (mixed into :class:`~rosa2_dspy.rosa2.ROSA2`,
    before ``dspy.Module``, whose methods they extend)."""

    def save(self, path: str | Path, save_program: bool = False, modules_to_serialize: list | None = None) -> Path:
        """Save the program's state and every session (instructions, turns, adapter), DSPy's way.

        * ``save("rosa2.json")``: the state in ``rosa2.json``, the adapters beside it in ``rosa2.adapters/``;
        * ``save("folder/")`` (no ``.json`` suffix): a folder with ``state.json``, ``adapters/<session>/``
          and a manifest (see ``rosa2_dspy.persistence``);
        * ``save("rosa2.pkl")`` and ``save("dir", save_program=True)``: DSPy's pickle forms; the model is
          pickled as a handle and the adapters as safetensors bytes.

        Each adapter is a PEFT folder's files (``adapter_model.safetensors`` + ``adapter_config.json``).
        A parent program that contains this module saves the same state through its own ``save``. Adapters
        are written through the actor's model: with ``lm=None``, save under the LocalLM you configured.
        """
        if save_program or Path(path).suffix == ".pkl":
            super().save(path, save_program=save_program, modules_to_serialize=modules_to_serialize)
            return Path(path)
        return save(self, path)  # refuses adapters without their LocalLM

    def load(self, path: str | Path, allow_pickle: bool = False, allow_unsafe_lm_state: bool = False) -> "ROSA2":
        """Load what :meth:`save` wrote (a ``.json`` file, a folder, or with ``allow_pickle`` a ``.pkl``).
        Everything is read and checked before anything is replaced."""
        self._weights_actor()  # a weight mode reads the adapters through the actor's model
        if Path(path).suffix == ".pkl":
            super().load(path, allow_pickle=allow_pickle, allow_unsafe_lm_state=allow_unsafe_lm_state)
        else:
            load(self, path)
        return self

    def named_parameters(self):
        # ``adaptation`` last: a parent's load_state applies it after the program's predictors.
        params = super().named_parameters()
        return [p for p in params if p[1] is not self.adaptation] + [p for p in params if p[1] is self.adaptation]

    def __deepcopy__(self, memo: dict) -> "ROSA2":
        # What copy.deepcopy did before __getstate__ existed (which pickling needs): a field-by-field copy.
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key not in ("history", "callbacks"):
                clone.__dict__[key] = copy.deepcopy(value, memo)
        clone.history, clone.callbacks = [], []
        return clone

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``save_program=True``): sessions travel in the embedded state form (adapters as
        safetensors bytes), the model as a handle that re-attaches on load; no locks, no live tensors."""
        state = super().__getstate__()
        state["store"] = None
        state["_sessions_state"] = dump_state(self)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        sessions = state.pop("_sessions_state")
        super().__setstate__(state)
        self.store = SessionStore(self._fresh_state)
        load_state(self, sessions, where="the pickled ROSA2 state")
