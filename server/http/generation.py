"""Request bodies to engine-neutral values, and engine steps back to full results.

Shared by the TGI and OpenAI routes, so both apply the same limits and the same TGI meanings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engines.base import EngineStep, FinishReason, SamplingOptions, TokenEvent
from server.http.errors import validation_error
from server.schemas import ChatCompletionRequest, CompletionRequest, GenerateParameters, GenerateRequest
from server.service.jobs import Job
from server.settings import Settings

TGI_DEFAULT_MAX_NEW_TOKENS = 100
# Chat without max_tokens: a fixed cap (not "the rest of the window", which depends on the
# strategy), so that the strategy's length check stays predictable.
CHAT_DEFAULT_MAX_TOKENS = 1024


def documents_of(context: str | list[str] | None) -> tuple[str, ...]:
    if context is None:
        return ()
    return (context,) if isinstance(context, str) else tuple(context)


def check_limits(settings: Settings, max_new_tokens: int, field_name: str, texts: list[str]) -> None:
    if max_new_tokens > settings.max_new_tokens_limit:
        raise validation_error(f"{field_name}: must be <= {settings.max_new_tokens_limit} (got {max_new_tokens})")
    check_input_chars(settings, texts)


def check_input_chars(settings: Settings, texts: list[str], field_name: str = "inputs") -> None:
    """The prompt's texts and the documents together hold at most `max_input_chars` characters."""
    chars = sum(len(t) for t in texts)
    if chars > settings.max_input_chars:
        raise validation_error(
            f"{field_name}: {field_name} and context together hold {chars} characters; the limit is "
            f"{settings.max_input_chars}"
        )


def tgi_sampling(params: GenerateParameters, settings: Settings) -> SamplingOptions:
    """TGI samples when do_sample is set or any warper is set (temperature != 1, top_k, top_p < 1;
    typical_p is refused: vLLM has none)."""
    max_new = params.max_new_tokens or min(TGI_DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens_limit)
    warped = (
        (params.temperature is not None and params.temperature != 1.0)
        or params.top_k is not None
        or (params.top_p is not None and params.top_p < 1.0)
    )
    return SamplingOptions(
        max_new_tokens=max_new,
        greedy=not (params.do_sample or warped),
        temperature=params.temperature or 1.0,
        top_p=params.top_p or 1.0,
        top_k=params.top_k,
        seed=params.seed,
        stop=tuple(params.stop),
        repetition_penalty=params.repetition_penalty or 1.0,
        frequency_penalty=params.frequency_penalty or 0.0,
        top_logprobs=params.top_n_tokens or 0,
        # TGI's `details.prefill`: the prompt's tokens with their logprobs.
        prompt_logprobs=0 if params.decoder_input_details and params.details else None,
        constraint=params.grammar.constraint() if params.grammar is not None else None,
    )


def tgi_request_values(body: GenerateRequest, settings: Settings) -> tuple[tuple[str, ...], SamplingOptions]:
    documents = documents_of(body.context)
    sampling = tgi_sampling(body.parameters, settings)
    check_limits(settings, sampling.max_new_tokens, "parameters.max_new_tokens", [body.inputs, *documents])
    return documents, sampling


def openai_sampling(
    body: CompletionRequest | ChatCompletionRequest, settings: Settings, prompt: str
) -> SamplingOptions:
    """OpenAI's sampling fields (completions and chat) as engine sampling options.

    `max_tokens: 0` (completions with `echo`) still runs one engine step, as vLLM does; the route
    returns the prompt alone."""
    if isinstance(body, ChatCompletionRequest):
        max_new = (
            body.max_completion_tokens or body.max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, settings.max_new_tokens_limit)
        )
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else 0
        prompt_logprobs = None
        field_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    else:
        max_new = 16 if body.max_tokens is None else max(body.max_tokens, 1)
        top_logprobs = body.logprobs or 0
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        field_name = "max_tokens"
    check_limits(settings, max_new, field_name, [prompt, *documents_of(body.context)])
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingOptions(
        max_new_tokens=max_new,
        greedy=temperature == 0.0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=body.top_p or 1.0,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,
        seed=body.seed,
        stop=tuple(body.stop_list()),
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        ignore_eos=body.ignore_eos,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        constraint=body.constraint(),
    )


def refuse_combined_logprobs(job: Job, field_name: str | None) -> None:
    """A multi-row plan's tokens come from its combiner, not from one distribution of the model:
    there are no logprobs to report, and nulls where a client expects numbers would mislead.
    `field_name`: the body field that asks for them (None: not asked)."""
    if field_name is not None and len(job.plan.rows) > 1:
        raise validation_error(
            f"{field_name}: '{job.strategy_name}' chooses each token from {len(job.plan.rows)} rows combined; "
            f"it has no per-token logprobs (leave out {field_name.rsplit('.', 1)[-1]}, or use a single-row strategy)"
        )


def refuse_combined_echo(job: Job, echo: bool) -> None:
    """A multi-row plan reads its documents in several rows, not as one prompt: there is no prompt
    to echo (docs/CONTRACT.md: NBCE refuses `echo`), with or without its logprobs."""
    if echo and len(job.plan.rows) > 1:
        raise validation_error(
            f"echo: '{job.strategy_name}' reads {len(job.plan.rows)} rows combined, not one prompt; there is "
            "no prompt to echo (leave out echo, or use a single-row strategy)"
        )


@dataclass
class GenerationResult:
    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    prompt_tokens: int = 0
    prompt_logprobs: list[TokenEvent] | None = None

    def add(self, step: EngineStep) -> None:
        if step.prompt_logprobs is not None:
            self.prompt_logprobs = step.prompt_logprobs
        self.text += step.text
        self.tokens.extend(step.tokens)
        self.prompt_tokens = max(self.prompt_tokens, step.prompt_tokens)
        if step.finished and step.finish_reason is not None:
            self.finish_reason = step.finish_reason


async def collect(steps: AsyncIterator[EngineStep]) -> GenerationResult:
    result = GenerationResult()
    async for step in steps:
        result.add(step)
    return result
