"""The ROSA weights step and its baselines, on the tiny in-process model."""

from __future__ import annotations

import dspy
import pytest
import torch

from rosa2_dspy.adapter import LenientChatAdapter
from rosa2_dspy.weights import IterativeTTT, NoUpdate, ROSAStep, ScoredResponse

PROMPT = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2+3?"}]


@pytest.fixture
def policy(tiny_policy):
    # LoRA starts with B = 0, where gradients w.r.t. A vanish; start from a generic adapter instead.
    g = torch.Generator().manual_seed(1)
    tiny_policy.set_adapter_vector(torch.randn(tiny_policy.num_adapter_parameters, generator=g) * 0.05)
    return tiny_policy


def responses():
    return [
        ScoredResponse(PROMPT, "It is 4.", 0.0, "current"),
        ScoredResponse(PROMPT, "It is 5.", 1.0, "reference"),
    ]


def test_one_step_moves_logprobs_with_their_advantages_and_equals_the_closed_form(policy):
    before = policy.adapter_vector()
    grads = torch.stack([policy.logprob(r.messages, r.completion, with_grad=True).grad for r in responses()])
    step = ROSAStep(beta=0.5, ridge=1e-2, max_norm=1e6).step(policy, responses())

    assert step.applied and not step.clipped
    assert step.advantages == [-1.0, 1.0]
    down, up = step.logprob_change
    assert down < 0 < up  # the failed answer lost probability, the reference gained

    # Independent closed form: ridge least squares min ||G d - a||² + λ||d||² as one dense lstsq.
    G = grads.double()
    a = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    lam = 1e-2 * float((G * G).sum(1).mean())
    P = G.shape[1]
    stacked = torch.cat([G, lam**0.5 * torch.eye(P, dtype=torch.float64)])
    target = torch.cat([a, torch.zeros(P, dtype=torch.float64)])
    expected = torch.linalg.lstsq(stacked, target[:, None]).solution[:, 0]
    # ... and the parameter-space (Gauss-Newton) form (GᵀG + λI)⁻¹Gᵀa gives the same vector.
    primal = torch.linalg.solve(G.T @ G + lam * torch.eye(P, dtype=torch.float64), G.T @ a)
    actual = (policy.adapter_vector() - before).double()
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(primal, expected, rtol=1e-6, atol=1e-9)
    assert step.delta_norm == pytest.approx(float(expected.norm()), rel=1e-4)


def test_linearised_change_hits_the_targets_when_ridge_is_small(policy):
    grads = torch.stack([policy.logprob(r.messages, r.completion, with_grad=True).grad for r in responses()])
    step = ROSAStep(beta=0.5, ridge=1e-8, max_norm=1e6).step(policy, responses())
    assert torch.allclose(grads.double() @ step.delta.double(), torch.tensor([-1.0, 1.0], dtype=torch.float64),
                          atol=1e-3)


