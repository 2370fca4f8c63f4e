"""NBCE inside vLLM: a batch-level logits processor that combines a request's rows exactly.

Registered at engine construction (VllmEngineConfig.logits_processors); it runs in the engine
core process, on the float32 logits of every scheduled request, before sampling. Requests that
carry `SamplingParams.extra_args["nbce"]` are rows of an NBCE group:

    {"group": "<job>:<attempt>", "job": "<job>", "row": k, "n": n, "base": confirmed tokens,
     "beta", "pooling", "eta", "top_p", "greedy", "temperature", "top_k", "sample_top_p", "seed"}

At a step where *every* row of a group is in the batch, at its decode point (not in the middle of
a chunked prefill, whose sample vLLM discards) and at the same output length, the processor
computes the full-vocabulary NBCE choice from the rows' logits and forces that token in every
row (all other logits -inf; the rows sample greedily). Otherwise the group is out of step: it is
marked desynced for good and each row is forced to its own marker token (`marker_token(k)`), so
the rows' outputs disagree at that position and the server notices, aborts the rows and submits
them again with the confirmed tokens appended to the prompts (see server/nbce_runner.py).

Which rows are mid-prefill comes from the model runner's `discard_request_mask` (the rows whose
sampled token vLLM will drop); the runner is found once, from the frame that builds the
processors. Without it (another vLLM layout) every scheduled row counts as at its decode point;
the runner's agreement check still catches a wrong step, one position later.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

log = logging.getLogger(__name__)

EXTRA_KEY = "nbce"
# Rows of one group get different marker tokens: a desynced position can never look agreed.
MARKER_BASE = 3
# Chosen rows per job and position kept for eta's stickiness across resubmissions.
HISTORY_JOBS = 512


def marker_token(row: int, vocab_size: int) -> int:
    return (MARKER_BASE + row) % vocab_size


@dataclass
class _Row:
    group: str
    row: int
    info: dict[str, Any]
    output: list[int]  # vLLM's live list of the request's output token ids


@dataclass
class _Group:
    n: int
    members: int = 0
    desynced: bool = False
    steps: int = 0


@dataclass
class _Stats:
    combined_steps: int = 0
    desyncs: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def combine_rows(
    logits: torch.Tensor, beta: float, pooling: str, eta: float, prev_k: int | None, top_p: float | None
) -> tuple[torch.Tensor, int | None]:
    """The NBCE combination of one group's rows (rows × vocab, row 0 unconditioned)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_logp, order = torch.sort(logp, descending=False, dim=-1)
        cumulative = sorted_logp.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logp = logp.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    k: int | None = None
    if pooling == "mean":
        pooled = logp[1:].mean(dim=0)
    elif pooling == "max_prob":
        score = logp[1:].amax(dim=-1)
        if prev_k is not None and eta:
            score[prev_k - 1] += eta
        k = int(torch.argmax(score)) + 1
        pooled = logp[k]
    else:  # min_entropy
        entropy = -(logp.exp() * logp.clamp(-100, 0)).sum(dim=-1)
        if prev_k is not None and eta:
            entropy[prev_k] -= eta
        k = int(torch.argmin(entropy[1:])) + 1
        pooled = logp[k]
    uncond = logp[0]
    merged = torch.where(uncond > -100, (1 + beta) * pooled - beta * uncond, pooled)
    return merged, k


