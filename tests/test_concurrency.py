"""Many conversations at once on one instance: each concurrent run is compared with the sequential run.

Tiny in-process model, greedy decoding; the refiner is DSPy's DummyLM (the textual side only).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
import torch

from rosa2_dspy.decoding import DecodeBatch, PrefixCache, prefill_groups
from rosa2_dspy.engine import Batcher, GenerationRow, generate_rows
from rosa2_dspy.kv_cache import GrowingLayer
from rosa2_dspy.scoring import ScoreRow
from rosa2_dspy.rosa2 import ROSA2
from rosa2_dspy.weights import ROSAStep, ScoredResponse
from conftest import requirement_refiner, requirements_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # bit-for-bit comparisons (conftest)


QUESTIONS = ["What is 2+3?", "Name a red fruit.", "Spell cat backwards.", "How many legs has a spider?"]
EXAMPLES = [dspy.Example(question=q, answer=str(i)).with_inputs("question") for i, q in enumerate(QUESTIONS)]


def adapters(policy, n, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [policy.initial_adapter_vector + scale * torch.randn(policy.num_adapter_parameters, generator=g)
            for _ in range(n)]


def chat(question):
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]


# ---------------------------------------------------------------- the batching engine

def test_batched_generation_with_mixed_adapters_equals_each_row_alone(tiny_policy):
    vectors = adapters(tiny_policy, 4)
    rows = [GenerationRow(tiny_policy._prompt_ids(chat(q)), v, max_new_tokens=6 + 3 * i)
            for i, (q, v) in enumerate(zip(QUESTIONS, vectors))]
    alone = [generate_rows(tiny_policy, [row])[0] for row in rows]
    together = generate_rows(tiny_policy, rows)
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert [g.finish_reason for g in together] == [g.finish_reason for g in alone]
    assert len({tuple(g.tokens) for g in alone}) == 4  # the adapters really differ per row
    assert [len(g.tokens) for g in together] == [6, 9, 12, 15]  # each row keeps its own budget


def test_prefill_groups_pad_little_and_keep_equal_lengths_together():
    assert prefill_groups([30, 30, 30]) == [[0, 1, 2]]
    assert prefill_groups([200, 30, 31, 400]) == [[1, 2], [0], [3]]
    for lengths in ([5, 9, 100, 101, 102, 300], [50] * 4 + [52, 900]):
        for group in prefill_groups(lengths):
            longest = max(lengths[i] for i in group)
            assert longest * len(group) <= 1.125 * sum(lengths[i] for i in group)


def test_rows_joining_a_running_decode_answer_as_they_would_alone(tiny_policy):
    vectors = adapters(tiny_policy, 4)
    prompts = [tiny_policy._prompt_ids(chat(q)) for q in QUESTIONS]
    rows = [GenerationRow(prompts[0], vectors[0], max_new_tokens=14),
            GenerationRow(prompts[1], vectors[1], max_new_tokens=10),
            GenerationRow(prompts[2] + prompts[3], vectors[2], max_new_tokens=9),  # longer than the running rows
            GenerationRow(prompts[3][:5], vectors[3], max_new_tokens=8)]  # shorter
    alone = [generate_rows(tiny_policy, [row])[0] for row in rows]
    with DecodeBatch(tiny_policy) as batch:
        first = batch.admit(rows[:2])
        for _ in range(3):
            batch.step()
        later = batch.admit(rows[2:])
        assert batch.size == 4
        while batch.size:
            batch.step()
        together = [batch.results[h] for h in first + later]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert [g.finish_reason for g in together] == [g.finish_reason for g in alone]
    assert len({tuple(g.tokens) for g in alone}) == 4


def test_a_request_arriving_mid_decode_joins_it_and_returns_when_its_own_rows_end(tiny_policy):
    vectors = adapters(tiny_policy, 2)
    short = GenerationRow(tiny_policy._prompt_ids(chat(QUESTIONS[1])), vectors[1], max_new_tokens=4)
    expected_short = generate_rows(tiny_policy, [short])[0].tokens
    started, queued, seen = threading.Event(), threading.Event(), []
    pending = {}

    def on_token(index, token):  # runs on the batcher's thread, once per token of the long row
        if index == 1:
            started.set()
            assert queued.wait(10)
        if "short" in pending:
            seen.append(pending["short"].done())

    long = GenerationRow(tiny_policy._prompt_ids(chat(QUESTIONS[0])), vectors[0], max_new_tokens=30,
                         on_token=on_token)
    expected_long = generate_rows(tiny_policy, [GenerationRow(long.prompt, long.adapter, 30)])[0].tokens
    batcher = Batcher(tiny_policy, wait_ms=0)
    long_future = batcher.submit("generate", [long])[0]
    assert started.wait(10)
    pending["short"] = batcher.submit("generate", [short])[0]
    queued.set()
    assert pending["short"].result(10)[0].tokens == expected_short
    assert long_future.result(10)[0].tokens == expected_long
    assert batcher.passes["generate"] == 1  # the short request joined the running decode
    assert len(expected_long) > 10 and True in seen  # ... and got its answer while the long row still decoded


def long_system(question):
    return [{"role": "system", "content": "You answer questions about arithmetic, fruit and spiders. " * 3},
            {"role": "user", "content": question}]


def test_a_cached_system_prompt_gives_the_answers_a_fresh_cache_gives(tiny_policy):
    vectors = adapters(tiny_policy, 2)
    prompt, prefixes = tiny_policy._prompt(long_system(QUESTIONS[0]))
    (prefix,) = prefixes  # no demos: the system message is the one prefix
    assert 16 <= prefix < len(prompt) and prompt[:prefix] == tiny_policy._prompt(long_system("other"))[0][:prefix]
    fresh = [tiny_policy.generate(long_system(q), max_new_tokens=8, adapter=vectors[0]) for q in QUESTIONS]
    cache = tiny_policy.prefix_cache
    assert (cache.misses, cache.hits) == (1, 3)  # one system message, one adapter
    again = [tiny_policy.generate(long_system(q), max_new_tokens=8, adapter=vectors[0]) for q in reversed(QUESTIONS)]
    assert again[::-1] == fresh and cache.hits == 7
    tiny_policy.generate(long_system(QUESTIONS[0]), max_new_tokens=8, adapter=vectors[1])
    assert cache.misses == 2  # another adapter, another entry
    # The split prefill computes the next-token distribution of the whole prompt at once (up to rounding).
    logits = []
    for cuts in (prefixes, ()):
        with DecodeBatch(tiny_policy) as batch:
            batch.admit([GenerationRow(prompt, vectors[0], max_new_tokens=1, prefixes=cuts)])
            logits.append(batch._logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    tiny_policy.prefix_cache = PrefixCache(max_tokens=0)  # off
    tiny_policy.generate(long_system(QUESTIONS[0]), max_new_tokens=8, adapter=vectors[0])
    assert (tiny_policy.prefix_cache.hits, tiny_policy.prefix_cache.misses) == (0, 0)


def with_demos(demos, question):
    """A DSPy predictor's call: system message, demo pairs, then the question."""
    turns = [m for q, a in demos for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return [long_system("")[0], *turns, {"role": "user", "content": question}]


def test_a_cached_demo_block_gives_the_answers_a_fresh_cache_gives(tiny_policy):
    vector = adapters(tiny_policy, 1)[0]
    demos = [("Name a yellow fruit.", "banana"), ("What is 1+1?", "2")]
    prompt, prefixes = tiny_policy._prompt(with_demos(demos, QUESTIONS[0]))
    system, block = prefixes
    other, other_cuts = tiny_policy._prompt(with_demos(demos, QUESTIONS[1]))
    assert other_cuts == prefixes and other[:block] == prompt[:block] and other[block:] != prompt[block:]
    calls = [(demos, q) for q in QUESTIONS] + [(demos[::-1], q) for q in QUESTIONS]

    def answer(call):
        return tiny_policy.generate(with_demos(*call), max_new_tokens=8, adapter=vector)

    fresh = []
    for call in calls:  # an empty cache for every call: each prompt is prefilled chunk by chunk from scratch
        tiny_policy.prefix_cache = PrefixCache()
        fresh.append(answer(call))
    cache = tiny_policy.prefix_cache = PrefixCache()
    assert [answer(call) for call in calls] == fresh
    # The first call misses both prefixes; the other questions under the same demos find the demo block;
    # the reversed demos miss their block but find the system message, then their block is cached too.
    assert (cache.hits, cache.misses) == (3 + 1 + 3, 2 + 1)
    assert len(cache._entries) == 3  # the system message and two demo blocks


def test_the_prefix_cache_keeps_at_most_max_tokens():
    cache = PrefixCache(max_tokens=50)
    vector = torch.zeros(4)
    keys = [cache.key(list(range(i, i + 20)), vector) for i in range(3)]
    for key in keys:
        cache.put(key, [])
    assert cache.get(keys[0]) is None and cache.get(keys[1]) == [] and cache.get(keys[2]) == []
    assert cache.key([1, 2], vector) != cache.key([1, 2], vector + 1)


def test_a_growing_cache_layer_holds_what_concatenation_would_and_never_writes_into_views_it_kept():
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    chunk = lambda n, b=2: (torch.randn(b, 3, n, 4), torch.randn(b, 3, n, 4))  # noqa: E731
    pad = lambda t, width: torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))  # noqa: E731
    ours, expected = GrowingLayer(), [torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 4)]

    def same() -> bool:
        return torch.equal(ours.keys, expected[0]) and torch.equal(ours.values, expected[1])

    def append(new) -> None:
        ours.update(*new)
        expected[:] = [torch.cat([e, n], dim=-2) for e, n in zip(expected, new)]

    for n in (5, 1, 1, GrowingLayer.SPARE, 1):  # the fourth chunk outgrows the room left in the buffer
        append(chunk(n))
        assert same()
    kept = ours.keep(3)
    kept_copy = [t.clone() for t in kept]  # a prefix cache's entry
    buffer = ours._buffers["keys"]
    append(chunk(1))  # a token step appends in place: same buffer
    assert ours._buffers["keys"] is buffer and same()

    joining = DynamicLayer()
    joining.update(*chunk(150, b=3))  # longer than ours: the window widens to the left, new buffer (more rows)
    width = joining.keys.shape[-2]
    ours.stack(joining, width)
    expected[:] = [torch.cat([pad(e, width), pad(j, width)]) for e, j in zip(expected, (joining.keys, joining.values))]
    assert same() and ours._buffers["keys"] is not buffer

    index = torch.tensor([1, 3, 4])  # rows 0 and 2 leave, with the 4 leading columns no row needs
    ours.batch_select_indices(index, start=4)
    expected[:] = [e[index][..., 4:, :] for e in expected]
    assert same()
    buffer = ours._buffers["keys"]  # a copy: rows of a buffer that gave out kept views never move...
    shorter = DynamicLayer()
    shorter.update(*chunk(7, b=1))
    ours.stack(shorter, ours.keys.shape[-2])  # ...then rows join into free rows, in place
    expected[:] = [torch.cat([e, pad(t, e.shape[-2])]) for e, t in zip(expected, (shorter.keys, shorter.values))]
    assert same() and ours._buffers["keys"] is buffer
    ours.batch_select_indices(torch.tensor([0, 2, 3]), start=2)  # and leave in place
    expected[:] = [e[[0, 2, 3]][..., 2:, :] for e in expected]
    assert same() and ours._buffers["keys"] is buffer

    ours.keys, ours.values = ours.keys.clone(), ours.values.clone()  # tensors the layer did not allocate
    foreign = [ours.keys, ours.values, ours.keys.clone(), ours.values.clone()]
    append(chunk(2, b=3))
    assert same() and ours._buffers["keys"] is not buffer
    assert torch.equal(foreign[0], foreign[2]) and torch.equal(foreign[1], foreign[3])
    assert all(torch.equal(view, copy) for view, copy in zip(kept, kept_copy))


