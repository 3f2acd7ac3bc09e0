"""Online-softmax attention over key tiles, in plain torch.

The algorithm of FlashAttention, written with torch ops so it runs anywhere:
walk over the keys one tile at a time, keep for every query a running maximum
m, a running sum of exponentials l and an unnormalised output o, and rescale
them whenever a tile raises the maximum:

    m_new = max(m, rowmax(S_tile))
    P     = exp(S_tile - m_new)
    l     = l * exp(m - m_new) + rowsum(P)
    o     = o * exp(m - m_new) + P @ V_tile
    out   = o / l,   logsumexp = m + log(l)

Queries go in blocks too, so at no time is more than a block_q x block_k
block of scores alive per head: memory is O(T) in the sequence length
instead of O(T x S), and each block stays in cache while it is worked on. The backward recomputes each
tile's probabilities from the saved logsumexp, P = exp(S_tile - lse), and
accumulates dq, dk, dv tile by tile (FlashAttention-2's backward).

Grouped-query attention is a broadcast: q is viewed as (B, G, R, T, D) with
R = H / G query heads per kv head, and k, v as (B, G, 1, S, D), so k and v
are never copied per head. Causal calls skip the tiles a query block cannot
see, and within a tile the rows that see none of its keys. Dropout draws its
keep mask block by block from a generator seeded once per call; the backward
walks the blocks in the same order and so replays the same draws.

The same backward, given an out and a logsumexp from outside (those of a
larger attention whose keys this call holds a block of), is the backend's
`backward`: the optional method of the backend contract that ring attention
uses.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from ..core import masks
from ..core.checks import positive_int
from ..core.call import AttentionCall, AttentionOutput, Gradients, check_backward

# Queries per block and keys per tile. A block's scores, (B, H, block_q, block_k),
# should stay in cache across the five passes over it; bigger blocks mean fewer
# Python-level steps (benchmarks/cpu.py compares sizes).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


def _key_tiles(t0: int, t1: int, T: int, S: int, block_k: int, causal: bool) -> Iterator[tuple[int, int, int]]:
    """For the query block [t0, t1): (s0, s1, r0) per key tile [s0, s1) that any of its rows sees.

    Rows r0..t1 are the queries of the block that see at least one key of the
    tile (with causal, the earlier rows see none of it and are skipped).
    """
    offset = S - T  # bottom-right causal: query i sees keys j <= i + offset
    for s0 in range(0, S, block_k):
        r0 = max(t0, s0 - offset) if causal else t0
        if r0 >= t1:
            break  # later tiles start even further right: nobody in this block sees them
        yield s0, min(s0 + block_k, S), r0


def _blocks(T: int, S: int, block_q: int, block_k: int, causal: bool):
    """(t0, t1, tiles) per query block, tiles as `_key_tiles` gives them: the one walk order."""
    for t0 in range(0, T, block_q):
        t1 = min(t0 + block_q, T)
        yield t0, t1, _key_tiles(t0, t1, T, S, block_k, causal)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _split_heads(x: Tensor, groups: int) -> Tensor:
    """(B, H, ...) -> (B, G, R, ...): query head h = g * R + r reads kv head g."""
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])


def _mask_5d(attn_mask: Tensor | None, groups: int) -> Tensor | None:
    """A (b, h, t, s) mask, h in {1, H}, as (b, g, r, t, s) against (B, G, R, T, S)."""
    if attn_mask is None:
        return None
    if attn_mask.shape[1] == 1:
        return attn_mask.unsqueeze(2)  # (b, 1, t, s) -> (b, 1, 1, t, s)
    return _split_heads(attn_mask, groups)  # (b, H, t, s) -> (b, G, R, t, s)


def _tile_scores(
    q5: Tensor, k5: Tensor, mask5: Tensor | None, causal: bool,
    r0: int, r1: int, s0: int, s1: int, T: int, S: int,
) -> Tensor:
    """Masked scores of queries [r0, r1) against keys [s0, s1): (B, G, R, r1 - r0, s1 - s0).

    q5 is already multiplied by the scale.
    """
    scores = q5[..., r0:r1, :] @ k5[..., s0:s1, :].transpose(-2, -1)  # (B, G, R, rows, keys)
    if mask5 is not None:
        rows = mask5[..., r0:r1, s0:s1] if mask5.shape[-2] > 1 else mask5[..., s0:s1]
        masks.apply(scores, rows, in_place=True)
    if causal and s1 - 1 > r0 + (S - T):  # the diagonal crosses this tile
        seen = masks.causal_allowed(torch.arange(r0, r1, device=scores.device),
                                    torch.arange(s0, s1, device=scores.device), T, S)  # (rows, keys)
        masks.apply(scores, seen, in_place=True)
    return scores


def _keep_mask(shape: torch.Size, dropout_p: float, generator: torch.Generator | None,
               device: torch.device) -> Tensor | None:
    if generator is None:
        return None
    return masks.keep_mask(shape, dropout_p, device=device, generator=generator)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _prepare(q, k, v, scale):
    acc = _compute_dtype(q.dtype)
    q5 = _split_heads(q, k.shape[1]).to(acc) * scale  # (B, H, T, D) -> (B, G, R, T, D)
    k5 = k.unsqueeze(2).to(acc)  # (B, G, S, D) -> (B, G, 1, S, D)
    v5 = v.unsqueeze(2).to(acc)  # (B, G, S, Dv) -> (B, G, 1, S, Dv)
    return q5, k5, v5


def _forward(q, k, v, mask5, causal, scale, dropout_p, seed, block_q, block_k):
    B, H, T, _ = q.shape
    S, Dv = k.shape[2], v.shape[-1]
    q5, k5, v5 = _prepare(q, k, v, scale)
    out5 = torch.zeros((*q5.shape[:-1], Dv), dtype=q5.dtype, device=q.device)  # (B, G, R, T, Dv)
    lse5 = torch.full((*q5.shape[:-1], 1), float("-inf"), dtype=q5.dtype, device=q.device)  # (B, G, R, T, 1)
    gen = _generator(seed, q.device)
    inv_keep = 1.0 / (1.0 - dropout_p)

    for t0, t1, tiles in _blocks(T, S, block_q, block_k, causal):
        row_max = lse5[..., t0:t1, :]  # (B, G, R, rows, 1), starts at -inf
        row_sum = torch.zeros_like(row_max)
        acc_out = out5[..., t0:t1, :]  # (B, G, R, rows, Dv), starts at 0
        for s0, s1, r0 in tiles:
            a = r0 - t0  # the block's first row that sees this tile
            scores = _tile_scores(q5, k5, mask5, causal, r0, t1, s0, s1, T, S)
            new_max = torch.maximum(row_max[..., a:, :], scores.amax(dim=-1, keepdim=True))
            safe_max = new_max
            if mask5 is not None:
                # a row masked out so far keeps max -inf; exp(-inf - 0) = 0 instead of NaN
                safe_max = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
            probs = scores.sub_(safe_max).exp_()  # (B, G, R, rows, keys)
            rescale = (row_max[..., a:, :] - safe_max).exp_()  # (B, G, R, rows, 1)
            row_sum[..., a:, :].mul_(rescale).add_(probs.sum(dim=-1, keepdim=True))
            keep = _keep_mask(probs.shape, dropout_p, gen, q.device)
            if keep is not None:  # the sum above is of the undropped weights
                probs.mul_(keep).mul_(inv_keep)
            acc_out[..., a:, :].mul_(rescale).add_(probs @ v5[..., s0:s1, :])
            row_max[..., a:, :] = new_max
        has_key = row_sum > 0
        acc_out.div_(torch.where(has_key, row_sum, torch.ones_like(row_sum)))
        row_max.copy_(torch.where(has_key, row_max + torch.log(row_sum), torch.full_like(row_sum, float("-inf"))))

    out = out5.reshape(B, H, T, Dv).to(q.dtype)  # (B, G, R, T, Dv) -> (B, H, T, Dv)
    lse = lse5.reshape(B, H, T)  # (B, G, R, T, 1) -> (B, H, T)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, mask5, causal, scale, dropout_p, seed, block_q, block_k):
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    q5, k5, v5 = _prepare(q, k, v, scale)
    dout5 = _split_heads(grad_out, G).to(q5.dtype)  # (B, H, T, Dv) -> (B, G, R, T, Dv)
    out5 = _split_heads(out, G).to(q5.dtype)  # (B, H, T, Dv) -> (B, G, R, T, Dv)
    lse5 = _split_heads(lse, G).unsqueeze(-1)  # (B, H, T) -> (B, G, R, T, 1)
    # Rows with no key have lse -inf and all their scores -inf: exp(-inf - 0) = 0.
    lse5 = torch.where(lse5 == float("-inf"), torch.zeros_like(lse5), lse5)
    # D_i = sum_j P_ij dP_ij = rowsum(dO * O): the softmax backward's correction term
    delta = (dout5 * out5).sum(dim=-1, keepdim=True)  # (B, G, R, T, 1)

    dq5 = torch.zeros_like(q5)  # (B, G, R, T, D)
    dk = torch.zeros(k.shape, dtype=q5.dtype, device=k.device)  # (B, G, S, D)
    dv = torch.zeros(v.shape, dtype=q5.dtype, device=v.device)  # (B, G, S, Dv)
    gen = _generator(seed, q.device)  # replays the forward's draws: same walk, same shapes
    inv_keep = 1.0 / (1.0 - dropout_p)

    for t0, t1, tiles in _blocks(T, S, block_q, block_k, causal):
        for s0, s1, r0 in tiles:
            scores = _tile_scores(q5, k5, mask5, causal, r0, t1, s0, s1, T, S)
            probs = scores.sub_(lse5[..., r0:t1, :]).exp_()  # (B, G, R, rows, keys)
            dout_rows = dout5[..., r0:t1, :]  # (B, G, R, rows, Dv)
            grad_probs = dout_rows @ v5[..., s0:s1, :].transpose(-2, -1)  # (B, G, R, rows, keys)
            keep = _keep_mask(probs.shape, dropout_p, gen, q.device)
            used = probs
            if keep is not None:
                used = probs * keep * inv_keep
                grad_probs.mul_(keep).mul_(inv_keep)
            # the R query heads that share a kv head add up their contributions
            dv[..., s0:s1, :] += (used.transpose(-2, -1) @ dout_rows).sum(dim=2)  # (B, G, keys, Dv)
            grad_scores = probs.mul_(grad_probs.sub_(delta[..., r0:t1, :]))  # (B, G, R, rows, keys)
            dq5[..., r0:t1, :] += grad_scores @ k5[..., s0:s1, :]  # (B, G, R, rows, D)
            dk[..., s0:s1, :] += (grad_scores.transpose(-2, -1) @ q5[..., r0:t1, :]).sum(dim=2)  # (B, G, keys, D)

    dq = (dq5 * scale).reshape(B, H, T, D).to(q.dtype)  # (B, G, R, T, D) -> (B, H, T, D)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, causal, scale, dropout_p, seed, block_q, block_k):
        mask5 = _mask_5d(attn_mask, k.shape[1])
        out, lse = _forward(q, k, v, mask5, causal, scale, dropout_p, seed, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.call = (causal, scale, dropout_p, seed, block_q, block_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is asked for
            raise RuntimeError("the chunked backend has no second derivative (its backward works in place); "
                               "use backend='reference' for gradients of gradients")
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        causal, scale, dropout_p, seed, block_q, block_k = ctx.call
        mask5 = _mask_5d(attn_mask, k.shape[1])
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, mask5, causal, scale, dropout_p, seed,
                               block_q, block_k)
        return dq, dk, dv, None, None, None, None, None, None, None


def draw_seed(dropout_p: float) -> int | None:
    """One draw from torch's default generator per call, so torch.manual_seed governs dropout."""
    if dropout_p == 0.0:
        return None
    return int(torch.randint(0, 2**62, (1,)).item())


