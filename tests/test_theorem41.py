"""Theorem 4.1 measured as stated (rosa2_dspy/theorem41.py): the smallest parameter shift that raises
log π(reference | context) by δ, under the original and the refined words. Actor: the tiny model."""

from __future__ import annotations

import json

import dspy
import numpy as np
import pytest
import torch

from programs import experiment, experiment_report, reporting
from rosa2_dspy import theorem41
from rosa2_dspy.feedback.simulated_user import SimulatedUser
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.weights import ScoredResponse
from test_rosa2 import EXAMPLE, REFINED, make

FIELDS = {"delta", "grad_norm_original", "grad_norm_refined", "shift_original", "shift_refined", "ratio",
          "logprob_original", "logprob_refined", "reference_source"}


def test_recorded_shifts_equal_delta_over_the_gradient_norm_computed_independently(tiny_lm):
    policy = tiny_lm.policy
    rosa2 = make(tiny_lm, "joint", measure_theorem41=True, theorem41_delta=0.5)
    prediction = rosa2(question=EXAMPLE.question)
    start = rosa2.session.adapter.clone()
    record = rosa2.adapt("Wrong: I want just the number.", score=0.0, reference={"answer": "5"})
    measured = record.theorem41
    assert set(measured) == FIELDS and measured["reference_source"] == "revealed" and measured["delta"] == 0.5
    assert record.times["theorem41"] > 0

    # Independently: the revealed reference, written as the weights step writes it, under each instruction,
    # scored one pair at a time at the adapter the step started from.
    adapter = rosa2.adapter
    norms = {}
    refined = rosa2.session.instructions["predict"]
    assert REFINED in refined
    for name, instruction in (("original", rosa2.original_instructions["predict"]), ("refined", refined)):
        signature = rosa2.program.predict.signature.with_instructions(instruction)
        messages = adapter.format(signature, demos=[], inputs={"question": EXAMPLE.question})
        reference = adapter.format_assistant_message_content(
            signature, {"reasoning": prediction.reasoning, "answer": "5"})
        lp = policy.logprob(messages, reference, with_grad=True, adapter=start)
        norms[name] = float(lp.grad.double().norm())
        assert measured[f"logprob_{name}"] == pytest.approx(lp.total, rel=1e-5)
    assert norms["original"] != pytest.approx(norms["refined"], rel=1e-4)  # the words really change g
    for name in ("original", "refined"):
        assert measured[f"grad_norm_{name}"] == pytest.approx(norms[name], rel=1e-4)
        assert measured[f"shift_{name}"] == pytest.approx(0.5 / norms[name], rel=1e-4)
    assert measured["ratio"] == pytest.approx(norms["original"] / norms["refined"], rel=1e-4)


