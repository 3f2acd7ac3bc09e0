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
from .layout import Sharding


class Block(NamedTuple):
    """Which of this rank's queries see which keys of a travelling block, and how."""

    rows: slice  # the local query rows that see some of the block's keys
    cols: slice  # the block's keys that some of those rows see
    causal: bool  # True: the part against itself, where the local causal mask is the global one


def _span(indices: list[int], chunk: int) -> slice:
    if indices != list(range(indices[0], indices[-1] + 1)):
        raise AssertionError(f"the layout selected non-adjacent chunks {indices}")  # no layout does
    return slice(indices[0] * chunk, (indices[-1] + 1) * chunk)


def block_for(sharding: Sharding, rank: int, source: int, causal: bool) -> Block | None:
    """The work of `rank`'s queries against `source`'s keys; None when no query sees any key.

    Decided from the chunks' indices: under causal, a key chunk before a query
    chunk is seen in full, the same chunk along its diagonal, a later one not at all.
    """
    everything = slice(0, sharding.part)
    if not causal:
        return Block(everything, everything, False)
    if source == rank:  # positions ascend in both, in chunks of one size: the local diagonal is the global one
        return Block(everything, everything, True)
    q_chunks, k_chunks = sharding.chunks(rank), sharding.chunks(source)
    rows = [i for i, qc in enumerate(q_chunks) if any(kc < qc for kc in k_chunks)]
    if not rows:
        return None
    cols = [j for j, kc in enumerate(k_chunks) if any(kc < q_chunks[i] for i in rows)]
    if any(kc >= q_chunks[i] for i in rows for kc in (k_chunks[j] for j in cols)):
        raise AssertionError("a block across ranks that is neither fully seen nor hidden")  # no layout gives one
    return Block(_span(rows, sharding.chunk), _span(cols, sharding.chunk), False)


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
                key_mask: Tensor | None) -> AttentionCall:
    c, rows, cols = sharded.call, block.rows, block.cols  # the checked call's other fields (scale) carry over
    q, k, v = c.q[:, :, rows], k[:, :, cols], v[:, :, cols]  # (B, ·, part, ·) -> (B, ·, rows | cols, ·)
    return c._replace(q=q, k=k, v=v, attn_mask=key_rule(sharded, source, cols, key_mask), causal=block.causal)


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


def ring_forward(sharded: ShardedCall) -> tuple[Tensor, Tensor]:
    """The merged (out (B, H, part, Dv) in the accumulation dtype, lse (B, H, part)) of every block."""
    c, group = sharded.call, sharded.group
    B, H, T, Dv = c.batch, c.heads, c.q_len, c.v.shape[-1]
    acc = torch.promote_types(c.q.dtype, torch.float32)  # the logsumexp's dtype, and the merge's
    out = torch.zeros(B, H, T, Dv, dtype=acc, device=c.q.device)
    lse = torch.full((B, H, T), float("-inf"), dtype=acc, device=c.q.device)
    blocks = _travelling(c.k, c.v, sharded.key_mask)
    for step in range(group.world):
        source = (group.rank - step) % group.world
        pending = pass_on(blocks, group) if step < group.world - 1 else None  # the next block, in flight
        block = block_for(sharded.sharding, group.rank, source, c.causal)
        if block is not None:
            call = _block_call(sharded, block, source, *_unpack(blocks))
            part = run(call, sharded.backend, need_lse=True)
            out[:, :, block.rows], lse[:, :, block.rows] = merge(out[:, :, block.rows], lse[:, :, block.rows],
                                                                 part.out, part.lse)
        if pending is not None:
            blocks = pending.wait()
    return out, lse


def ring_backward(sharded: ShardedCall, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of this rank's part: the ring again, each block's dk and dv sums travelling home with it.

    At step s this rank adds its share to the sums of the block it holds, which arrive from the
    previous rank while it computes that share; the sums it sends on travel during the next step.
    """
    c, group = sharded.call, sharded.group
    acc = lse.dtype
    dq = torch.zeros(c.q.shape, dtype=acc, device=c.q.device)  # (B, H, part, D)
    blocks = _travelling(c.k, c.v, sharded.key_mask)
    sums = None  # the held block's dk, dv sums so far, in flight from the previous rank
    for step in range(group.world):
        source = (group.rank - step) % group.world
        pending = pass_on(blocks, group) if step < group.world - 1 else None
        block = block_for(sharded.sharding, group.rank, source, c.causal)
        grads = None
        if block is not None:
            call = _block_call(sharded, block, source, *_unpack(blocks))
            backend = backends.dispatch(call, sharded.backend, need_lse=True, need_backward=True)
            grads = backend.backward(call, grad_out[:, :, block.rows], out[:, :, block.rows], lse[:, :, block.rows])
            dq[:, :, block.rows] += grads.dq
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
    return dq.to(c.q.dtype), dk.to(c.k.dtype), dv.to(c.v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sharded: ShardedCall):
        out, lse = ring_forward(sharded)
        out = out.to(q.dtype)
        real = query_padding(sharded)
        if real is not None:  # padding queries give 0
            out = torch.where(real, out, torch.zeros_like(out))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sharded, ctx.real = sharded, real
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is asked for
            raise RuntimeError("ring_attention has no second derivative (its backward is the ring again, not "
                               "differentiable); use ulysses_attention with a backend that has one")
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.real is not None:  # padding queries take no part in the loss
            grad_out = torch.where(ctx.real, grad_out, torch.zeros_like(grad_out))
        sharded = ctx.sharded._replace(call=ctx.sharded.call._replace(q=q, k=k, v=v))
        dq, dk, dv = ring_backward(sharded, grad_out.contiguous(), out, lse)
        return dq, dk, dv, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    length: int | None = None,
    backend: str = "auto",
    group=None,
    check: bool = False,
) -> Tensor:
    """Exact attention over a sequence split across the ranks of `group`, keys and values passed round a ring.

    q (B, H, part, D), k (B, G, part, D), v (B, G, part, Dv): this rank's part of
    the sequence, cut by `shard_sequence(x, dim=2, layout=layout)`; -> (B, H, part, Dv),
    this rank's part of the output (`gather_sequence` puts the parts together).
    key_mask: (B, part) bool, True = a real token, cut the same way (dim=1).
    causal: over global positions (query i sees keys j <= i).
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
    sharded = make_sharded_call("ring_attention", q, k, v, key_mask=key_mask, causal=causal, scale=scale,
                                layout=layout, length=length, backend=backend, group=group, check=check,
                                need_lse=True)
    return _RingAttention.apply(sharded.call.q, sharded.call.k, sharded.call.v, sharded)
