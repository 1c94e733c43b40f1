"""The batching engine: many conversations' model work in one pass, each row with its own LoRA adapter.

Batched passes over a :class:`~rosa2_dspy.policy.LoRAPolicy`, all built on
:class:`~rosa2_dspy.multi_lora.MultiLoRA` (one base-model pass plus a per-row low-rank term):

* :func:`generate_rows` / :class:`~rosa2_dspy.decoding.DecodeBatch` (in :mod:`rosa2_dspy.decoding`) —
  batched decoding, greedy or sampled, with a per-row token budget; prompts are prefilled in groups of
  similar length, rows finish independently and new rows can join a running decode.
* :func:`score_rows` — ``log pi(y | x)`` of (prompt, response) rows, right-padded (so every real token
  sees exactly what it would alone), and, on request, every row's gradient with respect to its own
  adapter copy: one forward and one backward give all per-sample gradients. A row may also keep its
  final hidden states, or bring those of another pass over the same text to be compared with (mean
  per-token KL): the weights step's check rides on the passes it makes anyway (see ``ROSAStep``).
* :func:`divergence_rows` — how far a candidate adapter moves the model's next-token predictions from a
  reference adapter over a text (mean per-token KL): the weights step's check that a step does not
  wreck the model.

:class:`Batcher` coalesces concurrent requests (threads, or asyncio through threads) into those
passes: one worker thread takes the first request, waits up to ``wait_ms`` for more of the same kind
(up to ``max_batch`` rows, ``max_score_tokens`` tokens for scoring), runs one pass and hands each caller
its rows. Generation is continuous: while a decode runs, generation requests that arrive join it
between token steps (up to ``max_batch`` rows), and each caller gets its answer when its own rows end;
a waiting scoring request stops new rows from joining, so it runs as soon as the decode drains.
Scoring requests that arrive while a pass runs join the next one. If a batched pass fails, each
request is rerun alone, so one bad request fails only its own caller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rosa2_dspy.decoding import DecodeBatch, Generation, GenerationRow, generate_rows
from rosa2_dspy.multi_lora import stack_adapters

__all__ = ["Batcher", "DivergenceRow", "Generation", "GenerationRow", "LogProb", "ModelBackend", "ScoreRow",
           "divergence_rows", "generate_rows", "score_rows", "score_width"]

if TYPE_CHECKING:
    from rosa2_dspy.policy import LoRAPolicy

logger = logging.getLogger(__name__)


SCORE_BUCKET = 32  # scoring rows are right-padded to a multiple of this many tokens


def score_width(rows: Sequence["ScoreRow"]) -> int:
    """The padded length of a scoring pass over ``rows``: the longest row, rounded up to SCORE_BUCKET.

    A pass only joins requests of equal width, so a conversation's rows are computed with the same
    shapes whether they run alone or beside other conversations' rows: with a fixed number of torch
    threads, batching does not change a single bit of a conversation's log-probs or gradients.
    """
    longest = max(r.length for r in rows)
    return -(-longest // SCORE_BUCKET) * SCORE_BUCKET


@dataclass
class ScoreRow:
    """One response to score: prompt ids, response ids (end-of-turn included), the adapter.

    ``keep_hidden``: also return the row's final hidden states at positions ``0..L-2`` (the ones that predict
    its tokens 1..L-1; detached). ``reference``: such states of the same text from another pass (e.g. under
    the adapter before a step): the pass also returns the mean per-token ``KL(reference || this row)`` of
    the next-token distributions, as :func:`divergence_rows` would, without a second forward.
    """

    prompt: list[int]
    response: list[int]
    adapter: torch.Tensor
    with_grad: bool = False
    keep_hidden: bool = False
    reference: torch.Tensor | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclass
class LogProb:
    """``log pi(y | x)`` of one response: the sum over its tokens, how many tokens that is, and
    (optionally) the gradient of that sum with respect to the row's adapter, a flat float32 CPU vector;
    the row's hidden states (``ScoreRow.keep_hidden``) and its KL from a reference (``ScoreRow.reference``)."""

    total: float
    num_tokens: int
    grad: torch.Tensor | None = field(default=None, repr=False)
    hidden: torch.Tensor | None = field(default=None, repr=False)
    kl: float | None = None

    @property
    def mean(self) -> float:
        return self.total / max(self.num_tokens, 1)


