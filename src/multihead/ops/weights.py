"""Attention weights and per-head statistics on demand, exact, for the heads and rows asked for.

A fused kernel never holds the (T, S) matrix of weights. The weights of the
heads and queries a person wants to look at cost one matmul of their own
size, computed here from q and k with the call's masks (the one-pass
formula); per-head statistics cost two passes over key tiles with nothing of
size T x S alive: the first finds each row's softmax denominator (the
online softmax's running max and sum), the second reads every weight as
exp(s - lse), lse = log sum_j exp(s_j):

    entropy_i   = -sum_j w_ij log w_ij = -sum_j w_ij (s_ij - lse_i)   (nats)
    received_j  = sum_i w_ij        (column sums: attention each key receives)
    top-k keys  = the k largest s_ij of row i (the same keys as the k largest w_ij)

    w = attention_weights(q, k, v, heads=[3], rows=[-1], causal=True)   # (B, 1, 1, S)
    stats = attention_stats(q, k, v, top_k=5, causal=True)             # entropy, column sums, top-k

Why not read the weights off a kernel's logsumexp: a kernel computes every
head and row to give it, while the weights asked for need only their own
rows' scores; and where a huge finite bias (a Hugging Face style finfo.min
mask) swallows the log of a row's sum in float32, a softmax of the row's own
scores stays exact. A query row with no key to attend has weights 0,
entropy 0 and no top keys. No gradient flows through these weights; the
module's `need_weights=True` in training gives differentiable ones.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..core import masks
from ..core.call import AttentionCall, make_call
from ..core.checks import positive_int
from ..core.variants import ScoreMod, Tile, modify, with_sinks

# Keys per tile and queries per block of the passes: a (B, h, BLOCK_Q, BLOCK_K)
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


# ---- argument checks


def check_index(name: str, index: Index, size: int) -> list[int] | None:
    """heads/rows as a list of positions in [0, size) (None: all); else TypeError/ValueError naming `name`.

    An int, a sequence of ints (negative ones count from the end), a slice
    (any step, negative included) or a 1-d integer tensor; the dim is kept
    even for a single int. Checked where the selection enters (the public
    functions, `multihead.hf.options`), so the passes below trust it.
    """
    if index is None:
        return None
    if isinstance(index, slice):
        return list(range(size)[index])
    if isinstance(index, bool):
        raise TypeError(f"{name} must be an int, a sequence of ints, a slice or None, got bool")
    if isinstance(index, int):
        index = [index]
    if isinstance(index, Tensor):
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() > 1:
            raise TypeError(f"{name} must be a 1-d integer tensor, got {index.dtype} {tuple(index.shape)}")
        index = index.reshape(-1).tolist()
    try:
        items = list(index)
    except TypeError:
        raise TypeError(f"{name} must be an int, a sequence of ints, a slice or None, "
                        f"got {type(index).__name__}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise TypeError(f"{name} must hold ints, got {items!r}")
    if any(not -size <= i < size for i in items):
        raise ValueError(f"{name} must be in [0, {size}) (or negative from the end), got {items}")
    return [i % size for i in items]


def _positions(index: list[int] | None, size: int, device: torch.device) -> Tensor:
    """A checked selection as an int64 index tensor (all of [0, size) for None)."""
    if index is None:
        return torch.arange(size, device=device)
    return torch.tensor(index, dtype=torch.long, device=device)


# ---- the tiles


class _Problem:
    """q, k and the mask of the chosen heads, ready to cut into (rows, keys) tiles."""

    def __init__(self, call: AttentionCall, heads: Tensor):
        q, k = call.q, call.k
        acc = torch.promote_types(q.dtype, torch.float32)  # what the tiles compute in and return
        H, G = call.heads, call.kv_heads
        self.T, self.S, self.acc, self.causal = call.q_len, call.kv_len, acc, call.causal
        self.variants, self.heads = call.variants, heads
        self.q = q.detach().index_select(1, heads).to(acc) * call.scale  # (B, H, T, D) -> (B, h, T, D)
        self.kv_heads = torch.div(heads, H // G, rounding_mode="floor")  # grouped-query: h -> h // R
        self.k = k.detach()  # (B, G, S, D), indexed per tile, never copied per head whole
        mask = call.attn_mask
        if mask is not None and mask.shape[1] > 1:
            mask = mask.index_select(1, heads)  # (b, H, t, S) -> (b, h, t, S)
        self.mask = mask

    def scores(self, rows: Tensor, s0: int, s1: int) -> Tensor:
        """Masked scores of the chosen heads, query positions `rows`, keys [s0, s1): (B, h, t, s1 - s0)."""
        q = self.q.index_select(2, rows)  # (B, h, T, D) -> (B, h, t, D)
        k = self.k[:, :, s0:s1].index_select(1, self.kv_heads).to(self.acc)  # (B, h, keys, D)
        scores = q @ k.transpose(-2, -1)  # (B, h, t, keys)
        if self.variants is not None:
            tile = Tile(rows, torch.arange(s0, s1, device=scores.device), self.heads)
            scores = modify(scores, self.variants, tile, self.T, self.S)  # (B, h, t, keys)
        if self.mask is not None:
            mask = self.mask[..., s0:s1]
            if mask.shape[2] > 1:
                mask = mask.index_select(2, rows)  # (b, h|1, T, keys) -> (b, h|1, t, keys)
            masks.apply(scores, mask, in_place=True)
        if self.causal:
            seen = masks.causal_allowed(rows, torch.arange(s0, s1, device=scores.device), self.T, self.S)
            masks.apply(scores, seen, in_place=True)  # (t, keys) broadcast over (B, h)
        return scores

    def sinks(self) -> Tensor | None:
        """The chosen heads' sink logits (h,), or None."""
        if self.variants is None or self.variants.sinks is None:
            return None
        return self.variants.sinks.detach().index_select(0, self.heads).to(self.acc)

    def _sink_in(self, top: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
        """The sink as one more term of each row's running sum: (top, total) with exp(sink - top) added."""
        sinks = self.sinks()
        if sinks is None:
            return top, total
        sink = sinks[None, :, None].expand_as(top)  # (h,) -> (B, h, t)
        new_top = torch.maximum(top, sink)
        return new_top, total * torch.exp(top - new_top) + torch.exp(sink - new_top)

    def tiles(self, block_k: int):
        for s0 in range(0, self.S, block_k):
            yield s0, min(s0 + block_k, self.S)

    def normaliser(self, rows: Tensor, block_k: int) -> Normaliser:
        """Each chosen row's softmax normaliser, tile by tile (the online softmax): (B, h, t) each."""
        shape = self.q.shape[:2] + (rows.numel(),)
        top = torch.full(shape, float("-inf"), dtype=self.acc, device=self.q.device)  # running max score
        total = torch.zeros(shape, dtype=self.acc, device=self.q.device)  # sum_j exp(s_j - top)
        for s0, s1 in self.tiles(block_k):
            scores = self.scores(rows, s0, s1)  # (B, h, t, keys)
            new_top = torch.maximum(top, scores.amax(dim=-1))
            shift = torch.where(new_top == float("-inf"), torch.zeros_like(new_top), new_top)  # no key yet: 0
            total = total * torch.exp(top - shift) + torch.exp(scores - shift[..., None]).sum(dim=-1)
            top = new_top
        top, total = self._sink_in(top, total)
        # a row with no key: +inf makes exp(s - top) = 0 on its -inf scores
        top = torch.where(top == float("-inf"), torch.full_like(top, float("inf")), top)
        return Normaliser(top, torch.where(total > 0, torch.log(total), torch.zeros_like(total)))


class Normaliser(NamedTuple):
    """A row's softmax denominator as (max score, log of sum_j exp(s_j - max)): w = exp((s - max) - log_sum).

    Kept apart rather than added into one lse: where a huge finite bias (a Hugging Face finfo.min mask)
    sits on every key of a row, max + log_sum rounds back to max in float32 and the weights would sum to
    the number of keys instead of 1.
    """

    top: Tensor  # (B, h, t) the largest score of each row; +inf for a row with no key
    log_sum: Tensor  # (B, h, t) log sum_j exp(s_j - top); 0 for a row with no key

    def log_weights(self, scores: Tensor) -> Tensor:
        """log w of a tile of scores (B, h, t, keys); -inf where a key is masked."""
        return (scores - self.top[..., None]) - self.log_sum[..., None]


def weights_of(call: AttentionCall, heads: list[int] | None = None, rows: list[int] | None = None,
               block_k: int = BLOCK_K) -> Tensor:
    """The softmax probabilities of a checked call's chosen heads and rows: (B, h, t, S), float32 at least.

    The one-pass formula: the chosen rows' masked scores, tile by tile into
    the buffer that is returned, then a softmax in place. No gradient.
    """
    with torch.no_grad():
        heads_idx = _positions(heads, call.heads, call.q.device)
        rows_idx = _positions(rows, call.q_len, call.q.device)
        prob = _Problem(call, heads_idx)
        out = torch.empty((call.batch, heads_idx.numel(), rows_idx.numel(), prob.S), dtype=prob.acc,
                          device=call.q.device)  # (B, h, t, S)
        for s0, s1 in prob.tiles(block_k):
            out[..., s0:s1] = prob.scores(rows_idx, s0, s1)
        sinks = prob.sinks()
        if sinks is not None:  # the real keys' share of a denominator that holds the sink: rows sum to < 1
            lse = with_sinks(torch.logsumexp(out, dim=-1), sinks)  # (B, h, t)
            lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # no key, a -inf sink: weights exp(-inf) = 0
            return out.sub_(lse[..., None]).exp_()
        return masks.softmax(out, may_have_empty_rows=call.may_have_empty_rows(), in_place=True)


# ---- public


def attention_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score_mod: ScoreMod | None = None,
    heads: Index = None,
    rows: Index = None,
) -> Tensor:
    """The attention weights of chosen heads and query rows, exactly: (B, h, t, S) in q's dtype.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) and the keywords of
    `multihead.attention`; the weights are the softmax probabilities before
    dropout (dropout_p is taken so that one set of keywords serves both).
    heads, rows: an int, a sequence of ints, a slice or None (all); the dims
    are kept even for a single int. Memory: what is returned, plus one tile
    of keys. A row with no key to attend gets weights 0. No gradient flows
    through. With sinks, the weights are the real keys' share of a
    denominator that holds the sink: a row sums to less than 1.
    """
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p, window=window,
                     softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, documents=documents,
                     score_mod=score_mod)
    heads = check_index("heads", heads, call.heads)
    rows = check_index("rows", rows, call.q_len)
    return weights_of(call, heads, rows).to(q.dtype)


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