def test_engine_decoding_equals_transformers_generate(tiny_policy):
    vector = adapters(tiny_policy, 1)[0]
    prompt = tiny_policy._prompt_ids(chat(QUESTIONS[0]))
    ours = generate_rows(tiny_policy, [GenerationRow(prompt, vector, max_new_tokens=12)])[0].tokens
    tiny_policy.set_adapter_vector(vector)  # PEFT's own LoRA path
    ids = torch.tensor([prompt])
    theirs = tiny_policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                        do_sample=False, temperature=None, top_p=None, top_k=None,
                                        pad_token_id=tiny_policy.tokenizer.pad_token_id,
                                        eos_token_id=tiny_policy.tokenizer.eos_token_id)
    assert theirs[0, len(prompt):].tolist() == ours


def test_concurrent_threads_are_coalesced_into_one_pass(tiny_policy):
    vectors = adapters(tiny_policy, 6)
    alone = [tiny_policy.generate(chat(q), max_new_tokens=8, adapter=v)
             for q, v in zip(QUESTIONS + QUESTIONS[:2], vectors)]
    tiny_policy.batcher = Batcher(tiny_policy, max_batch=16, wait_ms=200)
    barrier = threading.Barrier(6)

    def ask(i):
        barrier.wait()
        return tiny_policy.generate(chat((QUESTIONS + QUESTIONS[:2])[i]), max_new_tokens=8, adapter=vectors[i])

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, range(6)))
    assert together == alone
    assert tiny_policy.batcher.passes["generate"] < 6  # fewer passes than requests: they were batched


