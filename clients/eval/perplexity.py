"""Perplexity by position through the server's prompt logprobs (`echo` on /v1/completions).

The first `tokens` tokens of a public-domain novel are sent as a token-id prompt with
`max_tokens: 0`; each token's negative log-probability given everything before it comes back, and
the mean over each `bucket`-token window gives the perplexity at that distance into the text.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx

from clients.eval.results import Curve


def curve(client: httpx.Client, spec: dict[str, Any], ids: list[int], bucket: int) -> Curve:
    started = time.perf_counter()
    reply = client.post(
        "/v1/completions",
        json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0, "strategy": spec, "temperature": 0},
    )
    if reply.status_code != 200:
        return Curve(bucket=bucket, refused=str(reply.json().get("error", reply.text))[:300], strategy=spec)
    logprobs = reply.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    ppl = [
        math.exp(-sum(window) / len(window))
        for window in (logprobs[i : i + bucket] for i in range(0, len(logprobs), bucket))
        if len(window) == bucket
    ]
    return Curve(bucket=bucket, ppl=ppl, tokens=len(ids), seconds=time.perf_counter() - started, strategy=spec)