def chunked_forward(call: AttentionCall, *, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    seed: int | None = None) -> AttentionOutput:
    """The online-softmax tiles on a checked call: out (B, H, T, Dv) and lse (B, H, T)."""
    if call.dropout_p > 0.0 and seed is None:
        seed = draw_seed(call.dropout_p)
    out, lse = _ChunkedAttention.apply(call.q, call.k, call.v, call.attn_mask, call.causal, call.scale,
                                       call.dropout_p, seed, block_q, block_k)
    return AttentionOutput(out, lse)


def dropout_keep_mask(
    B: int, H: int, T: int, S: int, *, causal: bool, dropout_p: float, seed: int,
    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K, device: torch.device | str = "cpu",
) -> Tensor:
    """The (B, H, T, S) keep mask that chunked draws for `seed`, for checking it against the reference."""
    gen = _generator(seed, torch.device(device))
    keep = torch.zeros(B, H, T, S, dtype=torch.bool, device=device)
    for t0, t1, tiles in _blocks(T, S, block_q, block_k, causal):
        for s0, s1, r0 in tiles:
            shape = torch.Size((B, H, t1 - r0, s1 - s0))
            keep[:, :, r0:t1, s0:s1] = _keep_mask(shape, dropout_p, gen, torch.device(device))
    return keep


