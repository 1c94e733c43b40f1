"""The mode-comparison experiment: every mode of the spec on the same program, task and feedback source.

For each mode (static, prompt-only, param-only, switch, joint) and each task example, ROSA2 runs one
interaction from the original instruction and the initial adapter (a fresh session) until the
feedback source says it is solved or ``max_turns`` is reached. Per mode it reports accuracy per turn,
turns-to-solve, correction uplift, mean ``‖Δθ‖`` and seconds per phase. Results: a table on stdout, ``results/<name>.json`` (with every turn record)
and ``results/<name>.png`` (accuracy over turns, like the paper's Figure 2a).

Configuration is a JSON file (``programs/configs/*.json``) so LMs are swapped by name, not code::

    {"name": "...", "task": "intent", "limit": 8, "spread": false, "program": "predict", "modes": [...],
     "split": "test", "seed": 0,
     "max_turns": 4, "concurrency": 8,
     "actor": {"model": "embedded", "device": "cpu", "dtype": "float32", "max_tokens": 64,
               "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
     "refiner": {"lm": "actor", "fallback": "append", "max_tokens": 96},
     "weights": {"beta": 0.5, "ridge": 0.001, "max_norm": 1.0},
     "protocol": "answer", "feedback": {"reveal_after": 1}}

``actor.model`` is ``"embedded"``, a checkpoint folder or a hub id (a :class:`LocalLM`), or a litellm
model string prefixed ``"litellm:"`` for a served actor (then only ``static`` and ``prompt-only`` run).
``refiner.num_demos`` (optional, default 4) is how many shipped demos the refiner shows per call;
``weights.max_history`` (optional) keeps at most that many earlier answers in a ROSA step (``ROSAStep``).
``refiner.lm`` is ``"actor"`` or any litellm model string. ``actor.adapter`` (optional) is the DSPy adapter,
``"plain"`` or ``"chat"``; without it a local actor uses ``LocalLM``'s default (``DEFAULT_ADAPTER``) and a
served one ``LenientChatAdapter``. ``actor.max_batch`` (optional) is a local actor's most rows per pass
(``LocalLM(max_batch=...)``, default 16).

``compare_words`` (default true) makes the joint mode compute each weights step under the original words too
(the Theorem 4.1 comparison): one more gradient pass per turn, as costly as the step's own (see
``programs.profile_turn``), timed apart (``compare_words``), not as adaptation; false skips it.

``split`` and ``seed`` (generated tasks only: ``math``, see ``programs.mathgen``; ``intentgen``, which also
takes ``per_kind``) pick the problems: ``split`` ``"test"`` (what the shipped configs report on) or ``"dev"``
(for tuning); ``limit`` is their number. Examples that carry ``steps`` (the generated math problems) are also reported by step
count: ``results["by_steps"][mode][steps]`` is the share solved by the last turn, with its interval.

``concurrency`` (default 16; ``--concurrency``) is how many conversations run at once: every (mode, task)
interaction is a call of ``ROSA2.interact`` on a thread pool, the way a user serves many users from one
instance, so a local actor batches them. Each interaction starts from θ0 and the original words in a
session of its own, so the records equal the sequential run's (``--concurrency 1``) up to the last bits
of batched float sums (see ``programs.bench_sessions``, which measures both).

**Feedback protocol.** ``protocol`` names what the simulated user gives away (see
``rosa2_dspy.feedback.simulated_user``): ``none`` (only "wrong" and the verifier's message), ``hint``
(also a hint or the hidden intent, never the answer), ``answer`` (also the reference from turn
``feedback.reveal_after`` on, which the weights step may use: "learning a revealed answer"). An older
config's ``feedback.reveal``/``reveal_after`` is named by the protocol it amounts to. The protocol is in
the results JSON and the table title; ``--protocol`` overrides the config's.

**Oracle row.** With ``"oracle": true`` the run adds a row ``oracle``: per task, the first answer of the
static program whose instruction has the hidden intent written in (``programs.tasks.oracle_text``), scored
by the same simulated user: the ceiling the words step can reach with this model (acc@1 only, with its
interval, and compared with static's first answer on the same tasks). What it misses is capability, not intent.

**Generated tasks.** ``task: "intentgen"`` reads ``programs.intentgen`` (``split``: ``dev`` or ``test``,
default ``test``; ``seed``; ``per_kind``): reported runs use ``test``, tuning uses ``dev``.

**Statistics.** Each mode's acc@k, turns-to-solve, mean turns and correction uplift carry a seeded 95%
bootstrap interval over tasks, and every pair of modes is compared on the same tasks (solved by the
last turn: paired bootstrap interval of the difference and the exact McNemar p); see
``rosa2_dspy.stats``. Tables print ``value [low, high]``; the plot draws the intervals as error bars.

**Theorem 4.1.** On every joint-mode turn (words and weights both move) the run measures the theorem
as stated (``rosa2_dspy.theorem41``): the smallest parameter shift that raises ``log π(reference | context)``
by ``δ`` nats (config ``theorem41_delta``, default 1), under the original words ``x`` and the refined words
``x*``, at the adapter the step starts from. ``theorem_4_1`` in the JSON holds the distribution of
``‖Δθ(x*)‖/‖Δθ(x)‖`` (quartiles), the share below 1 and the mean log-ratio with 95% intervals clustered by
conversation, and the skipped turns by reason. ``"measure_theorem41": false`` switches it off (it costs
one gradient pass over the reference under both contexts per adapted turn). ``step_norm_comparison``
holds the older check under its own name: ROSA's *own* step computed under both contexts
(``‖Δθ‖`` of the step under the original words, not applied), which reflects reward-driven targets, not
the shift a fixed gain needs. Files written before the rename hold that older check under
``theorem_4_1``; ``--reanalyse`` rewrites them with both keys.

**Long runs.** Each finished conversation is appended (and flushed) to ``results/<name>.partial.jsonl``,
whose first line holds the hash of the config and the tasks. A rerun with the same config reads the
finished conversations back and runs only the rest (the records equal an uninterrupted run's); a
different config is refused unless ``--fresh`` discards them. The progress bar counts conversations and
shows the time left; the progress file is removed once the results file is written. If a conversation
fails, none starts after it and those in flight are kept; on Ctrl-C those in flight are lost (a rerun
runs them again).

**On a Ray cluster.** ``--ray [ADDRESS]`` (or the config's ``"ray": {"address": null, "chunk": 8}``) runs the
grid's cells (one mode × a chunk of tasks each) as Ray tasks, on a local Ray started for the run or on the
cluster at ``ADDRESS``; each worker builds its own actor from the config, and the driver appends every
returned conversation to the same progress file, so resume and the records are the local run's (see
``programs.grid``; needs the ``ray`` extra).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import dspy
from tqdm import tqdm

from programs.experiment_report import report
from programs.progress import (ConfigMismatchError, ProgressFile, config_hash, decode_trajectory, encode_trajectory,
                               progress_path_for)
from programs.tasks import (ORACLE, feedback_for, load_task, oracle_text, resolve_protocol, signature_for,
                            with_instruction_note)
from rosa2_dspy import MODES, ROSA2, LocalLM, LoRASettings, ROSAStep, summarize
from rosa2_dspy.feedback.simulated_user import PROTOCOLS
from rosa2_dspy.records import TurnRecord
from rosa2_dspy.stats import METHOD, accuracy_by_group, compare_modes
from rosa2_dspy.theorem41 import DEFAULT_DELTA, summarize_shifts
from rosa2_dspy.local_lm import make_adapter

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROGRAMS = {"predict": dspy.Predict, "cot": dspy.ChainOfThought}
SERVED_MODES = ("static", "prompt-only")
# Conversations at once. On the 2-core CPU 16 ran the main job no faster than 8 while joining or leaving a
# running decode copied every row's KV cache; since rows move in place, 16 is faster (results/bench_sessions.json,
# main.by_concurrency). The model is busy nearly all the time either way.
DEFAULT_CONCURRENCY = 16


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
                   max_tokens=actor.get("max_tokens", 128), adapter=actor.get("adapter"), max_batch=actor.get("max_batch"))


def build_refiner(refiner: dict[str, Any], actor: dspy.BaseLM) -> dspy.BaseLM:
    name = refiner.get("lm", "actor")
    if name == "actor":
        return actor.copy(max_tokens=refiner.get("max_tokens", 128))
    return dspy.LM(name, max_tokens=refiner.get("max_tokens", 512), temperature=0.0)


def step_norm_comparison(trajectories: list[list[Any]]) -> dict[str, Any]:
    """ROSA's own step under the refined and under the original words, on the same feedback (unclipped
    norms): pairs (``raw_delta_norm``, ``delta_norm_original_words``). Not Theorem 4.1's quantity (see
    :func:`theorem_41`): ROSA's targets come from the rewards, not from a fixed gain."""
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


