"""The generated math benchmark (programs/mathgen.py): determinism, splits, golds, steps, grading, reporting."""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from programs import experiment, experiment_report, mathgen, reporting
from programs.tasks import load_task
from rosa2_dspy.feedback.math import MathVerifier, answers_match
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.stats import accuracy_by_group


def key(example: dspy.Example) -> tuple:
    return example.template, tuple(sorted(example.numbers.items()))


def test_same_seed_same_problems_other_seed_other_problems() -> None:
    first, again = mathgen.generate(40, seed=3), mathgen.generate(40, seed=3)
    assert [e.toDict() for e in first] == [e.toDict() for e in again]
    other = mathgen.generate(40, seed=4)
    assert sum(e.question != o.question for e, o in zip(first, other)) >= 30


def test_96_distinct_problems_spread_over_step_counts_and_templates() -> None:
    problems = load_task("math")  # the task reads the generator: default size 96, split test, seed 0
    assert len(problems) == mathgen.DEFAULT_SIZE == 96
    assert len({key(e) for e in problems}) == len({e.question for e in problems}) == 96
    by_steps = Counter(e.steps for e in problems)
    assert set(by_steps) == set(mathgen.STEP_LEVELS) and min(by_steps.values()) >= 19
    assert {e.template for e in problems} == set(mathgen.BY_ID) and len(mathgen.TEMPLATES) >= 12
    assert all(set(e.inputs().keys()) == {"question"} for e in problems)


def test_dev_and_test_never_share_a_problem_whatever_the_seeds() -> None:
    dev = {key(e) for seed in (0, 1) for e in mathgen.generate(96, seed=seed, split="dev")}
    test = {key(e) for seed in (0, 1) for e in mathgen.generate(96, seed=seed, split="test")}
    assert len(dev) > 150 and len(test) > 150 and not dev & test
    assert all(mathgen.split_of(t, dict(n)) == "test" for t, n in test)
    with pytest.raises(ValueError, match="'dev' .* or 'test'"):
        mathgen.generate(3, split="train")


def test_steps_in_range_and_equal_to_the_solution_length() -> None:
    for template in mathgen.TEMPLATES:
        assert 2 <= template.steps <= 6, template.id
    for example in mathgen.generate(60, seed=1, split="dev"):
        chain = mathgen.BY_ID[example.template].values(example.numbers)
        assert len(chain) == example.steps and mathgen.format_number(chain[-1]) == example.answer
        assert all(q > 0 and 100 % q.denominator == 0 for q in chain)


# Each gold recomputed here from the problem's numbers, with its own arithmetic (floats, not the template's).
INDEPENDENT = {
    "change": lambda n: n["bill"] - n["n"] * n["p"],
    "discount": lambda n: n["n"] * n["price"] * (100 - n["pct"]) / 100,
    "laps": lambda n: n["laps"] * n["m"] * n["days"] / 1000,
    "fuel": lambda n: (n["d1"] + n["d2"]) * n["l"] * n["c"] / 100,
    "savings": lambda n: (n["s"] + n["w"] * (n["e"] - n["x"]) - n["g"]) / 2,
    "trip": lambda n: n["start"] + n["s"] + n["d"] / n["v1"] + n["d"] / n["v2"],
    "farm": lambda n: n["cows"] * n["m"] * n["pm"] + n["hens"] * n["e"] * n["pe"] / 12,
    "school_trip": lambda n: (lambda going: going / n["cap"] * n["bus"] + going * n["t"])(n["c"] * n["s"] * n["pct"] / 100),
    "party": lambda n: n["g"] * n["s"] / n["k"] * n["p"] + n["g"] * n["d"] - n["off"],
}


@pytest.mark.parametrize("template", sorted(INDEPENDENT))
def test_gold_answers_recomputed_independently(template: str) -> None:
    problems = [e for e in mathgen.generate(200, seed=7, split="test") if e.template == template]
    assert len(problems) >= 5
    for example in problems:
        assert float(example.answer) == pytest.approx(INDEPENDENT[template](example.numbers), abs=1e-9)
        for value in example.numbers.values():  # every number the gold used is in the question
            assert re.search(rf"(?<!\d){value}(?!\d)", example.question), (value, example.question)
        assert "{" not in example.question and example.answer not in ("0", "")


