"""attention_ref: the naive formula, written to be obviously right.

softmax(Q Kᵀ · scale + mask) V, one matrix at a time, with the safe softmax
of `multihead.masks`: a query row with no key to attend gives probabilities 0
(so output 0 and gradient 0), never NaN. It is THE source of truth: every
other path is tested against it, in float64 on the CPU (`upcast=True` on
float64 inputs).

Grouped-query attention is a broadcast, not a copy: q is viewed as
(B, G, R, T, D), R = H / G query heads per kv head, against k as
(B, G, 1, S, D), so query head h = g·R + r reads kv head g.

The same function, run in the inputs' own precision and in place, is the
eager path that returns every head's weights (`multihead.ops.run` with need_weights).

`reference_backward` is the backward from a given out and logsumexp (the
optional method of the backend contract), written out as naively: the whole
T x S matrix, kv heads repeated per query head and summed back.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..core import masks
from ..core.call import AttentionCall, AttentionOutput, Gradients, check_backward
from ..core.variants import Variants, full_tile, modify, with_sinks


class ReferenceOutput(NamedTuple):
    out: Tensor  # (B, H, T, Dv), in q's dtype
    probs: Tensor  # (B, H, T, S), softmax probabilities before dropout, in the compute dtype


class _Naive(NamedTuple):
    out: Tensor  # (B, H, T, Dv), in q's dtype
    probs: Tensor  # (B, H, T, S), in the compute dtype
    lse: Tensor | None  # (B, H, T) logsumexp of the masked scores (-inf for a row with no key); None unless asked


def repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """Grouped-query: (B, G, S, D) -> (B, H, S, D), query head h reads kv head h // (H // G)."""
    groups = x.shape[1]
    if groups == num_heads:
        return x
    return x.repeat_interleave(num_heads // groups, dim=1)  # (B, G, S, D) -> (B, H, S, D)


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale · q kᵀ per head: (B, H, T, D), (B, G, S, D) -> (B, H, T, S), k never copied per head."""
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    q5 = q.reshape(B, G, H // G, T, D) * scale  # (B, H, T, D) -> (B, G, R, T, D)
    scores = q5 @ k.unsqueeze(2).transpose(-2, -1)  # (B, G, R, T, D) @ (B, G, 1, D, S) -> (B, G, R, T, S)
    return scores.view(B, H, T, S)  # (B, G, R, T, S) -> (B, H, T, S)


def _weighted_values(weights: Tensor, v: Tensor) -> Tensor:
    """weights (B, H, T, S) @ v (B, G, S, Dv) -> (B, H, T, Dv), v never copied per head."""
    B, H, T, S = weights.shape
    G = v.shape[1]
    weights5 = weights.view(B, G, H // G, T, S)  # (B, H, T, S) -> (B, G, R, T, S)
    return (weights5 @ v.unsqueeze(2)).view(B, H, T, v.shape[-1])  # (B, G, R, T, Dv) -> (B, H, T, Dv)


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
    in_place: bool = False,
    variants: Variants | None = None,
) -> ReferenceOutput:
    """Naive attention. q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> (out, probs).

    attn_mask: bool (True = may attend) or float (added to the scores),
        broadcastable to (B, H, T, S).
    causal: bottom-right aligned (see `multihead.masks`).
    scale: multiplies the scores; default 1 / sqrt(D).
    dropout_p: probability of zeroing a weight (kept ones are scaled by 1 / (1 - p)).
    dropout_mask: the keep mask (bool, broadcastable to (B, H, T, S)) to use
        instead of drawing one; lets tests and compat replay a given draw.
    upcast: compute in float32 at least (float64 stays float64), cast back at the end.
    in_place: scores, then probabilities, in one T x S buffer; only where
        nothing needs a gradient (autograd cannot go back through it).
    variants: window, softcap, ALiBi, sinks, documents, score_mod, checked
        (`multihead.core.variants.check_variants`); with sinks, probs are
        those of the real keys (rows sum to less than 1).

    The arguments are used as given (`multihead.core.call.make_call` checks them
    for the public entry points).
    """
    out, probs, _ = _naive(q, k, v, attn_mask, causal, scale, dropout_p, dropout_mask, upcast, in_place,
                           need_lse=False, variants=variants)
    return ReferenceOutput(out, probs)


def _naive(q, k, v, attn_mask, causal, scale, dropout_p, dropout_mask, upcast, in_place, need_lse,
           variants: Variants | None = None) -> _Naive:
    """attention_ref's formula, with the logsumexp of the masked scores when need_lse."""
    out_dtype = q.dtype
    if upcast:
        compute = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    T, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0

    scores = _scores(q, k, scale)  # (B, H, T, S), a fresh buffer
    if variants is not None:
        scores = modify(scores, variants, full_tile(T, S, scores.device), T, S)  # (B, H, T, S)
    scores = masks.apply(scores, attn_mask, in_place=True)
    if causal:
        scores = masks.apply(scores, masks.causal_mask(T, S, scores.device), in_place=True)
    if variants is not None and variants.sinks is not None:
        return _with_sinks(scores, v, variants.sinks, dropout_p, dropout_mask, out_dtype, need_lse)
    lse = torch.logsumexp(scores, dim=-1) if need_lse else None  # (B, H, T), -inf for a row with no key
    masked = attn_mask is not None or (variants is not None and variants.masks_keys())
    empty_possible = masks.rows_can_be_empty(masked, causal, T, S)
    probs = masks.softmax(scores, may_have_empty_rows=empty_possible, in_place=in_place)  # (B, H, T, S)
    return _attend(probs, v, dropout_p, dropout_mask, out_dtype, lse)


def _with_sinks(scores, v, sinks, dropout_p, dropout_mask, out_dtype, need_lse) -> _Naive:
    """The softmax over the keys and one sink logit per head; the sink's probability attends to nothing."""
    B, H, T, S = scores.shape
    sink = sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)  # (H,) -> (B, H, T, 1)
    # a sink of -inf on a row with no key leaves nothing in the denominator: that row's probabilities are 0
    logits = torch.cat([scores, sink], dim=-1)  # (B, H, T, S + 1)
    probs = masks.softmax(logits, may_have_empty_rows=True)[..., :S]  # (B, H, T, S + 1) -> (B, H, T, S)
    lse = with_sinks(torch.logsumexp(scores, dim=-1), sinks) if need_lse else None  # (B, H, T)
    return _attend(probs, v, dropout_p, dropout_mask, out_dtype, lse)


