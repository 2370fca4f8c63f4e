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

    >>> from strategies.base import PlanContext, StrategyRequest
    >>> from strategies.registry import default_registry
    >>> from server.plan import ModelFacts
    >>> registry = default_registry()
    >>> model = ModelFacts("m", native_window=8192, rope_parameters={"rope_theta": 1e5}, head_dim=64,
    ...                    vocab_size=100, max_context_tokens=65536)
    >>> context = PlanContext(model, tokenize=lambda text: [1] * 30_000, resolve=registry.resolve)
    >>> plan = registry.resolve("dca").plan(StrategyRequest("q"), context)
    >>> plan.rope.label(), plan.max_total_tokens, plan.resolved
    ('native+dca-s2048-l256-mscale', 65536, {'name': 'dca', 'chunk_size': 2048, 'local_window': 256, 'mscale': True})
"""

from __future__ import annotations

from pydantic import Field, model_validator

from server.attention.dual_chunk import DualChunk
from server.plan import ModelFacts, RopeConfig
from strategies.base import (
    ExecutionPlan,
    PlanContext,
    Strategy,
    StrategyError,
    StrategyParams,
    StrategyRequest,
    check_fits,
)
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


class DcaStrategy(Strategy[DcaParams]):
    name = "dca"
    description = (
        "Dual Chunk Attention: chunks of S - w tokens; true distances within a chunk, capped positions "
        "across chunks, so no distance exceeds S (attention computed by the engine from the paged keys)."
    )
    Params = DcaParams

    def sizes(self, model: ModelFacts) -> tuple[int, int]:
        """(S, w) for this model: the given values, else ChunkLlama's defaults from its window."""
        chunk_size = self.params.chunk_size or model.native_window // 4
        local_window = self.params.local_window or max(1, chunk_size // 8)
        if chunk_size > model.native_window:
            raise StrategyError(
                f"strategy.chunk_size: {chunk_size} must be <= the model's native window ({model.native_window})",
                field="strategy.chunk_size",
            )
        if local_window >= chunk_size:
            raise StrategyError(
                f"strategy.local_window: {local_window} must be < chunk_size ({chunk_size})",
                field="strategy.local_window",
            )
        return chunk_size, local_window

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        model = context.model
        chunk_size, local_window = self.sizes(model)
        row = request.plain_prompt_ids(context.tokenize)
        limit = model.max_context_tokens or 16 * model.native_window
        check_fits(len(row), request.max_new_tokens, limit, self.name)
        trained_length = model.native_window if self.params.mscale else None
        scheme = DualChunk(chunk_size=chunk_size, local_window=local_window, trained_length=trained_length)
        # Within one chunk every pair is plain RoPE attention: served as native (bitwise).
        needed = len(row) + request.max_new_tokens
        rope = RopeConfig.native() if needed <= scheme.chunk_len else RopeConfig((), limit, scheme)
        resolved = {
            "name": self.name,
            "chunk_size": chunk_size,
            "local_window": local_window,
            "mscale": self.params.mscale,
        }
        return ExecutionPlan(rope=rope, rows=[row], max_total_tokens=limit, resolved=resolved)
