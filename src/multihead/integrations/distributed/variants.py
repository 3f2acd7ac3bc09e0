"""The attention family across ranks: each shard computes its block of the whole attention, exactly.

A variant (`multihead.core.variants`) reads where a query and a key sit: the
window and ALiBi their distance, the documents their ids, a score_mod its
q_idx and kv_idx. A rank's call holds only its part of the sequence, so:

- the ring's step call carries `Positions`, the global positions of its
  query rows and key columns (padding clamped to the last real position: it
  is masked, but a score_mod may index a table with it), the document ids of
  exactly those tokens, and no sinks;
- the sinks enter once per row, after the last step's merge
  (`multihead.core.variants.sink_in`: lse' = logaddexp(lse, sink_h), out · exp(lse - lse')), and their
  gradient is -sum over this rank's rows of exp(sink_h - lse) · rowsum(dO ∘ out)
  (`multihead.core.variants.sink_gradient`);
- the gradients of what the variants read besides q, k, v (ALiBi slopes and
  the tensors a score_mod captures) come from each block's scores
  (`captured_share`), since a backend's backward from a given lse returns
  only dq, dk, dv;
- ulysses holds the whole sequence for its heads: its call gets the heads'
  slice of the sinks and slopes, the gathered document ids, and a score_mod
  told the global head index (`for_heads`).

Which key chunks a query chunk can see at all (`ChunkRule.live`) is decided
from ints, chunk by chunk: the window and causality from the chunks'
positions, the documents from each chunk's lowest and highest id per batch
row, read once per call (one host read, as the chunked backend's tiles). A
ring step none of whose pairs is live is skipped.

Gradients of a tensor every rank holds (sinks, slopes, what a score_mod
captures) are this rank's share, its rows' (ring) or its heads' (ulysses):
their sum over the ranks is the single-process gradient, as for a module's
parameters (all-reduce them, as data parallelism does).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ...core import masks
from ...core.call import AttentionCall
from ...core.variants import Positions, Tile, Variants, modify
from .layout import Sharding

NO_ID = torch.iinfo(torch.int64).max  # a padding token's id for the lowest-id reduction: never below a real one


def fields(variants: Variants | None) -> tuple | None:
    """What every rank must give alike of the variants: their flags and shapes (values are the user's)."""
    if variants is None:
        return None
    slopes = variants.alibi_slopes
    return (variants.window, variants.softcap, None if slopes is None else tuple(slopes.shape),
            variants.sinks is not None, variants.q_documents is not None, variants.score_mod is not None)


def without_sinks(variants: Variants | None) -> Variants | None:
    """The variants of one ring step: no sinks (they join at the merge); None when nothing else is left."""
    if variants is None:
        return None
    rest = variants._replace(sinks=None, positions=None)
    return None if all(x is None for x in rest) else rest


class ChunkRule(NamedTuple):
    """What rules a key chunk out for a query chunk, beyond padding: causality, the window, the documents."""

    causal: bool
    window: tuple[int | None, int | None] | None  # (left, right) around the query's position (offset 0)
    q_ranges: list | None  # per chunk of this rank's part: [(lowest, highest) id per batch row]
    kv_ranges: list | None  # per rank, per chunk of its part: [(lowest, highest) id per batch row]

    def live(self, sharding: Sharding, rank: int, qi: int, source: int, kj: int) -> bool:
        """Whether query chunk qi of rank's part may see any key of chunk kj of source's part."""
        c, length = sharding.chunk, sharding.length
        q0, k0 = sharding.chunks(rank)[qi] * c, sharding.chunks(source)[kj] * c
        q1, k1 = min(q0 + c, length) - 1, min(k0 + c, length) - 1  # the last real position of each
        if q0 > q1 or k0 > k1:
            return False  # all padding
        low, high = k0 - q1, k1 - q0  # every j - i between them occurs in the pair
        left, right = self.window if self.window is not None else (None, None)
        low = low if left is None else max(low, -left)
        high = high if right is None else min(high, right)
        high = min(high, 0) if self.causal else high
        if low > high:
            return False
        if self.q_ranges is None:
            return True
        pairs = zip(self.q_ranges[qi], self.kv_ranges[source][kj])
        return any(not (q_hi < k_lo or k_hi < q_lo) for (q_lo, q_hi), (k_lo, k_hi) in pairs)


def chunk_ranges(ids: Tensor, sharding: Sharding, ranks: list[int]) -> list:
    """(n, B, part) the document ids of parts of `ranks` -> [part][chunk][batch row] = (lowest, highest) real id.

    A chunk of padding only gets (NO_ID, -NO_ID - 1), disjoint from every range. One host read."""
    N, B = ids.shape[0], ids.shape[1]
    pieces = len(sharding.chunks(0))
    real = torch.stack([sharding.positions(r, ids.device) < sharding.length for r in ranks])  # (n, part)
    real = real.view(N, 1, pieces, sharding.chunk)  # (N, part) -> (N, 1, pieces, chunk)
    ids = ids.view(N, B, pieces, sharding.chunk)  # (N, B, part) -> (N, B, pieces, chunk)
    low = torch.where(real, ids, NO_ID).amin(dim=-1)  # (N, B, pieces)
    high = torch.where(real, ids, -NO_ID - 1).amax(dim=-1)  # (N, B, pieces)
    table = torch.stack([low, high], dim=-1).permute(0, 2, 1, 3)  # (N, B, pieces, 2) -> (N, pieces, B, 2)
    return [[[tuple(pair) for pair in chunk] for chunk in rank] for rank in table.tolist()]


def step_variants(variants: Variants, sharding: Sharding, rank: int, rows: slice, source: int, cols: slice,
                  q_ids: Tensor | None, kv_ids: Tensor | None, device: torch.device) -> Variants:
    """One ring step's variants: global positions of its rows and columns, their ids, no sinks."""
    last = sharding.length - 1  # padding sits beyond it: masked, but a score_mod may index with it
    queries = sharding.positions(rank, device)[rows].clamp(max=last)  # (part,) -> (rows,)
    keys = sharding.positions(source, device)[cols].clamp(max=last)  # (part,) -> (cols,)
    documents = {} if q_ids is None else dict(q_documents=q_ids[:, rows], kv_documents=kv_ids[:, cols])
    return variants._replace(sinks=None, positions=Positions(queries, keys, 0), **documents)


ROWS = 256  # query rows per tile of `captured_share`: its scores are (B, H, ROWS, S) at a time


def captured_share(call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor, wanted: list[Tensor]) -> list:
    """The gradients of `wanted` (tensors the variants read) from this call's block of a larger attention.

    d loss / d x = sum_ij dS_ij · d s_ij / d x, with dS = P ∘ (dO vᵀ - delta) and P = exp(s - lse) from
    the whole attention's lse (sinks included) and out: autograd from each tile's modified scores to x.
    Float64 sums (many tiles add up); None for a tensor the scores do not read.
    """
    acc = lse.dtype
    R = call.heads // call.kv_heads
    q = call.q.to(acc) * call.scale  # (B, H, T, D)
    k = call.k.to(acc).repeat_interleave(R, dim=1)  # (B, G, S, D) -> (B, H, S, D): head h reads kv head h // R
    v = call.v.to(acc).repeat_interleave(R, dim=1)  # (B, G, S, Dv) -> (B, H, S, Dv)
    grad_out, out = grad_out.to(acc), out.to(acc)
    lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)  # no key: P = 0
    delta = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, H, T, 1)
    T, S = call.q_len, call.kv_len
    keys = torch.arange(S, device=q.device)
    totals: list = [None] * len(wanted)
    for r0 in range(0, T, ROWS):
        r1 = min(r0 + ROWS, T)
        raw = q[:, :, r0:r1] @ k.transpose(-2, -1)  # (B, H, t, S)
        with torch.enable_grad():
            modified = modify(raw, call.variants, Tile(torch.arange(r0, r1, device=q.device), keys, None), T, S)
        scores = masks.apply(modified.detach().clone(), call.attn_mask, in_place=True)  # (B, H, t, S)
        if call.causal:
            seen = masks.causal_allowed(torch.arange(r0, r1, device=q.device), keys, T, S)  # (t, S)
            scores = masks.apply(scores, seen, in_place=True)
        probs = torch.exp(scores - lse[:, :, r0:r1, None])  # (B, H, t, S); 0 where masked
        grad_scores = probs * (grad_out[:, :, r0:r1] @ v.transpose(-2, -1) - delta[:, :, r0:r1])  # (B, H, t, S)
        grads = torch.autograd.grad(modified, wanted, grad_scores, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                totals[i] = g.double() if totals[i] is None else totals[i] + g.double()
    return totals


def _heads_from(score_mod, first: int, score, b, h, q_idx, kv_idx):
    """score_mod as the whole attention calls it: h counted from the rank's first head."""
    return score_mod(score, b, h + first, q_idx, kv_idx)


def for_heads(variants: Variants | None, first: int, stop: int, q_ids: Tensor | None,
              kv_ids: Tensor | None) -> Variants | None:
    """Ulysses' variants for query heads [first, stop) over the whole sequence (global order, no padding)."""
    if variants is None:
        return None
    sinks = None if variants.sinks is None else variants.sinks[first:stop]  # (H,) -> (H/N,)
    slopes = None if variants.alibi_slopes is None else variants.alibi_slopes[:, first:stop]  # (B|1, H/N)
    score_mod = variants.score_mod
    if score_mod is not None and first != 0:
        score_mod = functools.partial(_heads_from, score_mod, first)
    return variants._replace(sinks=sinks, alibi_slopes=slopes, score_mod=score_mod, q_documents=q_ids,
                             kv_documents=kv_ids, positions=None)


__all__ = ["ChunkRule", "captured_share", "chunk_ranges", "fields", "for_heads", "step_variants", "without_sinks"]
