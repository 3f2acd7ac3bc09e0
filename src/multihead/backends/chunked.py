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

import math
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from ..core import masks
from ..core.checks import positive_int
from ..core.call import AttentionCall, AttentionOutput, Gradients, check_backward
from ..core.variants import Tile, Variants, modify, sink_gradient, sink_in

# Queries per block and keys per tile. A block's scores, (B, H, block_q, block_k),
# should stay in cache across the five passes over it; bigger blocks mean fewer
# Python-level steps (benchmarks/cpu.py compares sizes).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


class Walk(NamedTuple):
    """What decides which tiles of a call are visited: its shapes, causality, and what the variants rule out."""

    T: int
    S: int
    causal: bool
    window: tuple[int | None, int | None] | None = None  # (left, right) around i' = i + S - T; None: none
    documents: tuple[list, list] | None = None  # per query block and per key tile, [(lowest, highest) id per batch]


def walk_of(call: AttentionCall, block_q: int, block_k: int) -> Walk:
    """The walk of a checked call: the window and documents prune tiles where the positions are the call's own.

    Document ranges are read once per call (one host sync), and not under torch.compile, where every tile
    is visited and masked instead (still exact, only slower).
    """
    variants = call.variants
    if variants is None or variants.positions is not None:
        return Walk(call.q_len, call.kv_len, call.causal)
    documents = None
    if variants.q_documents is not None and not torch.compiler.is_compiling():
        documents = (_id_ranges(variants.q_documents, block_q), _id_ranges(variants.kv_documents, block_k))
    return Walk(call.q_len, call.kv_len, call.causal, variants.window, documents)


def _id_ranges(ids: Tensor, block: int) -> list:
    """(B, L) document ids -> per block of `block` positions, [(lowest, highest) per batch]."""
    lows = [ids[:, i:i + block].amin(dim=1) for i in range(0, ids.shape[1], block)]  # blocks x (B,)
    highs = [ids[:, i:i + block].amax(dim=1) for i in range(0, ids.shape[1], block)]
    if not lows:
        return []
    pairs = torch.stack([torch.stack(lows), torch.stack(highs)], dim=-1)  # (blocks, B, 2)
    return pairs.tolist()


def _disjoint(query_ranges: list, key_ranges: list) -> bool:
    """Whether no batch row has a document in both ranges (sorted ids make the ranges tight)."""
    return all(q_hi < k_lo or k_hi < q_lo for (q_lo, q_hi), (k_lo, k_hi) in zip(query_ranges, key_ranges))


def _same_document(query_ranges: list, key_ranges: list) -> bool:
    """Whether in every batch row the queries and the keys all hold one and the same document id."""
    return all(q_lo == q_hi == k_lo == k_hi for (q_lo, q_hi), (k_lo, k_hi) in zip(query_ranges, key_ranges))


def _key_tiles(t0: int, t1: int, block: int, walk: Walk, block_k: int) -> Iterator[tuple[int, int, int, bool]]:
    """For the query block [t0, t1), number `block`: (s0, s1, r0, whole) per key tile [s0, s1) that any of its rows
    may see.

    Rows r0..t1 are the queries of the block that see at least one key of the
    tile (with causal, the earlier rows see none of it and are skipped). Tiles
    wholly left of the window, right of it, or of other documents are skipped;
    whole: the documents let every row see every key of the tile (no documents mask).
    """
    offset = walk.S - walk.T  # bottom-right: query i sits at i' = i + offset
    left, right = walk.window if walk.window is not None else (None, None)
    for index, s0 in enumerate(range(0, walk.S, block_k)):
        s1 = min(s0 + block_k, walk.S)
        r0 = max(t0, s0 - offset) if walk.causal else t0
        if r0 >= t1 or (right is not None and s0 > t1 - 1 + offset + right):
            break  # later tiles start even further right: nobody in this block sees them
        if left is not None and s1 - 1 < r0 + offset - left:
            continue  # older than every row's window
        if walk.documents is not None and _disjoint(walk.documents[0][block], walk.documents[1][index]):
            continue
        yield s0, s1, r0, walk.documents is not None and _same_document(walk.documents[0][block],
                                                                        walk.documents[1][index])


