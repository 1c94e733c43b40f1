"""DSPy's contracts (issue 11): any program, any metric, optimizers compose, the LM from DSPy's settings.

Actor: the tiny in-process model (greedy) unless a test says otherwise; DummyLM only on the textual side
(refiner, judge, optimizer's prompt model, a served actor).
"""

from __future__ import annotations

import re

import dspy
import pytest
import torch
from dspy.clients.base_lm import GLOBAL_HISTORY
from dspy.teleprompt import COPRO, BootstrapFewShot, LabeledFewShot
from dspy.utils.dummies import DummyLM

from conftest import Outer, build_tiny_model, build_tiny_tokenizer, requirement_refiner, requirements_of
from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.policy import LoRAPolicy, LoRASettings
from rosa2_dspy import records
from rosa2_dspy.rosa2 import MODES, ROSA2

REFINED = "Answer with the number only."
EXAMPLE = dspy.Example(question="What is 2+3?", answer="5").with_inputs("question")
FEEDBACK = "Wrong: I want just the number."


def refiner(n: int = 40) -> DummyLM:
    return requirement_refiner(REFINED, n=n)


def wrong(example, prediction, trace=None):
    return dspy.Prediction(score=0.0, feedback=FEEDBACK, reference={"answer": example.answer})


def changed(rosa2, lm) -> bool:
    return not torch.equal(rosa2.session.adapter, lm.policy.initial_adapter_vector)


# --- 1. any program -----------------------------------------------------------------------------------------

LOOKUP = ('[[ ## next_thought ## ]]\nLook it up.\n\n[[ ## next_tool_name ## ]]\nlookup\n\n'
          '[[ ## next_tool_args ## ]]\n{"query": "2+3"}\n\n[[ ## completed ## ]]')
FINISH = ('[[ ## next_thought ## ]]\nI know it.\n\n[[ ## next_tool_name ## ]]\nfinish\n\n'
          '[[ ## next_tool_args ## ]]\n{}\n\n[[ ## completed ## ]]')
EXTRACT = "[[ ## reasoning ## ]]\nThe tool said five.\n\n[[ ## answer ## ]]\n5\n\n[[ ## completed ## ]]"


class FormatFollowingPolicy(LoRAPolicy):
    """The tiny model (its adapter, log-probs and gradients are real), except that it *writes* what a model
    that follows ReAct's format writes: the tiny random model cannot, and DSPy's ReAct raises on a tool
    name it cannot parse. Records the prompt and the adapter of each generation."""

    adapters: list
    prompts: list

    def generate(self, messages, *, adapter=None, **_):
        self.adapters.append(None if adapter is None else adapter.clone())
        self.prompts.append(messages)
        if "next_tool_name" in messages[0]["content"]:
            text = FINISH if "observation_0" in messages[-1]["content"] else LOOKUP
        else:
            text = EXTRACT
        return text, len(self._prompt_ids(messages)), len(self._response_ids(text)), "stop"


