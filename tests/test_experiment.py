"""The mode-comparison experiment (programs/experiment.py) end to end on the tiny model, loaded by path.

Loading the tiny model from a folder also exercises "any other model is a config value away".
"""

from __future__ import annotations

import json

import pytest

from programs import experiment, experiment_report, reporting
from rosa2_dspy import MODES
from rosa2_dspy.feedback.simulated_user import REVEAL, SOLUTION
from rosa2_dspy.records import TurnRecord


def test_every_mode_runs_on_the_same_tasks_and_reports_table_json_and_plot(tiny_model_dir, tmp_path, monkeypatch):
    results_dir = tmp_path / "results"
    monkeypatch.setattr(reporting, "RESULTS_DIR", results_dir)
    config = {
        "name": "tiny", "task": "intent", "limit": 2, "spread": True, "max_turns": 2,
        "actor": {"model": str(tiny_model_dir), "max_tokens": 8, "lora": {"rank": 4, "alpha": 8}},
        "refiner": {"lm": "actor", "fallback": "append", "max_tokens": 8},
        "weights": {"beta": 0.05, "max_norm": 2.0, "prior_baseline": 0.5},  # failures alone step: the weights path runs on a model that never succeeds
        "feedback": {"reveal": "hint", "reveal_after": 1},
    }
    results = experiment.run_experiment(config, progress=False)
    summaries = results["summaries"]
    assert list(summaries) == list(MODES)
    for mode, summary in summaries.items():
        assert summary["tasks"] == 2 and len(summary["accuracy_per_turn"]) == 2
        assert len(results["trajectories"][mode]) == 2
    # Which axes moved, per mode (the random tiny model never solves, so every first turn adapts).
    assert summaries["static"]["mean_delta_norm"] == 0 and summaries["prompt-only"]["mean_delta_norm"] == 0
    assert 0 < summaries["param-only"]["mean_delta_norm"] <= 2.0 and 0 < summaries["joint"]["mean_delta_norm"] <= 2.0
    assert summaries["prompt-only"]["seconds_per_turn"]["weights"] == 0
    assert summaries["param-only"]["seconds_per_turn"]["words"] == 0
    assert summaries["joint"]["seconds_per_turn"]["words"] > 0 and summaries["joint"]["seconds_per_turn"]["weights"] > 0
    assert results["step_norm_comparison"]["pairs"] == 2  # one step per task, also computed under the original words
    # One adapted joint turn per task, measured against the simulated user's gold (nothing revealed yet).
    theorem = results["theorem_4_1"]
    assert theorem["measured"] == 2 and theorem["skipped"] == {} and theorem["reference_sources"] == {"gold": 2}
    assert all(r["theorem41"] is None for m in MODES if m != "joint" for t in results["trajectories"][m] for r in t)

    paths = experiment_report.report(results, "tiny")
    written = json.loads(paths["json"].read_text())
    assert [row["mode"] for row in written["rows"]] == list(MODES)
    assert written["machine"]["cpu_count"] and written["trajectories"]["joint"][0][0]["turn"] == 1
    assert paths["json"].parent == paths["plot"].parent == results_dir
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_words_is_the_joint_modes_default_and_a_config_switch(tiny_model_dir):
    from rosa2_dspy import LocalLM

    actor = LocalLM(str(tiny_model_dir))
    config = {"modes": ["param-only", "joint"], "refiner": {"lm": "actor"}}
    modes = experiment.build_modes(config, actor, "intent")
    assert modes["joint"].compare_words and not modes["param-only"].compare_words
    assert not experiment.build_modes({**config, "compare_words": False}, actor, "intent")["joint"].compare_words


def test_a_served_actor_config_refuses_weight_modes():
    config = {"task": "intent", "limit": 1, "actor": {"model": "litellm:openai/gpt-4o-mini"}, "modes": ["joint"]}
    with pytest.raises(ValueError, match="served actor cannot update weights"):
        experiment.run_experiment(config, progress=False)


def test_unknown_config_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="default"):
        experiment.load_config("no-such-config")


def test_concurrent_run_gives_the_sequential_run_records(tiny_model_dir):
    config = {
        "task": "intent", "limit": 3, "spread": True, "max_turns": 2, "modes": ["prompt-only", "joint"],
        "actor": {"model": str(tiny_model_dir), "max_tokens": 8, "lora": {"rank": 4, "alpha": 8}},
        "refiner": {"lm": "actor", "fallback": "append", "max_tokens": 8},
        "weights": {"beta": 0.05, "max_norm": 2.0, "prior_baseline": 0.5},  # failures alone step: the weights path runs on a model that never succeeds
    }
    sequential = experiment.run_experiment({**config, "concurrency": 1}, progress=False)
    concurrent = experiment.run_experiment({**config, "concurrency": 6}, progress=False)

    def view(results):
        return {mode: [[(r["turn"], r["outputs"], r["reward"], r["instructions"], r["refined_instructions"],
                         round(r["delta_norm"], 4)) for r in t] for t in runs]
                for mode, runs in results["trajectories"].items()}

    assert view(concurrent) == view(sequential)
    assert any(r["delta_norm"] > 0 for t in concurrent["trajectories"]["joint"] for r in t)


