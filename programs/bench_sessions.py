"""Benchmark: many conversations at once on one model (the batching engine, the batched weights step).

Every figure is a ratio measured in one run on one machine, with the embedded model unless ``--model``:

* ``speedup_N`` — aggregate greedy tokens/s of N concurrent conversations (threads), each under its own
  different, non-zero LoRA adapter, over one conversation alone; N = 1, 2, 4, 8, 16. Also the cost of
  LocalLM's path for a lone request against plain ``transformers`` ``generate`` (same adapter).
* ``weights_step_speedup`` — one ROSA step over 4 responses: batched (one forward + one backward for
  all per-response gradients; the device's default of ``Batcher.share_prompts``: the prompt run once
  on a CPU, all rows padded into one pass elsewhere; both are reported) vs one pass per response
  through the same engine, and
  ``weights_step_speedup_vs_pre_issue`` vs the passes as they were before batching (one PEFT forward and
  backward per response, logits over every position); the largest relative difference of the Δθ.
* ``main_job_speedup`` — the main job's config (``programs/configs/default.json``) run with the
  experiment's default ``concurrency`` (16) over the same run with ``concurrency`` 1, with
  ``identical_share``: the share of turns whose answers are identical in both; ``by_concurrency`` has
  the same for each of ``--main-concurrency`` (default 8 and 16), with the engine's load (its passes'
  seconds by kind and ``busy_share``, their sum over the wall time; ``programs.experiment.engine_load``);
  and ``adapt_over_generate`` — in the sequential joint-mode run,
  the per-turn seconds of words + weights over the per-turn seconds of generation. Measurements that are
  not adaptation (the Theorem 4.1 shifts, the weights step's ``logprob_after`` of the responses its KL
  check did not score; ``rosa2_dspy.records.MEASUREMENTS``) are timed apart and reported beside it
  (``joint_measurement_seconds_per_turn_sequential``); before 2026-11-28 ``measure_after`` counted as
  weights.
  The concurrent run is exactly ``make run``; its results are also written as the main job's
  (``results/<config name>.json`` and plot), so the two are one measurement.

* ``width`` (only when asked for: ``--parts width``) — why scoring passes join only requests of equal
  padded width: a row's log-prob and gradient alone vs beside a longer row, bit for bit.
* ``ceiling`` (only when asked for: ``--parts ceiling``) — the share of this device's practical peak
  FLOP/s (a large matrix product) that the model's forward and forward + backward reach on one DSPy
  prompt and answer, one row and 4 at once: a pass at share s can gain at most 1/s from batching.

Parts run in order and each is saved as soon as it finishes (``--parts generation,weights,main``;
``results/bench_sessions.json`` keeps earlier parts), so an interrupted run loses at most one part.
Run: ``python -m programs.bench_sessions``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import dspy
import torch

from programs import experiment, experiment_report
from programs.profile_turn import best_of
from programs.random_model import resolve_model
from programs.reporting import RESULTS_DIR, format_table, machine_facts
from programs.tasks import load_task
from rosa2_dspy.adapter import LenientChatAdapter
from rosa2_dspy.engine import LogProb
from rosa2_dspy.local_lm import LocalLM
from rosa2_dspy.policy import LoRAPolicy
from rosa2_dspy.weights import ROSAStep, ScoredResponse

NAME = "bench_sessions"
STORIES = ["a robot", "the sea", "a lost key", "a small town", "an old clock", "a red kite", "winter", "a library"]


def distinct_adapters(policy: LoRAPolicy, n: int, scale: float = 0.02) -> list[torch.Tensor]:
    """n different, non-zero adapters: the initial one plus small seeded noise (B is no longer zero)."""
    g = torch.Generator().manual_seed(0)
    return [policy.initial_adapter_vector + scale * torch.randn(policy.num_adapter_parameters, generator=g)
            for _ in range(n)]


def story(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about {STORIES[i % len(STORIES)]}."}]


def concurrent_tokens_per_second(policy: LoRAPolicy, adapters: list[torch.Tensor], max_new_tokens: int) -> dict:
    n = len(adapters)
    counts = [0] * n
    barrier = threading.Barrier(n + 1)

    def converse(i: int) -> None:
        barrier.wait()
        counts[i] = policy.generate(story(i), max_new_tokens=max_new_tokens, adapter=adapters[i])[2]

    threads = [threading.Thread(target=converse, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    passes = policy.batcher.passes["generate"]
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"conversations": n, "tokens": sum(counts), "seconds": seconds, "tokens_per_s": sum(counts) / seconds,
            "passes": policy.batcher.passes["generate"] - passes}


def bench_generation(policy: LoRAPolicy, max_new_tokens: int,
                     conversations: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict[str, Any]:
    adapters = distinct_adapters(policy, max(conversations))
    concurrent_tokens_per_second(policy, adapters[:2], 8)  # warm-up
    rows = []
    for n in conversations:
        runs = [concurrent_tokens_per_second(policy, adapters[:n], max_new_tokens) for _ in range(2)]
        rows.append(max(runs, key=lambda r: r["tokens_per_s"]))
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    # A lone request: LocalLM's path (batcher, per-row LoRA, own decode loop) vs transformers' generate.
    policy.set_adapter_vector(adapters[0])
    ids = torch.tensor([policy._prompt_ids(story(0))], device=policy.device)
    start = time.perf_counter()
    out = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=policy.tokenizer.pad_token_id, eos_token_id=policy.tokenizer.eos_token_id)
    plain = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)
    policy.reset_adapter()
    return {"rows": rows, **{f"speedup_{r['conversations']}": r["speedup"] for r in rows},
            "lone_request_tokens_per_s": base, "transformers_generate_tokens_per_s": plain,
            "lone_over_transformers": base / plain, "wait_ms": policy.batcher.wait_ms,
            "max_batch": policy.batcher.max_batch, "max_new_tokens": max_new_tokens}


def step_responses(policy: LoRAPolicy, question: str, gold: str) -> list[ScoredResponse]:
    """Four responses to one DSPy prompt: the reference and three of the model's own answers."""
    adapter = LenientChatAdapter()
    signature = dspy.Signature("question -> answer")
    messages = adapter.format(signature, demos=[], inputs={"question": question})
    own = [policy.generate(messages, max_new_tokens=48, adapter=v)[0] for v in distinct_adapters(policy, 3, 0.05)]
    reference = adapter.format_assistant_message_content(signature, {"answer": gold})
    return [ScoredResponse(messages, reference, 1.0, "reference")] + [
        ScoredResponse(messages, text, 0.0, "history" if i else "current") for i, text in enumerate(own)]


