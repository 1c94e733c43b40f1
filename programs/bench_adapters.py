"""Which DSPy adapter lets the embedded model answer: parse rate and first-turn accuracy, with the oracle row.

On the shipped intent and math tasks, with each task's experiment settings (program and actor
``max_tokens`` from ``programs/configs/default.json``, ``math_smoke.json`` or ``math.json``; greedy), every
example is answered once (a first turn, no feedback) under each adapter:

* ``chat``: :class:`~rosa2_dspy.adapter.LenientChatAdapter` (DSPy's ``[[ ## field ## ]]`` format, lenient parse);
* ``plain``: :class:`~rosa2_dspy.adapter.PlainChatAdapter` (instructions in the system turn, the question as
  a plain user message, the reply as the answer);

each with the program's original instruction and with the **oracle instruction**: the original plus the
hidden intent (intent tasks: the example's ``intent`` field; math: the expected form of the answer). The
oracle row is the ceiling of the words step: what the model does once the instruction says what the user
wants. What it still gets wrong is capability (only weights, or a bigger model, can fix it).

Per condition: the parse rate (:func:`~rosa2_dspy.adapter.answer_parsed`: an answer field found that is
not an echo of the prompt) and the first-turn accuracy (the task's verifier), each with a 95% Wilson
interval, and a paired sign test (exact binomial on the discordant examples) of plain vs chat.

Run: ``python -m programs.bench_adapters [--tasks intent math_smoke] [--limit N] [--limits math_smoke=12] [--concurrency 8]``
(on a machine shared with other torch jobs, ``OMP_NUM_THREADS=1``: oversubscribed threads slowed it ~10x).
Writes ``results/bench_adapters.json`` (machine facts, config, date, every answer).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy

from programs.experiment import PROGRAMS, load_config
from programs.reporting import write_results
from programs.tasks import MATH_FORM, load_task, oracle_text, signature_for, with_instruction_note
from rosa2_dspy.adapter import answer_parsed
from rosa2_dspy.feedback.intent import IntentVerifier
from rosa2_dspy.feedback.math import MathVerifier
from rosa2_dspy.local_lm import LocalLM, lm_scope, make_adapter

CONFIGS = {"intent": "default", "math_smoke": "math_smoke", "math": "math"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def sign_test(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """Exact two-sided binomial test on the discordant pairs (b better vs a better)."""
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"plain_only": b_only, "chat_only": a_only, "p_two_sided": p}


def answer_all(lm: dspy.BaseLM, task: str, program: str, examples: list[dspy.Example], adapter_name: str,
               oracle: bool, concurrency: int) -> list[dict[str, Any]]:
    """One first-turn answer per example under one adapter and instruction."""
    adapter = make_adapter(adapter_name)
    verifier = IntentVerifier() if task == "intent" else MathVerifier()

    def one(example: dspy.Example) -> dict[str, Any]:
        module = PROGRAMS[program](signature_for(task))
        if oracle:
            module = with_instruction_note(module, oracle_text(task, example))
        raw: list = []
        error, prediction = None, None
        with lm_scope(None, raw), dspy.context(lm=lm, adapter=adapter):
            try:
                prediction = module(**example.inputs())
            except Exception as err:  # an unparsable reply is a parse failure, not a crash of the benchmark
                error = f"{type(err).__name__}: {err}"
        answer = prediction.get("answer") if prediction is not None else None
        messages = raw[-1].messages if raw else []
        return {"question": example.question, "answer": answer, "completion": raw[-1].text if raw else None,
                "completion_tokens": raw[-1].completion_tokens if raw else 0,
                "parsed": answer_parsed(answer, example.inputs(), messages), "prediction": prediction,
                "error": error, "system": messages[0]["content"] if messages else None}

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        results = list(pool.map(one, examples))
    # Verify here, in the calling (main) thread: math-verify's timeout only works there, and without it
    # one pathological expression can stall the benchmark for minutes.
    for example, result in zip(examples, results):
        prediction = result.pop("prediction")
        result["correct"] = prediction is not None and float(verifier(example, prediction).score) >= 1.0
    return results


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("dspy").setLevel(logging.ERROR)  # DSPy's truncation warning: the budget is the config's
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["intent", "math_smoke"], choices=sorted(CONFIGS))
    parser.add_argument("--adapters", nargs="+", default=["chat", "plain"], choices=["chat", "plain"])
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--limits", nargs="*", default=[], metavar="TASK=N",
                        help="examples for one task (spread over its levels), e.g. math_smoke=12; overrides --limit")
    parser.add_argument("--concurrency", type=int, default=8, help="answers in flight (batched by LocalLM)")
    parser.add_argument("--name", default="bench_adapters")
    args = parser.parse_args(argv)

    rows, answers, settings = [], {}, {}
    lm = None
    for task in args.tasks:
        config = load_config(CONFIGS[task])
        actor = config.get("actor", {})
        if lm is None:
            lm = LocalLM(actor.get("model", "embedded"), device=actor.get("device", "cpu"),
                         dtype=actor.get("dtype", "float32"))
        task_lm = lm.copy(max_tokens=actor.get("max_tokens", 128), temperature=0.0)
        program = config.get("program", "predict")
        limit = dict(item.split("=") for item in args.limits).get(task, args.limit)
        limit = int(limit) if limit is not None else None
        examples = load_task(task, limit=limit, spread=limit is not None)
        settings[task] = {"config": CONFIGS[task], "program": program, "max_tokens": actor.get("max_tokens"),
                          "examples": len(examples), "temperature": 0.0}
        correct_by: dict[tuple[str, str], list[bool]] = {}
        for oracle in (False, True):
            for adapter_name in args.adapters:
                instruction = "oracle" if oracle else "original"
                start = time.perf_counter()
                results = answer_all(task_lm, task, program, examples, adapter_name, oracle, args.concurrency)
                wall = time.perf_counter() - start
                n = len(results)
                parsed = sum(r["parsed"] for r in results)
                correct = sum(r["correct"] for r in results)
                correct_by[(adapter_name, instruction)] = [r["correct"] for r in results]
                answers[f"{task}/{adapter_name}/{instruction}"] = results
                rows.append({
                    "task": task, "program": program, "adapter": adapter_name, "instruction": instruction, "n": n,
                    "parse_rate": parsed / n, "parse_ci95": [round(x, 3) for x in wilson(parsed, n)],
                    "accuracy": correct / n, "accuracy_ci95": [round(x, 3) for x in wilson(correct, n)],
                    "mean_completion_tokens": sum(r["completion_tokens"] for r in results) / n,
                    "errors": sum(1 for r in results if r["error"]), "wall_s": wall,
                })
                print(f"{task} {adapter_name} {instruction}: parsed {parsed}/{n}, correct {correct}/{n} "
                      f"({wall:.0f}s)", flush=True)
        if {"chat", "plain"} <= set(args.adapters):
            settings[task]["plain_vs_chat_accuracy"] = {
                ins: sign_test(correct_by[("chat", ins)], correct_by[("plain", ins)]) for ins in ("original", "oracle")}
        save(args, rows, settings, answers)  # after each task, so a long run keeps what it has
    for task, info in settings.items():
        if "plain_vs_chat_accuracy" in info:
            print(f"{task}: plain vs chat, paired sign test on accuracy: {info['plain_vs_chat_accuracy']}")


def save(args: argparse.Namespace, rows: list, settings: dict, answers: dict) -> None:
    columns = ["task", "program", "adapter", "instruction", "n", "parse_rate", "parse_ci95", "accuracy",
               "accuracy_ci95", "mean_completion_tokens", "errors", "wall_s"]
    write_results(args.name, rows, extra={"config": {"tasks": settings, "adapters": args.adapters,
                                                     "concurrency": args.concurrency, "math_oracle": MATH_FORM,
                                                     "intent_oracle": "The user wants {intent}."},
                                          "answers": answers}, columns=columns)


if __name__ == "__main__":
    main()
