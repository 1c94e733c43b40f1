"""Carry-over: does one conversation's adaptation help the same user's *next* questions?

Each simulated user has one fixed hidden preference (an intent kind of :mod:`programs.intentgen`). Per
mode and user:

1. **conversation 1**: ``ROSA2.interact`` on the user's first question, adapting after each turn (up to
   ``max_turns``) under the config's feedback protocol;
2. then each of ``new_questions`` new questions (same kind, other values) is asked once, as a first answer
   with no feedback, (i) in a session **carried over** from conversation 1
   (``interact(..., carry_over_from=...)``: its instructions and adapter) and (ii) in a **fresh** session.

Per mode it reports first-answer success on the new questions, carried vs fresh, with the format
(``format_ok``: the hidden intent) and the value (``value_ok``) scored separately; the paired comparison
carried vs fresh on the same questions (paired bootstrap interval of the difference, exact McNemar); and
the share of new answers that **repeat** what conversation 1 taught: its value (the answer it revealed or
solved with) instead of the new one (``repeats_conversation1``), or the number of the hint's format example
(``repeats_hint_example``). Intervals are 95% bootstraps over new questions (``rosa2_dspy.stats``); the
questions of one user share its conversation 1, so with few users read them as lower bounds on the spread.

A user's whole protocol is one job of the experiment runner's machinery (``programs.experiment``): jobs run
on a thread pool, each finished one is appended to ``results/<name>.partial.jsonl``, and a rerun resumes.

Config (``programs/configs/carryover.json``): the experiment's keys (actor, refiner, weights, modes,
max_turns, protocol, concurrency) plus ``split`` (``test`` for reported runs), ``seed``,
``users_per_kind`` and ``new_questions``.

Run: ``python -m programs.carryover [--config carryover|carryover_answer] [--protocol hint] [--modes joint,static]``;
writes ``results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import dspy
import torch

from programs import experiment
from programs.intentgen import EXAMPLE_NUMBER, check, numbers_in, users
from programs.progress import ConfigMismatchError, ProgressFile, config_hash, progress_path_for
from programs.reporting import write_results
from programs.tasks import resolve_protocol
from rosa2_dspy import ROSA2
from rosa2_dspy.feedback.simulated_user import PROTOCOLS, REVEAL
from rosa2_dspy.stats import METHOD, bootstrap_ci, mcnemar_exact, paired_difference_ci, with_ci

TASK = "intentgen"
ARMS = ("carried", "fresh")
SCORES = ("solved", "format_ok", "value_ok")


def carryover_users(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's simulated users (``split``, ``seed``, ``users_per_kind``, ``new_questions``, ``kinds``)."""
    return users(config.get("split", "test"), per_kind=config.get("users_per_kind", 1),
                 new_questions=config.get("new_questions", 4), seed=config.get("seed", 0), kinds=config.get("kinds"))


def _example(task: dict[str, Any]) -> dspy.Example:
    return dspy.Example(**task).with_inputs("question")


def _shift(adapter: torch.Tensor | None, theta0: torch.Tensor | None) -> float:
    """‖adapter − θ0‖: how far a session's adapter is from the model's own (0 for no adapter)."""
    if adapter is None or theta0 is None:
        return 0.0
    return float(torch.linalg.vector_norm(adapter.float() - theta0.float()))


def score_answer(task: dict[str, Any], answer: str | None, first: dict[str, Any]) -> dict[str, Any]:
    """A new question's answer: format and value scored separately, and whether it repeats what conversation 1
    (on ``first``) taught: its value (not the new one, and not a number of the new question) or the hint's
    example number."""
    fmt, val = check(task["kind"], answer, task["value"], task["question"], task.get("unit", ""))
    stated = set(numbers_in(answer or ""))
    in_question = set(numbers_in(task["question"]))
    old = float(first["value"])
    return {"answer": answer, "solved": fmt and val, "format_ok": fmt, "value_ok": val,
            "repeats_conversation1": old in stated and old != float(task["value"]) and old not in in_question,
            "repeats_hint_example": float(EXAMPLE_NUMBER) in stated and float(EXAMPLE_NUMBER) not in in_question}