def pre_issue_logprobs(policy: LoRAPolicy, pairs, *, with_grad: bool = False, adapter=None) -> list[LogProb]:
    """The weights step's passes as they were before batching (rosa2_dspy/local_lm.py at 9b212e0): one
    forward and one backward per response through PEFT's own adapter, logits over every position."""
    results = []
    with policy.lock:
        own = policy.adapter_vector()
        policy.set_adapter_vector(adapter if adapter is not None else own)
        try:
            for messages, response in pairs:
                prompt, answer = policy._prompt_ids(messages), policy._response_ids(response)
                ids = torch.tensor([prompt + answer], device=policy.device)
                with torch.set_grad_enabled(with_grad):
                    logits = policy.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
                    total = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt):, None]).sum()
                    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, policy._params)]).float().cpu() \
                        if with_grad else None
                results.append(LogProb(float(total.detach()), len(answer), grad))
        finally:
            policy.set_adapter_vector(own)
    return results


def bench_weights(policy: LoRAPolicy) -> dict[str, Any]:
    """One ROSA step over 4 responses: batched (the prompt run once and shared, or all rows padded into
    one pass) vs one pass per response vs the pre-batching passes. ``weights_step_speedup`` is the
    device's default batching (``Batcher.share_prompts``: shared on a CPU, padded elsewhere)."""
    rows = []
    batched_logprobs = policy.logprobs
    default_sharing = policy.batcher.share_prompts

    def one_pass_per_response(pairs, **kwargs):
        return [batched_logprobs([pair], **kwargs)[0] for pair in pairs]

    paths = {"shared prompt": (batched_logprobs, True), "padded": (batched_logprobs, False),
             "sequential": (one_pass_per_response, default_sharing),
             "pre-issue": (lambda pairs, **kwargs: pre_issue_logprobs(policy, pairs, **kwargs), default_sharing)}
    default = "shared prompt" if default_sharing else "padded"

    for example in load_task("intent", limit=3, spread=True):
        responses = step_responses(policy, example.question, example.answer)
        adapter = policy.initial_adapter_vector
        timings = {}
        for label, (path, sharing) in paths.items():
            policy.logprobs, policy.batcher.share_prompts = path, sharing
            ROSAStep(measure_after=False).step(policy, responses, apply=False, adapter=adapter)  # warm-up
            best = None
            for _ in range(2):
                step = ROSAStep(measure_after=False).step(policy, responses, apply=False, adapter=adapter)
                best = step if best is None or step.seconds < best.seconds else best
            timings[label] = best
        policy.logprobs, policy.batcher.share_prompts = batched_logprobs, default_sharing
        reference = timings["sequential"].delta
        rows.append({
            "question": example.question[:40],
            "tokens": sum(len(policy._prompt_ids(r.messages)) + len(policy._response_ids(r.completion))
                          for r in responses),
            **{f"{label} s": timings[label].seconds for label in paths},
            "speedup": timings["sequential"].seconds / timings[default].seconds,
            "speedup shared prompt": timings["sequential"].seconds / timings["shared prompt"].seconds,
            "speedup padded": timings["sequential"].seconds / timings["padded"].seconds,
            "speedup vs pre-issue": timings["pre-issue"].seconds / timings[default].seconds,
            "max relative Δθ difference": float(max((timings[label].delta - reference).abs().max()
                                                    for label in paths) / reference.abs().max()),
        })
    return {"rows": rows, "weights_step_speedup": statistics.median(r["speedup"] for r in rows),
            "weights_step_default_batching": default,
            "weights_step_speedup_shared_prompt": statistics.median(r["speedup shared prompt"] for r in rows),
            "weights_step_speedup_padded": statistics.median(r["speedup padded"] for r in rows),
            "weights_step_speedup_vs_pre_issue": statistics.median(r["speedup vs pre-issue"] for r in rows),
            "max_relative_delta_difference": max(r["max relative Δθ difference"] for r in rows),
            "responses_per_step": 4}


