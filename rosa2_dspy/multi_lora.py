"""Per-row LoRA adapters on one frozen base model: the arithmetic behind batching many conversations.

A LoRA-adapted linear layer computes ``y = W x + s · B (A x)``. With a different adapter per batch row,
stack the rows' ``A`` as ``[b, r, d_in]`` and ``B`` as ``[b, d_out, r]``; then ``W x`` stays one ordinary
matmul for the whole batch and the low-rank term is two batched matrix products (``torch.bmm``) — the
idea behind Punica's SGMV kernels, S-LoRA and vLLM's multi-LoRA path. There is no Python loop over rows.

The same stacks serve the weights step: when each row has its own copy of the adapter (a leaf tensor
``[b, P]`` with ``requires_grad``), the gradient of the *summed* loss with respect to row ``i`` is exactly
row ``i``'s per-sample gradient, so one forward and one backward give every response's gradient.

Rows are given as flat adapter vectors (the layout of :meth:`LoRAPolicy.adapter_vector`), so a
conversation's whole adaptation state is one tensor that can be stacked with others.

Example:
    >>> rows = MultiLoRA(policy.model, policy.adapter_parameters)          # doctest: +SKIP
    >>> with rows.active(torch.stack([v1, v2])):                            # doctest: +SKIP
    ...     logits = policy.model(input_ids=ids).logits                     # row 0 under v1, row 1 under v2
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def stack_adapters(vectors: Sequence[Any], device: torch.device) -> torch.Tensor:
    """Flat adapter vectors (one per row) as one ``[b, P]`` float32 tensor on ``device``."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vectors]).to(device)


@dataclass
class _Site:
    """One LoRA-adapted linear layer: where its ``A`` and ``B`` live in the flat vector."""

    a_offset: int
    a_shape: tuple[int, int]  # [r, d_in]
    b_offset: int
    b_shape: tuple[int, int]  # [d_out, r]
    scaling: float


class MultiLoRA:
    """Computes every LoRA layer of ``peft_model`` with a per-row adapter while :meth:`active`.

    Outside :meth:`active` the model behaves as before (PEFT's own adapter). Inside, PEFT's adapter
    layers are switched off and a forward hook on each adapted base layer adds the per-row term.
    One caller at a time: the policy's compute lock serialises model use.
    """

    def __init__(self, peft_model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
        from peft.tuners.lora import LoraLayer

        offsets, offset = {}, 0
        for p in params:
            offsets[id(p)] = offset
            offset += p.numel()
        self.size = offset
        self.peft_model = peft_model
        self.sites: list[_Site] = []
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._peft_off = False  # PEFT's own adapter layers are switched off (an active() pass is running)
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if id(a) not in offsets or id(b) not in offsets:
                raise RuntimeError("A LoRA layer's parameters are not among the adapter parameters.")
            index = len(self.sites)
            self.sites.append(_Site(offsets[id(a)], tuple(a.shape), offsets[id(b)], tuple(b.shape),
                                    float(module.scaling["default"])))
            module.get_base_layer().register_forward_hook(self._hook(index))
        if not self.sites:
            raise RuntimeError("No LoRA layer found in the model; PEFT setup went wrong.")

    def _hook(self, index: int):
        site = self.sites[index]

        def add_low_rank_term(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._rows is None:
                return output
            a, b = self._rows[index]  # [n, r, d_in], [n, d_out, r]
            x = args[0]
            low_rank = torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
            return output + (site.scaling * low_rank).to(output.dtype)

        return add_low_rank_term

    def _split(self, vectors: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = vectors.shape[0]
        rows = []
        for s in self.sites:
            a = vectors[:, s.a_offset : s.a_offset + s.a_shape[0] * s.a_shape[1]].reshape(n, *s.a_shape)
            b = vectors[:, s.b_offset : s.b_offset + s.b_shape[0] * s.b_shape[1]].reshape(n, *s.b_shape)
            rows.append((a, b))
        return rows

    @contextlib.contextmanager
    def active(self, vectors: torch.Tensor) -> Iterator[None]:
        """Run the model with row ``i`` of the batch under adapter ``vectors[i]`` (shape ``[b, P]``)."""
        self._check(vectors)
        if self._rows is not None:
            raise RuntimeError("MultiLoRA.active is not re-entrant; the compute lock should prevent this.")
        self._rows = self._split(vectors)
        try:
            if self._peft_off:  # inside a paused pass, which already switched PEFT's own adapter off
                yield
            else:
                self._peft_off = True
                try:
                    with self.peft_model.disable_adapter():
                        yield
                finally:
                    self._peft_off = False
        finally:
            self._rows = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside :meth:`active`: set the running pass's rows aside so that another pass (its own
        :meth:`active`) can run, e.g. a scoring request between two token steps of a decode; they are
        restored after."""
        if self._rows is None:
            raise RuntimeError("paused() is only meaningful inside active().")
        rows, self._rows = self._rows, None
        try:
            yield
        finally:
            self._rows = rows

    def replace(self, vectors: torch.Tensor) -> None:
        """Inside :meth:`active`, run the next passes with these rows instead (rows joining or leaving a
        running decode)."""
        if self._rows is None:
            raise RuntimeError("replace() is only meaningful inside active().")
        self._check(vectors)
        self._rows = self._split(vectors)

    def _check(self, vectors: torch.Tensor) -> None:
        if vectors.dim() != 2 or vectors.shape[1] != self.size:
            raise ValueError(f"Adapter rows must have shape [b, {self.size}], got {tuple(vectors.shape)}.")

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (indices) of the active batch: finished rows stop costing compute."""
        if self._rows is None:
            raise RuntimeError("select() is only meaningful inside active().")
        self._rows = [(a[keep], b[keep]) for a, b in self._rows]
