"""Saving and loading a policy's LoRA adapter the PEFT way: ``save_pretrained`` files, safetensors only.

:class:`AdapterFiles` is the part of :class:`~rosa2_dspy.policy.LoRAPolicy` that writes an adapter (the
policy's own or any flat vector) as ``adapter_config.json`` + ``adapter_model.safetensors``, and reads one
back as a flat vector after checking that it fits this model (rank, alpha, keys, shapes, finite values).
Pickled ``.bin`` adapters are never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rosa2_dspy.errors import AdapterLoadError


class AdapterFiles:
    """Adapter files for :class:`~rosa2_dspy.policy.LoRAPolicy` (a mixin: it uses the policy's PEFT model,
    LoRA settings, lock and adapter vector)."""


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
