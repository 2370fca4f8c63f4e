"""Reading scheme rows' keys and values back from vLLM's paged CPU cache, written by vLLM's own
cache-write op (the one the engine uses, through server/engines/vllm_adapter/), and the rows'
contiguous copies."""

from __future__ import annotations

import functools

import pytest
import torch

from server.attention.dual_chunk import DualChunk
from server.attention.rotary import inverse_frequencies
from server.attention.self_extend import SelfExtend
from server.engines.scheme_attention.paged import BlockLayout, probe_layout, read_range, read_row
from server.engines.scheme_attention.row_cache import RowKVCache

BLOCK, KV_HEADS, HEAD_DIM = 32, 3, 64


@pytest.fixture(scope="module")
def isa() -> str:
    from server.engines.vllm_adapter.cpu_attention import attention_isa

    return attention_isa(torch.float32, BLOCK, HEAD_DIM)


@pytest.fixture(scope="module")
def layout(isa: str) -> BlockLayout:
    found = probe_layout(isa, torch.float32, HEAD_DIM, BLOCK)
    assert found is not None, isa
    return found


def paged_row(
    isa: str, n: int, blocks: list[int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache of 12 blocks holding one row of n tokens in `blocks` (scattered), and its k/v."""
    from server.engines.vllm_adapter.cpu_attention import reshape_and_cache

    gen = torch.Generator().manual_seed(n)
    key, value = torch.randn(2, n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    cache = torch.zeros(12, KV_HEADS, 2 * BLOCK, HEAD_DIM, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
    reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    return key_cache, value_cache, key.transpose(0, 1), value.transpose(0, 1)


def test_the_vec_layout_is_keys_transposed_and_values_plain(layout: BlockLayout) -> None:
    """The probe's map, checked against the layout written out by hand (vLLM's `vec` ISA)."""
    t, d = torch.meshgrid(torch.arange(BLOCK), torch.arange(HEAD_DIM), indexing="ij")
    assert torch.equal(layout.key_index, (d * BLOCK + t).flatten())
    assert torch.equal(layout.value_index, (t * HEAD_DIM + d).flatten())


@pytest.mark.parametrize(("isa_name", "dtype"), [("vec", torch.float32), ("amx", torch.bfloat16)])
def test_a_scattered_row_reads_back_exactly(isa_name: str, dtype: torch.dtype) -> None:
    """Every layout the engine may meet: float32 (`vec`), and bfloat16 on a CPU with AMX (`amx`,
    keys and values packed in pairs for its tiles), which a default server there runs with."""
    found = probe_layout(isa_name, dtype, HEAD_DIM, BLOCK)
    if found is None:
        pytest.skip(f"this vLLM build cannot write the {isa_name} layout")
    blocks = [7, 2, 9, 4]
    key_cache, value_cache, k, v = paged_row(isa_name, 100, blocks, dtype)
    got_k, got_v = read_row(key_cache, value_cache, torch.tensor(blocks), 100, found)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    part_k, part_v = read_range(key_cache, value_cache, torch.tensor(blocks), 45, 70, found)
    assert torch.equal(part_k, k[:, 45:70]) and torch.equal(part_v, v[:, 45:70])
    # Another reading of the memory is wrong: the layout matters.
    identity = torch.arange(BLOCK * HEAD_DIM)
    plain_k, plain_v = read_row(key_cache, value_cache, torch.tensor(blocks), 100, BlockLayout(identity, identity))
    assert not (torch.equal(plain_k, k) and torch.equal(plain_v, v))


def test_a_layout_that_is_not_a_permutation_is_refused() -> None:
    assert probe_layout("no-such-isa", torch.float32, HEAD_DIM, BLOCK) is None
    assert probe_layout("vec", torch.bfloat16, 512, BLOCK) is None  # labels past bfloat16's exact integers


def test_row_copies_grow_step_by_step_and_restart_after_preemption(isa: str, layout: BlockLayout) -> None:
    blocks = torch.tensor([3, 8, 1, 5, 10, 0])
    key_cache, value_cache, k, v = paged_row(isa, 180, blocks.tolist())
    cache = RowKVCache()
    steps = [(0, 64), (64, 128), (128, 129), (129, 130), (0, 100), (100, 180)]  # then recomputed from 0
    for first, n in steps:
        got = cache.read("row", 0, key_cache, value_cache, blocks, first, n, layout)
        assert torch.equal(got.keys, k[:, :n]) and torch.equal(got.values, v[:, :n]), (first, n)
        assert got.far_keys is got.keys  # no far rotation asked (DCA's case): the keys themselves
    assert DualChunk(chunk_size=16, local_window=4).far_keys(k, 0, torch.ones(4)) is None
    assert cache.rows() == 1
    cache.drop(["row", "unknown"])
    assert cache.rows() == 0


def test_far_keys_are_rotated_once_and_equal_rotating_the_whole_row(isa: str, layout: BlockLayout) -> None:
    """self_extend's far keys kept in the copy, appended step by step (and after a restart from 0),
    are bit for bit the whole row's keys rotated at floor(j/G), which the kernel would compute."""
    blocks = torch.tensor([3, 8, 1, 5, 10, 0])
    key_cache, value_cache, k, _ = paged_row(isa, 180, blocks.tolist())
    scheme = SelfExtend(window=16, group=4)
    inv_freq = inverse_frequencies(1e4, HEAD_DIM)
    far = functools.partial(scheme.far_keys, inv_freq=inv_freq)
    cache = RowKVCache()
    for first, n in [(0, 64), (64, 128), (128, 129), (0, 100), (100, 180)]:
        got = cache.read("row", 0, key_cache, value_cache, blocks, first, n, layout, far)
        assert torch.equal(got.far_keys, scheme.far_keys(k[:, :n], 0, inv_freq)), (first, n)
        assert not torch.equal(got.far_keys, got.keys)


def test_dropping_a_held_row_hands_freed_memory_back(
    isa: str, layout: BlockLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc keeps a dropped row's many freed buffers; measured without the trim: tens of MB of
    resident memory a long-document request, for good (docs/benchmarks.md, the long soak)."""
    from server.engines.scheme_attention import row_cache

    trims: list[int] = []
    monkeypatch.setattr(row_cache, "return_freed_memory", lambda: trims.append(1))
    key_cache, value_cache, _, _ = paged_row(isa, 64, [0, 1])
    cache = RowKVCache()
    cache.read("row", 0, key_cache, value_cache, torch.tensor([0, 1]), 0, 64, layout)
    cache.drop(["unknown"])
    assert trims == []
    cache.drop(["row"])
    assert trims == [1] and cache.rows() == 0
