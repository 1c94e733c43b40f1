"""programs.compare_runs: one mode across runs on the same tasks, paired."""

import json

import pytest

from programs.compare_runs import compare, load_arm
from rosa2_dspy.records import TurnRecord

CONFIG = {"task": "intentgen", "split": "dev", "seed": 0, "limit": 3, "spread": True, "max_turns": 2}


def turn(k, reward, text="an answer", applied=False):
    return TurnRecord(turn=k, mode="joint", instructions={}, outputs={"answer": text}, reward=reward,
                      solved=reward == 1.0, weights={"applied": applied}, delta_norm=0.5 if applied else 0.0)


def write(path, trajectories, config=CONFIG):
    path.write_text(json.dumps({"config": config, "protocol": "hint", "trajectories": {
        "joint": [[r.to_dict() for r in t] for t in trajectories]}}))
    return path


def test_paired_arms(tmp_path):
    babble = "ab " * 40
    a = write(tmp_path / "a.json", [[turn(1, 0.0, applied=True), turn(2, 0.0, babble)],
                                    [turn(1, 0.5, applied=True), turn(2, 0.0)],
                                    [turn(1, 0.0, applied=True), turn(2, 0.0)]])
    b = write(tmp_path / "b.json", [[turn(1, 0.0), turn(2, 0.5)], [turn(1, 1.0)], [turn(1, 0.0), turn(2, 0.0)]])
    result = compare([load_arm(f"x={a}:joint"), load_arm(f"y={b}:joint")])
    rows = {r["arm"]: r for r in result["rows"]}
    assert result["turn"] == 2
    assert rows["x"]["degenerate at end"] == "1 of 3" and rows["y"]["degenerate at end"] == "0 of 3"
    assert rows["x"]["weight steps"] == 3 and rows["y"]["weight steps"] == 0
    assert result["per_task"]["y"]["reward"] == [0.5, 1.0, 0.0]  # a finished conversation keeps its last reward
    assert result["per_task"]["y"]["solved_at"] == [None, 1, None]
    (pair,) = result["pairs"]
    assert pair["reward_difference"] == pytest.approx(-0.5)
    (solved,) = result["solved_comparisons"]
    assert (solved["a_only"], solved["b_only"]) == (0, 1)


def test_refuses_arms_on_other_tasks(tmp_path):
    a = write(tmp_path / "a.json", [[turn(1, 0.0)]])
    b = write(tmp_path / "b.json", [[turn(1, 0.0)]], config={**CONFIG, "split": "test"})
    with pytest.raises(SystemExit, match="same tasks"):
        compare([load_arm(f"x={a}:joint"), load_arm(f"y={b}:joint")])
    with pytest.raises(SystemExit, match="no mode"):
        load_arm(f"x={a}:static")