def theorem_41(trajectories: list[list[Any]]) -> dict[str, Any]:
    """Theorem 4.1 as stated: the distribution of ``‖Δθ(x*)‖/‖Δθ(x)‖``, the minimal shifts that raise
    ``log π(reference | context)`` by the same δ (see :func:`rosa2_dspy.theorem41.summarize_shifts`)."""
    return summarize_shifts(trajectories)


def mode_names(config: dict[str, Any]) -> list[str]:
    """The modes a config runs (a served actor runs only the modes that leave the weights alone)."""
    served = str(config.get("actor", {}).get("model", "embedded")).startswith("litellm:")
    modes = list(config.get("modes", list(SERVED_MODES if served else MODES)))
    if served and set(modes) - set(SERVED_MODES):
        raise ValueError(f"A served actor cannot update weights; use modes from {SERVED_MODES}, got {modes}.")
    return modes


def task_examples(config: dict[str, Any]) -> list[dspy.Example]:
    """The config's tasks: ``task``, ``limit``, ``spread``, and for generated tasks ``split``, ``seed``, ``per_kind``."""
    options = {k: config[k] for k in ("split", "seed", "per_kind") if k in config}
    return load_task(config.get("task", "intent"), limit=config.get("limit"), spread=config.get("spread", False),
                     **options)


