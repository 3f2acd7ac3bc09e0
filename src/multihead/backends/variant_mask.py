"""The variants a fused kernel (SDPA, CPU flash) can take: as a mask, when the call is small enough.

torch's fused ops add a mask to the scores and nothing else. A window and
documents are masks, ALiBi is a float bias, so a call with only those can
run there with the variants written out as one (B|1, H|1, T, S) mask. That
mask is T x S, and the kernel computes every score under it: above
`MASK_LIMIT` elements the call is refused, and the chunked backend computes
it tile by tile, skipping the tiles the window or the documents rule out.
Softcapping, sinks and a score_mod change the softmax itself: refused with
the reason (cpu_flash takes the sinks apart, after its op, from its lse).
"""

from __future__ import annotations

import torch

from ..core import masks
from ..core.call import AttentionCall
from ..core.variants import Variants, allowed_keys, full_tile, modify

# The largest mask written out for a fused kernel: 256K elements (1 MB as float32, a 512 x 512 head). A
# fused kernel given a dense mask still computes every score, while the chunked backend skips the tiles a
# window or the documents rule out: at T = S = 1024 (1M elements) chunked already takes 0.2-0.9x the time
# of the plain call, the fused kernel with the mask 1.2-1.6x, and ALiBi as a (H, T, S) bias 1.9-4.5x against
# chunked's 1.5-1.9x (BENCHMARKS.md, "The attention family"). Small calls (decoding: T = 1) keep the kernel.
MASK_LIMIT = 1 << 18


def mask_reason(call: AttentionCall) -> str | None:
    """Why a fused kernel cannot take this call's variants as a mask, or None (it can; see `as_mask`)."""
    variants = call.variants
    for name, value in (("softcap", variants.softcap), ("sinks", variants.sinks), ("score_mod", variants.score_mod)):
        if value is not None:
            return f"{name} is not a mask (it changes the softmax itself); the fused op only adds a mask"
    if variants.alibi_slopes is not None and call.q.dtype in (torch.float16, torch.bfloat16):
        return f"ALiBi as a {call.q.dtype} bias would round |i - j| · slope; chunked adds it in float32"
    size = _mask_size(call)
    if size > MASK_LIMIT:
        return (f"the variants as a dense mask would hold {size:,} elements (limit {MASK_LIMIT:,}); "
                f"the chunked backend computes them tile by tile")
    return None


def _mask_size(call: AttentionCall) -> int:
    variants = call.variants
    batch = call.batch if variants.q_documents is not None or _per_batch_alibi(variants) else 1
    heads = call.heads if variants.alibi_slopes is not None else 1
    return batch * heads * call.q_len * call.kv_len


def _per_batch_alibi(variants: Variants) -> bool:
    return variants.alibi_slopes is not None and variants.alibi_slopes.shape[0] > 1


def as_mask(call: AttentionCall) -> AttentionCall:
    """The call with its window, documents and ALiBi folded into attn_mask, and no variants (`mask_reason` None).

    The mask is `modify`'s own answer on zero scores: -inf where the window or the documents rule a key out,
    -slope · |i' - j| elsewhere (at a context-parallel shard's global positions when it has them); a bool
    mask where there is no ALiBi.
    """
    variants, T, S = call.variants, call.q_len, call.kv_len
    tile = full_tile(T, S, call.q.device)
    if variants.alibi_slopes is None:
        mask = allowed_keys(variants, tile, T, S)  # (T, S) or (B, 1, T, S) bool
        mask = mask[None, None] if mask.dim() == 2 else mask  # (T, S) -> (1, 1, T, S)
    else:
        batch = call.batch if variants.q_documents is not None else variants.alibi_slopes.shape[0]
        # the bias in q's dtype, float32 at least, whatever the slopes': torch's op given a float32 mask with
        # float64 q returned wrong rows (off by 2 at T=16), and a float64 mask with float32 q is an error
        dtype = torch.promote_types(call.q.dtype, torch.float32)
        zeros = torch.zeros((batch, call.heads, T, S), dtype=dtype, device=call.q.device)
        mask = modify(zeros, variants, tile, T, S)  # (B|1, H, T, S): the bias, -inf where ruled out
    return call._replace(attn_mask=masks.combine(call.attn_mask, mask, _float_dtype(call)), variants=None)


def _float_dtype(call: AttentionCall) -> torch.dtype:
    """The dtype a combined float mask takes: q's, which the fused kernel adds it in."""
    return call.q.dtype


__all__ = ["MASK_LIMIT", "as_mask", "mask_reason"]
