"""PlainChatAdapter (plain chat turns for small models), the parse-rate rule, and ConversationAdapter over it.

Real behaviour only: exact messages, real parses, DSPy's DummyLM answering in the adapter's form, and
the tiny in-process LocalLM for the ROSA2 and LocalLM wiring.
"""

from __future__ import annotations

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.adapter import ConversationAdapter, LenientChatAdapter, PlainChatAdapter, answer_parsed
from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.rosa2 import ROSA2

QUESTION = "How far is 3 km?"


class Convert(dspy.Signature):
    """Convert the quantity."""

    quantity: str = dspy.InputField(desc="an amount with its unit")
    unit: str = dspy.InputField()
    answer: str = dspy.OutputField()


def test_plain_adapter_formats_a_system_turn_and_a_plain_user_message():
    adapter = PlainChatAdapter()
    single = dspy.Signature("question -> answer", "Give the distance in meters.")
    assert adapter.format(single, [], {"question": QUESTION}) == [
        {"role": "system", "content": "Give the distance in meters."},
        {"role": "user", "content": QUESTION},
    ]
    assert adapter.format(Convert, [], {"quantity": "3 km", "unit": "m"}) == [
        {"role": "system", "content": "Convert the quantity.\n\nFields:\n- quantity: an amount with its unit"},
        {"role": "user", "content": "quantity: 3 km\nunit: m"},
    ]
    cot = dspy.ChainOfThought(single).predict.signature
    assert adapter.format(cot, [], {"question": QUESTION}) == [
        {"role": "system", "content": "Give the distance in meters.\n\nReply in this form, one field per line:\n"
                                      "reasoning: <reasoning>\nanswer: <answer>"},
        {"role": "user", "content": QUESTION},
    ]


def test_plain_adapter_takes_a_bare_reply_as_the_single_output_field():
    adapter = PlainChatAdapter()
    single = dspy.Signature("question -> answer")
    assert adapter.parse(single, "3000 m") == {"answer": "3000 m"}
    assert adapter.parse(single, "  1 km is 1000 m,\nso 3 km is 3000 m.\n") == {
        "answer": "1 km is 1000 m,\nso 3 km is 3000 m."}
    assert adapter.parse(single, "Answer: 3000 m") == {"answer": "3000 m"}  # a label it adds anyway
    assert adapter.parse(single, "[[ ## answer ## ]]\n3000 m\n\n[[ ## completed ## ]]") == {"answer": "3000 m"}
    assert adapter.parse(dspy.Signature("question -> answer: int"), "12") == {"answer": 12}
    with pytest.raises(AdapterParseError):
        adapter.parse(dspy.Signature("question -> answer: int"), "twelve")


def test_plain_adapter_parses_multi_field_replies():
    adapter = PlainChatAdapter()
    cot = dspy.ChainOfThought("question -> answer").predict.signature
    assert adapter.parse(cot, "reasoning: 1 km is 1000 m.\nanswer: 3000 m") == {
        "reasoning": "1 km is 1000 m.", "answer": "3000 m"}
    assert adapter.parse(cot, "**Reasoning:** times 1000\nmore steps\n**Answer:** 3000 m") == {
        "reasoning": "times 1000\nmore steps", "answer": "3000 m"}
    assert adapter.parse(cot, "[[ ## reasoning ## ]]\nx\n\n[[ ## answer ## ]]\n3000 m\n\n[[ ## completed ## ]]") == {
        "reasoning": "x", "answer": "3000 m"}
    # Unlabelled reasoning first; no answer label: the reply's last line is the answer.
    assert adapter.parse(cot, "1 km is 1000 m.\nSo it is 3000 m.") == {
        "reasoning": "1 km is 1000 m.\nSo it is 3000 m.", "answer": "So it is 3000 m."}
    assert adapter.parse(cot, "reasoning: 7 + 5 = 12") == {"reasoning": "7 + 5 = 12", "answer": "7 + 5 = 12"}
    assert adapter.parse(cot, "reasoning: r\nanswer:") == {"reasoning": "r", "answer": ""}  # labelled, empty
    listed = dspy.Signature("feedback -> requirements: list[str], summary")
    assert adapter.parse(listed, "requirements:\n- use meters\n- one decimal\nsummary: units") == {
        "requirements": ["use meters", "one decimal"], "summary": "units"}
    assert adapter.parse(listed, 'requirements: ["use meters"]\nsummary: units')["requirements"] == ["use meters"]
    assert adapter.format_assistant_message_content(cot, {"reasoning": "r", "answer": "a"}) == "reasoning: r\nanswer: a"


