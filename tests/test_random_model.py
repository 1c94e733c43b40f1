"""programs.random_model: a real architecture with seeded random weights, for timing on a GPU machine."""

import json

import pytest
import torch
from safetensors.torch import load_file

from programs.random_model import SHAPES, random_checkpoint, resolve_model
from rosa2_dspy.policy import LoRAPolicy


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROSA2_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builds_the_shape_once_seeded_and_loads_as_a_policy(cache, tiny_model_dir, tmp_path, monkeypatch):
    path = random_checkpoint("qwen2-tiny", tokenizer=str(tiny_model_dir), dtype="float32")
    config = json.loads((path / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert config[key] == SHAPES["qwen2-tiny"][key]
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert random_checkpoint("qwen2-tiny", tokenizer=str(tiny_model_dir), dtype="float32") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written  # built once

    monkeypatch.setenv("ROSA2_CACHE_DIR", str(tmp_path / "other"))
    again = random_checkpoint("qwen2-tiny", tokenizer=str(tiny_model_dir), dtype="float32")
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    other_seed = random_checkpoint("qwen2-tiny", tokenizer=str(tiny_model_dir), dtype="float32", seed=1)
    assert not torch.equal(load_file(other_seed / "model.safetensors")["model.embed_tokens.weight"],
                           a["model.embed_tokens.weight"])

    policy = LoRAPolicy.from_pretrained(resolve_model("random:qwen2-tiny", tokenizer=str(tiny_model_dir),
                                                      dtype="float32"), dtype="float32")
    text, _, n_tokens, _ = policy.generate([{"role": "user", "content": "hi"}], max_new_tokens=6)
    assert n_tokens == 6 and isinstance(text, str)  # ids the tokenizer does not know are dropped, not fatal


def test_other_names_pass_through_and_unknown_shapes_are_refused(cache):
    assert resolve_model("embedded") == "embedded"
    assert resolve_model("/some/folder") == "/some/folder"
    with pytest.raises(ValueError, match="qwen2.5-1.5b"):
        resolve_model("random:gpt-17")
