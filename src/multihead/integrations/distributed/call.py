"""ShardedCall: one context-parallel attention call, checked on every rank and agreed by all of them.

    sharded = make_sharded_call("ring_attention", q, k, v, key_mask=..., causal=..., scale=...,
                                layout="zigzag", length=T, backend="auto", group=None, check=False,
                                need_lse=True)

Each rank holds its part of the sequence: q (B, H, part, D), k (B, G, part, D),
v (B, G, part, Dv), key_mask (B, part) bool (True = a real token), all cut by
the same `multihead.distributed.layout`. Every argument is checked here, on
every rank, on every call (no message: shapes, dtypes, flags and what a part
records of its cut, never a tensor's value), and then the ranks agree
(`group.agree_once`): on the first
call of a signature, or every call with check=True, either every rank goes on
with the same shapes and flags, or every rank raises. A repeated signature
goes on without a message.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ... import backends
from ...core import masks
from ...core.checks import flag, key_mask as check_key_mask
from ...core.call import AttentionCall, make_call, records_grad
from .group import Group, agree_once, check_group
from .layout import Cut, Sharding, check_cut, make_sharding
from .variants import fields as variant_fields, without_sinks


class ShardedCall(NamedTuple):
    """What every rank runs: its local call and the sharding that places it in the global sequence."""

    call: AttentionCall  # this rank's q, k, v (no mask: the blocks make their own), causal, scale, variants
    key_mask: Tensor | None  # (B, part) bool, True = a real token; travels with k and v
    sharding: Sharding  # the layout, the global length, the world size
    group: Group  # the process group and this rank
    backend: str  # the local step's backend: "auto" or a registered name
    each_grad: bool = False  # the ranks agree on which of q, k, v need gradients, not only on whether any does

    def output_cut(self, by: str) -> Cut:
        """How the call's output part (B, H, part, Dv) is cut: recorded on it for gather_sequence to check."""
        return Cut(self.sharding, 2, self.group.rank, by)


def _check(what, q, k, v, key_mask, causal, scale, layout, length, backend, group: Group,
           check, need_lse: bool, each_grad: bool, variants: dict) -> ShardedCall:
    flag("causal", causal)
    flag("check", check)
    backends.check_name(backend)
    call = make_call(q, k, v, causal=causal, scale=scale, **variants)  # documents: (B, part), this part's ids
    given = "" if length is not None else " (length not given: taken as part · N)"
    if length is None:
        length = call.q_len * group.world
    sharding = make_sharding(layout, length, group.world)
    if call.q_len != sharding.part or call.kv_len != sharding.part:
        raise ValueError(f"q and k must hold this rank's part of the sequence: a {layout} part of length={length}"
                         f"{given} over {group.world} ranks has {sharding.part} tokens, got q {call.q_len} and "
                         f"k {call.kv_len} (cut them with multihead.distributed.shard_sequence)")
    documents = variants.get("documents")
    ids = documents if isinstance(documents, (tuple, list)) else (documents,)
    for name, x, dim in (("q", q, 2), ("k", k, 2), ("v", v, 2), ("key_mask", key_mask, 1),
                         *(("documents", x, 1) for x in ids)):
        check_cut(name, x, Cut(sharding, dim, group.rank), what, given)  # parts that say how they were cut
    if key_mask is not None:
        key_mask = check_key_mask(key_mask, call.batch, sharding.part, q.device, what="part")
    probe = masks.key_mask_to_attn_mask(torch.ones(1, 1, dtype=torch.bool, device=q.device))  # (1, 1, 1, 1)
    # a block with padding, every kind; the ring's steps carry no sinks (they join at the merge)
    sample = call._replace(attn_mask=probe.expand(1, 1, 1, sharding.part),
                           variants=without_sinks(call.variants) if need_lse else call.variants)
    backends.dispatch(sample, backend, need_lse=need_lse)
    if call.needs_grad() and need_lse:
        backends.dispatch(sample, backend, need_lse=True, need_backward=True)
    return ShardedCall(call, key_mask, sharding, group, backend, each_grad)


def _fields(what: str, sharded: ShardedCall) -> dict:
    """What every rank must give alike for this call, readable (the agreement compares them)."""
    c, sharding = sharded.call, sharded.sharding
    return {"call": what, "B": c.batch, "H": c.heads, "G": c.kv_heads, "part": c.q_len, "D": c.q.shape[-1],
            "Dv": c.v.shape[-1], "dtype": str(c.q.dtype), "causal": c.causal, "scale": c.scale,
            "layout": sharding.layout, "length": sharding.length, "key_mask": sharded.key_mask is not None,
            "backend": sharded.backend, "grad": c.needs_grad(), "variants": variant_fields(c.variants),
            "grad of q, k, v": tuple(records_grad(x) for x in (c.q, c.k, c.v)) if sharded.each_grad else None}


def make_sharded_call(what: str, q, k, v, *, key_mask, causal, scale, layout, length, backend, group, check,
                      need_lse: bool, each_grad: bool = False, variants: dict | None = None) -> ShardedCall:
    """Check every argument on this rank, then agree with every other rank (each raises if any refused).

    The agreement covers whether a backward will run (its collectives pair up only if every rank runs
    them; a gradient to the sinks or slopes or what a score_mod captures counts) and, with each_grad,
    which of q, k, v need gradients (ulysses exchanges each one's apart), and the variants' flags and
    shapes (window, softcap, which tensors are given; their values are the caller's to keep alike).
    It runs for a signature the group has not just agreed on, or always with check=True (group.py).
    variants: the keywords window, softcap, alibi_slopes, sinks, documents, score_mod (`multihead.attention`'s).
    """
    g = check_group(group)
    error, sharded = None, None
    try:
        sharded = _check(what, q, k, v, key_mask, causal, scale, layout, length, backend, g, check, need_lse,
                         each_grad, variants or {})
    except (TypeError, ValueError) as exc:
        error = exc
    agree_once(what, None if sharded is None else _fields(what, sharded), error, g, check is True)
    return sharded