def test_plain_adapter_turns_demos_into_user_and_assistant_turns():
    adapter = PlainChatAdapter()
    predict = dspy.Predict("question -> answer")
    predict.demos = [dspy.Example(question="How far is 1 km?", answer="1000 m"),
                     dspy.Example(question="How far is 2 km?", answer="2000 m")]
    messages = adapter.format(predict.signature, predict.demos, {"question": QUESTION})
    assert messages[1:] == [
        {"role": "user", "content": "How far is 1 km?"}, {"role": "assistant", "content": "1000 m"},
        {"role": "user", "content": "How far is 2 km?"}, {"role": "assistant", "content": "2000 m"},
        {"role": "user", "content": QUESTION},
    ]


@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought])
def test_plain_adapter_round_trips_with_dummy_lm(module):
    adapter = PlainChatAdapter()
    answer = {"answer": "3000 m"}
    if module is dspy.ChainOfThought:
        answer = {"reasoning": "1 km is 1000 m.", **answer}
    lm = DummyLM([answer], adapter=adapter)
    with dspy.context(lm=lm, adapter=adapter):
        prediction = module("question -> answer")(question=QUESTION)
    assert prediction.answer == "3000 m"
    sent = lm.history[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user"] and sent[1]["content"] == QUESTION
    if module is dspy.ChainOfThought:
        assert prediction.reasoning == "1 km is 1000 m."
        assert lm.history[-1]["outputs"][0] == "reasoning: 1 km is 1000 m.\nanswer: 3000 m"
    else:
        assert lm.history[-1]["outputs"][0] == "3000 m"  # a bare reply, no markers


def test_plain_adapter_turns_an_empty_reply_into_an_empty_answer():
    adapter = PlainChatAdapter()
    lm = DummyLM([{"answer": ""}], adapter=adapter)  # the model ends its turn at once
    with dspy.context(lm=lm, adapter=adapter):
        assert dspy.Predict("question -> answer")(question=QUESTION).answer == ""
    with dspy.context(lm=DummyLM([{"answer": ""}], adapter=adapter), adapter=LenientChatAdapter()):
        with pytest.raises(AdapterParseError, match="empty"):  # what DSPy's base adapter does with it
            dspy.Predict("question -> answer")(question=QUESTION)


def test_plain_adapter_formats_dspy_history_as_earlier_turns():
    adapter = PlainChatAdapter()
    signature = dspy.Signature("question, history: dspy.History -> answer", "Answer briefly.")
    history = dspy.History(messages=[{"question": "How far is 1 km?", "answer": "1000 m"}])
    assert adapter.format(signature, [], {"question": QUESTION, "history": history}) == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How far is 1 km?"}, {"role": "assistant", "content": "1000 m"},
        {"role": "user", "content": QUESTION},
    ]


def test_parse_rate_rule_does_not_count_echoes_of_the_prompt():
    inputs = {"question": QUESTION}
    messages = PlainChatAdapter().format(dspy.Signature("question -> answer", "Give the distance in meters."),
                                         [], inputs)
    assert answer_parsed("3000 m", inputs, messages)
    assert answer_parsed("3 km", inputs, messages)  # wrong, but an answer: it is no copy of the question
    assert not answer_parsed("How far is 3 km?", inputs, messages)
    assert not answer_parsed("The user's input is: how far is  3 KM?", inputs, messages)
    assert not answer_parsed("Give the distance in meters.", inputs, messages)  # the instruction, copied
    assert not answer_parsed("[## answer]\n\n[## answer]", inputs, messages)
    assert not answer_parsed("[[ # question ## ]] 3 km", inputs, messages)
    assert not answer_parsed("  ", inputs, messages) and not answer_parsed(None, inputs, messages)
    # What the adapters make of an echoing reply: the single field holds the echo, so it is not counted.
    echo = f"[[ ## question ## ]]\n{QUESTION}"
    for adapter in (PlainChatAdapter(), LenientChatAdapter()):
        parsed = adapter.parse(dspy.Signature("question -> answer"), echo)["answer"]
        assert not answer_parsed(parsed, inputs, messages)


