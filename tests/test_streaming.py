"""Token streaming: LocalLM yields the answer while it is generated, through DSPy's streaming path.

A random tiny model never writes DSPy's ``[[ ## answer ## ]]`` sections, so the DSPy-level tests use the
scripted tiny model of conftest (``scripted_lm``), which writes one formatted answer after any prompt.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
import torch
from dspy.streaming import StreamListener, StreamResponse

from conftest import SCRIPT, build_tiny_tokenizer, make_scripted_policy
from rosa2_dspy.engine import Batcher

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+3?"}]


def drain(pieces):
    """All pieces of a generate_stream and its return value."""
    out = []
    while True:
        try:
            out.append(next(pieces))
        except StopIteration as done:
            return out, done.value


def test_streamify_yields_the_answer_in_chunks_that_join_to_the_unstreamed_prediction(scripted_lm):
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=scripted_lm):
        alone = program(question="What is 2+3?")
        stream = dspy.streamify(program, stream_listeners=[StreamListener("answer")], async_streaming=False)
        values = list(stream(question="What is 2+3?"))
    chunks = [v.chunk for v in values if isinstance(v, StreamResponse)]
    assert len([c for c in chunks if c]) >= 2
    assert "".join(chunks) == alone.answer == "It is five."
    assert isinstance(values[-1], dspy.Prediction) and values[-1].answer == alone.answer
    streamed, unstreamed = scripted_lm.history[-1], scripted_lm.history[-2]
    assert streamed["outputs"] == unstreamed["outputs"]
    assert streamed["usage"]["completion_tokens"] == unstreamed["usage"]["completion_tokens"] == len(SCRIPT) + 1


def test_async_programs_stream_through_the_async_engine(scripted_lm):
    program = dspy.Predict("question -> answer")
    stream = dspy.streamify(program, stream_listeners=[StreamListener("answer")], is_async_program=True)

    async def run():
        return [v async for v in stream(question="What is 2+3?")]

    with dspy.context(lm=scripted_lm):
        values = asyncio.run(run())
    chunks = [v.chunk for v in values if isinstance(v, StreamResponse)]
    assert len([c for c in chunks if c]) >= 2 and "".join(chunks) == values[-1].answer == "It is five."


def test_tokens_reach_the_caller_while_the_answer_is_still_being_generated(monkeypatch):
    policy = make_scripted_policy()
    received_first_piece, engine_waited = threading.Event(), []
    submit = policy.batcher.submit

    def submit_and_hold_the_second_token(kind, rows):
        for row in (r for r in rows if r.on_token is not None):
            report = row.on_token

            def on_token(index, token, report=report):
                report(index, token)
                if index == 0:  # the engine goes on only once the caller holds the first piece
                    engine_waited.append(received_first_piece.wait(timeout=10))
            row.on_token = on_token
        return submit(kind, rows)

    monkeypatch.setattr(policy.batcher, "submit", submit_and_hold_the_second_token)
    pieces = policy.generate_stream(MESSAGES, max_new_tokens=24)
    first = next(pieces)
    received_first_piece.set()
    rest, result = drain(pieces)
    assert engine_waited == [True]
    assert first == "[[ ## answer ## ]]\n" and first + "".join(rest) == result[0] == policy.generate(MESSAGES)[0]


def test_pieces_hold_whole_characters():
    from rosa2_dspy.inference import _Detokenizer

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("é ok", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5  # byte-level: é is two tokens
    detok = _Detokenizer(tokenizer, threading.Lock())
    pieces = [detok.push(token) for token in ids] + [detok.push(None)]
    assert pieces[0] == "" and "\ufffd" not in "".join(pieces) and "".join(pieces) == "é ok"


@pytest.mark.parametrize("stop", [["five"], [" is", "It"], ["\n\n["], ["absent"]])
def test_stop_strings_cut_the_stream_where_they_cut_the_unstreamed_answer(scripted_lm, stop):
    policy = scripted_lm.policy
    pieces, result = drain(policy.generate_stream(MESSAGES, stop=stop))
    assert "".join(pieces) == result[0] and result == policy.generate(MESSAGES, stop=stop)


def test_streaming_beside_a_concurrent_request_gives_both_the_answers_they_get_alone(tiny_policy, one_torch_thread):
    vectors = [tiny_policy.initial_adapter_vector
               + scale * torch.randn(tiny_policy.num_adapter_parameters, generator=torch.Generator().manual_seed(seed))
               for seed, scale in ((4, 0.5), (1, 1.0))]  # the first writes letters (pieces), the second bytes
    other = [{"role": "user", "content": "Name a red fruit."}]
    alone_streamed = tiny_policy.generate(MESSAGES, max_new_tokens=16, adapter=vectors[0])
    alone_other = tiny_policy.generate(other, max_new_tokens=12, adapter=vectors[1])
    assert alone_streamed[0] != alone_other[0]
    tiny_policy.batcher = Batcher(tiny_policy, wait_ms=300)
    barrier = threading.Barrier(2)

    def stream():
        barrier.wait()
        return drain(tiny_policy.generate_stream(MESSAGES, max_new_tokens=16, adapter=vectors[0]))

    def ask():
        barrier.wait()
        return tiny_policy.generate(other, max_new_tokens=12, adapter=vectors[1])

    with ThreadPoolExecutor(2) as pool:
        streamed, together = pool.submit(stream), pool.submit(ask)
        (pieces, result), together = streamed.result(), together.result()
    assert tiny_policy.batcher.passes["generate"] == 1  # one batched pass held both
    assert len(pieces) >= 2 and "".join(pieces) == result[0]
    assert result == alone_streamed and together == alone_other


def test_a_streamed_answer_ends_when_its_row_ends_not_when_the_pass_does(monkeypatch):
    policy = make_scripted_policy()
    stream_ended, engine_waited = threading.Event(), []
    submit = policy.batcher.submit

    def submit_and_hold_the_pass_after_the_last_token(kind, rows):
        for row in rows:
            report = row.on_token

            def on_token(index, token, report=report):
                report(index, token)
                if token == policy.tokenizer.eos_token_id:  # the pass goes on only once the stream has ended
                    engine_waited.append(stream_ended.wait(timeout=10))
            row.on_token = on_token
        return submit(kind, rows)

    monkeypatch.setattr(policy.batcher, "submit", submit_and_hold_the_pass_after_the_last_token)
    pieces, result = drain(policy.generate_stream(MESSAGES, max_new_tokens=24))
    stream_ended.set()
    assert "".join(pieces) == result[0] and result[2:] == (len(SCRIPT) + 1, "stop")
    for _ in range(100):
        if engine_waited:
            break
        threading.Event().wait(0.05)
    assert engine_waited == [True]


@pytest.mark.parametrize("mode", ["joint", "static"])
def test_streamify_over_rosa2_with_a_listener_yields_the_answer_of_the_sessions_copy(scripted_lm, mode):
    """ROSA2 runs a per-call copy of the program; a listener bound to the program still hears it."""
    from rosa2_dspy import ROSA2

    rosa2 = ROSA2(dspy.Predict("question -> answer"), lm=scripted_lm, mode=mode)
    sid = rosa2.start_session()
    with dspy.context(adapter=dspy.ChatAdapter()):
        alone = rosa2(question="What is 2+3?")
        rosa2.adapt("No, answer in words.", score=0.0)  # the next call runs under refined words
        with rosa2.in_session(sid):
            stream = dspy.streamify(rosa2, stream_listeners=[StreamListener("answer")], async_streaming=False)
            values = list(stream(question="What is 2+3?"))
    chunks = [v.chunk for v in values if isinstance(v, StreamResponse)]
    assert len([c for c in chunks if c]) >= 2
    assert {v.predict_name for v in values if isinstance(v, StreamResponse)} == {"program"}
    assert "".join(chunks) == values[-1].answer == alone.answer == "It is five."
    assert len(rosa2.sessions[sid].turns) == 1 and rosa2.sessions[sid].pending is not None  # a normal turn
