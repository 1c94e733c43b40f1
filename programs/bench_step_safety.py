"""Benchmark: when does a weights step wreck the model? Calibrates ``ROSAStep(max_kl=...)``.

For each of a few arithmetic questions (``programs/data/math_smoke.jsonl``) the embedded model answers; a user
reveals the answer; one ROSA step (β = 0.05, the main job's setting, trust region opened wide) is
computed from the model's answer (reward 0) and the revealed one (reward 1). The step's *direction* is
then scaled to several lengths ‖Δθ‖, and for each length we measure

* ``kl``: the mean per-token KL between the model's next-token predictions before and after the step,
  over the turn's own prompt and answer (what the weights step's check bounds), and
* whether the answers to the turn's question and to two *other* questions are :func:`degenerate`
  (non-text characters, repetition) after the step.

The table shows at which KL answers turn into babble; ``DEFAULT_MAX_KL`` in ``rosa2_dspy/weights.py``
is chosen below that.

``--part conversations`` runs whole joint-mode conversations where the issue saw a wreck (the math
config, β = 0.05, trust region 2.0, the answer revealed after the first feedback) twice: without the
check (``max_kl=None``) and with the default, and reports per run how many conversations ended in
degenerate output, how many turns had non-text output, and how often steps were halved or rolled back.

Run: ``python -m programs.bench_step_safety [--part scaling|conversations]``
(writes results/bench_step_safety.json, each part under its own key).
"""

from __future__ import annotations

import argparse
import json
import time

from programs import experiment
from programs.reporting import RESULTS_DIR, format_table, machine_facts
from programs.tasks import load_task
from rosa2_dspy.policy import LoRAPolicy
from rosa2_dspy.records import degenerate
from rosa2_dspy.weights import DEFAULT_MAX_KL, ROSAStep, ScoredResponse

INSTRUCTION = "Given the fields `question`, produce the fields `answer`."
NORMS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}]


def conversations(limit: int) -> dict:
    config = experiment.load_config("math_smoke")
    config.update({"name": "step_safety", "modes": ["joint"], "limit": limit,
                   "feedback": {"reveal": "answer", "reveal_after": 1}})
    runs = {}
    for label, max_kl in (("no check", None), (f"max_kl={DEFAULT_MAX_KL}", DEFAULT_MAX_KL)):
        config["weights"] = {"beta": 0.05, "ridge": 0.001, "max_norm": 2.0, "max_kl": max_kl}
        print(f"joint-mode conversations, {label} ...", flush=True)
        result = experiment.run_experiment(dict(config))
        turns = [r for t in result["trajectories"]["joint"] for r in t]
        steps = [r["weights"] for r in turns if r["weights"] and r["weights"]["method"] == "rosa"]
        runs[label] = {
            "conversations": len(result["trajectories"]["joint"]),
            "ended degenerate": result["summaries"]["joint"]["degenerate_final"],
            "turns with non-text output": sum(1 for r in turns if any(
                isinstance(v, str) and degenerate(v) == "non-text characters" for v in r["outputs"].values())),
            "turns": len(turns),
            "steps halved": sum(1 for w in steps if w.get("backtracks")),
            "steps rolled back": sum(1 for w in steps if "rolled back" in w.get("reason", "")),
            "max step kl": max((w["kl"] for w in steps if w.get("kl") is not None), default=None),
            "final accuracy": result["summaries"]["joint"]["final_accuracy"],
            "trajectories": result["trajectories"]["joint"],
        }
    rows = [{"run": k, **{c: v for c, v in r.items() if c != "trajectories"}} for k, r in runs.items()]
    print(format_table(rows))
    return {"rows": rows, "config": config, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("scaling", "conversations"), default="scaling")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=9, help="conversations per run (part conversations)")
    args = parser.parse_args(argv)
    if args.part == "conversations":
        save("conversations", conversations(args.limit))
        return
    start = time.perf_counter()
    policy = LoRAPolicy.from_pretrained("embedded")
    examples = load_task("math_smoke", spread=True)
    theta0 = policy.initial_adapter_vector
    step = ROSAStep(beta=0.05, max_norm=1e6, max_kl=None)
    rows = []
    for q in range(args.questions):
        example, others = examples[q], [examples[(q + k) % len(examples)] for k in (5, 11)]
        answer = policy.generate(chat(example.question), max_new_tokens=args.max_tokens, adapter=theta0)[0]
        record = step.step(policy, [ScoredResponse(chat(example.question), answer, 0.0),
                                    ScoredResponse(chat(example.question), example.answer, 1.0, "reference")],
                           apply=False, adapter=theta0)
        if record.delta is None:
            print(f"question {q}: no step ({record.reason})")
            continue
        direction = record.delta / record.delta.norm()
        for norm in NORMS:
            after = theta0 + norm * direction
            kl = policy.divergence([(chat(example.question), answer)], theta0, after)[0]
            texts = [policy.generate(chat(e.question), max_new_tokens=args.max_tokens, adapter=after)[0]
                     for e in [example, *others]]
            flags = [degenerate(t) for t in texts]
            rows.append({"question": q, "raw ‖Δθ‖": record.raw_delta_norm, "‖Δθ‖": norm, "kl": kl,
                         "degenerate answers (of 3)": sum(1 for f in flags if f),
                         "answer after": texts[0][:60].replace("\n", " ")})
            print(format_table(rows[-1:]), flush=True)
    wrecked = [r["kl"] for r in rows if r["degenerate answers (of 3)"]]
    fine = [r["kl"] for r in rows if not r["degenerate answers (of 3)"]]
    summary = {
        "default_max_kl": DEFAULT_MAX_KL,
        "smallest_kl_with_degenerate_answers": min(wrecked) if wrecked else None,
        "largest_kl_without": max(fine) if fine else None,
        "steps_over_default_that_wrecked": sum(1 for k in wrecked if k > DEFAULT_MAX_KL),
        "steps_under_default_that_wrecked": sum(1 for k in wrecked if k <= DEFAULT_MAX_KL),
        "seconds": time.perf_counter() - start,
    }
    print(format_table(rows))
    print(summary)
    save("scaling", {"rows": rows, "summary": summary, "config": {
        "questions": args.questions, "max_tokens": args.max_tokens, "beta": 0.05, "norms": NORMS,
        "instruction": INSTRUCTION, "model": "embedded"}})


def save(part: str, result: dict) -> None:
    """Each part under its own key of results/bench_step_safety.json; the other part is kept."""
    path = RESULTS_DIR / "bench_step_safety.json"
    payload = json.loads(path.read_text()) if path.is_file() else {"benchmark": "bench_step_safety"}
    payload[part] = {**result, "machine": machine_facts()}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path} ({part})")


if __name__ == "__main__":
    main()
