"""Benchmark of the local LM on the embedded model: load time, generation speed, one gradient pass.

Measures, on this machine:
* load time, cold (dequantising the packaged GGUF into an empty cache) and cached (from safetensors);
* greedy generation throughput (tokens/s) for a 128-token answer;
* the time of one ``log pi(y|x)`` + gradient pass over a 512-token prompt+response (the unit of work of
  the ROSA weights step, which costs one such pass per response).

Run: ``python -m programs.bench_local_lm [--model embedded] [--device cpu] [--dtype float32]``.
Writes ``results/bench_local_lm.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from programs.reporting import write_results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from rosa2_dspy.policy import LoRAPolicy

    rows = []
    if args.model == "embedded":
        with tempfile.TemporaryDirectory() as empty_cache:
            previous = os.environ.get("ROSA2_CACHE_DIR")
            os.environ["ROSA2_CACHE_DIR"] = empty_cache
            start = time.perf_counter()
            LoRAPolicy.from_pretrained("embedded", device=args.device, dtype=args.dtype)
            rows.append({"measure": "load, cold (dequantise GGUF + write cache)", "value": time.perf_counter() - start, "unit": "s"})
            if previous is None:
                del os.environ["ROSA2_CACHE_DIR"]
            else:
                os.environ["ROSA2_CACHE_DIR"] = previous
    start = time.perf_counter()
    policy = LoRAPolicy.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    rows.append({"measure": "load, cached", "value": time.perf_counter() - start, "unit": "s"})

    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    speeds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        # A story prompt keeps the model talking; count the tokens it really produced.
        _, _, n_out, _ = policy.generate(messages, max_new_tokens=128)
        speeds.append(n_out / (time.perf_counter() - start))
    rows.append({"measure": "generation, greedy, 128-token answer", "value": statistics.median(speeds), "unit": "tokens/s"})
    rows.append({"measure": "one generation turn of 128 tokens", "value": 128 / statistics.median(speeds), "unit": "s"})

    # 512 tokens in all: a 384-token prompt (chat template included) and a 128-token response.
    overhead = len(policy._prompt_ids([{"role": "user", "content": ""}]))
    words = policy.tokenizer(" ".join(["The quick brown fox jumps over the lazy dog."] * 80),
                             add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": policy.tokenizer.decode(words[: 384 - overhead])}]
    response = policy.tokenizer.decode(words[384 - overhead : 384 - overhead + 127])  # + end-of-turn
    total = len(policy._prompt_ids(chat)) + len(policy._response_ids(response))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        policy.logprob(chat, response, with_grad=True)
        times.append(time.perf_counter() - start)
    rows.append({"measure": f"log-prob + gradient pass, {total} tokens", "value": statistics.median(times), "unit": "s"})
    write_results(
        "bench_local_lm",
        rows,
        extra={"model": args.model, "device": args.device, "dtype": args.dtype,
               "adapter_parameters": policy.num_adapter_parameters},
    )


if __name__ == "__main__":
    main()
