"""Attention weights on demand, from the logsumexp.

A fused kernel never holds the (T, S) matrix of weights, but it can keep one
number per query: the logsumexp of its scores, lse = log sum_j exp(s_j). With
it any weight is one step away, without a second softmax pass:

    w_ij = exp(s_ij - lse_i),   s_ij = scale · q_i·k_j (+ mask)

so the weights of the heads and queries a person wants to look at cost one
matmul of their own size, and per-head statistics cost one pass over key
tiles with nothing of size T x S alive:

    entropy_i   = -sum_j w_ij log w_ij = -sum_j w_ij (s_ij - lse_i)   (nats)
    received_j  = sum_i w_ij        (column sums: attention each key receives)
    top-k keys  = the k largest s_ij of row i (the same keys as the k largest w_ij)

    out, lse = multihead.attention_with_lse(q, k, v, causal=True)  # any backend that gives an lse
    w = attention_weights(q, k, lse, heads=[3], causal=True)       # (B, 1, T, S)
    stats = attention_stats(q, k, lse, top_k=5, causal=True)       # entropy, column sums, top-k

The lse can come from any backend that gives one (`multihead.explain_dispatch(...,
need_lse=True)` says which). Masks and `causal` must be the ones the lse was
computed with. A query row with no key to attend (lse = -inf) has weights 0,
entropy 0 and no top keys.

The kernel's lse is one float32 number per row; where every score of a row
carries a huge finite bias (a Hugging Face style finfo.min mask), the bias
swallows the log of the row's sum in float32. So each row is normalised once
more by the sum of its recomputed exp(s - lse) (1 up to rounding everywhere
else): the weights then equal the eager softmax on every row.

The weights returned here carry no gradient (they are read off, not part of
the graph); `multihead.attention_with_weights` is the eager path with
differentiable weights.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import masks
from ._checks import positive_int
from .call import AttentionCall, make_call
from .functional import attention_with_lse

# Keys per tile and queries per block of the torch passes: a (B, h, BLOCK_Q, BLOCK_K)
# block of scores is the most that is alive at once besides what is returned.
BLOCK_Q = 256
BLOCK_K = 512

Index = int | Sequence[int] | slice | Tensor | None


class AttentionStats(NamedTuple):
    entropy: Tensor  # (B, h, T) per query, in nats; 0 for a row with no key
    column_sums: Tensor  # (B, h, S) attention each key receives, summed over the queries
    top_weights: Tensor  # (B, h, T, k) each query's k largest weights, descending; 0 past its keys
    top_indices: Tensor  # (B, h, T, k) int64 key positions of those weights; -1 past its keys
    heads: Tensor  # (h,) int64 the query heads these statistics are of


class WeightsOnDemand(NamedTuple):
    out: Tensor  # (B, H, T, Dv), differentiable in q, k, v
    weights: Tensor  # (B, h, t, S) of the chosen heads and rows, in q's dtype, no gradient
    lse: Tensor  # (B, H, T)


# ---- argument checks


def _index(name: str, index: Index, size: int, device: torch.device) -> Tensor:
    """heads/rows as an int64 index tensor into a dim of `size`."""
    if index is None:
        return torch.arange(size, device=device)
    if isinstance(index, slice):
        return torch.arange(size, device=device)[index]
    if isinstance(index, bool):
        raise TypeError(f"{name} must be an int, a sequence of ints, a slice or None, got bool")
    if isinstance(index, int):
        index = [index]
    if isinstance(index, Tensor):
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() > 1:
            raise TypeError(f"{name} must be a 1-d integer tensor, got {index.dtype} {tuple(index.shape)}")
        idx = index.to(device=device, dtype=torch.long).reshape(-1)
    else:
        try:
            items = list(index)
        except TypeError:
            raise TypeError(f"{name} must be an int, a sequence of ints, a slice or None, "
                            f"got {type(index).__name__}") from None
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise TypeError(f"{name} must hold ints, got {items!r}")
        idx = torch.tensor(items, dtype=torch.long, device=device)
    if idx.numel() and (int(idx.min()) < -size or int(idx.max()) >= size):
        raise ValueError(f"{name} must be in [0, {size}), got {idx.tolist()}")
    return idx % size if size else idx


def _check(q, k, lse, attn_mask, causal, scale) -> AttentionCall:
    """The call's checks (shapes, mask, scale) as attention() does them, plus lse's."""
    call = make_call(q, k, k, attn_mask=attn_mask, causal=causal, scale=scale)  # v plays no part: k stands in
    B, H, T, _ = q.shape
    if not isinstance(lse, Tensor):
        raise TypeError(f"lse must be a torch.Tensor (B, H, T), got {type(lse).__name__}")
    if tuple(lse.shape) != (B, H, T):
        raise ValueError(f"lse must be (B, H, T) = {(B, H, T)}, got {tuple(lse.shape)}")
    if not lse.is_floating_point():
        raise TypeError(f"lse must be floating point, got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    return call


# ---- the tiles


class _Problem:
    """q, k, lse and the mask of the chosen heads, ready to cut into (rows, keys) tiles."""

    def __init__(self, call: AttentionCall, lse: Tensor, heads: Tensor):
        q, k = call.q, call.k
        acc = torch.promote_types(q.dtype, torch.float32)  # what the tiles compute in and return
        H, G = call.heads, call.kv_heads
        self.T, self.S, self.acc, self.causal = call.q_len, call.kv_len, acc, call.causal
        self.q = q.detach().index_select(1, heads).to(acc) * call.scale  # (B, H, T, D) -> (B, h, T, D)
        self.kv_heads = torch.div(heads, H // G, rounding_mode="floor")  # grouped-query: h -> h // R
        self.k = k.detach()  # (B, G, S, D), indexed per tile, never copied per head whole
        lse = lse.detach().index_select(1, heads).to(acc)  # (B, H, T) -> (B, h, T)
        # A row with no key has lse -inf and only -inf scores; +inf makes exp(s - lse) = 0 there.
        self.lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)
        # log of each row's sum of exp(s - lse): 0 up to rounding, but not where a huge bias
        # swallowed it from the lse (`renormalise` measures it; kept apart, as lse + it would lose it again)
        self.log_norm = torch.zeros_like(self.lse)  # (B, h, T)
        mask = call.attn_mask
        if mask is not None and mask.shape[1] > 1:
            mask = mask.index_select(1, heads)  # (b, H, t, S) -> (b, h, t, S)
        self.mask = mask

    def scores(self, rows: Tensor, s0: int, s1: int) -> Tensor:
        """Masked scores of the chosen heads, query positions `rows`, keys [s0, s1): (B, h, t, s1 - s0)."""
        q = self.q.index_select(2, rows)  # (B, h, T, D) -> (B, h, t, D)
        k = self.k[:, :, s0:s1].index_select(1, self.kv_heads).to(self.acc)  # (B, h, keys, D)
        scores = q @ k.transpose(-2, -1)  # (B, h, t, keys)
        if self.mask is not None:
            mask = self.mask[..., s0:s1]
            if mask.shape[2] > 1:
                mask = mask.index_select(2, rows)  # (b, h|1, T, keys) -> (b, h|1, t, keys)
            masks.apply(scores, mask, in_place=True)
        if self.causal:
            seen = masks.causal_allowed(rows, torch.arange(s0, s1, device=scores.device), self.T, self.S)
            masks.apply(scores, seen, in_place=True)  # (t, keys) broadcast over (B, h)
        return scores

    def log_weights(self, rows: Tensor, scores: Tensor) -> Tensor:
        """log w = (s - lse) - log_norm of a tile (B, h, t, keys); -inf where a key is masked."""
        lse = self.lse.index_select(2, rows)[..., None]  # (B, h, t, 1)
        return (scores - lse) - self.log_norm.index_select(2, rows)[..., None]

    def tiles(self, block_k: int):
        for s0 in range(0, self.S, block_k):
            yield s0, min(s0 + block_k, self.S)

    def renormalise(self, rows: Tensor, block_k: int) -> None:
        """Measure each row's sum of exp(s - lse) into log_norm, so the weights sum to 1 (see the module docstring)."""
        total = torch.zeros(self.lse.shape[:2] + (rows.numel(),), dtype=self.acc, device=self.q.device)
        for s0, s1 in self.tiles(block_k):
            total += self.log_weights(rows, self.scores(rows, s0, s1)).exp().sum(dim=-1)  # (B, h, t)
        self.log_norm[:, :, rows] = torch.where(total > 0, torch.log(total), torch.zeros_like(total))


