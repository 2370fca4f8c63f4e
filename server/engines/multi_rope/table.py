"""The slot table: one cos/sin buffer holding several RoPE configurations' tables, and the rotary
module that reads it (engine-core side: torch and vLLM).

vLLM's rotary op (`_C::rotary_embedding`, CPU and CUDA alike) rotates token i with row
`cos_sin_cache[positions[i]]` and checks no bounds. So a buffer of `slots x slot_rows` rows, where
slot k holds exactly the table vLLM builds for configuration k, serves any mix of configurations
in one batch: the runner shifts each row's positions by `k x slot_rows` (runner.py) and the op
reads slot k's rows. Each slot's rows are vLLM's own (`get_rope` with the configuration's
parameters, built on the model's device in the model's dtype), so the rotation is bitwise the one
a per-configuration engine applies.

The buffer never moves (allocated once, filled in place), so compiled graphs that read it stay
valid; on CPU `torch.empty` leaves untouched slots uncommitted, so memory grows with the rows
actually filled.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from server.engines.vllm_adapter.rotary import InPlaceTableRotaryEmbedding, RotaryEmbedding, build_rope, is_plain_rotary

log = logging.getLogger(__name__)


def vllm_rope_table(
    head_size: int, is_neox_style: bool, dtype: torch.dtype, parameters: dict[str, Any], rows: int
) -> torch.Tensor:
    """The first `rows` rows of the cos/sin table vLLM builds for `parameters` (on the current device).

    vLLM's rotary classes size some tables from `max_position` (default, llama3), others from the
    configuration (yarn: original x factor; linear: max_position x factor): ask for `rows` and
    take `rows`, so every type covers the allowed length.
    """
    rotary = build_rope(head_size, rows, is_neox_style, parameters, dtype)
    table = rotary.cos_sin_cache
    if table.shape[0] < rows:
        raise ValueError(f"vLLM's {type(rotary).__name__} table has {table.shape[0]} rows, fewer than {rows}")
    return table[:rows]


class SlotTableRotaryEmbedding(InPlaceTableRotaryEmbedding):
    """vLLM's `RotaryEmbedding` whose `cos_sin_cache` is the whole slot table (one buffer, never
    replaced: the slots are written into it).

    The forward passes (CPU op, CUDA op, native) are vLLM's own; only the table differs, and the
    positions it receives are already shifted into their row's slot.
    """

    def __init__(self, template: RotaryEmbedding, slots: int, slot_rows: int) -> None:
        super().__init__(template, slots * slot_rows)
        native = template.cos_sin_cache
        table = torch.empty((slots * slot_rows, native.shape[1]), dtype=native.dtype, device=native.device)
        rows = min(slot_rows, native.shape[0])
        table[:rows].copy_(native[:rows])
        self.register_buffer("cos_sin_cache", table, persistent=False)
        self.slots = slots
        self.slot_rows = slot_rows

    def fill_slot(self, slot: int, parameters: dict[str, Any], rows: int) -> None:
        """Write configuration `parameters`'s table into `slot` (its first `rows` rows)."""
        if not 0 < slot < self.slots:
            raise ValueError(f"RoPE slot {slot} outside 1..{self.slots - 1}")
        rows = min(rows, self.slot_rows)
        with torch.device(self.cos_sin_cache.device):
            table = vllm_rope_table(self.head_size, self.is_neox_style, self.dtype, parameters, rows)
        if table.shape[1] != self.cos_sin_cache.shape[1]:
            raise ValueError(f"RoPE parameters {parameters} give a rotary dim other than the model's")
        start = slot * self.slot_rows
        self.cos_sin_cache[start : start + rows].copy_(table)


def install_slot_table(model: nn.Module, slots: int, slot_rows: int) -> SlotTableRotaryEmbedding:
    """Replace the rotary of every attention layer of `model` with one shared slot table.

    Raises ValueError for models this cannot serve: no rotary found, several different ones
    (e.g. local and global layers with other bases), or a rotary with a forward of its own.
    """
    owners = [(m, m.rotary_emb) for m in model.modules() if isinstance(getattr(m, "rotary_emb", None), nn.Module)]
    if not owners:
        raise ValueError(f"{type(model).__name__}: no attention layer with a `rotary_emb`")
    templates = {id(r): r for _, r in owners}
    if len(templates) != 1:
        raise ValueError(f"{type(model).__name__}: {len(templates)} different rotary embeddings; one is needed")
    (template,) = templates.values()
    if not is_plain_rotary(template):
        raise ValueError(f"{type(model).__name__}: {type(template).__name__} has its own forward")
    table = SlotTableRotaryEmbedding(template, slots, slot_rows)
    for owner, _ in owners:
        owner.rotary_emb = table
    log.info(
        "multi-RoPE: %d slots x %d rows in one %s table (%d layers)",
        slots,
        slot_rows,
        str(table.cos_sin_cache.dtype),
        len(owners),
    )
    return table


# Rows built to check a configuration before it reaches the engine core: past the native window
# (where scalings differ) is not needed, a table that builds and is finite for these rows is.
CHECK_ROWS = 64


@functools.cache
def _check_config() -> Any:
    """A default vLLM config for building rotaries outside an engine (vLLM's CustomOps need one)."""
    from vllm.config import VllmConfig

    return VllmConfig()


def check_rope_parameters(head_size: int, rotary_dim: int, parameters: dict[str, Any]) -> str | None:
    """Why vLLM cannot build a usable table from `parameters` for a model whose rotary covers
    `rotary_dim` of each head (None: it can), on the CPU.

    The API process calls this before a row is admitted: the same construction in the engine core
    would raise inside a model step and take the engine down.
    """
    from vllm.config import set_current_vllm_config

    try:
        with set_current_vllm_config(_check_config()), torch.device("cpu"):
            table = vllm_rope_table(head_size, True, torch.float32, parameters, CHECK_ROWS)
    except Exception as exc:  # noqa: BLE001 - any failure of vLLM's constructors is a refusal, with its reason
        return f"vLLM builds no RoPE table from these parameters ({type(exc).__name__}: {exc})"
    if table.shape[1] != rotary_dim:
        return f"these RoPE parameters rotate {table.shape[1]} dimensions of each head; the model rotates {rotary_dim}"
    if not bool(torch.isfinite(table).all()):
        return "these RoPE parameters give a table with inf or NaN values"
    return None
