"""Attention weights on demand, from the logsumexp.

A fused kernel never holds the (T, S) matrix of weights, but it can keep one
number per query: the logsumexp of its scores, lse = log sum_j exp(s_j). With
it any weight is exact in one step, without a second softmax pass:

    w_ij = exp(s_ij - lse_i),   s_ij = scale · q_i·k_j (+ mask)

so the weights of the heads and queries a person wants to look at cost one
matmul of their own size, and per-head statistics cost one pass over key
tiles with nothing of size T x S alive:

    entropy_i   = -sum_j w_ij log w_ij = -sum_j w_ij (s_ij - lse_i)   (nats)
    received_j  = sum_i w_ij        (column sums: attention each key receives)
    top-k keys  = the k largest s_ij of row i (the same keys as the k largest w_ij)

    out, lse, backend = attention_with_lse(q, k, v, causal=True)   # fastest path with an lse
    w = attention_weights(q, k, lse, heads=[3], causal=True)       # (B, 1, T, S)
    stats = attention_stats(q, k, lse, top_k=5, causal=True)       # entropy, column sums, top-k

The lse can come from any backend that gives it: the triton kernels on a GPU,
CPU torch's flash kernel (`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`),
or `multihead.chunked_attention`. Masks and `causal` must be the ones the lse
was computed with. A query row with no key to attend (lse = -inf) has weights
0, entropy 0 and no top keys.

The weights returned here carry no gradient (they are read off, not part of
the graph); `attention_with_weights` is the eager path with differentiable
weights.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import backends, masks
from .backends.chunked import chunked_forward
from .backends.reference import attention_ref

# Keys per tile and queries per block of the torch passes: a (B, h, BLOCK_Q, BLOCK_K)
# block of scores is the most that is alive at once besides what is returned.
BLOCK_Q = 256
BLOCK_K = 512

Index = int | Sequence[int] | slice | Tensor | None


class AttentionWithLse(NamedTuple):
    out: Tensor  # (B, H, T, Dv), differentiable in q, k, v
    lse: Tensor  # (B, H, T) float32 (float64 for float64 inputs); -inf for rows with no key
    backend: str  # which path computed them: "triton", "cpu_flash", "chunked" or "reference"


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
    backend: str  # the path that computed out and lse


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


def _check(q, k, lse, attn_mask, causal, scale):
    """The call's checks (shapes, mask, scale) as attention() does them, plus lse's."""
    from .functional import _check_call

    call = _check_call(q, k, k, attn_mask, causal, scale, 0.0)  # v's checks are k's: v plays no part
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


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # Recomputed fp32 scores differ from the kernel's own by ~1e-5 relative on
    # large scores, and exp() carries that into the weights. On the CPU float64
    # costs little next to what it buys (weights within ~5e-6 of an fp32 eager
    # softmax, as transformers computes them); on a GPU float32 keeps the pass
    # as fast as the 1.3x-of-forward budget needs.
    if device.type == "cpu":
        return torch.float64
    return torch.promote_types(dtype, torch.float32)


class _Problem:
    """q, k, lse and the mask of the chosen heads, ready to cut into (rows, keys) tiles."""

    def __init__(self, q, k, lse, call, heads: Tensor):
        acc = _compute_dtype(q.dtype, q.device)
        B, H, T, _ = q.shape
        G, S = k.shape[1], k.shape[2]
        self.T, self.S = T, S
        self.heads = heads
        self.q = q.detach().index_select(1, heads).to(acc) * call.scale  # (B, H, T, D) -> (B, h, T, D)
        self.kv_heads = torch.div(heads, H // G, rounding_mode="floor")  # grouped-query: h -> h // R
        self.k = k.detach()  # (B, G, S, D), indexed per tile, never copied per head whole
        self.acc = acc  # what the tiles compute in
        self.result = torch.promote_types(q.dtype, torch.float32)  # what the caller gets back
        lse = lse.detach().index_select(1, heads).to(acc)  # (B, H, T) -> (B, h, T)
        # A row with no key has lse -inf and only -inf scores; +inf makes exp(s - lse) = 0 there.
        self.lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)
        mask = call.attn_mask
        if mask is not None and mask.shape[1] > 1:
            mask = mask.index_select(1, heads)  # (b, H, t, S) -> (b, h, t, S)
        self.mask = mask
        self.causal = call.causal

    def scores(self, rows: Tensor, s0: int, s1: int) -> Tensor:
        """Masked scores of the chosen heads, query positions `rows`, keys [s0, s1): (B, h, t, s1 - s0)."""
        q = self.q.index_select(2, rows)  # (B, h, T, D) -> (B, h, t, D)
        k = self.k[:, :, s0:s1].index_select(1, self.kv_heads).to(self.acc)  # (B, h, keys, D)
        scores = q @ k.transpose(-2, -1)  # (B, h, t, keys)
        if self.mask is not None:
            mask = self.mask[..., s0:s1]
            if mask.shape[2] > 1:
                mask = mask.index_select(2, rows)  # (b, h|1, T, keys) -> (b, h|1, t, keys)
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(self.acc)
        if self.causal:
            key_pos = torch.arange(s0, s1, device=scores.device)  # (keys,)
            seen = key_pos[None, :] <= rows[:, None] + (self.S - self.T)  # (t, keys), bottom-right aligned
            scores = scores.masked_fill(~seen, float("-inf"))
        return scores

    def weights(self, rows: Tensor, scores: Tensor) -> Tensor:
        return torch.exp(scores - self.lse.index_select(2, rows)[..., None])  # (B, h, t, keys)


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
    t = len(rows), in float32 (float64 for float64 inputs); computed in float64 on the CPU.

    heads, rows: an int, a sequence of ints, a slice or None (all); the dims
        are kept even for a single int.
    Memory: what is returned, plus one (B, h, t, block_k) tile of scores.
    A row with no key to attend gets weights 0. No gradient flows through.
    """
    call = _check(q, k, lse, attn_mask, causal, scale)
    heads_idx = _index("heads", heads, q.shape[1], q.device)
    rows_idx = _index("rows", rows, q.shape[2], q.device)
    from ._checks import positive_int

    positive_int("block_k", block_k)
    with torch.no_grad():
        prob = _Problem(q, k, lse, call, heads_idx)
        out = torch.empty((q.shape[0], heads_idx.numel(), rows_idx.numel(), prob.S), dtype=prob.result,
                          device=q.device)  # (B, h, t, S)
        for s0 in range(0, prob.S, block_k):
            s1 = min(s0 + block_k, prob.S)
            out[..., s0:s1] = prob.weights(rows_idx, prob.scores(rows_idx, s0, s1))
    return out


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
    from ._checks import positive_int

    call = _check(q, k, lse, attn_mask, causal, scale)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    positive_int("block_q", block_q)
    positive_int("block_k", block_k)
    heads_idx = _index("heads", heads, q.shape[1], q.device)
    B, T = q.shape[0], q.shape[2]
    h = heads_idx.numel()
    with torch.no_grad():
        prob = _Problem(q, k, lse, call, heads_idx)
        S = prob.S
        entropy = torch.zeros((B, h, T), dtype=prob.acc, device=q.device)
        column_sums = torch.zeros((B, h, S), dtype=prob.acc, device=q.device)
        top_scores = torch.full((B, h, T, top_k), float("-inf"), dtype=prob.acc, device=q.device)
        top_indices = torch.full((B, h, T, top_k), -1, dtype=torch.long, device=q.device)
        for t0 in range(0, T, block_q):
            rows = torch.arange(t0, min(t0 + block_q, T), device=q.device)
            run_scores = top_scores[:, :, t0:t0 + rows.numel()]  # (B, h, t, top_k), the best so far
            run_indices = top_indices[:, :, t0:t0 + rows.numel()]
            for s0 in range(0, S, block_k):
                s1 = min(s0 + block_k, S)
                scores = prob.scores(rows, s0, s1)  # (B, h, t, keys)
                w = prob.weights(rows, scores)
                # w log w = w (s - lse); masked keys have w = 0 and s = -inf: they add 0
                log_w = scores - prob.lse.index_select(2, rows)[..., None]
                entropy[:, :, t0:t0 + rows.numel()] -= torch.where(w > 0, w * log_w, torch.zeros_like(w)).sum(-1)
                column_sums[..., s0:s1] += w.sum(dim=2)
                if top_k:
                    keys = torch.arange(s0, s1, device=q.device).expand_as(scores)
                    both = torch.cat([run_scores, scores], dim=-1)  # (B, h, t, top_k + keys)
                    both_idx = torch.cat([run_indices, keys], dim=-1)
                    best = both.topk(min(top_k, both.shape[-1]), dim=-1)  # ties keep no order: scores are exact
                    run_scores[..., :best.values.shape[-1]] = best.values
                    run_indices[..., :best.values.shape[-1]] = both_idx.gather(-1, best.indices)
        empty = top_scores == float("-inf")
        top_weights = torch.exp(top_scores - prob.lse[..., None]).masked_fill(empty, 0.0)
        top_indices = top_indices.masked_fill(empty, -1)
        # a row with no key: w = 0 everywhere, so -sum w log w = 0 (not the -0.0 of 0 * finite)
        entropy = entropy.clamp_min(0.0)
    return AttentionStats(entropy.to(prob.result), column_sums.to(prob.result), top_weights.to(prob.result),
                          top_indices, heads_idx)


