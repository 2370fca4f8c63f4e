"""Tiny random Llama checkpoints for tests that compare a transformation with the original."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_tiny_llama(path: Path, **config: Any) -> Path:
    """A 2-layer Llama with tied embeddings and random weights (seed 0), saved as safetensors at
    `path`; `config` sets the sizes (LlamaConfig's names)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **config))
    model.save_pretrained(path, safe_serialization=True)
    return path
