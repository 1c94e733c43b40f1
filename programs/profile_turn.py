"""Profile of a joint-mode turn's weights work: what each model pass costs, on real conversation states.

Runs the main job's config (``--config``, default ``programs/configs/default.json``) in joint mode on its
task until ``--states`` weights steps are recorded (turns 1, 2, ... of a conversation: the responses and the
adapter each step started from, under the refined words and, for the Theorem 4.1 comparison that the main
job's joint mode makes every turn, under the original words). Then, per state, it times (best of
``--repeats``, all in this one run, so compare phases by their ratios):

* the passes of the step as it was before the KL check rode on them (``rosa2_dspy.weights`` before this
  script): ``grad`` (one forward + backward over the n responses), ``kl`` (``policy.divergence``: a forward
  of two rows per anchor, before and after) and ``after`` (a forward over the n responses under the new
  adapter, ``logprob_after``); ``old step`` is their sum;
* ``step``: ``ROSAStep.step`` as it is now (grad pass keeping the anchors' hidden states, then one forward
  under the new adapter giving ``logprob_after`` and the KL together), and ``step, no measure_after``;
* ``compare_words``: the dry-run step under the original words (``ROSA2(compare_words=True)``), and
  ``grad, both words in one pass``: the two gradient passes as one batched pass over 2n rows;
* for prefix sharing (every response of a step answers the same prompt): ``forward`` (no gradient, the n
  rows), ``forward shared prefix`` (the prompt once, then the n responses on its KV cache; plain PEFT
  model, the same adapter for all rows), and the gradient pass's own forward (``grad forward``).

Run: ``python -m programs.profile_turn [--states 4 --repeats 3 --cache states.pt]``; writes
``results/profile_turn.json``. ``--cache`` keeps the recorded states, so a second run profiles them again
without running the conversations.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from programs import experiment
from programs.reporting import write_results
from programs.tasks import load_task
from rosa2_dspy.policy import LoRAPolicy
from rosa2_dspy.weights import ROSAStep, ScoredResponse


def capture_states(config: dict[str, Any], wanted: int) -> tuple[Any, list[dict[str, Any]]]:
    """Run joint-mode conversations until ``wanted`` weights steps were taken; record what each started from."""
    actor = experiment.build_actor(config["actor"])
    rosa2 = experiment.build_modes({**config, "modes": ["joint"]}, actor, config["task"])["joint"]
    states: list[dict[str, Any]] = []
    step = rosa2.weights.step

    def recording(policy, responses, apply=True, adapter=None):
        record = step(policy, responses, apply=apply, adapter=adapter)
        states.append({"responses": list(responses), "adapter": torch.as_tensor(adapter).clone(), "apply": apply,
                       "applied": record.applied})
        return record

    rosa2.weights.step = recording
    for example in load_task(config["task"], limit=config.get("limit"), spread=config.get("spread", False)):
        result = rosa2.interact(example)
        for record in result.rosa2.trajectory:
            print(f"turn {record.turn}: reward {record.reward}, times "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in record.times.items()), flush=True)
        if sum(s["apply"] for s in states) >= wanted:
            break
    steps, dry_runs = [], []
    for state in states:  # a dry run (original words) comes right before its turn's step
        (steps if state["apply"] else dry_runs).append(state)
        if state["apply"]:
            state["original"] = dry_runs.pop()["responses"] if dry_runs else None
    return actor, steps


def best_of(repeats: int, phases: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """The fastest of ``repeats`` runs of each phase; the phases take turns, so a burst of load elsewhere
    hits them alike rather than one phase's every run."""
    times: dict[str, float] = {}
    for _ in range(repeats):
        for name, run in phases.items():
            start = time.perf_counter()
            run()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    return times


def pairs_of(responses: list[ScoredResponse]) -> list[tuple[Any, str]]:
    return [(r.messages, r.completion) for r in responses]


def shared_prefix_forward(policy: LoRAPolicy, responses: list[ScoredResponse]) -> Callable[[], None] | None:
    """A forward of the shared prompt once and the n responses on its KV cache (None if prompts differ)."""
    prompts = [policy._prompt_ids(r.messages) for r in responses]
    if any(p != prompts[0] for p in prompts):
        return None
    answers = [policy._response_ids(r.completion) for r in responses]
    width = max(len(a) for a in answers)
    ids = torch.tensor([a + [policy.tokenizer.pad_token_id] * (width - len(a)) for a in answers])
    prefix = torch.tensor([prompts[0]])
    model = policy.model

    @torch.no_grad()
    def run() -> None:
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(answers))
        positions = torch.arange(prefix.shape[1], prefix.shape[1] + width)[None].expand(len(answers), -1)
        model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True)

    return run


