"""`ropeserve bench structured` without a server: its schema is one the server serves, and its table."""

from __future__ import annotations

from clients.bench_structured import extraction_schema, table
from server.structured.json_schema import schema_problem


def test_the_benchmark_schema_is_served_and_cannot_end_early() -> None:
    schema = extraction_schema(64)
    assert schema_problem(schema) is None
    assert schema["properties"]["entries"]["minItems"] == 64


def test_the_table_shows_each_cell_and_its_ratio() -> None:
    results = {
        "cells": [
            {
                "length": 16000,
                "strategy": {"name": "dca"},
                "free_ms_per_token": 40.0,
                "json_ms_per_token": 42.0,
                "ratio": 1.05,
            },
            {"length": 200, "strategy": {"name": "nbce"}, "error": "422: no"},
        ]
    }
    text = table(results)
    assert '| 16,000 | `{"name":"dca"}` | 40.0 | 42.0 | 1.050x |' in text
    assert '| 200 | `{"name":"nbce"}` | – | 422: no | – |' in text