def build_modes(config: dict[str, Any], actor: dspy.BaseLM, task: str) -> dict[str, ROSA2]:
    """One ROSA2 instance per mode, all on the same actor (so their model work shares batched passes)."""
    if not isinstance(actor, LocalLM):
        config = {**config, "actor": {**config.get("actor", {}), "model": "litellm:served"}}
    modes = mode_names(config)
    refiner_lm = build_refiner(config.get("refiner", {}), actor)
    feedback = feedback_for(task, **resolve_protocol(config)[1])
    return {mode: build_rosa2(config, actor, task, mode, refiner_lm=refiner_lm, feedback=feedback) for mode in modes}


def build_rosa2(config: dict[str, Any], actor: dspy.BaseLM, task: str, mode: str, program: dspy.Module | None = None,
                refiner_lm: dspy.BaseLM | None = None, feedback: Any = None) -> ROSA2:
    """The ROSA2 of one mode as the config sets it up (``program``, ``refiner_lm``, ``feedback``: the
    config's unless given)."""
    rosa2 = ROSA2(
        program or PROGRAMS[config.get("program", "predict")](signature_for(task)),
        actor,
        feedback or feedback_for(task, **resolve_protocol(config)[1]),
        mode=mode,
        refiner_lm=refiner_lm or build_refiner(config.get("refiner", {}), actor),
        refiner_style=config.get("refiner", {}).get("style", "requirements"),
        refiner_fallback=config.get("refiner", {}).get("fallback", "keep"),
        weights=ROSAStep(**config.get("weights", {})),
        adapter=make_adapter(adapter) if (adapter := config.get("actor", {}).get("adapter")) else None,
        max_turns=config.get("max_turns", 4),
        switch_patience=config.get("switch_patience", 1),
        compare_words=mode == "joint" and config.get("compare_words", True),
        measure_theorem41=config.get("measure_theorem41", True),
        theorem41_delta=config.get("theorem41_delta", DEFAULT_DELTA),
    )
    if "num_demos" in config.get("refiner", {}):
        rosa2.refiner.num_demos = int(config["refiner"]["num_demos"])
    return rosa2