def test_trust_region_scales_the_step_back_onto_the_radius(policy):
    free_optimizer = ROSAStep(max_norm=1e6)
    free = free_optimizer.step(policy, responses())
    assert free_optimizer.rollback(policy)  # back to the start
    radius = free.delta_norm / 10
    clipped = ROSAStep(max_norm=radius).step(policy, responses())
    assert clipped.clipped and clipped.delta_norm == pytest.approx(radius, rel=1e-5)
    assert clipped.raw_delta_norm == pytest.approx(free.delta_norm, rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(clipped.delta, free.delta, dim=0)
    assert cosine > 0.9999


def test_step_touches_only_adapter_parameters_and_rollback_is_bit_exact(policy):
    state_before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    optimizer = ROSAStep()
    step = optimizer.step(policy, responses())
    assert step.applied
    state_after = policy.model.state_dict()
    changed = {k for k in state_before if not torch.equal(state_before[k], state_after[k])}
    assert changed and all("lora_B" in k or "lora_A" in k for k in changed)
    assert optimizer.rollback(policy)
    assert all(torch.equal(state_before[k], v) for k, v in policy.model.state_dict().items())
    assert not optimizer.rollback(policy)  # only the last step can be undone


def test_non_finite_gradients_give_no_update(policy):
    # Poison a base weight so the forward pass itself produces NaN, as a diverged model would.
    norm = policy.model.base_model.model.model.norm.weight
    with torch.no_grad():
        norm[0] = float("nan")
    before = policy.adapter_vector()
    step = ROSAStep().step(policy, responses())
    assert not step.applied and step.reason == "non-finite gradient"
    assert torch.equal(policy.adapter_vector(), before)
    ttt = IterativeTTT(steps=3).step(policy, responses())
    assert not ttt.applied and ttt.reason == "non-finite gradient"
    assert torch.equal(policy.adapter_vector(), before)


def test_singular_system_gives_no_update(policy):
    same = [ScoredResponse(PROMPT, "It is 5.", 0.0), ScoredResponse(PROMPT, "It is 5.", 1.0, "history")]
    before = policy.adapter_vector()
    step = ROSAStep(ridge=0.0).step(policy, same)
    assert not step.applied and ("singular" in step.reason or "non-finite" in step.reason)
    assert torch.equal(policy.adapter_vector(), before)


def test_no_reward_contrast_and_filters(policy):
    before = policy.adapter_vector()
    # The default (prior baseline 0): failures alone give no targets, so no step; a contrast steps.
    failures = [ScoredResponse(PROMPT, "It is 4.", 0.0), ScoredResponse(PROMPT, "It is 6.", 0.0, "history")]
    gated = ROSAStep().step(policy, failures)
    assert not gated.applied and "no reward contrast" in gated.reason
    assert torch.equal(policy.adapter_vector(), before)
    contrast = [ScoredResponse(PROMPT, "It is 4.", 0.0), ScoredResponse(PROMPT, "It is 5.", 0.5, "history")]
    assert ROSAStep().step(policy, contrast, apply=False).advantages == [-0.5, 0.5]
    # Equal partial credit and no contrast: measured from 0, both are pulled up.
    neutral = [ScoredResponse(PROMPT, "It is 4.", 0.5), ScoredResponse(PROMPT, "It is 6.", 0.5, "history")]
    assert ROSAStep().step(policy, neutral, apply=False).advantages == [1.0, 1.0]
    # Prior baseline 0.5 (the default before 2026-11-27): equal credit 0.5 gives no step, and two failures
    # are both pushed down.
    step = ROSAStep(prior_baseline=0.5).step(policy, neutral)
    assert not step.applied and "no reward contrast" in step.reason
    assert torch.equal(policy.adapter_vector(), before)
    pushed = ROSAStep(prior_baseline=0.5).step(policy, failures)
    assert pushed.advantages == [-1.0, -1.0] and all(change < 0 for change in pushed.logprob_change)
    policy.set_adapter_vector(before)
    only_current = ROSAStep(include={"current"}, prior_baseline=0.5).step(policy, responses())
    assert only_current.num_responses == 1 and only_current.advantages == [-1.0]  # prior baseline 0.5, beta 0.5
    assert only_current.applied and only_current.logprob_change[0] < 0
    assert not torch.equal(policy.adapter_vector(), before)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ROSAStep().step(policy, [ScoredResponse(PROMPT, "x", 2.0)])
    with pytest.raises(ValueError, match="subset"):
        ROSAStep(include={"everything"})


def test_iterative_ttt_and_no_update_share_the_interface(policy, tiny_lm):
    before = policy.adapter_vector()
    assert not NoUpdate().step(policy, responses()).applied
    assert torch.equal(policy.adapter_vector(), before)
    ttt = IterativeTTT(steps=5, lr=5e-3)
    step = ttt.step(policy, responses())
    assert step.applied and step.iterations == 5
    down, up = step.logprob_change
    assert down < 0 < up
    assert ttt.rollback(policy) and torch.equal(policy.adapter_vector(), before)
    # DSPy-teleprompter style: compile(student, trainset=...) returns the student, updated.
    optimizer = ROSAStep()
    assert optimizer.compile(tiny_lm, trainset=responses()) is tiny_lm
    assert optimizer.last_step.applied and not torch.equal(tiny_lm.policy.adapter_vector(), before)


# ---------------------------------------------------------------- no step may wreck the model


def test_divergence_is_zero_for_one_adapter_and_batched_equals_alone(policy):
    theta = policy.adapter_vector()
    g = torch.Generator().manual_seed(3)
    other = theta + 0.5 * torch.randn(theta.shape, generator=g)
    pairs = [(r.messages, r.completion) for r in responses()]
    assert policy.divergence(pairs, theta, theta) == pytest.approx([0.0, 0.0], abs=1e-6)
    together = policy.divergence(pairs, theta, other)
    alone = [policy.divergence([pair], theta, other)[0] for pair in pairs]
    assert all(kl > 0 for kl in together)
    assert together == pytest.approx(alone, rel=1e-4)
    # KL(p || q) by hand for the first pair, from full next-token distributions.
    ids = policy._prompt_ids(pairs[0][0]) + policy._response_ids(pairs[0][1])
    x = torch.tensor([ids])
    with torch.no_grad():
        policy.set_adapter_vector(theta)
        p = torch.log_softmax(policy.model(input_ids=x).logits[0, :-1].float(), -1)
        policy.set_adapter_vector(other)
        q = torch.log_softmax(policy.model(input_ids=x).logits[0, :-1].float(), -1)
        policy.set_adapter_vector(theta)
    assert together[0] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)


