"""Compiles output constraints in the API process's own child, with a time bound, before any row
carrying one reaches the engine.

xgrammar compiles with the model's vocabulary: most schemas take milliseconds, but a bounded
repetition costs seconds (a string of `maxLength` 160: ~7 s on a 2-core CPU) and a schema can
hold many, and the compile cannot be interrupted. The compile therefore runs in a child process
(server/engines/grammar_worker.py), which is killed when it passes `timeout_s` (and started again
for the next constraint): a constraint that compiles within the bound is one the engine core
compiles within about the same time, and one that does not is refused without costing the engine
anything. The child is started once (~6 s: it imports xgrammar and the tokenizer) and answers one
constraint at a time; callers serialise their calls (server/structured/compile_check.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from server.engines.output_constraint import OutputConstraint

log = logging.getLogger(__name__)

# The longest a constraint may take to compile; past it the constraint is refused.
COMPILE_TIMEOUT_S = 10.0
# How long the child may take to start (imports, tokenizer).
START_TIMEOUT_S = 180.0


class GrammarWorkerError(RuntimeError):
    """The child failed (not the constraint): it could not start, or died while compiling."""


@dataclass(frozen=True)
class CompileVerdict:
    """`error`: why the constraint does not compile (None: it does); `seconds`: how long it took."""

    error: str | None
    seconds: float


class GrammarWorker:
    """A child process that compiles constraints for the model at `tokenizer_path`."""

    def __init__(
        self,
        tokenizer_path: str,
        vocab_size: int,
        timeout_s: float = COMPILE_TIMEOUT_S,
        regex_timeout_s: float | None = None,
    ) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        # A regex's own bound where the engine has a tighter one (vLLM's, with room for a busy engine core).
        self.regex_timeout_s = timeout_s if regex_timeout_s is None else min(timeout_s, regex_timeout_s)
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        # The child also exits when its stdin closes (its server is gone); this stops it at once.
        atexit.register(self.close)

    def start(self) -> None:
        """Start the child (blocking until it can compile) unless it runs."""
        with self._lock:
            self._ensure_started()

    def timeout_for(self, constraint: OutputConstraint) -> float:
        """How long one compile of `constraint` may take: a regex under the engine's tighter bound."""
        match constraint.kind:
            case "regex":
                return self.regex_timeout_s
            case _:
                return self.timeout_s

    def compile(self, constraint: OutputConstraint) -> CompileVerdict:
        """Compile `constraint` in the child (blocking); raises GrammarWorkerError if the child fails."""
        with self._lock:
            process = self._ensure_started()
            assert process.stdin is not None
            started = time.perf_counter()
            try:
                process.stdin.write(json.dumps(constraint.to_dict()) + "\n")
                process.stdin.flush()
            except OSError as exc:
                self._stop()
                raise GrammarWorkerError(f"the grammar checker is gone ({exc})") from None
            timeout_s = self.timeout_for(constraint)
            try:
                reply = self._read_line(process, timeout_s)
            except GrammarWorkerError:  # the child died on this constraint: it is the constraint's
                return CompileVerdict("the grammar compiler failed on it", time.perf_counter() - started)
            seconds = time.perf_counter() - started
            if reply is None:
                # Still compiling: stop it (the next constraint gets a fresh child).
                self._stop()
                return CompileVerdict(f"it takes longer than {timeout_s:g} s to compile (the server's bound)", seconds)
            answer = json.loads(reply)
            return CompileVerdict(None if answer["ok"] else str(answer["error"]), seconds)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_started(self) -> subprocess.Popen[str]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "server.engines.grammar_worker", self.tokenizer_path, str(self.vocab_size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._process = process
        ready = self._read_line(process, START_TIMEOUT_S)
        if ready is None or not json.loads(ready).get("ready"):
            self._stop()
            raise GrammarWorkerError(f"the grammar checker did not start within {START_TIMEOUT_S:g} s")
        log.info("grammar checker started in %.1f s (pid %d)", time.perf_counter() - started, process.pid)
        return process

    def _read_line(self, process: subprocess.Popen[str], timeout_s: float) -> str | None:
        """The child's next line; None if none came within `timeout_s`. GrammarWorkerError if it exited."""
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], timeout_s)
        if not readable:
            return None
        line = process.stdout.readline()
        if not line:
            self._stop()
            raise GrammarWorkerError("the grammar checker exited")
        return line

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a pipe to a killed child
                    stream.close()