@pytest.mark.parametrize("mode", MODES)
def test_react_with_one_tool_interacts_for_three_turns(mode):
    tokenizer = build_tiny_tokenizer()
    policy = FormatFollowingPolicy(build_tiny_model(len(tokenizer)), tokenizer, lora=LoRASettings(rank=4, alpha=8))
    policy.adapters, policy.prompts = [], []
    lm = LocalLM(policy, max_tokens=64)
    lookups = []

    def lookup(query: str) -> str:
        """Look a fact up."""
        lookups.append(query)
        return "five"

    rosa2 = ROSA2(dspy.ReAct("question -> answer", tools=[lookup], max_iters=3), lm, wrong, mode=mode,
                  refiner_lm=refiner(), max_turns=3)
    result = rosa2.interact(EXAMPLE)

    assert isinstance(result.rosa2, records.InteractionResult)
    assert result.rosa2.turns == 3 and not result.rosa2.solved and len(result.rosa2.trajectory) == 3
    # The program's own output fields, untouched: ReAct's trajectory is ReAct's.
    assert result.answer == "5" and result.trajectory["observation_0"] == "five"
    assert set(result.keys()) == {"trajectory", "reasoning", "answer"}
    assert lookups == ["2+3"] * 3  # the tool ran in every turn
    turn = rosa2.session.turns[0]
    assert [c.predictor for c in turn.calls] == ["react", "react", "extract.predict"]
    assert [c.completion for c in turn.calls] == [LOOKUP, FINISH, EXTRACT]  # what the model wrote
    if mode in ("prompt-only", "joint"):
        assert requirements_of(rosa2.session.turns[1].record.instructions) == {"react": [REFINED], "extract.predict": [REFINED]}
        # the second turn's prompts (3 per turn: react, react, extract) ran the refined words
        assert all(REFINED in messages[0]["content"] for messages in policy.prompts[3:6])
        assert not any(REFINED in messages[0]["content"] for messages in policy.prompts[:3])
    if mode in ("param-only", "joint"):
        assert result.rosa2.trajectory[0].weights["applied"] and changed(rosa2, lm)
        # the second turn ran under the session's adapted weights
        assert not torch.equal(policy.adapters[3], lm.policy.initial_adapter_vector)
    if mode == "switch":
        assert any((r.weights or {}).get("applied") for r in result.rosa2.trajectory)
    if mode in ("static", "prompt-only"):
        assert not changed(rosa2, lm)


def best_of_n(module):
    return dspy.BestOfN(module, N=2, reward_fn=lambda args, pred: 0.0, threshold=1.0)


def refine(module):
    return dspy.Refine(module, N=2, reward_fn=lambda args, pred: 0.0, threshold=1.0)


@pytest.mark.parametrize("wrap", [best_of_n, refine], ids=["BestOfN", "Refine"])
def test_best_of_n_and_refine_apply_the_weights_step_in_joint_mode(tiny_lm, wrap):
    """These run deep copies of their predictors; turns are attributed to the predictor by name."""
    rosa2 = ROSA2(wrap(dspy.Predict("question -> answer")), tiny_lm, wrong, mode="joint", refiner_lm=refiner())
    before = len(GLOBAL_HISTORY)
    prediction = rosa2(question=EXAMPLE.question)
    # every completion of this turn: each attempt ran a copy of the predictor on a copy of the LM
    written = [h["outputs"][0] for h in GLOBAL_HISTORY[before:] if h["model"] == tiny_lm.model]
    assert len(written) >= 2
    record = rosa2.adapt(FEEDBACK, score=0.0, reference={"answer": "5"})
    assert record.weights["applied"] and record.delta_norm > 0 and changed(rosa2, tiny_lm)
    assert record.weights["num_responses"] == 2  # the chosen attempt's answer + the reference
    (call,) = rosa2.session.turns[0].calls
    assert call.predictor == "module" and call.outputs["answer"] == prediction.answer
    assert call.completion is not None and call.completion in written  # the raw text of the copy's call
    assert requirements_of(rosa2.session.instructions) == {"module": [REFINED]}


class ProgramOfThoughtStyle(dspy.Module):
    """Write code, run it, answer from its output (dspy.ProgramOfThought's shape, without its Deno sandbox)."""

    def __init__(self):
        super().__init__()
        self.write = dspy.ChainOfThought("question -> code")
        self.answer = dspy.Predict("question, code, output -> answer")

    def forward(self, question):
        code = self.write(question=question).code
        arithmetic = re.fullmatch(r"[\d\s+\-*/().]+", code or "")
        try:
            output = str(eval(code, {"__builtins__": {}})) if arithmetic else "error: not arithmetic"  # noqa: S307
        except Exception as err:  # noqa: BLE001
            output = f"error: {err}"
        return self.answer(question=question, code=code, output=output)


