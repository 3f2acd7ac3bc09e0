"""CPU torch's flash attention op, which returns the logsumexp: the fast path for weights on demand on the CPU.

`torch.nn.functional.scaled_dot_product_attention` on the CPU runs
`aten._scaled_dot_product_flash_attention_for_cpu` for most calls, but keeps
the logsumexp it computes to itself. This backend calls the op directly to
have both, with the same edge as the sdpa backend (`masks.for_fused_kernel`:
bottom-right causal made explicit, rows with no key opened and zeroed, their
lse set to -inf). It ranks below sdpa, so plain calls keep the public
function and only calls that need the logsumexp come here.

The op takes no dropout, needs D == Dv and masks in q's dtype, and reads its
inputs with their last dim contiguous (a strided last dim gives wrong
numbers, so such inputs are copied first).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import masks
from ..call import AttentionCall, AttentionOutput
from .sdpa import float_mask_reason

def _op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _dense_last_dim(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class CpuFlashBackend:
    name = "cpu_flash"
    priority = 15  # below sdpa, which runs the same kernel for calls that need no logsumexp
    summary = "CPU torch's flash op called directly: returns the logsumexp"

    def supports(self, call: AttentionCall, *, need_lse: bool = False) -> str | None:
        q = call.q
        if _op() is None:
            return "this torch has no aten._scaled_dot_product_flash_attention_for_cpu"
        if q.device.type != "cpu":
            return f"runs on CPU tensors, q is on {q.device}"
        if call.dropout_p > 0.0:
            return "the op has no dropout"
        if call.q_len == 0 or call.kv_len == 0:
            return "zero-length T or S (chunked and reference handle it)"
        if q.shape[-1] != call.v.shape[-1]:
            return f"needs D == Dv, got D={q.shape[-1]}, Dv={call.v.shape[-1]}"
        if call.attn_mask is not None and call.attn_mask.requires_grad:
            return "a float mask that requires grad needs its T x S gradient"
        return float_mask_reason(call)

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        q, k, v = (_dense_last_dim(x) for x in (call.q, call.k, call.v))
        fused = masks.for_fused_kernel(call.attn_mask, call.causal, call.q_len, call.kv_len, call.scale, q.dtype,
                                       q.device)
        mask = None if fused.mask is None else masks.to_additive(fused.mask, q.dtype)  # the op takes float masks
        out, lse = _op()(q, k, v, 0.0, fused.is_causal, attn_mask=mask, scale=call.scale)  # (B, H, T, Dv), (B, H, T)
        if fused.has_key is not None:
            # the op's lse for a row with no key is that of the opened row; ours is -inf
            lse = lse.masked_fill(~fused.has_key[..., 0], float("-inf"))
        return AttentionOutput(masks.zero_empty_rows(out, fused.has_key), lse if need_lse else None)
