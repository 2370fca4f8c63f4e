"""Structured output on a vLLM engine: a row's `OutputConstraint` as vLLM's `StructuredOutputsParams`,
and the engine's structured-output settings.

A single row is constrained by vLLM itself: its xgrammar backend compiles the grammar in the engine
core (cached per grammar) and masks the row's logits before the sampler and the logits processors
run. NBCE's rows carry their constraint to NBCE's processor instead (strategies/nbce/grammar.py).
The backend is pinned to xgrammar, which the API process compiles every constraint with first
(server/structured/compile_check.py), so the engine core never sees one it cannot compile.
"""

from __future__ import annotations

from typing import Any

from server.engines.output_constraint import ANY_WHITESPACE, JSON_OBJECT_SCHEMA, OutputConstraint

BACKEND = "xgrammar"


def engine_settings() -> Any:
    """vLLM's `structured_outputs_config` engine argument."""
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend=BACKEND, disable_any_whitespace=not ANY_WHITESPACE)


def structured_outputs(constraint: OutputConstraint | None) -> Any:
    """vLLM's `StructuredOutputsParams` for `constraint` (None: unconstrained)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    match constraint.kind:
        case "json":
            return StructuredOutputsParams(json=constraint.spec)
        case "json_object":
            # As a schema, not vLLM's `json_object`: the same grammar, one compile path for every engine.
            return StructuredOutputsParams(json=JSON_OBJECT_SCHEMA)
        case "regex":
            return StructuredOutputsParams(regex=constraint.spec)
        case "grammar":
            return StructuredOutputsParams(grammar=constraint.spec)


def regex_compile_bound_s() -> float:
    """How long the API process lets a regex compile: half of what vLLM's engine core allows it
    (`VLLM_REGEX_COMPILATION_TIMEOUT_S`, after which it fails the row), so that a regex that passed the
    check also compiles in an engine core busy decoding."""
    from vllm import envs

    return float(envs.VLLM_REGEX_COMPILATION_TIMEOUT_S) / 2
