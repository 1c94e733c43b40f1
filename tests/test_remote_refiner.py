"""The words step with a remote refiner, without a network.

A real ``dspy.LM("openai/<model>", api_base=...)`` talks HTTP to an OpenAI-compatible endpoint that each test
starts on 127.0.0.1 (``openai_stub``, tests/openai_stub.py) and that serves scripted refinements, errors or
slow replies. So DSPy's engine, the HTTP round trip, the mapping of HTTP failures to DSPy's errors and the
client timeout all run for real. DSPy 3.4 sends ``openai/...`` to its native engine by default
(``engine="auto"``); ``engine="litellm"`` is the litellm route. Both are tested.
"""

from __future__ import annotations

import re
import time

import dspy
import pytest
from dspy.clients.cache import Cache

from rosa2_dspy.cli import main
from rosa2_dspy.local_lm import make_adapter
from rosa2_dspy.rosa2 import ROSA2
from rosa2_dspy.words import InstructionRefiner

ENGINES = ["auto", "litellm"]
QUESTION = "What is 2+3?"


def _rosa2(actor, refiner_lm, **kwargs):
    kwargs.setdefault("refiner_style", "rewrite")  # a strong remote refiner may rewrite the whole instruction
    return ROSA2(dspy.Predict("question -> answer"), actor, mode="prompt-only", refiner_lm=refiner_lm, **kwargs)


def _error_class(reason: str) -> type:
    """The DSPy error class a fallback's reason names (it must name one)."""
    found = re.search(r"\b(LM\w*Error)\b", reason)
    assert found, f"no error class in {reason!r}"
    return getattr(dspy, found.group(1))


