"""A small Python client for ropeserve's own API (TGI-shaped `/generate` plus `context`/`strategy`).

    from clients.client import RopeserveClient
    client = RopeserveClient("http://127.0.0.1:8000")
    reply = client.generate("Who wrote it?", context=long_document, strategy={"name": "yarn", "factor": 2})
    print(reply.generated_text, reply.strategy)
    for event in client.generate_stream("Who wrote it?", context=long_document, strategy="nbce"):
        print(event.token.text, end="", flush=True)

Responses are the server's own pydantic models (`server.schemas`); an error reply raises
`RopeserveError` with the server's `error` and `error_type`.

A request with a `context` carries `X-Session-Id: <document_routing_key(context)>`: behind vLLM's
router with `--policy consistent_hash`, every question on one document goes to the replica that
already holds its KV blocks in the prefix cache (docs/scaling.md, "A fleet with document affinity").
A server ignores the header. Through that router use `generate_stream`: the router rewrites
`/generate` bodies into SGLang's request shape, which drops `inputs`, `context` and `strategy`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from server.schemas import GenerateResponse, InfoResponse, StrategiesResponse, StrategySpec, StreamResponse

# The first header vLLM's router hashes on (its `consistent_hash` policy): same key, same replica.
ROUTING_HEADER = "X-Session-Id"


def document_routing_key(context: str | list[str]) -> str:
    """A key that names the documents of a request: the same documents (in the same order) give the
    same key, so a router that hashes it sends them to the same replica."""
    texts = [context] if isinstance(context, str) else context
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return "doc-" + digest.hexdigest()[:32]


class RopeserveError(RuntimeError):
    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.message = message
        self.error_type = error_type


class RopeserveClient:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 900.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> RopeserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def info(self) -> InfoResponse:
        return InfoResponse.model_validate(self._json(self._http.get("/info")))

    def strategies(self) -> StrategiesResponse:
        return StrategiesResponse.model_validate(self._json(self._http.get("/strategies")))

    def generate(
        self,
        inputs: str,
        context: str | list[str] | None = None,
        strategy: StrategySpec | None = None,
        **parameters: Any,
    ) -> GenerateResponse:
        """`parameters` are TGI's (max_new_tokens, do_sample, temperature, stop, details, ...)."""
        body = _body(inputs, context, strategy, parameters)
        reply = self._http.post("/generate", json=body, headers=_routing_headers(context))
        return GenerateResponse.model_validate(self._json(reply))

    def generate_stream(
        self,
        inputs: str,
        context: str | list[str] | None = None,
        strategy: StrategySpec | None = None,
        **parameters: Any,
    ) -> Iterator[StreamResponse]:
        """One event per token; the last carries `generated_text`, `details` and `strategy`."""
        body = _body(inputs, context, strategy, parameters)
        with self._http.stream("POST", "/generate_stream", json=body, headers=_routing_headers(context)) as reply:
            if reply.status_code != 200:
                reply.read()
                self._json(reply)
            for event in sse_events(reply.iter_lines()):
                if "error" in event:  # the stream had started when generation failed
                    raise RopeserveError(200, event["error"], event.get("error_type", "generation"))
                yield StreamResponse.model_validate(event)

    @staticmethod
    def _json(reply: httpx.Response) -> Any:
        try:
            body = reply.json()
        except ValueError:
            body = {"error": reply.text, "error_type": "generation"}
        if reply.status_code != 200:
            raise RopeserveError(reply.status_code, body.get("error", reply.text), body.get("error_type", "generation"))
        return body


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of a `/generate_stream` reply (its `data:` lines)."""
    for line in lines:
        if line.startswith("data:"):
            yield json.loads(line[len("data:") :])


def _routing_headers(context: str | list[str] | None) -> dict[str, str]:
    return {ROUTING_HEADER: document_routing_key(context)} if context else {}


def _body(
    inputs: str, context: str | list[str] | None, strategy: StrategySpec | None, parameters: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": inputs, "parameters": parameters}
    if context is not None:
        body["context"] = context
    if strategy is not None:
        body["strategy"] = strategy
    return body
