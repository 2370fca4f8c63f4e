"""Greedy tokens and logprobs from real vLLM engines, for the exactness tests (and by hand).

Run as a subprocess (vLLM spawns its engine core, so this needs a `__main__` of its own); the
engines of a spec start one after the other in this one process:

    python -m tests.support.engine_tokens < spec.json > result.json

`run_engines(spec)` (for tests) splits a spec's engines over one such process per CPU core, each
bound to its core: an engine start is mostly single-threaded, and engines share nothing, so the
results are the same as one after the other, in about half the time on two cores.

spec: {"model": PATH, "dtype": "float32", "engines": [{"name": ..., "max_model_len": N,
        "fixed_rope": RopeSpec | "native" | null (null: the slot-table engine), "num_kv_blocks": N | null, "force_rope_slot0": bool,
        "max_num_batched_tokens": N | null,
        "runs": [{"concurrent": bool, "rows": [{"id": ..., "prompt": [ids], "rope": RopeSpec | null,
                                               "max_new_tokens": N}]}]}]}
RopeSpec: {"parameters": {...}, "max_model_len": N, "attention": AttentionScheme.spec() | absent}
result (the last stdout line): {engine name: {"runs": [{row id: {"tokens": [...], "logprobs": [...]}}],
                                              "preemptions": N, "rope_slot_loads": N}}
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from server.attention import scheme_from_spec
from server.engines.base import EngineIteration, RowRequest, SamplingOptions
from server.engines.vllm_engine import VllmEngine, VllmEngineConfig, read_model_facts
from server.plan import ModelFacts, RopeConfig


def rope_of(spec: dict[str, Any] | str | None) -> RopeConfig:
    if spec is None or spec == "native":
        return RopeConfig.native()
    assert isinstance(spec, dict)
    attention = scheme_from_spec(spec["attention"]) if spec.get("attention") else None
    return RopeConfig.from_dict(spec["parameters"], int(spec["max_model_len"]), attention)


async def _row(engine: VllmEngine, row: dict[str, Any]) -> dict[str, Any]:
    sampling = SamplingOptions(max_new_tokens=int(row["max_new_tokens"]), greedy=True, ignore_eos=True, top_logprobs=1)
    request = RowRequest(f"{row['id']}-{os.urandom(4).hex()}", list(row["prompt"]), sampling, rope_of(row.get("rope")))
    tokens: list[int] = []
    logprobs: list[float | None] = []
    async for step in engine.generate(request):
        tokens.extend(t.id for t in step.tokens)
        logprobs.extend(t.logprob for t in step.tokens)
    return {"tokens": tokens, "logprobs": logprobs}


async def _run(engine: VllmEngine, run: dict[str, Any]) -> dict[str, Any]:
    rows = run["rows"]
    if run.get("concurrent"):
        results = await asyncio.gather(*(_row(engine, r) for r in rows))
    else:
        results = [await _row(engine, r) for r in rows]
    return {r["id"]: out for r, out in zip(rows, results, strict=False)}


async def run_engine(model_path: str, model: ModelFacts, dtype: str, spec: dict[str, Any]) -> dict[str, Any]:
    preemptions = 0

    def listen(_engine: Any, iteration: EngineIteration) -> None:
        nonlocal preemptions
        preemptions += iteration.preempted_rows

    fixed = spec.get("fixed_rope")
    config = VllmEngineConfig(
        model=model_path,
        dtype=dtype,
        max_model_len=int(spec["max_model_len"]),
        max_num_batched_tokens=spec.get("max_num_batched_tokens"),
        kv_cache_gib=1,
        fixed_rope=None if fixed is None else rope_of(fixed),
        num_kv_blocks=spec.get("num_kv_blocks"),
        force_rope_slot0=bool(spec.get("force_rope_slot0", False)),
        # Each engine of a spec runs alone; no cached prefix may hide a difference between runs.
        enable_prefix_caching=False,
    )
    engine = VllmEngine(config, model, stats_listener=listen)
    await asyncio.to_thread(engine.start)
    try:
        runs = [await _run(engine, run) for run in spec["runs"]]
    finally:
        engine.shutdown()
    return {"runs": runs, "preemptions": preemptions, "rope_slot_loads": engine.slots.loads}


async def main_async(spec: dict[str, Any]) -> dict[str, Any]:
    model = read_model_facts(spec["model"])
    out = {}
    for engine_spec in spec["engines"]:
        started = time.monotonic()
        out[engine_spec["name"]] = await run_engine(spec["model"], model, spec.get("dtype", "float32"), engine_spec)
        print(f"engine {engine_spec['name']}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return out


ROOT = Path(__file__).resolve().parents[2]


def run_engines(spec: dict[str, Any], timeout: int = 1800) -> dict[str, Any]:
    """Run a spec's engines in subprocesses, one per usable core (one on a GPU build), and merge
    their results (an engine's name to its runs)."""
    from server.engines.vllm_engine import is_cpu_build

    cores = sorted(os.sched_getaffinity(0))
    workers = min(len(cores), len(spec["engines"])) if is_cpu_build() else 1
    groups = [spec["engines"][i::workers] for i in range(workers)]
    processes = []
    for core, engines in zip(cores, groups, strict=False):
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core)} if workers > 1 else dict(os.environ)
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.engine_tokens"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        processes.append((process, json.dumps({**spec, "engines": engines})))
    out: dict[str, Any] = {}
    for process, text in processes:
        assert process.stdin is not None
        process.stdin.write(text)
        process.stdin.close()
    for process, _ in processes:
        assert process.stdout is not None and process.stderr is not None
        stdout, stderr = process.stdout.read(), process.stderr.read()
        code = process.wait(timeout=timeout)
        assert code == 0, stderr[-4000:] + stdout[-4000:]
        out.update(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    # The engine core keeps its worker in-process (vLLM's uniprocess executor): the same runner,
    # model and slot table as a server's engine, one process spawn less per engine (~15 s here).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    spec = json.load(sys.stdin)
    result = asyncio.run(main_async(spec))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