def choose_token(merged: torch.Tensor, info: dict[str, Any], position: int) -> int:
    if info.get("greedy", True):
        return int(torch.argmax(merged))
    scores = merged / max(float(info.get("temperature", 1.0)), 1e-5)
    top_k = info.get("top_k")
    if top_k:
        kth = torch.topk(scores, min(int(top_k), scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    top_p = info.get("sample_top_p")
    if top_p is not None and top_p < 1.0:
        sorted_s, order = torch.sort(scores, descending=False)
        cumulative = sorted_s.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[-1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    generator = torch.Generator(device="cpu")
    seed = info.get("seed")
    # Seeded by (seed, absolute position): a resubmitted group draws the same token again.
    generator.manual_seed((int(seed) if seed is not None else hash(info.get("job"))) * 1_000_003 + position)
    probs = torch.softmax(scores.float().cpu(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _find_model_runner() -> Any:
    frame = inspect.currentframe()
    depth = 0
    while frame is not None and depth < 12:
        candidate = frame.f_locals.get("self")
        if candidate is not None and type(candidate).__name__.endswith("ModelRunner"):
            return candidate
        frame = frame.f_back
        depth += 1
    return None


class NbceLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}
        self.groups: dict[str, _Group] = {}
        self.history: OrderedDict[str, dict[int, int | None]] = OrderedDict()
        self.stats = _Stats()
        self._runner = _find_model_runner()
        if self._runner is None:
            log.warning("nbce: model runner not found; mid-prefill rows cannot be told apart")

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        info = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if info is None:
            return
        if not isinstance(info, dict) or not {"group", "row", "n"} <= set(info):
            raise ValueError("extra_args.nbce: needs group, row and n")

    def is_argmax_invariant(self) -> bool:
        return False

    # --- batch bookkeeping ---------------------------------------------------------------------

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is None:
            return
        group = self.groups.get(row.group)
        if group is not None:
            group.members -= 1
            if group.members <= 0:
                del self.groups[row.group]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, _prompt, output in batch_update.added:
            self._drop(index)
            info = (getattr(params, "extra_args", None) or {}).get(EXTRA_KEY)
            if info is None:
                continue
            group = self.groups.get(info["group"])
            if group is None:
                group = self.groups[info["group"]] = _Group(n=int(info["n"]))
            group.members += 1
            self.rows[index] = _Row(info["group"], int(info["row"]), info, output)
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

    def _forget(self, row: _Row) -> None:
        group = self.groups.get(row.group)
        if group is not None:
            group.members -= 1
            if group.members <= 0:
                del self.groups[row.group]

    # --- the step ------------------------------------------------------------------------------

    def _discarded(self, num_reqs: int) -> Any:
        runner = self._runner
        if runner is None:
            return None
        mask = getattr(runner, "discard_request_mask", None)
        return None if mask is None else mask.np[:num_reqs]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        discard = self._discarded(logits.shape[0])
        by_group: dict[str, list[int]] = {}
        for index in self.rows:
            if index < logits.shape[0]:
                by_group.setdefault(self.rows[index].group, []).append(index)
        vocab = logits.shape[1]
        for group_id, indices in by_group.items():
            group = self.groups.get(group_id)
            if group is None:
                continue
            live = [i for i in indices if discard is None or not discard[i]]
            if not live:
                continue  # every present row is mid-prefill: nothing is emitted this step
            rows = [self.rows[i] for i in indices]
            aligned = (
                not group.desynced
                and len(indices) == group.n
                and len(live) == group.n
                and len({len(r.output) for r in rows}) == 1
                and len({r.row for r in rows}) == group.n
            )
            if not aligned:
                if not group.desynced:
                    group.desynced = True
                    self.stats.desyncs += 1
                for i in indices:
                    token = marker_token(self.rows[i].row, vocab)
                    logits[i].fill_(float("-inf"))
                    logits[i, token] = 0.0
                continue
            order = sorted(indices, key=lambda i: self.rows[i].row)
            info = rows[0].info
            position = int(info.get("base", 0)) + len(rows[0].output)
            job = str(info.get("job", group_id))
            history = self.history.get(job)
            if history is None:
                history = self.history[job] = {}
                while len(self.history) > HISTORY_JOBS:
                    self.history.popitem(last=False)
            else:
                self.history.move_to_end(job)
            prev_k = history.get(position - 1)
            merged, k = combine_rows(
                logits[order], float(info.get("beta", 0.25)), str(info.get("pooling", "min_entropy")),
                float(info.get("eta", 0.0)), prev_k, info.get("top_p"),
            )
            history[position] = k
            token = choose_token(merged, info, position)
            group.steps += 1
            self.stats.combined_steps += 1
            for i in indices:
                logits[i].fill_(float("-inf"))
                logits[i, token] = 0.0
        return logits
