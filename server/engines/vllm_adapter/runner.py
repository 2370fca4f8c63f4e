"""vLLM's V1 model runner: the hook points the multi-RoPE runner fills, what it reads of a step,
and the class swap that puts them into the runner vLLM built.

The V1 runner is `GPUModelRunner` (vllm/v1/worker/gpu_model_runner.py); vLLM's CPU runner extends
it and inherits the methods overridden here, so CPU and GPU engines run the same hooks. vLLM
offers no hook between computing a step's positions and running the model, nor one before a step
updates the runner's states, so `V1RunnerHooks` overrides the private methods where both happen
and calls the hooks below; nothing else in the project names them. The V2 runner (a GPU host's
default in vLLM 0.32) has none of these methods: `prefer_v1_runner` asks for V1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["V1RunnerHooks", "mix_into_v1_runner", "prefer_v1_runner"]

# vLLM's switch between its V1 and V2 model runners (vllm/envs.py).
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
# Where `_preprocess`'s returned tuple holds the positions handed to the model
# (input_ids, inputs_embeds, positions, intermediate_tensors, model_kwargs, ec_connector_output).
PREPROCESS_POSITIONS = 2


def prefer_v1_runner() -> None:
    """Ask vLLM for its V1 runner unless the environment chose (call before the engine starts)."""
    os.environ.setdefault(V2_RUNNER_ENV, "0")


class V1RunnerHooks:
    """Mixin for vLLM's V1 runner (put in by `mix_into_v1_runner`): subclasses fill the `on_*`
    hooks and read the step through the accessors; they override no vLLM method themselves."""

    # Set by vLLM's runner; declared for readers and type checkers.
    vllm_config: Any
    model: Any
    input_batch: Any
    requests: dict[str, Any]
    positions: torch.Tensor
    discard_request_mask: Any

    # --- hooks --------------------------------------------------------------------------------

    def on_model_loaded(self) -> None:
        """After vLLM loaded the model (and before the KV cache is sized)."""

    def on_rows_released(self, request_ids: Iterable[str]) -> None:
        """Every step, with or without tokens to run, before vLLM updates its states: rows that
        finished, were aborted or preempted (called once for each kind)."""

    def on_step_positions(self, step: Any, num_input_tokens: int, positions: torch.Tensor) -> torch.Tensor | None:
        """Before each forward pass: the positions handed to the model (`num_input_tokens`, padded),
        or None to keep vLLM's. vLLM has already computed the KV slot mapping and the attention
        metadata from its own positions, so only the model's rotary sees what this returns.
        `step` is vLLM's scheduler output, for `token_counts`."""
        return None

    # --- what a hook may read of the step ------------------------------------------------------

    def batch_request_ids(self) -> list[str]:
        """The scheduled rows' request ids, in batch order (the order of the attention metadata)."""
        req_ids: list[str] = self.input_batch.req_ids
        return req_ids

    def row_sampling_params(self, request_id: str) -> Any:
        """A running row's `SamplingParams` (None for rows without any, e.g. pooling)."""
        return self.requests[request_id].sampling_params

    def row_prompt_length(self, request_id: str) -> int:
        """A running row's prompt length, in tokens."""
        return int(self.requests[request_id].num_prompt_tokens)

    def token_counts(self, step: Any) -> list[int]:
        """Tokens each scheduled row runs this step, in batch order."""
        return [step.num_scheduled_tokens[r] for r in self.input_batch.req_ids]

    def logits_processors(self) -> tuple[object, Iterable[Any]]:
        """vLLM's logits processors object (a new one whenever vLLM rebuilds its input batch, e.g.
        once the KV cache is sized) and its processors."""
        processors = self.input_batch.logitsprocs
        return processors, processors.all

    def discarded_rows(self, num_rows: int) -> Any:
        """Per batch row: whether vLLM throws away the token sampled this step (mid chunked prefill)."""
        return self.discard_request_mask.np[:num_rows]

    def positions_buffer(self) -> torch.Tensor:
        """vLLM's persistent positions buffer (max tokens per step), e.g. to shape one like it."""
        return self.positions

    # --- vLLM's methods, overridden to call the hooks ------------------------------------------

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]  # vLLM's runner, after this mixin in the MRO
        self.on_model_loaded()

    def _update_states(self, scheduler_output: Any) -> Any:
        self.on_rows_released(scheduler_output.finished_req_ids)
        self.on_rows_released(scheduler_output.preempted_req_ids or ())
        return super()._update_states(scheduler_output)  # type: ignore[misc]  # as in load_model

    def _preprocess(self, scheduler_output: Any, num_input_tokens: int, intermediate_tensors: Any = None) -> Any:
        inputs = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)  # type: ignore[misc]  # as in load_model
        positions = self.on_step_positions(scheduler_output, num_input_tokens, inputs[PREPROCESS_POSITIONS])
        if positions is None:
            return inputs
        return (*inputs[:PREPROCESS_POSITIONS], positions, *inputs[PREPROCESS_POSITIONS + 1 :])


_RUNNER_CLASSES: dict[tuple[type, type], type] = {}


def mix_into_v1_runner(runner: Any, mixin: type[V1RunnerHooks], class_prefix: str, feature: str) -> None:
    """Make vLLM's freshly built V1 runner an instance of `mixin` over its own class (named
    `class_prefix` + vLLM's class name), before its model is loaded.

    vLLM's workers construct their runner class directly (no setting names it), so the instance's
    class is swapped; `mixin` must add no state before `load_model`. Raises RuntimeError (naming
    `feature`) where the runner is not V1.
    """
    base = type(runner)
    if not is_v1_runner(base):
        raise RuntimeError(
            f"{feature} needs vLLM's V1 model runner, not {base.__module__}.{base.__name__}; set {V2_RUNNER_ENV}=0"
        )
    cls = _RUNNER_CLASSES.get((mixin, base))
    if cls is None:
        cls = _RUNNER_CLASSES[(mixin, base)] = type(f"{class_prefix}{base.__name__}", (mixin, base), {})
    runner.__class__ = cls


def is_v1_runner(cls: type) -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return issubclass(cls, GPUModelRunner)
