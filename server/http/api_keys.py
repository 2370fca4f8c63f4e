"""API keys: the check of a request's `Authorization` (how `ROPESERVE_API_KEYS` is written is
server/settings.py's `parse_api_keys`).

The check reads the header's raw bytes (what the client sent: any byte, a key in any script) and
compares them with each key's UTF-8 bytes in constant time. Comparing `str`s would raise for
non-ASCII text (`hmac.compare_digest` refuses it), which turned a wrong key into a server error.

    >>> authorized([(b"authorization", "Bearer clé".encode())], [b"cl\\xc3\\xa9"])
    True
    >>> authorized([(b"authorization", b"Bearer secr\\xe9t")], [b"secret"])
    False
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.exceptions import HTTPException


def key_bytes(keys: Iterable[str]) -> list[bytes]:
    return [k.encode("utf-8") for k in keys]


def authorized(headers: Iterable[tuple[bytes, bytes]], keys: list[bytes]) -> bool:
    """Whether the first `Authorization` header is `Bearer <one of keys>` (scheme in any case)."""
    value = next((v for name, v in headers if name.lower() == b"authorization"), b"")
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    # Every key is compared, so the time does not tell which one came close.
    matches = [hmac.compare_digest(token, key) for key in keys]
    return any(matches)


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=401,
        detail="authorization: a valid 'Bearer <key>' header is required",
        headers={"WWW-Authenticate": "Bearer"},
    )