@pytest.mark.parametrize("adapter", ["chat", "plain"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_remote_refiners_requirements_are_merged_into_the_instruction(openai_stub, scripted_lm, engine, adapter):
    openai_stub.reply(requirements=["Write numbers in English words, not digits."])
    openai_stub.reply(requirements=["Write the whole answer in capital letters.", "The answer is FIVE."])
    rosa2 = _rosa2(scripted_lm, openai_stub.lm(engine=engine), adapter=make_adapter(adapter),
                   refiner_style="requirements")
    (name, original), = rosa2.original_instructions.items()
    rosa2(question=QUESTION)
    record = rosa2.adapt("Write the number in words, please.")
    assert record.words[name]["source"] == "lm" and record.words[name]["added"] == [
        "Write numbers in English words, not digits."]
    rosa2(question=QUESTION)
    record = rosa2.adapt("Capital letters, please.")
    assert record.words[name]["rejected"] == [["The answer is FIVE.", "states a specific answer"]]
    assert rosa2.session.instructions[name] == (
        f"{original}\n\nRequirements:\n- Write numbers in English words, not digits.\n"
        "- Write the whole answer in capital letters.")
    assert len(openai_stub.requests) == 2 and "Capital letters, please." in openai_stub.requests[1].text


@pytest.mark.parametrize("adapter", ["chat", "plain"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_remote_refiners_rewrite_becomes_the_sessions_instruction(openai_stub, scripted_lm, engine, adapter):
    words = "Answer with the number in English words, and nothing else."
    capitals = "Answer with the number in English words written in capital letters, and nothing else."
    openai_stub.reply(diagnosis="The user wants the number in words, not digits.", refined_instruction=words)
    openai_stub.reply(diagnosis="The user also wants capital letters.", refined_instruction=capitals)
    rosa2 = _rosa2(scripted_lm, openai_stub.lm(engine=engine), adapter=make_adapter(adapter))
    (name, original), = rosa2.original_instructions.items()

    rosa2(question=QUESTION)
    record = rosa2.adapt("Write the number in words, please.")
    assert (record.words[name]["accepted"], record.words[name]["source"], record.words[name]["reason"]) == \
        (True, "lm", "")
    assert rosa2.session.instructions[name] == words
    (request,) = openai_stub.requests  # the refiner's call reached the server, once
    assert request.body["model"] == "stub-refiner" and request.headers["Authorization"] == "Bearer test"
    assert "Write the number in words, please." in request.text and original in request.text

    # The next turn runs under the refined words, and the next refinement starts from them.
    assert rosa2(question=QUESTION).answer
    record = rosa2.adapt("Capital letters, please.")
    assert record.instructions[name] == words
    assert rosa2.session.instructions[name] == capitals and record.words[name]["source"] == "lm"
    assert len(openai_stub.requests) == 2
    second = openai_stub.requests[1].text
    assert words in second and "Capital letters, please." in second
    assert "Write the number in words, please." in second  # the history of the conversation


def _http_500(stub):
    stub.error(500, "The model is overloaded.")


def _http_401(stub):
    stub.error(401, "Incorrect API key provided.", kind="invalid_request_error")


def _html_page(stub):
    stub.raw("<html><body><h1>502 Bad Gateway</h1></body></html>")


FAILURES = {  # how the server fails -> the DSPy error class the record must name (None: any LM error)
    "http-500": (_http_500, dspy.LMServerError),
    "http-401": (_http_401, dspy.LMAuthError),
    "malformed-body": (_html_page, None),
}


@pytest.mark.parametrize("fallback", ["keep", "append"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("engine", ENGINES)
def test_a_failing_remote_refiner_costs_the_turn_nothing_and_the_record_says_why(openai_stub, scripted_lm, engine,
                                                                              failure, fallback):
    script, expected = FAILURES[failure]
    script(openai_stub)
    rosa2 = _rosa2(scripted_lm, openai_stub.lm(engine=engine), refiner_fallback=fallback)
    (name, original), = rosa2.original_instructions.items()
    rosa2(question=QUESTION)
    record = rosa2.adapt("Write the number in words, please.")

    assert len(openai_stub.requests) == 1  # reached the server; no retry (num_retries=0)
    words = record.words[name]
    error = _error_class(words["reason"])
    assert issubclass(error, expected or dspy.LMError), words["reason"]
    if fallback == "keep":
        assert (words["accepted"], words["source"]) == (False, "kept")
        assert rosa2.session.instructions[name] == original
    else:
        assert (words["accepted"], words["source"]) == (True, "append")
        refined = rosa2.session.instructions[name]
        assert refined.startswith(original) and refined.endswith("Write the number in words, please.")
    assert rosa2(question=QUESTION).answer  # the conversation goes on


@pytest.mark.parametrize("engine", ENGINES)
def test_a_refiner_slower_than_its_timeout_ends_the_words_step_at_the_timeout(openai_stub, scripted_lm, engine):
    openai_stub.reply(delay=60, refined_instruction="Answer in English words.")  # released when the test ends
    rosa2 = _rosa2(scripted_lm, openai_stub.lm(engine=engine, timeout=0.5))
    (name, original), = rosa2.original_instructions.items()
    rosa2(question=QUESTION)
    start = time.monotonic()
    record = rosa2.adapt("Write the number in words, please.")
    elapsed = time.monotonic() - start

    assert 0.5 <= elapsed < 40, elapsed  # waited for the timeout, not for the server's 60 s (margin for a loaded machine)
    assert len(openai_stub.requests) == 1
    words = record.words[name]
    assert "timed out" in words["reason"].lower() and issubclass(_error_class(words["reason"]), dspy.LMError)
    assert (words["accepted"], words["source"]) == (False, "kept") and rosa2.session.instructions[name] == original
    assert rosa2(question=QUESTION).answer


def test_rosa2_chat_uses_a_refiner_served_at_an_address(openai_stub, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(vars(dspy), "cache", Cache(False, False, None))  # keep the user's DSPy cache out of it
    refinement = "Reply with the number only, written as digits."
    openai_stub.reply(diagnosis="The user wants the bare number.", refined_instruction=refinement)
    lines = iter([QUESTION, "no, just the number", "/quit"])
    shown: list[str] = []
    main(["--model", str(tiny_model_dir), "--program", "predict", "--mode", "prompt-only", "--max-tokens", "8",
          "--no-stream", "--refiner-lm", "openai/local-refiner", "--refiner-api-base", openai_stub.api_base,
          "--refiner-api-key", "local", "--refiner-style", "rewrite"], read=lambda prompt: next(lines),
         write=shown.append)

    assert f"[words] self: refined: {refinement}" in "\n".join(shown)
    (request,) = openai_stub.requests
    assert request.body["model"] == "local-refiner" and request.headers["Authorization"] == "Bearer local"
    assert "no, just the number" in request.text


def test_rosa2_chat_refuses_a_refiner_address_without_a_refiner_model(capsys):
    with pytest.raises(SystemExit):
        main(["--refiner-api-base", "http://127.0.0.1:8000/v1"])
    assert "need --refiner-lm" in capsys.readouterr().err


def test_the_refiner_reads_a_json_reply_when_its_adapter_asks_for_json(openai_stub):
    openai_stub.reply(diagnosis="The user wants meters.", refined_instruction="Answer in meters, with the unit.")
    with dspy.context(adapter=dspy.JSONAdapter()):
        out = InstructionRefiner(openai_stub.lm(), style="rewrite")(instruction="Answer the question.",
                                                                    feedback="In meters, please.")
    assert (out.refined_instruction, out.accepted, out.source) == ("Answer in meters, with the unit.", True, "lm")
    (request,) = openai_stub.requests
    assert "JSON object" in request.text and "In meters, please." in request.text