class _Totals(NamedTuple):
    entropy: Tensor  # (B, h, T)
    column_sums: Tensor  # (B, h, S)
    top: Tensor  # (B, h, T) each row's Normaliser, to read the top weights at the end
    log_sum: Tensor  # (B, h, T)


def _stats_of_rows(prob: _Problem, rows: Tensor, block_k: int, totals: _Totals, top: _RunningTopK | None) -> None:
    """One block of query rows: its normaliser, then entropy, column sums and the running top-k, tile by tile."""
    norm = prob.normaliser(rows, block_k)  # (B, h, t) each
    totals.top[:, :, rows], totals.log_sum[:, :, rows] = norm
    for s0, s1 in prob.tiles(block_k):
        scores = prob.scores(rows, s0, s1)  # (B, h, t, keys)
        log_w = norm.log_weights(scores)
        w = log_w.exp()
        # masked keys have w = 0 and log w = -inf: they add 0
        totals.entropy[:, :, rows] -= torch.where(w > 0, w * log_w, torch.zeros_like(w)).sum(-1)
        totals.column_sums[..., s0:s1] += w.sum(dim=2)
        if top is not None:
            top.add(scores, s0)


def attention_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score_mod: ScoreMod | None = None,
    heads: Index = None,
    top_k: int = 5,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> AttentionStats:
    """Per-head statistics of the attention weights, in two passes over (query, key) tiles.

    q, k, v and the keywords of `multihead.attention`. For the chosen heads
    (default all), in float32 (float64 for float64 inputs):

    - entropy (B, h, T): -sum_j w_ij log w_ij per query, in nats (0 = all weight on
      one key, log(n) = spread evenly over n keys); 0 for a row with no key;
    - column_sums (B, h, S): sum_i w_ij, the attention key j receives from all queries;
    - top_weights, top_indices (B, h, T, top_k): each query's top_k keys by weight,
      descending; where a row may attend fewer than top_k keys the rest are weight 0, index -1.

    Nothing of size T x S is held: one (B, h, block_q, block_k) tile at a time.
    """
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p, window=window,
                     softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, documents=documents,
                     score_mod=score_mod)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    positive_int("block_q", block_q)
    positive_int("block_k", block_k)
    heads_idx = _positions(check_index("heads", heads, call.heads), call.heads, q.device)
    B, T, h = call.batch, call.q_len, heads_idx.numel()
    with torch.no_grad():
        prob = _Problem(call, heads_idx)
        totals = _Totals(*(torch.zeros(shape, dtype=prob.acc, device=q.device)
                           for shape in ((B, h, T), (B, h, prob.S), (B, h, T), (B, h, T))))
        top_scores = torch.full((B, h, T, top_k), float("-inf"), dtype=prob.acc, device=q.device)
        top_indices = torch.full((B, h, T, top_k), -1, dtype=torch.long, device=q.device)
        for t0 in range(0, T, block_q):
            t1 = min(t0 + block_q, T)
            top = _RunningTopK(top_scores[:, :, t0:t1], top_indices[:, :, t0:t1]) if top_k else None
            _stats_of_rows(prob, torch.arange(t0, t1, device=q.device), block_k, totals, top)
        empty = top_scores == float("-inf")
        top_weights = Normaliser(totals.top, totals.log_sum).log_weights(top_scores).exp().masked_fill(empty, 0.0)
        # a row with no key: w = 0 everywhere, so -sum w log w = 0 (not the -0.0 of 0 * finite)
        return AttentionStats(totals.entropy.clamp_min(0.0), totals.column_sums, top_weights,
                              top_indices.masked_fill(empty, -1), heads_idx)


__all__ = ["AttentionStats", "Index", "attention_stats", "attention_weights", "check_index", "weights_of"]
