"""Generated intent tasks (programs/intentgen.py): the generator, the format/value checker, the oracle row of the
experiment runner and the carry-over protocol (programs/carryover.py), the last two on the tiny model."""

from __future__ import annotations

import json

import dspy
import pytest

from programs import carryover, experiment, experiment_report, reporting
from programs.intentgen import (EXAMPLE_NUMBER, KINDS, SPLITS, FormatValueVerifier, check, generate, questions,
                                users)
from programs.tasks import feedback_for, load_task, oracle_text, with_instruction_note
from rosa2_dspy.feedback import SimulatedUser

QUESTION, VALUE, UNIT = "How many minutes are in 3 hours?", 180, "minutes"
# kind -> answers that are (right form and value, right form only, right value only, neither)
HAND_MADE = {
    "prefix": ("Answer: 180", "Answer: 170", "180", "170"),
    "parens": ("(180)", "(170 minutes)", "180 minutes", "170"),
    "bare": ("180", "170", "180 minutes", "about 170"),
    "unit": ("3 hours is 180 minutes.", "170 minutes", "180", "170"),
    "caps": ("180 MINUTES", "170 MINUTES", "180 minutes", "170"),
    "words": ("one hundred and eighty minutes", "one hundred seventy", "180", "170"),
    "decimals": ("180.00", "170.00", "180", "170.5"),
    "bold": ("It is **180** minutes.", "**170**", "180", "170"),
}


def test_generator_is_seeded_sized_and_covers_every_kind():
    rows = generate("test", seed=0)
    assert rows == generate("test", seed=0) and rows != generate("test", seed=1)
    assert len(rows) >= 96 and len(KINDS) >= 6
    assert {r["kind"] for r in rows} == set(KINDS)
    assert all(sum(r["kind"] == k for r in rows) == 12 for k in KINDS)
    assert len({r["question"] for r in rows}) == len(rows)  # every task its own question
    assert any(k.plain for k in KINDS.values()) and any(not k.plain for k in KINDS.values())
    for row in rows:
        assert row["value"] != EXAMPLE_NUMBER and str(EXAMPLE_NUMBER) not in row["question"].split()
        assert check(row["kind"], row["answer"], row["value"], row["question"], row["unit"]) == (True, True)
        assert check(row["kind"], row["example"], row["value"], row["question"], row["unit"])[1] is False


def test_dev_and_test_splits_are_disjoint_for_every_seed():
    dev, test = {q["question"] for q in questions("dev")}, {q["question"] for q in questions("test")}
    assert dev and test and not dev & test
    for seed in range(4):
        assert {r["question"] for r in generate("dev", seed=seed)} <= dev
        assert {r["question"] for r in generate("test", seed=seed)} <= test
    with pytest.raises(ValueError, match="tune on dev"):
        questions("train")
    assert set(SPLITS) == {"dev", "test"}


@pytest.mark.parametrize("kind", sorted(HAND_MADE))
def test_checker_scores_format_and_value_separately(kind):
    assert set(HAND_MADE) == set(KINDS)
    both, form, value, neither = HAND_MADE[kind]
    assert check(kind, both, VALUE, QUESTION, UNIT) == (True, True)
    assert check(kind, form, VALUE, QUESTION, UNIT) == (True, False)
    assert check(kind, value, VALUE, QUESTION, UNIT) == (False, True)
    assert check(kind, neither, VALUE, QUESTION, UNIT) == (False, False)
    assert check(kind, "", VALUE, QUESTION, UNIT) == (False, False)


def test_the_value_is_the_last_number_stated():
    assert check("unit", "180 or 170 minutes", VALUE, QUESTION, UNIT) == (True, False)
    assert check("unit", "3 hours are 3 * 60 = 180 minutes", VALUE, QUESTION, UNIT) == (True, True)  # shown work