def run_user(module: ROSA2, user: dict[str, Any]) -> dict[str, Any]:
    """One user's protocol in one mode: conversation 1 with adaptation, then each new question as a first
    answer in a session carried over from it and in a fresh session. Every session it opens it ends."""
    policy = module.policy
    theta0 = policy.adapter_vector() if policy is not None else None
    first = user["first"]
    result = module.interact(_example(first))
    source = result.rosa2.session_id
    conversation = result.rosa2.trajectory
    after = module.sessions[source]
    instructions_after, shift_after = dict(after.instructions), _shift(after.adapter, theta0)
    new = []
    try:
        for task in user["new"]:
            row: dict[str, Any] = {"question": task["question"], "value": task["value"]}
            for arm in ARMS:
                answer = module.interact(_example(task), max_turns=1,
                                         carry_over_from=source if arm == "carried" else None)
                session_id = answer.rosa2.session_id
                record = answer.rosa2.trajectory[0]
                row[arm] = {**score_answer(task, record.outputs.get("answer"), first),
                            "instructions": record.instructions,
                            "adapter_shift": _shift(module.sessions[session_id].adapter, theta0)}
                module.end_session(session_id)
            new.append(row)
    finally:
        module.end_session(source)
    gold = str(first["answer"])
    return {
        "user": user["user"], "kind": user["kind"], "first_question": first["question"],
        "first_value": first["value"], "hint_example": first["example"],
        "conversation": [r.to_dict() for r in conversation],
        "conversation_solved": bool(conversation[-1].solved), "conversation_turns": len(conversation),
        "taught": {"reference_revealed": any(REVEAL.format(gold) in (r.feedback or "")
                                              for r in conversation),
                   "solved_answer": conversation[-1].outputs.get("answer") if conversation[-1].solved else None},
        "instructions_after": instructions_after, "adapter_shift_after": shift_after, "new": new,
    }


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_carryover(config: dict[str, Any], progress: bool = True, progress_path: str | Path | None = None,
                  fresh: bool = False) -> dict[str, Any]:
    """Every configured mode × user; returns {"config", "protocol", "summaries", "users", ...}.

    Resumable like :func:`programs.experiment.run_experiment`: with ``progress_path`` each finished user is
    appended there and a rerun of the same config runs only the rest (``fresh=True`` starts over)."""
    protocol, _ = resolve_protocol(config)
    config = {**config, "task": TASK, "protocol": protocol}
    people = carryover_users(config)
    modes = experiment.mode_names(config)
    jobs = [(mode, u) for mode in modes for u in range(len(people))]
    tasks = [_example(t) for p in people for t in (p["first"], *p["new"])]
    store = (ProgressFile(Path(progress_path), config_hash(config, tasks), config,
                                     decode=lambda row: row) if progress_path else None)
    done = store.load(fresh) if store else {}
    records = {job: r for job, r in done.items() if job in set(jobs)}
    todo = [job for job in jobs if job not in records]
    start = time.perf_counter()
    if todo:
        actor = experiment.build_actor(config.get("actor", {}))
        modules = experiment.build_modes(config, actor, TASK)

        def converse(job: tuple[str, int]) -> tuple[dict[str, Any], float]:
            began = time.perf_counter()
            return run_user(modules[job[0]], people[job[1]]), time.perf_counter() - began

        firsts = [dspy.Example(question=p["user"]) for p in people]  # the progress file's label for a job
        concurrency = int(config.get("concurrency", experiment.DEFAULT_CONCURRENCY))
        experiment._run_jobs(todo, converse, records, store, firsts, concurrency, len(jobs),
                             progress, encode=_json, decode=lambda row: row)
    wall = time.perf_counter() - start
    results = analyse(config, {mode: [records[(mode, u)] for u in range(len(people))] for mode in modes})
    results.update(wall_seconds=wall, resumed=len(jobs) - len(todo))
    return results


