"""vLLM's V1 model runner with per-row RoPE slots (engine-core side).

`MultiRopeRunner` is mixed into the runner vLLM built (CPU or GPU, V1) by the workers in this
package. It changes two things:

- `load_model`: after vLLM loads the model, every attention layer's rotary is replaced by one
  shared slot table (table.py);
- `_preprocess`: vLLM has already computed the true positions, the KV slot mapping and the
  attention metadata from them; only the positions handed to the model are shifted, each token by
  its row's `slot x slot_rows`, so the rotary reads that row's configuration and nothing else
  (KV placement, causal masks, sequence lengths) sees a shifted position.

Rows with an attention scheme (window kinds, DCA, log-n; server/engines/window_attention/) are
published to the attention impls for the step; DCA rows' tokens are rotated at i mod c.

It also hands logits processors that declare `StepAware` (server/engines/base.py) the rows that
are mid-prefill this step (vLLM's `discard_request_mask`), e.g. NBCE's processor.

A row's slot comes from `SamplingParams.extra_args["ropeserve_rope"]` (server/engines/rope_slots.py);
rows without it use slot 0, the model's own RoPE. A slot's table rows are rebuilt when a row
arrives with a new epoch for it (the API process hands a slot to another configuration only when
no row holds it).

Settings arrive in `vllm_config.additional_config["ropeserve"]`: `rope_slots`, `slot_rows`, and
`force_slot0` (a negative control for tests: every row rotated natively).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from server.engines.base import StepAware
from server.engines.multi_rope import CONFIG_KEY
from server.engines.multi_rope.table import SlotTableRotaryEmbedding, install_slot_table
from server.engines.rope_slots import ROPE_EXTRA_KEY
from server.engines.window_attention import step as step_plan
from server.engines.window_attention.positions import inverse_frequencies, table_positions
from server.engines.window_attention.row_cache import ROW_CACHE

log = logging.getLogger(__name__)


class MultiRopeRunner:
    """Mixin for vLLM's V1 `GPUModelRunner` / `CPUModelRunner` (see `use_multi_rope_runner`)."""

    # Set by vLLM's runner; declared for readers and type checkers.
    vllm_config: Any
    model: Any
    input_batch: Any
    requests: dict[str, Any]
    positions: torch.Tensor
    discard_request_mask: Any
    # The vLLM LogitsProcessors object whose StepAware members were last handed this runner.
    _bound_logitsprocs: Any = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]  # vLLM's runner, after this mixin in the MRO
        settings = (self.vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        self.rope_table: SlotTableRotaryEmbedding = install_slot_table(
            self.model, int(settings["rope_slots"]), int(settings["slot_rows"])
        )
        self.rope_force_slot0 = bool(settings.get("force_slot0", False))
        self.rope_slot_epochs: dict[int, int] = {}
        self.rope_positions = torch.zeros_like(self.positions)
        if self.rope_force_slot0:
            log.warning("multi-RoPE: force_slot0 is set; every row is rotated with the native RoPE")
        self.window_layers = self._install_window_attention()
        self.rope_inv_freq = inverse_frequencies(float(self.rope_table.base), self.rope_table.rotary_dim)

    def _install_window_attention(self) -> int:
        """Attention layers whose impl serves window rows (0 where the backend is not vLLM's CPU one,
        or the RoPE is not neox-style; the API process refuses window schemes there)."""
        if not self.rope_table.is_neox_style:
            return 0
        try:
            from server.engines.window_attention import impl
        except ImportError:  # a vLLM build without the CPU attention backend
            return 0
        return impl.install(self.model)

    def _update_states(self, scheduler_output: Any) -> Any:
        # Every step, with or without tokens to run: the rows vLLM finished, aborted or preempted
        # give back their contiguous KV copies (window attention).
        ROW_CACHE.drop(scheduler_output.finished_req_ids)
        ROW_CACHE.drop(scheduler_output.preempted_req_ids or ())
        return super()._update_states(scheduler_output)  # type: ignore[misc]  # as in load_model

    def _preprocess(self, scheduler_output: Any, num_input_tokens: int, intermediate_tensors: Any = None) -> Any:
        inputs = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)  # type: ignore[misc]  # as in load_model
        self._bind_step_rows()
        plan = self._attention_plan()
        bases = self._slot_bases()
        if bases is None and plan is None:
            return inputs
        counts = [scheduler_output.num_scheduled_tokens[r] for r in self.input_batch.req_ids]
        positions = inputs[2]
        shifted = self.rope_positions[:num_input_tokens]
        shifted.copy_(positions)
        if bases is not None:
            offsets = torch.from_numpy(np.repeat(np.asarray(bases, dtype=np.int64), counts))
            shifted[: len(offsets)] += offsets.to(shifted.device, non_blocking=True)
        if plan is not None:
            # DCA rows are rotated at i mod c, so their keys enter the paged cache where every part
            # of their attention reads them (window rows stay at their own positions).
            ends = np.cumsum(counts)
            for r in plan.window_rows():
                tokens = slice(ends[r] - counts[r], ends[r])
                scheme = plan.schemes[r]
                assert scheme is not None  # a window row has one
                shifted[tokens] = table_positions(scheme, positions[tokens])
        return (*inputs[:2], shifted, *inputs[3:])

    def _attention_plan(self) -> step_plan.StepPlan | None:
        """Each scheduled row's attention scheme (batch order), published for the attention impls;
        None when no row has one."""
        req_ids = tuple(self.input_batch.req_ids)
        schemes = tuple(
            step_plan.scheme_from_extra_args(params.extra_args if params is not None else None)
            for params in (self.requests[r].sampling_params for r in req_ids)
        )
        plan = step_plan.StepPlan(schemes, req_ids, self.rope_inv_freq) if any(schemes) else None
        if plan is not None and plan.window_rows() and not self.window_layers:
            raise RuntimeError("window attention needs vLLM's CPU attention backend and a neox-style RoPE")
        step_plan.publish(plan)
        return plan

    def mid_prefill(self, num_rows: int) -> Any:
        """`StepRows`: the rows whose sampled token vLLM discards this step (chunked prefill)."""
        return self.discard_request_mask.np[:num_rows]

    def _bind_step_rows(self) -> None:
        # vLLM rebuilds its input batch (and the processors with it) once the KV cache is sized.
        processors = self.input_batch.logitsprocs
        if self._bound_logitsprocs is processors:
            return
        for processor in processors.all:
            if isinstance(processor, StepAware):
                processor.bind_step_rows(self)
        self._bound_logitsprocs = processors

    def _slot_bases(self) -> list[int] | None:
        """Each scheduled row's first table row (batch order); None when all rows are native."""
        bases = []
        for req_id in self.input_batch.req_ids:
            params = self.requests[req_id].sampling_params
            spec = (params.extra_args or {}).get(ROPE_EXTRA_KEY) if params is not None else None
            bases.append(0 if spec is None else self._slot_base(spec))
        if self.rope_force_slot0 or not any(bases):
            return None
        return bases

    def _slot_base(self, spec: dict[str, Any]) -> int:
        slot, epoch = int(spec["slot"]), int(spec["epoch"])
        if self.rope_slot_epochs.get(slot) != epoch:
            from vllm.config import set_current_vllm_config

            with set_current_vllm_config(self.vllm_config):
                self.rope_table.fill_slot(slot, spec["parameters"], int(spec["rows"]))
            self.rope_slot_epochs[slot] = epoch
        return slot * self.rope_table.slot_rows


_RUNNER_CLASSES: dict[type, type] = {}


def use_multi_rope_runner(runner: Any) -> None:
    """Make vLLM's freshly built V1 runner a `MultiRopeRunner` (before its model is loaded).

    vLLM's workers construct their runner class directly, so the mixin is applied to the
    instance's class; the mixin adds no state before `load_model`.
    """
    base = type(runner)
    if not _is_v1_runner(base):
        raise RuntimeError(
            f"multi-RoPE needs vLLM's V1 model runner, not {base.__module__}.{base.__name__}; "
            "set VLLM_USE_V2_MODEL_RUNNER=0"
        )
    cls = _RUNNER_CLASSES.get(base)
    if cls is None:
        cls = _RUNNER_CLASSES[base] = type(f"MultiRope{base.__name__}", (MultiRopeRunner, base), {})
    runner.__class__ = cls


def _is_v1_runner(cls: type) -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return issubclass(cls, GPUModelRunner)