def _blocks(walk: Walk, block_q: int, block_k: int):
    """(t0, t1, tiles) per query block, tiles as `_key_tiles` gives them: the one walk order."""
    for block, t0 in enumerate(range(0, walk.T, block_q)):
        t1 = min(t0 + block_q, walk.T)
        yield t0, t1, _key_tiles(t0, t1, block, walk, block_k)


# torch's vectorised exp takes a slow path where its result would be below the smallest normal number:
# 13-40x slower (AMD EPYC, torch 2.13) for inputs under -87.3 (float32; -708 in float64), 3.5x for -inf. Masks,
# ALiBi's bias and softcap's range put many scores there. `_exp_` lifts such inputs to a floor where exp is fast,
# then takes away twice the floor's exp and clips at 0: everything that was at or below the floor (a masked -inf
# too) becomes exactly 0, a weight above 1e-30 is unchanged to the last bit, and a NaN stays NaN.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -700.0}


def _far_below(tiles: _Tiles) -> bool:
    """Whether a tile's scores may be -inf or far below their row's largest: masks, causal, and every variant
    but sinks (which change no score). Decided from flags alone."""
    v = tiles.variants
    return (tiles.mask5 is not None or tiles.causal or v is not None and any(
        x is not None for x in (v.window, v.softcap, v.alibi_slopes, v.q_documents, v.score_mod)))


def _exp_(x: Tensor, lift: bool) -> Tensor:
    """exp(x) in place; with lift, without exp's slow path (above): the weights below ~1e-38 (1e-304) are 0."""
    if not lift:
        return x.exp_()
    floor = _EXP_FLOOR[x.dtype]
    return x.clamp_(min=floor).exp_().sub_(2.0 * math.exp(floor)).clamp_(min=0.0)


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


class _Tiles(NamedTuple):
    """One call cut into tiles: q (scaled), k, v as (B, G, R|1, ·, ·) and what masks or modifies a tile."""

    q5: Tensor  # (B, G, R, T, D), multiplied by the scale, in the compute dtype
    k5: Tensor  # (B, G, 1, S, D)
    v5: Tensor  # (B, G, 1, S, Dv)
    mask5: Tensor | None  # (b, g, r, t, S) against (B, G, R, T, S)
    causal: bool
    variants: Variants | None

    def raw(self, r0: int, r1: int, s0: int, s1: int) -> Tensor:
        """scale · q kᵀ of queries [r0, r1) and keys [s0, s1): (B, G, R, rows, keys)."""
        return self.q5[..., r0:r1, :] @ self.k5[..., s0:s1, :].transpose(-2, -1)  # (B, G, R, rows, keys)

    def modified(self, raw: Tensor, r0: int, r1: int, s0: int, s1: int, in_place: bool = False,
                 whole: bool = False) -> Tensor:
        """The variants on a tile of raw scores: a new tensor, or with in_place raw's buffer where it can
        (raw is not needed afterwards and autograd does not record it); the raw ones when there are none.
        whole: the walk found no documents mask needed on this tile. In place, the window is `_band_`'s."""
        if self.variants is None:
            return raw
        B, G, R, rows, keys = raw.shape
        T, S = self.q5.shape[-2], self.k5.shape[-2]
        variants = self.variants
        band = in_place and variants.window is not None and variants.positions is None
        if band or whole:
            variants = variants._replace(window=None if band else variants.window,
                                         q_documents=None if whole else variants.q_documents,
                                         kv_documents=None if whole else variants.kv_documents)
        tile = Tile(torch.arange(r0, r1, device=raw.device), torch.arange(s0, s1, device=raw.device), None)
        scores = modify(raw.reshape(B, G * R, rows, keys), variants, tile, T, S,
                        in_place=in_place)  # (B, H, rows, keys)
        if band:
            scores = _band_(scores, r0, s0, S - T, *self.variants.window)
        return scores.reshape(B, G, R, rows, keys)  # (B, H, rows, keys) -> (B, G, R, rows, keys)

    def masked(self, scores: Tensor, r0: int, r1: int, s0: int, s1: int) -> Tensor:
        """The call's attn_mask and causal on a tile of scores, in place."""
        T, S = self.q5.shape[-2], self.k5.shape[-2]
        if self.mask5 is not None:
            rows = self.mask5[..., r0:r1, s0:s1] if self.mask5.shape[-2] > 1 else self.mask5[..., s0:s1]
            masks.apply(scores, rows, in_place=True)
        if self.causal:  # keys j <= i' (`_band_` leaves a tile the diagonal does not cross as it is)
            _band_(scores, r0, s0, S - T, None, 0)
        return scores

    def scores(self, r0: int, r1: int, s0: int, s1: int, whole: bool = False) -> Tensor:
        """The tile's final scores: (B, G, R, rows, keys), a buffer of its own."""
        raw = self.raw(r0, r1, s0, s1)  # a fresh buffer, needed for nothing else
        return self.masked(self.modified(raw, r0, r1, s0, s1, in_place=True, whole=whole), r0, r1, s0, s1)


