"""Passkey retrieval benchmark against a running ropeserve server (HTTP only).

A random 5-digit pass key is hidden at some depth in filler text of a given length; the model is
asked for it with greedy decoding. For every strategy (a column) and length (a row) a few trials
run with different keys and depths; a cell shows correct/trials and the mean seconds per request.
A strategy named without `factor` gets, per length, the smallest factor in 1, 2, 4, 8, 16 that fits
(what `auto` does); `name:factor=4,beta_fast=16` or a JSON object fixes its parameters. New
strategies (`nbce`, `auto`, plugins) are just more columns: `--strategies native,yarn,nbce,auto`.

    ropeserve bench passkey --url http://127.0.0.1:8000 --lengths 6k,12k,16k --trials 3
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
# For a haystack whose chunks all differ: with the repeated FILLER, NBCE's rows are identical token
# runs that vLLM's prefix cache serves once, which hides what a real document costs.
VARIED_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "A cat sleeps on the wall.",
    "Rain falls on the old roof.",
    "The river runs to the sea.",
    "Bread is baked at dawn.",
    "The bell rings at noon.",
    "Leaves turn red in autumn.",
    "The road winds up the hill.",
    "Birds sing in the morning.",
    "The lamp is lit at night.",
    "Snow covers the quiet field.",
    "The boat rocks gently.",
)
# Tokens of one FILLER sentence group for SmolLM2's tokenizer; used when no tokenizer is at hand.
FILLER_TOKENS_GUESS = 23
NATIVE_WINDOW_GUESS = 8192
FACTORS = (1.0, 2.0, 4.0, 8.0, 16.0)
SCALABLE = ("linear", "ntk", "dynamic_ntk", "yarn", "llama3")


@dataclass
class PasskeyCase:
    key: str
    depth: float
    context: str
    inputs: str = QUESTION


def parse_length(text: str) -> int:
    """'12k' -> 12000, '12288' -> 12288."""
    text = text.strip().lower()
    if text.endswith("k"):
        return int(float(text[:-1]) * 1000)
    return int(text)


def make_case(
    target_tokens: int,
    depth: float,
    key: str,
    count_tokens: Callable[[str], int] | None,
    instruction_in_inputs: bool = False,
    varied: bool = False,
) -> PasskeyCase:
    """A passkey context whose full prompt (context + question) is about `target_tokens` tokens.

    The instruction (INTRO) opens the context, as in the usual passkey test, or, with
    `instruction_in_inputs`, precedes the question: NBCE's rows each read `inputs`, but only the
    first chunk would read an instruction at the head of the document.
    """
    inputs = INTRO + " " + QUESTION if instruction_in_inputs else QUESTION
    head = "" if instruction_in_inputs else INTRO + " "
    per_filler = count_tokens(FILLER * 20) / 20 if count_tokens else FILLER_TOKENS_GUESS
    fixed = count_tokens(INTRO + NEEDLE.format(key=key) + "\n\n" + QUESTION) if count_tokens else 60
    n = max(1, int((target_tokens - fixed) / per_filler))
    groups = _varied_groups(n, key) if varied else [FILLER] * n

    def build(n: int, before: int) -> str:
        return head + "".join(groups[:before]) + NEEDLE.format(key=key) + "".join(groups[before:n])

    before = int(round(n * depth))
    context = build(n, before)
    if count_tokens:  # trim or pad to land just under the target
        total = count_tokens(context + "\n\n" + inputs)
        while total > target_tokens and n > 1:
            n -= 1
            before = min(before, n)
            context = build(n, before)
            total = count_tokens(context + "\n\n" + inputs)
    return PasskeyCase(key=key, depth=depth, context=context, inputs=inputs)


def _varied_groups(n: int, key: str) -> list[str]:
    """n filler groups of five sentences drawn at random (seeded by the key): no two chunks alike."""
    rng = random.Random(key)
    return [" ".join(rng.choice(VARIED_FILLER) for _ in range(5)) + " " for _ in range(n)]


def parse_strategy(text: str) -> dict[str, Any]:
    """'yarn' | 'yarn:factor=4,beta_fast=16' | '{"name": "nbce", ...}' -> a strategy object."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"name": name}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            spec[k] = json.loads(v)
        except json.JSONDecodeError:
            spec[k] = v
    return spec


def split_strategies(text: str) -> list[dict[str, Any]]:
    """Comma-separated specs; commas inside `name:k=v,k=v` belong to the spec (split on ';' or names)."""
    if text.strip().startswith("["):
        return [s if isinstance(s, dict) else parse_strategy(s) for s in json.loads(text)]
    parts = [p for p in re.split(r";", text) if p.strip()] if ";" in text else _split_names(text)
    return [parse_strategy(p) for p in parts]


def _split_names(text: str) -> list[str]:
    out: list[str] = []
    for piece in text.split(","):
        if "=" in piece and out and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def label(spec: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f" ({extra})" if extra else "")


def spec_for_length(spec: dict[str, Any], total_tokens: int, native_window: int) -> dict[str, Any]:
    """A RoPE strategy without a factor gets the smallest power-of-two factor that fits."""
    if spec["name"] in SCALABLE and "factor" not in spec:
        need = total_tokens / native_window
        factor = next((f for f in FACTORS if f >= need), FACTORS[-1])
        if spec["name"] == "dynamic_ntk":
            factor = max(factor, 2.0)
        return {**spec, "factor": factor}
    return dict(spec)


