"""The batching engine: many conversations' model work in one pass, each row with its own LoRA adapter.

Batched passes over a :class:`~rosa2_dspy.policy.LoRAPolicy`, all built on
:class:`~rosa2_dspy.multi_lora.MultiLoRA` (one base-model pass plus a per-row low-rank term):

* :func:`generate_rows` / :class:`~rosa2_dspy.decoding.DecodeBatch` (in :mod:`rosa2_dspy.decoding`) —
  batched decoding, greedy or sampled, with a per-row token budget; prompts are prefilled in groups of
  similar length, rows finish independently and new rows can join a running decode.
* :func:`score_rows` / :func:`divergence_rows` (in :mod:`rosa2_dspy.scoring`) — log-probs, per-sample
  gradients and KL checks of many rows in one pass (rows of one ROSA step share their prompt's forward).

:class:`Batcher` coalesces concurrent requests (threads, or asyncio through threads) into those
passes: one worker thread takes the first request, waits up to ``wait_ms`` for more of the same kind
(up to ``max_batch`` rows, ``max_score_tokens`` tokens for scoring), runs one pass and hands each caller
its rows. Generation is continuous: while a decode runs, generation requests that arrive join it
between token steps (up to ``max_batch`` rows), and each caller gets its answer when its own rows end;
scoring requests that arrive while a decode runs are run between two of its token steps (the decode's
rows set aside meanwhile), so a weights step never waits for other conversations' answers to end.
Scoring requests that arrive while a scoring pass runs join the next one. If a batched pass fails, each
request is rerun alone, so one bad request fails only its own caller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rosa2_dspy.decoding import DecodeBatch, Generation, GenerationRow, generate_rows
from rosa2_dspy.scoring import DivergenceRow, LogProb, ScoreRow, divergence_rows, score_rows, score_width

__all__ = ["Batcher", "DivergenceRow", "Generation", "GenerationRow", "LogProb", "ModelBackend", "ScoreRow",
           "divergence_rows", "generate_rows", "score_rows", "score_width"]

if TYPE_CHECKING:
    from rosa2_dspy.policy import LoRAPolicy

logger = logging.getLogger(__name__)


class ModelBackend(Protocol):
    """What ROSA2 asks of a model: batched generation and batched scoring, each row under its own adapter.

    :class:`Batcher` over an in-process :class:`~rosa2_dspy.policy.LoRAPolicy` is the one shipped.
    Beyond one machine, generation would be a multi-LoRA server's job (e.g. vLLM with
    ``enable_lora``: each session's adapter saved with ``save_pretrained`` after its ROSA step and
    loaded in place under the session's name, each request naming it) while ``score`` stays on a trainer
    process holding the same base weights: two classes behind this one interface (README, "Design").
    """

    def generate(self, rows: Sequence[GenerationRow]) -> list[Generation]: ...

    def score(self, rows: Sequence[ScoreRow]) -> list[LogProb]: ...

    def divergence(self, rows: Sequence[DivergenceRow]) -> list[float]: ...


@dataclass
class _Job:
    kind: str  # "generate", "score" or "divergence"
    rows: list
    future: Future


class Batcher:
    """Coalesces concurrent generation and scoring requests into batched passes on one worker thread.

    Args:
        policy: the model every pass runs on.
        max_batch: most rows in one generation pass (and one scoring pass).
        wait_ms: how long the first request of a pass waits for others to join it. A lone request pays
            at most this.
        max_score_tokens: most tokens (rows × padded length) in one scoring pass; bounds the memory a
            backward pass needs. A single longer row still runs, alone.
        share_prompts: whether responses to one prompt under one adapter (a ROSA step's) run the prompt
            once (:func:`~rosa2_dspy.scoring.score_rows`). It saves compute, and costs extra small passes
            to pull each response's gradient back through the prompt: a gain where compute is the
            bottleneck (a CPU), a loss where a pass is bound by kernel launches (a GPU with a small
            batch). None (default): on for a CPU model, off otherwise. Results agree up to float rounding.
    """

    def __init__(self, policy: "LoRAPolicy", max_batch: int = 16, wait_ms: float = 5.0,
                 max_score_tokens: int = 8192, share_prompts: bool | None = None) -> None:
        if max_batch < 1 or wait_ms < 0 or max_score_tokens < 1:
            raise ValueError("max_batch and max_score_tokens must be >= 1 and wait_ms >= 0.")
        self.policy = policy
        self.max_batch = max_batch
        self.wait_ms = wait_ms
        self.max_score_tokens = max_score_tokens
        self.share_prompts = policy.device.type == "cpu" if share_prompts is None else share_prompts
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._compute_lock = threading.RLock()  # re-entered by a scoring pass run between token steps
        self._held: list[_Job] = []  # taken from the queue but not fitting the pass that was running
        self.passes: dict[str, int] = {kind: 0 for kind in _PASSES}  # how many batched passes ran (for benchmarks)
        # Seconds the model spent (for benchmarks): prefilling the rows that start or join a decode ("prefill"),
        # its token steps ("decode"), and scoring passes ("score", "divergence"; also those run between steps).
        self.seconds: dict[str, float] = {"prefill": 0.0, "decode": 0.0, "score": 0.0, "divergence": 0.0}

    def generate(self, rows: Sequence[GenerationRow]) -> list[Generation]:
        return self._submit("generate", list(rows))

    def score(self, rows: Sequence[ScoreRow]) -> list[LogProb]:
        return self._submit("score", list(rows))

    def divergence(self, rows: Sequence[DivergenceRow]) -> list[float]:
        return self._submit("divergence", list(rows))

    def _submit(self, kind: str, rows: list) -> list:
        return [result for future in self.submit(kind, rows) for result in future.result()]

    def submit(self, kind: str, rows: Sequence) -> list[Future]:
        """Queue ``rows`` (``kind`` "generate", "score" or "divergence") without waiting: one future per
        pass they take, each resolving to that pass's results in order. Streaming callers read their rows'
        ``on_token`` while they wait."""
        rows = list(rows)
        if not rows:
            return []
        if threading.current_thread() is self._worker:  # a pass that needs another pass: run it inline
            future: Future = Future()
            future.set_result(self._run(kind, rows))
            return [future]
        jobs = [_Job(kind, chunk, Future()) for chunk in self._chunks(kind, rows)]
        for job in jobs:
            self._queue.put(job)
        self._ensure_worker()
        return [job.future for job in jobs]

    def _chunks(self, kind: str, rows: list) -> list[list]:
        """Split one request into passes of at most ``max_batch`` rows (and ``max_score_tokens``)."""
        if kind == "generate":
            return [rows[i : i + self.max_batch] for i in range(0, len(rows), self.max_batch)]
        width = score_width(rows) * (2 if kind == "divergence" else 1)
        per_pass = max(1, min(self.max_batch, self.max_score_tokens // width))
        return [rows[i : i + per_pass] for i in range(0, len(rows), per_pass)]

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="rosa2-batcher", daemon=True)
                self._worker.start()

    def _fits(self, batch: list[_Job], job: _Job) -> bool:
        rows = sum(len(j.rows) for j in batch) + len(job.rows)
        if job.kind != batch[0].kind or rows > self.max_batch:
            return False
        if job.kind != "generate":  # equal widths only (see score_width), within one pass's token budget
            width = score_width(job.rows)
            factor = 2 if job.kind == "divergence" else 1
            return width == score_width(batch[0].rows) and factor * width * rows <= self.max_score_tokens
        return True

    def _loop(self) -> None:
        while True:
            batch = [self._held.pop(0) if self._held else self._queue.get()]
            deadline = time.monotonic() + self.wait_ms / 1000
            while not self._held:
                try:
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 0)) \
                        if time.monotonic() < deadline else self._queue.get_nowait()
                except queue.Empty:
                    break
                if self._fits(batch, job):
                    batch.append(job)
                else:
                    self._held.append(job)
            while self._held and self._fits(batch, self._held[0]):
                batch.append(self._held.pop(0))
            if batch[0].kind == "generate":
                self._decode(batch)
            else:
                self._run_jobs(batch)

    def _decode(self, jobs: list[_Job]) -> None:
        """One continuous decode: ``jobs`` start it, generation requests that arrive later join it between
        token steps while there is room and no other kind of request waits; each job's future resolves
        when its last row ends."""
        handles: dict[int, tuple[_Job, list[int]]] = {}  # first handle of a job -> (job, its handles)
        try:
            with self._compute_lock, DecodeBatch(self.policy) as decode:
                self._admit(decode, jobs, handles)
                self.passes["generate"] += 1
                while decode.size:
                    stepping = time.perf_counter()
                    decode.step()
                    self.seconds["decode"] += time.perf_counter() - stepping
                    for first, (job, own) in list(handles.items()):
                        if all(decode.results[h] is not None for h in own):
                            job.future.set_result([decode.results[h] for h in own])
                            del handles[first]
                    self._between_steps(decode, handles)
        except Exception as err:  # a failed decode step: rerun each unfinished request alone
            unfinished = [job for job, _ in handles.values()]
            logger.warning("A batched generate pass failed (%s); rerunning its %d requests one by one.",
                           err, len(unfinished))
            for job in unfinished:
                self._run_jobs([job])

    def _between_steps(self, decode: DecodeBatch, handles: dict) -> None:
        """Between two token steps of a running decode: scoring requests that wait run now, in passes of
        their own (the decode's rows set aside), rather than after the decode ends: a conversation's
        weights step does not wait for other conversations' answers. Then generation requests join the
        decode, in order, while there is room."""
        while True:
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                break
        others = [job for job in self._held if job.kind != "generate"]
        if others:
            self._held = [job for job in self._held if job.kind == "generate"]
            with self.policy.multi_lora.paused():
                while others:
                    batch, rest = [others[0]], []
                    for job in others[1:]:
                        (batch if self._fits(batch, job) else rest).append(job)
                    self._run_jobs(batch)
                    others = rest
        while decode.mergeable and self._held and decode.size + len(self._held[0].rows) <= self.max_batch:
            self._admit(decode, [self._held.pop(0)], handles)

    def _admit(self, decode: DecodeBatch, jobs: list[_Job], handles: dict) -> None:
        """Prefill ``jobs``' rows into ``decode`` (one call, grouped by length inside). If that fails, each
        job is tried alone, so a bad request (e.g. an adapter of the wrong size) fails only its caller."""
        began = time.perf_counter()
        try:
            own = decode.admit([row for job in jobs for row in job.rows])
        except Exception as err:
            if len(jobs) > 1:
                for job in jobs:
                    if decode.size and not decode.mergeable:  # this model's cache cannot take it now
                        self._held.insert(0, job)
                    else:
                        self._admit(decode, [job], handles)
            else:
                jobs[0].future.set_exception(err)
            return
        self.seconds["prefill"] += time.perf_counter() - began
        for job in jobs:
            mine, own = own[: len(job.rows)], own[len(job.rows):]
            handles[mine[0]] = (job, mine)

    def _run_jobs(self, batch: list[_Job]) -> None:
        rows = [r for job in batch for r in job.rows]
        try:
            results = self._run(batch[0].kind, rows)
        except Exception as err:  # isolate the failure: rerun each request alone
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            logger.warning("A batched %s pass failed (%s); rerunning its %d requests one by one.",
                           batch[0].kind, err, len(batch))
            for job in batch:
                self._run_jobs([job])
            return
        offset = 0
        for job in batch:
            job.future.set_result(results[offset : offset + len(job.rows)])
            offset += len(job.rows)

    def _run(self, kind: str, rows: list) -> list:
        run: Callable = _PASSES[kind]
        began = time.perf_counter()
        with self._compute_lock:  # MultiLoRA's per-row state belongs to one pass at a time
            results = run(self.policy, rows, share_prompts=self.share_prompts) if kind == "score" \
                else run(self.policy, rows)
        self.passes[kind] += 1
        if kind != "generate":  # generation runs here only inside a _decode, which counts its time
            self.seconds[kind] += time.perf_counter() - began
        return results


_PASSES: dict[str, Callable] = {"generate": generate_rows, "score": score_rows, "divergence": divergence_rows}
