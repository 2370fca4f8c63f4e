"""Plain-PyTorch reference of the position schemes that change attention, written from the sources.

A Llama forward pass (gpt-fast style: the math visible, no caches, O(n^2) attention) in which each
scheme is a list of *cases*, as the papers' code writes them: a score matrix per case, from the
query rotated at the case's query position and the key at its key position, and a `where` that picks,
for every (query i, key j) pair, the case it falls in.

| scheme        | case            | query at               | key at   | source                         |
|---------------|-----------------|------------------------|----------|--------------------------------|
| rerope        | i - j < w       | i                      | j        | bojone/rerope rerope_patch.py  |
|               | otherwise       | w                      | 0        | (`position_ids * 0 + window`)  |
| leaky_rerope  | i - j < w       | i                      | j        | bojone leaky_rerope_patch.py:  |
|               | otherwise       | (i + w (k - 1)) / k    | j / k    | linear scaling k, offset w(k-1)|
| self_extend   | i - j < W       | i                      | j        | datamllab/LongLM Llama.py      |
|               | otherwise       | i // G + W - W / G     | j // G   | (`group_query_position`)       |
| string        | i - j < S       | i                      | j        | HKUNLP/STRING string_for_llama |
|               | otherwise       | i - S + W              | j        | (`position_ids - diag_size +   |
|               |                 |                        |          |  local_window`, query_states_2)|
|               | beyond the cap  | C                      | 0        | ReRoPE's clamp, at C           |
| dca           | same chunk      | i mod c                | j mod c  | HKUNLP/ChunkLlama              |
|               | previous chunk  | min(i mod c + c, S)    | j mod c  | chunkllama_attn_replace.py     |
|               | earlier chunks  | min(2c - 1, S)         | j mod c  | (q_t, qc_t, k_t tables)        |

DCA's chunks are c = S - w tokens long (S the chunk size, w the local window), counted from token 0.
log-n scaling multiplies the unrotated query at position i by max(1, ln(i + 1) / ln L0). Two schemes
scale every logit by a constant, which the papers' code puts into every cos/sin (so squared in a
score): STRING's `attention_factor` (0.1 ln 2 + 1) and ChunkLlama's `mscale` (0.05 ln(n / L) + 1
past the trained length L, n the sequence length, `get_mscale`).

This module imports nothing of the engine's position code: the kernels are checked against it, and
`relative_positions` against the papers' own statements of what each pair sees (the unit tests).

    >>> scheme = Scheme("rerope", window=4)
    >>> relative_positions(scheme, 8)[7].tolist()
    [4.0, 4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    >>> relative_positions(Scheme("dca", chunk_size=4, local_window=1), 8)[7].tolist()  # c = 3
    [4.0, 3.0, 2.0, 4.0, 3.0, 2.0, 1.0, 0.0]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only the type: the reference computes nothing with the engine's code
    from server.plan import AttentionScheme

SchemeKind = Literal["native", "rerope", "leaky_rerope", "self_extend", "dca", "string"]


@dataclass(frozen=True)
class Case:
    """Pairs (i, j) of one case and where its query and key are rotated."""

    pairs: torch.Tensor  # [n, n] bool
    query_positions: torch.Tensor  # [n] float64
    key_positions: torch.Tensor  # [n] float64


@dataclass(frozen=True)
class Scheme:
    kind: SchemeKind = "native"
    # rerope / leaky_rerope: the window w; self_extend: the neighbour window W.
    window: int = 0
    # leaky_rerope: the slope 1/k beyond the window.
    k: float = 1.0
    # self_extend: the group size G.
    group: int = 1
    # dca: the chunk size S and the local window w (chunks are S - w tokens).
    chunk_size: int = 0
    local_window: int = 0
    # log-n scaling past the native window L0 (None: off).
    logn_window: int | None = None
    # dca: ChunkLlama's mscale past this trained length (None: off).
    trained_length: int | None = None
    # string: the shifted offset S (its local value W is `local_window`), the cap C (None: none),
    # and the factor on every cos/sin.
    shift: int = 0
    cap: int | None = None
    attention_factor: float = 1.0
    # dca with mscale: the prompt's length, read in one pass (ChunkLlama's n for every prompt
    # query); each later token is computed at its own length. None: the whole row is the prompt.
    prompt_length: int | None = None

    @classmethod
    def of(cls, attention: AttentionScheme) -> Scheme:
        """The reference's scheme for a served scheme with the same parameters (read by name)."""
        if attention.kind == "logn":
            return cls(logn_window=attention.window)
        names = ("window", "group", "chunk_size", "local_window", "logn_window", "trained_length", "shift", "cap")
        given = {name: getattr(attention, name) for name in names if hasattr(attention, name)}
        if hasattr(attention, "leak"):
            given["k"] = attention.leak
        if hasattr(attention, "attention_factor"):
            given["attention_factor"] = attention.attention_factor
        return cls(attention.kind, **given)  # type: ignore[arg-type]

    def logit_factors(self, n: int) -> torch.Tensor:
        """What every score of query i of an n-token row is multiplied by (each cos/sin's factor squared)."""
        if self.kind == "string":
            return torch.full((n,), self.attention_factor**2, dtype=torch.float64)
        if self.kind == "dca" and self.trained_length is not None:
            prompt = n if self.prompt_length is None else self.prompt_length
            lengths = torch.arange(1, n + 1, dtype=torch.float64).clamp(min=prompt)
            scale = lengths / self.trained_length
            mscale = torch.where(scale <= 1, 1.0, 0.05 * torch.log(scale) + 1.0)  # ChunkLlama's get_mscale
            return mscale**2
        return torch.ones(n, dtype=torch.float64)

    def cases(self, n: int) -> list[Case]:
        i = torch.arange(n, dtype=torch.float64)
        distance = i[:, None] - i[None, :]
        if self.kind == "native":
            return [Case(torch.ones(n, n, dtype=torch.bool), i, i)]
        if self.kind == "dca":
            return self._dual_chunk_cases(n)
        near = Case(distance < self.window, i, i)
        far = ~near.pairs
        w = float(self.window)
        if self.kind == "rerope":
            # bojone: the far query at `position_ids * 0 + window`, the far key not rotated.
            return [near, Case(far, torch.full_like(i, w), torch.zeros_like(i))]
        if self.kind == "leaky_rerope":
            # bojone: LinearScalingRotaryEmbedding(k) for both, the query offset by w (k - 1).
            offset = w * (self.k - 1)
            return [near, Case(far, (i + offset) / self.k, i / self.k)]
        if self.kind == "self_extend":
            # LongLM: group_query_position = i // G + W - W / G; group_key_position = j // G.
            g, big_w = self.group, float(self.window)
            return [near, Case(far, torch.floor(i / g) + big_w - big_w / g, torch.floor(i / g))]
        if self.kind == "string":
            return self._string_cases(i, distance)
        raise ValueError(self.kind)

    def _string_cases(self, i: torch.Tensor, distance: torch.Tensor) -> list[Case]:
        """STRING: `query_states_1` at i for the sliding window of S, `query_states_2` at
        i - S + W (`position_ids - diag_size + local_window`) for the rest, keys at j; past the cap,
        the ReRoPE clamp at C (query at C, key unrotated)."""
        s, w = self.shift, self.local_window
        near = distance < s
        shifted = ~near
        cases = [Case(near, i, i)]
        if self.cap is None:
            return [*cases, Case(shifted, i - s + w, i)]
        capped = distance - s + w >= self.cap
        return [
            *cases,
            Case(shifted & ~capped, i - s + w, i),
            Case(shifted & capped, torch.full_like(i, float(self.cap)), torch.zeros_like(i)),
        ]

    def _dual_chunk_cases(self, n: int) -> list[Case]:
        """ChunkLlama's three RoPE tables: q_t = arange(c), qc_t = (arange(c) + c).clamp(max=S),
        k_t = arange(n) % c; the inter-chunk query takes qc_t[c - 1]."""
        s = self.chunk_size
        c = s - self.local_window
        q_t = torch.arange(c, dtype=torch.float64)
        qc_t = (torch.arange(c, dtype=torch.float64) + c).clamp(max=s)
        k_t = torch.arange(n, dtype=torch.float64) % c
        token = torch.arange(n)
        local = token % c
        chunk = torch.div(token, c, rounding_mode="floor")
        apart = chunk[:, None] - chunk[None, :]
        return [
            Case(apart == 0, q_t[local], k_t),
            Case(apart == 1, qc_t[local], k_t),
            Case(apart >= 2, qc_t[c - 1].expand(n), k_t),
        ]