def _normalise_rows(weights: Tensor) -> Tensor:
    """weights (..., t, S) divided by their row sums, in place; a row of zeros (no key) stays zeros."""
    total = weights.sum(dim=-1, keepdim=True)  # (..., t, 1)
    return weights.div_(torch.where(total > 0, total, torch.ones_like(total)))


# ---- public


def attention_weights(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    *,
    heads: Index = None,
    rows: Index = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_k: int = BLOCK_K,
) -> Tensor:
    """The attention weights of chosen heads and query rows, exactly, from the logsumexp.

    q (B, H, T, D), k (B, G, S, D), lse (B, H, T) as a backend returned it for
    the same attn_mask / causal / scale -> (B, h, t, S), h = len(heads),
    t = len(rows), in float32 (float64 for float64 inputs).

    heads, rows: an int, a sequence of ints, a slice or None (all); the dims
        are kept even for a single int.
    Memory: what is returned, plus one (B, h, t, block_k) tile of scores.
    A row with no key to attend gets weights 0. No gradient flows through.
    """
    call = _check(q, k, lse, attn_mask, causal, scale)
    heads_idx = _index("heads", heads, q.shape[1], q.device)
    rows_idx = _index("rows", rows, q.shape[2], q.device)
    positive_int("block_k", block_k)
    with torch.no_grad():
        prob = _Problem(call, lse, heads_idx)
        out = torch.empty((q.shape[0], heads_idx.numel(), rows_idx.numel(), prob.S), dtype=prob.acc,
                          device=q.device)  # (B, h, t, S)
        lse = prob.lse.index_select(2, rows_idx)[..., None]  # (B, h, t, 1)
        for s0, s1 in prob.tiles(block_k):
            out[..., s0:s1] = prob.scores(rows_idx, s0, s1).sub_(lse).exp_()  # exp(s - lse), in the tile's buffer
        return _normalise_rows(out)


