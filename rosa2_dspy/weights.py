"""The weights step: ROSA's one-step LoRA update, shaped like a DSPy teleprompter.

Spec step 4. Given observed responses ``y_1..y_n`` to one context ``x`` with rewards ``r_i`` in [0, 1],
the reference-optimal policy of ``max E[r] - beta KL(pi || pi_theta)`` is
``pi*(y|x) ∝ pi_theta(y|x) exp(r(x, y)/beta)``, i.e. ``log pi*/pi_theta = r/beta - log Z``. ROSA takes one
linearised step towards it: with ``g_i = ∇_theta log pi_theta(y_i|x)`` (adapter parameters only) and
targets ``a_i = (r_i - r̄)/beta`` (``log Z`` estimated by the mean reward),

    Δθ = argmin Σ_i (g_iᵀΔθ - a_i)² + λ‖Δθ‖²  =  Gᵀ (G Gᵀ + λ I)⁻¹ a,

an n×n solve after n backward passes. Guards: a trust region ``‖Δθ‖ <= max_norm``; no update from
non-finite numbers or a failed solve (the reason is recorded; the adapter is untouched); and a check of
the step's *effect*: the mean per-token KL between the model's next-token predictions before and after
the step, over the turn's own prompt and answer, must stay within ``max_kl``, else the step is halved
(a backtracking line search, as trust-region policy methods do) up to ``max_backtracks`` times and
then not applied. Each record says the KL and how often the step was halved.

Passes per step: one batched forward + backward over the n responses, which also keeps the "before" hidden
states of the turn's own answer(s); one forward of those answers under the new adapter, which gives the
"after" side of the KL and their ``logprob_after`` (each halving repeats it); with ``measure_after``, one
forward of the other responses under the accepted adapter. So the check costs no forward of its own.

Choices (ours, documented here):

* **Log-probs are summed over the response's tokens** (``length_normalize=False``). That is the
  sequence log-probability the RLHF objective is written in, so ``g_iᵀΔθ = a_i`` really moves
  ``log pi(y_i)`` by the log-ratio of ``pi*``. Length normalisation (mean per-token log-prob) is an option;
  it makes long and short responses weigh alike but asks each *token* to move by ``a_i``, a far larger
  step for long responses.
* **λ is relative**: ``λ = ridge · mean_i ‖g_i‖²``. Gradient norms differ by orders of magnitude between
  models and response lengths; a relative ridge means the same value regularises alike everywhere.
* **No contrast, prior baseline**: with one response, or several with the same reward (a user who
  said "no" twice), the mean makes every target 0. Then ``log Z`` is estimated by
  ``prior_baseline/beta`` instead; with contrast, by the mean. The default, 0, takes no step on
  failures alone (every target 0) and pulls up answers that share some partial credit. 0.5 (the
  middle of the reward range; the default before 2026-11-27) pushes failures down: on a 135M model
  under feedback that never reveals an answer, those pushes away from the model's own answers ended
  18 of 96 joint conversations in babble (static 2); on the dev split, 0 removed that and changed no
  other measure beyond noise, under ``hint`` and under ``answer`` (README: "What the weights step
  does without a success").

Baselines behind the same interface, for the benchmarks: :class:`IterativeTTT` (k Adam/SGD steps on
the same log-ratio targets) and :class:`NoUpdate`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from dspy.teleprompt import Teleprompter

from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.policy import ChatMessages, LoRAPolicy

logger = logging.getLogger(__name__)

Source = Literal["current", "history", "reference"]
# Mean per-token nats on the turn's text (programs.bench_step_safety, results/bench_step_safety.json): real
# steps of joint-mode math conversations moved it by at most 0.053 (median 0.026); scaled along a ROSA
# step's direction, the answer became a bare, often wrong number from about 0.25-0.6 (‖Δθ‖ = 2-4) and
# looped at about 3.4 (‖Δθ‖ = 16). 0.5 leaves real steps a 10x margin and stops the larger collapses.
DEFAULT_MAX_KL = 0.5
ALL_SOURCES: frozenset[str] = frozenset({"current", "history", "reference"})


@dataclass
class ScoredResponse:
    """One observed response under a context: the chat prompt, the completion text, its reward.

    ``source`` says where it came from: this turn's answer (``current``), an earlier answer of the
    conversation (``history``), or a reference answer revealed by the feedback (``reference``).
    """

    messages: ChatMessages
    completion: str
    reward: float
    source: Source = "current"


@dataclass
class WeightStep:
    """What one weights step did. ``applied=False`` means the adapter was left untouched, see ``reason``."""

    method: str
    applied: bool
    reason: str = ""
    num_responses: int = 0
    advantages: list[float] = field(default_factory=list)
    delta_norm: float = 0.0
    raw_delta_norm: float = 0.0
    clipped: bool = False
    logprob_before: list[float] = field(default_factory=list)
    logprob_after: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0  # wall time of the whole step, its checks and logprob_after included
    measure_seconds: float = 0.0  # of which the forward that only measures logprob_after (``measure_after``)
    kl: float | None = None  # mean per-token KL(before || after) on the turn's text; None if not checked
    backtracks: int = 0  # how often the step was halved to keep the KL within max_kl
    delta: torch.Tensor | None = field(default=None, repr=False)
    adapter: torch.Tensor | None = field(default=None, repr=False)  # the adapter after an applied step

    @property
    def logprob_change(self) -> list[float]:
        return [after - before for before, after in zip(self.logprob_before, self.logprob_after)]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view (no tensors)."""
        return {
            "method": self.method, "applied": self.applied, "reason": self.reason,
            "num_responses": self.num_responses, "advantages": self.advantages,
            "delta_norm": self.delta_norm, "raw_delta_norm": self.raw_delta_norm, "clipped": self.clipped,
            "logprob_before": self.logprob_before, "logprob_after": self.logprob_after,
            "iterations": self.iterations, "seconds": self.seconds, "measure_seconds": self.measure_seconds,
            "kl": self.kl, "backtracks": self.backtracks,
        }