def _attend(probs, v, dropout_p, dropout_mask, out_dtype, lse) -> _Naive:
    """Dropout on the probabilities (B, H, T, S), then their weighted sum of the values."""

    weights = probs
    if dropout_mask is not None:
        weights = masks.drop(probs, dropout_mask, dropout_p)
    elif dropout_p > 0.0:
        weights = masks.drop(probs, masks.keep_mask(probs.shape, dropout_p, device=probs.device), dropout_p)
    out = _weighted_values(weights, v)  # (B, H, T, Dv)
    return _Naive(out.to(out_dtype), probs, lse)


def reference_call(call: AttentionCall, *, need_lse: bool = False, dropout_mask: Tensor | None = None):
    """attention_ref on a checked call, in place where nothing needs a gradient: (out, probs, lse or None)."""
    return _naive(call.q, call.k, call.v, call.attn_mask, call.causal, call.scale, call.dropout_p,
                  dropout_mask, upcast=True, in_place=not call.needs_grad(), need_lse=need_lse,
                  variants=call.variants)


def _sum_groups(x: Tensor, groups: int) -> Tensor:
    """(B, H, S, ·) -> (B, G, S, ·): the R query heads that read one kv head add up their gradients."""
    B, H = x.shape[0], x.shape[1]
    return x.reshape(B, groups, H // groups, *x.shape[2:]).sum(dim=2)  # (B, G, R, S, ·) -> (B, G, S, ·)


def _scores_of(call: AttentionCall, q: Tensor, k: Tensor) -> Tensor:
    """The call's scores before its masks: scale·q·kᵀ with the variants' softcap, ALiBi and score_mod."""
    T, S = call.q_len, call.kv_len
    scores = (q * call.scale) @ k.transpose(-2, -1)  # (B, H, T, D) @ (B, H, D, S) -> (B, H, T, S)
    if call.variants is not None:
        scores = modify(scores, call.variants, full_tile(T, S, scores.device), T, S)  # (B, H, T, S)
    return scores


def _probs_from_lse(call: AttentionCall, scores: Tensor, lse: Tensor) -> Tensor:
    """P = exp(masked scores - lse): (B, H, T, S); 0 where masked, and in every row whose lse is -inf."""
    T, S = call.q_len, call.kv_len
    scores = masks.apply(scores.detach().clone(), call.attn_mask, in_place=True)
    if call.causal:
        scores = masks.apply(scores, masks.causal_mask(T, S, scores.device), in_place=True)
    lse = lse.unsqueeze(-1)  # (B, H, T) -> (B, H, T, 1)
    has_key = lse != float("-inf")  # a row with no key: exp(s - lse) would be exp(+inf) or NaN there
    return torch.where(has_key, (scores - lse).exp(), torch.zeros((), dtype=scores.dtype, device=scores.device))


def reference_backward(call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor) -> Gradients:
    """dq, dk, dv of the attention that out and lse (B, H, T) describe, restricted to this call's keys.

    The formula, one matrix at a time, in float32 at least (float64 stays float64):
    P = exp(s + mask - lse), s = the variants' modification of scale·q·kᵀ, dV = Pᵀ dO, dP = dO Vᵀ,
    delta = rowsum(dO ∘ out), dS = P ∘ (dP - delta), then dQ, dK from dS through s
    (dQ = scale·dS K, dK = scale·dSᵀ Q without variants; autograd through softcap, ALiBi and score_mod
    with them). The lse is the full denominator's (sinks included); the gradients of the sinks and of
    what a score_mod captures are not part of the result.
    """
    check_backward(call, grad_out, out, lse)
    compute = torch.promote_types(call.q.dtype, torch.float32)
    H, G = call.heads, call.kv_heads
    with torch.no_grad():
        q = call.q.to(compute).detach().requires_grad_(call.variants is not None)  # (B, H, T, D)
        k = repeat_kv(call.k.to(compute), H).detach().requires_grad_(call.variants is not None)  # (B, H, S, D)
        v = repeat_kv(call.v.to(compute), H)  # (B, G, S, Dv) -> (B, H, S, Dv)
        grad_out, out = grad_out.to(compute), out.to(compute)  # (B, H, T, Dv)
        with torch.enable_grad():
            scores = _scores_of(call, q, k)  # (B, H, T, S)
        probs = _probs_from_lse(call, scores, lse.to(compute))  # (B, H, T, S)
        dv = probs.transpose(-2, -1) @ grad_out  # (B, H, S, T) @ (B, H, T, Dv) -> (B, H, S, Dv)
        grad_probs = grad_out @ v.transpose(-2, -1)  # (B, H, T, Dv) @ (B, H, Dv, S) -> (B, H, T, S)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, H, T, Dv) -> (B, H, T, 1)
        grad_scores = probs * (grad_probs - delta)  # (B, H, T, S)
        if call.variants is None:
            dq = (grad_scores @ k) * call.scale  # (B, H, T, S) @ (B, H, S, D) -> (B, H, T, D)
            dk = (grad_scores.transpose(-2, -1) @ q) * call.scale  # (B, H, S, T) @ (B, H, T, D) -> (B, H, S, D)
        else:
            dq, dk = torch.autograd.grad(scores, (q, k), grad_scores)
        return Gradients(dq.to(call.q.dtype), _sum_groups(dk, G).to(call.k.dtype), _sum_groups(dv, G).to(call.v.dtype))


class ReferenceBackend:
    """The registry's face of attention_ref: runs every call, slowest of all."""

    name = "reference"
    priority = 0
    summary = "naive softmax(QKᵀ)V, holds the T x S matrix; the source of truth"

    def supports(self, call: AttentionCall, *, need_lse: bool = False) -> str | None:
        return None

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        result = reference_call(call, need_lse=need_lse)
        lse = None if result.lse is None else result.lse.to(torch.promote_types(call.q.dtype, torch.float32))
        return AttentionOutput(result.out, lse)

    def backward(self, call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor) -> Gradients:
        return reference_backward(call, grad_out, out, lse)
