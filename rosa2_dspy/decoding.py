"""Batched decoding with a different LoRA adapter per row, which rows can join between token steps.

:class:`DecodeBatch` is the generation half of the batching engine (:mod:`rosa2_dspy.engine`), built
the way multi-LoRA servers schedule work (Orca's iteration-level scheduling, vLLM's continuous
batching), on :class:`~rosa2_dspy.multi_lora.MultiLoRA`:

* **Prefill without padding waste.** Rows that join are prefilled in groups of similar prompt length
  (a group pads at most 1/8 of its tokens); a row unlike the others is prefilled alone, exactly as it
  would be if it were the only request. Their KV caches are then left-padded to one width and stacked.
* **One decode step for every row.** Each step is one base-model pass over the whole batch plus each
  row's low-rank term; an attention mask hides each row's padding.
* **Rows come and go.** A finished row (end-of-turn or its own token budget) leaves the batch, its
  cache and its adapter at once, and its caller gets its answer then, not when the batch ends. New rows
  may join a running batch between steps (:meth:`DecodeBatch.admit`), so a request that arrives
  while others decode waits at most one step, not a whole answer.

:func:`generate_rows` runs one batch of rows to the end (no rows joining): the unit that tests compare
with one row alone and with transformers' own ``generate``.

Example:
    >>> rows = [GenerationRow(prompt_ids, adapter_vector, max_new_tokens=32)]   # doctest: +SKIP
    >>> generate_rows(policy, rows)[0].tokens                                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rosa2_dspy.multi_lora import stack_adapters

if TYPE_CHECKING:
    from rosa2_dspy.policy import LoRAPolicy

PREFILL_WASTE = 0.125  # a prefill group pads at most this share of its tokens


@dataclass
class GenerationRow:
    """One prompt to answer: token ids, the adapter to answer under, and how to decode."""

    prompt: list[int]
    adapter: torch.Tensor
    max_new_tokens: int = 256
    temperature: float | None = 0.0
    top_p: float | None = None
    seed: int | None = None
    # Ends of the prompt's reusable prefixes, increasing: the system message (which every call of a DSPy
    # predictor repeats) and the messages before the last (a predictor's demos). Their KV caches are kept
    # (PrefixCache) and reused under the same adapter; the prompt is always prefilled in the chunks these
    # cuts make, cached or not, so an answer never depends on what was cached. (): one chunk, no cache.
    prefixes: tuple[int, ...] = ()
    # Streaming rows only: called on the batcher's thread with (index, token id) as each token is chosen.
    # Keep it cheap (e.g. a queue's put): the whole batch waits for it.
    on_token: Callable[[int, int], None] | None = field(default=None, repr=False)

    @property
    def sample(self) -> bool:
        return bool(self.temperature) and self.temperature > 0


@dataclass
class Generation:
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-turn) or "length"


def _next_tokens(logits: torch.Tensor, rows: Sequence[GenerationRow], generators: list) -> torch.Tensor:
    """Greedy for every row at once; sampled rows (temperature > 0) draw from their own generator."""
    tokens = logits.argmax(dim=-1)
    for j, row in enumerate(rows):  # only sampled rows; greedy decoding never enters this loop's body
        if not row.sample:
            continue
        probs = torch.softmax(logits[j].float() / row.temperature, dim=-1)
        if row.top_p is not None and row.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < row.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens[j] = torch.multinomial(probs.cpu(), 1, generator=generators[j])[0]
    return tokens


@functools.cache
def cache_keyword(model_class: type) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def prefill_groups(lengths: Sequence[int], waste: float = PREFILL_WASTE) -> list[list[int]]:
    """Indices grouped for prefill: similar lengths together, so left padding costs at most ``waste``
    of a group's tokens. Equal lengths always share a group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            tokens = sum(lengths[j] for j in group) + lengths[i]
            if lengths[i] * (len(group) + 1) <= (1 + waste) * tokens:  # lengths[i] is the group's longest
                group.append(i)
                continue
        groups.append([i])
    return groups


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """An attention mask ``[b, s]`` padded with zeros on the left to ``width`` columns."""
    return torch.nn.functional.pad(mask, (width - mask.shape[-1], 0))


