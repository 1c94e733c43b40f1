"""The torch side of the local model: a transformers causal LM with a PEFT LoRA adapter.

:class:`LoRAPolicy` owns the frozen base model, its LoRA adapter and tokenizer. It generates text
(through the batching engine, :mod:`rosa2_dspy.engine`) and gives the weights step what it needs:
``log pi(y | x)`` of a response under a chat prompt, its gradient with respect to the adapter
parameters only, the divergence between two adapters' predictions, the adapter as one flat vector,
and saving/loading the adapter the PEFT way (``save_pretrained``, safetensors only).

A policy is a *shared handle*: ``copy.deepcopy`` returns the same object, as DSPy does for local model
handles, so deep-copying a program does not duplicate hundreds of MB of weights. Per-conversation
state is an adapter *vector* (see :meth:`LoRAPolicy.adapter_vector`), which callers swap in and out.
The DSPy side, :class:`~rosa2_dspy.local_lm.LocalLM`, lives in :mod:`rosa2_dspy.local_lm`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import uuid
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rosa2_dspy.decoding import PrefixCache
from rosa2_dspy.engine import Batcher, DivergenceRow, Generation, GenerationRow, LogProb, ScoreRow
from rosa2_dspy.errors import AdapterLoadError
from rosa2_dspy.multi_lora import MultiLoRA

logger = logging.getLogger(__name__)

ChatMessages = Sequence[dict[str, str]]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


@dataclass
class LoRASettings:
    """LoRA adapter shape. ``target_modules=None`` lets PEFT pick the model family's defaults."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = ("q_proj", "v_proj")
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when there is one, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