def oracle_answer(config: dict[str, Any], actor: dspy.BaseLM, task: str, example: dspy.Example) -> list[TurnRecord]:
    """The oracle row's record of one task: the static program's first answer with the hidden intent written
    into its instruction (:func:`programs.tasks.oracle_text`), scored by the config's simulated user."""
    program = with_instruction_note(PROGRAMS[config.get("program", "predict")](signature_for(task)),
                                    oracle_text(task, example))
    module = build_rosa2(config, actor, task, "static", program=program)
    result = module.interact(example, max_turns=1)
    module.end_session(result.rosa2.session_id)
    return result.rosa2.trajectory


# ---------------------------------------------------------------------------------------------- running

def run_experiment(config: dict[str, Any], progress: bool = True, progress_path: str | Path | None = None,
                   fresh: bool = False, finished_only: bool = False) -> dict[str, Any]:
    """Run every configured mode; returns {"config", "protocol", "summaries", "comparisons", "theorem_4_1",
    "step_norm_comparison", "trajectories", "wall_seconds", "resumed", ...}.

    The actor is built from ``config["actor"]`` for each run, so a results file always describes the
    model settings (``max_tokens``, LoRA shape) its answers were produced with. With ``progress_path``
    each finished conversation is appended there, and the conversations an earlier run of the same
    config finished are read back instead of run again (``fresh=True`` discards them). Conversations run
    task by task (every mode of task 0, then of task 1, ...), so an interrupted run has covered every mode
    on its first tasks. ``finished_only=True`` runs nothing: it analyses the tasks that every mode (and the
    oracle row) finished in the progress file, and says so under ``partial``.
    """
    protocol, _ = resolve_protocol(config)
    config = {**config, "protocol": protocol}
    examples = task_examples(config)
    modes = mode_names(config)
    rows = modes + ([ORACLE] if config.get("oracle") else [])
    jobs = [(mode, i) for i in range(len(examples)) for mode in rows]  # task-major: a partial run covers every mode
    store = ProgressFile(Path(progress_path), config_hash(config, examples), config) if progress_path else None
    done = store.load(fresh) if store else {}
    wanted = set(jobs)
    records: dict[tuple[str, int], list[TurnRecord]] = {job: t for job, t in done.items() if job in wanted}
    todo = [job for job in jobs if job not in records]

    if finished_only:
        return _analyse_finished(config, examples, rows, records, len(jobs))
    start, converse = time.perf_counter(), None
    if todo and config.get("ray") not in (None, False):
        from programs.grid import run_on_ray  # Ray is an optional extra: imported only when asked for

        run_on_ray(config, todo, records, store, examples, len(jobs), progress)
    elif todo:
        converse = conversation_runner(config, examples)
        _run_jobs(todo, converse, records, store, examples, int(config.get("concurrency", DEFAULT_CONCURRENCY)),
                  len(jobs), progress)
    wall = time.perf_counter() - start
    trajectories = {mode: [records[(mode, i)] for i in range(len(examples))] for mode in rows}
    steps = [e.get("steps") for e in examples]
    results = analyse(config, trajectories, steps if all(s is not None for s in steps) else None)
    results.update(wall_seconds=wall, resumed=len(jobs) - len(todo))
    policy = getattr(getattr(converse, "actor", None), "policy", None)  # a local actor's model
    if policy is not None:
        results["engine"] = engine_load(policy.batcher, wall)
    return results


def engine_load(batcher: Any, wall: float) -> dict[str, Any]:
    """How busy a local actor's model was during a run: its batched passes by kind, their seconds, and
    ``busy_share``, their sum over the run's wall time (near 1: every conversation waits on the model,
    so more at once can only help by making its passes cheaper)."""
    busy = sum(batcher.seconds.values())
    return {"passes": dict(batcher.passes), "seconds": dict(batcher.seconds),
            "busy_share": busy / wall if wall else None}


