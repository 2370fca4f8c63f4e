"""Whether a strategy can serve a length on this server, without paying for the prefill.

The server plans (and refuses with 422) before any engine work; a request that passes planning
but carries a deadline of a few milliseconds comes back as 408 at once (its engine work aborted).
"""

from __future__ import annotations

from typing import Any

import httpx

# " hello" is one token for common BPE vocabularies; the prompt is about `prompt_tokens` long.
WORD = " hello"


def refusal(client: httpx.Client, spec: dict[str, Any], prompt_tokens: int, max_new_tokens: int) -> str | None:
    """None when `spec` serves a plain prompt of `prompt_tokens` + `max_new_tokens` here, else the
    server's reason. The prompt is text with a blank line and a line break before its last line,
    as lm-eval's prompts are (strategies that split the prompt find what they need)."""
    body = {
        "prompt": WORD * max(prompt_tokens - 8, 1) + "\n\nWhat is it?\nIt is",
        "max_tokens": max_new_tokens,
        "strategy": spec,
        "deadline_s": 0.001,
    }
    reply = client.post("/v1/completions", json=body)
    if reply.status_code in (200, 408):
        return None
    try:
        return str(reply.json().get("error", reply.text))
    except ValueError:
        return reply.text[:300]
