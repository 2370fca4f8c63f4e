"""Rows into a vLLM engine: refused or admitted, with a RoPE slot held while the row runs, as the
prompt and `SamplingParams` vLLM takes.

The row's slot (`RopeSlots`) and its attention scheme reach the engine core in the sampling
params' `extra_args`, which the multi-RoPE runner and the window-attention step read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engines.base import RowRequest, SamplingOptions
from server.engines.rope_slots import ROPE_EXTRA_KEY, RopeSlots
from server.engines.scheme_attention.step import ATTENTION_EXTRA_KEY
from server.engines.vllm_config import VllmEngineConfig
from server.engines.vllm_refusal import RopeRefusal
from server.engines.vllm_structured import structured_outputs
from server.plan import ModelFacts, RopeConfig


@dataclass(frozen=True)
class AdmittedRow:
    """A row with its RoPE slot held: what vLLM is given for it (release the slot when it ends)."""

    row: RowRequest
    slot: int
    prompt: Any  # vLLM's TokensPrompt
    sampling: Any  # vLLM's SamplingParams

    @property
    def request_id(self) -> str:
        return self.row.request_id


class RowAdmission:
    """Refuses, admits and releases rows; a `fixed_rope` engine has one configuration and no slots."""

    def __init__(self, config: VllmEngineConfig, model: ModelFacts) -> None:
        self.fixed = config.fixed_rope is not None
        self.slots = RopeSlots(1 if self.fixed else config.rope_slots)
        self.refusal = RopeRefusal(config, model)

    def refuse(self, rope: RopeConfig) -> str | None:
        return self.refusal.refuse(rope)

    def can_admit(self, rope: RopeConfig) -> bool:
        return self.fixed or self.slots.has_room(rope)

    def admit(self, row: RowRequest) -> AdmittedRow:
        """`row` with its RoPE slot held; raises ValueError (refused) or RopeSlotsFull (EngineBusy)."""
        # A safety net: the service refused this configuration while planning (server/service/generation_service.py); a
        # caller that skips the service, or a plan made before the engine was replaced, must still not
        # reach the engine core.
        if (refusal := self.refuse(row.rope)) is not None:
            raise ValueError(refusal)
        prompt = tokens_prompt(row)
        slot = 0 if self.fixed else self.slots.acquire(row.rope)
        extra = dict(row.sampling.extra_args or {})
        if (spec := self.slots.slot_spec(row.rope, slot)) is not None:
            extra[ROPE_EXTRA_KEY] = spec
        if row.rope.attention is not None:
            extra[ATTENTION_EXTRA_KEY] = row.rope.attention.spec()
        try:
            sampling = to_vllm_sampling(row.sampling, extra or None)
        except BaseException:  # vLLM refused the sampling settings: the row never runs
            if not self.fixed:
                self.slots.release(slot)
            raise
        return AdmittedRow(row, slot, prompt, sampling)

    def release(self, admitted: AdmittedRow) -> None:
        if not self.fixed:
            self.slots.release(admitted.slot)


def tokens_prompt(row: RowRequest) -> Any:
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=row.prompt_token_ids)
    if not row.rope.is_native:
        # Keys are stored rotated: rows of other configurations must never share prefix-cache blocks.
        prompt["cache_salt"] = row.rope.key()
    return prompt


def to_vllm_sampling(options: SamplingOptions, extra_args: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=options.max_new_tokens,
        temperature=0.0 if options.greedy else options.temperature,
        top_p=1.0 if options.greedy else options.top_p,
        top_k=(options.top_k or 0) if not options.greedy else 0,
        seed=options.seed,
        stop=list(options.stop) or None,
        repetition_penalty=options.repetition_penalty,
        frequency_penalty=options.frequency_penalty,
        presence_penalty=options.presence_penalty,
        ignore_eos=options.ignore_eos,
        logprobs=options.top_logprobs,
        prompt_logprobs=options.prompt_logprobs,
        # A prompt's logprobs kept as flat lists, not an object per entry: vLLM builds them on the
        # API's event loop (21 an entry per prompt token with 20 logprobs); the outputs read them
        # position by position, off the loop (vllm_outputs.py).
        flat_logprobs=options.prompt_logprobs is not None,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
        skip_special_tokens=True,
        structured_outputs=structured_outputs(options.constraint),
    )