def _cpu_flash(q, k, v, call) -> AttentionWithLse | None:
    """CPU torch's flash kernel, which returns the logsumexp; None where it cannot run the call."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or q.device.type != "cpu" or call.dropout_p > 0.0:
        return None
    if q.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return None
    T, S = q.shape[2], k.shape[2]
    if T == 0 or S == 0 or q.shape[-1] != v.shape[-1] or q.shape[-1] == 0:
        return None  # it wants D == Dv
    mask = call.attn_mask
    if mask is not None and mask.requires_grad:
        return None
    is_causal = call.causal and mask is None and T == S  # its causal is top-left: equal only when square
    if call.causal and not is_causal:
        mask = masks.materialize(mask, True, T, S, q.dtype, q.device)
    row_has_key = None
    if mask is not None:
        row_has_key = masks.allowed(mask).any(dim=-1)  # (b, h, T) or (T,)
        mask = masks.to_additive(mask, q.dtype)
        if mask.dim() == 2:
            mask = mask[None, None]  # (T, S) -> (1, 1, T, S)
    out, lse = op(q, k, v, 0.0, is_causal, attn_mask=mask, scale=call.scale)
    if row_has_key is not None and not bool(row_has_key.all()):
        if row_has_key.dim() == 1:
            row_has_key = row_has_key[None, None]  # (T,) -> (1, 1, T)
        # its lse for a row with no key is 0; ours is -inf (and the output must be 0)
        lse = lse.masked_fill(~row_has_key, float("-inf"))
        out = out.masked_fill(~row_has_key[..., None], 0.0)
    return AttentionWithLse(out, lse, "cpu_flash")


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> AttentionWithLse:
    """attention(), with the logsumexp, from the fastest path that gives one.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> (out (B, H, T, Dv), lse (B, H, T), backend).
    Tried in order: the triton kernels (CUDA, no dropout, no mask or a key-padding
    mask), CPU torch's flash kernel (CPU, no dropout, D == Dv), the chunked
    backend (anything else), the reference (a float mask that requires grad).
    out is differentiable; lse is not.
    """
    from .functional import _check_call

    call = _check_call(q, k, v, attn_mask, causal, scale, dropout_p)
    kwargs = call.kwargs()
    if q.device.type == "cuda" and "triton" in backends.names():
        triton_backend = backends.get("triton")
        if triton_backend.supports(q, k, v, **kwargs) is None:
            out, lse = triton_backend.forward_with_lse(q, k, v, attn_mask=call.attn_mask, causal=call.causal,
                                                       scale=call.scale)
            return AttentionWithLse(out, lse, "triton")
    flash = _cpu_flash(q, k, v, call)
    if flash is not None:
        return flash
    if backends.get("chunked").supports(q, k, v, **kwargs) is None:
        out, lse = chunked_forward(q, k, v, **kwargs)
        return AttentionWithLse(out, lse, "chunked")
    out = attention_ref(q, k, v, upcast=True, **kwargs).out
    with torch.no_grad():
        prob = _Problem(q, k, torch.zeros(q.shape[:3], device=q.device), call, torch.arange(q.shape[1], device=q.device))
        lse = torch.logsumexp(prob.scores(torch.arange(q.shape[2], device=q.device), 0, k.shape[2]), dim=-1)
    return AttentionWithLse(out, lse, "reference")


def attention_and_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    heads: Index = None,
    rows: Index = None,
) -> WeightsOnDemand:
    """The output from the fastest path that gives a logsumexp, and the weights read off it.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv) and the
    weights (B, h, t, S) of the chosen heads and rows (default all), the softmax
    probabilities before dropout, in q's dtype. What `MultiHeadAttention(need_weights=True)`
    calls, so that asking for weights keeps the fast kernel.
    """
    out, lse, backend = attention_with_lse(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale,
                                           dropout_p=dropout_p)
    weights = attention_weights(q, k, lse, heads=heads, rows=rows, attn_mask=attn_mask, causal=causal,
                                scale=scale)
    return WeightsOnDemand(out, weights.to(q.dtype), lse, backend)


__all__ = [
    "AttentionStats",
    "AttentionWithLse",
    "WeightsOnDemand",
    "attention_and_weights",
    "attention_stats",
    "attention_weights",
    "attention_with_lse",
]
