"""Admission by queued work on the real engine: a burst of long documents is answered with 429s and
a Retry-After for what cannot start soon, while a short request sent meanwhile is served (it goes
ahead of the documents by its default priority, and what waits ahead of it is at most about one
step of their prefill).

A server of its own, with a small bound (ROPESERVE_MAX_QUEUE_WAIT_S=10) and a small step
(ROPESERVE_MAX_NUM_BATCHED_TOKENS=512), so that the arithmetic holds on any host this runs on: the
short request has at most one 512-token step ahead of it (under 10 s unless the engine prefills
under about 55 tokens/s), while the eighth 4000-token document has 28,000 prompt tokens ahead of
it, past 10 s unless the engine prefills over 2,800 tokens/s."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server
from tests.support.documents import report
from tests.support.metrics_text import scrape

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

BOUND_S = 10
DOCUMENTS = 8
# About 4000 tokens each (11 tokens a sentence); seeds apart, so no two share a cached prefix.
SENTENCES = 360
ADMISSION_ENV = {
    "ROPESERVE_MAX_QUEUE_WAIT_S": str(BOUND_S),
    "ROPESERVE_MAX_NUM_BATCHED_TOKENS": "512",
    "ROPESERVE_LONG_PREFILL_TOKENS": "512",
}


def document_body(seed: int) -> dict[str, object]:
    return {
        "inputs": "Which entry mentions the sealed letter first?",
        "context": report(SENTENCES, seed=seed),
        "parameters": {"max_new_tokens": 4, "do_sample": False},
        "strategy": "native",
    }


def test_a_burst_of_documents_gets_429s_while_a_short_request_is_served(tmp_path) -> None:
    server = start_server(tmp_path, extra_env=ADMISSION_ENV, name="admission")
    try:
        with httpx.Client(base_url=server.url, timeout=900) as http:
            with concurrent.futures.ThreadPoolExecutor(DOCUMENTS + 1) as pool:
                burst = [pool.submit(http.post, "/generate", json=document_body(seed)) for seed in range(DOCUMENTS)]
                time.sleep(2)  # the burst is planned and the first documents are prefilling
                started = time.monotonic()
                short = http.post("/generate", json={"inputs": "Say hi.", "parameters": {"max_new_tokens": 4}})
                short_s = time.monotonic() - started
                replies = [future.result(timeout=900) for future in burst]

            assert short.status_code == 200, (short.text, server.log()[-3000:])
            statuses = [r.status_code for r in replies]
            refused = [r for r in replies if r.status_code == 429]
            assert set(statuses) <= {200, 429}, (statuses, [r.text for r in replies])
            # The first document had nothing ahead of it; the later ones had tens of seconds.
            assert statuses.count(200) >= 1 and refused, (statuses, short_s)
            for reply in refused:
                error = reply.json()
                assert error["error_type"] == "overloaded" and "max_queue_wait_s" in error["error"], error
                assert f"bound of {BOUND_S} s" in error["error"], error
                assert int(reply.headers["retry-after"]) >= 1, reply.headers
            assert scrape(http, "ropeserve_requests_refused_total", reason="prefill_backlog") >= len(refused)
            # Everything answered: nothing is left queued, and the estimate is back to nothing.
            assert scrape(http, "ropeserve_admission_queued_prompt_tokens") == 0
            assert scrape(http, "ropeserve_admission_estimated_wait_seconds") == 0
            assert scrape(http, "ropeserve_admission_tokens_per_second", phase="prefill") > 0
            # A refused document, sent again once the burst is done, is served.
            again = http.post("/generate", json=document_body(0))
            assert again.status_code == 200, again.text
    finally:
        stop_server(server)
