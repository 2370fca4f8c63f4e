"""The project's own Python client against the real server."""

from __future__ import annotations

import pytest

from clients.client import RopeserveClient, RopeserveError

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]


def test_generate_stream_and_discovery(base_url):
    with RopeserveClient(base_url) as client:
        assert client.info().native_context_window == 8192
        assert "native" in [s.name for s in client.strategies().strategies]
        reply = client.generate(
            "The capital of France is", context="Paris is in France.", strategy="native", max_new_tokens=6, details=True
        )
        assert reply.strategy["name"] == "native" and reply.details.generated_tokens == 6
        events = list(
            client.generate_stream(
                "The capital of France is", context="Paris is in France.", strategy="native", max_new_tokens=6
            )
        )
        assert len(events) == 6 and events[-1].generated_text == reply.generated_text  # greedy: same text
        assert "".join(e.token.text for e in events) == reply.generated_text


def test_errors_carry_the_servers_message(base_url):
    with RopeserveClient(base_url) as client:
        with pytest.raises(RopeserveError) as refused:
            client.generate("x", strategy="no_such_strategy")
        assert refused.value.status == 422 and refused.value.error_type == "validation"
        assert "no_such_strategy" in refused.value.message
        with pytest.raises(RopeserveError) as streamed:
            list(client.generate_stream("word " * 9000, max_new_tokens=4))
        assert streamed.value.status == 422 and "8192" in streamed.value.message
