"""A request body as engine-neutral values: its documents and its sampling options.

Shared by the TGI and OpenAI routes, so both give each field the same meaning (TGI's or OpenAI's).
"""

from __future__ import annotations

from server.engines.base import SamplingOptions
from server.http.body_checks import check_limits
from server.schemas import ChatCompletionRequest, CompletionRequest, GenerateParameters, GenerateRequest
from server.settings import Settings

TGI_DEFAULT_MAX_NEW_TOKENS = 100
# Chat without max_tokens: a fixed cap (not "the rest of the window", which depends on the
# strategy), so that the strategy's length check stays predictable.
CHAT_DEFAULT_MAX_TOKENS = 1024


def documents_of(context: str | list[str] | None) -> tuple[str, ...]:
    if context is None:
        return ()
    return (context,) if isinstance(context, str) else tuple(context)


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
