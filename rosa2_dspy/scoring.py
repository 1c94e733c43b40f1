"""Scoring for the weights step: ``log pi(y | x)`` of many responses, their per-sample gradients, KL checks.

Every row carries its own LoRA adapter (:class:`~rosa2_dspy.multi_lora.MultiLoRA`), so one pass serves
the rows of many conversations; :class:`~rosa2_dspy.engine.Batcher` coalesces concurrent requests.

* :func:`score_rows` — ``log pi(y | x)`` of (prompt, response) rows and, on request, every row's
  gradient with respect to its own adapter copy (per-sample gradients: one forward, one backward).
  Rows that share a prompt and an adapter (the responses of one ROSA step) **share the prompt's
  forward pass**: the prompt runs once, its KV cache is handed to every response as a per-row copy,
  and each row's gradient is its response part plus the prompt part, obtained by pulling that row's
  gradient with respect to the prompt's keys, values and last hidden state back through the one
  prompt pass (a batched vector-Jacobian product). The result equals the per-row passes up to float
  rounding; the saving is ``n - 1`` prompt forwards. Other rows are right-padded into one pass (so
  every real token sees exactly what it would alone).
* A row may keep its final hidden states, or bring those of another pass over the same text to be
  compared with (mean per-token KL): the weights step's check rides on the passes it makes anyway.
* :func:`divergence_rows` — how far a candidate adapter moves the model's next-token predictions from a
  reference adapter over a text (mean per-token KL).

Example:
    >>> row = ScoreRow(prompt_ids, response_ids, adapter_vector, with_grad=True)   # doctest: +SKIP
    >>> score_rows(policy, [row])[0].grad.shape                                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rosa2_dspy.decoding import cache_keyword
from rosa2_dspy.multi_lora import stack_adapters

if TYPE_CHECKING:
    from rosa2_dspy.policy import LoRAPolicy


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


def score_rows(policy: "LoRAPolicy", rows: Sequence[ScoreRow], share_prompts: bool = True) -> list[LogProb]:
    """``log pi(y | x)`` of every row (and per-row gradients on request), in one pass per shared prompt.

    With ``share_prompts``, rows of one request that share a prompt (the same token ids and the same
    adapter tensor, as the responses of one ROSA step do) run the prompt once (:func:`_score_shared`);
    the other rows (all rows, without it) run in one right-padded pass (:func:`_score_padded`).
    Grouping looks at one request's rows only (the adapter *object*), so a conversation's rows are
    computed the same way alone or beside other conversations.
    """
    for row in rows:
        if row.reference is not None and row.reference.shape[0] != row.length - 1:
            raise ValueError(f"A reference holds the hidden states of {row.reference.shape[0]} positions; this row "
                             f"has {row.length - 1}. Pass the states kept (keep_hidden) from a pass over the same text.")
    from rosa2_dspy.kv_cache import supports_row_caches

    groups: dict[tuple, list[int]] = {}
    sharing = share_prompts and supports_row_caches(policy.causal_lm)
    for i, row in enumerate(rows):
        key = (tuple(row.prompt), id(row.adapter), row.with_grad) if sharing and len(row.prompt) > 1 else (i,)
        groups.setdefault(key, []).append(i)
    results: list[LogProb | None] = [None] * len(rows)
    passes = [(_score_shared, g) for g in groups.values() if len(g) > 1]
    singles = [g[0] for g in groups.values() if len(g) == 1]
    if singles:
        passes.append((_score_padded, singles))
    for run, part in passes:
        for i, result in zip(part, run(policy, [rows[i] for i in part])):
            results[i] = result
    return results


def _result(head: torch.nn.Module, row: ScoreRow, total: torch.Tensor, grad: torch.Tensor | None,
            own: torch.Tensor) -> LogProb:
    """A row's :class:`LogProb` from its summed log-prob, its gradient and its final hidden states ``own``
    (positions ``0..L-2``)."""
    with torch.no_grad():
        return LogProb(float(total.detach()), len(row.response),
                       grad.clone() if grad is not None and row.with_grad else None,
                       hidden=own.detach().clone() if row.keep_hidden else None,
                       kl=None if row.reference is None else _mean_kl(head, row.reference.to(own.device),
                                                                       own.detach()))


def _logprob_totals(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor,
                    n: int) -> torch.Tensor:
    """Summed ``log p(target)`` per row from the hidden states that predict each target token."""
    logits = head(states)
    if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision softmax loses too much
        logits = logits.float()
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    return torch.zeros(n, dtype=token_logprobs.dtype, device=states.device).index_add(0, owner, token_logprobs)


def _score_padded(policy: "LoRAPolicy", rows: Sequence[ScoreRow]) -> list[LogProb]:
    """All rows in one right-padded forward (and one backward for their per-row gradients)."""
    model, device = policy.causal_lm, policy.device
    with_grad = any(r.with_grad for r in rows)
    n, width = len(rows), score_width(rows)
    ids = torch.full((n, width), policy.tokenizer.pad_token_id, dtype=torch.long)
    row_index, position = [], []
    for i, row in enumerate(rows):
        ids[i, : row.length] = torch.tensor(row.prompt + row.response)
        position.extend(range(len(row.prompt) - 1, row.length - 1))  # the states that predict the response
        row_index.extend([i] * len(row.response))
    owner = torch.tensor(row_index, device=device, dtype=torch.long)
    targets = ids[row_index, [p + 1 for p in position]].to(device)
    adapters = stack_adapters([r.adapter for r in rows], device).requires_grad_(with_grad)
    head = model.get_output_embeddings()
    with torch.set_grad_enabled(with_grad), policy.multi_lora.active(adapters):
        # Right padding and a causal mask: real tokens never see the padding, so no attention mask is needed.
        states = model.get_decoder()(input_ids=ids.to(device)).last_hidden_state
        totals = _logprob_totals(head, states[owner, torch.tensor(position, device=device, dtype=torch.long)],
                                 targets, owner, n)
        grads = torch.autograd.grad(totals.sum(), adapters)[0].float().cpu() if with_grad else None
    return [_result(head, row, totals[i], None if grads is None else grads[i], states[i, : row.length - 1])
            for i, row in enumerate(rows)]


def _score_shared(policy: "LoRAPolicy", rows: Sequence[ScoreRow]) -> list[LogProb]:
    """Rows with one prompt and one adapter: the prompt runs once, each response on a copy of its cache.

    Row ``i``'s gradient is its response part (its own adapter copy in the response pass) plus its prompt
    part: the gradient of row ``i``'s log-prob with respect to the prompt's keys, values and last hidden
    state, pulled back through the one prompt pass — all rows at once with a batched vector-Jacobian
    product (``is_grads_batched``), or one row at a time where the model's ops do not allow that."""
    from transformers import DynamicCache

    model, device = policy.causal_lm, policy.device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cache_kw = cache_keyword(type(decoder))
    with_grad = rows[0].with_grad
    n, prompt = len(rows), rows[0].prompt
    start, width = len(prompt), max(len(r.response) for r in rows)
    shared = stack_adapters([rows[0].adapter], device).requires_grad_(with_grad)
    own_rows = shared.detach().expand(n, -1).clone().requires_grad_(with_grad)
    ids = torch.full((n, width), policy.tokenizer.pad_token_id, dtype=torch.long)
    row_index, column = [], []
    for i, row in enumerate(rows):
        ids[i, : len(row.response)] = torch.tensor(row.response)
        row_index.extend([i] * len(row.response))
        column.extend(range(len(row.response)))
    owner = torch.tensor(row_index, device=device, dtype=torch.long)
    column_t = torch.tensor(column, device=device, dtype=torch.long)
    ids = ids.to(device)
    with torch.set_grad_enabled(with_grad):
        cache = DynamicCache(config=model.config)
        with policy.multi_lora.active(shared):
            prompt_states = decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True,
                                    **{cache_kw: cache}).last_hidden_state  # [1, start, d]
        outputs = [t for layer in cache.layers for t in (layer.keys, layer.values)] + [prompt_states[:, -1]]
        copies = [t.detach().expand(n, *t.shape[1:]).clone().requires_grad_(with_grad) for t in outputs]
        row_cache = DynamicCache(ddp_cache_data=list(zip(copies[:-1:2], copies[1:-1:2])))
        positions = torch.arange(start, start + width, device=device)[None].expand(n, -1)
        with policy.multi_lora.active(own_rows):
            # Right padding after the shared prompt: real tokens never see the padding.
            states = decoder(input_ids=ids, position_ids=positions, use_cache=True,
                             **{cache_kw: row_cache}).last_hidden_state  # [n, width, d]
        predicting = torch.cat([copies[-1][:, None], states[:, :-1]], dim=1)  # [n, width, d]: state before token j
        totals = _logprob_totals(head, predicting[owner, column_t], ids[owner, column_t], owner, n)
        grads = None
        if with_grad:
            parts = torch.autograd.grad(totals.sum(), [own_rows, *copies], allow_unused=True)
            cotangents = [torch.zeros_like(c) if g is None else g for g, c in zip(parts[1:], copies)]
            grads = (parts[0] + _pull_back(outputs, shared, cotangents)).float().cpu()
    prompt_own = prompt_states[0].detach()
    return [_result(head, row, totals[i], None if grads is None else grads[i],
                    torch.cat([prompt_own, states[i, : len(row.response) - 1].detach()]))
            for i, row in enumerate(rows)]


def _pull_back(outputs: list[torch.Tensor], leaf: torch.Tensor, cotangents: list[torch.Tensor]) -> torch.Tensor:
    """``[n, P]``: for each row ``i``, the vector-Jacobian product of ``outputs`` (computed once, batch 1)
    with row ``i``'s cotangents (``cotangents[k][i]``), with respect to ``leaf`` (``[1, P]``)."""
    used = [k for k, t in enumerate(outputs) if t.requires_grad]  # e.g. keys of a layer before any adapter
    outputs = [outputs[k] for k in used]
    batched = [cotangents[k].unsqueeze(1) for k in used]  # [n, 1, ...]: one cotangent per row
    try:
        return torch.autograd.grad(outputs, leaf, grad_outputs=batched, is_grads_batched=True,
                                   retain_graph=True)[0][:, 0]
    except RuntimeError:  # an op without a batching rule: one row at a time
        return torch.cat([torch.autograd.grad(outputs, leaf, grad_outputs=[c[i] for c in batched],
                                              retain_graph=True)[0] for i in range(len(batched[0]))])


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


