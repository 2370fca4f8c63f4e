"""NBCE inside vLLM: a batch-level logits processor that combines a request's rows exactly.

The server registers it when the engine starts (`NbceStrategy.engine_logits_processors`); it
runs in the engine-core process, on the float32 logits of every scheduled request, before
sampling. Requests whose `extra_args` carry a `RowTag` (protocol.py) are rows of an NBCE group.

At a step where *every* row of a group is in the batch, at its decode point (not in the middle of
a chunked prefill, whose sample vLLM discards) and at the same output length, the processor
computes the full-vocabulary NBCE choice from the rows' logits (combine.py) and forces that token
in every row (all other logits -inf; the rows sample greedily). Otherwise the group is out of
step: it is marked desynced for good and each row is forced to its own marker token
(`marker_token(k)`), so the rows' outputs disagree at that position and the runner notices,
aborts the rows and submits them again with the confirmed tokens appended
(server/service/lockstep.py).

A constrained request (structured output) masks every row's logits with its group's grammar
state before the combination (grammar.py), so the combined choice is always a token the grammar
allows; tokens not the grammar's mark the group out of step like a desync.

Which rows are mid-prefill the engine tells it through `StepAware.bind_step_rows`
(server/engines/base.py; ropeserve's multi-RoPE runner does). Left unbound (another engine
layout) every scheduled row counts as at its decode point; the runner's agreement check still
catches a wrong step, one position later.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from server.engines.base import StepRows
from strategies.nbce.combine import choose_token, combine
from strategies.nbce.grammar import GrammarCache, GroupGrammar
from strategies.nbce.protocol import RowTag, announced

log = logging.getLogger(__name__)

# Rows of one group get different marker tokens: a desynced position can never look agreed.
MARKER_BASE = 3
# Chosen rows per job and position kept for eta's stickiness across resubmissions.
HISTORY_JOBS = 512


def marker_token(row: int, vocab_size: int) -> int:
    return (MARKER_BASE + row) % vocab_size


@dataclass
class _Row:
    tag: RowTag
    output: list[int]  # vLLM's live list of the request's output token ids


@dataclass
class _Group:
    rows: int
    members: int = 0
    desynced: bool = False
    # The group's output constraint (structured output; grammar.py), applied before the combination.
    grammar: GroupGrammar | None = None


class NbceLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}
        self.groups: dict[str, _Group] = {}
        self.history: OrderedDict[str, dict[int, int | None]] = OrderedDict()
        self.step_rows: StepRows | None = None
        self.warned_unbound = False
        model = vllm_config.model_config
        self.grammars = GrammarCache(str(model.tokenizer), int(model.get_vocab_size()))

    def bind_step_rows(self, rows: StepRows) -> None:
        """`StepAware`: the engine says which rows are mid-prefill."""
        self.step_rows = rows

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        RowTag.from_extra_args(sampling_params.extra_args)
        announced(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False

    # --- batch bookkeeping ---------------------------------------------------------------------

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            self._forget(row)

    def _forget(self, row: _Row) -> None:
        group = self.groups.get(row.tag.group)
        if group is not None:
            group.members -= 1
            if group.members <= 0:
                del self.groups[row.tag.group]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, output in batch_update.added:
            self._drop(index)
            extra_args = getattr(params, "extra_args", None)
            if (ahead := announced(extra_args)) is not None:
                self.grammars.prepare(ahead)  # compiled while the rows prefill
            tag = RowTag.from_extra_args(extra_args)
            if tag is None:
                continue
            group = self.groups.get(tag.group)
            if group is None:
                group = self.groups[tag.group] = _Group(rows=tag.rows, grammar=self._grammar(tag, prompt))
            group.members += 1
            self.rows[index] = _Row(tag, output)
        for a, b, direction in batch_update.moved:
            row_a = self.rows.pop(a, None)
            row_b = self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None:
                if direction == MoveDirectionality.SWAP:
                    self.rows[a] = row_b
                else:  # b was overwritten by a: its row is gone
                    self._forget(row_b)

    # --- the step ------------------------------------------------------------------------------

    def _mid_prefill(self, num_rows: int) -> Sequence[bool] | None:
        if self.step_rows is None:
            if not self.warned_unbound:
                self.warned_unbound = True
                log.warning("nbce: the engine does not say which rows are mid-prefill; every row counts as decoding")
            return None
        return self.step_rows.mid_prefill(num_rows)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        mid_prefill = self._mid_prefill(logits.shape[0])
        by_group: dict[str, list[int]] = {}
        for index, row in self.rows.items():
            if index < logits.shape[0]:
                by_group.setdefault(row.tag.group, []).append(index)
        for group_id, indices in by_group.items():
            group = self.groups.get(group_id)
            if group is None:
                continue
            live = [i for i in indices if mid_prefill is None or not mid_prefill[i]]
            if not live:
                continue  # every present row is mid-prefill: nothing is emitted this step
            rows = [self.rows[i] for i in indices]
            aligned = (
                not group.desynced
                and len(indices) == group.rows
                and len(live) == group.rows
                and len({len(r.output) for r in rows}) == 1
                and len({r.tag.row for r in rows}) == group.rows
            )
            # The constraint masks every row before the combination; tokens not the grammar's: out of step.
            if aligned and (group.grammar is None or group.grammar.mask(logits, indices, rows[0].output)):
                token = self._combined_token(logits, sorted(indices, key=lambda i: self.rows[i].tag.row))
                for i in indices:
                    _force(logits, i, token)
            else:
                group.desynced = True
                for i in indices:
                    _force(logits, i, marker_token(self.rows[i].tag.row, logits.shape[1]))
        return logits

    def _grammar(self, tag: RowTag, prompt: list[int] | None) -> GroupGrammar | None:
        """The group's grammar state, after the tokens confirmed before it (its prompts' last `base`)."""
        if tag.constraint is None:
            return None
        confirmed = list(prompt or [])[-tag.base :] if tag.base else []
        return GroupGrammar(self.grammars.prepare(tag.constraint), tag.stop_token_ids, confirmed)

    def _combined_token(self, logits: torch.Tensor, ordered: list[int]) -> int:
        first = self.rows[ordered[0]]
        tag = first.tag
        position = tag.base + len(first.output)
        history = self.history.get(tag.job)
        if history is None:
            history = self.history[tag.job] = {}
            while len(self.history) > HISTORY_JOBS:
                self.history.popitem(last=False)
        else:
            self.history.move_to_end(tag.job)
        merged, k = combine(logits[ordered], tag.combination, history.get(position - 1))
        history[position] = k
        return choose_token(merged, tag.draw, tag.job, position)


def _force(logits: torch.Tensor, index: int, token: int) -> None:
    logits[index].fill_(float("-inf"))
    logits[index, token] = 0.0