def _band_(scores: Tensor, r0: int, s0: int, offset: int, left: int | None, right: int | None) -> Tensor:
    """scores (..., rows, keys) of queries r0.. and keys s0.. with -inf, in place, where key j is outside
    i' - left <= j <= i' + right (i' = i + offset; None: no limit), as masked_fill_ would put it (over a NaN
    too): tril_/triu_ clear those entries and a (rows, keys) bias of 0 / -inf is added. A bool mask's
    masked_fill_ on a (8, 256, 256) tile costs 0.8-2 ms on an AMD EPYC core (torch 2.13), these 0.1 ms."""
    rows, keys = scores.shape[-2], scores.shape[-1]
    shift = s0 - r0 - offset  # key b of row a sits at j - i' = b - a + shift
    upper = None if right is None or right - shift >= keys - 1 else right - shift  # keep b - a <= upper
    lower = None if left is None or -left - shift <= 1 - rows else -left - shift  # keep b - a >= lower
    if upper is None and lower is None:
        return scores  # every row sees every key of this tile
    bias = scores.new_zeros(rows, keys)  # (rows, keys)
    if upper is not None:
        scores.tril_(upper)
        bias.add_(torch.full_like(bias, float("-inf")).triu_(upper + 1))
    if lower is not None:
        scores.triu_(lower)
        bias.add_(torch.full_like(bias, float("-inf")).tril_(lower - 1))
    return scores.add_(bias)


def _keep_mask(shape: torch.Size, dropout_p: float, generator: torch.Generator | None,
               device: torch.device) -> Tensor | None:
    if generator is None:
        return None
    return masks.keep_mask(shape, dropout_p, device=device, generator=generator)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _prepare(q, k, v, scale, mask5, causal, variants) -> _Tiles:
    acc = _compute_dtype(q.dtype)
    q5 = _split_heads(q, k.shape[1]).to(acc) * scale  # (B, H, T, D) -> (B, G, R, T, D)
    k5 = k.unsqueeze(2).to(acc)  # (B, G, S, D) -> (B, G, 1, S, D)
    v5 = v.unsqueeze(2).to(acc)  # (B, G, S, Dv) -> (B, G, 1, S, Dv)
    return _Tiles(q5, k5, v5, mask5, causal, variants)


