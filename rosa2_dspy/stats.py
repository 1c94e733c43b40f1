"""Confidence intervals and paired comparisons for experiment summaries (scipy only).

Every interval is a 95% bootstrap interval over *tasks* (the unit a benchmark samples), computed by
``scipy.stats.bootstrap`` with 9,999 resamples from a fixed seed, so a summary is reproducible to the
last digit. The method is BCa (bias-corrected and accelerated); where BCa is undefined (e.g. a jackknife
with no spread) the percentile interval is used. Small samples are handled without NaN:

* no observation, or one: the interval is ``None`` (a bootstrap over one task says nothing);
* every observation equal (all solved, none solved, every difference 0): the interval is that value at
  both ends, ``[1.0, 1.0]`` for all solved — the bootstrap cannot vary what never varies.

Values that come in groups (the turns of one conversation) get a *clustered* interval
(:func:`clustered_mean_ci`): whole groups are resampled, the same way.

Paired comparisons between two modes use the same tasks: the paired bootstrap of the difference in
"solved by turn k" and the exact McNemar test (a two-sided binomial test on the discordant pairs: tasks
one mode solved and the other did not).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 9999
SEED = 0
METHOD = (f"{int(CONFIDENCE * 100)}% bootstrap over tasks (BCa; percentile where BCa is undefined), "
          f"{RESAMPLES} resamples, seed {SEED}; paired: bootstrap of the per-task difference and exact McNemar")

Interval = list[float] | None


def _finite(low: float, high: float) -> bool:
    return math.isfinite(low) and math.isfinite(high)


def _interval(samples: tuple[np.ndarray, ...], statistic: Any, paired: bool, seed: int, confidence: float,
              resamples: int) -> Interval:
    """``scipy.stats.bootstrap`` of ``statistic`` over ``samples``: BCa, or the percentile interval where
    BCa is undefined (None only if neither gives a finite interval)."""
    from scipy import stats

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap(samples, statistic, paired=paired, n_resamples=resamples,
                                     confidence_level=confidence, method=method,
                                     rng=np.random.default_rng(seed), vectorized=True)
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if _finite(low, high):
            return [low, high]
    return None  # pragma: no cover - the percentile interval of finite data is finite


def bootstrap_ci(values: Sequence[float], seed: int = SEED, confidence: float = CONFIDENCE,
                 resamples: int = RESAMPLES) -> Interval:
    """A bootstrap confidence interval ``[low, high]`` for the mean of ``values`` (None for fewer than 2)."""
    data = np.asarray([float(v) for v in values], dtype=float)
    if data.size < 2:
        return None
    if np.all(data == data[0]):
        return [float(data[0]), float(data[0])]
    return _interval((data,), np.mean, False, seed, confidence, resamples)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], seed: int = SEED,
                         confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> Interval:
    """The paired bootstrap interval of ``mean(a) - mean(b)``: tasks are resampled, each keeping its pair.

    Resampling the pairs is resampling the per-task differences, so this equals :func:`bootstrap_ci` of
    ``a - b`` (and uses ``scipy.stats.bootstrap(..., paired=True)`` to say so).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"Paired samples need the same tasks; got {x.size} and {y.size} values.")
    diff = x - y
    if diff.size < 2:
        return None
    if np.all(diff == diff[0]):
        return [float(diff[0]), float(diff[0])]

    def mean_difference(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(u, axis=axis) - np.mean(v, axis=axis)

    return _interval((x, y), mean_difference, True, seed, confidence, resamples)


def clustered_mean_ci(groups: Sequence[Sequence[float]], seed: int = SEED, confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES) -> Interval:
    """A bootstrap interval for the pooled mean of values that come in groups (the turns of one
    conversation): whole groups are resampled, so values of one group, which are not independent, never
    count as independent evidence. The statistic is ``sum of values / number of values`` over the drawn
    groups; with one value per group this is :func:`bootstrap_ci`'s mean. None for fewer than 2 values or
    fewer than 2 groups (unless every value is equal: then that value at both ends)."""
    groups = [[float(v) for v in g] for g in groups if len(g)]
    values = [v for g in groups for v in g]
    if len(values) < 2:
        return None
    if all(v == values[0] for v in values):
        return [values[0], values[0]]
    if len(groups) < 2:
        return None
    sums = np.asarray([sum(g) for g in groups], dtype=float)
    counts = np.asarray([len(g) for g in groups], dtype=float)

    def pooled_mean(s: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(s, axis=axis) / np.sum(c, axis=axis)

    return _interval((sums, counts), pooled_mean, True, seed, confidence, resamples)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact McNemar p-value (two-sided) from the discordant counts: a binomial test of ``a_only`` out of
    ``a_only + b_only`` at 1/2. With no discordant task the two modes never differ: p = 1."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(a_only, n, 0.5).pvalue)


def solved_by(solved_at: Sequence[int | None], k: int) -> list[int]:
    """1 for each task solved by turn ``k`` (1-based), else 0."""
    return [int(s is not None and s <= k) for s in solved_at]


def compare_modes(solved_at: dict[str, Sequence[int | None]], k: int, seed: int = SEED) -> list[dict[str, Any]]:
    """Every pair of modes on the same tasks, solved by turn ``k``: accuracies, their difference (first
    minus second) with its paired bootstrap interval, the discordant counts and the exact McNemar p."""
    rows = []
    for a, b in combinations(solved_at, 2):
        x, y = solved_by(solved_at[a], k), solved_by(solved_at[b], k)
        if len(x) != len(y):
            raise ValueError(f"Modes {a!r} and {b!r} ran on different numbers of tasks ({len(x)}, {len(y)}).")
        n = len(x)
        a_only = sum(1 for u, v in zip(x, y) if u and not v)
        b_only = sum(1 for u, v in zip(x, y) if v and not u)
        rows.append({
            "a": a, "b": b, "turn": k, "tasks": n,
            "accuracy_a": sum(x) / n if n else None, "accuracy_b": sum(y) / n if n else None,
            "difference": (sum(x) - sum(y)) / n if n else None,
            "difference_ci": paired_difference_ci(x, y, seed=seed),
            "a_only": a_only, "b_only": b_only,
            "mcnemar_p": mcnemar_exact(a_only, b_only),
        })
    return rows


def accuracy_by_group(solved_at: Sequence[int | None], groups: Sequence[Any], k: int,
                      seed: int = SEED) -> dict[str, dict[str, Any]]:
    """Solved-by-turn-``k`` accuracy per group of tasks (e.g. a math problem's number of steps), each with
    its bootstrap interval: ``{str(group): {"tasks", "solved", "accuracy", "accuracy_ci"}}`` in group order.

    >>> accuracy_by_group([1, None, 2, None], [2, 2, 3, 3], k=2)["3"]["accuracy"]
    0.5
    """
    if len(solved_at) != len(groups):
        raise ValueError(f"One group per task is needed; got {len(groups)} groups for {len(solved_at)} tasks.")
    out: dict[str, dict[str, Any]] = {}
    for group in sorted(set(groups)):
        solved = solved_by([s for s, g in zip(solved_at, groups) if g == group], k)
        out[str(group)] = {"tasks": len(solved), "solved": sum(solved), "accuracy": sum(solved) / len(solved),
                           "accuracy_ci": bootstrap_ci(solved, seed=seed)}
    return out


def with_ci(value: float | None, interval: Interval, digits: int = 2) -> str:
    """``"0.62 [0.25, 0.88]"``; ``"–"`` for no value; the bare value where there is no interval."""
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if interval is None:
        return text
    return f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