def _analyse_finished(config: dict[str, Any], examples: list[dspy.Example], rows: list[str],
                      records: dict[tuple[str, int], list[TurnRecord]], conversations: int) -> dict[str, Any]:
    """The analysis of the tasks every row finished (an interrupted run's progress file), marked ``partial``."""
    complete = [i for i in range(len(examples)) if all((mode, i) in records for mode in rows)]
    if not complete:
        raise SystemExit("No task has finished in every mode yet: nothing to analyse (run without --finished-only).")
    trajectories = {mode: [records[(mode, i)] for i in complete] for mode in rows}
    steps = [examples[i].get("steps") for i in complete]
    results = analyse(config, trajectories, steps if all(s is not None for s in steps) else None)
    results.update(wall_seconds=None, resumed=len(records), partial={
        "tasks_complete": len(complete), "tasks": len(examples), "task_indices": complete,
        "conversations_finished": len(records), "conversations": conversations})
    return results


def conversation_runner(config: dict[str, Any], examples: list[dspy.Example]) -> Any:
    """Build the config's actor and one ROSA2 per mode; return ``converse((mode, task index)) -> (trajectory,
    seconds)``, which runs one conversation in a session of its own (from θ0 and the original words)."""
    task = config.get("task", "intent")
    actor = build_actor(config.get("actor", {}))
    modules = build_modes(config, actor, task)

    def converse(job: tuple[str, int]) -> tuple[list[TurnRecord], float]:
        mode, i = job
        began = time.perf_counter()
        if mode == ORACLE:
            return oracle_answer(config, actor, task, examples[i]), time.perf_counter() - began
        result = modules[mode].interact(examples[i])
        modules[mode].end_session(result.rosa2.session_id)  # every interaction starts from θ0 and the original words
        return result.rosa2.trajectory, time.perf_counter() - began

    converse.actor = actor  # type: ignore[attr-defined] - its engine's load is reported (engine_load)
    return converse


def _run_jobs(todo: list[tuple[str, int]], converse: Any, records: dict[tuple[str, int], Any],
              store: ProgressFile | None, examples: list[dspy.Example], concurrency: int, total: int,
              progress: bool, encode: Any = encode_trajectory, decode: Any = decode_trajectory) -> None:
    """Run the conversations on a thread pool, recording (and appending) each as it finishes.

    If one fails, no new conversation starts; those in flight finish and are kept, then the first error
    is raised (a rerun resumes from what was kept). Every record goes through its JSON form (``encode``,
    then ``decode``: a trajectory by default), so records read back from the progress file and records of
    this run are alike to the bit."""
    error: BaseException | None = None
    pool = ThreadPoolExecutor(max(1, concurrency))
    try:
        with tqdm(total=total, initial=total - len(todo), desc="conversations", unit="conv",
                  disable=not progress) as bar:
            futures = {pool.submit(converse, job): job for job in todo}
            for future in as_completed(futures):
                mode, i = futures[future]
                try:
                    trajectory, seconds = future.result()
                except BaseException as err:  # noqa: BLE001 - re-raised below, after the finished ones are kept
                    if error is None:
                        error = err
                        for other in futures:
                            other.cancel()
                    continue
                as_json = encode(trajectory)
                records[(mode, i)] = decode(as_json)
                if store:
                    store.append(mode, i, str(examples[i].get("question", ""))[:200], seconds, as_json)
                bar.update()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if error is not None:
        raise error


