"""Theorem 4.1 measured as the paper states it: the smallest parameter shift that buys a fixed gain.

Theorem 4.1 (spec, step 4): when the refined words ``x*`` are closer to the user's intent than the
original words ``x``, the parameter shift needed is smaller, ``‖Δθ(x*)‖ < ‖Δθ(x)‖``. Measured on each
adapted turn (a turn whose words *and* weights move), to first order:

* the target is the same under both contexts: raise ``log π_θ(y_ref | context)`` by ``δ`` nats, where
  ``y_ref`` is the reference answer (written the way the weights step writes it) and ``θ`` the adapter
  the turn's weights step starts from;
* linearised, ``log π_{θ+Δθ}(y_ref | c) ≈ log π_θ(y_ref | c) + g_cᵀΔθ`` with ``g_c = ∇_θ log π_θ(y_ref | c)``
  (adapter parameters only); the smallest ``Δθ`` with ``g_cᵀΔθ = δ`` is ``δ g_c / ‖g_c‖²``
  (:func:`minimal_shift`), of length ``δ / ‖g_c‖``;
* so ``‖Δθ(x*)‖ / ‖Δθ(x)‖ = ‖g(x)‖ / ‖g(x*)‖``, whatever ``δ``: below 1 when, under the refined words,
  the log-probability of the reference moves more per unit of parameter change.

This is not ROSA's own step compared under both contexts (``TurnRecord.delta_norm_original_words``,
the *step-norm comparison*): ROSA's targets come from the rewards alone, so that step's length
reflects the gradient geometry of all the conversation's answers, not the shift a fixed gain needs.

**The reference** is the one the feedback revealed (``reference_source="revealed"``), else the task's
accepted answer: the feedback source's ``reference_for(example)`` when it has one (``"gold"``; a
:class:`~rosa2_dspy.feedback.simulated_user.SimulatedUser` gives its gold field), else the example's
labels (``"labels"``). It is only measured with, never given to the weights step. A turn that cannot be
measured records ``{"skipped": reason}`` (no reference, words unchanged, ...), so the skips are counted.

**Cost**: one batched forward and backward pass over the reference under both contexts (two rows for a
one-predictor program) per adapted turn, timed apart as ``times["theorem41"]``. Switched on by
``ROSA2(measure_theorem41=True)``; off by default, on in ``programs.experiment``.

Example:
    >>> rosa2 = ROSA2(dspy.Predict("question -> answer"), lm=LocalLM(), feedback=user,   # doctest: +SKIP
    ...               mode="joint", measure_theorem41=True)
    >>> result = rosa2.interact(example)
    >>> [r.theorem41 for r in result.rosa2.trajectory]          # one dict per adapted turn
    >>> summarize_shifts([result.rosa2.trajectory])["share_below_1"]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rosa2_dspy.feedback._common import field_text
from rosa2_dspy.policy import LoRAPolicy
from rosa2_dspy.stats import clustered_mean_ci
from rosa2_dspy.weights import ScoredResponse

DEFAULT_DELTA = 1.0  # nats of log π(reference | context) to gain; the ratio does not depend on it
CI_METHOD = ("95% bootstrap over conversations (the turns of one conversation resampled together), "
             "BCa, percentile where BCa is undefined")


def minimal_shift(grad: torch.Tensor, delta: float) -> torch.Tensor:
    """``argmin ‖Δθ‖`` subject to ``gradᵀΔθ = δ``: ``δ · grad / ‖grad‖²`` (float64), of length ``δ/‖grad‖``."""
    g = grad.to(torch.float64)
    return delta * g / float(g @ g)


def accepted_answer(feedback_fn: Any, example: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The task's accepted answer as output-field values, and where it came from: the feedback source's
    ``reference_for(example)`` (``"gold"``), else the example's labels (``"labels"``); ``(None, None)``
    when there is neither."""
    own = getattr(feedback_fn, "reference_for", None)
    if callable(own):
        reference = own(example)
        if reference:
            return dict(reference), "gold"
    try:
        labels = {k: v for k, v in example.labels().items() if field_text(example, k) is not None}
    except (AttributeError, ValueError):  # not a dspy.Example, or one without inputs set
        labels = {}
    return (labels, "labels") if labels else (None, None)


