"""The `ropeserve` command: serve, convert the bundled model, run benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from server.app import create_app
    from server.http.uvicorn_protocol import server_config
    from server.ops.drain import DrainingServer
    from server.ops.logging_setup import configure_logging
    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # one line per setting, not a traceback
        for error in exc.errors():
            where = "ROPESERVE_" + "_".join(str(p) for p in error["loc"]).upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            print(
                f"ropeserve serve: {message if message.startswith(where) else f'{where}: {message}'}", file=sys.stderr
            )
        return 2
    configure_logging(settings.log_level)
    app = create_app(settings)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it, so the process would die of the
    # signal (exit -15) after a clean shutdown; supervisors read that as a crash.
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    config = server_config(app, settings)
    # Ctrl-C: uvicorn re-raises SIGINT after its clean shutdown, and asyncio turns it into
    # KeyboardInterrupt; uvicorn.run() swallows it the same way.
    with contextlib.suppress(KeyboardInterrupt):
        DrainingServer(config, app.state, settings.drain_timeout_s).run()
    return 0


def _exit_after_shutdown(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.ops.model_store import ensure_default_checkpoint

    path = ensure_default_checkpoint(Path(args.cache_dir) if args.cache_dir else None)
    print(path)
    return 0


# `ropeserve bench NAME`: the module clients/bench_NAME.py gives add_arguments(parser) and cli(args).
BENCHMARKS = {
    "passkey": "passkey retrieval per strategy and length; prints a markdown table",
    "mixed": "mixed RoPE strategies vs one strategy on one server: throughput, TTFT, memory",
    "scaling": "TP=1 vs TP=2 on a long prompt; one vs two replicas behind HAProxy; a repeated document behind vLLM's router vs HAProxy (starts its own servers)",
    "soak": "minutes of mixed traffic at twice the capacity: every request answered or 429, memory after",
    "cost": "per-request time of position-changing strategies against dynamic_ntk, fresh documents, side by side",
    "priority": "TTFT of short requests while a long document is prefilled, with and without `priority`",
    "reuse": "a document asked twice: the second question's TTFT over the first's per strategy (prefix cache)",
    "structured": "per-token time of JSON-schema-constrained decoding against free text, side by side, per strategy",
}


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"clients.bench_{args.bench}")
    return int(module.cli(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropeserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API (settings also from ROPESERVE_* env vars)")
    serve.add_argument("--model", help="HF checkpoint dir or hub id (default: bundled SmolLM2-135M-Instruct)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--default-strategy", dest="default_strategy")
    serve.add_argument("--served-model-name", dest="served_model_name")
    serve.add_argument("--kv-cache-gib", dest="kv_cache_gib", type=int)
    serve.add_argument("--max-num-seqs", dest="max_num_seqs", type=int)
    serve.add_argument("--dtype")
    serve.add_argument(
        "--rope-slots", dest="rope_slots", type=int, help="RoPE configurations in use at once (+ native)"
    )
    serve.add_argument("--max-model-len", dest="max_model_len", type=int, help="longest prompt + max_new_tokens")
    # vLLM's parallel settings, under vLLM's flag names.
    serve.add_argument("--tensor-parallel-size", "-tp", dest="tensor_parallel_size", type=int)
    serve.add_argument("--pipeline-parallel-size", "-pp", dest="pipeline_parallel_size", type=int)
    serve.add_argument("--data-parallel-size", "-dp", dest="data_parallel_size", type=int)
    serve.add_argument("--distributed-executor-backend", dest="distributed_executor_backend", choices=["mp", "ray"])
    serve.add_argument(
        "--drain-timeout-s", dest="drain_timeout_s", type=float, help="after SIGTERM, seconds to finish requests"
    )
    serve.set_defaults(func=_serve)

    convert = sub.add_parser("convert", help="convert the bundled GGUF to a HF checkpoint (once)")
    convert.add_argument("--cache-dir", help="default: $ROPESERVE_MODEL_CACHE or ~/.cache/ropeserve/models")
    convert.set_defaults(func=_convert)

    bench = sub.add_parser("bench", help="benchmarks against a running server")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, help_text in BENCHMARKS.items():
        bench_parser = bench_sub.add_parser(name, help=help_text)
        importlib.import_module(f"clients.bench_{name}").add_arguments(bench_parser)
        bench_parser.set_defaults(func=_bench)

    evaluate = sub.add_parser(
        "eval", help="long-context evaluation of a running server: passkey, RULER, perplexity; plots, policy"
    )
    from clients import eval as evaluation

    evaluation.add_arguments(evaluate)
    evaluate.set_defaults(func=evaluation.cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
