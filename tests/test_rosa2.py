"""The ROSA2 module: modes, the coupling of words and weights, sessions, save/load, DSPy integration.

Actor: the tiny in-process model (greedy, deterministic). Refiner: DSPy's DummyLM (textual side only).
"""

from __future__ import annotations

import copy

import dspy
import pytest
import torch
from dspy.utils.dummies import DummyLM

from conftest import Outer, requirement_refiner, requirements_of
from rosa2_dspy.errors import FeedbackError
from rosa2_dspy.rosa2 import ROSA2
from rosa2_dspy.weights import ROSAStep, ScoredResponse

REFINED = "Answer with the number only."
EXAMPLE = dspy.Example(question="What is 2+3?", answer="5").with_inputs("question")


class TwoStage(dspy.Module):
    """A two-stage pipeline: draft, then answer from the draft."""

    def __init__(self, draft=dspy.Predict):
        super().__init__()
        self.draft = draft("question -> draft")
        self.final = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        return self.final(question=question, draft=self.draft(question=question).draft)


def refiner(text: str = REFINED, n: int = 20) -> DummyLM:
    """A scripted refiner that proposes the requirement ``text`` (the default, structured words step)."""
    return requirement_refiner(text, n=n)


def rewriter(text: str = REFINED, n: int = 20) -> DummyLM:
    """A scripted refiner for ``refiner_style="rewrite"``: it rewrites the whole instruction to ``text``."""
    return DummyLM([{"diagnosis": "The user wants a bare number.", "refined_instruction": text}] * n)


def wrong(example, prediction, trace=None):
    return dspy.Prediction(score=0.0, feedback="Wrong: I want just the number.", reference={"answer": example.answer})


def make(tiny_lm, mode, **kwargs):
    kwargs.setdefault("refiner_lm", refiner())
    return ROSA2(dspy.ChainOfThought("question -> answer"), tiny_lm, wrong, mode=mode, **kwargs)


def one_turn(rosa2, feedback="Wrong: I want just the number."):
    rosa2(question=EXAMPLE.question)
    return rosa2.adapt(feedback, score=0.0, reference={"answer": "5"})


def test_prompt_only_changes_words_never_weights(tiny_lm):
    rosa2 = make(tiny_lm, "prompt-only")
    record = one_turn(rosa2)
    assert requirements_of(rosa2.session.instructions) == {"predict": [REFINED]}
    assert record.words["predict"]["accepted"] and record.weights is None
    assert torch.equal(rosa2.session.adapter, tiny_lm.policy.initial_adapter_vector)


def test_param_only_changes_weights_never_words(tiny_lm):
    refiner_lm = refiner()
    rosa2 = make(tiny_lm, "param-only", refiner_lm=refiner_lm)
    record = one_turn(rosa2)
    assert rosa2.session.instructions == rosa2.original_instructions
    assert refiner_lm.history == []  # the words step never ran
    assert record.weights["applied"] and record.delta_norm > 0
    assert not torch.equal(rosa2.session.adapter, tiny_lm.policy.initial_adapter_vector)


def test_joint_takes_the_weights_gradient_under_the_refined_words(tiny_lm):
    policy = tiny_lm.policy
    rosa2 = make(tiny_lm, "joint", weights=ROSAStep(max_norm=1e6))
    prediction = rosa2(question=EXAMPLE.question)
    raw = tiny_lm.history[-1]["outputs"][0]  # what the model really wrote this turn
    record = rosa2.adapt("Wrong: I want just the number.", score=0.0, reference={"answer": "5"})
    assert requirements_of(rosa2.session.instructions) == {"predict": [REFINED]}
    assert record.weights["applied"]
    # logprob_after of the reference (the KL check scored only this turn's answer) is timed apart.
    assert record.times["measure_after"] == record.weights["measure_seconds"] > 0
    assert record.times["weights"] + record.times["measure_after"] >= record.weights["seconds"]

    # Recompute the step independently: responses formatted with the refined instruction.
    adapter = rosa2.adapter
    signature = rosa2.program.predict.signature.with_instructions(rosa2.session.instructions["predict"])
    outputs = {"reasoning": prediction.reasoning, "answer": prediction.answer}

    def responses(sig):
        messages = adapter.format(sig, demos=[], inputs={"question": EXAMPLE.question})
        return [
            ScoredResponse(messages, raw, 0.0, "current"),
            ScoredResponse(messages, adapter.format_assistant_message_content(sig, {**outputs, "answer": "5"}), 1.0,
                           "reference"),
        ]

    assert "Answer with the number only." in responses(signature)[0].messages[0]["content"]
    refined_step = ROSAStep(max_norm=1e6).step(policy, responses(signature), apply=False)
    original_step = ROSAStep(max_norm=1e6).step(
        policy, responses(rosa2.program.predict.signature), apply=False)
    actual = rosa2.session.adapter - policy.initial_adapter_vector
    assert torch.allclose(actual, refined_step.delta, atol=1e-6)
    assert not torch.allclose(actual, original_step.delta, atol=1e-4)  # the context really matters


