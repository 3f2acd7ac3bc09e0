"""Ring attention: every rank keeps its queries, and the key/value blocks travel around the ring.

    out = ring_attention(q_part, k_part, v_part, causal=True, layout="zigzag", length=T)

With N ranks there are N steps. At step s rank r holds the keys and values of
rank (r - s) mod N; it sends them on to rank r + 1 while it attends its
queries to them (the next block is in flight during the compute), and merges
the partial result into its running (out, lse) by the logsumexp:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) · out_a + exp(lse_b - lse) · out_b

Each local step enters the one path from a checked call to a backend,
`multihead.ops.run.run(call, backend, need_lse=True)`: cpu_flash or chunked on
a CPU, triton on a GPU, or the backend named by `backend=`.

Which queries see which keys is decided from the layout, chunk by chunk,
never from a tensor's values. Under a causal mask a key chunk before the
query chunk is seen in full, the same chunk along its diagonal, a later one
not at all. With the zigzag layout (rank r holds chunks r and 2N-1-r) every
step then costs the same on every rank:

    N = 2, chunks 0..3; rank 0 holds 0 and 3, rank 1 holds 1 and 2
    rank 0, own block     its part against itself, causal        (0|3 x 0|3)
    rank 0, rank 1's      chunk 3 against chunks 1, 2 in full     (3 x 1|2)
    rank 1, rank 0's      chunks 1, 2 against chunk 0 in full     (1|2 x 0)

Backward (an autograd Function): the ring runs again. k and v travel as in
the forward, and beside them each block's dk and dv accumulators, which
every rank adds its share to and which arrive home after N hops. Each
rank's share comes from the backend's backward from the saved global out
and logsumexp (`backend.backward(call, grad_out, out, lse)`, flash
attention's backward), so nothing of the forward's blocks is kept: memory
is that of one block, and the gradients are exact.

Padding (a global length that does not divide into equal parts) is masked as
a key and gives 0 as a query. A query with no key gives 0, as everywhere.

The attention family (variants.py): each step's call carries the global
positions of its rows and columns and the document ids of its tokens, so the
window, ALiBi, documents and a score_mod mean what they mean on one device;
the sinks join each row's denominator once, after the last merge. A step
whose block causality, the window, the documents or padding rule out
entirely is skipped (its block still travels on), and `ring_steps` counts
the steps this rank computed and skipped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ... import backends
from ...core import masks
from ...core.call import AttentionCall
from ...ops.run import run
from .call import ShardedCall, make_sharded_call
from .group import pass_on
from .layout import Sharding, all_parts, record_cut
from ...core.variants import sink_gradient, sink_in
from .variants import ChunkRule, captured_share, chunk_ranges, step_variants, without_sinks


class Block(NamedTuple):
    """Which of this rank's queries see which keys of a travelling block, and how."""

    rows: slice  # the local query rows that see some of the block's keys
    cols: slice  # the block's keys that some of those rows see
    causal: bool  # True: the part against itself, where the local causal mask is the global one


def _span(indices: list[int], chunk: int) -> slice:
    if indices != list(range(indices[0], indices[-1] + 1)):
        raise AssertionError(f"the layout selected non-adjacent chunks {indices}")  # no layout does
    return slice(indices[0] * chunk, (indices[-1] + 1) * chunk)


def block_for(sharding: Sharding, rank: int, source: int, causal: bool, rule: ChunkRule | None = None) -> Block | None:
    """The work of `rank`'s queries against `source`'s keys; None when no query sees any key.

    Decided from the chunks' indices (and, with a rule, the window's reach and each chunk's document ids):
    a query chunk sees a key chunk unless causality, the window, the documents or padding rule out every
    pair of their tokens. Under causal, a key chunk before a query chunk is seen in full, the same chunk
    along its diagonal (the part against itself runs with the local causal mask), a later one not at all.
    """
    rule = ChunkRule(causal, None, None, None) if rule is None else rule
    q_chunks, k_chunks = sharding.chunks(rank), sharding.chunks(source)
    live = [[rule.live(sharding, rank, i, source, j) for j in range(len(k_chunks))] for i in range(len(q_chunks))]
    rows = [i for i, seen in enumerate(live) if any(seen)]
    if not rows:
        return None
    everything = slice(0, sharding.part)
    if causal and source == rank:  # positions ascend in both, in chunks of one size: the local diagonal is global
        return Block(everything, everything, True)
    cols = [j for j in range(len(k_chunks)) if any(live[i][j] for i in rows)]
    if causal and any(kc >= q_chunks[i] for i in rows for kc in (k_chunks[j] for j in cols)):
        raise AssertionError("a block across ranks that is neither fully seen nor hidden")  # no layout gives one
    return Block(_span(rows, sharding.chunk), _span(cols, sharding.chunk), False)


