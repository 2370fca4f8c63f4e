"""The heap built while the server starts, kept out of the garbage collector's full passes.

Starting the engine imports vLLM, torch and transformers and builds the tokenizer: millions of
objects that live as long as the process. Each full (generation-2) collection walked them all,
0.45 s a pass measured on this project's CPU host, on the event loop at whatever request allocated
last: a request building many objects (`echo` with 20 logprobs: 21 per prompt token) held
`/health` that long. Frozen after start-up (as vLLM's own server does), they are never walked
again; what requests allocate is still collected.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left over, then freeze the rest (call again after building more
    long-lived objects, e.g. a restarted engine)."""
    gc.collect()
    gc.freeze()