def test_a_wrecking_step_is_shrunk_by_backtracking_until_the_kl_bound_holds(policy):
    before = policy.adapter_vector()
    huge = ROSAStep(beta=0.5, ridge=1e-8, max_norm=1e6, max_kl=None).step(policy, responses(), apply=False)
    pairs = [(responses()[0].messages, responses()[0].completion)]
    unguarded_kl = policy.divergence(pairs, before, before + huge.delta)[0]
    bound = unguarded_kl / 20  # a bound this step breaks twentyfold

    step = ROSAStep(beta=0.5, ridge=1e-8, max_norm=1e6, max_kl=bound, max_backtracks=12).step(policy, responses())
    assert step.applied and step.backtracks > 0
    assert step.kl <= bound
    assert step.delta_norm == pytest.approx(huge.delta_norm / 2**step.backtracks, rel=1e-5)
    after = policy.adapter_vector()
    assert torch.allclose(after - before, huge.delta / 2**step.backtracks, atol=1e-6)
    assert policy.divergence(pairs, before, after)[0] == pytest.approx(step.kl, rel=1e-4)


def conversation():
    """A turn late in a conversation: two earlier answers (one longer), this turn's answer, the reference."""
    other = [PROMPT[0], {"role": "user", "content": "And what is 20+30, please?"}]
    return [ScoredResponse(PROMPT, "It is 4.", 0.0, "history"),
            ScoredResponse(other, "Surely it must be 40, or so I believe.", 0.0, "history"),
            ScoredResponse(PROMPT, "It is 6.", 0.0, "current"),
            ScoredResponse(PROMPT, "It is 5.", 1.0, "reference")]


@pytest.mark.parametrize("measure_after", [True, False])
@pytest.mark.parametrize("build", [lambda **kw: ROSAStep(beta=0.5, max_norm=1.0, **kw),
                                   lambda **kw: IterativeTTT(beta=0.5, steps=3, lr=1e-2, **kw)],
                         ids=["rosa", "ttt"])
