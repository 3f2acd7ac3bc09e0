"""All-to-all attention ("Ulysses"): trade sequence parts for head groups, attend locally, trade back.

    out = ulysses_attention(q_part, k_part, v_part, causal=True, layout="zigzag", length=T)

Every rank starts with its part of the sequence for all heads. One
all_to_all gives every rank the whole sequence for H/N query heads (and G/N
key/value heads); the attention is then the checked call, re-shaped,
entering the one path to a backend (`multihead.ops.run.run`: any backend,
sdpa included, with its own backward); a second all_to_all returns each rank
its part of the output for all heads.

    rank r:  (B, H, part, D) --all_to_all--> (B, H/N, N·part, D) --attention--> --all_to_all--> (B, H, part, Dv)

Each rank sends and receives (N-1)/N of its q, k, v and output once, in
four all_to_alls, against the ring's N-1 hops of k and v; but it needs H
and G divisible by N, and every rank holds the full sequence for its heads
(memory grows with T, not T/N).

The parts arrive in rank order; they are put in global order (and the
padding dropped) before the attention, so a causal mask and the key mask
mean the same as on one device, and so do the attention family's window,
ALiBi, documents (their ids gathered) and score_mod (told the global head
index); the rank's heads take their slice of the sinks and slopes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ...core.variants import Variants
from ...ops.run import run
from .call import ShardedCall, make_sharded_call
from .group import Group
from .layout import Sharding, gather_parts, pad, record_cut
from .variants import for_heads


def _all_to_all(x: Tensor, group: Group) -> Tensor:
    """(N, ...) -> (N, ...): slice n goes to rank n, and slice n of the result came from rank n."""
    x = x.contiguous()  # all_to_all_single reads and writes dense tensors: empty_like keeps x's strides
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x, group=group.handle)
    return received


def _to_heads(x: Tensor, group: Group) -> Tensor:
    """(B, H, part, D) -> (B, H/N, N·part, D), the parts in rank order."""
    B, H, P, D = x.shape
    N = group.world
    sliced = x.view(B, N, H // N, P, D).transpose(0, 1)  # (B, H, P, D) -> (N, B, H/N, P, D): head groups
    parts = _all_to_all(sliced, group)  # (N, B, H/N, P, D): parts of the sequence, in rank order
    return parts.permute(1, 2, 0, 3, 4).reshape(B, H // N, N * P, D)  # -> (B, H/N, N·P, D)


def _to_sequence(x: Tensor, group: Group) -> Tensor:
    """(B, H/N, N·part, D) -> (B, H, part, D): the inverse of `_to_heads`."""
    B, h, NP, D = x.shape
    N = group.world
    sliced = x.view(B, h, N, NP // N, D).permute(2, 0, 1, 3, 4)  # (B, h, N·P, D) -> (N, B, h, P, D): parts
    groups = _all_to_all(sliced, group)  # (N, B, h, P, D): head groups, in rank order
    return groups.transpose(0, 1).reshape(B, N * h, NP // N, D)  # (N, B, h, P, D) -> (B, H, P, D)


class _Exchange(torch.autograd.Function):
    """The all_to_all in one direction; its backward is the other direction."""

    @staticmethod
    def forward(ctx, x, to_heads: bool, group: Group):
        ctx.to_heads, ctx.group = to_heads, group
        return _to_heads(x, group) if to_heads else _to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):  # through apply, so that gradients of gradients flow too
        return _Exchange.apply(grad, not ctx.to_heads, ctx.group), None, None


def _global_order(sharding: Sharding, device) -> Tensor | None:
    """(N·part,) the global position of each row of the parts in rank order; None when that is the identity."""
    if sharding.layout == "contiguous":
        return None
    return torch.tensor(sharding.order(), device=device)


def _in_global_order(x: Tensor, order: Tensor | None, length: int) -> Tensor:
    """(B, ·, N·part, ·) in rank order -> (B, ·, length, ·) in global order, the padding dropped."""
    if order is None:
        return x.narrow(2, 0, length)
    return x.index_select(2, torch.argsort(order)[:length])  # the row holding each real position


def _check_divisible(H: int, G: int, N: int) -> None:
    if H % N or G % N:
        raise ValueError(f"ulysses_attention gives each rank H/N query heads and G/N key/value heads: H={H} and "
                         f"G={G} must both be divisible by the world size N={N} (ring_attention has no such limit)")


def ulysses_attention(
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
    """Exact attention over a sequence split across the ranks of `group`, by all-to-all over heads.

    The same arguments and result as `ring_attention`: q (B, H, part, D),
    k (B, G, part, D), v (B, G, part, Dv), key_mask (B, part), cut by
    `shard_sequence` with `layout`; -> (B, H, part, Dv); the attention family
    (window ... score_mod) as there. H and G must be divisible by the world
    size. Any backend runs the local step, and its backward gives the
    gradients (those of the sinks, slopes and what a score_mod captures are
    this rank's heads' share). Collective: every rank calls it alike (agreed
    as `ring_attention`'s, with `check` the same).
    """
    family = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, documents=documents,
                  score_mod=score_mod)
    sharded = make_sharded_call("ulysses_attention", q, k, v, key_mask=key_mask, causal=causal, scale=scale,
                                layout=layout, length=length, backend=backend, group=group, check=check,
                                need_lse=False, each_grad=True, variants=family)
    c, sharding, g = sharded.call, sharded.sharding, sharded.group
    _check_divisible(c.heads, c.kv_heads, g.world)  # from shapes every rank has agreed on: all raise alike
    order = _global_order(sharding, c.q.device)
    q_all, k_all, v_all = (_in_global_order(_Exchange.apply(x, True, g), order, sharding.length)
                           for x in (c.q, c.k, c.v))  # (B, ·, N·part, ·) -> (B, ·, length, ·)
    mask = None
    if sharded.key_mask is not None:
        real = gather_parts(sharded.key_mask, 1, sharding, g)  # (B, part) -> (B, length)
        mask = real[:, None, None, :]  # (B, length) -> (B, 1, 1, length)
    heads = c._replace(q=q_all, k=k_all, v=v_all, attn_mask=mask, variants=_heads_variants(sharded))
    out = run(heads, sharded.backend).out  # (B, H/N, length, Dv): the checked call, for H/N heads over length
    out = pad(out, 2, sharding)  # (B, H/N, length, Dv) -> (B, H/N, N·part, Dv), global order
    if order is not None:
        out = out.index_select(2, order)  # back to rank order
    out = _Exchange.apply(out, False, g)  # (B, H/N, N·part, Dv) -> (B, H, part, Dv)
    return record_cut(out, sharded.output_cut("ulysses_attention"))


def _heads_variants(sharded: ShardedCall) -> Variants | None:
    """The variants of this rank's heads over the whole sequence: in global order, a query's index is its
    position, and the document ids are gathered."""
    c, sharding, g = sharded.call, sharded.sharding, sharded.group
    if c.variants is None:
        return None
    q_ids = kv_ids = None
    if c.variants.q_documents is not None:  # one all_gather for both, whether they are one tensor or two
        both = torch.stack([c.variants.q_documents, c.variants.kv_documents], dim=-1)  # (B, part, 2)
        both = gather_parts(both, 1, sharding, g)  # (B, part, 2) -> (B, length, 2)
        q_ids, kv_ids = both[..., 0], both[..., 1]  # (B, length) each
    first = g.rank * (c.heads // g.world)
    return for_heads(c.variants, first, first + c.heads // g.world, q_ids, kv_ids)
