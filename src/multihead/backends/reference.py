"""attention_ref: the naive formula, written to be obviously right.

softmax(Q Kᵀ · scale + mask) V, one matrix at a time, with a safe softmax: a
query row with no key to attend gives probabilities 0 (so output 0 and
gradient 0), never NaN. It is THE source of truth: every other path is tested
against it, in float64 on the CPU (`upcast=True` on float64 inputs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import masks


class ReferenceOutput(NamedTuple):
    out: Tensor  # (B, H, T, Dv)
    probs: Tensor  # (B, H, T, S), softmax probabilities before dropout


def repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """Grouped-query: (B, G, S, D) -> (B, H, S, D), query head h reads kv head h // (H // G)."""
    groups = x.shape[1]
    if groups == num_heads:
        return x
    return x.repeat_interleave(num_heads // groups, dim=1)  # (B, G, S, D) -> (B, H, S, D)


def safe_softmax(scores: Tensor) -> Tensor:
    """softmax over the last dim; a row that is all -inf gives zeros, not NaN."""
    row_max = scores.amax(dim=-1, keepdim=True)  # (..., 1)
    # An empty row has max -inf; subtracting 0 instead keeps exp(-inf) = 0 and no NaN.
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)  # (..., 1)
    return exp / torch.where(total > 0, total, torch.ones_like(total))


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
    upcast: bool = True,
) -> ReferenceOutput:
    """Naive attention. q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> (out, probs).

    attn_mask: bool (True = may attend) or float (added to the scores),
        broadcastable to (B, H, T, S).
    causal: bottom-right aligned (see `multihead.masks`).
    scale: multiplies the scores; default 1 / sqrt(D).
    dropout_p: probability of zeroing a weight (kept ones are scaled by 1 / (1 - p)).
    dropout_mask: the keep mask (bool, broadcastable to (B, H, T, S)) to use
        instead of drawing one; lets tests replay another backend's dropout.
    upcast: compute in float32 at least (float64 stays float64), cast back at the end.

    probs are the softmax probabilities before dropout, in the compute dtype.
    """
    out_dtype = q.dtype
    if upcast:
        compute = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    H = q.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    k = repeat_kv(k, H)  # (B, G, S, D) -> (B, H, S, D)
    v = repeat_kv(v, H)  # (B, G, S, Dv) -> (B, H, S, Dv)

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, S)
    mask = masks.materialize(attn_mask, causal, T, S, scores.dtype, scores.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.to(scores.dtype)

    if S == 0:  # nothing to attend: an empty (B, H, T, 0) weight matrix, output 0
        probs = scores
    else:
        probs = safe_softmax(scores)  # (B, H, T, S)

    weights = probs
    if dropout_mask is not None:
        weights = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        keep = torch.rand(probs.shape, device=probs.device) >= dropout_p
        weights = probs * keep / (1.0 - dropout_p)

    out = torch.matmul(weights, v)  # (B, H, T, S) @ (B, H, S, Dv) -> (B, H, T, Dv)
    return ReferenceOutput(out.to(out_dtype), probs)


class ReferenceBackend:
    """The registry's face of attention_ref: runs every call, slowest of all."""

    name = "reference"
    priority = 0
    summary = "naive softmax(QKᵀ)V, holds the T x S matrix; the source of truth"

    def supports(self, q, k, v, *, attn_mask, causal, scale, dropout_p) -> str | None:
        return None

    def forward(self, q, k, v, *, attn_mask, causal, scale, dropout_p) -> Tensor:
        return attention_ref(
            q, k, v, attn_mask=attn_mask, causal=causal, scale=scale,
            dropout_p=dropout_p, upcast=q.dtype in (torch.float16, torch.bfloat16),
        ).out