def test_a_scoring_request_runs_between_the_token_steps_of_a_running_decode(tiny_policy):
    vector, other, own = adapters(tiny_policy, 3)
    tiny_policy.set_adapter_vector(own)  # PEFT's own adapter, which every pass must keep switched off
    row = GenerationRow(tiny_policy._prompt_ids(chat(QUESTIONS[0])), vector, max_new_tokens=400)
    expected = generate_rows(tiny_policy, [row])[0]
    assert len(expected.tokens) == 400  # the decode runs its whole budget: long enough to be overtaken
    pairs = [(chat(q), f"answer number {i}") for i, q in enumerate(QUESTIONS)]
    scores_alone = tiny_policy.logprobs(pairs, with_grad=True, adapter=other)
    batcher = Batcher(tiny_policy, wait_ms=0)
    tokens, started = [], threading.Event()
    began = time.perf_counter()
    decoding = batcher.submit("generate", [GenerationRow(row.prompt, vector, max_new_tokens=400,
                                                         on_token=lambda i, t: tokens.append(t) or started.set())])
    started.wait()
    scoring = time.perf_counter()
    scores = batcher.score([ScoreRow(tiny_policy._prompt_ids(m), tiny_policy._response_ids(r), other, True)
                            for m, r in pairs])
    scored = time.perf_counter()
    tokens_when_scored = len(tokens)
    assert tokens_when_scored < 400  # it did not wait for the decode to end
    assert decoding[0].result()[0].tokens == expected.tokens  # and the decode was not disturbed
    ended = time.perf_counter()
    # The engine's load: the scoring pass counted as scoring, not as part of the decode it ran inside.
    assert batcher.passes == {"generate": 1, "score": 1, "divergence": 0}
    assert 0 < batcher.seconds["score"] <= scored - scoring and batcher.seconds["divergence"] == 0
    assert 0 < batcher.seconds["prefill"] and 0 < batcher.seconds["decode"]
    assert sum(batcher.seconds.values()) <= ended - began
    for lp, alone in zip(scores, scores_alone):
        assert lp.total == alone.total and torch.equal(lp.grad, alone.grad)


