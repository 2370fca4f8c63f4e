"""The grammar-check child process: compiles each constraint it is sent, as the engine will.

    python -m server.engines.grammar_worker TOKENIZER_PATH VOCAB_SIZE

It writes `{"ready": true}` once it can compile, then answers each JSON line `{"kind", "spec"}` on
stdin (an `OutputConstraint`) with one line: `{"ok": true, "seconds": s}` or `{"ok": false,
"error": "what the compiler said"}`. It exits when stdin closes (its server is gone). It runs
apart from the server so that a compile taking too long can be stopped: xgrammar's compiler
cannot be interrupted, but a process can be killed (server/engines/grammar_check.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from typing import Any, TextIO

from server.engines.output_constraint import OutputConstraint, compile_constraint

# xgrammar's messages start with a time and a source location: "[14:00:01] /project/cpp/x.cc:83: ".
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
MAX_MESSAGE_CHARS = 300


def compiler_message(exc: BaseException) -> str:
    """What the compiler said, without its source location, on one line."""
    lines = [_LOCATION.sub("", line).strip() for line in str(exc).splitlines()]
    text = " ".join(line for line in lines if line) or type(exc).__name__
    return text[:MAX_MESSAGE_CHARS]


def build_compiler(tokenizer_path: str, vocab_size: int) -> Any:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(tokenizer_path), vocab_size=vocab_size)
    # Each constraint is compiled once here (the API process keeps the verdict): no cache to fill.
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def answer(compiler: Any, line: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        compiled = compile_constraint(compiler, OutputConstraint.from_dict(json.loads(line)))
    except Exception as exc:  # noqa: BLE001 - every compiler error is the constraint's
        return {"ok": False, "error": compiler_message(exc)}
    if not can_start(compiled):
        return {"ok": False, "error": "no output can match it (it allows no first token)"}
    return {"ok": True, "seconds": round(time.perf_counter() - started, 4)}


def can_start(compiled: Any) -> bool:
    """Whether the grammar allows some first token: one that matches nothing (`root ::= root`, a
    schema that only refers to itself) compiles, and would leave the engine no token to sample."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    return bool(bitmask.ne(0).any())


def serve(compiler: Any, requests: TextIO, replies: TextIO) -> None:
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        replies.write(json.dumps(answer(compiler, line)) + "\n")
        replies.flush()


def main(argv: list[str]) -> int:
    tokenizer_path, vocab_size = argv[0], int(argv[1])
    # Ctrl-C reaches the whole process group: the server stops this child, or it ends with stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replies keep stdout to themselves: whatever a library prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    serve(build_compiler(tokenizer_path, vocab_size), sys.stdin, replies)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
