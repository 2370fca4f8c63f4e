"""Which RoPE configuration holds which slot of the engine's cos/sin table (API-process side).

The engine's model rotates every token with one table of `slots x slot_rows` rows: slot 0 holds
the model's own RoPE, the others are filled on demand (server/engines/multi_rope/). A row's
positions are shifted by `slot * slot_rows` before the rotary reads the table, so rows of many
configurations share one batch. This module only decides the slot of a configuration:

- a configuration in use keeps its slot (reference-counted by the rows running under it);
- a configuration seen before and still in its slot gets it back without rebuilding;
- otherwise it takes a never-used slot, else the least recently released one;
- when every slot is held by running rows, `RopeSlotsFull` (HTTP 429).

The worker learns a row's slot from `SamplingParams.extra_args[ROPE_EXTRA_KEY]` (`slot_spec`)
and rebuilds the slot's table rows when the slot's key changes. A slot changes hands only when no
row holds it, and rows reach the engine core in order, so no batch ever mixes two configurations
in one slot.

    >>> from server.plan import RopeConfig
    >>> slots = RopeSlots(slots=3)
    >>> ntk = RopeConfig.from_dict({"rope_type": "default", "rope_theta": 4e5}, 16384)
    >>> slots.acquire(RopeConfig.native()), slots.acquire(ntk), slots.in_use()
    (0, 1, 1)
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

from server.engines.base import EngineBusy
from server.plan import RopeConfig

ROPE_EXTRA_KEY = "ropeserve_rope"


class RopeSlotsFull(EngineBusy):
    """Every RoPE slot is held by running rows of other configurations."""


class RopeSlots:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("at least one RoPE slot (the native one) is needed")
        self.slots = slots
        self._slot_of: dict[str, int] = {}  # configuration key -> slot (held or cached)
        self._key_of: dict[int, str] = {}
        self._holders: dict[int, int] = {}  # slot -> rows running under it
        self._idle: OrderedDict[int, None] = OrderedDict()  # filled, unheld slots, least recent first
        self._never_used = list(range(slots - 1, 0, -1))  # popped from the end: 1, 2, ...
        self.loads = 0  # configurations placed in a slot (each costs one table build in the worker)
        self._epochs = itertools.count(1)
        self._epoch_of: dict[int, int] = {}

    def acquire(self, rope: RopeConfig) -> int:
        """The slot for `rope`, held until `release`; raises RopeSlotsFull."""
        if not _needs_slot(rope):
            return 0
        key = rope.key()
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._free_slot(rope)
            self._slot_of[key] = slot
            self._key_of[slot] = key
            self._epoch_of[slot] = next(self._epochs)
            self.loads += 1
        self._idle.pop(slot, None)
        self._holders[slot] = self._holders.get(slot, 0) + 1
        return slot

    def has_room(self, rope: RopeConfig) -> bool:
        """Whether `acquire(rope)` would succeed now."""
        return not _needs_slot(rope) or rope.key() in self._slot_of or bool(self._never_used or self._idle)

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        held = self._holders.get(slot, 0) - 1
        if held > 0:
            self._holders[slot] = held
            return
        self._holders.pop(slot, None)
        self._idle[slot] = None  # most recently released last

    def _free_slot(self, rope: RopeConfig) -> int:
        if self._never_used:
            return self._never_used.pop()
        if not self._idle:
            raise RopeSlotsFull(
                f"all {self.slots - 1} RoPE slots of the engine are in use by running requests of other "
                f"RoPE configurations ({rope.label()} needs one); retry later"
            )
        slot, _ = self._idle.popitem(last=False)
        del self._slot_of[self._key_of.pop(slot)]
        return slot

    def in_use(self) -> int:
        """Slots held by running rows (the native slot not counted)."""
        return len(self._holders)

    def slot_spec(self, rope: RopeConfig, slot: int) -> dict[str, Any] | None:
        """What the worker needs to fill `slot` for `rope` (None for the native slot)."""
        if slot == 0:
            return None
        return {
            "slot": slot,
            # The epoch changes whenever the slot changes hands, so the worker never confuses a
            # slot's old table with its new configuration.
            "epoch": self._epoch_of[slot],
            "parameters": rope.as_dict(),
            "rows": rope.max_model_len,
        }


def _needs_slot(rope: RopeConfig) -> bool:
    """Whether `rope` rotates with a table of its own: configurations with the model's own RoPE
    parameters (native, or a window/log-n scheme over them) use slot 0."""
    return bool(rope.parameters)
