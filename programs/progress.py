"""Long runs that survive a kill: each finished conversation is appended to ``<name>.partial.jsonl``.

The first line holds a hash of everything that decides the run's records (the config, less the settings
in :data:`NOT_HASHED`, and the tasks); a rerun with the same config reads the finished conversations back
and runs only the rest, and a different config is refused (:class:`ConfigMismatchError`) rather than mixed
in. Used by ``programs.experiment``, ``programs.carryover`` and ``programs.grid``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import dspy

from programs import reporting
from rosa2_dspy.records import TurnRecord

# Settings that change how fast a run goes, not its records: a resumed run may change them.
NOT_HASHED = ("concurrency", "name", "ray")


def config_hash(config: dict[str, Any], examples: list[dspy.Example]) -> str:
    """A digest of everything that decides a run's records: the config (less :data:`NOT_HASHED`) and the tasks."""
    blob = json.dumps({"config": {k: v for k, v in config.items() if k not in NOT_HASHED},
                       "tasks": [dict(e.toDict()) for e in examples]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ConfigMismatchError(ValueError):
    """A progress file holds conversations of another config; they must not be mixed into this run."""


def encode_trajectory(trajectory: list[TurnRecord]) -> list[dict[str, Any]]:
    return json.loads(json.dumps([r.to_dict() for r in trajectory], default=str))


def decode_trajectory(rows: list[dict[str, Any]]) -> list[TurnRecord]:
    return [TurnRecord.from_dict(r) for r in rows]


class ProgressFile:
    """``<name>.partial.jsonl``: a header line (config hash and config), then one line per finished
    conversation ``{"mode", "task", "question", "seconds", "trajectory"}``, each appended and flushed
    as it finishes, so an interrupted run loses only the conversations in flight.

    ``decode`` turns a line's ``trajectory`` back into the run's record (default: a list of
    :class:`TurnRecord`; the carry-over protocol stores one user's whole protocol there)."""

    def __init__(self, path: Path, digest: str, config: dict[str, Any], decode: Any = decode_trajectory) -> None:
        self.path, self.digest, self.config, self.decode = Path(path), digest, config, decode

    def load(self, fresh: bool = False) -> dict[tuple[str, int], Any]:
        """The finished conversations of an earlier run of the same config (none if ``fresh`` or no file).

        Raises :class:`ConfigMismatchError` if the file belongs to another config. A last line cut short
        by a kill is dropped (that conversation runs again)."""
        if fresh or not self.path.is_file():
            self._start()
            return {}
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a line cut short: keep the whole lines only
            raw = raw[: raw.rfind(b"\n") + 1]
            self.path.write_bytes(raw)
        lines = raw.decode("utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("config_hash") != self.digest:
            raise ConfigMismatchError(
                f"{self.path} holds conversations of a different configuration or task set (hash "
                f"{header.get('config_hash')!r}, this run {self.digest!r}); they will not be mixed into this run. "
                "Rerun with --fresh to discard them and start over, or give another --name.")
        done: dict[tuple[str, int], Any] = {}
        for line in lines[1:]:
            row = json.loads(line)
            done[(row["mode"], int(row["task"]))] = self.decode(row["trajectory"])
        return done

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = {"config_hash": self.digest, "config": self.config,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.path.write_text(json.dumps(header, default=str) + "\n")

    def append(self, mode: str, task: int, question: str, seconds: float, trajectory: Any) -> None:
        line = json.dumps({"mode": mode, "task": task, "question": question, "seconds": seconds,
                           "trajectory": trajectory}, default=str)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def progress_path_for(name: str) -> Path:
    """Where a run named ``name`` keeps its finished conversations: next to its results file."""
    return Path(reporting.RESULTS_DIR) / f"{name}.partial.jsonl"