def chunked_backward(call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor, *,
                     block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> Gradients:
    """dq, dk, dv of the attention that out and lse (B, H, T) describe, restricted to this call's keys."""
    check_backward(call, grad_out, out, lse)
    lse = lse.to(_compute_dtype(call.q.dtype))
    # A row with no key anywhere (lse -inf) gets lse +inf: exp(score - lse) is then 0 for every score,
    # whatever this block's mask says, where _backward's own rule (lse 0) relies on the row being masked here too.
    lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)  # (B, H, T)
    with torch.no_grad():
        dq, dk, dv = _backward(grad_out, call.q, call.k, call.v, out, lse, _mask_5d(call.attn_mask, call.kv_heads),
                               call.causal, call.scale, 0.0, None, block_q, block_k)
    return Gradients(dq, dk, dv)


class ChunkedBackend:
    """The registry's chunked backend; ChunkedBackend(block_q=..., block_k=...) runs other tile sizes."""

    name = "chunked"
    priority = 10
    summary = "online softmax over key tiles in torch: O(T) memory, returns the logsumexp"

    def __init__(self, *, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> None:
        self.block_q = positive_int("block_q", block_q)
        self.block_k = positive_int("block_k", block_k)

    def supports(self, call: AttentionCall, *, need_lse: bool = False) -> str | None:
        if call.attn_mask is not None and call.attn_mask.requires_grad:
            return "a float mask that requires grad needs its T x S gradient"
        return None

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        result = chunked_forward(call, block_q=self.block_q, block_k=self.block_k)
        return result if need_lse else AttentionOutput(result.out, None)

    def backward(self, call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor) -> Gradients:
        return chunked_backward(call, grad_out, out, lse, block_q=self.block_q, block_k=self.block_k)
