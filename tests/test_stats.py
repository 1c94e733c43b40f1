"""Confidence intervals and paired comparisons (rosa2_dspy/stats.py) and their place in ``summarize``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from rosa2_dspy.records import TurnRecord, summarize
from rosa2_dspy.stats import bootstrap_ci, compare_modes, mcnemar_exact, paired_difference_ci, with_ci


def trajectory(solved_at: int | None, max_turns: int = 3) -> list[TurnRecord]:
    """A conversation solved at turn ``solved_at`` (it stops there), or failed on every turn."""
    last = solved_at or max_turns
    return [TurnRecord(turn=t, mode="joint", instructions={}, outputs={"answer": "x"}, reward=float(t == solved_at),
                       solved=t == solved_at) for t in range(1, last + 1)]


def test_all_solved_gives_one_to_one_and_none_solved_zero_to_zero():
    assert bootstrap_ci([1, 1, 1, 1]) == [1.0, 1.0]
    assert bootstrap_ci([0, 0, 0]) == [0.0, 0.0]


def test_too_few_observations_give_no_interval():
    assert bootstrap_ci([]) is None and bootstrap_ci([1]) is None
    assert paired_difference_ci([1], [0]) is None


def test_seeded_bootstrap_is_reproducible_and_brackets_the_mean():
    data = [0, 0, 1, 1, 1, 0, 1, 1]
    first, again = bootstrap_ci(data), bootstrap_ci(data)
    assert first == again
    assert first[0] < np.mean(data) < first[1] and 0 <= first[0] and first[1] <= 1
    # the same seed and method by hand
    direct = scipy_stats.bootstrap((np.array(data, float),), np.mean, method="BCa", n_resamples=9999,
                                   rng=np.random.default_rng(0))
    assert first == [direct.confidence_interval.low, direct.confidence_interval.high]
    # on data with many distinct means the seed is what fixes the interval's last digits
    times = [0.3, 1.7, 2.2, 0.9, 4.1, 3.3, 0.1, 2.8]
    assert bootstrap_ci(times, seed=1) == bootstrap_ci(times, seed=1) != bootstrap_ci(times, seed=2)


def test_paired_bootstrap_resamples_tasks_together():
    a, b = [1, 1, 1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 1, 0, 0, 1]
    interval = paired_difference_ci(a, b)
    assert interval == paired_difference_ci(a, b)
    assert interval[0] <= np.mean(a) - np.mean(b) <= interval[1]
    # resampling pairs = resampling per-task differences (both BCa from the same seed)
    assert interval == pytest.approx(bootstrap_ci(np.subtract(a, b)), abs=1e-12)
    assert paired_difference_ci([1, 0, 1], [1, 0, 1]) == [0.0, 0.0]  # identical modes never differ
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference_ci([1, 0], [1])


def test_exact_mcnemar_is_the_binomial_test_on_discordant_pairs():
    # a hand-made 2x2 table: both solved 5, only A 7, only B 1, neither 3
    # exact two-sided p = 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * (1 + 8) / 256
    assert mcnemar_exact(7, 1) == pytest.approx(2 * 9 / 256)
    assert mcnemar_exact(1, 7) == mcnemar_exact(7, 1)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0


def test_compare_modes_counts_discordant_tasks_at_turn_k():
    solved_at = {"static": [None, 1, None, None, 2], "joint": [2, 1, 3, None, 1]}
    by_3, by_1 = compare_modes(solved_at, 3)[0], compare_modes(solved_at, 1)[0]
    assert (by_3["a"], by_3["b"], by_3["tasks"]) == ("static", "joint", 5)
    assert (by_3["a_only"], by_3["b_only"]) == (0, 2) and by_3["difference"] == pytest.approx(-0.4)
    assert by_3["mcnemar_p"] == pytest.approx(scipy_stats.binomtest(0, 2, 0.5).pvalue) == 0.5
    assert by_3["difference_ci"][0] <= -0.4 <= by_3["difference_ci"][1]
    assert (by_1["a_only"], by_1["b_only"], by_1["accuracy_a"], by_1["accuracy_b"]) == (0, 1, 0.2, 0.4)


def test_summarize_carries_intervals_and_solved_turns():
    runs = [trajectory(1), trajectory(2), trajectory(None), trajectory(3), trajectory(None), trajectory(2)]
    s = summarize(runs, 3)
    assert s["solved_at"] == [1, 2, None, 3, None, 2]
    assert s["accuracy_per_turn"] == pytest.approx([1 / 6, 3 / 6, 4 / 6])
    assert len(s["accuracy_per_turn_ci"]) == 3 and s["final_accuracy_ci"] == s["accuracy_per_turn_ci"][-1]
    for value, (low, high) in zip(s["accuracy_per_turn"], s["accuracy_per_turn_ci"]):
        assert 0 <= low <= value <= high <= 1
    assert s["turns_to_solve"] == 2 and s["turns_to_solve_ci"][0] <= 2 <= s["turns_to_solve_ci"][1]
    assert s["correction_uplift"] == pytest.approx(3 / 5)
    assert s["correction_uplift_ci"] == bootstrap_ci([1, 0, 1, 0, 1])
    assert summarize(runs, 3) == s  # seeded: the same records give the same summary


@pytest.mark.parametrize("solved", [[1], [None], [1, 1, 1], [None, None], [2, 2]])
def test_tiny_samples_summarize_without_nan(solved):
    s = summarize([trajectory(x) for x in solved], 3)
    text = json.dumps(s, allow_nan=False)  # raises on NaN or infinity
    assert "NaN" not in text
    if len(solved) == 1:
        assert s["accuracy_per_turn_ci"] == [None, None, None] and s["turns_to_solve_ci"] is None
    if solved == [1, 1, 1]:
        assert s["accuracy_per_turn_ci"] == [[1.0, 1.0]] * 3 and s["turns_to_solve_ci"] == [1.0, 1.0]
        assert s["correction_uplift"] == 0.0 and s["correction_uplift_ci"] is None  # no first-turn failure
    if solved == [None, None]:
        assert s["accuracy_per_turn_ci"] == [[0.0, 0.0]] * 3 and s["turns_to_solve"] is None
        assert s["correction_uplift_ci"] == [0.0, 0.0]
    comparisons = compare_modes({"a": s["solved_at"], "b": s["solved_at"]}, 3)
    assert comparisons[0]["mcnemar_p"] == 1.0 and all(
        not isinstance(v, float) or math.isfinite(v) for v in comparisons[0].values())
    assert summarize([], 3)["accuracy_per_turn_ci"] == []


def test_value_with_interval_reads_like_the_tables():
    assert with_ci(0.625, [0.25, 0.875]) == "0.62 [0.25, 0.88]"
    assert with_ci(1.0, None) == "1.00" and with_ci(None, None) == "–"