def summarize_mode(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: the share of new questions solved / format_ok / value_ok / repeating conversation 1 or the
    hint's example, with intervals; carried vs fresh paired on the same questions; conversation 1's outcome."""
    rows = [q for run in runs for q in run["new"]]
    summary: dict[str, Any] = {"users": len(runs), "new_questions": len(rows),
                               "conversation1_solved": sum(r["conversation_solved"] for r in runs) / len(runs)
                               if runs else None,
                               "conversation1_turns": statistics.mean(r["conversation_turns"] for r in runs)
                               if runs else None}
    for arm in ARMS:
        for score in (*SCORES, "repeats_conversation1", "repeats_hint_example"):
            values = [int(q[arm][score]) for q in rows]
            summary[f"{arm}_{score}"] = sum(values) / len(values) if values else None
            summary[f"{arm}_{score}_ci"] = bootstrap_ci(values)
    for score in SCORES:
        carried, fresh = [int(q["carried"][score]) for q in rows], [int(q["fresh"][score]) for q in rows]
        a_only = sum(1 for c, f in zip(carried, fresh) if c and not f)
        b_only = sum(1 for c, f in zip(carried, fresh) if f and not c)
        summary[f"{score}_carried_vs_fresh"] = {
            "difference": (sum(carried) - sum(fresh)) / len(rows) if rows else None,
            "difference_ci": paired_difference_ci(carried, fresh), "carried_only": a_only, "fresh_only": b_only,
            "mcnemar_p": mcnemar_exact(a_only, b_only)}
    return summary


def analyse(config: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    protocol = config.get("protocol") or resolve_protocol(config)[0]
    return {"config": config, "protocol": protocol, "protocol_label": PROTOCOLS[protocol], "statistics": METHOD,
            "summaries": {mode: summarize_mode(r) for mode, r in runs.items()}, "users": runs}


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode: carried vs fresh first-answer success, format and value, repeats, McNemar p."""
    rows = []
    for mode, s in summaries.items():
        row: dict[str, Any] = {"mode": mode, "conv. 1 solved": with_ci(s["conversation1_solved"], None)}
        for score in SCORES:
            for arm in ARMS:
                row[f"{score} {arm}"] = with_ci(s[f"{arm}_{score}"], s[f"{arm}_{score}_ci"])
        paired = s["solved_carried_vs_fresh"]
        row["solved carried − fresh"] = with_ci(paired["difference"], paired["difference_ci"])
        row["McNemar p (solved)"] = round(paired["mcnemar_p"], 4)
        for arm in ARMS:
            row[f"repeats conv. 1 {arm}"] = with_ci(s[f"{arm}_repeats_conversation1"], None)
            row[f"repeats hint example {arm}"] = with_ci(s[f"{arm}_repeats_hint_example"], None)
        rows.append(row)
    return rows


def report(results: dict[str, Any], name: str) -> Path:
    config = results["config"]
    title = (f"carry-over · {config.get('actor', {}).get('model', 'embedded')} · split {config.get('split', 'test')}"
             f" · protocol {results['protocol']} ({results['protocol_label']})")
    return write_results(name, table_rows(results["summaries"]), extra={**results, "title": title}, title=title)


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="carryover", help="config name in programs/configs or a JSON path")
    parser.add_argument("--modes", default=None, help="comma-separated subset of modes")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None, help="default: the config's")
    parser.add_argument("--users-per-kind", type=int, default=None)
    parser.add_argument("--new-questions", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--name", default=None, help="results file name (default: the config's name)")
    parser.add_argument("--fresh", action="store_true", help="discard an interrupted run's users and start over")
    args = parser.parse_args(argv)
    config = experiment.load_config(args.config)
    for key, value in (("users_per_kind", args.users_per_kind), ("new_questions", args.new_questions),
                       ("concurrency", args.concurrency)):
        if value is not None:
            config[key] = value
    if args.protocol is not None:
        config["protocol"] = args.protocol
        config["feedback"] = {k: v for k, v in config.get("feedback", {}).items() if k != "reveal"}
    if args.modes:
        config["modes"] = args.modes.split(",")
    name = args.name or config.get("name", "carryover")
    progress_path = progress_path_for(name)
    try:
        results = run_carryover(config, progress_path=progress_path, fresh=args.fresh)
    except ConfigMismatchError as err:
        raise SystemExit(str(err)) from None
    report(results, name)
    ProgressFile(progress_path, "", {}).remove()


if __name__ == "__main__":
    main()