def test_a_failing_request_fails_alone_and_its_batch_mates_still_answer(tiny_policy):
    vectors = adapters(tiny_policy, 3)
    good = [GenerationRow(tiny_policy._prompt_ids(chat(q)), v, max_new_tokens=6) for q, v in zip(QUESTIONS, vectors)]
    expected = [g.tokens for g in generate_rows(tiny_policy, good)]
    bad = GenerationRow(tiny_policy._prompt_ids(chat("x")), torch.zeros(7), max_new_tokens=6)  # wrong adapter size
    batcher = Batcher(tiny_policy, wait_ms=200)
    barrier = threading.Barrier(4)

    def run(row):
        barrier.wait()
        return batcher.generate([row])[0].tokens

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, row) for row in [*good, bad]]
    assert [f.result() for f in futures[:3]] == expected
    with pytest.raises(ValueError, match="Adapter rows must have shape"):
        futures[3].result()


def test_batched_per_sample_gradients_equal_sequential_ones(tiny_policy):
    vector = adapters(tiny_policy, 1)[0]
    pairs = [(chat(q), f"answer number {i}" * (i + 1)) for i, q in enumerate(QUESTIONS)]
    batched = tiny_policy.logprobs(pairs, with_grad=True, adapter=vector)
    for (messages, response), lp in zip(pairs, batched):
        alone = tiny_policy.logprob(messages, response, with_grad=True, adapter=vector)
        assert lp.num_tokens == alone.num_tokens
        assert lp.total == pytest.approx(alone.total, rel=1e-6)
        assert torch.allclose(lp.grad, alone.grad, rtol=1e-5, atol=1e-6 * float(alone.grad.abs().max()))
    # ... and equal PEFT's own autograd on the same adapter (the per-row path computes the same LoRA).
    tiny_policy.set_adapter_vector(vector)
    messages, response = pairs[2]
    prompt, answer = tiny_policy._prompt_ids(messages), tiny_policy._response_ids(response)
    ids = torch.tensor([prompt + answer])
    logits = tiny_policy.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    total = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).sum()
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, tiny_policy._params)])
    assert torch.allclose(batched[2].grad, grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


@pytest.mark.parametrize("vmap", [True, False], ids=["batched-vjp", "vjp-per-row"])
def test_responses_sharing_a_prompt_share_its_pass_and_get_the_per_row_results(tiny_policy, monkeypatch, vmap):
    from rosa2_dspy import scoring

    if not vmap:  # the fallback for models whose backward has no batching rule
        grad = torch.autograd.grad

        def no_batching(*args, **kwargs):
            if kwargs.get("is_grads_batched"):
                raise RuntimeError("Batching rule not implemented (test)")
            return grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", no_batching)
    shared_passes = []
    monkeypatch.setattr(scoring, "_score_shared", lambda policy, rows, run=scoring._score_shared:
                        shared_passes.append(len(rows)) or run(policy, rows))
    vector = adapters(tiny_policy, 1)[0]
    responses = ["It is 5.", "five", "The answer is 5, since 2 + 3 = 5.", "It is 5."]
    pairs = [(chat(QUESTIONS[0]), r) for r in responses]
    references = [tiny_policy.logprobs([p], adapter=adapters(tiny_policy, 1, seed=2)[0], keep_hidden=True)[0].hidden
                  for p in pairs]
    shared = tiny_policy.logprobs(pairs, with_grad=True, adapter=vector, keep_hidden=True, references=references)
    assert shared_passes == [4]
    for pair, reference, lp in zip(pairs, references, shared):
        alone = tiny_policy.logprobs([pair], with_grad=True, adapter=vector, keep_hidden=True,
                                     references=[reference])[0]
        assert lp.num_tokens == alone.num_tokens
        assert lp.total == pytest.approx(alone.total, rel=1e-5)
        assert torch.allclose(lp.grad, alone.grad, rtol=1e-4, atol=1e-5 * float(alone.grad.abs().max()))
        assert torch.allclose(lp.hidden, alone.hidden, atol=1e-5)
        assert lp.kl == pytest.approx(alone.kl, rel=1e-4, abs=1e-7) and alone.kl > 0
    assert shared_passes == [4]  # one row alone runs the ordinary pass


def test_without_prompt_sharing_a_steps_rows_run_one_padded_pass_with_the_same_results(tiny_policy, monkeypatch):
    from rosa2_dspy import scoring

    assert tiny_policy.batcher.share_prompts  # the default on a CPU model
    vector = adapters(tiny_policy, 1)[0]
    pairs = [(chat(QUESTIONS[0]), r) for r in ["It is 5.", "five", "The answer is 5, since 2 + 3 = 5."]]
    shared = tiny_policy.logprobs(pairs, with_grad=True, adapter=vector)
    passes = []
    for name in ("_score_shared", "_score_padded"):
        monkeypatch.setattr(scoring, name, lambda policy, rows, run=getattr(scoring, name), name=name:
                            passes.append((name, len(rows))) or run(policy, rows))
    tiny_policy.batcher = Batcher(tiny_policy, share_prompts=False)
    padded = tiny_policy.logprobs(pairs, with_grad=True, adapter=vector)
    assert passes == [("_score_padded", 3)]
    for a, b in zip(shared, padded):
        assert a.num_tokens == b.num_tokens and a.total == pytest.approx(b.total, rel=1e-5)
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5 * float(b.grad.abs().max()))


