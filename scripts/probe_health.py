"""How `/health` answers under two faults the hostile-input probes found, against a running server.

    # the engine-core process killed on an idle server: how soon /health says 503, and the restart
    python scripts/probe_health.py death --url http://127.0.0.1:8643 --server-pid PID --trials 3
    # echo with 20 logprobs at growing prompts: the slowest /health answer meanwhile
    python scripts/probe_health.py echo --url http://127.0.0.1:8643

Each prints one JSON line per trial or prompt. `/health` is polled from a process of its own
(tests/support/health_watch.py), so this script's own work does not delay the polls.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.health_watch import HealthWatch

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "


def engine_cores(server_pid: int) -> list[psutil.Process]:
    children = psutil.Process(server_pid).children(recursive=True)
    return [p for p in children if "EngineCore" in " ".join(p.cmdline())]


def wait_healthy(client: httpx.Client) -> None:
    while client.get("/health").status_code != 200:
        time.sleep(0.5)


def death(url: str, server_pid: int, trials: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for trial in range(trials):
            wait_healthy(client)
            time.sleep(2)
            cores = engine_cores(server_pid)
            assert len(cores) == 1, cores
            killed = time.perf_counter()
            cores[0].send_signal(signal.SIGKILL)
            seen = None
            while time.perf_counter() - killed < 30:
                if client.get("/health").status_code == 503:
                    seen = time.perf_counter() - killed
                    break
                time.sleep(0.01)
            ready, live = client.get("/health/ready").status_code, client.get("/health/live").status_code
            wait_healthy(client)
            restart = time.perf_counter() - killed
            print(
                json.dumps(
                    {"trial": trial, "health_503_after_s": seen, "ready": ready, "live": live, "restart_s": restart}
                )
            )


def echo(url: str, repeats: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=600) as client:
        for n in repeats:
            prompt = f"{n} " + SENTENCE * n
            tokens = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
            body = {"prompt": prompt, "echo": True, "logprobs": 20, "max_tokens": 1, "temperature": 0}
            with HealthWatch(url, interval_s=0.02) as watch:
                started = time.perf_counter()
                reply = client.post("/v1/completions", json=body)
                took = time.perf_counter() - started
            row = {
                "prompt_tokens": tokens,
                "status": reply.status_code,
                "seconds": round(took, 2),
                "reply_mb": round(len(reply.content) / 2**20, 2),
                "health": watch.report,
            }
            print(json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="probe", required=True)
    kill = sub.add_parser("death", help="kill the engine core, time /health's 503")
    kill.add_argument("--url", required=True)
    kill.add_argument("--server-pid", type=int, required=True)
    kill.add_argument("--trials", type=int, default=3)
    logprobs = sub.add_parser("echo", help="echo with 20 logprobs, /health's slowest answer meanwhile")
    logprobs.add_argument("--url", required=True)
    logprobs.add_argument("--repeats", default="50,100,200,400", help="sentences a prompt, comma-separated")
    args = parser.parse_args()
    if args.probe == "death":
        death(args.url, args.server_pid, args.trials)
    else:
        echo(args.url, [int(n) for n in args.repeats.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
