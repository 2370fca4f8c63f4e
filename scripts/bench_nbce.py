"""NBCE cost vs document length, next to the best RoPE scaling, against a running server (HTTP).

For each length a passkey document (clients/bench_passkey.py's haystack) is sent once with
`nbce` and once with the RoPE strategy `auto` would pick for that length without NBCE (the
smallest sufficient factor of the best measured scaling); each request streams, so the table
shows time to first token, time per output token, the total, whether the pass key came back,
and NBCE's rows. `--load N` keeps N ordinary clients busy meanwhile (NBCE shares the batch).

    .venv/bin/python scripts/bench_nbce.py --url http://127.0.0.1:8000 --lengths 8k,16k,32k
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.bench_passkey import make_case, parse_length
from clients.client import sse_events
from server.ops.model_store import default_checkpoint_dir
from strategies.rope import SUGGESTION_ORDER, smallest_power_of_two_factor


def rope_spec(total_tokens: int, native_window: int, name: str) -> dict[str, Any]:
    factor = smallest_power_of_two_factor(total_tokens, native_window)
    return {"name": "native"} if factor == 1.0 else {"name": name, "factor": factor}


def timed_stream(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    tokens = 0
    final: dict[str, Any] = {}
    error = None
    with client.stream("POST", "/generate_stream", json=body) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"{r.status_code} {r.text[:200]}"}
        for event in sse_events(r.iter_lines()):
            if "error" in event:
                error = event["error"]
                break
            tokens += 1
            if first is None:
                first = time.perf_counter()
            if event.get("generated_text") is not None:
                final = event
    total = time.perf_counter() - started
    if error:
        return {"error": error}
    ttft = (first or started) - started
    return {
        "ttft_s": ttft,
        "per_token_s": (total - ttft) / max(1, tokens - 1),
        "total_s": total,
        "tokens": tokens,
        "text": final.get("generated_text", ""),
    }


def background_load(url: str, clients: int, stop: threading.Event, done: list[int]) -> list[threading.Thread]:
    def work(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while not stop.is_set():
                r = c.post(
                    "/generate",
                    json={"inputs": f"Write a short poem about the number {i}.", "parameters": {"max_new_tokens": 32}},
                )
                if r.status_code == 200:
                    done[0] += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--lengths", default="8k,16k,32k")
    ap.add_argument(
        "--rope", default=SUGGESTION_ORDER[0], help="RoPE scaling to compare with (smallest sufficient factor)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--load", type=int, default=0, help="ordinary clients kept busy meanwhile")
    ap.add_argument("--nbce", default='{"name": "nbce"}', help="NBCE strategy object (JSON)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.environ.get("ROPESERVE_BENCH_TOKENIZER", str(default_checkpoint_dir())))

    def count(text: str) -> int:
        return len(tok.encode(text))

    client = httpx.Client(base_url=args.url, timeout=1800)
    window = int(client.get("/info").json().get("native_context_window", 8192))
    nbce = json.loads(args.nbce)
    stop, done = threading.Event(), [0]
    if args.load:
        background_load(args.url, args.load, stop, done)
    rows = []
    print(f"{'length':>7} | {'strategy':<22} | {'ttft s':>7} | {'s/token':>7} | {'total s':>7} | ok | note", flush=True)
    for length_text in args.lengths.split(","):
        length = parse_length(length_text)
        # Varied filler: repeated filler would make NBCE's rows identical, served once by the prefix
        # cache; the instruction goes with the question, which every NBCE row reads.
        case = make_case(length, 0.5, str(10000 + length % 89999), count, instruction_in_inputs=True, varied=True)
        for spec in (nbce, rope_spec(length + args.max_new_tokens, window, args.rope)):
            before = done[0]
            # A fresh first line per run: no strategy reads another's prompt from the prefix cache.
            context = f"Document {time.time_ns()}.\n" + case.context
            res = timed_stream(
                client,
                {
                    "inputs": case.inputs,
                    "context": context,
                    "strategy": spec,
                    "parameters": {"max_new_tokens": args.max_new_tokens},
                },
            )
            label = spec["name"] + (f" x{spec['factor']:g}" if "factor" in spec else "")
            if "error" in res:
                print(f"{length:>7} | {label:<22} | error: {res['error']}", flush=True)
                rows.append({"length": length, "strategy": spec, **res})
                continue
            ok = case.key in res["text"]
            note = f"load served {done[0] - before}" if args.load else ""
            print(
                f"{length:>7} | {label:<22} | {res['ttft_s']:7.2f} | {res['per_token_s']:7.3f} | "
                f"{res['total_s']:7.2f} | {'y' if ok else 'n':>2} | {note}",
                flush=True,
            )
            rows.append({"length": length, "strategy": spec, "ok": ok, **res})
    stop.set()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