def test_batched_rosa_step_equals_the_sequential_step(tiny_policy, monkeypatch):
    vector = adapters(tiny_policy, 1)[0]
    responses = [ScoredResponse(chat(q), f"reply {i}", float(i % 2), "current") for i, q in enumerate(QUESTIONS)]
    batched = ROSAStep(max_norm=1e6).step(tiny_policy, responses, apply=False, adapter=vector)
    calls = []
    one_by_one = tiny_policy.logprobs

    def sequential(pairs, **kwargs):  # today's way: one pass per response
        calls.append(len(pairs))
        return [one_by_one([pair], **kwargs)[0] for pair in pairs]

    monkeypatch.setattr(tiny_policy, "logprobs", sequential)
    alone = ROSAStep(max_norm=1e6).step(tiny_policy, responses, apply=False, adapter=vector)
    assert calls == [4]
    assert torch.allclose(batched.delta, alone.delta, rtol=1e-4, atol=1e-5 * float(alone.delta.abs().max()))


# ---------------------------------------------------------------- ROSA2: many users, one instance

def wrong(example, prediction, trace=None):
    return dspy.Prediction(score=0.0, feedback="Wrong: answer with the number only.",
                           reference={"answer": example.answer})


def build(lm, mode="joint"):
    refiner = requirement_refiner("Reply with one number.", n=100)
    return ROSA2(dspy.Predict("question -> answer"), lm, wrong, mode=mode, refiner_lm=refiner, max_turns=3,
                 weights=ROSAStep(beta=0.5, max_norm=5.0))


