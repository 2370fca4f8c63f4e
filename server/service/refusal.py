"""A request the server cannot take now: one type from where the refusal is decided (capacity,
admission by queued work) to the reply, the metrics and the dry run.

    >>> r = Refusal("draining", 503, "the server is shutting down; retry on another replica")
    >>> r.reason, r.status, str(r), r.retry_after_s
    ('draining', 503, 'the server is shutting down; retry on another replica', None)
"""

from __future__ import annotations

from server.ops.metrics import REFUSAL_REASONS

# What each status tells the client (docs/CONTRACT.md): 429 this server is busy, retry it later;
# 503 it cannot serve (shutting down, its engine down), retry later or on another replica.
REFUSAL_STATUSES = (429, 503)


class Refusal(Exception):
    """Why (`reason`: one of the refusals' counter labels), the HTTP status (429 or 503), the
    message the client reads, and when to retry (`retry_after_s`; None: the usual second)."""

    def __init__(self, reason: str, status: int, message: str, retry_after_s: int | None = None) -> None:
        if reason not in REFUSAL_REASONS or status not in REFUSAL_STATUSES:
            raise ValueError(f"not a refusal: {reason!r} with status {status}")
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
