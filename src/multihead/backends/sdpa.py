"""torch.nn.functional.scaled_dot_product_attention, with multihead's semantics kept.

SDPA already speaks our boolean convention (True = may attend) and takes float
masks added to the scores. What differs is fixed at this edge, by
`masks.for_fused_kernel`:
- its is_causal is aligned top-left; ours is bottom-right, so a causal call
  with T != S passes an explicit mask instead;
- a query row with no key to attend must give output 0 and gradient 0. Such
  rows are opened to every key before the kernel (so no NaN reaches the
  backward) and their output is then replaced by 0, which also zeroes their
  gradient. Nothing reads a tensor's value on the host.

It returns no logsumexp: the public function does not give one (the
`cpu_flash` backend reads it from CPU torch's flash op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import masks
from ..core.call import AttentionCall, AttentionOutput
from .variant_mask import as_mask, mask_reason


def float_mask_reason(call: AttentionCall) -> str | None:
    """Why a fused kernel that adds the mask in q's dtype cannot take this call's float mask, or None."""
    mask = call.attn_mask
    if mask is None or mask.dtype in (torch.bool, call.q.dtype):
        return None
    return (f"a {mask.dtype} float mask with {call.q.dtype} inputs: the kernel adds it in {call.q.dtype}, "
            f"where a large bias would overflow; cast the mask to q's dtype to use it")


class SdpaBackend:
    name = "sdpa"
    priority = 20
    summary = "torch scaled_dot_product_attention (flash/efficient/math as torch picks)"

    def supports(self, call: AttentionCall, *, need_lse: bool = False) -> str | None:
        if need_lse:
            return "scaled_dot_product_attention returns no logsumexp"
        if call.q.shape[2] == 0 or call.k.shape[2] == 0:
            return "zero-length T or S (chunked and reference handle it)"
        if call.variants is not None:
            return mask_reason(call)
        return None if call.attn_mask is None else float_mask_reason(call)

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        if call.variants is not None:
            call = as_mask(call)  # a window, documents, ALiBi: one mask (mask_reason allowed it)
        q, k, v, attn_mask, causal, scale, dropout_p = call[:7]
        gqa = bool(q.shape[1] != k.shape[1])  # bool(): under jit.trace sizes are tensors
        if attn_mask is None and not causal:  # nothing to align or open: the kernel as it is
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
            return AttentionOutput(out, None)  # (B, H, T, Dv)
        grad = call.needs_grad()  # without autograd the rows with no key need no opening, only zeroing
        fused = masks.for_fused_kernel(attn_mask, causal, q.shape[2], k.shape[2], scale, q.dtype, q.device,
                                       open_rows=grad)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=fused.mask, dropout_p=dropout_p, is_causal=fused.is_causal, scale=scale, enable_gqa=gqa,
        )  # (B, H, T, Dv)
        return AttentionOutput(masks.zero_empty_rows(out, fused.has_key, in_place=not grad), None)
