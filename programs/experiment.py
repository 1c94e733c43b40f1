"""The mode-comparison experiment: every mode of the spec on the same program, task and feedback source.

For each mode (static, prompt-only, param-only, switch, joint) and each task example, ROSA2 runs one
interaction from the original instruction and the initial adapter (a fresh session) until the
feedback source says it is solved or ``max_turns`` is reached. Per mode it reports accuracy per turn,
turns-to-solve, correction uplift, mean ``‖Δθ‖`` and seconds per phase; the joint mode also computes
each weights step under the *original* words (not applied) for the Theorem 4.1 comparison
``‖Δθ(x*)‖ < ‖Δθ(x)‖``. Results: a table on stdout, ``results/<name>.json`` (with every turn record)
and ``results/<name>.png`` (accuracy over turns, like the paper's Figure 2a).

Configuration is a JSON file (``programs/configs/*.json``) so LMs are swapped by name, not code::

    {"name": "...", "task": "intent", "limit": 8, "spread": false, "program": "predict", "modes": [...],
     "max_turns": 4, "concurrency": 8,
     "actor": {"model": "embedded", "device": "cpu", "dtype": "float32", "max_tokens": 64,
               "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
     "refiner": {"lm": "actor", "fallback": "append", "max_tokens": 96},
     "weights": {"beta": 0.5, "ridge": 0.001, "max_norm": 1.0},
     "feedback": {"reveal": "hint", "reveal_after": 2}}

``actor.model`` is ``"embedded"``, a checkpoint folder or a hub id (a :class:`LocalLM`), or a litellm
model string prefixed ``"litellm:"`` for a served actor (then only ``static`` and ``prompt-only`` run).
``refiner.lm`` is ``"actor"`` or any litellm model string.

``concurrency`` (default 8; ``--concurrency``) is how many conversations run at once: every (mode, task)
interaction is a call of ``ROSA2.interact`` on a thread pool, the way a user serves many users from one
instance, so a local actor batches them. Each interaction starts from θ0 and the original words in a
session of its own, so the records equal the sequential run's (``--concurrency 1``) up to the last bits
of batched float sums (see ``programs.bench_sessions``, which measures both).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dspy
from tqdm import tqdm

from programs.reporting import write_results
from programs.tasks import feedback_for, load_task, signature_for
from rosa2_dspy import MODES, ROSA2, LocalLM, LoRASettings, ROSAStep, summarize

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROGRAMS = {"predict": dspy.Predict, "cot": dspy.ChainOfThought}
SERVED_MODES = ("static", "prompt-only")


def load_config(path_or_name: str) -> dict[str, Any]:
    """A config by file path or by name under ``programs/configs`` (``default`` -> ``default.json``)."""
    path = Path(path_or_name)
    if not path.is_file():
        path = CONFIG_DIR / f"{path_or_name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"No config {path_or_name!r}; give a JSON file or one of {known}.")
    return json.loads(path.read_text())


def build_actor(actor: dict[str, Any]) -> dspy.BaseLM:
    model = actor.get("model", "embedded")
    if model.startswith("litellm:"):
        return dspy.LM(model.removeprefix("litellm:"), max_tokens=actor.get("max_tokens", 256), temperature=0.0)
    lora = LoRASettings(**actor["lora"]) if "lora" in actor else None
    return LocalLM(model, device=actor.get("device", "cpu"), dtype=actor.get("dtype", "float32"), lora=lora,
                   max_tokens=actor.get("max_tokens", 128))


def build_refiner(refiner: dict[str, Any], actor: dspy.BaseLM) -> dspy.BaseLM:
    name = refiner.get("lm", "actor")
    if name == "actor":
        return actor.copy(max_tokens=refiner.get("max_tokens", 128))
    return dspy.LM(name, max_tokens=refiner.get("max_tokens", 512), temperature=0.0)


def theorem_41(trajectories: list[list[Any]]) -> dict[str, Any]:
    """Pairs (‖Δθ‖ under refined words, under original words) of the same feedback, unclipped."""
    pairs = [
        (r.weights["raw_delta_norm"], r.delta_norm_original_words)
        for t in trajectories for r in t
        if r.weights and r.delta_norm_original_words is not None and r.weights.get("raw_delta_norm")
    ]
    if not pairs:
        return {"pairs": 0}
    return {
        "pairs": len(pairs),
        "mean_refined": statistics.mean(p[0] for p in pairs),
        "mean_original": statistics.mean(p[1] for p in pairs),
        "share_refined_smaller": sum(1 for a, b in pairs if a < b) / len(pairs),
        "mean_ratio_refined_over_original": statistics.mean(a / b for a, b in pairs if b > 0),
    }


def build_modes(config: dict[str, Any], actor: dspy.BaseLM, task: str) -> dict[str, ROSA2]:
    """One ROSA2 instance per mode, all on the same actor (so their model work shares batched passes)."""
    served = not isinstance(actor, LocalLM)
    modes = config.get("modes", list(SERVED_MODES if served else MODES))
    if served and set(modes) - set(SERVED_MODES):
        raise ValueError(f"A served actor cannot update weights; use modes from {SERVED_MODES}, got {modes}.")
    refiner_lm = build_refiner(config.get("refiner", {}), actor)
    feedback = feedback_for(task, **config.get("feedback", {}))
    return {
        mode: ROSA2(
            PROGRAMS[config.get("program", "predict")](signature_for(task)),
            actor,
            feedback,
            mode=mode,
            refiner_lm=refiner_lm,
            refiner_fallback=config.get("refiner", {}).get("fallback", "keep"),
            weights=ROSAStep(**config.get("weights", {})),
            max_turns=config.get("max_turns", 4),
            switch_patience=config.get("switch_patience", 1),
            compare_words=(mode == "joint"),
        )
        for mode in modes
    }


def run_experiment(config: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run every configured mode; returns {"config", "summaries", "theorem_4_1", "trajectories", "wall_seconds"}.

    The actor is built from ``config["actor"]`` for each run, so a results file always describes the
    model settings (``max_tokens``, LoRA shape) its answers were produced with.
    """
    task = config.get("task", "intent")
    examples = load_task(task, limit=config.get("limit"), spread=config.get("spread", False))
    actor = build_actor(config.get("actor", {}))
    modules = build_modes(config, actor, task)
    max_turns = config.get("max_turns", 4)
    jobs = [(mode, i) for mode in modules for i in range(len(examples))]
    results: dict[tuple[str, int], Any] = {}

    def converse(job: tuple[str, int]) -> Any:
        mode, i = job
        result = modules[mode].interact(examples[i])
        modules[mode].end_session(result.rosa2.session_id)  # every interaction starts from θ0 and the original words
        return result

    start = time.perf_counter()
    with tqdm(total=len(jobs), desc="conversations", disable=not progress) as bar, \
            ThreadPoolExecutor(max(1, int(config.get("concurrency", 8)))) as pool:
        for job, result in zip(jobs, pool.map(converse, jobs)):
            results[job] = result
            bar.update()
    wall = time.perf_counter() - start
    summaries, trajectories, theorem = {}, {}, {}
    for mode in modules:
        runs = [results[(mode, i)].rosa2.trajectory for i in range(len(examples))]
        summaries[mode] = summarize(runs, max_turns)
        trajectories[mode] = [[r.to_dict() for r in t] for t in runs]
        if mode == "joint":
            theorem = theorem_41(runs)
    return {"config": config, "summaries": summaries, "theorem_4_1": theorem, "trajectories": trajectories,
            "wall_seconds": wall}


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode, s in summaries.items():
        row: dict[str, Any] = {"mode": mode}
        row.update({f"acc@{k + 1}": a for k, a in enumerate(s["accuracy_per_turn"])})
        row.update({
            "turns-to-solve": s["turns_to_solve"],
            "mean turns": s["mean_turns"],
            "correction uplift": s["correction_uplift"],
            "mean |Δθ|": s["mean_delta_norm"],
            "degenerate at end": s["degenerate_final"],
            **{f"{p} s/turn": v for p, v in s["seconds_per_turn"].items()},
        })
        rows.append(row)
    return rows