@torch.no_grad()
def full_forward(policy: LoRAPolicy, responses: list[ScoredResponse]) -> Callable[[], None]:
    """The same rows as separate right-padded sequences on the plain PEFT model (the comparison for the above)."""
    rows = [policy._prompt_ids(r.messages) + policy._response_ids(r.completion) for r in responses]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [policy.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    return torch.no_grad()(lambda: policy.model(input_ids=ids, use_cache=False))


def grad_forward(policy: LoRAPolicy, responses: list[ScoredResponse], adapter: torch.Tensor) -> Callable[[], None]:
    """The gradient pass's forward alone (graph built, no backward)."""
    from rosa2_dspy.engine import _stack_adapters

    rows = [policy._prompt_ids(r.messages) + policy._response_ids(r.completion) for r in responses]
    width = -(-max(len(r) for r in rows) // 32) * 32
    ids = torch.tensor([r + [policy.tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    def run() -> None:
        adapters = _stack_adapters([adapter] * len(rows), policy.device).requires_grad_(True)
        with policy.multi_lora.active(adapters):
            policy.causal_lm.get_decoder()(input_ids=ids).last_hidden_state.sum()

    return run


def profile_state(policy: LoRAPolicy, weights: dict[str, Any], state: dict[str, Any], repeats: int) -> dict[str, Any]:
    responses, before = state["responses"], state["adapter"]
    pairs = pairs_of(responses)
    rosa = ROSAStep(**weights)
    step = rosa.step(policy, responses, adapter=before)
    after = step.adapter if step.applied else before + rosa.solve(
        torch.stack([lp.grad for lp in policy.logprobs(pairs, with_grad=True, adapter=before)]),
        rosa.advantages(responses)).float()
    anchors = [pairs[i] for i in rosa._anchors(responses)]
    phases = {
        "grad": lambda: policy.logprobs(pairs, with_grad=True, adapter=before),
        "kl": lambda: policy.divergence(anchors, before, after),
        "after": lambda: policy.logprobs(pairs, adapter=after),
        "step": lambda: ROSAStep(**weights).step(policy, responses, adapter=before),
        "step, no measure_after": lambda: ROSAStep(**weights, measure_after=False).step(policy, responses,
                                                                                          adapter=before),
        "forward": full_forward(policy, responses),
        "grad forward": grad_forward(policy, responses, before),
    }
    shared = shared_prefix_forward(policy, responses)
    if shared is not None:
        phases["forward shared prefix"] = shared
    if state.get("original"):
        original = pairs_of(state["original"])
        phases["compare_words"] = lambda: ROSAStep(**weights).step(policy, state["original"], apply=False,
                                                                   adapter=before)
        phases["grad, both words in one pass"] = lambda: policy.logprobs(pairs + original, with_grad=True,
                                                                         adapter=before)
    times = best_of(repeats, phases)
    times["old step"] = times["grad"] + times["kl"] + times["after"]
    prompt = len(policy._prompt_ids(responses[0].messages))
    return {
        "conversation turn": sum(r.source != "reference" for r in responses),  # one answer per turn (Predict)
        "responses": len(responses), "prompt tokens": prompt,
        "response tokens": [len(policy._response_ids(r.completion)) for r in responses],
        "backtracks": step.backtracks, "applied": step.applied, **{f"{k} s": v for k, v in times.items()},
        "step / old step": times["step"] / times["old step"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--states", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", help="a file to keep the recorded states in (reused when it exists)")
    args = parser.parse_args(argv)
    config = experiment.load_config(args.config)
    if args.cache and Path(args.cache).is_file():  # the states of an earlier run: profile again without the conversations
        actor = experiment.build_actor(config["actor"])
        states = [{**s, "responses": [ScoredResponse(**r) for r in s["responses"]],
                   "original": s["original"] and [ScoredResponse(**r) for r in s["original"]]}
                  for s in torch.load(args.cache)][: args.states]
    else:
        actor, states = capture_states(config, args.states)
        if args.cache:  # every recorded state, also those past --states
            torch.save([{**s, "responses": [dataclasses.asdict(r) for r in s["responses"]],
                         "original": s["original"] and [dataclasses.asdict(r) for r in s["original"]]}
                        for s in states], args.cache)
        states = states[: args.states]
    rows = []
    for turn, state in enumerate(states, 1):
        rows.append({"state": turn, **profile_state(actor.policy, config.get("weights", {}), state, args.repeats)})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    ratios = {key: statistics.median(r[key] for r in rows if key in r)
              for key in ("step / old step",)}
    totals = {key: sum(r[key] for r in rows if key in r) for key in rows[0] if key.endswith(" s")}
    write_results("profile_turn", rows, extra={"config": args.config, "repeats": args.repeats,
                                              "median": ratios, "sum over turns (s)": totals},
                  columns=["state", "conversation turn", "responses", "prompt tokens", "grad s", "kl s", "after s", "old step s", "step s",
                           "step, no measure_after s", "compare_words s", "forward s", "forward shared prefix s",
                           "grad forward s", "step / old step"])


if __name__ == "__main__":
    main()