MIN_PREFIX = 16  # shorter prefixes are not worth a cache entry


class PrefixCache:
    """The KV caches of prompt prefixes per adapter, least recently used evicted first.

    A row with ``prefixes`` (the end of its system message; the end of the messages before its last, which
    for a DSPy predictor with demos is the demo block) is always prefilled in the chunks they cut: each
    prefix on top of the one before (or its cached KV, keyed by the adapter's values and the prefix's
    tokens), then the rest. The longest cached prefix is used, so calls that share a system message and
    demos (the words step's refiner, under the base weights for every conversation) prefill only their
    last message. A row's answer does not depend on what was cached, nor on which requests came before
    it. ``max_tokens`` bounds the memory (the embedded 135M model: ~46 KB per token in float32, so the
    default 8192 is ~0.4 GB); 0 turns caching off.

    Example:
        >>> policy.prefix_cache = PrefixCache(max_tokens=4096)   # doctest: +SKIP
        >>> policy.prefix_cache.hits, policy.prefix_cache.misses  # doctest: +SKIP
    """

    def __init__(self, max_tokens: int = 8192) -> None:
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0 (0 turns the prefix cache off).")
        self.max_tokens = max_tokens
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(prefix: Sequence[int], adapter: torch.Tensor) -> tuple:
        digest = hashlib.blake2b(adapter.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16)
        return digest.hexdigest(), tuple(prefix)

    def get(self, key: tuple) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = len(key[1])
        with self._lock:
            if size > self.max_tokens or key in self._entries:
                return
            self._entries[key] = layers
            self._tokens += size
            while self._tokens > self.max_tokens:
                old, _ = self._entries.popitem(last=False)
                self._tokens -= len(old[1])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._tokens = 0


