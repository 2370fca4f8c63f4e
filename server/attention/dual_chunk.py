"""`DualChunk`: Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large
Language Models", HKUNLP/ChunkLlama `chunkllama_attn_replace.py`).

The row is cut into chunks of c = S - w tokens from position 0 (S the chunk size, w the local
window). Every key is rotated at j mod c, which is where the engine writes it to the paged cache
(`table_positions`: the model's rotary rotates the row's tokens at i mod c), so no key is ever
rotated again. Queries arrive rotated at i mod c too, and each query block inside one chunk makes up
to four fused calls:

| part                          | keys                        | query rotated at        | mask   |
|-------------------------------|-----------------------------|-------------------------|--------|
| intra, before the block       | chunk start .. block start  | i mod c (as it arrives) | none   |
| intra, the block itself       | the block                   | i mod c                 | causal |
| successive (previous chunk)   | the c keys before the chunk | min(i mod c + c, S)     | none   |
| inter (every earlier chunk)   | 0 .. chunk start - c        | min(2c - 1, S)          | none   |

merged by their log-sum-exp (fused.py): the cost of one causal attention over the row, plus the
two re-rotations of the block's queries. The largest relative position a score sees is S.

ChunkLlama also multiplies every cos/sin by mscale = 0.05 ln(n / L) + 1 once the sequence is longer
than the trained length L (n its length: the whole prompt while it is read, the current length as
it decodes), so every logit by mscale^2; with `trained_length` set (L) the queries carry that factor.

    >>> from server.attention.rotary import inverse_frequencies
    >>> from server.plan import RowKV
    >>> q, k, v = torch.randn(4, 2, 8), torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    >>> scheme = DualChunk(chunk_size=4, local_window=1)
    >>> scheme.attend(q, RowKV(k, v, k), 6, inverse_frequencies(1e4, 8), 8**-0.5).shape
    torch.Size([4, 2, 8])
    >>> DualChunk(chunk_size=2048, local_window=256, trained_length=8192).query_scale(torch.arange(2), 32768)
    tensor([1.1434, 1.1434], dtype=torch.float64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from server.attention.fused import attend, fold_heads, merge, unfold_heads
from server.attention.rotary import rotate
from server.plan import AttentionScheme, RowKV


def chunkllama_mscale(length: int, trained_length: int) -> float:
    """ChunkLlama's `get_mscale(n / L)`: 1 up to the trained length, 0.05 ln(n / L) + 1 beyond."""
    scale = length / trained_length
    return 1.0 if scale <= 1 else 0.05 * math.log(scale) + 1.0


@dataclass(frozen=True)
class DualChunk(AttentionScheme):
    chunk_size: int
    local_window: int
    # L of ChunkLlama's mscale (None: no mscale).
    trained_length: int | None = None

    kind: ClassVar[str] = "dca"

    @property
    def chunk_len(self) -> int:
        """c = S - w, the length of every chunk."""
        return self.chunk_size - self.local_window

    def label(self) -> str:
        mscale = "" if self.trained_length is None else "-mscale"
        return f"dca-s{self.chunk_size}-l{self.local_window}{mscale}"

    def max_distance(self, n: int) -> float:
        return float(min(n - 1, self.chunk_size))

    def table_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.chunk_len

    def query_scale(self, positions: torch.Tensor, length: int) -> torch.Tensor | None:
        if self.trained_length is None or length <= self.trained_length:
            return None
        factor = chunkllama_mscale(length, self.trained_length) ** 2
        return torch.full(positions.shape, factor, dtype=torch.float64)

    def attend(self, q: torch.Tensor, row: RowKV, first: int, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
        num_queries = q.shape[0]
        k, v, _ = row
        if k.shape[1] != first + num_queries:
            raise ValueError(f"{k.shape[1]} keys for queries at {first}..{first + num_queries - 1}")
        c = self.chunk_len
        out = torch.empty_like(q)
        start, end = first, first + num_queries
        while start < end:
            chunk_start = start - start % c
            stop = min(end, chunk_start + c)
            rows = slice(start - first, stop - first)
            out[rows] = self._chunk_block(q[rows], k, v, start, chunk_start, inv_freq, scale)
            start = stop
        return out

    def _chunk_block(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        first: int,
        chunk_start: int,
        inv_freq: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Queries first.. that all lie in the chunk starting at `chunk_start`."""
        c, s = self.chunk_len, self.chunk_size
        num, heads, d = q.shape
        kv_heads = k.shape[0]
        group = heads // kv_heads
        last = first + num
        by_head = q.transpose(0, 1)  # [heads, num, d]
        folded = fold_heads(by_head, kv_heads)[None]
        parts = []
        if first > chunk_start:
            parts.append(attend(folded, k[None, :, chunk_start:first], v[None, :, chunk_start:first], scale))
        # The block against itself, causal: per query head, so that the mask lines up with the keys.
        block_k = k[:, first:last].repeat_interleave(group, 0)[None]
        block_v = v[:, first:last].repeat_interleave(group, 0)[None]
        out, lse = attend(by_head[None], block_k, block_v, scale, causal=num > 1)
        parts.append((out.reshape(1, kv_heads, group * num, d), lse.reshape(1, kv_heads, group * num)))
        local = torch.arange(first - chunk_start, last - chunk_start, dtype=torch.float64)
        if chunk_start >= c:
            successive = (local + c).clamp(max=s) - local  # from i mod c to min(i mod c + c, S)
            q_succ = fold_heads(rotate(by_head, successive, inv_freq), kv_heads)[None]
            previous = slice(chunk_start - c, chunk_start)
            parts.append(attend(q_succ, k[None, :, previous], v[None, :, previous], scale))
        if chunk_start >= 2 * c:
            inter = min(2 * c - 1, s) - local  # from i mod c to min(2c - 1, S)
            q_inter = fold_heads(rotate(by_head, inter, inv_freq), kv_heads)[None]
            earlier = slice(0, chunk_start - c)
            parts.append(attend(q_inter, k[None, :, earlier], v[None, :, earlier], scale))
        return unfold_heads(merge(parts)[0].to(q.dtype), num)