@pytest.mark.parametrize("mode", MODES)
def test_program_of_thought_style_module_in_every_mode(tiny_lm, mode):
    rosa2 = ROSA2(ProgramOfThoughtStyle(), tiny_lm, wrong, mode=mode, refiner_lm=refiner(), max_turns=3)
    result = rosa2.interact(EXAMPLE)
    assert result.rosa2.turns == 3 and set(result.keys()) == {"answer"}
    for turn in rosa2.session.turns:
        assert [c.predictor for c in turn.calls] == ["write.predict", "answer"]
        assert all(c.completion for c in turn.calls)
    applied = [bool((r.weights or {}).get("applied")) for r in result.rosa2.trajectory]
    assert any(applied) == (mode in ("param-only", "switch", "joint")) == changed(rosa2, tiny_lm)


# --- 2. any metric ------------------------------------------------------------------------------------------


class Judge(dspy.Module):
    """An LLM judge as a DSPy module: no ``trace``, no ``history`` in its forward."""

    def __init__(self):
        super().__init__()
        self.grade = dspy.Predict("question, gold, answer -> score: float, feedback: str")

    def forward(self, example, prediction):
        out = self.grade(question=example.question, gold=example.answer, answer=prediction.answer)
        return dspy.Prediction(score=out.score, feedback=out.feedback)


def test_a_dspy_module_judge_gives_the_feedback(tiny_lm):
    judge = Judge()
    judge_lm = DummyLM([{"score": "0.25", "feedback": "Give only the number, please."}] * 4)
    judge.set_lm(judge_lm)
    refiner_lm = refiner()
    rosa2 = ROSA2(dspy.Predict("question -> answer"), tiny_lm, judge, mode="joint", refiner_lm=refiner_lm,
                  max_turns=2)
    result = rosa2.interact(EXAMPLE)
    first = result.rosa2.trajectory[0]
    assert (first.reward, first.feedback) == (0.25, "Give only the number, please.")
    # the judge saw the actor's answer; the words step got the judge's words; the weights moved
    assert rosa2.session.turns[0].record.outputs["answer"] in judge_lm.history[0]["messages"][-1]["content"]
    assert "Give only the number, please." in refiner_lm.history[0]["messages"][-1]["content"]
    assert first.weights["applied"] and changed(rosa2, tiny_lm)
    assert [n for n, _ in rosa2.named_predictors()] == ["program"]  # the judge is no part of the program


def test_two_and_five_argument_metrics_and_history_only_when_named(tiny_lm):
    seen = {}

    def two(example, pred):
        seen["two"] = pred.answer
        return float(pred.answer == example.answer)

    def gepa(gold, pred, trace, pred_name, pred_trace):
        seen["gepa"] = (trace, pred_name, pred_trace)
        return dspy.Prediction(score=0.0, feedback="Not it.")

    class WithHistory:
        def __call__(self, example, pred, history):  # named `history`, positional: given by keyword
            seen.setdefault("history", []).append(len(history))
            return 0.0

    for metric in (two, gepa, WithHistory()):
        rosa2 = ROSA2(dspy.Predict("question -> answer"), tiny_lm, metric, mode="param-only", max_turns=2)
        result = rosa2.interact(EXAMPLE)
        assert result.rosa2.turns == 2 and result.rosa2.trajectory[0].reward == 0.0
    assert isinstance(seen["two"], str) and seen["gepa"] == (None, None, None) and seen["history"] == [0, 1]


@pytest.mark.parametrize("bad, match", [
    (lambda example: 1.0, "cannot be called as a DSPy metric"),
    (lambda a, b, c, d, e, f: 1.0, "cannot be called as a DSPy metric"),
    (lambda example, pred, *, strict: 1.0, "keyword arguments"),
    (dspy.Predict("question, answer -> score: float"), "Wrap it in a dspy.Module"),
    ("not callable", "must be callable"),
])
def test_unsupported_feedback_shapes_fail_clearly_at_construction(bad, match):
    with pytest.raises(TypeError, match=match):
        ROSA2(dspy.Predict("question -> answer"), DummyLM([{"answer": "4"}]), bad, mode="prompt-only")


# --- 3. optimizers compose ----------------------------------------------------------------------------------

COMPILED = "Reply with the bare number and nothing else."
TRAINSET = [dspy.Example(question="What is 1+1?", answer="2").with_inputs("question"),
            dspy.Example(question="What is 3+3?", answer="6").with_inputs("question")]


