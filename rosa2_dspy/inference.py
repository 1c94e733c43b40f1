"""Requests to the local model: generation (whole or streamed) and log-probabilities, through the engine.

:class:`Inference` is the part of :class:`~rosa2_dspy.policy.LoRAPolicy` that turns chat messages into the
batching engine's rows (:mod:`rosa2_dspy.engine`) and its results back into text or ``LogProb``: answers
under the policy's own adapter or a given vector, per-sample gradients for the weights step, and the
divergence between two adapters' predictions.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rosa2_dspy.engine import DivergenceRow, Generation, GenerationRow, LogProb, ScoreRow

if TYPE_CHECKING:
    from rosa2_dspy.policy import ChatMessages

logger = logging.getLogger(__name__)


def _stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Where ``text`` ends at its first stop string, if it holds one."""
    return min((text.index(s) for s in stop if s and s in text), default=None)


class _Detokenizer:
    """Token ids in, text out, a piece at a time: transformers' ``TextStreamer`` logic (never half a multi-byte
    character or a word still being spelt), collected instead of printed."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        from transformers import TextStreamer

        self._lock, self._pieces = lock, []
        self._streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        self._streamer.on_finalized_text = lambda text, stream_end=False: self._pieces.append(text)

    def push(self, token: int | None) -> str:
        """The text that ``token`` completes (``None``: the end, flush what is left)."""
        with self._lock:  # the tokenizer is shared; see LoRAPolicy._text_ids
            self._streamer.put(torch.tensor([token])) if token is not None else self._streamer.end()
        text, self._pieces = "".join(self._pieces), []
        return text


class Inference:
    """Generation and scoring for :class:`~rosa2_dspy.policy.LoRAPolicy` (a mixin: it uses the policy's
    tokenisation, adapter vector and :attr:`batcher`)."""


    def generate(
        self,
        messages: ChatMessages,
        *,
        max_new_tokens: int = 256,
        temperature: float | None = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        adapter: torch.Tensor | None = None,
    ) -> tuple[str, int, int, str]:
        """Answer a chat. Returns ``(text, prompt_tokens, completion_tokens, finish_reason)``.

        ``temperature`` 0/None is greedy decoding, which is deterministic. ``adapter`` (a flat vector)
        answers under that adapter instead of the policy's own. Concurrent calls from other threads are
        batched together by :attr:`batcher`, each row under its own adapter.
        """
        prompt, prefixes = self._prompt(messages)
        row = GenerationRow(prompt, self._adapter_or_own(adapter), max_new_tokens, temperature, top_p, seed,
                            prefixes=prefixes)
        out = self.batcher.generate([row])[0]
        return self._result(out, stop, len(prompt))

    def generate_stream(
        self,
        messages: ChatMessages,
        *,
        max_new_tokens: int = 256,
        temperature: float | None = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        adapter: torch.Tensor | None = None,
    ) -> Generator[str, None, tuple[str, int, int, str]]:
        """:meth:`generate`, yielding the answer's text as the tokens are chosen; the generator's return value
        is :meth:`generate`'s tuple, whose text is the yielded pieces joined.

        The row is batched with whatever else is in flight, like any other; only it pays for streaming (a
        queue put per token on the batcher's thread), and the stream ends when the row does, not when its
        batch mates do. Decoding happens here, with transformers' ``TextStreamer``, so a piece never ends
        inside a multi-byte character. Text that could be the start of a ``stop`` string is held back until
        it is known not to be one.
        """
        prompt, prefixes = self._prompt(messages)
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        row = GenerationRow(prompt, self._adapter_or_own(adapter), max_new_tokens, temperature, top_p, seed,
                            prefixes=prefixes, on_token=lambda index, token: tokens.put((index, token)))
        (future,) = self.batcher.submit("generate", [row])
        future.add_done_callback(lambda _: tokens.put(None))
        decoder = _Detokenizer(self.tokenizer, self._tokenizer_lock)
        holdback = max((len(s) - 1 for s in stop if s), default=0)
        text, sent, ids, finished = "", 0, [], False
        while not finished and (item := tokens.get()) is not None:
            index, token = item
            if index < len(ids):  # a failed batched pass is rerun alone: its tokens come again
                continue
            ids.append(token)
            text += decoder.push(token)
            cut = _stop_index(text, stop)
            end = cut if cut is not None else len(text) - holdback
            if end > sent:
                yield text[sent:end]
                sent = end
            # The row is done (the engine's own rule); its batch mates may not be, and need not be waited for.
            finished = token == self.tokenizer.eos_token_id or len(ids) >= max(max_new_tokens, 1)
        # Without the row's last token, the pass ended early: the future holds its error.
        out = Generation(ids, "stop" if ids[-1] == self.tokenizer.eos_token_id else "length") if finished \
            else future.result()[0]
        final, n_in, n_out, finish = self._result(out, stop, len(prompt))
        if final.startswith(text[:sent]):
            if len(final) > sent:
                yield final[sent:]
        else:  # not seen with byte-level tokenizers; the caller has the streamed text, keep it
            logger.warning("Streamed text differs from the decoded answer; keeping the streamed text.")
            final = text[:sent]
        return final, n_in, n_out, finish

    def _result(self, out: Any, stop: Sequence[str], n_prompt: int) -> tuple[str, int, int, str]:
        with self._tokenizer_lock:
            text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
        finish = out.finish_reason
        cut = _stop_index(text, stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        return text, n_prompt, len(out.tokens), finish

    # ------------------------------------------------------------------ log-probabilities

    def logprobs(self, pairs: Sequence[tuple[ChatMessages, str]], *, with_grad: bool = False,
                 adapter: torch.Tensor | None = None, keep_hidden: bool | Sequence[bool] = False,
                 references: Sequence[torch.Tensor | None] | None = None) -> list[LogProb]:
        """``log pi_theta(response | messages)`` of each ``(messages, response)`` pair, summed over the
        response's tokens (end-of-turn included), all in one batched pass.

        With ``with_grad=True`` each result carries ``grad``: the gradient of its own sum with respect to
        the adapter parameters only (a per-sample gradient), a flat float32 CPU vector aligned with
        :meth:`adapter_vector`. ``adapter`` scores under that vector instead of the policy's own.

        ``keep_hidden`` (for all pairs, or one flag per pair) keeps each result's final hidden states
        (``hidden``); ``references`` (one per pair, or None) gives such states of the same pair from an
        earlier pass, and the result's ``kl`` is then :meth:`divergence` from that pass's adapter to this
        one, computed in this same pass.
        """
        vector = self._adapter_or_own(adapter)
        keep = [keep_hidden] * len(pairs) if isinstance(keep_hidden, bool) else list(keep_hidden)
        references = list(references) if references is not None else [None] * len(pairs)
        if len(keep) != len(pairs) or len(references) != len(pairs):
            raise ValueError("keep_hidden and references need one entry per pair.")
        rows = []
        for (messages, response), hidden, reference in zip(pairs, keep, references):
            if not isinstance(response, str):
                raise TypeError(f"response must be a string, got {type(response).__name__}.")
            rows.append(ScoreRow(self._prompt_ids(messages), self._response_ids(response), vector, with_grad,
                                 hidden, reference))
        return self.batcher.score(rows)

    def logprob(self, messages: ChatMessages, response: str, *, with_grad: bool = False,
                adapter: torch.Tensor | None = None) -> LogProb:
        """One pair's :meth:`logprobs`."""
        return self.logprobs([(messages, response)], with_grad=with_grad, adapter=adapter)[0]

    def divergence(self, pairs: Sequence[tuple[ChatMessages, str]], adapter: torch.Tensor,
                   other: torch.Tensor) -> list[float]:
        """For each ``(messages, response)``: the mean per-token ``KL(pi_adapter || pi_other)`` of the
        next-token distributions over the prompt and the response (one batched pass for all pairs)."""
        a, b = self._checked_shape(torch.as_tensor(adapter, dtype=torch.float32)), \
            self._checked_shape(torch.as_tensor(other, dtype=torch.float32))
        rows = [DivergenceRow(self._prompt_ids(m), self._response_ids(r), a, b) for m, r in pairs]
        return self.batcher.divergence(rows)
