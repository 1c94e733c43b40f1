"""One way to report a benchmark: print a table and write JSON (with machine facts) under ``results/``."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(os.environ.get("ROSA2_RESULTS_DIR", Path(__file__).resolve().parent.parent / "results"))


def machine_facts() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": {name: _version(name) for name in ("transformers", "peft", "dspy", "litellm", "numpy")},
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-markdown table; floats get 4 significant digits, missing values (e.g. nothing solved) show "–"."""
    columns = columns or list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                  columns: list[str] | None = None, title: str | None = None) -> Path:
    """Print ``rows`` as a table (under ``title``, if given) and save them, with machine facts, to
    ``results/<name>.json`` (``extra`` may replace the machine facts, e.g. those of an earlier run)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_facts(), "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=str))
    if title:
        print(f"\n### {title}\n")
    print(format_table(rows, columns))
    print(f"\nwrote {path}")
    return path
