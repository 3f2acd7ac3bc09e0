"""The functional API: check the arguments once, build the typed call, dispatch through the registry.

    out = attention(q, k, v, attn_mask=None, causal=False, scale=None,
                    dropout_p=0.0, backend="auto")
    out, lse = attention_with_lse(q, k, v, ...)        # the logsumexp too
    print(explain_dispatch(q, k, v, ...))              # which backend runs, and why not the others

q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv).
H must be a multiple of G (grouped-query attention; G == H is plain
multi-head, G == 1 multi-query). Masks follow `multihead.masks`: a bool mask
is True where a query may attend, a float mask is added to the scores; both
are (T, S) or broadcastable (B|1, H|1, T|1, S). `causal` is bottom-right
aligned. Every check happens in `multihead.call.make_call`, once, so
backends receive clean input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends
from .backends.chunked import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, ChunkedBackend
from .backends.reference import reference_call
from ._checks import flag
from .call import AttentionCall, AttentionOutput, make_call


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention, softmax(q kᵀ · scale + mask) v, per head.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> (B, H, T, Dv).
    A query with no key to attend gets output 0 (and gradient 0).
    `explain_dispatch` with the same arguments says which backend runs.
    """
    backends.check_name(backend)
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    return backends.dispatch(call, backend).forward(call).out


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> AttentionOutput:
    """attention(), with the logsumexp of every query row, from the first backend that gives one.

    -> AttentionOutput(out (B, H, T, Dv), lse (B, H, T)). lse[b, h, t] =
    log sum_j exp(score_j) over the keys the query may attend (the masked
    scores, before dropout), float32 (float64 for float64 inputs), -inf for a
    row with no key. With it any weight is exp(score - lse)
    (`multihead.weights.attention_weights`), and partial results over key
    blocks merge exactly. out is differentiable; lse is not.
    """
    backends.check_name(backend)
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    return backends.dispatch(call, backend, need_lse=True).forward(call, need_lse=True)


def explain_dispatch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    need_lse: bool = False,
) -> backends.Dispatch:
    """Which backend `attention` (need_lse=False) or `attention_with_lse` (need_lse=True) would run, and why.

    print(explain_dispatch(q, k, v, causal=True)) gives one line per backend.
    """
    backends.check_name(backend)
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    return backends.explain(call, backend, need_lse=flag("need_lse", need_lse))


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> AttentionOutput:
    """The chunked backend with chosen tile sizes: (out (B, H, T, Dv), lse (B, H, T)).

    It walks query blocks of block_q rows against key tiles of block_k keys;
    no more than a (B, H, block_q, block_k) block of scores is alive at once.
    """
    backend = ChunkedBackend(block_q=block_q, block_k=block_k)
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    reason = backend.supports(call, need_lse=True)
    if reason is not None:
        raise ValueError(f"chunked_attention cannot run this call: {reason}")
    return backend.forward(call, need_lse=True)


def _check_dropout_mask(dropout_mask, call: AttentionCall) -> Tensor | None:
    """A keep mask: bool, True = keep, broadcastable to (B, H, T, S), given with a dropout_p > 0."""
    if dropout_mask is None:
        return None
    if not isinstance(dropout_mask, Tensor) or dropout_mask.dtype != torch.bool:
        got = dropout_mask.dtype if isinstance(dropout_mask, Tensor) else type(dropout_mask).__name__
        raise TypeError(f"dropout_mask must be a bool tensor (True = keep), got {got}")
    if call.dropout_p == 0.0:
        raise ValueError("dropout_mask was given with dropout_p=0.0; pass the probability it was drawn with")
    scores = (call.batch, call.heads, call.q_len, call.kv_len)
    if dropout_mask.dim() > 4 or any(
            size not in (full, 1) for size, full in zip(dropout_mask.shape[::-1], scores[::-1])):
        raise ValueError(f"dropout_mask of shape {tuple(dropout_mask.shape)} does not broadcast to "
                         f"(B, H, T, S) = {scores}")
    if dropout_mask.device != call.q.device:
        raise ValueError(f"dropout_mask is on {dropout_mask.device} but q is on {call.q.device}")
    return dropout_mask


class AttentionWithWeights(NamedTuple):
    out: Tensor  # (B, H, T, Dv)
    weights: Tensor  # (B, H, T, S), the softmax probabilities (before dropout), in q's dtype


def attention_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
) -> AttentionWithWeights:
    """The eager path: attention that also returns every head's weights (B, H, T, S), differentiable.

    This is `attention_ref` run in the inputs' precision (float16/bfloat16
    compute in float32), in place on one T x S buffer where nothing needs a
    gradient. The weights are the softmax probabilities before dropout;
    dropout_mask (bool, broadcastable to (B, H, T, S), True = keep) replays a
    given draw instead of drawing one. Where the weights need no gradient,
    `multihead.weights.attention_and_weights` keeps a fused kernel for the
    output instead.
    """
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    result = reference_call(call, dropout_mask=_check_dropout_mask(dropout_mask, call))
    return AttentionWithWeights(result.out, result.probs.to(q.dtype))


__all__ = [
    "AttentionWithWeights",
    "attention",
    "attention_with_lse",
    "attention_with_weights",
    "chunked_attention",
    "explain_dispatch",
]