def summary(result, rosa2):
    session = rosa2.sessions[result.rosa2.session_id]
    records = [(r.turn, r.reward, r.outputs, r.instructions, r.refined_instructions, r.delta_norm > 0,
                r.weights and r.weights["applied"]) for r in result.rosa2.trajectory]
    completions = [c.completion for t in session.turns for c in t.calls]
    return records, completions, session.adapter


def assert_same_as_sequential(sequential, concurrent):
    for (records, completions, adapter), (records_c, completions_c, adapter_c) in zip(sequential, concurrent):
        assert records_c == records
        assert completions_c == completions and all(c is not None for c in completions)
        assert torch.equal(adapter_c, adapter)


@pytest.mark.parametrize("mode", ["joint", "static"])
def test_a_thread_pool_over_interact_on_one_instance_equals_the_sequential_run(tiny_lm, mode):
    tiny_lm.policy.batcher = Batcher(tiny_lm.policy, wait_ms=50)
    rosa2 = build(tiny_lm, mode)
    sequential = [summary(rosa2.interact(e), rosa2) for e in EXAMPLES]
    passes_before = dict(tiny_lm.policy.batcher.passes)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(rosa2.interact, EXAMPLES))
    concurrent = [summary(r, rosa2) for r in results]
    assert_same_as_sequential(sequential, concurrent)
    assert len({r.rosa2.session_id for r in results}) == 4
    generate_passes = tiny_lm.policy.batcher.passes["generate"] - passes_before["generate"]
    assert generate_passes < 4 * 3  # the four conversations shared passes
    # the model itself never holds a conversation's adapter
    assert torch.equal(tiny_lm.policy.adapter_vector(), tiny_lm.policy.initial_adapter_vector)