def _forward(tiles: _Tiles, walk: Walk, dropout_p, seed, block_q, block_k):
    q5, v5 = tiles.q5, tiles.v5
    B, G, R, T, _ = q5.shape
    out5 = torch.zeros((*q5.shape[:-1], v5.shape[-1]), dtype=q5.dtype, device=q5.device)  # (B, G, R, T, Dv)
    lse5 = torch.full((*q5.shape[:-1], 1), float("-inf"), dtype=q5.dtype, device=q5.device)  # (B, G, R, T, 1)
    gen = _generator(seed, q5.device)
    inv_keep = 1.0 / (1.0 - dropout_p)
    may_skip = _far_below(tiles)  # a row may be all -inf so far, and exp's slow range is near

    for t0, t1, key_tiles in _blocks(walk, block_q, block_k):
        row_max = lse5[..., t0:t1, :]  # (B, G, R, rows, 1), starts at -inf
        row_sum = torch.zeros_like(row_max)
        acc_out = out5[..., t0:t1, :]  # (B, G, R, rows, Dv), starts at 0
        for s0, s1, r0, whole in key_tiles:
            a = r0 - t0  # the block's first row that sees this tile
            scores = tiles.scores(r0, t1, s0, s1, whole)
            new_max = torch.maximum(row_max[..., a:, :], scores.amax(dim=-1, keepdim=True))
            safe_max = new_max
            if may_skip:
                # a row masked out so far keeps max -inf; exp(-inf - 0) = 0 instead of NaN
                safe_max = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
            probs = _exp_(scores.sub_(safe_max), may_skip)  # (B, G, R, rows, keys)
            rescale = (row_max[..., a:, :] - safe_max).exp_()  # (B, G, R, rows, 1)
            row_sum[..., a:, :].mul_(rescale).add_(probs.sum(dim=-1, keepdim=True))
            keep = _keep_mask(probs.shape, dropout_p, gen, q5.device)
            if keep is not None:  # the sum above is of the undropped weights
                probs.mul_(keep).mul_(inv_keep)
            acc_out[..., a:, :].mul_(rescale).add_(probs @ v5[..., s0:s1, :])
            row_max[..., a:, :] = new_max
        has_key = row_sum > 0
        acc_out.div_(torch.where(has_key, row_sum, torch.ones_like(row_sum)))
        row_max.copy_(torch.where(has_key, row_max + torch.log(row_sum), torch.full_like(row_sum, float("-inf"))))

    out = out5.reshape(B, G * R, T, v5.shape[-1])  # (B, G, R, T, Dv) -> (B, H, T, Dv)
    lse = lse5.reshape(B, G * R, T)  # (B, G, R, T, 1) -> (B, H, T)
    return sink_in(out, lse, None if tiles.variants is None else tiles.variants.sinks)


def _backward(grad_out, out, lse, tiles: _Tiles, walk: Walk, dropout_p, seed, block_q, block_k, captured):
    """dq, dk, dv, and the gradients of the captured tensors (sinks, ALiBi slopes, score_mod's), tile by tile."""
    q5, k5, v5 = tiles.q5, tiles.k5, tiles.v5
    B, G, R, T, D = q5.shape
    dout5 = _split_heads(grad_out, G).to(q5.dtype)  # (B, H, T, Dv) -> (B, G, R, T, Dv)
    out5 = _split_heads(out, G).to(q5.dtype)  # (B, H, T, Dv) -> (B, G, R, T, Dv)
    lse5 = _split_heads(lse, G).unsqueeze(-1).to(q5.dtype)  # (B, H, T) -> (B, G, R, T, 1)
    # Rows with no key have lse -inf and all their scores -inf: exp(-inf - 0) = 0.
    lse5 = torch.where(lse5 == float("-inf"), torch.zeros_like(lse5), lse5)
    # D_i = sum_j P_ij dP_ij = rowsum(dO * O): the softmax backward's correction term
    delta = (dout5 * out5).sum(dim=-1, keepdim=True)  # (B, G, R, T, 1)

    dq5 = torch.zeros_like(q5)  # (B, G, R, T, D)
    dk = torch.zeros((B, G, k5.shape[-2], D), dtype=q5.dtype, device=q5.device)  # (B, G, S, D)
    dv = torch.zeros((B, G, v5.shape[-2], v5.shape[-1]), dtype=q5.dtype, device=q5.device)  # (B, G, S, Dv)
    extra = [None] * len(captured)  # gradients of what the modification reads
    gen = _generator(seed, q5.device)  # replays the forward's draws: same walk, same shapes
    inv_keep = 1.0 / (1.0 - dropout_p)

    by_autograd = _by_autograd(tiles.variants, captured)
    lift = _far_below(tiles)
    for t0, t1, key_tiles in _blocks(walk, block_q, block_k):
        for s0, s1, r0, whole in key_tiles:
            raw = tiles.raw(r0, t1, s0, s1)  # (B, G, R, rows, keys)
            if by_autograd:
                modified, tanh = _track(tiles, raw, r0, t1, s0, s1), None
                scores = tiles.masked(modified.detach().clone(), r0, t1, s0, s1)
            else:
                scores, tanh = _tile_scores(tiles, raw, r0, t1, s0, s1, whole)
            probs = _exp_(scores.sub_(lse5[..., r0:t1, :]), lift)  # (B, G, R, rows, keys)
            dout_rows = dout5[..., r0:t1, :]  # (B, G, R, rows, Dv)
            grad_probs = dout_rows @ v5[..., s0:s1, :].transpose(-2, -1)  # (B, G, R, rows, keys)
            keep = _keep_mask(probs.shape, dropout_p, gen, q5.device)
            used = probs
            if keep is not None:
                used = probs * keep * inv_keep
                grad_probs.mul_(keep).mul_(inv_keep)
            # the R query heads that share a kv head add up their contributions
            dv[..., s0:s1, :] += (used.transpose(-2, -1) @ dout_rows).sum(dim=2)  # (B, G, keys, Dv)
            grad_scores = probs.mul_(grad_probs.sub_(delta[..., r0:t1, :]))  # (B, G, R, rows, keys)
            if by_autograd:
                grad_scores = _through_variants(modified, raw, grad_scores, captured, extra)
            elif tanh is not None:  # d/ds c·tanh(s/c) = 1 - tanh²(s/c)
                grad_scores = grad_scores.mul_(tanh.mul_(tanh).neg_().add_(1.0))
            dq5[..., r0:t1, :] += grad_scores @ k5[..., s0:s1, :]  # (B, G, R, rows, D)
            dk[..., s0:s1, :] += (grad_scores.transpose(-2, -1) @ q5[..., r0:t1, :]).sum(dim=2)  # (B, G, keys, D)

    if tiles.variants is not None and tiles.variants.sinks is not None:
        _sink_gradient(tiles.variants.sinks, lse, grad_out, out, captured, extra)
    return dq5, dk, dv, extra