def bench_ceiling(policy: LoRAPolicy, batches: tuple[int, ...] = (1, 4)) -> dict[str, Any]:
    """How much batching can speed up the passes that are not decoding (prefill, a step's gradients) on
    this device: the FLOP/s (counted by ``torch.utils.flop_counter``) that a large matrix product reaches,
    the device's practical peak, against those of the model's forward and of its forward + backward (to
    the LoRA parameters) on one DSPy prompt and answer, alone and ``batches`` at once. A pass at share s
    of the peak can run at most 1/s times faster, however it is batched."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops_and_seconds(run: Callable[[], Any]) -> tuple[int, float]:
        with FlopCounterMode(display=False) as counter:
            run()  # counted, and the warm-up of the timed runs
        return counter.get_total_flops(), best_of(3, {"pass": run})["pass"]

    dtype = next(policy.causal_lm.parameters()).dtype
    size = 2048
    a, b = (torch.randn(size, size, device=policy.device, dtype=dtype) for _ in range(2))
    flops, seconds = flops_and_seconds(lambda: a @ b)
    peak = flops / seconds
    rows = [{"pass": f"matmul {size}x{size}", "rows": 1, "tokens": None, "GFLOP": flops / 1e9, "seconds": seconds,
             "GFLOP/s": peak / 1e9, "share of peak": 1.0}]
    question, gold = "How far is 3 km?", "3000 m"
    adapter = LenientChatAdapter()
    signature = dspy.Signature("question -> answer")
    messages = adapter.format(signature, demos=[], inputs={"question": question})
    answer = policy._response_ids(adapter.format_assistant_message_content(signature, {"answer": gold}))
    ids = policy._prompt_ids(messages) + answer
    model = policy.causal_lm
    for n in batches:
        batch = torch.tensor([ids] * n, device=policy.device)

        def forward() -> None:
            with torch.no_grad():
                model(input_ids=batch, logits_to_keep=1)

        def forward_backward() -> None:
            logits = model(input_ids=batch, logits_to_keep=len(answer) + 1).logits.float()  # the answer's
            torch.autograd.grad(torch.log_softmax(logits, -1).amax(-1).sum(), policy._params)

        for label, run in (("forward", forward), ("forward + backward", forward_backward)):
            flops, seconds = flops_and_seconds(run)
            rows.append({"pass": label, "rows": n, "tokens": n * len(ids), "GFLOP": flops / 1e9, "seconds": seconds,
                         "GFLOP/s": flops / seconds / 1e9, "share of peak": flops / seconds / peak})
    share = {f"{r['pass']}, {r['rows']} row{'s' * (r['rows'] > 1)}": r["share of peak"] for r in rows[1:]}
    return {"rows": rows, "peak_gflops": peak / 1e9, "share_of_peak": share,
            "most_batching_can_gain": {k: 1 / v for k, v in share.items()}}


def bench_score_width(policy: LoRAPolicy, pairs: int = 6) -> dict[str, Any]:
    """Why a scoring pass joins only requests of equal padded width: one (prompt, answer) row's log-prob and
    adapter gradient computed alone, and beside a longer row (so right-padded to a wider pass), for
    ``pairs`` intent questions. ``log_prob_identical_share`` / ``grad_identical_share``: the share of rows
    whose log-prob / gradient is bit for bit the same both ways; ``max_relative_grad_difference``: the
    largest entry of the difference over the largest of the gradient."""
    from rosa2_dspy.scoring import ScoreRow, score_rows, score_width

    adapter, signature = LenientChatAdapter(), dspy.Signature("question -> answer")
    vectors = distinct_adapters(policy, 2)
    rows = []
    for example in load_task("intent", limit=pairs, spread=True):
        prompt = policy._prompt_ids(adapter.format(signature, demos=[], inputs={"question": example.question}))
        answer = policy._response_ids(adapter.format_assistant_message_content(signature, {"answer": example.answer}))
        row = ScoreRow(prompt, answer, vectors[0], with_grad=True)
        longer = ScoreRow(prompt * 3, answer, vectors[1], with_grad=True)
        alone = score_rows(policy, [row], share_prompts=False)[0]
        beside = score_rows(policy, [row, longer], share_prompts=False)[0]
        rows.append({"question": example.question[:40], "width alone": score_width([row]),
                     "width beside": score_width([row, longer]), "log-prob difference": alone.total - beside.total,
                     "gradient identical": bool(torch.equal(alone.grad, beside.grad)),
                     "relative gradient difference":
                         float((alone.grad - beside.grad).abs().max() / alone.grad.abs().max())})
    return {"rows": rows,
            "log_prob_identical_share": sum(r["log-prob difference"] == 0 for r in rows) / len(rows),
            "grad_identical_share": sum(r["gradient identical"] for r in rows) / len(rows),
            "max_relative_grad_difference": max(r["relative gradient difference"] for r in rows)}


def bench_main_job(config_name: str, actor: dict[str, Any] | None = None, limit: int | None = None,
                   concurrencies: tuple[int, ...] = (8, 16)) -> dict[str, Any]:
    """The main job's config run with ``concurrency`` 1 and with each of ``concurrencies``. ``actor``
    replaces some of the config's actor settings (another model or device) and ``limit`` its number of
    tasks; such a run is not the main job, so its results are not written as the main job's.
    ``main_job_speedup`` is at the experiment's default concurrency (``make run``'s), if measured."""
    config = experiment.load_config(config_name)
    as_configured = actor is None and limit is None
    config = {**config, "actor": {**config["actor"], **(actor or {})}, "limit": limit or config.get("limit")}
    runs = {}
    for concurrency in (1, *concurrencies):
        print(f"main job ({config_name}) with concurrency {concurrency} ...", flush=True)
        runs[concurrency] = experiment.run_experiment({**config, "concurrency": concurrency})
    sequential = runs[1]
    by_concurrency = {c: {"wall_s": runs[c]["wall_seconds"],
                          "main_job_speedup": sequential["wall_seconds"] / runs[c]["wall_seconds"],
                          **identical_turns(sequential, runs[c]), "engine": runs[c].get("engine")}
                      for c in concurrencies}
    default = experiment.DEFAULT_CONCURRENCY if experiment.DEFAULT_CONCURRENCY in runs else concurrencies[-1]
    concurrent = runs[default]
    joint = sequential["summaries"].get("joint", {}).get("seconds_per_turn", {})
    if as_configured and default == experiment.DEFAULT_CONCURRENCY:
        experiment_report.report(concurrent, config.get("name", "experiment"))  # the same run is the main job's result
    return {
        "config": config_name, "actor": config["actor"], "tasks": config.get("limit"),
        "sequential_wall_s": sequential["wall_seconds"],
        "concurrency": default,
        "concurrent_wall_s": concurrent["wall_seconds"],
        **{k: v for k, v in by_concurrency[default].items() if k not in ("wall_s", "engine")},
        "by_concurrency": by_concurrency,
        "engine_sequential": sequential.get("engine"),
        "adapt_over_generate": (joint["words"] + joint["weights"]) / joint["generate"] if joint else None,
        "joint_seconds_per_turn_sequential": joint,
        "joint_measurement_seconds_per_turn_sequential":
            sequential["summaries"].get("joint", {}).get("measurement_seconds_per_turn"),
        "joint_seconds_per_turn_concurrent": concurrent["summaries"].get("joint", {}).get("seconds_per_turn"),
        "summaries_sequential": sequential["summaries"],
        "summaries_concurrent": concurrent["summaries"],
    }


def identical_turns(sequential: dict[str, Any], concurrent: dict[str, Any]) -> dict[str, Any]:
    """``identical_share``: the share of turns whose answers are the same in both runs (a turn only one run
    took counts as different), of ``turns_compared``."""
    same = total = 0
    for mode, tasks in sequential["trajectories"].items():
        for seq_task, con_task in zip(tasks, concurrent["trajectories"][mode]):
            for seq_turn, con_turn in zip(seq_task, con_task):
                total += 1
                same += seq_turn["outputs"] == con_turn["outputs"]
            total += abs(len(seq_task) - len(con_task))
    return {"identical_share": same / total if total else None, "turns_compared": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--parts", default="generation,weights,main")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--config", default="default", help="the main job's config for the 'main' part")
    parser.add_argument("--conversations", default="1,2,4,8,16", help="concurrent conversations to time")
    parser.add_argument("--max-batch", type=int, default=None, help="the batching engine's rows per pass")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --model random:<shape>")
    parser.add_argument("--main-concurrency", default="8,16",
                        help="the 'main' part's concurrent runs (each against one sequential run)")
    parser.add_argument("--main-tasks", type=int, default=None,
                        help="the 'main' part's number of tasks (default: the config's)")
    parser.add_argument("--name", default=NAME, help="results/<name>.json")
    args = parser.parse_args(argv)
    path = RESULTS_DIR / f"{args.name}.json"
    payload: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    payload.update({"benchmark": NAME, "model": args.model, "device": args.device, "dtype": args.dtype})
    model = resolve_model(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device)
    actor = LocalLM(model, device=args.device, dtype=args.dtype, max_batch=args.max_batch)
    conversations = tuple(int(n) for n in args.conversations.split(","))
    main_concurrency = tuple(int(n) for n in args.main_concurrency.split(","))
    parts = {"generation": lambda: bench_generation(actor.policy, args.max_new_tokens, conversations),
             "weights": lambda: bench_weights(actor.policy),
             "ceiling": lambda: bench_ceiling(actor.policy),
             "width": lambda: bench_score_width(actor.policy),
             # Another model than the embedded one: the main job's conversations run on it too.
             "main": lambda: bench_main_job(args.config, limit=args.main_tasks, concurrencies=main_concurrency, actor=None if args.model == "embedded"
                                            else {"model": str(model), "device": args.device, "dtype": args.dtype})}
    for part in args.parts.split(","):
        result = parts[part]()
        payload[part] = {**result, "machine": machine_facts()}
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str))
        if "rows" in result:
            print(format_table(result["rows"]))
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, indent=1))
        print(f"wrote {path} ({part})", flush=True)


if __name__ == "__main__":
    main()
