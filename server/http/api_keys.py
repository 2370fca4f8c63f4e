"""API keys: how `ROPESERVE_API_KEYS` is written, and the check of a request's `Authorization`.

The setting is one key, keys separated by commas, or a JSON list of strings:

    >>> parse_api_keys("secret"), parse_api_keys("k1, k2"), parse_api_keys('["k,1", "k2"]')
    (['secret'], ['k1', 'k2'], ['k,1', 'k2'])
    >>> parse_api_keys("")
    []

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
import json
from collections.abc import Iterable

from starlette.exceptions import HTTPException

SETTING = "ROPESERVE_API_KEYS"
FORMAT = "one key, keys separated by commas, or a JSON list of strings"


class ApiKeysError(ValueError):
    """ROPESERVE_API_KEYS cannot be read (the server does not start)."""


def parse_api_keys(value: str) -> list[str]:
    """The keys of the setting's text (see the module's doc); ApiKeysError names the format."""
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            keys = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiKeysError(f"{SETTING}: not a valid JSON list ({exc.msg}); it is {FORMAT}") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ApiKeysError(f"{SETTING}: a JSON list must hold strings only; it is {FORMAT}")
    else:
        keys = [k.strip() for k in text.split(",")]
    if any(not k.strip() for k in keys):
        raise ApiKeysError(f"{SETTING}: an empty key (check the commas); it is {FORMAT}")
    return keys


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