class RingSteps(NamedTuple):
    """The ring's forward steps on this rank since the last `ring_steps(reset=True)`."""

    computed: int  # steps whose block was attended
    skipped: int  # steps whose block causality, the window, the documents or padding rule out entirely


_STEPS = [0, 0]  # computed, skipped: this process's forward steps (the backward skips the same ones)


def ring_steps(reset: bool = False) -> RingSteps:
    """How many ring steps this rank computed and skipped (forward), and optionally start counting again."""
    counted = RingSteps(*_STEPS)
    if reset:
        _STEPS[:] = [0, 0]
    return counted


class RingPlan(NamedTuple):
    """One call's steps, decided once in the forward and kept for the backward."""

    blocks: list  # per step s: Block | None for this rank's queries against rank (r - s) mod N's keys
    q_ids: Tensor | None  # (B, part) document ids of this rank's queries; None without documents
    kv_ids: list | None  # per rank: (B, part) document ids of its keys; None without documents


def plan_ring(sharded: ShardedCall) -> RingPlan:
    """The blocks of every step: one all_gather of the key document ids (and one host read) with documents."""
    c, sharding, group = sharded.call, sharded.sharding, sharded.group
    variants = c.variants
    window = None if variants is None else variants.window
    q_ids = kv_ids = q_ranges = kv_ranges = None
    if variants is not None and variants.q_documents is not None:
        q_ids = variants.q_documents
        kv_ids = all_parts(variants.kv_documents, group)  # N x (B, part)
        ranks = [group.rank, *range(group.world)]  # this rank's queries, then every rank's keys
        ranges = chunk_ranges(torch.stack([q_ids, *kv_ids]), sharding, ranks)  # (1 + N, B, part) -> ranges
        q_ranges, kv_ranges = ranges[0], ranges[1:]
    rule = ChunkRule(c.causal, window, q_ranges, kv_ranges)
    sources = [(group.rank - step) % group.world for step in range(group.world)]
    blocks = [block_for(sharding, group.rank, source, c.causal, rule) for source in sources]
    skipped = sum(block is None for block in blocks)
    _STEPS[0] += len(blocks) - skipped
    _STEPS[1] += skipped
    return RingPlan(blocks, q_ids, kv_ids)


def merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two attentions over disjoint keys -> the attention over both: out (B, H, T, Dv), lse (B, H, T).

    A row with no key in either keeps lse -inf and output 0 (the weights are exp(-inf - 0), not NaN).
    """
    merged = torch.logaddexp(lse, block_lse)  # (B, H, T)
    finite = torch.where(merged == float("-inf"), torch.zeros_like(merged), merged)
    old = torch.exp(lse - finite).unsqueeze(-1)  # (B, H, T) -> (B, H, T, 1)
    new = torch.exp(block_lse - finite).unsqueeze(-1)  # (B, H, T) -> (B, H, T, 1)
    return out * old + block_out.to(out.dtype) * new, merged


def key_rule(sharded: ShardedCall, source: int, cols: slice, key_mask: Tensor | None) -> Tensor | None:
    """The keys a block's queries may attend, (B|1, 1, 1, keys) bool: not padding, and real per key_mask."""
    sharding = sharded.sharding
    allowed = None
    if sharding.padding_in(source, cols.start, cols.stop):
        device = sharded.call.q.device
        allowed = (sharding.positions(source, device)[cols] < sharding.length).unsqueeze(0)  # (1, keys)
    if key_mask is not None:
        real = key_mask[:, cols]  # (B, keys)
        allowed = real if allowed is None else allowed & real
    return None if allowed is None else masks.key_mask_to_attn_mask(allowed)  # (B|1, keys) -> (B|1, 1, 1, keys)


def _block_call(sharded: ShardedCall, block: Block, source: int, k: Tensor, v: Tensor,
                key_mask: Tensor | None, plan: RingPlan) -> AttentionCall:
    c, rows, cols = sharded.call, block.rows, block.cols  # the checked call's other fields (scale) carry over
    q, k, v = c.q[:, :, rows], k[:, :, cols], v[:, :, cols]  # (B, ·, part, ·) -> (B, ·, rows | cols, ·)
    variants = without_sinks(c.variants)
    if variants is not None:  # the window, ALiBi, documents and score_mod at this block's global positions
        kv_ids = None if plan.kv_ids is None else plan.kv_ids[source]
        variants = step_variants(variants, sharded.sharding, sharded.group.rank, rows, source, cols, plan.q_ids,
                                 kv_ids, c.q.device)
    return c._replace(q=q, k=k, v=v, attn_mask=key_rule(sharded, source, cols, key_mask), causal=block.causal,
                      variants=variants)