def test_static_replays_earlier_turns_and_feedback_and_moves_nothing(tiny_lm):
    rosa2 = make(tiny_lm, "static")
    first = rosa2(question=EXAMPLE.question)
    rosa2.adapt("Wrong: I want just the number.", score=0.0)
    rosa2(question=EXAMPLE.question)
    messages = tiny_lm.history[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert first.answer in messages[2]["content"]
    assert messages[3]["content"].startswith("Feedback on your previous answer: Wrong: I want just the number.")
    assert rosa2.session.instructions == rosa2.original_instructions
    assert torch.equal(rosa2.session.adapter, tiny_lm.policy.initial_adapter_vector)


def test_switch_moves_words_then_weights_when_the_reward_stalls(tiny_lm):
    rosa2 = make(tiny_lm, "switch", switch_patience=1, max_turns=3)
    result = rosa2.interact(EXAMPLE)
    first, second, third = result.rosa2.trajectory
    assert first.refined_instructions is not None and first.weights is None
    assert second.refined_instructions is None and second.weights["applied"]
    assert third.weights is None and third.refined_instructions is None  # the last turn does not adapt


def test_interact_stops_once_solved(tiny_lm):
    calls = []

    def solved_on_second(example, prediction, trace=None, history=None):
        calls.append(len(history))
        return dspy.Prediction(score=float(len(history) == 1), feedback="no" if not history else "yes")

    rosa2 = ROSA2(dspy.Predict("question -> answer"), tiny_lm, solved_on_second, mode="param-only", max_turns=5)
    result = rosa2.interact(EXAMPLE)
    assert result.rosa2.solved and result.rosa2.turns == 2 and calls == [0, 1]
    assert [r.reward for r in result.rosa2.trajectory] == [0.0, 1.0]
    assert result.rosa2.trajectory[1].weights is None  # nothing to adapt once solved
    assert set(result.rosa2.trajectory[0].times) == {"generate", "feedback", "words", "weights"}
    assert result.rosa2.trajectory[0].tokens["completion"] > 0


def test_sessions_are_isolated_and_the_lm_is_left_as_it_was(tiny_lm):
    policy = tiny_lm.policy
    untouched = policy.adapter_vector()
    rosa2 = make(tiny_lm, "joint")
    a = rosa2.start_session("a")
    baseline = rosa2(question=EXAMPLE.question)  # session "a" not yet adapted
    rosa2.adapt("Wrong: I want just the number.", score=0.0, reference={"answer": "5"})
    adapted_a = rosa2.session.adapter.clone()
    assert torch.equal(policy.adapter_vector(), untouched)  # nothing leaked into the LM itself

    b = rosa2.start_session("b")
    fresh = rosa2(question=EXAMPLE.question)
    assert fresh.answer == baseline.answer and rosa2.sessions[b].instructions == rosa2.original_instructions
    assert torch.equal(rosa2.sessions[b].adapter, policy.initial_adapter_vector)

    carried = rosa2.start_session("c", carry_over_from=a)
    assert torch.equal(rosa2.sessions[carried].adapter, adapted_a)
    assert requirements_of(rosa2.sessions[carried].instructions) == {"predict": [REFINED]}
    rosa2.reset_session(carried)
    assert torch.equal(rosa2.sessions[carried].adapter, policy.initial_adapter_vector)


def test_save_load_round_trip_reproduces_the_next_answer(tiny_lm, tmp_path):
    rosa2 = make(tiny_lm, "joint")
    one_turn(rosa2)
    one_turn(rosa2)
    expected = rosa2(question=EXAMPLE.question)
    rosa2.session.pending = None
    rosa2.save(tmp_path / "state")
    assert (tmp_path / "state" / "adapters" / rosa2.current_session_id / "adapter_model.safetensors").is_file()

    restored = ROSA2(dspy.ChainOfThought("question -> answer"), tiny_lm, wrong, mode="joint").load(tmp_path / "state")
    assert restored.current_session_id == rosa2.current_session_id
    assert torch.equal(restored.session.adapter, rosa2.session.adapter)
    assert len(restored.session.turns) == 2
    again = restored(question=EXAMPLE.question)
    assert (again.reasoning, again.answer) == (expected.reasoning, expected.answer)


def test_load_refuses_a_corrupt_adapter_and_keeps_its_state(tiny_lm, tmp_path):
    from rosa2_dspy.errors import AdapterLoadError

    rosa2 = make(tiny_lm, "param-only")
    one_turn(rosa2)
    rosa2.save(tmp_path / "s")
    weights = tmp_path / "s" / "adapters" / rosa2.current_session_id / "adapter_model.safetensors"
    weights.write_bytes(b"garbage")
    other = make(tiny_lm, "param-only")
    one_turn(other)
    before = other.session.adapter.clone()
    with pytest.raises(AdapterLoadError, match="checksum"):
        other.load(tmp_path / "s")
    assert torch.equal(other.session.adapter, before) and len(other.sessions) == 1


def test_bad_feedback_raises_and_loses_nothing(tiny_lm):
    rosa2 = make(tiny_lm, "joint")
    rosa2(question=EXAMPLE.question)
    with pytest.raises(FeedbackError, match="Empty feedback"):
        rosa2.adapt("   ")
    with pytest.raises(FeedbackError, match=r"\[0, 1\]"):
        rosa2.adapt({"score": 7, "feedback": "great"})
    with pytest.raises(FeedbackError, match="score"):
        rosa2.adapt({"feedback": "no score"})
    assert rosa2.session.pending is not None and rosa2.session.turns == []
    record = rosa2.adapt("Wrong: I want just the number.")  # the same turn, now with valid feedback
    assert record.turn == 1 and record.reward == 0.0


def test_junk_from_the_refiner_keeps_the_instruction(tiny_lm):
    rosa2 = make(tiny_lm, "prompt-only", refiner_lm=rewriter("Reply as [[ ## answer ## ]] then stop."),
                 refiner_style="rewrite")
    record = one_turn(rosa2)
    assert rosa2.session.instructions == rosa2.original_instructions
    assert record.words["predict"] == {"accepted": False, "reason": "refined instruction leaks DSPy field markers",
                                       "source": "kept", "diagnosis": "The user wants a bare number.",
                                       "chars": len(rosa2.original_instructions["predict"])}
    empty = make(tiny_lm, "prompt-only", refiner_lm=rewriter(""), refiner_style="rewrite")
    assert one_turn(empty).words["predict"]["reason"] == "empty refined instruction"
    # An echo of the model's own earlier answer is no instruction either; quoting the user is fine.
    from rosa2_dspy.words import InstructionRefiner

    history = "Turn 1 (reward 0.0): answer: def add(a, b): return a - b  # subtracts instead | " \
              "feedback: please always reply with only the final number and nothing else"
    check = InstructionRefiner(style="rewrite").rejection_reason
    assert "echoes" in check("Solve it.", "Write def add(a, b): return a - b  # subtracts instead", history)
    assert "field markers" in check("Solve it.", "The instructions are:\n[## instruction ##]\n{instruction}", "")
    assert "not prose" in check("Solve it.", "The instructions are:\n\n[#2]\n[#3]\n[#4]\n[#5]\n[#6]\n[#7]\n[#8]", "")
    assert "not prose" in check("Solve it.", "42", "")
    looped = "The user's feedback is:\n\nThe answer is 3 km.\n\nThe user's feedback is:\n\nThe answer is 3 km"
    assert "repeats itself" in check("Solve it.", looped, "")
    kept_requirements = "Solve it.\nRequirement from the user: use meters.\nRequirement from the user: be brief."
    assert check("Solve it.", kept_requirements, "") == ""
    assert check("Solve it.", "Solve it. Please always reply with only the final number and nothing else.",
                 history) == ""


def test_append_fallback_turns_a_rejected_rewrite_into_the_feedback_itself(tiny_lm):
    rosa2 = make(tiny_lm, "prompt-only", refiner_lm=rewriter(""), refiner_fallback="append", refiner_style="rewrite")
    record = one_turn(rosa2, feedback="Give only the number.")
    original = rosa2.original_instructions["predict"]
    assert rosa2.session.instructions["predict"] == original + "\nRequirement from the user: Give only the number."
    assert record.words["predict"]["source"] == "append" and record.words["predict"]["accepted"]
    one_turn(rosa2, feedback="Give only the number.")  # the same requirement is not appended twice
    assert rosa2.session.instructions["predict"].count("Requirement from the user") == 1


def test_multi_stage_pipeline_adapts_every_predictor(tiny_lm):
    rosa2 = ROSA2(TwoStage(), tiny_lm, wrong, mode="joint", refiner_lm=refiner())
    record = one_turn(rosa2)
    assert set(rosa2.session.instructions) == {"draft", "final"}
    assert requirements_of(rosa2.session.instructions) == {"draft": [REFINED], "final": [REFINED]}
    # 2 predictor calls + the reference answer for the stage that outputs `answer`.
    assert record.weights["num_responses"] == 3 and record.weights["applied"]


def test_works_inside_dspy_evaluate_deepcopy_and_composition(tiny_lm):
    rosa2 = make(tiny_lm, "joint")
    clone = copy.deepcopy(rosa2)
    assert clone.lm.policy is tiny_lm.policy and clone.program is not rosa2.program

    devset = [EXAMPLE, dspy.Example(question="What is 1+1?", answer="2").with_inputs("question")]
    result = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: float(e.answer in p.answer),
                           num_threads=1, display_progress=False)(rosa2)
    assert 0.0 <= result.score <= 100.0 and len(result.results) == 2

    outer = Outer(rosa2)
    assert isinstance(outer(question="What is 2+3?").answer, str)
    assert [n for n, _ in outer.named_predictors()] == ["inner.program.predict"]  # the refiner is hidden