def test_the_kl_check_and_logprob_after_ride_on_the_steps_passes_and_equal_separate_ones(policy, build,
                                                                                            measure_after):
    before, chosen = policy.adapter_vector(), conversation()
    pairs = [(r.messages, r.completion) for r in chosen]
    unchecked = build(max_kl=None, measure_after=False).step(policy, chosen, adapter=before)
    passes = dict(policy.batcher.passes)
    optimizer = build(max_kl=10.0, measure_after=measure_after)
    step = optimizer.step(policy, chosen, adapter=before)
    made = {kind: policy.batcher.passes[kind] - passes[kind] for kind in passes}
    # The same Δθ as without the check, and no pass beyond the step's own and one under the new adapter.
    assert step.applied and step.backtracks == 0
    assert torch.equal(step.delta, unchecked.delta)
    assert made == {"generate": 0, "score": step.iterations + 1 + measure_after, "divergence": 0}
    after = before + step.delta
    assert torch.equal(step.adapter, after) and torch.equal(policy.adapter_vector(), before)
    # KL: what policy.divergence computes in passes of its own, before and after, over this turn's answer.
    assert step.kl > 0
    assert step.kl == pytest.approx(policy.divergence([pairs[2]], before, after)[0], rel=1e-5)
    # logprob_after: what a separate pass under the new adapter gives.
    if measure_after:
        assert step.logprob_after == pytest.approx([lp.total for lp in policy.logprobs(pairs, adapter=after)],
                                                   rel=1e-6)
        assert 0 < step.measure_seconds < step.seconds  # the extra forward is timed, inside the step's time
    else:
        assert step.logprob_after == [] and step.measure_seconds == 0.0


def test_after_backtracking_logprob_after_is_measured_under_the_halved_step(policy):
    """Each halving forwards only this turn's answer; the other responses once, under the accepted step."""
    before, chosen = policy.adapter_vector(), conversation()
    huge = ROSAStep(beta=0.5, ridge=1e-8, max_norm=1e6, max_kl=None).step(policy, chosen, apply=False)
    bound = policy.divergence([(chosen[2].messages, chosen[2].completion)], before, before + huge.delta)[0] / 20
    passes = policy.batcher.passes["score"]
    step = ROSAStep(beta=0.5, ridge=1e-8, max_norm=1e6, max_kl=bound, max_backtracks=12).step(policy, chosen)
    assert step.applied and step.backtracks > 0 and step.kl <= bound
    assert policy.batcher.passes["score"] - passes == 1 + (step.backtracks + 1) + 1
    after = policy.adapter_vector()
    assert torch.equal(after, before + huge.delta / 2**step.backtracks)
    pairs = [(r.messages, r.completion) for r in chosen]
    assert step.logprob_after == pytest.approx([lp.total for lp in policy.logprobs(pairs)], rel=1e-6)


def test_a_score_pass_keeps_hidden_states_and_measures_kl_from_them(policy):
    theta = policy.adapter_vector()
    other = theta + 0.3 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(5))
    pairs = [(r.messages, r.completion) for r in conversation()]
    kept = policy.logprobs(pairs, adapter=theta, keep_hidden=[False, True, True, False])
    assert kept[0].hidden is None and kept[3].hidden is None
    assert kept[1].hidden.shape == (len(policy._prompt_ids(pairs[1][0])) + len(policy._response_ids(pairs[1][1])) - 1,
                                    policy.causal_lm.config.hidden_size)
    scored = policy.logprobs(pairs, adapter=other, references=[None, kept[1].hidden, kept[2].hidden, None])
    assert scored[0].kl is None and scored[3].kl is None
    assert [scored[1].kl, scored[2].kl] == pytest.approx(policy.divergence(pairs[1:3], theta, other), rel=1e-5)
    assert [lp.total for lp in scored] == [lp.total for lp in policy.logprobs(pairs, adapter=other)]
    with pytest.raises(ValueError, match="hidden states of"):  # states of another text
        policy.logprobs(pairs[:1], adapter=other, references=[kept[1].hidden])


def test_a_step_that_stays_too_large_is_rolled_back_and_recorded(policy):
    before = policy.adapter_vector()
    step = ROSAStep(beta=0.001, ridge=1e-8, max_norm=1e6, max_kl=1e-9, max_backtracks=1).step(policy, responses())
    assert not step.applied and step.backtracks == 1
    assert "rolled back" in step.reason and step.kl > 1e-9
    assert torch.equal(policy.adapter_vector(), before)
    assert step.summary()["kl"] == step.kl


def test_kl_bound_is_validated():
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError):
            ROSAStep(max_kl=bad)
    with pytest.raises(ValueError):
        ROSAStep(max_backtracks=-1)
    assert ROSAStep(max_kl=None).max_kl is None


