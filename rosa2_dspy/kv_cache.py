"""The KV cache of a batched decode (:mod:`rosa2_dspy.decoding`): rows cut, stacked and grown in place.

transformers' ``DynamicCache`` holds one ``DynamicLayer`` per model layer, which concatenates the whole cache
at every token. :class:`GrowingLayer` keeps room at the end instead, and :func:`row_cache` builds a cache of
them for a model whose layers allow it (:func:`supports_row_caches`). Imported only when a decode runs, so
``import rosa2_dspy`` does not load transformers.

Example:
    >>> cache = row_cache(model)          # doctest: +SKIP
    >>> model(input_ids=ids, past_key_values=cache, use_cache=True)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def supports_row_caches(model: torch.nn.Module) -> bool:
    """Whether a KV cache of ``model`` can be cut, stacked and copied per row: every layer of its
    ``DynamicCache`` is a plain ``DynamicLayer`` (no sliding window, no quantisation)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends each token's keys and values in place, into room kept at the end.

    ``DynamicLayer.update`` concatenates: every decode step copies the whole cache, so a long answer costs
    time quadratic in its length (on a CPU, a large share of a step at several rows of a few hundred
    tokens; ``speedup_8`` in ``results/bench_sessions.json`` went from 3.9 to 4.5 with this layer). Here the
    cache lives in a buffer with ``SPARE`` free positions; a step writes only its own token, and the
    ``keys``/``values`` the model sees are views of the buffer's filled part. Dropping rows and leading
    padding (:meth:`batch_select_indices`) and stacking rows (:meth:`stack`) copy once, into a fresh
    buffer. Views handed out earlier (e.g. to :class:`~rosa2_dspy.decoding.PrefixCache`) never change:
    later tokens are written past their end, and a layer never writes into a buffer it did not allocate
    (tensors assigned to ``keys``/``values`` from outside are copied into a fresh buffer at the next update).
    """

    SPARE = 128

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._buffers: dict[str, torch.Tensor] = {}  # "keys"/"values" -> the buffer this layer allocated

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append("keys", key_states)
        self._append("values", value_states)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor, start: int = 0) -> None:
        """Keep the rows at ``indices``, and the positions from ``start`` on."""
        if self.get_seq_length() == 0:
            return
        for name in ("keys", "values"):
            kept = getattr(self, name)[..., start:, :]
            torch.index_select(kept, 0, indices, out=self._fresh(name, kept, len(indices), kept.shape[-2]))

    def stack(self, other: DynamicLayer, width: int) -> None:
        """Put ``other``'s rows below these, both left-padded with zeros to ``width`` positions."""
        for name in ("keys", "values"):
            ours, theirs = getattr(self, name), getattr(other, name)
            rows = ours.shape[0]
            filled = self._fresh(name, ours, rows + theirs.shape[0], width, zero=True)
            filled[:rows, :, width - ours.shape[-2]:, :] = ours
            filled[rows:, :, width - theirs.shape[-2]:, :] = theirs

    def _fresh(self, name: str, like: torch.Tensor, rows: int, length: int, room: int = 0,
               zero: bool = False) -> torch.Tensor:
        """A new buffer for ``name`` with ``rows`` rows and ``length + room + SPARE`` positions; its first
        ``length`` positions become ``name`` (and are returned, to be filled by the caller)."""
        make = like.new_zeros if zero else like.new_empty
        buffer = make((rows, like.shape[1], length + room + self.SPARE, like.shape[-1]))
        self._buffers[name] = buffer
        setattr(self, name, buffer[..., :length, :])
        return getattr(self, name)

    def _append(self, name: str, new: torch.Tensor) -> None:
        filled, buffer = getattr(self, name), self._buffers.get(name)
        n, k = (filled.shape[-2] if filled.numel() else 0), new.shape[-2]
        ours = buffer is not None and filled._base is buffer and filled.storage_offset() == 0 \
            and filled.shape[:-2] == buffer.shape[:-2]
        if not ours or n + k > buffer.shape[-2]:
            old = filled
            filled = self._fresh(name, new, new.shape[0], n, room=k)
            if n:
                filled[...] = old
            buffer = self._buffers[name]
        buffer[..., n : n + k, :] = new
        setattr(self, name, buffer[..., : n + k, :])


def row_cache(model: torch.nn.Module, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A KV cache for :class:`~rosa2_dspy.decoding.DecodeBatch`: one :class:`GrowingLayer` per layer of
    ``model`` (whose layers must pass :func:`supports_row_caches`), filled with ``layers``' keys and values."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    for layer, (keys, values) in zip(cache.layers, layers or []):
        layer.update(keys, values)
    return cache