def test_conversation_adapter_replays_turns_in_the_plain_form():
    base = PlainChatAdapter()
    signature = dspy.Signature("question -> answer", "Answer.")
    turns = {id(signature): [({"question": QUESTION}, {"answer": "3 km"}, "I meant meters.")]}
    adapter = ConversationAdapter(turns, base=base)
    assert adapter.format(signature, [], {"question": QUESTION}) == [
        {"role": "system", "content": "Answer."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "3 km"},
        {"role": "user", "content": f"Feedback on your previous answer: I meant meters.\n\n{QUESTION}"},
    ]
    assert adapter.parse(signature, "3000 m") == {"answer": "3000 m"}
    assert isinstance(ConversationAdapter({}).base, LenientChatAdapter)  # the default base is unchanged
    # bound(): turns and base live on the class, so a module that re-creates the adapter from its class
    # (dspy.Refine: class Wrapper(adapter.__class__), then Wrapper()) keeps both.
    bound = ConversationAdapter.bound([(signature, turns[id(signature)])], base=base)
    recreated = type("Wrapper", (bound.__class__,), {})()
    assert recreated.base is base
    inputs = {"question": QUESTION}
    assert recreated.format(signature, [], inputs) == adapter.format(signature, [], inputs)


def test_local_lm_default_adapter_is_configurable_and_rosa2_uses_it(tiny_policy):
    assert isinstance(LocalLM(tiny_policy, adapter="plain").default_adapter, PlainChatAdapter)
    assert isinstance(LocalLM(tiny_policy, adapter="chat").default_adapter, LenientChatAdapter)
    with pytest.raises(ValueError, match="Unknown adapter"):
        LocalLM(tiny_policy, adapter="xml")
    lm = LocalLM(tiny_policy, max_tokens=8, adapter="plain")
    rosa2 = ROSA2(dspy.Predict("question -> answer"), lm, mode="static")
    assert rosa2.adapter is lm.default_adapter
    first = rosa2(question=QUESTION)  # the tiny model really answers, in plain chat
    assert isinstance(first.answer, str)
    rosa2.adapt("I meant meters.", score=0.0)
    rosa2(question=QUESTION)
    sent = lm.history[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == QUESTION and "[[ ##" not in sent[0]["content"]
    assert sent[3]["content"] == f"Feedback on your previous answer: I meant meters.\n\n{QUESTION}"
    configured = ROSA2(dspy.Predict("question -> answer"), mode="static")  # the actor: DSPy's configured LM
    with dspy.context(lm=lm):
        assert configured.adapter is lm.default_adapter
    assert isinstance(configured.adapter, LenientChatAdapter)  # no LM configured: DSPy's format, leniently
    explicit = LenientChatAdapter()
    assert ROSA2(dspy.Predict("question -> answer"), lm, mode="static", adapter=explicit).adapter is explicit


@pytest.mark.parametrize("adapter", ["chat", "plain"])
def test_bench_adapters_answers_first_turns_with_the_oracle_instruction(tiny_lm, adapter):
    from programs.bench_adapters import MATH_FORM, answer_all, sign_test, wilson
    from programs.tasks import load_task

    examples = load_task("intent", limit=2)
    results = answer_all(tiny_lm, "intent", "predict", examples, adapter, oracle=True, concurrency=2)
    assert [r["question"] for r in results] == [e.question for e in examples]
    assert all(f"The user wants {e.intent}." in r["system"] for r, e in zip(results, examples))
    assert all(isinstance(r["parsed"], bool) and r["correct"] is False for r in results)  # a random tiny model
    math = answer_all(tiny_lm, "math", "cot", load_task("math", limit=1), adapter, oracle=True, concurrency=1)
    assert MATH_FORM in math[0]["system"]
    assert wilson(0, 24)[0] == 0.0 and 0.85 < wilson(24, 24)[0] < 0.87
    assert sign_test([True, False, False], [True, True, True]) == {"plain_only": 2, "chat_only": 0,
                                                                 "p_two_sided": 0.5}