class _RunningTopK:
    """Each query's top_k (score, key) so far, merged tile by tile; (B, h, t, top_k) views into the result."""

    def __init__(self, scores: Tensor, indices: Tensor) -> None:
        self.scores, self.indices = scores, indices

    def add(self, tile: Tensor, s0: int) -> None:
        keys = torch.arange(s0, s0 + tile.shape[-1], device=tile.device).expand_as(tile)  # (B, h, t, keys)
        both = torch.cat([self.scores, tile], dim=-1)  # (B, h, t, top_k + keys)
        both_idx = torch.cat([self.indices, keys], dim=-1)
        best = both.topk(min(self.scores.shape[-1], both.shape[-1]), dim=-1)  # ties keep no order: scores are exact
        n = best.values.shape[-1]
        self.scores[..., :n] = best.values
        self.indices[..., :n] = both_idx.gather(-1, best.indices)


def _stats_of_rows(prob: _Problem, rows: Tensor, block_k: int, entropy: Tensor, column_sums: Tensor,
                   top: _RunningTopK | None) -> None:
    """One block of query rows: entropy, column sums and the running top-k, tile by tile over the keys."""
    prob.renormalise(rows, block_k)
    for s0, s1 in prob.tiles(block_k):
        scores = prob.scores(rows, s0, s1)  # (B, h, t, keys)
        log_w = prob.log_weights(rows, scores)
        w = log_w.exp()
        # masked keys have w = 0 and log w = -inf: they add 0
        entropy[:, :, rows] -= torch.where(w > 0, w * log_w, torch.zeros_like(w)).sum(-1)
        column_sums[..., s0:s1] += w.sum(dim=2)
        if top is not None:
            top.add(scores, s0)