def test_a_program_compiled_through_rosa2_is_adapted_from_its_compiled_state():
    """Wrap, then optimize the wrapper (COPRO for the instruction, BootstrapFewShot for demos): the first turn of
    an interaction runs the compiled instruction and demos; the words step starts from them."""
    # a served actor that answers the trainset right (and the interaction's question wrong)
    actor = DummyLM({"1+1": {"answer": "2"}, "3+3": {"answer": "6"}, "2+3": {"answer": "4"}, "warm": {"answer": "?"}})
    rosa2 = ROSA2(dspy.Predict("question -> answer"), feedback=wrong, mode="prompt-only", refiner_lm=refiner(),
                  max_turns=2)

    scores = []

    def instructed(example, pred, trace=None):  # rewards the candidate instruction only if it reached the LM
        scores.append(float(COMPILED in actor.history[-1]["messages"][0]["content"]))
        return scores[-1]

    prompt_model = DummyLM([{"proposed_instruction": COMPILED, "proposed_prefix_for_output_field": "Answer:"}] * 10)
    copro = COPRO(prompt_model=prompt_model, metric=instructed, breadth=2, depth=1)
    exact = lambda example, pred, trace=None: example.answer == pred.answer  # noqa: E731
    with dspy.context(lm=actor):
        rosa2(question="warm-up")  # a default session exists before compiling: it must not pin the old words
        compiled = copro.compile(rosa2, trainset=TRAINSET, eval_kwargs={"num_threads": 1, "display_progress": False})
        assert [n for n, _ in compiled.named_predictors()] == ["program"]  # COPRO tuned the program, not the refiner
        assert compiled.original_instructions == {"self": COMPILED}  # a bare Predict is its own predictor, "self"
        assert set(scores) == {0.0, 1.0}  # COPRO's candidates each reached the LM through the wrapper

        compiled = BootstrapFewShot(metric=exact, max_bootstrapped_demos=1, max_labeled_demos=0).compile(
            compiled, trainset=TRAINSET)
        assert len(compiled.program.demos) == 1  # bootstrapped from the trace ROSA2 reports to its parent

        before = len(actor.history)
        result = compiled.interact(EXAMPLE)
    first_prompt = actor.history[before]["messages"]
    assert COMPILED in first_prompt[0]["content"]
    assert compiled.program.demos[0].question in " ".join(m["content"] for m in first_prompt[1:])
    assert result.rosa2.trajectory[0].instructions == {"self": COMPILED}
    assert requirements_of(result.rosa2.trajectory[1].instructions) == {"self": [REFINED]}  # refined from the compiled words


def test_labeled_demos_and_instructions_set_after_wrapping_reach_the_lm(tiny_lm):
    rosa2 = ROSA2(dspy.ChainOfThought("question -> answer"), tiny_lm, wrong, mode="joint", refiner_lm=refiner())
    compiled = LabeledFewShot(k=1).compile(rosa2, trainset=TRAINSET[:1])
    compiled.program.predict.signature = compiled.program.predict.signature.with_instructions(COMPILED)
    compiled(question=EXAMPLE.question)
    messages = compiled.lm.history[-1]["messages"]  # the compiled copy's LM (a copy sharing the model)
    assert COMPILED in messages[0]["content"] and TRAINSET[0].question in messages[1]["content"]
    record = compiled.adapt(FEEDBACK, score=0.0, reference={"answer": "5"})
    assert record.instructions == {"predict": COMPILED} and record.weights["applied"]
    # a session carried over keeps its words even if the program changes again
    carried = compiled.start_session("carried", carry_over_from=compiled.current_session_id)
    compiled.program.predict.signature = compiled.program.predict.signature.with_instructions("Something else.")
    compiled(question=EXAMPLE.question)
    assert requirements_of(compiled.sessions[carried].instructions) == {"predict": [REFINED]}


