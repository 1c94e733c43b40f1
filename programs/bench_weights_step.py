"""Benchmark of the weights step: ROSA's one step vs iterative test-time training (TTT), same signal.

For each problem, the context is the DSPy prompt of ``question -> answer`` (as the chat adapter formats
it), the responses are the model's own greedy answer (reward 0) and the gold answer (reward 1, the
reference). Then:

* ROSA: one step (``ROSAStep``); we record its wall time and the log-prob gain it gives the reference;
* TTT: Adam steps on the same log-ratio targets until the reference's log-prob gain reaches ROSA's
  (``IterativeTTT(target_gain=...)``), or ``--ttt-max-steps``;
* one generation turn of 128 tokens, the unit ROSA's step is compared against.

Peak memory is the increase over the resident set before the step (CPU) or torch's peak allocation
(CUDA). Run: ``python -m programs.bench_weights_step [--model embedded --device cpu --dtype float32]``.
Writes ``results/bench_weights_step.json``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import dspy
import torch

from programs.random_model import resolve_model
from programs.reporting import write_results
from rosa2_dspy.adapter import LenientChatAdapter
from rosa2_dspy.policy import LoRAPolicy
from rosa2_dspy.weights import IterativeTTT, ROSAStep, ScoredResponse

PROBLEMS = [
    ("What is 17 + 26?", "43"),
    ("How many minutes are in 3 hours?", "180"),
    ("What is 12 times 12?", "144"),
]


class PeakMemory:
    """Peak extra memory while the block runs: RSS sampled every 5 ms on CPU, torch's counter on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._proc = psutil.Process()
        self._base, self._peak, self._running = self._proc.memory_info().rss, 0, True

        def sample() -> None:
            while self._running:
                self._peak = max(self._peak, self._proc.memory_info().rss)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._running = False
        self._thread.join()
        self.peak_mb = max(self._peak - self._base, 0) / 2**20


def scored_responses(policy: LoRAPolicy, question: str, gold: str) -> list[ScoredResponse]:
    adapter = LenientChatAdapter()
    signature = dspy.Signature("question -> answer")
    messages = adapter.format(signature, demos=[], inputs={"question": question})
    own, *_ = policy.generate(messages, max_new_tokens=64)
    reference = adapter.format_assistant_message_content(signature, {"answer": gold})
    # The reference goes first: IterativeTTT's target_gain is measured on the first response.
    return [ScoredResponse(messages, reference, 1.0, "reference"), ScoredResponse(messages, own, 0.0, "current")]


def after(policy: LoRAPolicy, responses: list[ScoredResponse]) -> list[float]:
    """Summed log-probs of ``responses`` under the policy's current adapter (no gradient)."""
    return [lp.total for lp in policy.logprobs([(r.messages, r.completion) for r in responses])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--ttt-lr", type=float, default=1e-4)
    parser.add_argument("--ttt-max-steps", type=int, default=30)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --model random:<shape>")
    parser.add_argument("--name", default="bench_weights_step", help="results/<name>.json")
    args = parser.parse_args(argv)

    model = resolve_model(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device)
    policy = LoRAPolicy.from_pretrained(model, device=args.device, dtype=args.dtype)
    # Warm-up (untimed): a first generation and a first step pay one-off costs (CUDA kernels, allocator).
    warm = scored_responses(policy, *PROBLEMS[0])
    ROSAStep(beta=args.beta, max_norm=args.max_norm, measure_after=False).step(policy, warm, apply=False)
    start = time.perf_counter()
    _, _, n_out, _ = policy.generate([{"role": "user", "content": "Write a long story about a robot."}],
                                     max_new_tokens=128)
    generation_seconds = (time.perf_counter() - start) * 128 / max(n_out, 1)

    rows = []
    for question, gold in PROBLEMS:
        responses = scored_responses(policy, question, gold)
        # Timed: each method's update, its KL check included; the log-probs after it (a diagnostic that
        # ROSA2 records by default, one forward over the responses) are measured apart, untimed.
        rosa = ROSAStep(beta=args.beta, max_norm=args.max_norm, measure_after=False)
        with PeakMemory(policy.device) as rosa_memory:
            rosa_step = rosa.step(policy, responses)
        rosa_step.logprob_after = after(policy, responses)
        rosa.rollback(policy)
        gain = rosa_step.logprob_change[0]
        ttt = IterativeTTT(beta=args.beta, lr=args.ttt_lr, steps=args.ttt_max_steps, target_gain=gain,
                           measure_after=False)
        with PeakMemory(policy.device) as ttt_memory:
            ttt_step = ttt.step(policy, responses)
        ttt_step.logprob_after = after(policy, responses)
        ttt.rollback(policy)
        rows.append({
            "question": question,
            "tokens (prompt+reference)": len(policy._prompt_ids(responses[0].messages))
            + len(policy._response_ids(responses[0].completion)),
            "rosa s": rosa_step.seconds,
            "rosa gain (nats)": gain,
            "rosa |dθ|": rosa_step.delta_norm,
            "ttt s": ttt_step.seconds,
            "ttt steps": ttt_step.iterations,
            "ttt gain (nats)": ttt_step.logprob_change[0],
            "ttt/rosa time": ttt_step.seconds / rosa_step.seconds,
            "rosa/generation": rosa_step.seconds / generation_seconds,
            "rosa peak MB": rosa_memory.peak_mb,
            "ttt peak MB": ttt_memory.peak_mb,
        })
    summary = {
        "question": "median",
        **{k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "question"},
    }
    rows.append(summary)
    write_results(
        args.name, rows,
        extra={"model": args.model, "device": args.device, "dtype": args.dtype, "beta": args.beta,
               "max_norm": args.max_norm, "ttt_lr": args.ttt_lr, "ttt_max_steps": args.ttt_max_steps,
               "generation_turn_128_tokens_s": generation_seconds},
    )
    print(f"one generation turn of 128 tokens: {generation_seconds:.2f} s")


if __name__ == "__main__":
    main()
