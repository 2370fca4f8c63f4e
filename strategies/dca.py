"""`dca`: Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models"; HKUNLP/ChunkLlama).

The row is cut into chunks of c = S - w tokens (S the chunk size, w the local window). Every key
sits at j mod c; a query sees the keys of its own chunk at their true distance, the previous chunk
from min(i mod c + c, S), and every earlier chunk from min(2c - 1, S). No score sees a distance
beyond S, so any length the KV cache holds stays in the trained range. A request that fits in one
chunk is plain RoPE attention and is planned `native` (bit for bit).

Defaults for a model of native window L0: a chunk size S = L0 / 4 and a local window w = S / 8,
smaller than ChunkLlama's 3 L0 / 4 and L0 / 8 (its Llama-2 settings) because on the bundled model
(L0 = 8,192) the smaller chunks retrieve: pass keys found of 5 at 16k / 32k were S = 6,144: 2 / -,
S = 4,096 (w 1,024): 5 / 1, S = 2,048 (w 256): 5 / 5 (docs/eval/long/). Given only S, w = S / 8.

    >>> from strategies.base import PlanContext, PromptTokens, StrategyRequest
    >>> from strategies.registry import default_registry
    >>> from server.plan import ModelFacts
    >>> registry = default_registry()
    >>> model = ModelFacts("m", native_window=8192, rope_parameters={"rope_theta": 1e5}, head_dim=64,
    ...                    vocab_size=100, max_context_tokens=65536)
    >>> request = StrategyRequest("q", tokens=PromptTokens((1,) * 30_000))
    >>> plan = registry.resolve("dca").plan(request, PlanContext(model, registry))
    >>> plan.rope.label(), plan.max_total_tokens, plan.resolved
    ('native+dca-s2048-l256-mscale', 65536, {'name': 'dca', 'chunk_size': 2048, 'local_window': 256, 'mscale': True})
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from server.attention.dual_chunk import DualChunk
from server.plan import AttentionScheme, ModelFacts
from strategies.base import StrategyParams
from strategies.scheme import SchemeStrategy, require
from strategies.window import MAX_WINDOW

# Shortest chunk (S - w) a request may ask for, and so the smallest S: attention is computed chunk
# by chunk, so chunks of 1 token (S = 2, w = 1) made a 3,300-token request 3.2x as long as the
# default chunks (35.3 s against 10.9 s); chunks of 128 cost as much as the default's (docs/benchmarks.md,
# "Costly strategy parameters").
MIN_CHUNK_TOKENS = 128
MIN_CHUNK_SIZE = 2 * MIN_CHUNK_TOKENS


class DcaParams(StrategyParams):
    chunk_size: int | None = Field(
        default=None,
        ge=MIN_CHUNK_SIZE,
        le=MAX_WINDOW,
        description="S: the largest relative position any score sees (<= the model's native window); "
        "default a quarter of the native window (ChunkLlama's 3/4 and 1/2 measured worse past 16k on the "
        "bundled model)",
    )
    local_window: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WINDOW,
        description="w: the first w queries of a chunk see the previous chunk at true distances; chunks are "
        "S - w tokens. Default S / 8 (ChunkLlama's ratio is 1/6)",
    )
    mscale: bool = Field(
        default=True,
        description="ChunkLlama's mscale: past the model's native window L every logit is multiplied by "
        "(0.05 ln(n / L) + 1)^2, n the row's length (false: off)",
    )

    @model_validator(mode="after")
    def _local_window_inside_the_chunk(self) -> DcaParams:
        if self.chunk_size is not None and self.local_window is not None and self.local_window >= self.chunk_size:
            raise ValueError(f"local_window ({self.local_window}) must be < chunk_size ({self.chunk_size})")
        if (
            self.chunk_size is not None
            and self.local_window is not None
            and (self.chunk_size - self.local_window < MIN_CHUNK_TOKENS)
        ):
            raise ValueError(
                f"chunk_size - local_window ({self.chunk_size} - {self.local_window}) must be >= "
                f"{MIN_CHUNK_TOKENS}: the chunks' length, below which their cost stops being sane"
            )
        return self


class DcaStrategy(SchemeStrategy[DcaParams]):
    name = "dca"
    description = (
        "Dual Chunk Attention: chunks of S - w tokens; true distances within a chunk, capped positions "
        "across chunks, so no distance exceeds S (attention computed by the engine from the paged keys)."
    )
    Params = DcaParams

    def scheme(self, model: ModelFacts) -> DualChunk:
        """S and w: the given values, else the defaults from the model's window; mscale past it."""
        window = model.native_window
        chunk_size = self.params.chunk_size or window // 4
        local_window = self.params.local_window or max(1, chunk_size // 8)
        require(chunk_size <= window, "chunk_size", f"{chunk_size} must be <= the model's native window ({window})")
        require(local_window < chunk_size, "local_window", f"{local_window} must be < chunk_size ({chunk_size})")
        trained_length = window if self.params.mscale else None
        return DualChunk(chunk_size=chunk_size, local_window=local_window, trained_length=trained_length)

    def is_plain(self, scheme: AttentionScheme, needed: int) -> bool:
        assert isinstance(scheme, DualChunk)
        return needed <= scheme.chunk_len  # every pair inside the first chunk

    def settings(self, scheme: AttentionScheme) -> dict[str, Any]:
        assert isinstance(scheme, DualChunk)
        return {
            "chunk_size": scheme.chunk_size,
            "local_window": scheme.local_window,
            "mscale": scheme.trained_length is not None,
        }