# ---------------------------------------------------------------- the teleprompter contract (issue 11, item 6)

TRAINSET = [dspy.Example(question=q, answer=a).with_inputs("question")
            for q, a in [("What is 2+3?", "5"), ("What is 1+1?", "2"), ("What is 3+4?", "7"), ("What is 2+2?", "4")]]


def exact(example, prediction):
    return float(prediction.answer.strip() == example.answer)


def exact_with_trace(example, prediction, trace=None):
    return exact(example, prediction)


@pytest.mark.parametrize("metric, batch_size", [(exact, 1), (exact_with_trace, 2), (exact, 4)])
def test_compile_adapts_a_dspy_programs_model_towards_the_metrics_preferred_answers(tiny_lm, metric, batch_size):
    program = dspy.Predict("question -> answer")
    policy = tiny_lm.policy
    adapter = LenientChatAdapter()

    def preferred_logprobs():  # log pi(label | the prompt the program sends), under the policy's own adapter
        return [policy.logprob(adapter.format(program.signature, [], e.inputs()), e.answer).total for e in TRAINSET]

    before, start = preferred_logprobs(), policy.adapter_vector()
    optimizer = ROSAStep(beta=0.5, max_norm=1.0)
    with dspy.context(lm=tiny_lm):  # the LocalLM comes from DSPy's settings, as for any DSPy program
        student = optimizer.compile(program, trainset=TRAINSET, metric=metric, batch_size=batch_size)
    after = preferred_logprobs()

    assert student is program
    assert not torch.equal(policy.adapter_vector(), start)
    assert len(optimizer.history) == len(TRAINSET) // batch_size
    assert all(h["step"]["applied"] for h in optimizer.history)
    assert all(h["mean_score"] == 0.0 for h in optimizer.history)  # the untrained tiny model never answers right
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_compile_takes_the_lm_from_the_programs_predictors_and_refuses_a_served_lm(tiny_lm):
    program = dspy.Predict("question -> answer")
    program.set_lm(tiny_lm)
    start = tiny_lm.policy.adapter_vector()
    ROSAStep().compile(program, trainset=TRAINSET[:1], metric=exact)
    assert not torch.equal(tiny_lm.policy.adapter_vector(), start)
    served = dspy.Predict("question -> answer")
    served.set_lm(dspy.LM("openai/gpt-4o-mini"))
    with pytest.raises(TypeError, match="LocalLM"):
        ROSAStep().compile(served, trainset=TRAINSET, metric=exact)


def test_the_baselines_take_the_same_teleprompter_contract(tiny_lm):
    start = tiny_lm.policy.adapter_vector()
    with dspy.context(lm=tiny_lm):
        NoUpdate().compile(dspy.Predict("question -> answer"), trainset=TRAINSET[:2], metric=exact)
        assert torch.equal(tiny_lm.policy.adapter_vector(), start)
        IterativeTTT(steps=2, lr=1e-2).compile(dspy.Predict("question -> answer"), trainset=TRAINSET[:2],
                                               metric=exact, batch_size=2)
    assert not torch.equal(tiny_lm.policy.adapter_vector(), start)


def test_max_history_keeps_the_most_recent_earlier_answers(policy):
    answers = [ScoredResponse(PROMPT, f"It is {n}.", 0.0, "history") for n in (1, 2, 3)]
    responses = answers + [ScoredResponse(PROMPT, "It is 4.", 0.0, "current"),
                           ScoredResponse(PROMPT, "It is 5.", 1.0, "reference")]
    kept = ROSAStep(max_history=1)._select(responses)
    assert [r.completion for r in kept] == ["It is 3.", "It is 4.", "It is 5."]
    assert ROSAStep(max_history=0)._select(responses) == responses[3:]
    assert ROSAStep()._select(responses) == responses
    step = ROSAStep(max_history=1).step(policy, responses, apply=False)
    assert step.num_responses == 3
    with pytest.raises(ValueError, match="max_history"):
        ROSAStep(max_history=-1)
