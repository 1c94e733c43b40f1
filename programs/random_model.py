"""A model of a real architecture with random weights, for timing where no trained weights can go.

Timing does not need trained weights: a model built from a real config (here Qwen2.5-1.5B's shape) costs
what the trained model costs per token. The benchmarks accept ``--model random:<shape>``; the folder is
built once under ``$ROSA2_CACHE_DIR`` (seeded ``torch`` init, the tokenizer of ``--tokenizer``, by default
the embedded model's) and then loaded like any local checkpoint. Token ids the tokenizer does not know
are dropped when decoding, which only affects the (meaningless) text of a random model's answers.

    >>> from programs.random_model import random_checkpoint           # doctest: +SKIP
    >>> path = random_checkpoint("qwen2.5-1.5b", device="cuda")      # doctest: +SKIP
    >>> LoRAPolicy.from_pretrained(str(path), device="cuda", dtype="bfloat16")  # doctest: +SKIP

Run: ``python -m programs.random_model qwen2.5-1.5b [--tokenizer DIR] [--device cuda]`` prints the folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rosa2_dspy.embedded import cache_root, write_checkpoint

PREFIX = "random:"

# Qwen/Qwen2.5-1.5B's config.json (the architecture; the weights are random).
QWEN25_15B = {
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False,
    "initializer_range": 0.02,
}
SHAPES = {
    "qwen2.5-1.5b": QWEN25_15B,
    # The same family at a size for tests and smoke runs of the benchmarks' device path.
    "qwen2-tiny": {**QWEN25_15B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "max_position_embeddings": 4096},
}


def random_checkpoint(shape: str, *, tokenizer: str | None = None, dtype: str = "bfloat16",
                      device: str = "cpu", seed: int = 0) -> Path:
    """Build (once) and return a checkpoint folder of ``shape`` with seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rosa2_dspy.embedded import embedded_checkpoint_dir
    from rosa2_dspy.policy import resolve_dtype

    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; known: {', '.join(SHAPES)}.")
    target = cache_root() / f"random-{shape}-{dtype}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    config = AutoConfig.for_model(**SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    source = AutoTokenizer.from_pretrained(tokenizer or embedded_checkpoint_dir())
    model.generation_config.eos_token_id = source.eos_token_id
    model.generation_config.pad_token_id = source.pad_token_id
    return write_checkpoint(target, model, source)


def resolve_model(name: str, *, tokenizer: str | None = None, dtype: str = "bfloat16", device: str = "cpu") -> str:
    """``random:<shape>`` → the folder of that random checkpoint; any other name is returned as it is."""
    if not name.startswith(PREFIX):
        return name
    return str(random_checkpoint(name.removeprefix(PREFIX), tokenizer=tokenizer, dtype=dtype, device=device))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(random_checkpoint(args.shape, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device))


if __name__ == "__main__":
    main()
