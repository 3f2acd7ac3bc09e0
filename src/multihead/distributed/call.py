"""ShardedCall: one context-parallel attention call, checked on every rank and agreed by all of them.

    sharded = make_sharded_call("ring_attention", q, k, v, key_mask=..., causal=..., scale=...,
                                layout="zigzag", length=T, backend="auto", group=None, need_lse=True)

Each rank holds its part of the sequence: q (B, H, part, D), k (B, G, part, D),
v (B, G, part, Dv), key_mask (B, part) bool (True = a real token), all cut by
the same `multihead.distributed.layout`. Every argument is checked here, on
every rank, and then the ranks agree (`group.agree`): either every rank goes
on with the same shapes and flags, or every rank raises.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import backends, masks
from .._checks import flag, key_mask as check_key_mask
from ..call import AttentionCall, make_call, records_grad
from .group import Group, agree, check_group, signature_of
from .layout import Sharding, make_sharding

_FIELDS = ("B", "H", "G", "part", "D", "Dv", "dtype", "causal", "scale", "layout", "length", "key_mask",
           "backend", "grad")


class ShardedCall(NamedTuple):
    """What every rank runs: its local call and the sharding that places it in the global sequence."""

    call: AttentionCall  # this rank's q, k, v (no mask: the blocks make their own), causal, scale
    key_mask: Tensor | None  # (B, part) bool, True = a real token; travels with k and v
    sharding: Sharding  # the layout, the global length, the world size
    group: Group  # the process group and this rank
    backend: str  # the local step's backend: "auto" or a registered name


def _check(what, q, k, v, key_mask, causal, scale, layout, length, backend, group: Group,
           need_lse: bool) -> ShardedCall:
    flag("causal", causal)
    backends.check_name(backend)
    call = make_call(q, k, v, causal=causal, scale=scale)
    if length is None:
        length = call.q_len * group.world
    sharding = make_sharding(layout, length, group.world)
    if call.q_len != sharding.part or call.kv_len != sharding.part:
        raise ValueError(f"q and k must hold this rank's part of the sequence: a {layout} part of length={length} "
                         f"over {group.world} ranks has {sharding.part} tokens, got q {call.q_len} and "
                         f"k {call.kv_len} (cut them with multihead.distributed.shard_sequence)")
    if key_mask is not None:
        key_mask = check_key_mask(key_mask, call.batch, sharding.part, q.device, what="part")
    probe = masks.key_mask_to_attn_mask(torch.ones(1, 1, dtype=torch.bool, device=q.device))  # (1, 1, 1, 1)
    sample = call._replace(attn_mask=probe.expand(1, 1, 1, sharding.part))  # a block with padding, every kind
    backends.dispatch(sample, backend, need_lse=need_lse)
    if call.needs_grad() and need_lse:
        backends.dispatch(sample, backend, need_lse=True, need_backward=True)
    return ShardedCall(call, key_mask, sharding, group, backend)


def make_sharded_call(what: str, q, k, v, *, key_mask, causal, scale, layout, length, backend, group,
                      need_lse: bool) -> ShardedCall:
    """Check every argument on this rank, then agree with every other rank (each raises if any refused)."""
    g = check_group(group)
    error, sharded = None, None
    try:
        sharded = _check(what, q, k, v, key_mask, causal, scale, layout, length, backend, g, need_lse)
    except (TypeError, ValueError) as exc:
        error = exc
    signature = None
    if sharded is not None:
        c = sharded.call
        signature = signature_of(c.batch, c.heads, c.kv_heads, c.q_len, c.q.shape[-1], c.v.shape[-1], c.q.dtype,
                                 c.causal, c.scale, sharded.sharding.layout, sharded.sharding.length,
                                 key_mask is not None, backend, records_grad(q, k, v))
    agree(what, _FIELDS, signature, error, g)
    return sharded
