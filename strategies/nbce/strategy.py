"""`nbce`: Naive Bayes-based Context Extension (Su Jianlin, 2023) — parallel-context decoding.

The documents become rows that decode in lockstep (docs/CONTRACT.md, "NBCE rows"):

* a list `context` gives one row per document; a string `context`'s token ids are cut into
  chunks of at most `chunk_tokens` tokens, on paragraph or sentence ends when one is near
  (chunking.py);
* a document's row is its text `d_k + "\n\n" + inputs` tokenized as one string (the service's
  `PromptTokens.document_prompts`); a chunk's row is the chunk's ids followed by the ids of
  `"\n\n" + inputs` (the same ids: a chunk ends on a non-blank token of a byte-level tokenizer),
  and one more row is the ids of `inputs` alone (the unconditioned row);
* at every step the rows' next-token log-probabilities are pooled (`min_entropy` as the
  reference: the row of least entropy; `max_prob`: the row whose best token is most likely;
  `mean`: the average log-probability of the context rows, or, at a step where `top_p` leaves
  their nuclei no token in common, the log of their average probability, so that a token is
  always one some row finds likely: combine.py), the unconditioned row is subtracted
  as `(beta + 1) * pooled - beta * uncond`, the token is chosen from that, and appended to every row.

The rows run under a RoPE strategy of their own (`rope`, default `native`) resolved through the
server's registry (`PlanContext.resolve`), so NBCE composes with every RoPE scaling; its plan
gives the RoPE configuration and the longest row. The plan's rows are `[uncond, row_1, ..., row_n]`
(the unconditioned row first, as in the reference); the service decodes them in lockstep
(server/service/lockstep.py), each tagged by its combiner (protocol.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from server.plan import ModelFacts, RopeConfig
from strategies.base import (
    DOCUMENT_SEPARATOR,
    QUESTION_RESERVE_TOKENS,
    ExecutionPlan,
    PlanContext,
    PromptTokens,
    Strategy,
    StrategyError,
    StrategyParams,
    StrategyRequest,
    StrategySpec,
    too_many_rows,
)
from strategies.nbce.chunking import chunk_spans
from strategies.nbce.protocol import Combination, NbceCombiner, Pooling

MIN_CHUNK_TOKENS = 16


def question_room(question_tokens: int, row_limit: int) -> int:
    """Tokens a row keeps for the question: at least QUESTION_RESERVE_TOKENS where the row has room
    to spare, so the chunks (and their prefix-cache blocks) do not move with a question's length."""
    reserve = QUESTION_RESERVE_TOKENS if row_limit >= 4 * QUESTION_RESERVE_TOKENS else 0
    return max(question_tokens, reserve)


# The combination's defaults (protocol.py), stated once.
DEFAULT = Combination()


class NbceParams(StrategyParams):
    chunk_tokens: int | None = Field(
        default=None,
        ge=MIN_CHUNK_TOKENS,
        le=1_048_576,
        description="most tokens of a string context per row; default: what fits the row window "
        "together with the question and max_new_tokens",
    )
    beta: float = Field(default=DEFAULT.beta, ge=0.0, le=10.0, description="weight of the unconditioned row")
    pooling: Pooling = Field(default=DEFAULT.pooling, description="how the context rows are pooled at each step")
    eta: float = Field(
        default=DEFAULT.eta,
        ge=0.0,
        le=10.0,
        description="stickiness bonus (in nats) for the row chosen at the previous step",
    )
    top_p: float | None = Field(
        default=DEFAULT.top_p,
        gt=0.0,
        le=1.0,
        description="per-row nucleus truncation before pooling (the reference uses 0.95); none: full vocabulary",
    )
    split: Literal["context", "last_paragraph", "last_line"] = Field(
        default="context",
        description="where the document comes from: the request's `context`; or, for clients that cannot "
        "send one (lm-eval, plain OpenAI clients), the prompt itself, split into document (before) and "
        "question (after) at its last blank line (`last_paragraph`) or its last line break (`last_line`)",
    )
    rope: StrategySpec = Field(
        default="native", description="RoPE strategy spec the rows run under (a name or {'name': ..., ...})"
    )