def _policy_of(student: LocalLM | LoRAPolicy) -> LoRAPolicy:
    if isinstance(student, LoRAPolicy):
        return student
    if isinstance(student, LocalLM):
        return student.policy
    raise TypeError(f"A weights step needs a LocalLM or LoRAPolicy, got {type(student).__name__}.")


class WeightOptimizer(Teleprompter):
    """Shared shape of the weights steps: ``step(policy, responses)`` and, DSPy-style, ``compile``.

    ``rollback(policy)`` undoes the most recent applied step, restoring the adapter bit for bit.
    """

    name = "base"

    def __init__(
        self,
        beta: float = 0.5,
        include: Iterable[str] = ALL_SOURCES,
        length_normalize: bool = False,
        prior_baseline: float = 0.0,
        measure_after: bool = True,
        max_kl: float | None = DEFAULT_MAX_KL,
        max_backtracks: int = 4,
        max_history: int | None = None,
    ) -> None:
        _finite(beta=beta, prior_baseline=prior_baseline, **({} if max_kl is None else {"max_kl": max_kl}))
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}.")
        if (max_kl is not None and max_kl <= 0) or max_backtracks < 0:
            raise ValueError("max_kl must be > 0 (or None to switch the check off) and max_backtracks >= 0.")
        if max_history is not None and max_history < 0:
            raise ValueError("max_history must be >= 0 (or None: every earlier answer of the conversation).")
        include = frozenset(include)
        if not include <= ALL_SOURCES:
            raise ValueError(f"include must be a subset of {sorted(ALL_SOURCES)}, got {sorted(include)}.")
        self.beta = beta
        self.include = include
        self.length_normalize = length_normalize
        self.prior_baseline = prior_baseline
        self.measure_after = measure_after
        self.max_kl = max_kl
        self.max_backtracks = max_backtracks
        self.max_history = max_history
        self._previous: torch.Tensor | None = None

    # -- DSPy teleprompter entry point (the loop lives in rosa2_dspy.teleprompt)
    def compile(self, student: Any, *, trainset: Sequence[Any], metric: Any = None, teacher: Any = None,
                valset: Any = None, batch_size: int = 1, epochs: int = 1, use_labels: bool = True,
                lm: Any = None, adapter: Any = None, threshold: float = 1.0, **_: Any):
        """ROSA as a DSPy teleprompter: adapt ``student``'s local model to ``metric`` on ``trainset``.

        ``student`` is any DSPy program on a :class:`LocalLM`; ``trainset`` holds ``dspy.Example``\ s. It
        runs the student on each example, scores it with ``metric`` (DSPy arities 2 and 3; labels and
        revealed references join as preferred answers unless ``use_labels=False``) and applies one weights
        step per ``batch_size`` examples, ``epochs`` times; returns the student, whose LocalLM now holds the
        adapted adapter. See ``rosa2_dspy.teleprompt``. ``teacher`` and ``valset`` are not used.

        The older form ``compile(lm_or_policy, trainset=[ScoredResponse, ...])`` takes one step from the
        given responses.
        """
        if isinstance(student, (LocalLM, LoRAPolicy)):
            self.last_step = self.step(_policy_of(student), trainset)
            return student
        from rosa2_dspy.teleprompt import compile_program

        return compile_program(self, student, trainset, metric, batch_size=batch_size, epochs=epochs,
                               use_labels=use_labels, lm=lm, adapter=adapter, threshold=threshold)

    def advantages(self, responses: Sequence[ScoredResponse]) -> torch.Tensor:
        rewards = torch.tensor([float(r.reward) for r in responses], dtype=torch.float64)
        contrast = bool(rewards.max() > rewards.min())
        baseline = rewards.mean() if contrast else torch.tensor(self.prior_baseline, dtype=torch.float64)
        return (rewards - baseline) / self.beta

    def _select(self, responses: Sequence[ScoredResponse]) -> list[ScoredResponse]:
        chosen = [r for r in responses if r.source in self.include]
        if self.max_history is None:
            return chosen
        history = [i for i, r in enumerate(chosen) if r.source == "history"]
        dropped = set(history[: max(len(history) - self.max_history, 0)])  # the oldest earlier answers
        return [r for i, r in enumerate(chosen) if i not in dropped]

    def _value(self, lp: Any) -> float:
        return lp.mean if self.length_normalize else lp.total

    def _logprobs(self, policy: LoRAPolicy, responses: Sequence[ScoredResponse], with_grad: bool,
                  adapter: torch.Tensor, keep: Collection[int] = ()):
        """Log-probs (and per-response gradients) of every response under ``adapter``, in one batched pass;
        and the final hidden states of the responses at indices ``keep`` (for the KL check), by index."""
        extra = {"keep_hidden": [i in keep for i in range(len(responses))]} if keep else {}
        results = policy.logprobs([(r.messages, r.completion) for r in responses], with_grad=with_grad,
                                  adapter=adapter, **extra)
        values = [self._value(lp) for lp in results]
        states = {i: results[i].hidden for i in keep}
        if not with_grad:
            return values, None, states
        grads = torch.stack([lp.grad / lp.num_tokens if self.length_normalize else lp.grad for lp in results])
        return values, grads, states

    @staticmethod
    def _anchors(responses: Sequence[ScoredResponse]) -> list[int]:
        """The responses the KL check is taken on: the turn's own answers (else the last response)."""
        return [i for i, r in enumerate(responses) if r.source == "current"] or [len(responses) - 1]

    def step(self, policy: LoRAPolicy, responses: Sequence[ScoredResponse], apply: bool = True,
             adapter: torch.Tensor | None = None) -> WeightStep:
        """Take one step from scored responses; never leaves a corrupted adapter.

        The step starts from ``adapter`` (a flat vector, e.g. one conversation's) or, by default, from the
        policy's own adapter. Applied (``apply=True``), the new vector is ``record.adapter``; only when no
        ``adapter`` was given is it also written into the policy. ``apply=False`` computes the step
        (``delta``, norms) and changes nothing. Several conversations stepping at once share batched passes.
        """
        start = time.perf_counter()
        chosen = self._select(responses)
        record = WeightStep(method=self.name, applied=False, num_responses=len(chosen))
        for r in chosen:
            if not 0.0 <= float(r.reward) <= 1.0:
                raise ValueError(f"Rewards must lie in [0, 1]; got {r.reward} for a {r.source} response.")
        if not chosen:
            record.reason = "no responses selected"
            return record
        advantages = self.advantages(chosen)
        record.advantages = advantages.tolist()
        if not advantages.abs().sum() > 0:
            record.reason = "no reward contrast: every target is 0"
            record.seconds = time.perf_counter() - start
            return record
        own = adapter is None
        before = policy.adapter_vector() if own else torch.as_tensor(adapter, dtype=torch.float32).clone()
        anchors = self._anchors(chosen) if apply and self.max_kl is not None else []
        states = self._update(policy, chosen, advantages, record, apply, before, anchors)
        if record.applied and self.max_kl is not None:
            self._keep_within_kl(policy, chosen, before, record, anchors, states)
        if record.applied:
            record.adapter = before + record.delta
            if own:
                policy.set_adapter_vector(record.adapter)
                self._previous = before
        if self.measure_after and record.applied and not record.logprob_after:  # not measured with the KL
            measuring = time.perf_counter()
            record.logprob_after, _, _ = self._logprobs(policy, chosen, False, record.adapter)
            record.measure_seconds = time.perf_counter() - measuring
        record.seconds = time.perf_counter() - start
        if apply and not record.applied:
            logger.info("%s step skipped: %s", self.name, record.reason)
        return record

    def _keep_within_kl(self, policy: LoRAPolicy, responses: list[ScoredResponse], before: torch.Tensor,
                        record: WeightStep, anchors: list[int], states: dict[int, torch.Tensor] | None) -> None:
        """Backtracking line search on the step's effect: halve ``Δθ`` until the model's next-token
        distributions over the turn's own prompt and answer move by at most ``max_kl`` (mean per-token KL),
        at most ``max_backtracks`` times; past that the step is not applied. A step that satisfies the
        objective's targets can still wreck a small model's fluency; this is where that is caught.

        The "before" side comes from ``states`` (the anchors' hidden states under ``before``, kept by the
        step's own gradient pass; one extra forward if the step kept none). Each candidate costs one forward
        of the anchors under ``before + Δθ``, whose log-probs are also their ``logprob_after``; with
        ``measure_after``, the accepted step adds one forward of the other responses."""
        if states is None or set(states) != set(anchors):
            _, _, kept = self._logprobs(policy, [responses[i] for i in anchors], False, before, range(len(anchors)))
            states = {i: kept[j] for j, i in enumerate(anchors)}
        pairs = [(responses[i].messages, responses[i].completion) for i in anchors]
        references = [states[i] for i in anchors]
        delta = record.delta
        for halvings in range(self.max_backtracks + 1):
            results = policy.logprobs(pairs, adapter=before + delta, references=references)
            record.kl = max(lp.kl for lp in results)
            if record.kl <= self.max_kl:
                record.backtracks = halvings
                record.delta, record.delta_norm = delta, float(delta.double().norm())
                if self.measure_after:
                    after = {i: self._value(lp) for i, lp in zip(anchors, results)}
                    rest = [i for i in range(len(responses)) if i not in after]
                    if rest:
                        measuring = time.perf_counter()
                        values, _, _ = self._logprobs(policy, [responses[i] for i in rest], False, before + delta)
                        after.update(zip(rest, values))
                        record.measure_seconds = time.perf_counter() - measuring
                    record.logprob_after = [after[i] for i in range(len(responses))]
                return
            if halvings < self.max_backtracks:
                delta = delta * 0.5
        record.backtracks = self.max_backtracks
        record.applied = False
        record.reason = (f"step rolled back: even after {self.max_backtracks} halvings it moved the model's "
                         f"predictions on this turn by KL {record.kl:.3g} > max_kl {self.max_kl}")

    def _update(self, policy: LoRAPolicy, responses: list[ScoredResponse], advantages: torch.Tensor,
                record: WeightStep, apply: bool, adapter: torch.Tensor,
                keep: Collection[int] = ()) -> dict[int, torch.Tensor] | None:
        """Fill ``record.delta`` (and ``applied``) for a step from ``adapter``; must not touch the policy.
        Returns the final hidden states under ``adapter`` of the responses at ``keep`` (the KL check's
        anchors), if a pass under ``adapter`` kept them (else None: the check makes its own pass)."""
        raise NotImplementedError

    def rollback(self, policy: LoRAPolicy) -> bool:
        """Restore the adapter from before the most recent applied step. Returns False if there is none."""
        if self._previous is None:
            return False
        policy.set_adapter_vector(self._previous)
        self._previous = None
        return True