def test_verifier_says_what_is_wrong_without_the_intent_or_value_and_the_user_adds_them_per_protocol():
    task = dspy.Example(**generate("dev", per_kind=1, kinds=["parens"])[0]).with_inputs("question")
    value = str(task.value)
    verdict = FormatValueVerifier()(task, dspy.Prediction(answer=value))
    assert (verdict.format_ok, verdict.value_ok, verdict.solved, verdict.score) == (False, True, False, 0.5)
    assert "not written the way I want" in verdict.feedback and "parenthes" not in verdict.feedback
    none = SimulatedUser.for_protocol(FormatValueVerifier(), "none")(task, dspy.Prediction(answer="12"))
    assert "parenthes" not in none.feedback and value not in none.feedback and none.reference is None
    hint = feedback_for("intentgen", protocol="hint")(task, dspy.Prediction(answer="12"))
    assert task.intent in hint.feedback and task.example in hint.feedback
    assert task.answer not in hint.feedback and hint.reference is None
    told = feedback_for("intentgen", protocol="answer", reveal_after=0)(task, dspy.Prediction(answer="12"))
    assert told.reference == {"answer": task.answer}
    assert FormatValueVerifier()(task, dspy.Prediction(answer=task.answer)).solved


def test_the_task_loader_reads_the_generator_and_the_hand_written_task_has_no_split():
    rows = load_task("intentgen")
    assert len(rows) >= 96 and {r.split for r in rows} == {"test"} and set(rows[0].inputs().keys()) == {"question"}
    assert {r.split for r in load_task("intentgen", split="dev", per_kind=2)} == {"dev"}
    spread = load_task("intentgen", limit=len(KINDS), spread=True)
    assert {r.kind for r in spread} == set(KINDS)
    with pytest.raises(ValueError, match="no 'dev' split"):
        load_task("intent", split="dev")
    assert oracle_text("intentgen", rows[0]) == f"The user wants {rows[0].intent}."
    config = experiment.load_config("intent_gen")
    assert config["split"] == "test" and config["protocol"] == "hint" and config["oracle"]
    assert len(experiment.task_examples(config)) >= 96


def tiny_config(model_dir, **overrides):
    config = {
        "name": "tiny-intentgen", "task": "intentgen", "split": "dev", "per_kind": 1, "limit": 3, "spread": True,
        "max_turns": 2, "modes": ["static"], "oracle": True, "concurrency": 1, "protocol": "hint",
        "actor": {"model": str(model_dir), "max_tokens": 8, "lora": {"rank": 4, "alpha": 8}},
        "refiner": {"lm": "actor", "fallback": "append", "max_tokens": 8},
        "weights": {"beta": 0.05, "max_norm": 2.0, "prior_baseline": 0.5},  # failures alone step: the weights path runs on a model that never succeeds
    }
    config.update(overrides)
    return config


def test_oracle_row_is_the_static_programs_first_answer_with_the_oracle_instruction(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, one_torch_thread):
    monkeypatch.setattr(reporting, "RESULTS_DIR", tmp_path)
    config = tiny_config(tiny_model_dir)
    results = experiment.run_experiment(config, progress=False)
    examples = experiment.task_examples(config)
    oracle = results["trajectories"]["oracle"]
    assert len(oracle) == len(examples) == 3 and all(len(t) == 1 for t in oracle)

    from rosa2_dspy import ROSA2
    from rosa2_dspy.local_lm import LocalLM

    lm = LocalLM(str(tiny_model_dir), max_tokens=8)
    user = feedback_for("intentgen", protocol="hint")
    for example, trajectory in zip(examples, oracle):
        note = oracle_text("intentgen", example)
        program = with_instruction_note(dspy.Predict("question -> answer"), note)
        with dspy.context(lm=lm, adapter=ROSA2(program, lm, user, mode="static").adapter):
            prediction = program(**example.inputs())
        record = trajectory[0]
        assert record["outputs"]["answer"] == prediction.answer
        assert record["solved"] == user(example, prediction).solved
        assert all(text.endswith(note) for text in record["instructions"].values())
    static_first = [t[0]["instructions"] for t in results["trajectories"]["static"]]
    assert all("The user wants" not in text for words in static_first for text in words.values())

    summary = results["summaries"]["oracle"]
    assert len(summary["accuracy_per_turn"]) == 1 and len(summary["accuracy_per_turn_ci"]) == 1
    assert [c["b"] for c in results["oracle_comparisons"]] == ["static"]
    assert all(c["a"] != "oracle" for c in results["comparisons"])
    paths = experiment_report.report(results, "tiny-oracle")
    written = json.loads(paths["json"].read_text())
    row = next(r for r in written["rows"] if r["mode"] == "oracle")
    assert set(row) == {"mode", "acc@1"}
    assert written["summaries"]["oracle"]["tasks"] == 3