def _by_autograd(variants: Variants | None, captured) -> bool:
    """Whether a tile's gradient goes back through the variants by autograd: only for a score_mod, or ALiBi
    slopes that need a gradient. The rest is by hand (softcap's derivative; ALiBi's bias and the masks pass the
    gradient through as it is): no autograd graph per tile, and a backward that torch.compile can trace
    (dynamo refuses `torch.autograd.grad` inside an autograd.Function's backward)."""
    if variants is None:
        return False
    slopes = variants.alibi_slopes
    return variants.score_mod is not None or (slopes is not None and any(x is slopes and x.requires_grad
                                                                         for x in captured))


def _tile_scores(tiles: _Tiles, raw: Tensor, r0: int, r1: int, s0: int, s1: int,
                 whole: bool) -> tuple[Tensor, Tensor | None]:
    """A tile's final scores from its raw ones (in raw's buffer), and with softcap tanh(raw / c), which the
    backward's softcap step reads again (kept rather than computed twice: tanh costs about three exps)."""
    variants = tiles.variants
    if variants is None or variants.softcap is None:
        scores = tiles.modified(raw, r0, r1, s0, s1, in_place=True, whole=whole)
        return tiles.masked(scores, r0, r1, s0, s1), None
    tanh = torch.tanh(raw.div_(variants.softcap))  # (B, G, R, rows, keys)
    uncapped = tiles._replace(variants=variants._replace(softcap=None))  # the rest of the variants
    scores = uncapped.modified(tanh * variants.softcap, r0, r1, s0, s1, in_place=True, whole=whole)
    return tiles.masked(scores, r0, r1, s0, s1), tanh


def _track(tiles: _Tiles, raw: Tensor, r0: int, r1: int, s0: int, s1: int) -> Tensor:
    """The modified scores of a tile, recorded by autograd from the raw ones when there are variants."""
    if tiles.variants is None:
        return raw
    with torch.enable_grad():
        raw.requires_grad_(True)
        return tiles.modified(raw, r0, r1, s0, s1)


def _through_variants(modified: Tensor, raw: Tensor, grad_scores: Tensor, captured, extra: list) -> Tensor:
    """The gradient of a tile's raw scores from that of its modified ones; what is captured adds up in `extra`."""
    wanted = [x for x in captured if x.requires_grad]
    grads = torch.autograd.grad(modified, [raw, *wanted], grad_scores, allow_unused=True)
    by_id = {id(x): g for x, g in zip(wanted, grads[1:])}
    for i, x in enumerate(captured):
        g = by_id.get(id(x))
        if g is not None:  # summed over many tiles: in float64, so the sum's rounding stays below one tile's
            extra[i] = g.double() if extra[i] is None else extra[i] + g.double()
    return grads[0] if grads[0] is not None else torch.zeros_like(raw)


