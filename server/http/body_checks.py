"""The limits a generation body meets before it is planned (`max_new_tokens`, input characters),
and the refusals of a body whose plan reads several rows (logprobs, echo).

Shared by the TGI, OpenAI and tokenize routes, so all apply the same limits with the same messages.
"""

from __future__ import annotations

from server.http.errors import validation_error
from server.service.jobs import Job
from server.settings import Settings


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
