"""A server with the test plugin installed: a plugin's RoPE strategy and a plugin's multi-row
strategy (its own combiner) are served by the one engine, with no change to the server.

A server of its own (the shared one must not list test strategies): tests/conftest.py's
`plugin_server`."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import RunningServer

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

QUESTION = "Which animal is named in the text? Answer in one word."
DOCUMENTS = [
    "The old barn was home to a grey owl that hunted at dusk.",
    "Every morning a small red fox crossed the frozen river.",
]


def generate(http: httpx.Client, context: str | list[str], strategy: object) -> dict:
    r = http.post(
        "/generate",
        json={
            "inputs": QUESTION,
            "context": context,
            "strategy": strategy,
            "parameters": {"max_new_tokens": 12, "details": True},
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_plugin_strategies_are_served_by_the_one_engine(plugin_server: RunningServer) -> None:
    with httpx.Client(base_url=plugin_server.url, timeout=300) as http:
        listed = {s["name"]: s for s in http.get("/strategies").json()["strategies"]}
        assert {"shifted_theta", "per_document"} <= set(listed)
        assert "rope" in listed["per_document"]["parameters_schema"]["properties"]

        # The multi-row plugin: each document's row answered in turn by its own combiner, which
        # gives what the same engine answers for each document alone, one after the other.
        alone = [generate(http, doc, "native") for doc in DOCUMENTS]
        combined = generate(http, DOCUMENTS, "per_document")
        assert combined["strategy"]["name"] == "per_document" and combined["strategy"]["rows"] == 2
        assert combined["generated_text"] == "".join(a["generated_text"] for a in alone)
        assert [t["id"] for t in combined["details"]["tokens"]] == [
            t["id"] for a in alone for t in a["details"]["tokens"]
        ]

        # Its rows under the plugin's RoPE scaling: resolved through the server's registry.
        scaled = generate(http, DOCUMENTS, {"name": "per_document", "rope": "shifted_theta"})
        assert scaled["details"]["generated_tokens"] >= 2

        # A malformed plugin request is a 422 naming the field, like any strategy's.
        bad = http.post(
            "/generate",
            json={"inputs": QUESTION, "context": DOCUMENTS, "strategy": {"name": "per_document", "rope": 5}},
        )
        assert bad.status_code == 422 and "strategy.rope" in bad.json()["error"], bad.text
        assert http.get("/health").status_code == 200
