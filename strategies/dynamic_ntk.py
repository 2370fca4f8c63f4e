"""`dynamic_ntk`: NTK base chosen per request from that request's own length.

vLLM's rope_type "dynamic" computes one base from max_position_embeddings at start-up (it is
static, vLLM issue #5093), so this strategy does the dynamic part itself: the request's total
length (prompt + max_new_tokens; with documents, the question counted as at least 256 tokens, so
that later questions on them reuse their KV) is rounded up to a multiple of `bucket_tokens` (capped at
factor x native), and gets the base transformers' dynamic NTK formula gives at that length:
theta' = theta * (alpha * L / L0 - (alpha - 1))^(d/(d-2)).  Requests that fit the native window
run natively. Each bucket is one RoPE configuration, i.e. one slot of the engine's table (a
cos/sin table built in milliseconds), so buckets can be fine: by default the base of the
request's own length within 256 tokens. The response's `strategy` says which length and base.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from server.plan import ModelFacts, RopeConfig
from strategies.base import QUESTION_RESERVE_TOKENS, ExecutionPlan, PlanContext, StrategyRequest
from strategies.rope import RopeParams, RopeStrategy, factor_field


class DynamicNtkParams(RopeParams):
    factor: float = factor_field(8.0)
    bucket_tokens: int = Field(
        default=256,
        ge=1,
        le=131072,
        description="request lengths are rounded up to a multiple of this before the base is computed "
        "(1: the exact length; larger: fewer distinct configurations)",
    )
    alpha: float = Field(
        default=2.0,
        ge=1.0,
        le=16.0,
        description="transformers' dynamic-NTK `factor`: base = theta * (alpha * L / L0 - (alpha - 1))^(d/(d-2))",
    )


def bucket_length(total_tokens: int, bucket_tokens: int, native_window: int, limit: int) -> int:
    """Round a request length up to a multiple of `bucket_tokens`, within [native window, limit]."""
    bucket = -(-total_tokens // bucket_tokens) * bucket_tokens
    return min(max(bucket, native_window), max(limit, native_window))


def dynamic_ntk_theta(theta: float, alpha: float, length: int, native_window: int, dim: int) -> float:
    length = max(length, native_window)
    return float(theta) * math.pow(alpha * length / native_window - (alpha - 1), dim / (dim - 2))


class DynamicNtkStrategy(RopeStrategy[DynamicNtkParams]):
    name = "dynamic_ntk"
    description = (
        "Dynamic NTK: the RoPE base is chosen per request from its length (prompt + max_new_tokens, "
        "rounded up to bucket_tokens); up to factor x the native window."
    )
    Params = DynamicNtkParams

    def bucket(self, total_tokens: int, model: ModelFacts) -> int:
        return bucket_length(total_tokens, self.params.bucket_tokens, model.native_window, self.max_total_tokens(model))

    def rope_parameters(self, model: ModelFacts, length: int | None = None) -> dict[str, Any]:
        length = length if length is not None else self.max_total_tokens(model)
        theta = dynamic_ntk_theta(model.rope_theta, self.params.alpha, length, model.native_window, model.head_dim)
        return {**self.base_parameters(model), "rope_type": "default", "rope_theta": theta}

    def rope_config(self, model: ModelFacts, request_tokens: int | None = None) -> RopeConfig:
        if request_tokens is None:
            request_tokens = self.max_total_tokens(model)
        if request_tokens <= model.native_window:
            return RopeConfig.native()  # the model as trained: shares the native engine
        bucket = self.bucket(request_tokens, model)
        return RopeConfig.from_dict(self.rope_parameters(model, bucket), bucket)

    def config_tokens(self, request: StrategyRequest, needed: int, context: PlanContext) -> int:
        """With documents, the question counts as at least QUESTION_RESERVE_TOKENS: every question
        up to that long on the same documents gets the same base, hence the same cache salt, and
        reads the documents' KV from the prefix cache (requests inside the window stay native)."""
        if not request.documents or needed <= context.model.native_window:
            return needed
        question = len(request.prompt_tokens().question)  # DOCUMENT_SEPARATOR + inputs
        return needed - question + max(question, QUESTION_RESERVE_TOKENS)

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        model = context.model
        plan = super().plan(request, context)
        rope = plan.rope.as_dict()
        # Which length the base was computed for, and the base (the native ones for short requests).
        plan.resolved["length"] = plan.rope.max_model_len or model.native_window
        plan.resolved["rope_theta"] = float(rope.get("rope_theta", model.rope_theta))
        return plan