def _sink_gradient(sinks: Tensor, lse: Tensor, grad_out: Tensor, out: Tensor, captured, extra: list) -> None:
    """The sinks' gradient (`sink_gradient`) into `extra`, where they are among the captured tensors."""
    index = next((i for i, x in enumerate(captured) if x is sinks), None)
    if index is None:  # a backward from a given lse (the ring's): the sinks' gradient is the caller's
        return
    grad = sink_gradient(sinks, lse, grad_out, out)  # (H,)
    extra[index] = grad if extra[index] is None else extra[index] + grad


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, causal, scale, dropout_p, seed, block_q, block_k, variants, walk,
                *captured):
        tiles = _prepare(q, k, v, scale, _mask_5d(attn_mask, k.shape[1]), causal, variants)
        out, lse = _forward(tiles, walk, dropout_p, seed, block_q, block_k)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.call = (causal, scale, dropout_p, seed, block_q, block_k, variants, walk, captured)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is asked for
            raise RuntimeError("the chunked backend has no second derivative (its backward works in place); "
                               "use backend='reference' for gradients of gradients")
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        causal, scale, dropout_p, seed, block_q, block_k, variants, walk, captured = ctx.call
        tiles = _prepare(q, k, v, scale, _mask_5d(attn_mask, k.shape[1]), causal, variants)
        dq5, dk, dv, extra = _backward(grad_out, out, lse, tiles, walk, dropout_p, seed, block_q, block_k, captured)
        dq = (dq5 * scale).reshape(q.shape).to(q.dtype)  # (B, G, R, T, D) -> (B, H, T, D)
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(extra, captured)]
        return (dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None, None, *grads)


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
    captured = () if call.variants is None else call.variants.captured()
    out, lse = _ChunkedAttention.apply(call.q, call.k, call.v, call.attn_mask, call.causal, call.scale,
                                       call.dropout_p, seed, block_q, block_k, call.variants,
                                       walk_of(call, block_q, block_k), *captured)
    return AttentionOutput(out, lse)


def visited_tiles(call: AttentionCall, *, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> int:
    """How many (query block, key tile) pairs the forward computes for this call; the others are skipped."""
    return sum(1 for _, _, key_tiles in _blocks(walk_of(call, block_q, block_k), block_q, block_k)
               for _ in key_tiles)


def dropout_keep_mask(
    B: int, H: int, T: int, S: int, *, causal: bool, dropout_p: float, seed: int,
    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K, device: torch.device | str = "cpu",
) -> Tensor:
    """The (B, H, T, S) keep mask that chunked draws for `seed`, for checking it against the reference."""
    gen = _generator(seed, torch.device(device))
    keep = torch.zeros(B, H, T, S, dtype=torch.bool, device=device)
    for t0, t1, tiles in _blocks(Walk(T, S, causal), block_q, block_k):
        for s0, s1, r0, _ in tiles:
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
    tiles = _prepare(call.q, call.k, call.v, call.scale, _mask_5d(call.attn_mask, call.kv_heads), call.causal,
                     call.variants)
    with torch.no_grad():
        dq5, dk, dv, _ = _backward(grad_out, out, lse, tiles, walk_of(call, block_q, block_k), 0.0, None,
                                   block_q, block_k, ())
    dq = (dq5 * call.scale).reshape(call.q.shape)  # (B, G, R, T, D) -> (B, H, T, D)
    return Gradients(dq.to(call.q.dtype), dk.to(call.k.dtype), dv.to(call.v.dtype))


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
        if (call.variants is not None and call.variants.score_mod is not None and torch.is_grad_enabled()
                and torch.compiler.is_compiling()):
            # its backward would need the tensors the score_mod captures (unseen under dynamo) and
            # torch.autograd.grad per tile (not traced): a gradient would fail, or be lost at a graph break
            return "a score_mod with grad enabled under torch.compile (compile's own autograd differentiates " \
                   "the reference; or run under torch.no_grad())"
        return None

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        result = chunked_forward(call, block_q=self.block_q, block_k=self.block_k)
        return result if need_lse else AttentionOutput(result.out, None)

    def backward(self, call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor) -> Gradients:
        return chunked_backward(call, grad_out, out, lse, block_q=self.block_q, block_k=self.block_k)