def test_asyncio_over_one_instance_equals_the_sequential_run(tiny_lm):
    rosa2 = build(tiny_lm)
    sequential = [summary(rosa2.interact(e), rosa2) for e in EXAMPLES]

    async def all_at_once():
        return await asyncio.gather(*(rosa2.ainteract(e) for e in EXAMPLES))

    concurrent = [summary(r, rosa2) for r in asyncio.run(all_at_once())]
    assert_same_as_sequential(sequential, concurrent)


def test_acall_and_aadapt_run_in_the_tasks_own_session(tiny_lm):
    rosa2 = build(tiny_lm)

    async def conversation(sid, question):
        with rosa2.in_session(sid):
            first = await rosa2.acall(question=question)
            record = await rosa2.aadapt("Wrong: answer with the number only.", reference={"answer": "5"})
            second = await rosa2.acall(question=question)
            return first, record, second

    ids = [rosa2.store.start() for _ in QUESTIONS]

    async def main():
        return await asyncio.gather(*(conversation(s, q) for s, q in zip(ids, QUESTIONS)))

    results = asyncio.run(main())
    for sid, (first, record, second) in zip(ids, results):
        session = rosa2.sessions[sid]
        assert [t.record for t in session.turns] == [record] and record.weights["applied"]
        assert requirements_of(session.instructions) == {"self": ["Reply with one number."]}
        assert session.pending.record.outputs == dict(second.items())
    adapters_after = [rosa2.sessions[s].adapter for s in ids]
    assert all(not torch.equal(a, b) for i, a in enumerate(adapters_after) for b in adapters_after[i + 1:])


def test_dspy_parallel_evaluate_and_batch_over_one_session_equal_sequential_calls(tiny_lm):
    rosa2 = build(tiny_lm)
    sid = rosa2.start_session()
    rosa2(question=QUESTIONS[0])
    rosa2.adapt("Wrong: answer with the number only.", reference={"answer": "5"})  # an adapted session
    sequential = [rosa2(**e.inputs()).answer for e in EXAMPLES]

    parallel = dspy.Parallel(num_threads=4)([(rosa2, e) for e in EXAMPLES])
    batched = rosa2.batch(EXAMPLES, num_threads=4)
    scores = []

    def metric(example, prediction, trace=None):
        scores.append((example.question, prediction.answer))
        return 1.0

    dspy.Evaluate(devset=EXAMPLES, metric=metric, num_threads=4, display_progress=False)(rosa2)
    assert [p.answer for p in parallel] == sequential
    assert [p.answer for p in batched] == sequential
    assert sorted(scores) == sorted(zip(QUESTIONS, sequential))
    assert len(rosa2.sessions[sid].turns) == 1  # reading a session does not change it


def test_a_failing_conversation_leaves_the_others_untouched(tiny_lm):
    def picky(example, prediction, trace=None):
        if example.question == QUESTIONS[1]:
            raise RuntimeError("feedback source crashed")
        return wrong(example, prediction, trace)

    rosa2 = build(tiny_lm)
    sequential = {e.question: summary(rosa2.interact(e), rosa2) for e in EXAMPLES if e.question != QUESTIONS[1]}
    rosa2.feedback_fn = picky
    with ThreadPoolExecutor(4) as pool:
        futures = {e.question: pool.submit(rosa2.interact, e) for e in EXAMPLES}
    with pytest.raises(RuntimeError, match="feedback source crashed"):
        futures[QUESTIONS[1]].result()
    concurrent = {q: summary(f.result(), rosa2) for q, f in futures.items() if q != QUESTIONS[1]}
    assert_same_as_sequential([sequential[q] for q in sequential], [concurrent[q] for q in sequential])