def _travelling(k: Tensor, v: Tensor, key_mask: Tensor | None) -> list[Tensor]:
    return [k.contiguous(), v.contiguous()] + ([] if key_mask is None else [key_mask.contiguous()])


def _unpack(blocks: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    return blocks[0], blocks[1], (blocks[2] if len(blocks) > 2 else None)


def query_padding(sharded: ShardedCall) -> Tensor | None:
    """(part, 1) bool, True for this rank's real query rows; None when it holds no padding."""
    sharding, rank = sharded.sharding, sharded.group.rank
    if not sharding.padding_in(rank, 0, sharding.part):
        return None
    return (sharding.positions(rank, sharded.call.q.device) < sharding.length).unsqueeze(-1)  # (part,) -> (part, 1)


def ring_forward(sharded: ShardedCall, plan: RingPlan) -> tuple[Tensor, Tensor]:
    """The merged (out (B, H, part, Dv) in the accumulation dtype, lse (B, H, part)) of every block.

    The sinks join once per row after the last merge: lse' = logaddexp(lse, sink_h), out · exp(lse - lse').
    """
    c, group = sharded.call, sharded.group
    B, H, T, Dv = c.batch, c.heads, c.q_len, c.v.shape[-1]
    acc = torch.promote_types(c.q.dtype, torch.float32)  # the logsumexp's dtype, and the merge's
    out = torch.zeros(B, H, T, Dv, dtype=acc, device=c.q.device)
    lse = torch.full((B, H, T), float("-inf"), dtype=acc, device=c.q.device)
    blocks = _travelling(c.k, c.v, sharded.key_mask)
    for step in range(group.world):
        source = (group.rank - step) % group.world
        pending = pass_on(blocks, group) if step < group.world - 1 else None  # the next block, in flight
        block = plan.blocks[step]
        if block is not None:
            call = _block_call(sharded, block, source, *_unpack(blocks), plan)
            part = run(call, sharded.backend, need_lse=True)
            out[:, :, block.rows], lse[:, :, block.rows] = merge(out[:, :, block.rows], lse[:, :, block.rows],
                                                                 part.out, part.lse)
        if pending is not None:
            blocks = pending.wait()
    return sink_in(out, lse, None if c.variants is None else c.variants.sinks)


def ring_backward(sharded: ShardedCall, plan: RingPlan, grad_out: Tensor, out: Tensor, lse: Tensor,
                  wanted: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list]:
    """dq, dk, dv of this rank's part, and its share of the gradients of `wanted` (what the variants read).

    The ring again, each block's dk and dv sums travelling home with it: at step s this rank adds its
    share to the sums of the block it holds, which arrive from the previous rank while it computes that
    share; the sums it sends on travel during the next step. lse and out are the whole attention's
    (sinks included), so each block's probabilities are exp(s - lse) as on one device.
    """
    c, group = sharded.call, sharded.group
    acc = lse.dtype
    dq = torch.zeros(c.q.shape, dtype=acc, device=c.q.device)  # (B, H, part, D)
    blocks = _travelling(c.k, c.v, sharded.key_mask)
    sums, shares = None, [None] * len(wanted)  # the held block's dk, dv sums so far, in flight; wanted's
    for step in range(group.world):
        source = (group.rank - step) % group.world
        pending = pass_on(blocks, group) if step < group.world - 1 else None
        block = plan.blocks[step]
        grads = None
        if block is not None:
            call = _block_call(sharded, block, source, *_unpack(blocks), plan)
            rows = (grad_out[:, :, block.rows], out[:, :, block.rows], lse[:, :, block.rows])
            grads = backends.dispatch(call, sharded.backend, need_lse=True, need_backward=True).backward(call, *rows)
            dq[:, :, block.rows] += grads.dq
            if wanted:
                shares = [_add(a, b) for a, b in zip(shares, captured_share(call, *rows, wanted))]
        if sums is None:  # step 0: this rank's own block, nobody has added to it yet
            dk = torch.zeros(c.k.shape, dtype=acc, device=c.k.device)  # (B, G, part, D)
            dv = torch.zeros(c.v.shape, dtype=acc, device=c.v.device)  # (B, G, part, Dv)
        else:
            dk, dv = sums.wait()
        if grads is not None:
            dk[:, :, block.cols] += grads.dk
            dv[:, :, block.cols] += grads.dv
        sums = pass_on([dk, dv], group)  # after N hops a block's sums are home
        if pending is not None:
            blocks = pending.wait()
    dk, dv = sums.wait()
    return dq.to(c.q.dtype), dk.to(c.k.dtype), dv.to(c.v.dtype), shares


def _add(total: Tensor | None, share: Tensor | None) -> Tensor | None:
    if share is None:
        return total
    return share if total is None else total + share


def _extras(sharded: ShardedCall) -> tuple[Tensor, ...]:
    """What a gradient may reach besides q, k, v: sinks, ALiBi slopes, what a score_mod captures (once each)."""
    if sharded.call.variants is None:
        return ()
    unique = {id(x): x for x in sharded.call.variants.captured()}
    return tuple(unique.values())


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sharded: ShardedCall, *extras):
        plan = plan_ring(sharded)
        out, lse = ring_forward(sharded, plan)
        out = out.to(q.dtype)
        real = query_padding(sharded)
        if real is not None:  # padding queries give 0
            out = torch.where(real, out, torch.zeros_like(out))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sharded, ctx.real, ctx.plan, ctx.extras = sharded, real, plan, extras
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is asked for
            raise RuntimeError("ring_attention has no second derivative (its backward is the ring again, not "
                               "differentiable); use ulysses_attention with a backend that has one")
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.real is not None:  # padding queries take no part in the loss
            grad_out = torch.where(ctx.real, grad_out, torch.zeros_like(grad_out))
        grad_out = grad_out.contiguous()
        sharded = ctx.sharded._replace(call=ctx.sharded.call._replace(q=q, k=k, v=v))
        variants = sharded.call.variants
        sinks = None if variants is None else variants.sinks
        # the sinks' gradient is read off the lse; the rest through the blocks' scores, where anything needs one
        through_scores = any(x.requires_grad and x is not sinks for x in ctx.extras)
        wanted = [x for x in ctx.extras if x.requires_grad] if through_scores else []
        dq, dk, dv, shares = ring_backward(sharded, ctx.plan, grad_out, out, lse, wanted)
        by_id = {id(x): g for x, g in zip(wanted, shares)}
        grads = []
        for x in ctx.extras:
            g = by_id.get(id(x))
            if x is sinks and x.requires_grad:
                g = _add(g, sink_gradient(sinks, lse, grad_out, out))
            grads.append(None if g is None else g.to(x.dtype))
        return (dq, dk, dv, None, *grads)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window=None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    documents=None,
    score_mod=None,
    layout: str = "zigzag",
    length: int | None = None,
    backend: str = "auto",
    group=None,
    check: bool = False,
) -> Tensor:
    """Exact attention over a sequence split across the ranks of `group`, keys and values passed round a ring.

    q (B, H, part, D), k (B, G, part, D), v (B, G, part, Dv): this rank's part of
    the sequence, cut by `shard_sequence(x, dim=2, layout=layout)` (a part that
    records another layout or length is refused); -> (B, H, part, Dv), this
    rank's part of the output, recording its cut (`gather_sequence` puts the
    parts together).
    key_mask: (B, part) bool, True = a real token, cut the same way (dim=1).
    causal: over global positions (query i sees keys j <= i).
    window, softcap, alibi_slopes, sinks, documents, score_mod: the attention
        family, as `multihead.attention` takes them, over global positions: the
        window and ALiBi by the tokens' places in the whole sequence, score_mod's
        q_idx and kv_idx the global positions, documents (B, part) the ids of
        this part's tokens (cut as key_mask; or a pair (query ids, key ids)).
        alibi_slopes (H,) or (B, H) and sinks (H,) are whole, the same on every
        rank (the ranks agree on which are given and their shapes; the values
        are the caller's to keep alike). Their gradients, and those of what a
        score_mod captures, are this rank's share: summed over the ranks they
        are the single-process gradient. Steps that causality, the window or
        the documents rule out entirely are skipped (`ring_steps` counts them).
    length: the global sequence length T (default: part · N, no padding).
    backend: the local step's backend; it must give the logsumexp (and, for
        gradients, have a backward from it).
    check: agree with the other ranks on this call even if its signature is the
        one the group agreed on last (the same on every rank; docs/distributed.md, "Limits").
    Collective: every rank of the group calls it with the same shapes and flags,
    else every rank raises (checked on a signature's first call, or every call
    with check=True). Differentiable in q, k and v (the backward runs the ring
    again). H must be a multiple of G; k and v are never repeated.
    """
    family = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, documents=documents,
                  score_mod=score_mod)
    sharded = make_sharded_call("ring_attention", q, k, v, key_mask=key_mask, causal=causal, scale=scale,
                                layout=layout, length=length, backend=backend, group=group, check=check,
                                need_lse=True, variants=family)
    out = _RingAttention.apply(sharded.call.q, sharded.call.k, sharded.call.v, sharded, *_extras(sharded))
    return record_cut(out, sharded.output_cut("ring_attention"))