def plot_accuracy(summaries: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, s in summaries.items():
        turns = range(1, len(s["accuracy_per_turn"]) + 1)
        ax.plot(turns, s["accuracy_per_turn"], marker="o", label=mode, linewidth=2.5 if mode == "joint" else 1.5)
    ax.set_xlabel("turn")
    ax.set_ylabel("accuracy (solved by this turn)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(list(turns))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(results: dict[str, Any], name: str) -> dict[str, Path]:
    """Print the table, write JSON and the accuracy-over-turns plot under ``results/``."""
    rows = table_rows(results["summaries"])
    json_path = write_results(name, rows, extra={k: v for k, v in results.items()})
    config = results["config"]
    plot = plot_accuracy(results["summaries"], json_path.with_suffix(".png"),
                         f"{config.get('task', 'intent')} · {config.get('actor', {}).get('model', 'embedded')}")
    theorem = results["theorem_4_1"]
    if theorem.get("pairs"):
        print(f"\nTheorem 4.1 (joint mode, {theorem['pairs']} steps): mean ‖Δθ(x*)‖ = {theorem['mean_refined']:.4g}"
              f" vs ‖Δθ(x)‖ = {theorem['mean_original']:.4g}; refined smaller in "
              f"{100 * theorem['share_refined_smaller']:.0f}% of steps")
    print(f"wrote {plot}")
    return {"json": json_path, "plot": plot}


def main(argv: list[str] | None = None) -> None:
    # Answers are capped at actor.max_tokens on purpose; DSPy's per-call truncation warning is noise here.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="config name in programs/configs or a JSON path")
    parser.add_argument("--limit", type=int, default=None, help="override the number of tasks")
    parser.add_argument("--modes", default=None, help="comma-separated subset of modes")
    parser.add_argument("--max-turns", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None, help="conversations at once (1: sequential)")
    parser.add_argument("--name", default=None, help="results file name (default: the config's name)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.limit is not None:
        config["limit"] = args.limit
    if args.modes:
        config["modes"] = args.modes.split(",")
    if args.max_turns is not None:
        config["max_turns"] = args.max_turns
    if args.concurrency is not None:
        config["concurrency"] = args.concurrency
    results = run_experiment(config)
    report(results, args.name or config.get("name", "experiment"))


if __name__ == "__main__":
    main()