def analyse(config: dict[str, Any], trajectories: dict[str, list[list[TurnRecord]]],
            task_steps: list[int] | None = None) -> dict[str, Any]:
    """Summaries (with intervals), paired comparisons, Theorem 4.1's minimal shifts and the step-norm
    comparison (both from the joint mode) of a run's trajectories; with ``task_steps`` (one per task)
    also each mode's accuracy by the last turn per step count.

    The ``oracle`` row (if run) is summarised over its one turn and compared with each mode's first
    answer on the same tasks (``oracle_comparisons``), not among the modes' last-turn comparisons."""
    max_turns = config.get("max_turns", 4)
    protocol = config.get("protocol") or resolve_protocol(config)[0]
    summaries = {mode: summarize(runs, 1 if mode == ORACLE else max_turns) for mode, runs in trajectories.items()}
    modes = {mode: s["solved_at"] for mode, s in summaries.items() if mode != ORACLE}
    comparisons = compare_modes(modes, max_turns)
    oracle_comparisons = ([row for mode, solved in modes.items()
                           for row in compare_modes({ORACLE: summaries[ORACLE]["solved_at"], mode: solved}, 1)]
                          if ORACLE in summaries else [])
    by_steps = ({mode: accuracy_by_group(summaries[mode]["solved_at"], task_steps, max_turns) for mode in modes}
                if task_steps else None)
    return {
        "config": config, "protocol": protocol, "protocol_label": PROTOCOLS[protocol],
        "statistics": METHOD, "summaries": summaries, "comparisons": comparisons,
        "oracle_comparisons": oracle_comparisons,
        "theorem_4_1": theorem_41(trajectories["joint"]) if "joint" in trajectories else {},
        "step_norm_comparison": step_norm_comparison(trajectories["joint"]) if "joint" in trajectories else {},
        **({"task_steps": task_steps, "by_steps": by_steps} if task_steps else {}),
        "trajectories": {mode: [[r.to_dict() for r in t] for t in runs] for mode, runs in trajectories.items()},
    }


def reanalyse(path: str | Path, name: str | None = None) -> dict[str, Path]:
    """Recompute a results file's summaries, intervals and comparisons from its turn records (no model runs);
    its config, machine facts and wall time are kept. Writes ``results/<name>`` (default: the same name)."""
    old = json.loads(Path(path).read_text())
    trajectories = {mode: [[TurnRecord.from_dict(r) for r in t] for t in runs]
                    for mode, runs in old["trajectories"].items()}
    results = analyse(old["config"], trajectories, old.get("task_steps"))
    results.update({k: old[k] for k in ("wall_seconds", "resumed") if k in old})
    return report(results, name or Path(path).stem, machine=old.get("machine"))


def main(argv: list[str] | None = None) -> None:
    # Answers are capped at actor.max_tokens on purpose; DSPy's per-call truncation warning is noise here.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="config name in programs/configs or a JSON path")
    parser.add_argument("--limit", type=int, default=None, help="override the number of tasks")
    parser.add_argument("--modes", default=None, help="comma-separated subset of modes")
    parser.add_argument("--max-turns", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None, help="conversations at once (1: sequential)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                        help="feedback protocol: none, hint, answer (default: the config's)")
    parser.add_argument("--name", default=None, help="results file name (default: the config's name)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the conversations an interrupted run of this name finished and start over")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run the grid's cells (mode × chunk of tasks) as Ray tasks: on a local Ray started for "
                             "the run, or on the cluster at ADDRESS ('auto', 'ray://head:10001'); see programs.grid")
    parser.add_argument("--finished-only", action="store_true",
                        help="run nothing: analyse the tasks every mode of an interrupted run finished, write the "
                             "results file (marked partial) and keep the progress file for a later resume")
    parser.add_argument("--reanalyse", default=None, metavar="RESULTS_JSON",
                        help="recompute statistics of an existing results file from its turn records, then exit")
    args = parser.parse_args(argv)
    if args.reanalyse:
        reanalyse(args.reanalyse, args.name)
        return
    config = load_config(args.config)
    if args.limit is not None:
        config["limit"] = args.limit
    if args.modes:
        config["modes"] = args.modes.split(",")
    if args.max_turns is not None:
        config["max_turns"] = args.max_turns
    if args.concurrency is not None:
        config["concurrency"] = args.concurrency
    if args.protocol is not None:
        config["protocol"] = args.protocol
        config["feedback"] = {k: v for k, v in config.get("feedback", {}).items() if k != "reveal"}
    if args.ray is not None:
        ray = config.get("ray")
        config["ray"] = {**(ray if isinstance(ray, dict) else {}), "address": args.ray or None}
    name = args.name or config.get("name", "experiment")
    progress_path = progress_path_for(name)
    try:
        results = run_experiment(config, progress_path=progress_path, fresh=args.fresh,
                                 finished_only=args.finished_only)
    except ConfigMismatchError as err:
        raise SystemExit(str(err)) from None
    report(results, name)
    if not args.finished_only:
        ProgressFile(progress_path, "", {}).remove()


if __name__ == "__main__":
    main()