def test_weight_modes_need_a_local_actor():
    served = dspy.LM("openai/gpt-4o-mini")
    with pytest.raises(TypeError, match="LocalLM"):
        ROSA2(dspy.Predict("question -> answer"), served, wrong, mode="joint")
    assert ROSA2(dspy.Predict("question -> answer"), served, wrong, mode="prompt-only").policy is None


def test_a_served_actor_runs_the_text_only_modes():
    """A served model (any dspy.LM; DummyLM stands in for it, offline) runs static and prompt-only."""
    for mode in ("static", "prompt-only"):
        actor = DummyLM([{"answer": "4"}] * 6)
        rosa2 = ROSA2(dspy.Predict("question -> answer"), actor, wrong, mode=mode, refiner_lm=refiner(), max_turns=2)
        result = rosa2.interact(EXAMPLE)
        assert result.rosa2.turns == 2 and not result.rosa2.solved and result.answer == "4"
        assert rosa2.session.adapter is None and result.rosa2.trajectory[0].weights is None
        system = actor.history[-1]["messages"][0]["content"]
        if mode == "prompt-only":  # the second turn ran under the refined words
            assert requirements_of(result.rosa2.trajectory[1].instructions) == {"self": [REFINED]} and REFINED in system
        else:  # the words stay; the feedback comes back as a chat turn
            assert result.rosa2.trajectory[1].instructions == rosa2.original_instructions and REFINED not in system
            assert "Wrong: I want just the number." in actor.history[-1]["messages"][-1]["content"]