def choose_reference(revealed: dict[str, Any] | None, gold: dict[str, Any] | None,
                     gold_source: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The revealed reference when the feedback gave one, else the accepted answer."""
    if revealed:
        return revealed, "revealed"
    return (gold, gold_source) if gold else (None, None)


def measure(policy: LoRAPolicy, original: Sequence[ScoredResponse], refined: Sequence[ScoredResponse],
            adapter: torch.Tensor, delta: float = DEFAULT_DELTA, reference_source: str | None = None,
            words_changed: bool = True) -> dict[str, Any]:
    """The minimal shifts for one turn: ``original``/``refined`` are the reference response(s) under the
    original and the refined words (one per call of the program that produces the reference's fields;
    their log-probs add up, so do their gradients). One batched ``policy.logprobs`` pass at ``adapter``.

    Returns ``{delta, grad_norm_original, grad_norm_refined, shift_original, shift_refined, ratio,
    logprob_original, logprob_refined, reference_source}``, or ``{"skipped": reason}``.
    """
    if not delta > 0 or not math.isfinite(delta):
        raise ValueError(f"delta must be a finite number > 0 (nats to gain), got {delta!r}.")
    if reference_source is None:
        return {"skipped": "no reference"}
    if not words_changed:
        return {"skipped": "words unchanged"}
    if not original or len(original) != len(refined):
        return {"skipped": "the reference fills no output field of the program"}
    rows = [(r.messages, r.completion) for r in [*original, *refined]]
    results = policy.logprobs(rows, with_grad=True, adapter=adapter)
    n = len(original)
    grads = [torch.stack([lp.grad for lp in part]).to(torch.float64).sum(0) for part in (results[:n], results[n:])]
    norms = [float(g.norm()) for g in grads]
    if not all(math.isfinite(v) and v > 0 for v in norms):
        return {"skipped": "zero or non-finite gradient"}
    shifts = [float(minimal_shift(g, delta).norm()) for g in grads]
    return {
        "delta": float(delta), "grad_norm_original": norms[0], "grad_norm_refined": norms[1],
        "shift_original": shifts[0], "shift_refined": shifts[1], "ratio": shifts[1] / shifts[0],
        "logprob_original": sum(lp.total for lp in results[:n]), "logprob_refined": sum(lp.total for lp in results[n:]),
        "reference_source": reference_source,
    }


def same_level_ratio(measured: dict[str, Any]) -> float:
    """``‖Δθ(x*)‖/‖Δθ(x)‖`` for reaching one common level ``L = max(log π(ref|x), log π(ref|x*)) + δ`` under
    both contexts (to first order the shift is ``(L − log π(ref|c)) / ‖g_c‖``), from a :func:`measure` record."""
    lp_x, lp_xs = measured["logprob_original"], measured["logprob_refined"]
    level = max(lp_x, lp_xs) + measured["delta"]
    return ((level - lp_xs) / measured["grad_norm_refined"]) / ((level - lp_x) / measured["grad_norm_original"])


def summarize_shifts(trajectories: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The distribution of ``ratio = ‖Δθ(x*)‖/‖Δθ(x)‖`` over the measured turns of these conversations.

    ``measured`` turns (of ``conversations``), ``skipped`` counts by reason, ``delta`` (the δ used; a
    list if runs differ), ``reference_sources``; ``ratio_quantiles`` (min, quartiles, max);
    ``share_below_1`` (the theorem's direction) and ``mean_log_ratio`` (below 0: the refined words need
    the smaller shift), each with a 95% interval clustered by conversation
    (:func:`~rosa2_dspy.stats.clustered_mean_ci`); the medians of both shifts; ``mean_logprob_gain``,
    the mean of ``log π(ref | x*) − log π(ref | x)``.

    ``same_level`` is a secondary reading from the same records (:func:`same_level_ratio`): the shifts
    that bring ``log π(ref)`` to one common *level* under both contexts instead of raising it by the same
    gain, so refined words that already made the reference likelier get credit for it.
    """
    groups = [[r.theorem41 for r in t if getattr(r, "theorem41", None) and "ratio" in r.theorem41]
              for t in trajectories]
    groups = [g for g in groups if g]
    measured = [m for g in groups for m in g]
    skipped = Counter(r.theorem41["skipped"] for t in trajectories for r in t
                      if getattr(r, "theorem41", None) and "skipped" in r.theorem41)
    out: dict[str, Any] = {"measured": len(measured), "conversations": len(groups), "skipped": dict(skipped),
                           "ci_method": CI_METHOD}
    if not measured:
        return out
    ratios = np.asarray([m["ratio"] for m in measured], dtype=float)
    deltas = sorted({m["delta"] for m in measured})
    below = [[float(m["ratio"] < 1) for m in g] for g in groups]
    level = [[same_level_ratio(m) for m in g] for g in groups]
    level_below = [[float(r < 1) for r in g] for g in level]
    log_ratio = [[math.log(m["ratio"]) for m in g] for g in groups]
    out.update({
        "delta": deltas[0] if len(deltas) == 1 else deltas,
        "reference_sources": dict(Counter(m["reference_source"] for m in measured)),
        "ratio_quantiles": dict(zip(("min", "q1", "median", "q3", "max"),
                                    np.quantile(ratios, [0, 0.25, 0.5, 0.75, 1]).tolist())),
        "median_ratio": float(np.median(ratios)),
        "share_below_1": float(np.mean(ratios < 1)),
        "share_below_1_ci": clustered_mean_ci(below),
        "mean_log_ratio": float(np.mean(np.log(ratios))),
        "mean_log_ratio_ci": clustered_mean_ci(log_ratio),
        "median_shift_original": float(np.median([m["shift_original"] for m in measured])),
        "median_shift_refined": float(np.median([m["shift_refined"] for m in measured])),
        "mean_logprob_gain": float(np.mean([m["logprob_refined"] - m["logprob_original"] for m in measured])),
        "same_level": {
            "median_ratio": float(np.median([r for g in level for r in g])),
            "share_below_1": float(np.mean([b for g in level_below for b in g])),
            "share_below_1_ci": clustered_mean_ci(level_below),
        },
    })
    return out
