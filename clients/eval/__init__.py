"""`ropeserve eval`: a long-context evaluation of a running server, per strategy and length.

    ropeserve eval --url http://127.0.0.1:8000 --strategies native,dynamic_ntk,yarn,nbce \\
        --lengths 4k,8k,16k --tasks passkey,niah_single_1 --perplexity 16k --out docs/eval \\
        --write-policy strategies/auto_policy.json

(a) passkey at several depths (`--keys` per cell); (b) RULER tasks through lm-evaluation-harness
(its offline ones: clients/eval/ruler.py); (c) perplexity by position on a public-domain novel
through prompt logprobs. Progress is shown as it goes; results.json, one PNG heatmap per task,
perplexity.png and results.md are written to `--out`; `--write-policy` writes the measured policy
`auto` follows (clients/eval/policy.py). `--from-results results.json` redraws without a server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

from clients.bench_passkey import label, load_token_counter, parse_length, spec_for_length, split_strategies
from clients.eval import passkey, perplexity, plots, probe, ruler, varied
from clients.eval.policy import merged_policy
from clients.eval.results import EvalResults
from clients.eval.server_meter import ServerMeter, listening_pid

DEFAULT_TASKS = "passkey,niah_single_1"
KNOWN_TASKS = ("passkey", *varied.TASKS, *ruler.OFFLINE_TASKS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--strategies", default="native,dynamic_ntk,yarn,nbce", help="as in `ropeserve bench passkey`")
    parser.add_argument("--lengths", default="4k,8k,16k", help="prompt tokens per cell")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated, of: {', '.join(KNOWN_TASKS)}")
    parser.add_argument("--keys", type=int, default=5, help="passkeys (depths) per cell")
    parser.add_argument(
        "--probes",
        type=int,
        default=20,
        help="fact_recall / continuation probes per cell (several documents when short)",
    )
    parser.add_argument("--copies", type=int, default=16, help="distant_copy copies scored per cell")
    parser.add_argument(
        "--server-pid",
        type=int,
        help="the server's pid, for the CPU seconds of each cell (default: the local process on --url's port)",
    )
    parser.add_argument("--samples", type=int, default=5, help="RULER samples per cell")
    parser.add_argument("--perplexity", default="16k", help="tokens of text for perplexity by position (0: skip)")
    parser.add_argument("--bucket", type=int, default=1024, help="window of the perplexity curve (tokens)")
    parser.add_argument("--text", default="prideprejudice", help="which Austen novel (clients/eval/texts.py)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the bundled model's)")
    parser.add_argument("--out", default="eval-results", help="directory for results.json, PNGs, results.md")
    parser.add_argument("--write-policy", help="also write the measured policy for `auto` to this file")
    parser.add_argument(
        "--policy-tasks",
        default="",
        help="comma-separated tasks the written policy ranks by (default: every task measured at a band's length)",
    )
    parser.add_argument("--from-results", help="redraw plots / policy from a results.json, no server")
    parser.add_argument(
        "--policy-also",
        default="",
        help="comma-separated results.json of other grids of this model whose bands join the written policy "
        "(a length this run measured replaces theirs)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the cells and curves already in --out's results.json and measure only the missing ones "
        "(new strategies and lengths are added to it; a cell measured under another --seed gains this seed's trials)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0)


def _tokenizer_dir(args: argparse.Namespace) -> str:
    if args.tokenizer:
        return str(args.tokenizer)
    from server.ops.model_store import default_checkpoint_dir

    return str(default_checkpoint_dir())


def measure(args: argparse.Namespace) -> EvalResults:
    from rich.progress import Progress

    specs = split_strategies(args.strategies)
    labels = [label(s) for s in specs]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    # A run of perplexity alone measures no cell: its lengths would be empty columns of the grid.
    lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()] if tasks else []
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(KNOWN_TASKS)}")
    ppl_tokens = parse_length(args.perplexity) if args.perplexity not in ("", "0") else 0
    tokenizer = _tokenizer_dir(args)
    count = load_token_counter(tokenizer)
    with httpx.Client(base_url=args.url, timeout=args.timeout) as client:
        meter = ServerMeter(client, args.server_pid or listening_pid(args.url))
        info = client.get("/info").json()
        native = int(info["native_context_window"])
        results = EvalResults(str(info.get("model_id", "model")), native, labels, specs, lengths)
        previous = Path(args.out) / "results.json"
        if args.resume and previous.exists():
            results = EvalResults.load(previous).extended(labels, specs, lengths)
        cells = len(specs) * len(lengths) * len(tasks) + (len(specs) if ppl_tokens else 0)
        with Progress() as progress:
            bar = progress.add_task("evaluating", total=cells)
            for spec, name in zip(specs, labels, strict=True):
                for task in tasks:
                    for length in lengths:
                        # RULER's samples are lm-eval's own, the same under every seed.
                        seed = 0 if task in ruler.OFFLINE_TASKS else args.seed
                        if results.has(task, name, length, seed):
                            progress.advance(bar)
                            continue
                        progress.update(bar, description=f"{task} {name} {length:,}")
                        score = _cell(
                            args, client, meter, task, spec, length, native, count, tokenizer, str(info.get("model_id"))
                        )
                        score.seeds = [seed]
                        results.record(task, name, length, score)
                        progress.advance(bar)
                        results.save(Path(args.out) / "results.json")  # a partial run keeps what it measured
                if ppl_tokens and name in results.perplexity and results.perplexity[name].tokens >= ppl_tokens:
                    progress.advance(bar)
                elif ppl_tokens:
                    progress.update(bar, description=f"perplexity {name}")
                    results.perplexity[name] = _curve(args, client, spec, ppl_tokens, native, tokenizer)
                    results.perplexity_text = args.text
                    progress.advance(bar)
                    results.save(Path(args.out) / "results.json")
    return results


def _cell(
    args: argparse.Namespace,
    client: httpx.Client,
    meter: ServerMeter,
    task: str,
    spec: dict[str, Any],
    length: int,
    native: int,
    count: Any,
    tokenizer: str,
    model: str,
) -> Any:
    if task == "passkey":
        return passkey.run_cell(client, spec, length, native, args.keys, count, args.seed)
    if task in varied.GENERATION_TASKS:
        return varied.generation_cell(client, meter, task, spec, length, native, args.probes, count, args.seed)
    if task == varied.distant_copy.TASK:
        return varied.copy_cell(client, meter, spec, length, native, args.copies, _encoder(tokenizer), args.seed)
    used = ruler.lm_eval_spec(spec_for_length(spec, length + ruler.DEFAULT_ANSWER_TOKENS, native))
    why = probe.refusal(client, used, length, ruler.ANSWER_TOKENS.get(task, ruler.DEFAULT_ANSWER_TOKENS))
    if why is not None:
        from clients.eval.results import Score

        return Score(refused=why, strategy=used)
    return ruler.run_cell(args.url, model, tokenizer, task, used, length, args.samples)


def _encoder(tokenizer: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer).encode


def _curve(
    args: argparse.Namespace, client: httpx.Client, spec: dict[str, Any], tokens: int, native: int, tokenizer: str
) -> Any:
    from transformers import AutoTokenizer

    from clients.eval.texts import austen_books

    ids = AutoTokenizer.from_pretrained(tokenizer).encode(austen_books()[args.text])[:tokens]
    curve = perplexity.curve(client, spec_for_length(spec, tokens, native), ids, args.bucket)
    if curve.refused and spec.get("name") == "native":  # the model as trained: its own window only
        curve = perplexity.curve(client, spec, ids[: native - 1], args.bucket)
    return curve


def cli(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = EvalResults.load(Path(args.from_results)) if args.from_results else measure(args)
    results.save(out / "results.json")
    for path in plots.write_all(results, out):
        print(path)
    if args.write_policy:
        others = [Path(p.strip()) for p in args.policy_also.split(",") if p.strip()]
        grids = [EvalResults.load(p) for p in others] + [results]
        sources = ", ".join(str(p) for p in [*others, out / "results.json"])
        only = [t.strip() for t in args.policy_tasks.split(",") if t.strip()] or None
        policy = merged_policy(grids, source=f"ropeserve eval ({sources})", only=only)
        Path(args.write_policy).write_text(json.dumps(policy, indent=1) + "\n")
        print(args.write_policy)
    print(plots.markdown(results))
    return 0