class LoRAPolicy:
    """A causal LM with a trainable LoRA adapter on frozen base weights.

    Args:
        model: a loaded ``transformers`` causal LM (the base; it is wrapped with PEFT here).
        tokenizer: its tokenizer; it must have a chat template.
        lora: adapter shape.
        device, dtype: where and in which precision the model runs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lora: LoRASettings | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        from peft import LoraConfig, get_peft_model

        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The tokenizer has no chat template; LocalLM formats DSPy's chat messages with it. "
                "Use an instruct/chat model or set tokenizer.chat_template."
            )
        self.lora = lora or LoRASettings()
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.dtype = resolve_dtype(dtype)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = LoraConfig(
            r=self.lora.rank,
            lora_alpha=self.lora.alpha,
            lora_dropout=self.lora.dropout,
            target_modules=list(self.lora.target_modules) if self.lora.target_modules else None,
            task_type="CAUSAL_LM",
        )
        # LoRA's A matrices are random at init; seed them so two runs start from the same adapter.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.lora.init_seed)
            self.model = get_peft_model(model.to(device=self.device, dtype=self.dtype), config)
        self.model.eval()  # no dropout: gradients and greedy answers are deterministic
        self._params = [p for _, p in self._named_adapter_parameters()]
        self._initial = self.adapter_vector()
        # Guards the policy's own adapter (PEFT's parameters: set, read, save). Model passes never read
        # them (each row brings its adapter), so they run beside these without waiting.
        self.lock = threading.RLock()
        self._tokenizer_lock = threading.Lock()
        self.multi_lora = MultiLoRA(self.model, self._params)
        self.batcher = Batcher(self)
        # KV caches of system messages per adapter, reused across calls (``PrefixCache(0)``: off).
        self.prefix_cache = PrefixCache()
        # Pickling (``save_program=True``) writes a handle, never the model: see :meth:`__reduce__`.
        self.key = uuid.uuid4().hex
        self.source: str | None = None  # what from_pretrained loaded, to rebuild the model in another process
        _LIVE_POLICIES[self.key] = self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str = "embedded",
        *,
        lora: LoRASettings | None = None,
        device: str | None = "cpu",
        dtype: str = "float32",
        **model_kwargs: Any,
    ) -> "LoRAPolicy":
        """Load a model by name: ``"embedded"`` (the packaged default), a local folder, or a hub id.

        A hub id only works where the user has it cached or has network access; nothing in this
        library downloads on its own account.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rosa2_dspy.embedded import EMBEDDED_MODEL, embedded_checkpoint_dir

        torch_dtype = resolve_dtype(dtype)
        if model == EMBEDDED_MODEL:
            path = embedded_checkpoint_dir()
            try:
                base = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **model_kwargs)
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as err:  # a damaged cache: rebuild it from the packaged GGUF once
                logger.warning("Cached embedded model at %s failed to load (%s); rebuilding it.", path, err)
                path = embedded_checkpoint_dir(rebuild=True)
                base = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **model_kwargs)
                tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            base = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(model)
        policy = cls(base, tokenizer, lora=lora, device=device, dtype=torch_dtype)
        if not model_kwargs:
            policy.source = str(model)
        return policy

    def __deepcopy__(self, memo: dict) -> "LoRAPolicy":
        # A model handle is shared, not copied (DSPy treats local model handles the same way).
        return self

    def __reduce__(self):
        """Pickle a *handle*, not the model (weights, locks and batching threads stay out of the pickle).

        Unpickled in the process that holds this policy, the handle re-attaches to it (the same object, as
        ``copy.deepcopy`` does). Elsewhere the model is rebuilt with :meth:`from_pretrained` from the name
        or folder it was loaded from, with the same LoRA settings, and given the adapter it had when pickled
        (carried as safetensors bytes). A policy built from an in-memory model has no such name: it can
        only be re-attached in its own process. ``dspy.Module.save(..., save_program=True)`` relies on this.
        """
        with self.lock:
            adapter = None if torch.equal(self.adapter_vector(), self._initial) else self.adapter_files()
        recipe = {"source": self.source, "lora": dataclasses.asdict(self.lora), "device": str(self.device),
                  "dtype": str(self.dtype).removeprefix("torch."), "adapter": adapter}
        return _attach_policy, (self.key, recipe)

    # ------------------------------------------------------------------ adapter as a vector

    def _named_adapter_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named or not all("lora_" in n for n, _ in named):
            raise RuntimeError("Expected only LoRA parameters to be trainable; PEFT setup went wrong.")
        return named

    @property
    def causal_lm(self) -> Any:
        """The transformers model inside the PEFT wrapper (its LoRA layers are computed per row)."""
        return self.model.get_base_model()

    @property
    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for p in self._params)

    def adapter_vector(self) -> torch.Tensor:
        """A float32 CPU copy of every adapter parameter, flattened in a fixed order."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).float().cpu() for p in self._params])

    def set_adapter_vector(self, vector: torch.Tensor) -> None:
        """Overwrite the adapter with ``vector`` (as returned by :meth:`adapter_vector`)."""
        vector = self._checked_shape(torch.as_tensor(vector))
        if not torch.isfinite(vector).all():
            raise ValueError("Refusing to load a non-finite adapter vector; the adapter is unchanged.")
        with self.lock, torch.no_grad():
            offset = 0
            for p in self._params:
                n = p.numel()
                p.copy_(vector[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype))
                offset += n

    def apply_delta(self, delta: torch.Tensor) -> None:
        """theta <- theta + delta, for a flat delta over the adapter parameters."""
        self.set_adapter_vector(self.adapter_vector() + torch.as_tensor(delta, dtype=torch.float32))

    @property
    def initial_adapter_vector(self) -> torch.Tensor:
        return self._initial.clone()

    def reset_adapter(self) -> None:
        """Back to the adapter as it was right after construction (LoRA B = 0: the base model)."""
        self.set_adapter_vector(self._initial)

    # ------------------------------------------------------------------ tokenisation

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of user-supplied text: chat-control strings in it (``<|im_start|>``...) stay literal
        text, so content can never open a turn, spoof a role or become a control token to train on."""
        # split_special_tokens flips a flag on the shared Rust tokenizer for the call: one call at a time.
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def _prompt_ids(self, messages: ChatMessages) -> list[int]:
        """The chat template's tokens around each message's content, the content tokenized as plain text."""
        return self._prompt(messages)[0]

    def _prompt(self, messages: ChatMessages) -> tuple[list[int], int]:
        """:meth:`_prompt_ids` and how many of them end with the first message when it is the system
        message (the prefix every call of a DSPy predictor repeats; 0 otherwise)."""
        messages = list(messages)
        prefix = 0
        marks = [f"\x00rosa2-content-{i}\x00" for i in range(len(messages))]
        rendered = self.tokenizer.apply_chat_template(
            [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt=True, tokenize=False)
        if not all(rendered.count(mark) == 1 for mark in marks):  # a template that rewrites content
            raise ValueError("This model's chat template changes message content, so LocalLM cannot keep "
                             "control strings in it literal; use a model whose template inserts content as is.")
        ids: list[int] = []
        for message, mark in zip(messages, marks):
            template, _, rendered = rendered.partition(mark)
            with self._tokenizer_lock:
                ids += self.tokenizer(template, add_special_tokens=False)["input_ids"]
            ids += self._text_ids(message["content"])
            if message is messages[0] and message.get("role") == "system":
                prefix = len(ids)
        with self._tokenizer_lock:
            return ids + list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"]), prefix

    def _response_ids(self, response: str) -> list[int]:
        # The end-of-turn token belongs to the response: it is what makes the model stop.
        return self._text_ids(response) + [self.tokenizer.eos_token_id]

    # ------------------------------------------------------------------ generation

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
        prompt, prefix = self._prompt(messages)
        row = GenerationRow(prompt, self._adapter_or_own(adapter), max_new_tokens, temperature, top_p, seed,
                            prefix=prefix)
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
        prompt, prefix = self._prompt(messages)
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        row = GenerationRow(prompt, self._adapter_or_own(adapter), max_new_tokens, temperature, top_p, seed,
                            prefix=prefix, on_token=lambda index, token: tokens.put((index, token)))
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

    def _adapter_or_own(self, adapter: torch.Tensor | None) -> torch.Tensor:
        if adapter is None:
            with self.lock:
                return self.adapter_vector()
        return self._checked_shape(torch.as_tensor(adapter, dtype=torch.float32))

    def _checked_shape(self, vector: torch.Tensor) -> torch.Tensor:
        if vector.shape != (self.num_adapter_parameters,):
            raise ValueError(
                f"Adapter vector has shape {tuple(vector.shape)}, expected ({self.num_adapter_parameters},)."
            )
        return vector

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

    # ------------------------------------------------------------------ saving and loading

    def save_adapter(self, directory: str | Path, vector: torch.Tensor | None = None) -> Path:
        """Save the adapter (or ``vector``, if given) with PEFT's ``save_pretrained`` as safetensors."""
        directory = Path(directory)
        with self.lock:
            current = self.adapter_vector()
            try:
                if vector is not None:
                    self.set_adapter_vector(vector)
                self.model.save_pretrained(directory, safe_serialization=True)
            finally:
                self.set_adapter_vector(current)
        return directory

    def read_adapter(self, directory: str | Path) -> torch.Tensor:
        """Read a saved adapter as a flat vector, checking it fits this model; the model is untouched.

        Raises :class:`AdapterLoadError` for a missing, corrupt, mismatched or non-finite adapter.
        """
        directory = Path(directory)
        weights, config_path = directory / "adapter_model.safetensors", directory / "adapter_config.json"
        if not weights.is_file() or not config_path.is_file():
            raise AdapterLoadError(
                f"{directory} is not a saved adapter: expected adapter_config.json and "
                "adapter_model.safetensors (written by save_adapter / PEFT save_pretrained). "
                "Pickled .bin adapters are not accepted."
            )
        try:
            config, data = config_path.read_bytes(), weights.read_bytes()
        except OSError as err:
            raise AdapterLoadError(f"The adapter in {directory} is unreadable ({err}); save it again.") from err
        return self.read_adapter_bytes(config, data, where=str(directory))

    def adapter_files(self, vector: torch.Tensor | None = None) -> dict[str, bytes]:
        """The files :meth:`save_adapter` writes (``adapter_config.json``, ``adapter_model.safetensors``), as bytes."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save_adapter(tmp, vector=vector)
            return {name: (Path(tmp) / name).read_bytes()
                    for name in ("adapter_config.json", "adapter_model.safetensors")}

    def read_adapter_bytes(self, config: bytes, weights: bytes, where: str = "the adapter") -> torch.Tensor:
        """:meth:`read_adapter` on the two files' contents (e.g. carried inside a JSON state): same checks."""
        from peft.utils import get_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            saved_config = json.loads(config)
            state = load_safetensors(bytes(weights))
            if not isinstance(saved_config, dict):
                raise ValueError("adapter_config.json is not an object")
        except (SafetensorError, json.JSONDecodeError, OSError, ValueError, TypeError) as err:
            raise AdapterLoadError(f"The adapter in {where} is corrupt ({err}); save it again.") from err
        if int(saved_config.get("r", -1)) != self.lora.rank:
            raise AdapterLoadError(
                f"The adapter in {where} has LoRA rank {saved_config.get('r')}, this model uses "
                f"rank {self.lora.rank}; build the LocalLM with the adapter's LoRA settings."
            )
        if float(saved_config.get("lora_alpha", -1)) != float(self.lora.alpha):
            raise AdapterLoadError(
                f"The adapter in {where} has lora_alpha {saved_config.get('lora_alpha')}, this model uses "
                f"{self.lora.alpha}; its scaling would differ. Build the LocalLM with the adapter's LoRA settings."
            )
        expected = get_peft_model_state_dict(self.model)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise AdapterLoadError(
                f"The adapter in {where} does not match this model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); it was saved for another model or LoRA target modules."
            )
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape:
                raise AdapterLoadError(
                    f"Adapter tensor {key} has shape {tuple(state[key].shape)}, the model expects "
                    f"{tuple(tensor.shape)}; it was saved for another model."
                )
            if not torch.isfinite(state[key]).all():
                raise AdapterLoadError(f"Adapter tensor {key} in {where} holds NaN/inf; refusing it.")
        # Map PEFT's saved keys (no adapter name) back onto our parameter order.
        names = [name.replace(".default", "") for name, _ in self._named_adapter_parameters()]
        return torch.cat([state[name].reshape(-1).float() for name in names])

    def load_adapter(self, directory: str | Path) -> None:
        """Load a saved adapter into the model (validated first, so a bad file changes nothing)."""
        self.set_adapter_vector(self.read_adapter(directory))


_LIVE_POLICIES: "weakref.WeakValueDictionary[str, LoRAPolicy]" = weakref.WeakValueDictionary()


def _attach_policy(key: str, recipe: dict[str, Any]) -> LoRAPolicy:
    """Unpickle a :class:`LoRAPolicy` handle (see ``LoRAPolicy.__reduce__``)."""
    live = _LIVE_POLICIES.get(key)
    if live is not None:
        return live
    if not recipe.get("source"):
        raise RuntimeError(
            "This pickle refers to a LocalLM whose model was built in memory in another process, so it cannot be "
            "rebuilt here. Build the LocalLM from a model name or folder (LocalLM('embedded'), LocalLM('path/')) "
            "to load saved programs in a new process."
        )
    policy = LoRAPolicy.from_pretrained(recipe["source"], lora=LoRASettings(**recipe["lora"]),
                                        device=recipe["device"], dtype=recipe["dtype"])
    if recipe.get("adapter"):
        files = recipe["adapter"]
        policy.set_adapter_vector(policy.read_adapter_bytes(files["adapter_config.json"],
                                                            files["adapter_model.safetensors"], "the pickled adapter"))
    _LIVE_POLICIES.pop(policy.key, None)
    policy.key = key
    _LIVE_POLICIES[key] = policy  # later handles in this process attach to it
    return policy
