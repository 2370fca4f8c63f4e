"""vLLM's V1 model runner with per-row RoPE slots (engine-core side).

`MultiRopeRunner` is mixed into the runner vLLM built (CPU or GPU, V1) by the workers in this
package, through the hook points of server/engines/vllm_adapter/runner.py. It changes two things:

- once the model is loaded (`on_model_loaded`), every attention layer's rotary is replaced by one
  shared slot table (table.py);
- before each forward pass (`on_step_positions`): vLLM has already computed the true positions,
  the KV slot mapping and the attention metadata from them; only the positions handed to the
  model are shifted, each token by its row's `slot x slot_rows`, so the rotary reads that row's
  configuration and nothing else (KV placement, causal masks, sequence lengths) sees a shifted
  position.

Rows with an attention scheme (server/attention/) are published to the attention impls for the step
(server/engines/scheme_attention/), and their tokens rotated at the scheme's `table_positions`.

It also hands logits processors that declare `StepAware` (server/engines/base.py) the rows that
are mid-prefill this step (those whose sampled token vLLM discards), e.g. NBCE's processor.

A row's slot comes from `SamplingParams.extra_args["ropeserve_rope"]` (server/engines/rope_slots.py);
rows without it use slot 0, the model's own RoPE. A slot's table rows are rebuilt when a row
arrives with a new epoch for it (the API process hands a slot to another configuration only when
no row holds it).

Settings arrive in `vllm_config.additional_config["ropeserve"]`: `rope_slots`, `slot_rows`, and
`force_slot0` (a negative control for tests: every row rotated natively).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from server.attention.rotary import inverse_frequencies
from server.engines.base import StepAware
from server.engines.multi_rope import CONFIG_KEY
from server.engines.multi_rope.table import SlotTableRotaryEmbedding, install_slot_table
from server.engines.rope_slots import ROPE_EXTRA_KEY
from server.engines.scheme_attention import step as step_plan
from server.engines.scheme_attention.row_cache import ROW_CACHE
from server.engines.vllm_adapter.runner import V1RunnerHooks, mix_into_v1_runner

log = logging.getLogger(__name__)


class MultiRopeRunner(V1RunnerHooks):
    """Mixin for vLLM's V1 runner, GPU or CPU (see `use_multi_rope_runner`)."""

    # The vLLM LogitsProcessors object whose StepAware members were last handed this runner.
    _bound_logitsprocs: Any = None

    def on_model_loaded(self) -> None:
        settings = (self.vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        self.rope_table: SlotTableRotaryEmbedding = install_slot_table(
            self.model, int(settings["rope_slots"]), int(settings["slot_rows"])
        )
        self.rope_force_slot0 = bool(settings.get("force_slot0", False))
        self.rope_slot_epochs: dict[int, int] = {}
        self.rope_positions = torch.zeros_like(self.positions_buffer())
        if self.rope_force_slot0:
            log.warning("multi-RoPE: force_slot0 is set; every row is rotated with the native RoPE")
        self.scheme_layers = self._install_scheme_attention()
        self.rope_inv_freq = inverse_frequencies(float(self.rope_table.base), self.rope_table.rotary_dim)

    def _install_scheme_attention(self) -> int:
        """Attention layers whose impl serves scheme rows (0 where the backend is not vLLM's CPU one,
        or the RoPE is not neox-style; the API process refuses attention schemes there)."""
        if not self.rope_table.is_neox_style:
            return 0
        try:
            from server.engines.scheme_attention import impl
        except ImportError:  # a vLLM build without the CPU attention backend
            return 0
        return impl.install(self.model)

    def on_rows_released(self, request_ids: Iterable[str]) -> None:
        # The rows vLLM finished, aborted or preempted give back their contiguous KV copies (scheme attention).
        ROW_CACHE.drop(request_ids)

    def on_step_positions(self, step: Any, num_input_tokens: int, positions: torch.Tensor) -> torch.Tensor | None:
        self._bind_step_rows()
        plan = self._attention_plan()
        bases = self._slot_bases()
        if bases is None and plan is None:
            return None
        counts = self.token_counts(step)
        shifted = self.rope_positions[:num_input_tokens]
        shifted.copy_(positions)
        if plan is not None:
            # A scheme row's keys enter the paged cache where its attention reads them (DCA: i mod c).
            ends = np.cumsum(counts)
            for r, scheme in enumerate(plan.schemes):
                if scheme is not None:
                    tokens = slice(ends[r] - counts[r], ends[r])
                    shifted[tokens] = scheme.table_positions(positions[tokens])
        if bases is not None:
            # Then into the row's slot of the table.
            offsets = torch.from_numpy(np.repeat(np.asarray(bases, dtype=np.int64), counts))
            shifted[: len(offsets)] += offsets.to(shifted.device, non_blocking=True)
        return shifted

    def _attention_plan(self) -> step_plan.StepPlan | None:
        """Each scheduled row's attention scheme (batch order), published for the attention impls;
        None when no row has one."""
        req_ids = tuple(self.batch_request_ids())
        schemes = tuple(
            step_plan.scheme_from_extra_args(params.extra_args if params is not None else None)
            for params in (self.row_sampling_params(r) for r in req_ids)
        )
        if not any(schemes):
            step_plan.publish(None)
            return None
        lengths = tuple(self.row_prompt_length(r) for r in req_ids)
        plan = step_plan.StepPlan(schemes, req_ids, lengths, self.rope_inv_freq)
        if plan.computed_rows() and not self.scheme_layers:
            raise RuntimeError("scheme attention needs vLLM's CPU attention backend and a neox-style RoPE")
        step_plan.publish(plan)
        return plan

    def mid_prefill(self, num_rows: int) -> Any:
        """`StepRows`: the rows whose sampled token vLLM discards this step (chunked prefill)."""
        return self.discarded_rows(num_rows)

    def _bind_step_rows(self) -> None:
        # vLLM rebuilds its input batch (and the processors with it) once the KV cache is sized.
        processors, members = self.logits_processors()
        if self._bound_logitsprocs is processors:
            return
        for processor in members:
            if isinstance(processor, StepAware):
                processor.bind_step_rows(self)
        self._bound_logitsprocs = processors

    def _slot_bases(self) -> list[int] | None:
        """Each scheduled row's first table row (batch order); None when all rows are native."""
        bases = []
        for req_id in self.batch_request_ids():
            params = self.row_sampling_params(req_id)
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


def use_multi_rope_runner(runner: Any) -> None:
    """Make vLLM's freshly built V1 runner a `MultiRopeRunner` (before its model is loaded)."""
    mix_into_v1_runner(runner, MultiRopeRunner, class_prefix="MultiRope", feature="multi-RoPE")