@dataclass
class Trial:
    correct: bool
    seconds: float
    status: int
    text: str = ""
    error: str = ""
    strategy: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    trials: list[Trial] = field(default_factory=list)

    def render(self) -> str:
        if not self.trials:
            return "–"
        refused = [t for t in self.trials if t.status != 200]
        if len(refused) == len(self.trials):
            return f"{refused[0].status}"
        ok = sum(t.correct for t in self.trials)
        done = [t.seconds for t in self.trials if t.status == 200]
        factor = self.trials[0].strategy.get("factor")
        f = f" ×{factor:g}" if isinstance(factor, (int, float)) else ""
        return f"{ok}/{len(self.trials)}{f} ({sum(done) / len(done):.1f} s)"


def run_trial(client: httpx.Client, case: PasskeyCase, spec: dict[str, Any], max_new_tokens: int) -> Trial:
    body = {
        "inputs": case.inputs,
        "context": case.context,
        "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False},
        "strategy": spec,
    }
    started = time.perf_counter()
    try:
        r = client.post("/generate", json=body)
    except httpx.HTTPError as exc:
        return Trial(False, time.perf_counter() - started, 0, error=str(exc), strategy=spec)
    seconds = time.perf_counter() - started
    if r.status_code != 200:
        return Trial(False, seconds, r.status_code, error=r.text[:300], strategy=spec)
    text = r.json().get("generated_text", "")
    return Trial(case.key in text, seconds, 200, text=text, strategy=spec)


def load_token_counter(tokenizer: str | None) -> Callable[[str], int] | None:
    try:
        from transformers import AutoTokenizer

        if tokenizer is None:
            from server.ops.model_store import resolve_model

            tokenizer = resolve_model(None)
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs, with estimated lengths
        print(f"(no tokenizer: {exc}; lengths are estimates)", file=sys.stderr)
        return None
    return lambda text: len(tok.encode(text))


def run(
    url: str,
    strategies: Sequence[dict[str, Any]],
    lengths: Sequence[int],
    trials: int = 3,
    max_new_tokens: int = 12,
    seed: int = 0,
    tokenizer: str | None = None,
    api_key: str | None = None,
    timeout: float = 900.0,
    instruction_in_inputs: bool = False,
    varied: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> tuple[dict[tuple[int, int], Cell], str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    count = load_token_counter(tokenizer)
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client:
        try:
            native = int(client.get("/info").json().get("native_context_window") or NATIVE_WINDOW_GUESS)
        except Exception:  # noqa: BLE001 - an old server without /info: assume the default window
            native = NATIVE_WINDOW_GUESS
        cases = {
            length: [
                make_case(
                    length, (i + 0.5) / trials, str(rng.randint(10000, 99999)), count, instruction_in_inputs, varied
                )
                for i in range(trials)
            ]
            for length in lengths
        }
        cells: dict[tuple[int, int], Cell] = {}
        # Strategy by strategy, so each engine configuration starts once.
        for si, spec in enumerate(strategies):
            for length in lengths:
                cell = cells.setdefault((si, length), Cell())
                for case in cases[length]:
                    used = spec_for_length(spec, length, native)
                    t = run_trial(client, case, used, max_new_tokens)
                    cell.trials.append(t)
                    log(
                        f"{label(spec):<28} {length:>6} depth={case.depth:.2f} {t.status} "
                        f"{'ok ' if t.correct else 'BAD'} {t.seconds:6.1f}s {t.text[:40]!r} {t.error[:120]}"
                    )
                    if t.status == 422:  # the same request is refused for every key
                        cell.trials.extend(Trial(False, 0.0, 422, strategy=used) for _ in cases[length][1:])
                        break
    return cells, render_table(cells, strategies, lengths, trials)


def render_table(
    cells: dict[tuple[int, int], Cell], strategies: Sequence[dict[str, Any]], lengths: Sequence[int], trials: int
) -> str:
    head = "| prompt tokens | " + " | ".join(label(s) for s in strategies) + " |"
    sep = "|---|" + "---|" * len(strategies)
    rows = [head, sep]
    for length in lengths:
        rows.append(
            f"| {length:,} | "
            + " | ".join(cells.get((si, length), Cell()).render() for si in range(len(strategies)))
            + " |"
        )
    return "\n".join(rows)


def cli(args: Any) -> int:
    strategies = split_strategies(args.strategies)
    lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    _, table = run(
        args.url,
        strategies,
        lengths,
        trials=args.trials,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        tokenizer=args.tokenizer,
        api_key=args.api_key,
        instruction_in_inputs=args.instruction == "inputs",
        varied=args.varied,
    )
    print(table)
    print(
        f"\n{args.trials} trials per cell (keys at depths spread over the context), greedy, "
        f"max_new_tokens={args.max_new_tokens}; cell: correct/trials, RoPE factor, mean seconds per request; "
        "422: refused (too long for the strategy)."
    )
    return 0


def add_arguments(parser: Any) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--strategies",
        default="native,linear,ntk,dynamic_ntk,yarn,llama3",
        help="comma-separated: name, name:k=v,k=v, or a JSON list of strategy objects",
    )
    parser.add_argument("--lengths", default="6k,12k,16k", help="prompt lengths in tokens, e.g. 6k,12k,16k,24k")
    parser.add_argument("--trials", type=int, default=3, help="keys (at spread depths) per cell")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer to size prompts (default: the bundled model's)")
    parser.add_argument("--api-key", dest="api_key")
    parser.add_argument(
        "--instruction",
        choices=("context", "inputs"),
        default="context",
        help="where the 'find the pass key' instruction goes: head of the document (classic), "
        "or before the question in `inputs` (what NBCE's rows all read)",
    )
    parser.add_argument(
        "--varied",
        action="store_true",
        help="filler sentences drawn at random, so no two chunks of the haystack are alike "
        "(repeated filler lets NBCE's rows share the prefix cache)",
    )
