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
numbers, so such inputs are copied first). A window, documents and ALiBi
reach it as one mask (`variant_mask`); sinks join its lse after it
(`_SinksAfter`), which is exact.

`backward`, the gradients from a given out and logsumexp (the optional method
of the backend contract, for a ring's block of keys), calls the op's backward,
`aten._scaled_dot_product_flash_attention_for_cpu_backward`, which recomputes
P = exp(scale·q·kᵀ + mask - lse) from the lse it is given. Two things keep
that exact with a foreign lse: the rows with no key in this block are NOT
opened (the forward's trick would add this block's keys to a row whose lse
counts other blocks'), so their masked scores give exp(-inf - lse) = 0; and a
row with no key anywhere (lse -inf) gets lse +inf, so exp(score - lse) is 0
there instead of exp(-inf + inf) = NaN. Bottom-right causal with T != S goes
as an explicit mask, as in the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import masks
from ..core.call import AttentionCall, AttentionOutput, Gradients, check_backward
from .sdpa import float_mask_reason
from ..core.variants import sink_gradient, sink_in
from .variant_mask import as_mask, mask_reason

def _op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _backward_op():
    """The forward op's derivative: registered with it, so where `supports` found the forward it exists."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


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
        if call.variants is not None:
            slopes = call.variants.alibi_slopes
            if slopes is not None and slopes.requires_grad:
                return "ALiBi slopes that require grad: the op gives no gradient to its mask"
            call = _without_sinks(call)  # the sinks join after the op (`_SinksAfter`)
            if call.variants is not None:
                return mask_reason(call)
        return float_mask_reason(call)

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        sinks = None if call.variants is None else call.variants.sinks
        if sinks is not None:
            out, lse = _SinksAfter.apply(call.q, call.k, call.v, sinks, _without_sinks(call), self)
            return AttentionOutput(out, lse if need_lse else None)
        return self._forward(call, need_lse=need_lse)

    def _forward(self, call: AttentionCall, *, need_lse: bool) -> AttentionOutput:
        """The op on a call without sinks: out (B, H, T, Dv), and lse (B, H, T) when asked."""
        if call.variants is not None:
            call = as_mask(call)  # a window, documents, ALiBi: one mask (mask_reason allowed it)
        q, k, v = (_dense_last_dim(x) for x in (call.q, call.k, call.v))
        fused = masks.for_fused_kernel(call.attn_mask, call.causal, call.q_len, call.kv_len, call.scale, q.dtype,
                                       q.device)
        mask = None if fused.mask is None else masks.to_additive(fused.mask, q.dtype)  # the op takes float masks
        out, lse = _op()(q, k, v, 0.0, fused.is_causal, attn_mask=mask, scale=call.scale)  # (B, H, T, Dv), (B, H, T)
        if fused.has_key is not None:
            # the op's lse for a row with no key is that of the opened row; ours is -inf
            lse = lse.masked_fill(~fused.has_key[..., 0], float("-inf"))
        return AttentionOutput(masks.zero_empty_rows(out, fused.has_key), lse if need_lse else None)

    def backward(self, call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor) -> Gradients:
        """The op's backward from a given out and lse (B, H, T); see the module's docstring for the two fixes."""
        check_backward(call, grad_out, out, lse)
        if call.variants is not None:  # the sinks are in the lse given; the rest is a mask
            call = as_mask(_without_sinks(call))
        q, k, v = (_dense_last_dim(x) for x in (call.q, call.k, call.v))
        # open_rows=False: a row with no key in this block stays all -inf, so its P is exp(-inf - lse) = 0
        fused = masks.for_fused_kernel(call.attn_mask, call.causal, call.q_len, call.kv_len, call.scale, q.dtype,
                                       q.device, open_rows=False)
        mask = None if fused.mask is None else masks.to_additive(fused.mask, q.dtype)  # the op takes float masks
        lse = lse.to(torch.promote_types(q.dtype, torch.float32))  # the op reads it in its accumulation dtype
        lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse).contiguous()  # (B, H, T)
        grad_out = _dense_last_dim(grad_out.to(q.dtype))  # (B, H, T, Dv)
        out = _dense_last_dim(out.to(q.dtype))  # (B, H, T, Dv)
        with torch.no_grad():
            dq, dk, dv = _backward_op()(grad_out, q, k, v, out, lse, 0.0, fused.is_causal, attn_mask=mask,
                                        scale=call.scale)
        return Gradients(dq, dk, dv)


def _without_sinks(call: AttentionCall) -> AttentionCall:
    """The call with its sinks taken out of the variants (None when nothing else is left)."""
    variants = call.variants._replace(sinks=None)
    plain = all(x is None for x in (variants.window, variants.softcap, variants.alibi_slopes,
                                    variants.q_documents, variants.score_mod))
    return call._replace(variants=None if plain and variants.positions is None else variants)


class _SinksAfter(torch.autograd.Function):
    """The sinks on the op's result: its out and lse are those of the real keys, and each head's sink joins
    the denominator after it, exactly:

        lse' = log(exp(lse) + exp(sink_h)),   out' = out · exp(lse - lse')

    The backward is the op's from the given out' and lse' (P = exp(s - lse'), the sink's share included in
    lse'), and the sinks' own gradient, d sink_h = -sum over rows of exp(sink_h - lse') · rowsum(dO ∘ out').
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, call, backend):
        out, total = sink_in(*backend._forward(call, need_lse=True), sinks)  # (B, H, T, Dv), (B, H, T)
        ctx.save_for_backward(out, total, sinks)
        ctx.call, ctx.backend = call, backend
        ctx.mark_non_differentiable(total)
        return out, total

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        out, total, sinks = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(ctx.call, grad_out, out, total)
        return dq, dk, dv, sink_gradient(sinks, total, grad_out, out), None, None