class ROSAStep(WeightOptimizer):
    """ROSA's one-step update ``Δθ = Gᵀ(GGᵀ + λI)⁻¹a`` with a trust region (see the module docstring).

    Args:
        beta: KL strength; targets are ``(r_i - r̄)/beta``. Smaller beta, bigger steps.
        ridge: λ relative to the mean squared gradient norm.
        max_norm: trust-region radius on ``‖Δθ‖``; a longer step is scaled back onto it.
        include: which response sources to use (``current``, ``history``, ``reference``).
        length_normalize: use mean per-token log-probs instead of sums.
        prior_baseline: the baseline when the responses' rewards do not differ (module docstring).
        max_history: keep at most this many of the conversation's earlier answers (the most recent); the
            turn's own answers and the reference are always kept. None: all of them. A step's cost grows
            with its responses (one gradient row each).

    Example:
        >>> step = ROSAStep(beta=0.5).step(lm.policy, [ScoredResponse(msgs, "4", 0.0),   # doctest: +SKIP
        ...                                              ScoredResponse(msgs, "5", 1.0, "reference")])
    """

    name = "rosa"

    def __init__(self, beta: float = 0.5, ridge: float = 1e-3, max_norm: float = 1.0, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)
        _finite(ridge=ridge, max_norm=max_norm)
        if ridge < 0 or max_norm <= 0:
            raise ValueError("ridge must be >= 0 and max_norm > 0.")
        self.ridge = ridge
        self.max_norm = max_norm

    def solve(self, grads: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """``Gᵀ(GGᵀ + λI)⁻¹a`` in float64, with ``λ = ridge · mean‖g_i‖²``. Raises ``LinAlgError`` on a
        system singular to the gradients' (float32) precision."""
        G = grads.to(device="cpu", dtype=torch.float64)  # per-sample gradients may come from any device
        K = G @ G.T
        lam = self.ridge * float(torch.diagonal(K).mean())
        system = K + lam * torch.eye(len(K), dtype=torch.float64)
        # The gradients are float32: a system worse conditioned than float32's precision (e.g. two identical
        # responses and no ridge) has no meaningful solution, whatever float64 rounding makes of it.
        condition = float(torch.linalg.cond(system))
        if not condition < 1 / torch.finfo(torch.float32).eps:
            raise torch.linalg.LinAlgError(f"the system is singular to float32 precision (condition number "
                                           f"{condition:.1e}); use ridge > 0")
        coefficients = torch.linalg.solve(system, advantages)
        return G.T @ coefficients

    def _update(self, policy, responses, advantages, record, apply, adapter, keep=()):
        record.logprob_before, grads, states = self._logprobs(policy, responses, True, adapter, keep)
        record.iterations = 1
        if not torch.isfinite(grads).all():
            record.reason = "non-finite gradient"
            return
        if not grads.abs().sum() > 0:
            record.reason = "zero gradient"
            return
        try:
            delta = self.solve(grads, advantages)
        except torch.linalg.LinAlgError as err:
            record.reason = f"singular system ({err})"
            return
        raw = float(delta.norm())
        if not torch.isfinite(delta).all():
            record.reason = "non-finite solution"
            return
        record.raw_delta_norm = raw
        record.clipped = raw > self.max_norm
        record.delta = _within_radius(delta, self.max_norm)
        record.delta_norm = float(record.delta.double().norm())
        if not record.delta_norm > 0:
            record.reason = "zero step"
            return
        if not apply:
            record.reason = "dry run"
            return
        record.applied = True
        return states


def _finite(**values: float) -> None:
    """Refuse NaN and infinities: ``max_norm=nan`` would silently switch the trust region off."""
    for name, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")


def _within_radius(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """``delta`` as float32, scaled back onto the ball ``‖Δθ‖ <= radius`` when it is longer.

    Scaling in float64 and then rounding to float32 can land one ulp outside the ball; the factor
    shrinks until the float32 vector itself is inside, so the trust region holds exactly.
    """
    delta = delta.to(torch.float64)
    norm = float(delta.norm())
    if norm <= radius:
        return delta.float()
    factor = radius / norm
    while True:
        clipped = (delta * factor).float()
        if float(clipped.double().norm()) <= radius:
            return clipped
        factor *= 1 - 1e-7


class IterativeTTT(WeightOptimizer):
    """Baseline: iterative test-time training on the same signal as ROSA.

    Minimises ``Σ_i (log pi_θ(y_i) - log pi_θ0(y_i) - a_i)²``, the nonlinear form of ROSA's linearised
    objective, with ``steps`` Adam (or SGD) steps on the adapter. Stops early once every response's
    log-prob has moved by at least ``stop_fraction`` of its target (``target_gain`` can instead ask for
    a fixed gain on the first response, which is how the benchmark matches ROSA's gain).
    """

    name = "ttt"

    def __init__(self, steps: int = 10, lr: float = 1e-3, optimizer: Literal["adam", "sgd"] = "adam",
                 target_gain: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _finite(lr=lr, **({} if target_gain is None else {"target_gain": target_gain}))
        if steps < 1 or lr <= 0 or optimizer not in ("adam", "sgd"):
            raise ValueError("IterativeTTT needs steps >= 1, lr > 0 and optimizer 'adam' or 'sgd'.")
        self.steps, self.lr, self.optimizer, self.target_gain = steps, lr, optimizer, target_gain

    def _update(self, policy, responses, advantages, record, apply, adapter, keep=()):
        if not apply:
            raise ValueError("IterativeTTT has no dry run: its step is defined by applying it.")
        theta = torch.nn.Parameter(adapter.clone())
        opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)([theta], lr=self.lr)
        initial, current, states = None, adapter, None
        for iteration in range(self.steps):
            values, grads, kept = self._logprobs(policy, responses, True, current, keep if initial is None else ())
            values_t = torch.tensor(values, dtype=torch.float64)
            if initial is None:
                initial, states = values_t, kept
                record.logprob_before = values
            gain = values_t - initial
            if self.target_gain is not None and iteration > 0 and gain[0] >= self.target_gain:
                break
            if not torch.isfinite(grads).all():  # all or nothing
                record.reason = "non-finite gradient"
                record.iterations = 0
                return
            residual = gain - advantages
            # d/dθ Σ residual_i² = Σ 2 residual_i g_i ; minimise it.
            theta.grad = (2 * residual.float()[:, None] * grads).sum(0)
            opt.step()
            opt.zero_grad()
            current = theta.detach().clone()
            record.iterations = iteration + 1
        record.delta = current - adapter
        record.delta_norm = float(record.delta.norm())
        record.applied = record.iterations > 0 and record.delta_norm > 0
        if record.iterations > 0 and not record.applied:
            record.reason = "zero step"
        return states


class NoUpdate(WeightOptimizer):
    """Baseline: the weights never change (used by the static and prompt-only modes)."""

    name = "none"

    def step(self, policy: LoRAPolicy, responses: Sequence[ScoredResponse], apply: bool = True,
             adapter: torch.Tensor | None = None) -> WeightStep:
        return WeightStep(method=self.name, applied=False, reason="weights step disabled",
                          num_responses=len(self._select(responses)))