def resolve_rope_strategy(spec: StrategySpec, context: PlanContext) -> Strategy[Any]:
    name = spec if isinstance(spec, str) else spec.get("name")
    if name in ("nbce", "auto"):
        raise StrategyError(f"strategy.rope: '{name}' is not a RoPE strategy")
    try:
        strategy = context.resolve(spec)
    except StrategyError as exc:
        raise StrategyError(exc.message.replace("strategy", "strategy.rope", 1)) from None
    return strategy


def rope_plan_for(
    rope_strategy: Strategy[Any], text: str, ids: list[int], max_new_tokens: int, context: PlanContext
) -> ExecutionPlan:
    """The RoPE strategy's plan for one row (`ids`, the ids of `text`): its RoPE config and its
    longest total length."""
    row = StrategyRequest(inputs=text, max_new_tokens=max_new_tokens, tokens=PromptTokens(tuple(ids)))
    try:
        plan = rope_strategy.plan(row, context)
    except StrategyError as exc:
        raise StrategyError(f"strategy.rope: {exc.message}", field="inputs") from None
    if plan.combiner is not None or len(plan.rows) != 1:
        raise StrategyError(f"strategy.rope: '{rope_strategy.name}' is not a single-row RoPE strategy")
    return plan


def check_documents(request: StrategyRequest, context: PlanContext) -> None:
    """A context to read, and no more documents than rows one engine step runs (StrategyError)."""
    if not request.documents or not any(d.strip() for d in request.documents):
        raise StrategyError(
            "context: nbce needs a context (a document or a list of documents); a token-id prompt, or one "
            "cut by `truncate`, has none",
            field="context",
        )
    documents = sum(1 for d in request.documents if d.strip())
    if len(request.documents) > 1 and context.max_rows is not None and documents + 1 > context.max_rows:
        raise too_many_rows(documents + 1, context.max_rows)


def split_prompt(request: StrategyRequest, separator: str) -> StrategyRequest:
    """The prompt as document (before the last `separator`) and question (after it)."""
    cut = request.inputs.rstrip().rfind(separator)
    if cut <= 0:
        raise StrategyError(
            f"inputs: nbce with split needs a prompt with {separator!r} between the document and the question",
            field="inputs",
        )
    document, question = request.inputs[:cut], request.inputs[cut + len(separator) :]
    return StrategyRequest(inputs=question, documents=(document,), max_new_tokens=request.max_new_tokens)


