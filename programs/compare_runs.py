"""Compare one mode across experiment runs on the same tasks (e.g. a method option on and off), paired.

Each ``--arm LABEL=RESULTS_JSON:MODE`` names a mode of a results file written by ``programs.experiment``.
The arms must hold the same tasks in the same order (same task, split, seed, limit and spread; checked
on the configs). Per arm: acc@k and reward@k with 95% bootstrap intervals, the share of conversations
ending in degenerate output, the weights steps applied and their mean ``‖Δθ‖``. Every pair of arms:
solved-by-k (McNemar and the paired bootstrap of the difference, ``rosa2_dspy.stats.compare_modes``),
and the paired differences of reward@k and of ending degenerate.

Run: ``python -m programs.compare_runs --arm "prior 0.5=results/a.json:joint" --arm "gate=results/b.json:joint"
--name prior_baseline_dev``; writes ``results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path
from typing import Any

from programs.reporting import format_table, write_results
from rosa2_dspy.records import TurnRecord, degenerate_answer, first_solved, reward_at
from rosa2_dspy.stats import bootstrap_ci, compare_modes, paired_difference_ci, solved_by, with_ci

TASK_KEYS = ("task", "split", "seed", "per_kind", "limit", "spread")


def load_arm(spec: str) -> dict[str, Any]:
    label, _, where = spec.partition("=")
    path, _, mode = where.rpartition(":")
    if not (label and path and mode):
        raise SystemExit(f"--arm wants LABEL=RESULTS_JSON:MODE, got {spec!r}.")
    payload = json.loads(Path(path).read_text())
    if mode not in payload.get("trajectories", {}):
        raise SystemExit(f"{path} has no mode {mode!r}; it has {', '.join(payload.get('trajectories', {}))}.")
    trajectories = [[TurnRecord.from_dict(r) for r in t] for t in payload["trajectories"][mode]]
    return {"label": label, "path": path, "mode": mode, "config": payload.get("config", {}),
            "protocol": payload.get("protocol"), "trajectories": trajectories,
            "max_turns": int(payload.get("config", {}).get("max_turns", max(map(len, trajectories))))}


def compare(arms: list[dict[str, Any]], k: int | None = None) -> dict[str, Any]:
    first = arms[0]
    for arm in arms[1:]:
        differs = [key for key in TASK_KEYS if arm["config"].get(key) != first["config"].get(key)]
        if differs or len(arm["trajectories"]) != len(first["trajectories"]) or arm["protocol"] != first["protocol"]:
            raise SystemExit(f"{arm['label']} and {first['label']} did not run the same tasks under the same "
                             f"protocol (differ in: {differs or 'task count or protocol'}).")
    k = k or min(arm["max_turns"] for arm in arms)
    rows, per_task = [], {}
    for arm in arms:
        t = arm["trajectories"]
        rewards = [float(reward_at(x, k) or 0.0) for x in t]  # a turn without a reward scores 0
        ends = [int(bool(x) and degenerate_answer(x[-1])) for x in t]
        steps = [r.delta_norm for x in t for r in x if r.weights and r.weights.get("applied")]
        per_task[arm["label"]] = {"solved_at": [first_solved(x) for x in t], "reward": rewards, "degenerate": ends}
        solved = solved_by(per_task[arm["label"]]["solved_at"], k)
        rows.append({
            "arm": arm["label"], "tasks": len(t),
            f"acc@{k}": with_ci(sum(solved) / len(t), bootstrap_ci(solved)),
            f"reward@{k}": with_ci(sum(rewards) / len(t), bootstrap_ci(rewards)),
            "degenerate at end": f"{sum(ends)} of {len(t)}",
            "weight steps": len(steps),
            "mean ‖Δθ‖": sum(steps) / len(steps) if steps else 0.0,
        })
    pairs = []
    for a, b in combinations(per_task, 2):
        pairs.append({
            "a": a, "b": b,
            "reward_difference": (sum(per_task[a]["reward"]) - sum(per_task[b]["reward"])) / len(per_task[a]["reward"]),
            "reward_difference_ci": paired_difference_ci(per_task[a]["reward"], per_task[b]["reward"]),
            "degenerate_difference_ci": paired_difference_ci(per_task[a]["degenerate"], per_task[b]["degenerate"]),
        })
    solved = compare_modes({label: v["solved_at"] for label, v in per_task.items()}, k)
    return {"turn": k, "rows": rows, "pairs": pairs, "solved_comparisons": solved, "per_task": per_task,
            "arms": [{key: arm[key] for key in ("label", "path", "mode", "protocol")} for arm in arms],
            "task_selection": {key: first["config"].get(key) for key in TASK_KEYS}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", required=True, help="LABEL=RESULTS_JSON:MODE (two or more)")
    parser.add_argument("--turn", type=int, default=None, help="k of acc@k and reward@k (default: the last turn)")
    parser.add_argument("--name", required=True, help="results/<name>.json")
    args = parser.parse_args(argv)
    if len(args.arm) < 2:
        raise SystemExit("Give at least two --arm.")
    result = compare([load_arm(spec) for spec in args.arm], args.turn)
    write_results(args.name, result["rows"], extra={key: v for key, v in result.items() if key != "rows"},
                  title=f"Arms on the same tasks (turn {result['turn']})")
    print()
    print(format_table([{"a": p["a"], "b": p["b"], "reward a-b": p["reward_difference"],
                         "95% CI": str(p["reward_difference_ci"])} for p in result["pairs"]]))
    print(format_table([{"a": c["a"], "b": c["b"], "solved a only": c["a_only"], "solved b only": c["b_only"],
                         "McNemar p": c["mcnemar_p"]} for c in result["solved_comparisons"]]))


if __name__ == "__main__":
    main()
