"""The torch side of the local model: a transformers causal LM with a PEFT LoRA adapter.

:class:`LoRAPolicy` owns the frozen base model, its LoRA adapter and tokenizer. It generates text
(through the batching engine, :mod:`rosa2_dspy.engine`) and gives the weights step what it needs:
``log pi(y | x)`` of a response under a chat prompt, its gradient with respect to the adapter
parameters only, the divergence between two adapters' predictions, the adapter as one flat vector,
and saving/loading the adapter the PEFT way (``save_pretrained``, safetensors only).

The generation and scoring requests live in :mod:`rosa2_dspy.inference` and the adapter files in
:mod:`rosa2_dspy.adapter_files` (mixins of :class:`LoRAPolicy`); this module holds the model, the adapter
as a vector, tokenisation and the handle semantics.

A policy is a *shared handle*: ``copy.deepcopy`` returns the same object, as DSPy does for local model
handles, so deep-copying a program does not duplicate hundreds of MB of weights. Per-conversation
state is an adapter *vector* (see :meth:`LoRAPolicy.adapter_vector`), which callers swap in and out.
The DSPy side, :class:`~rosa2_dspy.local_lm.LocalLM`, lives in :mod:`rosa2_dspy.local_lm`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rosa2_dspy.adapter_files import AdapterFiles
from rosa2_dspy.decoding import PrefixCache
from rosa2_dspy.engine import Batcher
from rosa2_dspy.inference import Inference
from rosa2_dspy.multi_lora import MultiLoRA

logger = logging.getLogger(__name__)

ChatMessages = Sequence[dict[str, str]]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


class LoRAPolicy(Inference, AdapterFiles):
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
        # KV caches of system messages and demo blocks per adapter, reused across calls (``PrefixCache(0)``: off).
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

    def _prompt(self, messages: ChatMessages) -> tuple[list[int], tuple[int, ...]]:
        """:meth:`_prompt_ids` and where its reusable prefixes end (``GenerationRow.prefixes``): after the
        first message when it is the system message (which every call of a DSPy predictor repeats), and
        before the last message when messages come between the two (a predictor's demos)."""
        messages = list(messages)
        prefixes: list[int] = []
        marks = [f"\x00rosa2-content-{i}\x00" for i in range(len(messages))]
        rendered = self.tokenizer.apply_chat_template(
            [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt=True, tokenize=False)
        if not all(rendered.count(mark) == 1 for mark in marks):  # a template that rewrites content
            raise ValueError("This model's chat template changes message content, so LocalLM cannot keep "
                             "control strings in it literal; use a model whose template inserts content as is.")
        ids: list[int] = []
        system = messages[0].get("role") == "system" if messages else False
        for index, (message, mark) in enumerate(zip(messages, marks)):
            if system and index == len(messages) - 1 and index > 1:
                prefixes.append(len(ids))
            template, _, rendered = rendered.partition(mark)
            with self._tokenizer_lock:
                ids += self.tokenizer(template, add_special_tokens=False)["input_ids"]
            ids += self._text_ids(message["content"])
            if index == 0 and system:
                prefixes.append(len(ids))
        with self._tokenizer_lock:
            return ids + list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"]), tuple(prefixes)

    def _response_ids(self, response: str) -> list[int]:
        # The end-of-turn token belongs to the response: it is what makes the model stop.
        return self._text_ids(response) + [self.tokenizer.eos_token_id]

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
