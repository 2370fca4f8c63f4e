"""Zero attention heads, so a model whose head counts tensor parallelism cannot split can run split.

vLLM's tensor parallelism gives every rank `heads / tp` query heads and `kv_heads / tp` KV heads,
so both must divide (SmolLM2-135M has 9 and 3: not by 2). A padded checkpoint appends whole KV
groups whose weights are zero: each new KV head with its `heads / kv_heads` query heads, zero
rows in q/k/v_proj and zero columns in o_proj. A zero query scores every key 0, so the head
averages zero values; its output projection is zero as well. The padded model computes the same
function (floating-point sums may differ in order only), at the cost of the added heads' compute
and KV cache (9 -> 12 heads: a third more attention).

    >>> padded_head_counts(heads=9, kv_heads=3, tensor_parallel=2)
    (12, 4)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
PADDED_MARKER = "ropeserve_padded_from"


def padded_head_counts(heads: int, kv_heads: int, tensor_parallel: int) -> tuple[int, int]:
    """The fewest (heads, kv_heads), adding whole KV groups, that `tensor_parallel` ranks split."""
    if heads % kv_heads:
        raise ValueError(f"{heads} attention heads do not share {kv_heads} KV heads evenly")
    group = heads // kv_heads
    # vLLM splits KV heads across ranks, or replicates them when there are fewer than ranks.
    if kv_heads % tensor_parallel == 0 or (tensor_parallel % kv_heads == 0 and heads % tensor_parallel == 0):
        return heads, kv_heads
    padded_kv = math.ceil(kv_heads / tensor_parallel) * tensor_parallel
    return padded_kv * group, padded_kv


def needs_padding(config: dict[str, object], tensor_parallel: int) -> bool:
    heads, kv_heads = _head_counts(config)
    return padded_head_counts(heads, kv_heads, tensor_parallel) != (heads, kv_heads)


def pad_checkpoint(source: Path, target: Path, tensor_parallel: int) -> Path:
    """Write `source` with zero heads added for `tensor_parallel` ranks into `target` (once)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (target / "config.json").is_file() and (target / WEIGHTS_FILE).is_file():
        return target
    if not (source / WEIGHTS_FILE).is_file():
        raise ValueError(f"padding heads needs one {WEIGHTS_FILE} in {source} (sharded checkpoints are not supported)")
    config = json.loads((source / "config.json").read_text())
    heads, kv_heads = _head_counts(config)
    new_heads, new_kv = padded_head_counts(heads, kv_heads, tensor_parallel)
    head_dim = _int(config.get("head_dim")) or _int(config["hidden_size"]) // heads

    def rows(weight: torch.Tensor, extra_heads: int) -> torch.Tensor:
        return torch.cat([weight, weight.new_zeros(extra_heads * head_dim, *weight.shape[1:])], dim=0)

    weights = load_file(str(source / WEIGHTS_FILE))
    for name, weight in weights.items():
        if name.endswith("self_attn.q_proj.weight"):
            weights[name] = rows(weight, new_heads - heads)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            weights[name] = rows(weight, new_kv - kv_heads)
        elif name.endswith("self_attn.o_proj.weight"):
            weights[name] = torch.cat([weight, weight.new_zeros(weight.shape[0], (new_heads - heads) * head_dim)], 1)
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            raise ValueError(f"padding heads of a model with attention biases is not supported ({name})")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    config.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim)
    config[PADDED_MARKER] = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(staging / WEIGHTS_FILE))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _int(value: object) -> int:
    """A count from a config.json (JSON numbers; absent or null: 0)."""
    if value is None:
        return 0
    if not isinstance(value, int | float | str):
        raise ValueError(f"expected a number in the model's config, got {value!r}")
    return int(value)


def _head_counts(config: dict[str, object]) -> tuple[int, int]:
    heads = _int(config["num_attention_heads"])
    return heads, _int(config.get("num_key_value_heads")) or heads
