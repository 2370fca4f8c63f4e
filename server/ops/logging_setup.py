"""One JSON line per request on the `ropeserve.access` logger; plain lines for everything else."""

from __future__ import annotations

import json
import logging
import sys
import time

ACCESS_LOGGER = "ropeserve.access"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonAccessFormatter(logging.Formatter):
    """`log.info("request", extra={"access": {...}})` → one JSON object on one line.

    Only the `access` dict's fields are written (other libraries, vLLM among them, add their own
    attributes to every log record); without it, the record's non-standard attributes are.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "event": record.getMessage(),
        }
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("vllm_")})
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonAccessFormatter())
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