def score_rows(policy: "LoRAPolicy", rows: Sequence[ScoreRow]) -> list[LogProb]:
    """``log pi(y | x)`` of every row in one right-padded forward, and per-row gradients in one backward."""
    model, device = policy.causal_lm, policy.device
    with_grad = any(r.with_grad for r in rows)
    n, width = len(rows), score_width(rows)
    ids = torch.full((n, width), policy.tokenizer.pad_token_id, dtype=torch.long)
    row_index, position = [], []
    for i, row in enumerate(rows):
        ids[i, : row.length] = torch.tensor(row.prompt + row.response)
        start = len(row.prompt)
        position.extend(range(start - 1, row.length - 1))  # the hidden state that predicts each response token
        row_index.extend([i] * len(row.response))
        if row.reference is not None and row.reference.shape[0] != row.length - 1:
            raise ValueError(f"A reference holds the hidden states of {row.reference.shape[0]} positions; this row "
                             f"has {row.length - 1}. Pass the states kept (keep_hidden) from a pass over the same text.")
    owner_t = torch.tensor(row_index, device=device)
    targets = ids[row_index, [p + 1 for p in position]].to(device)
    ids = ids.to(device)
    adapters = stack_adapters([r.adapter for r in rows], device).requires_grad_(with_grad)
    head = model.get_output_embeddings()
    with torch.set_grad_enabled(with_grad), policy.multi_lora.active(adapters):
        # Right padding and a causal mask: real tokens never see the padding, so no attention mask is needed.
        states = model.get_decoder()(input_ids=ids).last_hidden_state
        logits = head(states[owner_t, torch.tensor(position, device=device)])
        if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision softmax loses too much
            logits = logits.float()
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        totals = torch.zeros(n, dtype=token_logprobs.dtype, device=device).index_add(0, owner_t, token_logprobs)
        grads = torch.autograd.grad(totals.sum(), adapters)[0].float().cpu() if with_grad else None
    results = []
    with torch.no_grad():
        for i, row in enumerate(rows):
            own = states[i, : row.length - 1].detach()
            results.append(LogProb(
                float(totals[i].detach()), len(row.response),
                grads[i].clone() if grads is not None and row.with_grad else None,
                hidden=own.clone() if row.keep_hidden else None,
                kl=None if row.reference is None else _mean_kl(head, row.reference.to(device), own)))
    return results


def _mean_kl(head: torch.nn.Module, reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of ``KL(p || q)``, the next-token distributions that the final hidden states
    ``reference`` and ``other`` (``[positions, d]``, the same text) give through the output ``head``."""
    p = torch.log_softmax(head(reference).float(), dim=-1)
    q = torch.log_softmax(head(other).float(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@dataclass
class DivergenceRow:
    """A (prompt, response) text under two adapters: how far apart are the model's predictions?"""

    prompt: list[int]
    response: list[int]
    adapter: torch.Tensor  # the reference (e.g. before a step)
    other: torch.Tensor  # the candidate (e.g. after it)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


@torch.no_grad()
def divergence_rows(policy: "LoRAPolicy", rows: Sequence[DivergenceRow]) -> list[float]:
    """Mean per-token ``KL(pi_adapter || pi_other)`` of the next-token distributions over every position
    of each row's prompt and response, in one right-padded forward of ``2n`` rows (row ``i`` under
    ``adapter``, row ``n + i`` under ``other``)."""
    model, device, n, width = policy.causal_lm, policy.device, len(rows), score_width(rows)
    ids = torch.full((2 * n, width), policy.tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : row.length] = ids[n + i, : row.length] = torch.tensor(row.prompt + row.response)
    adapters = stack_adapters([r.adapter for r in rows] + [r.other for r in rows], device)
    with policy.multi_lora.active(adapters):
        hidden = model.get_decoder()(input_ids=ids.to(device)).last_hidden_state
    head = model.get_output_embeddings()
    # positions 0..L-2 predict real tokens; padding never enters; one row's logits at a time
    return [_mean_kl(head, hidden[i, : row.length - 1], hidden[n + i, : row.length - 1]) for i, row in enumerate(rows)]


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
    """

    def __init__(self, policy: "LoRAPolicy", max_batch: int = 16, wait_ms: float = 5.0,
                 max_score_tokens: int = 8192) -> None:
        if max_batch < 1 or wait_ms < 0 or max_score_tokens < 1:
            raise ValueError("max_batch and max_score_tokens must be >= 1 and wait_ms >= 0.")
        self.policy = policy
        self.max_batch = max_batch
        self.wait_ms = wait_ms
        self.max_score_tokens = max_score_tokens
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._compute_lock = threading.Lock()
        self._held: list[_Job] = []  # taken from the queue but not fitting the pass that was running
        self.passes: dict[str, int] = {kind: 0 for kind in _PASSES}  # how many batched passes ran (for benchmarks)

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
                    decode.step()
                    for first, (job, own) in list(handles.items()):
                        if all(decode.results[h] is not None for h in own):
                            job.future.set_result([decode.results[h] for h in own])
                            del handles[first]
                    while decode.mergeable and not self._held and decode.size < self.max_batch:
                        try:
                            job = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if job.kind == "generate" and decode.size + len(job.rows) <= self.max_batch:
                            self._admit(decode, [job], handles)
                        else:
                            self._held.append(job)
        except Exception as err:  # a failed decode step: rerun each unfinished request alone
            unfinished = [job for job, _ in handles.values()]
            logger.warning("A batched generate pass failed (%s); rerunning its %d requests one by one.",
                           err, len(unfinished))
            for job in unfinished:
                self._run_jobs([job])

    def _admit(self, decode: DecodeBatch, jobs: list[_Job], handles: dict) -> None:
        """Prefill ``jobs``' rows into ``decode`` (one call, grouped by length inside). If that fails, each
        job is tried alone, so a bad request (e.g. an adapter of the wrong size) fails only its caller."""
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
        with self._compute_lock:  # MultiLoRA's per-row state belongs to one pass at a time
            results = run(self.policy, rows)
        self.passes[kind] += 1
        return results


_PASSES: dict[str, Callable] = {"generate": generate_rows, "score": score_rows, "divergence": divergence_rows}