def test_degenerate_detector_flags_babble_not_answers():
    from rosa2_dspy.records import degenerate

    assert degenerate("\ufffd Shant\u05b0,\n\ufffd Shant\u05b0,\n\ufffd Shant\u05b0,") == "non-text characters"
    assert degenerate("so so so so so so so so so so so so so so") == "repetition"
    assert degenerate("Hello\x07world") == "non-text characters"
    for fine in ("The answer is 3000 m.", "def f(x):\n    return x + 1\n", "", "It is 12, because 7 + 5 = 12."):
        assert degenerate(fine) == ""


def test_summaries_count_conversations_that_end_in_degenerate_output():
    from rosa2_dspy.records import TurnRecord, summarize

    babble = TurnRecord(turn=1, mode="joint", instructions={}, outputs={"answer": "\ufffd\ufffd x \ufffd"})
    fluent = TurnRecord(turn=1, mode="joint", instructions={}, outputs={"answer": "3000 m"})
    assert summarize([[babble], [fluent], [fluent, babble], [babble, fluent]], 2)["degenerate_final"] == 0.5


def test_reward_per_turn_keeps_a_finished_conversations_last_reward():
    from rosa2_dspy.records import TurnRecord, summarize

    def run(*rewards, solved_last=False):
        return [TurnRecord(turn=i + 1, mode="joint", instructions={}, outputs={}, reward=r,
                           solved=solved_last and i == len(rewards) - 1)
                for i, r in enumerate(rewards)]

    summary = summarize([run(0.0, 0.5, 1.0, solved_last=True), run(0.5, 0.5, 0.5, 0.5), run(0.0, 0.0, 0.0, 0.5)], 4)
    assert summary["reward_per_turn"] == pytest.approx([1 / 6, 1 / 3, 0.5, 2 / 3])
    low, high = summary["reward_per_turn_ci"][3]
    assert low <= 2 / 3 <= high


def turn(n, feedback, instruction):
    return {"turn": n, "instructions": {"predict": instruction}, "feedback": feedback}


def test_revealed_in_words_counts_turns_after_a_reveal_whose_instructions_hold_it(tmp_path, monkeypatch):
    reveal = "No, that's not right. " + REVEAL.format("3000 m")
    leaking = [turn(1, "No, that's not right.", "Answer."),  # nothing revealed yet: not counted
               turn(2, reveal, "Answer in meters."),  # revealed at the end of this turn's feedback
               turn(3, reveal, "Answer in meters. The answer is 3000 m."),  # holds it
               turn(4, "", "Answer in meters.")]
    clean = [turn(1, reveal, "Answer."), turn(2, "Hint: " + REVEAL.format("larger than 5") + " Wrong.", "Answer in m.")]
    counts = experiment_report.revealed_in_words({"joint": [leaking, clean], "static": [[turn(1, "", "Answer.")]]})
    assert counts == {"joint": {"holding": 1, "turns": 3}, "static": {"holding": 0, "turns": 0}}
    # a revealed solution (HumanEval): a turn holds it when its words copy a stretch of it
    solution = "def unique(xs):\n    return sorted(set(xs), key=lambda x: (abs(x), x))  # by size, then sign\n"
    shown = "0 of 2 tests passed. " + SOLUTION.format(solution)
    code = [turn(1, shown, "Write the function."),
            turn(2, shown, "Write the function.\n\nRequirements:\n- Write: return sorted(set(xs), key=lambda x: (abs(x), x))."),
            turn(3, "", "Write the function.\n\nRequirements:\n- Reply with the whole function.")]
    assert experiment_report.revealed_in_words({"prompt-only": [code]}) == {"prompt-only": {"holding": 1, "turns": 2}}

    # Re-analysing a results file written before the count adds it under `answer` and keeps the machine.
    results_dir = tmp_path / "results"
    monkeypatch.setattr(reporting, "RESULTS_DIR", results_dir)
    records = [[TurnRecord(mode="joint", outputs={"answer": "x"}, reward=0.0, solved=False, **t).to_dict() for t in c]
               for c in (leaking, clean)]
    old = {"benchmark": "old", "machine": {"cpu_count": 99}, "rows": [],
           "config": {"task": "intent", "max_turns": 4, "protocol": "answer"}, "trajectories": {"joint": records}}
    results_dir.mkdir()
    (results_dir / "old.json").write_text(json.dumps(old))
    written = json.loads(experiment.reanalyse(results_dir / "old.json")["json"].read_text())
    assert written["revealed_in_words"] == {"joint": {"holding": 1, "turns": 3}}
    assert written["machine"] == {"cpu_count": 99} and written["trajectories"] == old["trajectories"]
    assert [row["mode"] for row in written["rows"]] == ["joint"]
