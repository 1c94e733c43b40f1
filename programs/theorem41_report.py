"""Theorem 4.1 across runs: the δ-target comparison that each experiment records, gathered in one table.

Every experiment with joint-mode turns measures, per adapted turn, the minimal linearised shift that
raises ``log π(reference)`` by δ under the original words x and under the refined words x*
(``rosa2_dspy/theorem41.py``) and summarises it under ``theorem_4_1`` in its results file. This script
reads those summaries (it measures nothing itself) and writes them side by side, with where each came
from, to ``results/<name>.json`` (default ``theorem41_embedded_cpu``).

Run: ``python -m programs.theorem41_report [results/a.json results/b.json ...]`` (default: every results
file with measured turns).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from programs.reporting import RESULTS_DIR, write_results
from rosa2_dspy.stats import with_ci


def summaries(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        payload = json.loads(path.read_text())
        t = payload.get("theorem_4_1") or {}
        if not t.get("measured"):
            continue
        same = t.get("same_level") or {}
        rows.append({
            "results": path.name, "protocol": payload.get("protocol"),
            "partial": bool(payload.get("partial")), "date": payload.get("machine", {}).get("date"),
            "turns": t["measured"], "conversations": t.get("conversations"), "delta": t.get("delta"),
            "median ratio": t.get("median_ratio"),
            "share ratio < 1": with_ci(t.get("share_below_1"), t.get("share_below_1_ci")),
            "mean log ratio": with_ci(t.get("mean_log_ratio"), t.get("mean_log_ratio_ci"), digits=3),
            "same-level share < 1": with_ci(same.get("share_below_1"), same.get("share_below_1_ci")),
            "summary": t,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--name", default="theorem41_embedded_cpu")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(p for p in RESULTS_DIR.glob("*.json") if p.stem != args.name)
    rows = summaries(paths)
    if not rows:
        raise SystemExit("No results file holds measured Theorem 4.1 turns (joint mode with measure_theorem41).")
    columns = [c for c in rows[0] if c != "summary"]
    write_results(args.name, rows, columns=columns, title="Theorem 4.1: ‖Δθ(x*)‖ / ‖Δθ(x)‖ per adapted turn",
                  extra={"sources": [str(p) for p in paths]})


if __name__ == "__main__":
    main()