def test_carry_over_reports_carried_vs_fresh_and_carried_sessions_start_from_conversation_1(
        tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "RESULTS_DIR", tmp_path)
    config = tiny_config(tiny_model_dir, modes=["joint", "static"], kinds=["parens", "caps"],
                         users_per_kind=1, new_questions=2, concurrency=2)
    progress = tmp_path / "carry.partial.jsonl"
    results = carryover.run_carryover(config, progress=False, progress_path=progress)
    assert results["protocol"] == "hint" and results["resumed"] == 0
    for mode in ("joint", "static"):
        summary = results["summaries"][mode]
        assert summary["users"] == 2 and summary["new_questions"] == 4
        for arm in carryover.ARMS:
            for score in ("solved", "format_ok", "value_ok", "repeats_conversation1", "repeats_hint_example"):
                assert 0 <= summary[f"{arm}_{score}"] <= 1
        assert {"difference", "difference_ci", "mcnemar_p"} <= set(summary["solved_carried_vs_fresh"])
        for user in results["users"][mode]:
            assert user["conversation"][0]["turn"] == 1 and len(user["new"]) == 2
            original = user["conversation"][0]["instructions"]
            for question in user["new"]:
                carried, fresh = question["carried"], question["fresh"]
                assert carried["instructions"] == user["instructions_after"]
                assert fresh["instructions"] == original
                assert carried["adapter_shift"] == pytest.approx(user["adapter_shift_after"])
                assert fresh["adapter_shift"] == 0.0
                assert carried["solved"] == (carried["format_ok"] and carried["value_ok"])
    joint = results["users"]["joint"]
    # the tiny model never solves, so conversation 1 adapted: words refined and weights moved
    assert all(u["adapter_shift_after"] > 0 for u in joint)
    assert all(u["instructions_after"] != u["conversation"][0]["instructions"] for u in joint)
    assert all(u["adapter_shift_after"] == 0 for u in results["users"]["static"])

    again = carryover.run_carryover(config, progress=False, progress_path=progress)
    assert again["resumed"] == 4 and again["users"] == results["users"]
    path = carryover.report(results, "tiny-carryover")
    written = json.loads(path.read_text())
    assert [r["mode"] for r in written["rows"]] == ["joint", "static"]
    assert {"solved carried", "solved fresh", "format_ok carried", "value_ok fresh",
            "repeats conv. 1 carried", "McNemar p (solved)"} <= set(written["rows"][0])


def test_repeats_count_the_old_value_and_the_hint_example_not_the_new_question():
    first, task = {"value": 420}, {"kind": "bare", "value": 180, "question": QUESTION, "unit": UNIT}
    assert carryover.score_answer(task, "420", first)["repeats_conversation1"]
    assert not carryover.score_answer(task, "180", first)["repeats_conversation1"]
    assert carryover.score_answer(task, f"({EXAMPLE_NUMBER})", first)["repeats_hint_example"]
    assert not carryover.score_answer(task, "3 hours", {"value": 3})["repeats_conversation1"]
    assert users("dev", new_questions=2, kinds=["bold"])[0]["kind"] == "bold"