class DecodeBatch:
    """A running decode over rows that each have their own adapter; rows join and leave between steps.

    Use as a context manager around every call (the model runs with per-row adapters inside it), under
    the caller's compute lock::

        with DecodeBatch(policy) as batch:
            handles = batch.admit(rows)
            while batch.size:
                for handle in batch.step():
                    print(batch.results[handle].tokens)
    """

    def __init__(self, policy: "LoRAPolicy") -> None:
        from transformers import DynamicCache

        self.policy = policy
        self.model, self.device = policy.causal_lm, policy.device
        self.eos, self.pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
        self._cache_kw = cache_keyword(type(self.model))
        from rosa2_dspy.kv_cache import row_cache, supports_row_caches

        # Rows can be merged into a running batch only when every cache layer is a plain DynamicLayer (no
        # sliding window or quantised cache); otherwise rows are prefilled together, as one group.
        self.mergeable = supports_row_caches(self.model)
        self._new_cache = (lambda: row_cache(self.model)) if self.mergeable \
            else (lambda: DynamicCache(config=self.model.config))
        self.results: list[Generation | None] = []  # by handle; None while the row decodes
        self._partial: dict[int, list[int]] = {}  # by handle: the tokens chosen so far
        self._rows: list[GenerationRow] = []  # by handle
        self._generators: list[torch.Generator] = []  # by handle
        self._alive: list[int] = []  # handles of the rows in the batch, in batch order
        self._vectors: torch.Tensor | None = None  # [n, P] adapters of the batch's rows
        self._cache = None
        self._mask: torch.Tensor | None = None  # [n, width]
        self._next_position: torch.Tensor | None = None  # [n, 1]
        self._logits: torch.Tensor | None = None  # [n, V]: what each row's next token is chosen from
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "DecodeBatch":
        self._stack.enter_context(self.policy.multi_lora.active(
            torch.zeros((0, self.policy.multi_lora.size), device=self.device)))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def size(self) -> int:
        """Rows still decoding."""
        return len(self._alive)

    @torch.no_grad()
    def admit(self, rows: Sequence[GenerationRow]) -> list[int]:
        """Prefill ``rows`` and add them to the batch; returns their handles (indices into ``results``).

        If the prefill fails (e.g. an adapter of the wrong size), the batch is left as it was and the
        error is raised to the caller: the rows already decoding are not affected."""
        rows = list(rows)
        vectors = stack_adapters([r.adapter for r in rows], self.device)
        if self.size and not self.mergeable:
            raise RuntimeError("This model's KV cache cannot take rows into a running batch.")
        prefixed = [i for i, r in enumerate(rows) if self._cuts(r)]  # each alone, through the prefix cache
        rest = [i for i in range(len(rows)) if i not in prefixed]
        grouped = [[rest[j] for j in g] for g in prefill_groups([len(rows[i].prompt) for i in rest])] \
            if self.mergeable else [rest] if rest else []
        groups = [[i] for i in prefixed] + grouped
        try:
            parts = [self._prefill_with_prefix(rows[i], vectors[[i]]) for i in prefixed] + \
                    [self._prefill([rows[i] for i in g], vectors[g]) for g in grouped]
        finally:
            if self._vectors is not None:
                self.policy.multi_lora.replace(self._vectors)
        order = [i for g in groups for i in g]
        handles = list(range(len(self.results), len(self.results) + len(rows)))
        for row in rows:
            self.results.append(None)
            self._rows.append(row)
            g = torch.Generator()
            if row.sample:
                g.manual_seed(row.seed if row.seed is not None else int(torch.randint(2**31, ()).item()))
            self._generators.append(g)
        for part in parts:
            self._merge(*part)
        self._alive.extend(handles[i] for i in order)
        self._vectors = vectors[order] if self._vectors is None else torch.cat([self._vectors, vectors[order]])
        self.policy.multi_lora.replace(self._vectors)
        return handles

    def _prefill(self, rows: list[GenerationRow], vectors: torch.Tensor):
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every prompt ends at the same column
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        self.policy.multi_lora.replace(vectors)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self._cache_kw: cache}).logits[:, -1]
        return cache, mask, positions[:, -1:] + 1, logits

    def _cuts(self, row: GenerationRow) -> list[int]:
        """Where ``row``'s prompt is cut into cached prefixes (none: prefilled in one chunk)."""
        cache = self.policy.prefix_cache
        if not (self.mergeable and cache is not None and cache.max_tokens > 0):
            return []
        return sorted({cut for cut in row.prefixes if MIN_PREFIX <= cut < len(row.prompt)})

    def _prefill_with_prefix(self, row: GenerationRow, vector: torch.Tensor):
        """One row: the KV of its longest cached prefix, each longer prefix prefilled on top (and cached),
        then the rest of its prompt."""
        from rosa2_dspy.kv_cache import row_cache

        cuts, store = self._cuts(row), self.policy.prefix_cache
        keys = {cut: store.key(row.prompt[:cut], vector[0]) for cut in cuts}  # each hashes the adapter once
        self.policy.multi_lora.replace(vector)
        done, layers = 0, None
        for cut in reversed(cuts):
            layers = store.get(keys[cut])
            if layers is not None:
                done = cut
                break
        # The cached tensors themselves are never written to: row_cache copies them into buffers of its own.
        cache = row_cache(self.model, layers)
        for end in [*(cut for cut in cuts if cut > done), len(row.prompt)]:
            mask = torch.ones((1, end), dtype=torch.long, device=self.device)
            positions = torch.arange(done, end, device=self.device)[None]
            logits = self.model(input_ids=torch.tensor([row.prompt[done:end]], device=self.device),
                                attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                                **{self._cache_kw: cache}).logits[:, -1]
            if end < len(row.prompt):
                store.put(keys[end], [layer.keep(end) for layer in cache.layers])
            done = end
        return cache, mask, positions[:, -1:] + 1, logits

    def _merge(self, cache, mask: torch.Tensor, next_position: torch.Tensor, logits: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask, self._next_position, self._logits = cache, mask, next_position, logits
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for ours, theirs in zip(self._cache.layers, cache.layers):  # GrowingLayers: only such caches merge
            ours.stack(theirs, width)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._next_position = torch.cat([self._next_position, next_position])
        self._logits = torch.cat([self._logits, logits])

    @torch.no_grad()
    def step(self) -> list[int]:
        """Choose every row's next token and run one decode pass; returns the handles that finished."""
        rows = [self._rows[h] for h in self._alive]
        tokens = _next_tokens(self._logits, rows, [self._generators[h] for h in self._alive])
        keep, finished = [], []
        for j, (handle, token) in enumerate(zip(self._alive, tokens.tolist())):
            row, out = self._rows[handle], self._partial.setdefault(handle, [])
            out.append(token)
            if row.on_token is not None:
                row.on_token(len(out) - 1, token)
            if token == self.eos or len(out) >= row.max_new_tokens:
                self.results[handle] = Generation(self._partial.pop(handle), "stop" if token == self.eos else "length")
                finished.append(handle)
            else:
                keep.append(j)
        if len(keep) < len(self._alive):
            keep = self._select(keep)
        if keep:
            tokens = tokens[torch.tensor(keep)] if finished else tokens
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(keep), 1))], dim=1)
            self._logits = self.model(input_ids=tokens[:, None].to(self.device), attention_mask=self._mask,
                                      position_ids=self._next_position, use_cache=True,
                                      **{self._cache_kw: self._cache}).logits[:, -1]
            self._next_position = self._next_position + 1
        return finished

    def _select(self, keep: list[int]) -> list[int]:
        """Drop finished rows from the batch, its cache, its adapters; and padding no row needs any more.

        Rows from the end of the batch fill the gaps that finished rows leave, so that the cache copies only
        as many rows as left (:meth:`~rosa2_dspy.kv_cache.GrowingLayer.batch_select_indices`). Returns the
        new order: row ``j`` of the batch is the old row ``order[j]``."""
        order, staying = list(range(len(keep))), set(keep)  # new row j is old row order[j]
        gaps = [j for j in order if j not in staying]
        for gap, j in zip(gaps, [j for j in keep if j >= len(keep)]):
            order[gap] = j
        keep = order
        self._alive = [self._alive[j] for j in keep]
        if not keep:
            self._cache = self._mask = self._next_position = self._logits = self._vectors = None
            self.policy.multi_lora.replace(torch.zeros((0, self.policy.multi_lora.size), device=self.device))
            return keep
        index = torch.tensor(keep, device=self.device)
        self._mask, self._next_position = self._mask[index], self._next_position[index]
        self._logits, self._vectors = self._logits[index], self._vectors[index]
        self.policy.multi_lora.select(index)
        if not self.mergeable:
            self._cache.batch_select_indices(index)
            return keep
        unused = int((self._mask.sum(0) == 0).cumprod(0).sum())  # leading columns that are padding in every row
        for layer in self._cache.layers:  # rows moved into the gaps, leading padding dropped, in place
            layer.batch_select_indices(index, start=unused)
        self._mask = self._mask[:, unused:]
        return keep


def generate_rows(policy: "LoRAPolicy", rows: Sequence[GenerationRow]) -> list[Generation]:
    """Answer every row in one batched decode; row ``i`` runs under its own adapter ``rows[i].adapter``."""
    with DecodeBatch(policy) as batch:
        handles = batch.admit(rows)
        while batch.size:
            batch.step()
        return [batch.results[h] for h in handles]
