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
    """A ``DynamicLayer`` whose rows are appended to, cut and stacked in place, in a buffer with room to spare.

    ``DynamicLayer.update`` concatenates: every decode step copies the whole cache, so a long answer costs
    time quadratic in its length (on a CPU, a large share of a step at several rows of a few hundred
    tokens; ``speedup_8`` in ``results/bench_sessions.json`` went from 3.9 to 4.5 with appends in place).
    Here ``keys``/``values`` are views ``buffer[:rows, :, start:end]`` of a buffer with ``SPARE`` free
    positions on each side and, once rows have joined, free rows below:

    * a token step writes only its own column (:meth:`update`);
    * rows that join a running batch are written into free rows, and a longer newcomer widens the window
      to the left (:meth:`stack`); the columns that become visible are zeroed, as padding is;
    * rows that leave are replaced by rows from the end of the batch (the order DecodeBatch asks for), and
      leading padding that no row needs any more is dropped by moving ``start``
      (:meth:`batch_select_indices`): only moved rows are copied.

    A new buffer (with twice the rows, when rows ran out) is allocated only when the room runs out.
    Views given out by :meth:`keep` (to :class:`~rosa2_dspy.decoding.PrefixCache`) never change: rows
    never move within a buffer that gave one out, and later tokens are written past their end. Other views,
    such as those :meth:`update` returns, hold until the layer next changes. A layer never writes into a
    tensor it did not allocate (tensors assigned to ``keys``/``values`` from outside are copied first).
    """

    SPARE = 128

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._buffers: dict[str, torch.Tensor] = {}  # "keys"/"values" -> the buffer this layer allocated
        self._views: dict[str, torch.Tensor] = {}  # the views of them last set as keys/values
        self._start = 0  # the buffer column where keys and values begin
        self._kept = False  # keep() gave out views of these buffers: their rows never move

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, length, new = key_states.shape[0], self.get_seq_length(), key_states.shape[-2]
        if length and rows != self.keys.shape[0]:
            raise ValueError(f"This cache holds {self.keys.shape[0]} rows; an update brought {rows}.")
        self._room(rows, after=new, like=(key_states, value_states))
        end = self._start + length
        for name, states in (("keys", key_states), ("values", value_states)):
            self._buffers[name][:rows, :, end : end + new] = states
            self._set(name, rows, self._start, end + new)
        return self.keys, self.values

    def keep(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the first ``end`` positions, as views that will never change."""
        self._kept = True
        return self.keys[..., :end, :], self.values[..., :end, :]

    def batch_select_indices(self, indices: torch.Tensor, start: int = 0) -> None:
        """Keep the rows at ``indices``, in that order, and the positions from ``start`` on."""
        if self.get_seq_length() == 0:
            return
        self._room(self.keys.shape[0], fresh=self._kept)  # rows given out by keep() never move
        begin, end = self._start + start, self._start + self.get_seq_length()
        order = indices.tolist()
        read_at = {i: j for j, i in enumerate(order)}
        # Row by row in increasing j is safe when no row is written before it is read (rows that leave make
        # room for rows after them, as DecodeBatch orders them); other orders gather the rows first.
        row_by_row = all(i == j or read_at.get(j, -1) < j for j, i in enumerate(order))
        for name in ("keys", "values"):
            buffer = self._buffers[name]
            if not row_by_row:
                buffer[: len(order), :, begin:end] = buffer[indices, :, begin:end]
            for j, i in enumerate(order if row_by_row else ()):
                if i != j:
                    buffer[j, :, begin:end] = buffer[i, :, begin:end]
            self._set(name, len(order), begin, end)
        self._start = begin

    def stack(self, other: DynamicLayer, width: int) -> None:
        """Put ``other``'s rows below these, both left-padded with zeros to ``width`` positions."""
        rows, length, joining = self.keys.shape[0], self.get_seq_length(), other.keys.shape[0]
        self._room(rows + joining, before=width - length, like=(other.keys, other.values))
        end = self._start + length
        begin = end - width
        for name in ("keys", "values"):
            buffer, theirs = self._buffers[name], getattr(other, name)
            buffer[:rows, :, begin : self._start] = 0
            buffer[rows : rows + joining, :, begin : end - theirs.shape[-2]] = 0
            buffer[rows : rows + joining, :, end - theirs.shape[-2] : end] = theirs
            self._set(name, rows + joining, begin, end)
        self._start = begin

    def _set(self, name: str, rows: int, start: int, end: int) -> None:
        view = self._buffers[name][:rows, :, start:end]
        self._views[name] = view
        setattr(self, name, view)

    def _ours(self) -> bool:
        """``keys`` and ``values`` are still the views this layer set (not tensors assigned from outside)."""
        return all(name in self._views and getattr(self, name) is self._views[name] for name in ("keys", "values"))

    def _room(self, rows: int, after: int = 0, before: int = 0, like: tuple[torch.Tensor, torch.Tensor] | None = None,
              fresh: bool = False) -> None:
        """Make sure keys and values sit in buffers of this layer's with at least ``rows`` rows, ``before``
        free positions before them and ``after`` after them; otherwise (or with ``fresh``) copy them into
        new buffers (``like``: tensors with the heads, head size and dtype to allocate for)."""
        buffer, length = self._buffers.get("keys"), self.get_seq_length()
        if not fresh and self._ours() and rows <= buffer.shape[0] and before <= self._start \
                and self._start + length + after <= buffer.shape[-2]:
            return
        had = buffer.shape[0] if buffer is not None else 0
        capacity = max(rows, 2 * had) if 0 < had < rows else rows
        start = before + self.SPARE
        for name, model in zip(("keys", "values"), like or (self.keys, self.values)):
            filled = getattr(self, name)
            self._buffers[name] = model.new_empty((capacity, model.shape[1], start + length + after + self.SPARE,
                                                   model.shape[-1]))
            if length:
                self._buffers[name][: filled.shape[0], :, start : start + length] = filled
            self._set(name, filled.shape[0] if length else 0, start, start + length)
        self._start, self._kept = start, False


def row_cache(model: torch.nn.Module, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A KV cache for :class:`~rosa2_dspy.decoding.DecodeBatch`: one :class:`GrowingLayer` per layer of
    ``model`` (whose layers must pass :func:`supports_row_caches`), filled with ``layers``' keys and values."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    for layer, (keys, values) in zip(cache.layers, layers or []):
        layer.update(keys, values)
    return cache
