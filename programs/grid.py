"""Where a grid outgrows one machine: the experiment's conversations spread over a Ray cluster.

A **cell** is one mode × a chunk of consecutive tasks (``ray.chunk`` tasks, default 8). Each cell runs as one
Ray task (:func:`run_cell`): the worker reads the tasks and builds the actor and the mode's ROSA2 from the
config itself (nothing but the config and the job list travels; no model is pickled), runs the cell's
conversations on its own thread pool (``concurrency``) and returns their records in the form the progress
file keeps. The driver appends each returned conversation to ``results/<name>.partial.jsonl`` exactly as a
local run does, so resume, the analysis and the results file are the same; since every conversation starts
from θ0 and the original words and decoding is greedy, the records equal the local run's (up to the last bits
of float sums, as between ``--concurrency`` settings).

Config (``--ray [ADDRESS]`` sets ``address``; the key is not part of the config hash, so a run may resume
locally what it began on a cluster and the other way round)::

    "ray": {"address": null, "chunk": 8, "num_cpus": 1, "num_gpus": 0}

``address`` null starts a local Ray for the run (all of this machine's CPUs, a small object store, no
dashboard) and stops it afterwards; ``"auto"`` or ``"ray://head:10001"`` joins a running cluster, whose
nodes must have this package, its model files and the same task data installed (a worker whose tasks hash
differently from the driver's refuses to run). ``num_cpus``/``num_gpus`` are what one cell asks of the
cluster (with a GPU, set ``actor.device`` to ``"cuda"``).

Example (needs ``pip install 'rosa2-dspy[ray]'``)::

    python -m programs.experiment --config intent --ray               # a local Ray
    python -m programs.experiment --config intent --ray auto          # the cluster this node belongs to
"""

from __future__ import annotations

import os
from typing import Any

import dspy
from tqdm import tqdm

from programs import experiment
from programs.progress import ProgressFile, config_hash, decode_trajectory

DEFAULT_CHUNK = 8
# Settings every worker needs to read the model and litellm offline (a cluster's workers do not share the
# driver's environment).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LITELLM_LOCAL_MODEL_COST_MAP")
LOCAL_OBJECT_STORE_BYTES = 128 * 1024**2


def ray_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config's ``ray`` block with its defaults (``True`` stands for all defaults)."""
    given = config.get("ray")
    given = {} if given is True else dict(given or {})
    unknown = set(given) - {"address", "chunk", "num_cpus", "num_gpus"}
    if unknown:
        raise ValueError(f"Unknown ray settings {sorted(unknown)}; use address, chunk, num_cpus, num_gpus.")
    return {"address": None, "chunk": DEFAULT_CHUNK, "num_cpus": 1, "num_gpus": 0, **given}


def cells(todo: list[tuple[str, int]], chunk: int) -> list[list[tuple[str, int]]]:
    """The pending jobs grouped by mode, each mode's tasks cut into chunks of ``chunk``: one Ray task each.

    >>> cells([("joint", 0), ("joint", 1), ("joint", 2), ("static", 0)], chunk=2)
    [[('joint', 0), ('joint', 1)], [('joint', 2)], [('static', 0)]]
    """
    if chunk < 1:
        raise ValueError(f"ray.chunk must be at least 1, got {chunk}.")
    by_mode: dict[str, list[tuple[str, int]]] = {}
    for job in todo:
        by_mode.setdefault(job[0], []).append(job)
    return [jobs[k:k + chunk] for jobs in by_mode.values() for k in range(0, len(jobs), chunk)]


class _Collected:
    """Stands in for the progress file inside a cell: keeps each finished conversation's line."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def append(self, mode: str, task: int, question: str, seconds: float, trajectory: Any) -> None:
        self.rows.append({"mode": mode, "task": task, "question": question, "seconds": seconds,
                          "trajectory": trajectory})


def run_cell(config: dict[str, Any], jobs: list[tuple[str, int]], digest: str) -> dict[str, Any]:
    """Run one cell's conversations where it is called (a Ray worker): ``{"rows": [...], "error": ...}``.

    ``rows`` are the finished conversations as progress-file lines; ``error`` is the first failure (then no
    conversation started after it; those finished are still returned). ``digest`` is the driver's
    :func:`programs.progress.config_hash`: a worker whose tasks differ refuses to run."""
    examples = experiment.task_examples(config)
    mine = config_hash(config, examples)
    if mine != digest:
        raise RuntimeError(f"This worker's tasks hash to {mine}, the driver's to {digest}: install the same "
                           "rosa2-dspy version and task data on every node of the cluster.")
    collected = _Collected()
    error: BaseException | None = None
    try:
        experiment._run_jobs(jobs, experiment.conversation_runner(config, examples), {}, collected, examples,
                             int(config.get("concurrency", experiment.DEFAULT_CONCURRENCY)), len(jobs), progress=False)
    except Exception as err:  # noqa: BLE001 - handed to the driver after the finished rows
        error = err
    return {"rows": collected.rows, "error": error}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError("Running the grid on Ray (--ray or the config's \"ray\" block) needs Ray: "
                          "pip install 'rosa2-dspy[ray]' (or pip install 'ray>=2.40,<3'), "
                          "or leave out --ray to run on this machine.") from err
    return ray


def _start(ray: Any, address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray; True if this call started (and must stop) the connection."""
    if ray.is_initialized():  # the caller's Ray: use it, leave it running
        return False
    env = {"env_vars": {k: os.environ[k] for k in OFFLINE_VARIABLES if k in os.environ}}
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 include_dashboard=False, runtime_env=env)
    return True


def run_on_ray(config: dict[str, Any], todo: list[tuple[str, int]], records: dict[tuple[str, int], Any],
               store: ProgressFile | None, examples: list[dspy.Example], total: int,
               progress: bool) -> None:
    """Run ``todo`` as cells on Ray; record (and append to ``store``) each conversation as its cell returns.

    A cell's failure is raised once the cell's finished conversations are kept; the cells still pending or
    running are then cancelled (a rerun runs them again)."""
    ray = _import_ray()
    settings = ray_settings(config)
    digest = config_hash(config, examples)
    started = _start(ray, settings["address"])
    error: BaseException | None = None
    try:
        remote = ray.remote(run_cell).options(num_cpus=settings["num_cpus"], num_gpus=settings["num_gpus"],
                                              max_retries=0)
        pending = {remote.remote(config, cell, digest): cell for cell in cells(todo, int(settings["chunk"]))}
        with tqdm(total=total, initial=total - len(todo), desc="conversations", unit="conv",
                  disable=not progress) as bar:
            while pending and error is None:
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                pending.pop(ready)
                out = ray.get(ready)
                for row in out["rows"]:
                    records[(row["mode"], row["task"])] = decode_trajectory(row["trajectory"])
                    if store:
                        store.append(row["mode"], row["task"], row["question"], row["seconds"], row["trajectory"])
                    bar.update()
                error = out["error"]
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()
    if error is not None:
        raise error