def relative_positions(scheme: Scheme, n: int) -> torch.Tensor:
    """The relative position each (i, j), j <= i, is scored at (NaN above the diagonal)."""
    rel = torch.full((n, n), float("nan"), dtype=torch.float64)
    for case in scheme.cases(n):
        rel = torch.where(case.pairs, case.query_positions[:, None] - case.key_positions[None, :], rel)
    i = torch.arange(n)
    return rel.masked_fill(i[None, :] > i[:, None], float("nan"))


# --- the model ------------------------------------------------------------------------------


@dataclass
class LlamaWeights:
    config: dict[str, object]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, checkpoint: str | Path) -> LlamaWeights:
        from safetensors.torch import load_file

        path = Path(checkpoint)
        config = json.loads((path / "config.json").read_text())
        tensors = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
        return cls(config, tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def int(self, key: str) -> int:
        value = self.config[key]
        assert isinstance(value, int | float)
        return int(value)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half, as HF Llama) of x [heads, n, d] at `positions` [n] (fractions allowed)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: Scheme, theta: float) -> torch.Tensor:
    """Causal attention of q [h, n, d] over k, v [h, n, d] under `scheme`: one score matrix per case."""
    n, d = q.shape[1], q.shape[-1]
    pos = torch.arange(n)
    if scheme.logn_window is not None:
        scale = (torch.log(pos.to(torch.float64) + 1) / math.log(scheme.logn_window)).clamp(min=1)
        q = q * scale.to(q.dtype)[None, :, None]
    q = q * scheme.logit_factors(n).to(q.dtype)[None, :, None]
    scores = torch.full((q.shape[0], n, n), float("nan"), dtype=q.dtype)
    for case in scheme.cases(n):
        case_scores = rotate(q, case.query_positions, theta) @ rotate(k, case.key_positions, theta).transpose(-1, -2)
        scores = torch.where(case.pairs, case_scores, scores)
    scores = (scores / math.sqrt(d)).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def logits(weights: LlamaWeights, token_ids: list[int], scheme: Scheme = Scheme()) -> torch.Tensor:
    """Next-token logits [n, vocab] of a Llama checkpoint for `token_ids` under `scheme`."""
    cfg = weights.config
    heads, kv_heads = weights.int("num_attention_heads"), weights.int("num_key_value_heads")
    hidden = weights.int("hidden_size")
    head_dim = int(cfg.get("head_dim") or hidden // heads)  # type: ignore[call-overload]
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))  # type: ignore[union-attr, arg-type]
    eps = float(cfg.get("rms_norm_eps", 1e-6))  # type: ignore[arg-type]
    w = weights.get
    x = w("model.embed_tokens.weight")[torch.tensor(token_ids)]
    n = x.shape[0]
    for layer in range(weights.int("num_hidden_layers")):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w(p + "input_layernorm.weight"), eps)
        q = (h @ w(p + "self_attn.q_proj.weight").T).view(n, heads, head_dim).transpose(0, 1)
        k = (h @ w(p + "self_attn.k_proj.weight").T).view(n, kv_heads, head_dim).transpose(0, 1)
        v = (h @ w(p + "self_attn.v_proj.weight").T).view(n, kv_heads, head_dim).transpose(0, 1)
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        out = attention(q, k, v, scheme, theta).transpose(0, 1).reshape(n, heads * head_dim)
        x = x + out @ w(p + "self_attn.o_proj.weight").T
        h = rms_norm(x, w(p + "post_attention_layernorm.weight"), eps)
        gate, up = h @ w(p + "mlp.gate_proj.weight").T, h @ w(p + "mlp.up_proj.weight").T
        x = x + (F.silu(gate) * up) @ w(p + "mlp.down_proj.weight").T
    x = rms_norm(x, w("model.norm.weight"), eps)
    head = weights.tensors.get("lm_head.weight", w("model.embed_tokens.weight"))
    return x @ head.T