def attention_stats(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    *,
    top_k: int = 5,
    heads: Index = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> AttentionStats:
    """Per-head statistics of the attention weights in one pass over (query, key) tiles.

    q (B, H, T, D), k (B, G, S, D), lse (B, H, T) as a backend returned it for the same
    attn_mask / causal / scale. For the chosen heads (default all), in float32
    (float64 for float64 inputs):

    - entropy (B, h, T): -sum_j w_ij log w_ij per query, in nats (0 = all weight on
      one key, log(n) = spread evenly over n keys); 0 for a row with no key;
    - column_sums (B, h, S): sum_i w_ij, the attention key j receives from all queries;
    - top_weights, top_indices (B, h, T, top_k): each query's top_k keys by weight,
      descending; where a row may attend fewer than top_k keys the rest are weight 0, index -1.

    Nothing of size T x S is held: one (B, h, block_q, block_k) tile at a time.
    """
    call = _check(q, k, lse, attn_mask, causal, scale)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    positive_int("block_q", block_q)
    positive_int("block_k", block_k)
    heads_idx = _index("heads", heads, q.shape[1], q.device)
    B, T, h = q.shape[0], q.shape[2], heads_idx.numel()
    with torch.no_grad():
        prob = _Problem(call, lse, heads_idx)
        entropy = torch.zeros((B, h, T), dtype=prob.acc, device=q.device)
        column_sums = torch.zeros((B, h, prob.S), dtype=prob.acc, device=q.device)
        top_scores = torch.full((B, h, T, top_k), float("-inf"), dtype=prob.acc, device=q.device)
        top_indices = torch.full((B, h, T, top_k), -1, dtype=torch.long, device=q.device)
        for t0 in range(0, T, block_q):
            t1 = min(t0 + block_q, T)
            top = _RunningTopK(top_scores[:, :, t0:t1], top_indices[:, :, t0:t1]) if top_k else None
            _stats_of_rows(prob, torch.arange(t0, t1, device=q.device), block_k, entropy, column_sums, top)
        empty = top_scores == float("-inf")
        top_weights = torch.exp((top_scores - prob.lse[..., None]) - prob.log_norm[..., None]).masked_fill(empty, 0.0)
        # a row with no key: w = 0 everywhere, so -sum w log w = 0 (not the -0.0 of 0 * finite)
        return AttentionStats(entropy.clamp_min(0.0), column_sums, top_weights,
                              top_indices.masked_fill(empty, -1), heads_idx)


def attention_and_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    heads: Index = None,
    rows: Index = None,
) -> WeightsOnDemand:
    """The output from a backend that gives a logsumexp, and the weights read off it.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv) and the
    weights (B, h, t, S) of the chosen heads and rows (default all), the softmax
    probabilities before dropout, in q's dtype, and the lse. backend: "auto"
    (the first that gives an lse) or a name (`multihead.explain_dispatch(...,
    need_lse=True)` says which runs). What `MultiHeadAttention(need_weights=True)`
    calls where the weights need no gradient, so that asking for them keeps the
    fast kernel for the output.
    """
    out, lse = attention_with_lse(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale,
                                  dropout_p=dropout_p, backend=backend)
    weights = attention_weights(q, k, lse, heads=heads, rows=rows, attn_mask=attn_mask, causal=causal,
                                scale=scale)
    return WeightsOnDemand(out, weights.to(q.dtype), lse)


__all__ = [
    "AttentionStats",
    "WeightsOnDemand",
    "attention_and_weights",
    "attention_stats",
    "attention_weights",
]