def test_format_number_gives_plain_decimal_strings() -> None:
    from fractions import Fraction

    assert [mathgen.format_number(Fraction(x)) for x in ("42", "25/2", "15/4", "1/5")] == ["42", "12.5", "3.75", "0.2"]


GOLD = dspy.Example(question="Omar buys 5 pens at $1 each and pays with $47. How much change?", answer="42")


@pytest.mark.parametrize("reply, solved", [
    ("The answer is 42.", True), ("42.0", True), (r"\boxed{42}", True), ("So he gets $42 back.", True),
    ("The answer is 41.", False), (r"\boxed{41}", False),
])
def test_math_verify_grading(reply: str, solved: bool) -> None:
    assert MathVerifier()(GOLD, dspy.Prediction(answer=reply)).solved is solved


def test_grading_works_from_worker_threads_with_math_verify() -> None:
    """Experiments grade on a thread pool: math_verify's signal-based timeout must stay off there, and it
    must still be math_verify that compares (the plain fallback cannot read \\frac)."""
    def grade(reply: str) -> tuple[bool, bool, bool]:
        assert threading.current_thread() is not threading.main_thread()
        verdict = MathVerifier()(GOLD, dspy.Prediction(answer=reply)).solved
        return verdict, answers_match(r"\frac{84}{2}", "42"), answers_match("12.5", r"\frac{25}{2}")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(grade, ["The answer is 42.", "42.0", r"\boxed{42}", "41"]))
    assert [r[0] for r in results] == [True, True, True, False]
    assert all(r[1] and r[2] for r in results)


def test_every_generated_gold_grades_as_correct_and_a_near_miss_as_wrong() -> None:
    verifier, rng = MathVerifier(), random.Random(0)
    for example in mathgen.generate(30, seed=2, split="dev"):
        assert verifier(example, dspy.Prediction(answer=f"So the answer is {example.answer}.")).solved
        off = float(example.answer) + rng.choice((-1, 1))
        assert not verifier(example, dspy.Prediction(answer=f"The answer is {off:g}.")).solved


def test_accuracy_by_steps_in_the_analysis_and_reanalysis(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reporting, "RESULTS_DIR", tmp_path)
    solved, unsolved = (TurnRecord(turn=1, mode="static", instructions={}, outputs={}, solved=s) for s in (True, False))
    trajectories = {"static": [[solved], [unsolved], [unsolved], [solved]]}
    config = {"task": "math", "max_turns": 1, "protocol": "answer"}
    results = experiment.analyse(config, trajectories, task_steps=[2, 2, 3, 3])
    assert results["by_steps"]["static"]["2"] == {"tasks": 2, "solved": 1, "accuracy": 0.5, "accuracy_ci": [0.0, 1.0]}
    assert results["by_steps"]["static"]["3"]["accuracy"] == 0.5
    assert "by_steps" not in experiment.analyse(config, trajectories)  # tasks without steps: no breakdown
    paths = experiment_report.report({**results, "wall_seconds": 0.0}, "steps")
    again = experiment.reanalyse(paths["json"], "steps_again")
    assert json.loads(again["json"].read_text())["by_steps"] == results["by_steps"]
    assert experiment_report.steps_rows(results["by_steps"])[0]["2 steps"] == "0.50 [0.00, 1.00] (n=2)"
    with pytest.raises(ValueError, match="One group per task"):
        accuracy_by_group([1, None], [2], k=1)


def test_experiment_reads_the_generator_settings_and_records_steps(tiny_model_dir, tmp_path) -> None:
    config = {"name": "tiny_math", "task": "math", "limit": 5, "split": "dev", "seed": 1,
              "modes": ["static"], "max_turns": 1, "concurrency": 2,
              "actor": {"model": str(tiny_model_dir), "max_tokens": 4}}
    progress = tmp_path / "tiny_math.partial.jsonl"
    results = experiment.run_experiment(config, progress=False, progress_path=progress)
    assert results["task_steps"] == [2, 3, 4, 5, 6]
    assert {s: g["tasks"] for s, g in results["by_steps"]["static"].items()} == {str(s): 1 for s in range(2, 7)}
    dev_questions = [e.question for e in mathgen.generate(5, seed=1, split="dev")]
    rows = sorted((json.loads(line) for line in progress.read_text().splitlines()[1:]), key=lambda r: r["task"])
    assert [r["question"] for r in rows] == [q[:200] for q in dev_questions]  # the file keeps 200 characters