def test_the_refiner_is_hidden_from_a_parents_named_predictors_unless_asked_for(tiny_lm):
    hidden = Outer(ROSA2(dspy.ChainOfThought("question -> answer"), tiny_lm, wrong))
    assert [n for n, _ in hidden.named_predictors()] == ["inner.program.predict"]
    assert [n for n, _ in hidden.inner.refiner.named_predictors()] == ["predict"]  # still a working module
    exposed = Outer(ROSA2(dspy.ChainOfThought("question -> answer"), tiny_lm, wrong, expose_refiner=True))
    assert [n for n, _ in exposed.named_predictors()] == ["inner.program.predict", "inner.refiner.predict"]


# --- 8. the LM from DSPy's settings -------------------------------------------------------------------------


def test_rosa2_without_lm_uses_the_lm_configured_at_call_time(tiny_lm):
    rosa2 = ROSA2(dspy.Predict("question -> answer"), feedback=wrong, mode="joint", refiner_lm=refiner(),
                  max_turns=2)
    assert rosa2.lm is None
    with dspy.context(lm=tiny_lm):
        result = rosa2.interact(EXAMPLE)
    assert len(tiny_lm.history) >= 2  # the configured model answered both turns
    assert result.rosa2.trajectory[0].weights["applied"] and changed(rosa2, tiny_lm)

    # forward, then adapt, each under the configured LM
    with dspy.context(lm=tiny_lm):
        rosa2.start_session("manual")
        rosa2(question=EXAMPLE.question)
        assert rosa2.adapt(FEEDBACK, score=0.0, reference={"answer": "5"}).weights["applied"]

    # a served LM configured for a weight mode: a clear error, before anything runs
    served = DummyLM([{"answer": "4"}] * 4)
    with dspy.context(lm=served):
        with pytest.raises(TypeError, match=r"needs a LocalLM actor.*got DummyLM.*dspy\.configure"):
            rosa2(question=EXAMPLE.question)
    with dspy.context(lm=None), pytest.raises(TypeError, match="got no LM"):
        rosa2.interact(EXAMPLE)
    assert served.history == []

    # the text-only modes run on whatever LM is configured
    prompt_only = ROSA2(dspy.Predict("question -> answer"), feedback=wrong, mode="prompt-only", refiner_lm=refiner(),
                        max_turns=2)
    with dspy.context(lm=served):
        assert prompt_only.interact(EXAMPLE).answer == "4"
    assert REFINED in served.history[-1]["messages"][0]["content"]


def test_refine_keeps_static_modes_conversation_in_its_hinted_attempts():
    """dspy.Refine re-creates the configured adapter from its class (to add a hint): static mode's replayed
    conversation must survive that. A served actor (DummyLM) writes the answers and Refine's advice."""
    actor = DummyLM([{"answer": "4"}, {"discussion": "d", "advice": {"self": "Add the numbers."}}, {"answer": "6"}] * 3)
    rosa2 = ROSA2(refine(dspy.Predict("question -> answer")), actor, wrong, mode="static", max_turns=2)
    before = len(GLOBAL_HISTORY)
    result = rosa2.interact(EXAMPLE)
    assert result.rosa2.turns == 2
    calls = GLOBAL_HISTORY[before:]  # Refine's attempts run on copies of the actor (their own history)
    assert len(calls) == 6  # per turn: an attempt, the advice, a hinted attempt
    hinted = calls[-1]["messages"]  # the second turn's hinted attempt
    assert "Add the numbers." in hinted[-1]["content"]
    assert [m["role"] for m in hinted] == ["system", "user", "assistant", "user"]
    assert hinted[-1]["content"].startswith(f"Feedback on your previous answer: {FEEDBACK}")


def test_a_new_session_starts_from_the_models_own_adapter_after_offline_training(tiny_lm):
    """Compile offline, then adapt online: sessions start from the model's adapter as trained."""
    trained = tiny_lm.policy.initial_adapter_vector + 0.01
    tiny_lm.policy.set_adapter_vector(trained)
    try:
        rosa2 = ROSA2(dspy.Predict("question -> answer"), lm=tiny_lm, mode="joint")
        sid = rosa2.start_session()
        assert torch.equal(rosa2.sessions[sid].adapter, trained)
    finally:
        tiny_lm.policy.reset_adapter()
