"""What does ropeserve's wrapper cost? `vllm bench serve` against ropeserve and against plain
`vllm serve` on the same model and engine settings, one after the other in one run, then the ratios.
With `--rounds 2` the pair runs twice in alternating order (ropeserve first, then vllm serve first),
so drift of the machine does not favour one side; the table shows each round and the median ratio.

    .venv/bin/python scripts/bench_overhead.py --concurrency 1 4 8 --num-prompts 24 --rounds 2

Targets: request throughput >= 0.97x and median TTFT <= 1.05x those of `vllm serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.ops.model_store import DEFAULT_MODEL_NAME, ensure_default_checkpoint  # noqa: E402 - after the sys.path line

PY = sys.executable


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def launch(name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def bench(url: str, model: str, concurrency: int, args: argparse.Namespace, out: Path) -> dict:
    filename = f"{out.name}-c{concurrency}.json"
    cmd = [
        PY,
        "-m",
        "clients.vllm_cli",
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--served-model-name",
        DEFAULT_MODEL_NAME,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--ignore-eos",
        "--seed",
        "0",
        "--num-warmups",
        str(args.warmups if args.warmups is not None else concurrency),
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        filename,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads((out.parent / filename).read_text())


def run_target(name: str, cmd: list[str], env: dict[str, str], port: int, model: str, args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    proc = launch(name, cmd, env, work)
    url = f"http://127.0.0.1:{port}"
    try:
        startup = wait_healthy(url, proc, timeout=900)
        print(f"{name}: healthy after {startup:.1f} s", flush=True)
        results = {c: bench(url, model, c, args, work / name) for c in args.concurrency}
    finally:
        stop(proc)
    return {"startup_s": startup, "by_concurrency": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument(
        "--dtype", default="float32", help="both servers (CPUs without AVX-512 bf16 are far faster in float32)"
    )
    parser.add_argument("--warmups", type=int, help="warm-up requests before each level (default: the concurrency)")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, in alternating order")
    parser.add_argument("--json", help="also write all results here")
    args = parser.parse_args()

    model = str(ensure_default_checkpoint())
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
        "PYTHONUNBUFFERED": "1",
    }
    work = Path(tempfile.mkdtemp(prefix="ropeserve-overhead-"))
    # Same engine settings on both sides: ropeserve's defaults, spelled out for vllm serve.
    ropeserve_env = {
        **env,
        "ROPESERVE_PORT": str(args.port),
        "ROPESERVE_KV_CACHE_GIB": str(args.kv_cache_gib),
        "ROPESERVE_MAX_NUM_SEQS": "64",
        "ROPESERVE_ENFORCE_EAGER": "true",
        "ROPESERVE_DTYPE": args.dtype,
    }
    vllm_cmd = [
        PY,
        "-m",
        "clients.vllm_cli",
        "serve",
        model,
        "--port",
        str(args.port + 1),
        "--host",
        "127.0.0.1",
        "--served-model-name",
        DEFAULT_MODEL_NAME,
        "--max-model-len",
        "8192",
        "--max-num-seqs",
        "64",
        "--enforce-eager",
        "--enable-prefix-caching",
        "--dtype",
        args.dtype,
    ]
    targets = {
        "ropeserve": ([PY, "-m", "clients.cli", "serve"], ropeserve_env, args.port),
        "vllm-serve": (vllm_cmd, env, args.port + 1),
    }
    rounds = []
    for r in range(args.rounds):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        rounds.append({name: run_target(name, *targets[name], model, args, work / f"round{r}") for name in order})

    print(f"\nrandom dataset, {args.num_prompts} prompts, input {args.input_len} / output {args.output_len} tokens")
    print(
        "| round | concurrency | ropeserve req/s | vllm serve req/s | throughput ratio | ropeserve median TTFT ms "
        "| vllm serve median TTFT ms | TTFT ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios: dict[int, list[tuple[float, float]]] = {c: [] for c in args.concurrency}
    for r, got in enumerate(rounds):
        for c in args.concurrency:
            a, b = got["ropeserve"]["by_concurrency"][c], got["vllm-serve"]["by_concurrency"][c]
            tput, ttft = a["request_throughput"] / b["request_throughput"], a["median_ttft_ms"] / b["median_ttft_ms"]
            ratios[c].append((tput, ttft))
            print(
                f"| {r + 1} | {c} | {a['request_throughput']:.3f} | {b['request_throughput']:.3f} | {tput:.3f} | "
                f"{a['median_ttft_ms']:.1f} | {b['median_ttft_ms']:.1f} | {ttft:.3f} |"
            )
    if args.rounds > 1:
        print("\n| concurrency | median throughput ratio | median TTFT ratio |\n|---:|---:|---:|")
        for c in args.concurrency:
            print(
                f"| {c} | {statistics.median(t for t, _ in ratios[c]):.3f} | "
                f"{statistics.median(t for _, t in ratios[c]):.3f} |"
            )
    for r, got in enumerate(rounds):
        print(
            f"round {r + 1} start-up to healthy: ropeserve {got['ropeserve']['startup_s']:.1f} s, "
            f"vllm serve {got['vllm-serve']['startup_s']:.1f} s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