def test_the_minimal_shift_gains_delta_to_first_order_and_nothing_shorter_does(tiny_policy):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    base = tiny_policy.adapter_vector()
    lp = tiny_policy.logprob(messages, "5", with_grad=True, adapter=base)
    g = lp.grad.double()
    step = theorem41.minimal_shift(lp.grad, 2.0)
    assert float(g @ step) == pytest.approx(2.0, rel=1e-12)  # gᵀΔθ = δ
    assert float(step.norm()) == pytest.approx(2.0 / float(g.norm()), rel=1e-12)
    # Any other solution of gᵀΔθ = δ adds a component orthogonal to g, so it is longer.
    other = torch.randn(g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    other -= (other @ g) / (g @ g) * g
    assert float(g @ (step + other)) == pytest.approx(2.0, rel=1e-9) and (step + other).norm() > step.norm()
    # The real model follows the linearisation for a small step along Δθ: gain ≈ ε δ, closer as ε shrinks.
    errors = []
    for eps in (0.01, 0.005):
        after = tiny_policy.logprob(messages, "5", adapter=base + (eps * step).float()).total
        errors.append(abs((after - lp.total) / (eps * 2.0) - 1))
    assert errors[1] < errors[0] < 0.02


def test_ratio_is_below_one_exactly_when_the_refined_context_has_the_larger_gradient(tiny_policy):
    adapter = tiny_policy.adapter_vector()
    contexts = ["Answer.", "Answer with the number only.", "Be brief.", "You are a careful calculator. Reply in words.",
                "?", "Think step by step and give the final number."]
    below = []
    for x, x_star in zip(contexts, contexts[1:] + contexts[:1]):
        rows = [[ScoredResponse([{"role": "system", "content": c}, {"role": "user", "content": "What is 2+3?"}],
                                "5", 1.0, "reference")] for c in (x, x_star)]
        m = theorem41.measure(tiny_policy, rows[0], rows[1], adapter, 1.0, "revealed")
        assert (m["ratio"] < 1) == (m["grad_norm_refined"] > m["grad_norm_original"])
        assert m["ratio"] == pytest.approx(m["grad_norm_original"] / m["grad_norm_refined"], rel=1e-12)
        assert m["ratio"] == pytest.approx(m["shift_refined"] / m["shift_original"], rel=1e-12)
        below.append(m["ratio"] < 1)
    assert any(below) and not all(below)  # both directions occur, so the check above can fail


def test_turns_that_cannot_be_measured_say_why():
    row = [ScoredResponse([{"role": "user", "content": "q"}], "5", 1.0, "reference")]
    assert theorem41.measure(None, row, row, None, 1.0, None) == {"skipped": "no reference"}
    assert theorem41.measure(None, row, row, None, 1.0, "gold", words_changed=False) == {"skipped": "words unchanged"}
    assert "output field" in theorem41.measure(None, [], [], None, 1.0, "labels")["skipped"]
    with pytest.raises(ValueError, match="delta"):
        theorem41.measure(None, row, row, None, 0.0, "gold")


def test_the_accepted_answer_comes_from_the_feedback_source_else_the_labels():
    user = SimulatedUser(lambda e, p: 0.0, answer_field="code", gold_field="reference")
    example = dspy.Example(question="q", reference="def f(): pass", hint="h").with_inputs("question")
    assert theorem41.accepted_answer(user, example) == ({"code": "def f(): pass"}, "gold")
    assert theorem41.accepted_answer(lambda e, p: 0.0, EXAMPLE) == ({"answer": "5"}, "labels")
    assert theorem41.accepted_answer(lambda e, p: 0.0, dspy.Example(question="q").with_inputs("question")) == (None, None)
    assert theorem41.choose_reference({"answer": "7"}, {"answer": "5"}, "gold") == ({"answer": "7"}, "revealed")
    assert theorem41.choose_reference(None, {"answer": "5"}, "gold") == ({"answer": "5"}, "gold")


def test_a_joint_interaction_measures_with_the_gold_when_nothing_is_revealed(tiny_lm):
    def silent(example, prediction, trace=None):  # says "wrong", reveals nothing
        return dspy.Prediction(score=0.0, feedback="Wrong: I want just the number.")

    rosa2 = make(tiny_lm, "joint", measure_theorem41=True)
    rosa2.feedback_fn = silent
    trajectory = rosa2.interact(EXAMPLE, max_turns=3).rosa2.trajectory
    assert set(trajectory[0].theorem41) == FIELDS and trajectory[0].theorem41["reference_source"] == "labels"
    assert trajectory[1].theorem41 == {"skipped": "words unchanged"}  # the dummy refiner repeats itself
    assert trajectory[2].theorem41 is None  # the last turn does not adapt
    # Off by default, and never in a mode that does not move both axes.
    assert make(tiny_lm, "joint").interact(EXAMPLE, max_turns=2).rosa2.trajectory[0].theorem41 is None
    param_only = make(tiny_lm, "param-only", measure_theorem41=True)
    assert param_only.interact(EXAMPLE, max_turns=2).rosa2.trajectory[0].theorem41 is None


def _record(theorem: dict | None) -> TurnRecord:
    return TurnRecord(turn=1, mode="joint", instructions={}, outputs={}, theorem41=theorem)


def _measured(ratio: float) -> dict:
    return {"delta": 1.0, "grad_norm_original": 2.0, "grad_norm_refined": 2.0 / ratio, "shift_original": 0.5,
            "shift_refined": 0.5 * ratio, "ratio": ratio, "logprob_original": -3.0, "logprob_refined": -2.0,
            "reference_source": "gold"}


def test_the_analysis_reports_the_distribution_and_a_ci_containing_the_share():
    ratios = [[0.8, 0.9], [1.2], [0.7, 0.95, 1.1], [0.85], [1.3, 0.6]]
    trajectories = [[_record(_measured(r)) for r in conv] + [_record(None)] for conv in ratios]
    trajectories[0].append(_record({"skipped": "words unchanged"}))
    trajectories.append([_record({"skipped": "no reference"})])
    flat = np.array([r for conv in ratios for r in conv])
    summary = experiment.theorem_41(trajectories)
    assert summary["measured"] == 9 and summary["conversations"] == 5 and summary["delta"] == 1.0
    assert summary["skipped"] == {"words unchanged": 1, "no reference": 1}
    assert summary["reference_sources"] == {"gold": 9}
    assert summary["share_below_1"] == pytest.approx(6 / 9)
    low, high = summary["share_below_1_ci"]
    assert low <= summary["share_below_1"] <= high and 0 <= low < high <= 1
    assert summary["median_ratio"] == pytest.approx(float(np.median(flat)))
    assert [summary["ratio_quantiles"][k] for k in ("q1", "median", "q3")] == pytest.approx(
        np.quantile(flat, [0.25, 0.5, 0.75]).tolist())
    assert summary["mean_log_ratio"] == pytest.approx(float(np.mean(np.log(flat))))
    low, high = summary["mean_log_ratio_ci"]
    assert low <= summary["mean_log_ratio"] <= high
    assert summary["mean_logprob_gain"] == pytest.approx(1.0)
    # Same level L = max(-3, -2) + 1 = -1: x needs 2 nats over ‖g(x)‖ = 2, x* needs 1 nat over 2/ratio.
    assert theorem41.same_level_ratio(_measured(0.8)) == pytest.approx((1 / (2 / 0.8)) / (2 / 2))
    level = [(1 / (2 / r)) / 1.0 for r in flat]  # = r / 2: every one below 1 here
    assert summary["same_level"]["median_ratio"] == pytest.approx(float(np.median(level)))
    assert summary["same_level"]["share_below_1"] == 1.0 and summary["same_level"]["share_below_1_ci"] == [1.0, 1.0]
    row = experiment_report.theorem_rows(summary)[0]
    assert row["turns (conversations)"] == "9 (5)" and row["share < 1 [95% CI]"].startswith("0.67 [")
    assert experiment.theorem_41([[_record(None)]]) == {"measured": 0, "conversations": 0, "skipped": {},
                                                        "ci_method": theorem41.CI_METHOD}


def test_reanalyse_reads_an_old_results_file_and_names_its_check_honestly(tmp_path, monkeypatch):
    # A results file as written before the rename: turn records without ``theorem41``, the step-norm
    # comparison under the key ``theorem_4_1``.
    turns = [{"turn": 1, "mode": "joint", "instructions": {"predict": "x"}, "outputs": {"answer": "4"}, "reward": 0.0,
              "solved": False, "feedback": "no", "refined_instructions": {"predict": "x*"}, "words": {},
              "weights": {"applied": True, "raw_delta_norm": norm}, "delta_norm": norm,
              "delta_norm_original_words": original, "times": {"generate": 1.0, "feedback": 0.0, "words": 0.5,
                                                               "weights": 0.5}, "tokens": {"prompt": 9, "completion": 2}}
             for norm, original in ((0.4, 0.5), (0.9, 0.6))]
    old = {"config": {"task": "intent", "max_turns": 1, "protocol": "answer"}, "machine": {"cpu_count": 2},
           "theorem_4_1": {"pairs": 2}, "trajectories": {"joint": [[turns[0]], [turns[1]]]}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    monkeypatch.setattr(reporting, "RESULTS_DIR", tmp_path / "results")
    written = json.loads(experiment.reanalyse(path, "again")["json"].read_text())
    assert written["step_norm_comparison"] == pytest.approx({
        "pairs": 2, "mean_refined": 0.65, "mean_original": 0.55, "share_refined_smaller": 0.5,
        "mean_ratio_refined_over_original": (0.8 + 1.5) / 2})
    assert written["theorem_4_1"]["measured"] == 0  # that run did not measure the theorem


def test_clustered_interval_is_wider_than_one_that_treats_correlated_turns_as_independent():
    from rosa2_dspy.stats import bootstrap_ci, clustered_mean_ci

    groups = [[1.0] * 4, [0.0] * 4, [1.0] * 4, [0.0] * 4, [1.0] * 4, [1.0] * 4]
    clustered = clustered_mean_ci(groups)
    flat = bootstrap_ci([v for g in groups for v in g])
    assert clustered[0] <= 4 / 6 <= clustered[1]
    assert clustered[1] - clustered[0] > 1.5 * (flat[1] - flat[0])
    assert clustered_mean_ci([[0.5, 0.5], [0.5]]) == [0.5, 0.5] and clustered_mean_ci([[0.0, 1.0]]) is None