@pytest.mark.integration
def test_embedded_model_runs_three_turns_for_cot_and_a_two_stage_pipeline(embedded_lm):
    """End to end on the real embedded model, which is also the refiner (nothing remote, nothing mocked)."""
    lm = embedded_lm.copy(max_tokens=48)
    never_solved = lambda example, prediction, trace=None: dspy.Prediction(  # noqa: E731
        score=0.0, feedback="No. Reply with only the number, no words.", reference={"answer": example.answer})
    for program in (dspy.ChainOfThought("question -> answer"), TwoStage(draft=dspy.ChainOfThought)):
        rosa2 = ROSA2(program, lm, never_solved, mode="joint", max_turns=3)
        result = rosa2.interact(EXAMPLE)
        assert result.rosa2.turns == 3 and not result.rosa2.solved
        first, second, _ = result.rosa2.trajectory
        assert first.weights["applied"] and second.weights["applied"]
        assert 0 < first.delta_norm <= rosa2.weights.max_norm
        assert all(r.times["generate"] > 0 for r in result.rosa2.trajectory)
        assert set(first.words) == set(rosa2.original_instructions)
        # The words step ran on the local model: it may reject a poor rewrite, but it must not error.
        assert not any(w["reason"].startswith("refiner error") for r in result.rosa2.trajectory[:2] for w in r.words.values())
        assert not torch.equal(rosa2.session.adapter, lm.policy.initial_adapter_vector)


def test_append_fallback_drops_feedback_sentences_that_quote_the_answer():
    from rosa2_dspy.words import InstructionRefiner

    refine = InstructionRefiner(lm=rewriter(""), style="rewrite", fallback="append")
    answer = "You can use the format() function to create a string with the specified width"
    history = f"Turn 1 (reward 0.0): answer: {answer} | feedback: no"
    out = refine(instruction="Answer the question.", history=history,
                 feedback=f'No, that\'s not right. Your answer "{answer}" is not what I meant. I want meters.')
    assert out.source == "append"
    assert out.refined_instruction == ("Answer the question.\nRequirement from the user: "
                                       "No, that's not right. I want meters.")


def test_turns_keep_tokens_and_raw_completions_when_dspy_caps_the_lm_history(tiny_lm):
    rosa2 = make(tiny_lm, "param-only")
    with dspy.context(max_history_size=1):
        for _ in range(3):
            one_turn(rosa2)
    assert len(tiny_lm.history) == 1
    for turn in rosa2.session.turns:
        assert turn.record.tokens["completion"] > 0
        assert turn.calls[0].completion  # the raw text, even where the parsed fields are empty