class NbceStrategy(Strategy[NbceParams]):
    name = "nbce"
    description = (
        "Naive Bayes-based Context Extension: the documents (or chunks of one long document) are "
        "read in parallel rows that fit the window, plus one row with the question alone; at each "
        "step the rows' next-token distributions are pooled (min entropy) and the unconditioned "
        "row is subtracted with weight beta. Exact full-vocabulary combination inside the engine."
    )
    Params = NbceParams
    engine_logits_processors = ("strategies.nbce.processor:NbceLogitsProcessor",)

    def prompt_texts(self, request: StrategyRequest, context: PlanContext) -> StrategyRequest:
        """With `split`, a prompt without `context` is cut into document and question here, before
        it is tokenized: the rows then read the question after the document as they read a
        `context`'s (ids of "\n\n" + question), whichever separator the prompt had. Documents
        that cannot make rows are refused before any is tokenized."""
        if self.params.split != "context" and not request.documents:
            request = split_prompt(request, "\n\n" if self.params.split == "last_paragraph" else "\n")
        check_documents(request, context)
        return request

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        p, model, tokens = self.params, context.model, request.prompt_tokens()
        check_documents(request, context)
        rope_strategy = resolve_rope_strategy(p.rope, context)
        # The RoPE plan for the question alone gives the row window.
        uncond = tokens.alone()
        probe = rope_plan_for(rope_strategy, request.inputs, uncond, request.max_new_tokens, context)
        row_limit = probe.max_total_tokens
        question_tokens = len(tokens.question)
        room = (
            row_limit - request.max_new_tokens - question_room(question_tokens, row_limit) - len(tokens.special_prefix)
        )
        chunk_tokens = p.chunk_tokens if p.chunk_tokens is not None else room
        if chunk_tokens < MIN_CHUNK_TOKENS or (p.chunk_tokens is not None and chunk_tokens > room):
            raise StrategyError(
                f"strategy.chunk_tokens: rows of {row_limit} tokens under rope '{rope_strategy.name}' leave "
                f"{max(room, 0)} tokens per chunk beside the question ({question_tokens} tokens) and "
                f"max_new_tokens ({request.max_new_tokens}); got {chunk_tokens}",
                field="strategy",
            )

        texts, rows = self._rows(request, tokens, chunk_tokens, row_limit, rope_strategy.name, context)
        rows = [uncond, *rows]

        rope: RopeConfig = probe.rope
        max_total = row_limit
        # A RoPE strategy may size itself by prompt length (dynamic_ntk), or be native only while a
        # request fits its window (the window strategies): plan for the longest row, so that every
        # row runs under one configuration that fits all of them.
        longest = max(range(len(texts)), key=lambda i: len(rows[i + 1]))
        text = texts[longest] + DOCUMENT_SEPARATOR + request.inputs
        final = rope_plan_for(rope_strategy, text, rows[longest + 1], request.max_new_tokens, context)
        if final.max_total_tokens >= row_limit:
            rope, max_total = final.rope, final.max_total_tokens

        self._check_kv(rows, request.max_new_tokens, model)
        resolved = {
            "name": self.name,
            "chunk_tokens": chunk_tokens,
            "beta": p.beta,
            "pooling": p.pooling,
            "eta": p.eta,
            "top_p": p.top_p,
            "split": p.split,
            "rope": probe.resolved,
            "rows": len(rows),
            "row_tokens": [len(r) for r in rows],
        }
        return ExecutionPlan(
            rope=rope,
            rows=rows,
            max_total_tokens=max_total,
            resolved=resolved,
            combiner=NbceCombiner(Combination(beta=p.beta, pooling=p.pooling, eta=p.eta, top_p=p.top_p)),
        )

    @staticmethod
    def _rows(
        request: StrategyRequest,
        tokens: PromptTokens,
        chunk_tokens: int,
        row_limit: int,
        rope_name: str,
        context: PlanContext,
    ) -> tuple[list[str], list[list[int]]]:
        """The documents (or chunks) of rows 1..n, and those rows: each one's ids, then the question's."""
        if len(request.documents) > 1:
            texts, rows = [], []
            for i, (text, own_prompt) in enumerate(zip(request.documents, tokens.document_prompts, strict=True)):
                if not text.strip():
                    continue
                row = list(own_prompt)
                if len(row) + request.max_new_tokens > row_limit:
                    raise StrategyError(
                        f"context[{i}]: this document's row has {len(row)} tokens; with max_new_tokens "
                        f"({request.max_new_tokens}) it must be <= {row_limit} under rope '{rope_name}' "
                        "(pass one long string context to have it chunked)",
                        field="context",
                    )
                texts.append(text)
                rows.append(row)
            return texts, rows
        document = tokens.documents[0]
        spans = chunk_spans(document, chunk_tokens)
        if context.max_rows is not None and len(spans) + 1 > context.max_rows:
            raise too_many_rows(len(spans) + 1, context.max_rows)  # before the rows are built
        # Every row fits: a chunk is at most chunk_tokens, which leaves room for the question.
        rows = [tokens.after(document.ids[span.start : span.stop]) for span in spans]
        return [document.span_text(span) for span in spans], rows

    @staticmethod
    def _check_kv(rows: list[list[int]], max_new_tokens: int, model: ModelFacts) -> None:
        """All rows live in the KV cache at once: they must fit it together."""
        cap = getattr(model, "max_context_tokens", None)
        total = sum(len(r) + max_new_tokens for r in rows)
        if cap and total > cap:
            raise StrategyError(
                f"context: nbce holds all {len(rows)} rows in the KV cache at once ({total} tokens with "
                f"max_new_tokens); this server's KV cache holds {cap} tokens",
                field="context",
            )
