"""attention(): argument checks, mask building, backend dispatch.

    out = attention(q, k, v, attn_mask=None, causal=False, scale=None,
                    dropout_p=0.0, backend="auto")

q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv).
H must be a multiple of G (grouped-query attention; G == H is plain
multi-head, G == 1 multi-query). Masks follow `multihead.masks`: a bool mask
is True where a query may attend, a float mask is added to the scores; both
are (T, S) or broadcastable (B|1, H|1, T|1, S). `causal` is bottom-right
aligned. Every check happens here, once, so backends receive clean input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, masks
from ._checks import mask_tensor, positive_int, probability
from .backends.chunked import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, ChunkedOutput, chunked_forward
from .backends.reference import attention_ref


@dataclass(frozen=True)
class _Call:
    """A checked call: what every backend receives besides q, k, v."""

    attn_mask: Tensor | None  # None, bool, or q's float dtype; 4 dims (b, h, t, S)
    causal: bool  # bottom-right aligned
    scale: float  # multiplies q·k
    dropout_p: float  # in [0, 1)

    def kwargs(self) -> dict:
        return dict(attn_mask=self.attn_mask, causal=self.causal, scale=self.scale,
                    dropout_p=self.dropout_p)


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_call(q, k, v, attn_mask, causal, scale, dropout_p) -> _Call:
    for name, x, dims in (("q", q, "(B, H, T, D)"), ("k", k, "(B, G, S, D)"), ("v", v, "(B, G, S, Dv)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} has {x.dim()} dims, {dims} expected, got {_shape(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; cast them to one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move them to one device")
    B, H, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (dim 0 is B)")
    G, S = k.shape[1], k.shape[2]
    if v.shape[1] != G or v.shape[2] != S:
        raise ValueError(f"k (B, G, S, D) and v (B, G, S, Dv) must agree on G and S, got k {_shape(k)}, v {_shape(v)}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same head dim D, got q {_shape(q)}, k {_shape(k)}")
    if G == 0 or H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads G={G} (q {_shape(q)}, k {_shape(k)})")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    probability("dropout_p", dropout_p)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (= 1/sqrt(D)), got {scale!r}")

    mask = check_mask(attn_mask, q, B, H, T, S)
    return _Call(mask, causal, float(scale), float(dropout_p))


def check_mask(attn_mask, q: Tensor, B: int, H: int, T: int, S: int) -> Tensor | None:
    """Check a user's attn_mask against the scores (B, H, T, S); return it as 4 dims in q's float dtype."""
    if attn_mask is None:
        return None
    mask_tensor("attn_mask", attn_mask, q.device, "True = may attend")
    if attn_mask.dim() == 2:
        attn_mask = attn_mask[None, None]  # (T, S) -> (1, 1, T, S)
    elif attn_mask.dim() != 4:
        raise ValueError(
            f"attn_mask has {attn_mask.dim()} dims, (T, S) or (B|1, H|1, T|1, S) expected, "
            f"got {_shape(attn_mask)}; a per-batch (B, T, S) mask is mask[:, None]"
        )
    expected = (B, H, T, S)
    for size, full in zip(attn_mask.shape, expected):
        if size != full and size != 1:
            raise ValueError(
                f"attn_mask of shape {_shape(attn_mask)} does not broadcast to (B, H, T, S) = {expected}"
            )
    if attn_mask.shape[-1] != S:
        raise ValueError(f"attn_mask's last dim must be S={S} (one entry per key), got {_shape(attn_mask)}")
    if attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    return attn_mask


def _check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or one of {backends.names()}), got {type(backend).__name__}")
    return backend


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
    call = _check_call(q, k, v, attn_mask, causal, scale, dropout_p)
    chosen = backends.dispatch(_check_backend(backend), q, k, v, **call.kwargs()).chosen
    return backends.get(chosen).forward(q, k, v, **call.kwargs())


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
) -> backends.Dispatch:
    """Which backend `attention` would run for these arguments, and why not each other one.

    print(explain_dispatch(q, k, v, causal=True)) gives one line per backend.
    """
    call = _check_call(q, k, v, attn_mask, causal, scale, dropout_p)
    return backends.dispatch(_check_backend(backend), q, k, v, **call.kwargs())


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
) -> ChunkedOutput:
    """The chunked backend, returning the logsumexp too: (out (B, H, T, Dv), lse (B, H, T)).

    It walks query blocks of block_q rows against key tiles of block_k keys;
    no more than a (B, H, block_q, block_k) block of scores is alive at once.

    lse[b, h, t] = log sum_s exp(scores[b, h, t, s]) over the keys the query may
    attend (-inf when it may attend none): with it, any weight is
    exp(score - lse) without a second softmax pass.
    """
    positive_int("block_q", block_q)
    positive_int("block_k", block_k)
    call = _check_call(q, k, v, attn_mask, causal, scale, dropout_p)
    reason = backends.get("chunked").supports(q, k, v, **call.kwargs())
    if reason is not None:
        raise ValueError(f"chunked_attention cannot run this call: {reason}")
    return chunked_forward(q, k, v, block_q=block_q, block_k=block_k, **call.kwargs())


class AttentionWithWeights(NamedTuple):
    out: Tensor  # (B, H, T, Dv)
    weights: Tensor  # (B, H, T, S), the softmax probabilities (before dropout)


def attention_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> AttentionWithWeights:
    """Attention that also returns every head's weights (B, H, T, S).

    The weights are the softmax probabilities before dropout, in q's dtype;
    the output is `attention`'s. This eager path holds the T x S matrix by
    nature, and works in place on it to hold only one: scores, then
    probabilities, in the same buffer (torch's fused softmax). It is tested
    against `attention_ref`, which it must equal.
    """
    call = _check_call(q, k, v, attn_mask, causal, scale, dropout_p)
    B, H, T, _ = q.shape
    G, S = k.shape[1], k.shape[2]
    if q.dtype in (torch.float16, torch.bfloat16) or T == 0 or S == 0:
        out, probs = attention_ref(q, k, v, upcast=True, **call.kwargs())
        return AttentionWithWeights(out, probs.to(q.dtype))

    # In place when nothing needs a gradient: one T x S buffer instead of three.
    tracked = [q, k, v] + ([call.attn_mask] if call.attn_mask is not None else [])
    in_place = not (torch.is_grad_enabled() and any(x.requires_grad for x in tracked))
    q5 = q.reshape(B, G, H // G, T, q.shape[-1]) * call.scale  # (B, H, T, D) -> (B, G, R, T, D)
    scores = q5 @ k.unsqueeze(2).transpose(-2, -1)  # (B, G, R, T, D) @ (B, G, 1, D, S) -> (B, G, R, T, S)
    scores = scores.view(B, H, T, S)  # (B, G, R, T, S) -> (B, H, T, S)
    mask = masks.materialize(call.attn_mask, call.causal, T, S, q.dtype, q.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, float("-inf")) if in_place else scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores.add_(mask) if in_place else scores + mask
    row_has_key = None
    if mask is not None:
        # a row with no key to attend is all -inf, and softmax would make it NaN (and its
        # gradient with it): give it scores 0 for the softmax and weights 0 after it
        row_has_key = masks.allowed(mask).any(dim=-1, keepdim=True)  # (b, h, T, 1)
        scores = scores.masked_fill_(~row_has_key, 0.0) if in_place else scores.masked_fill(~row_has_key, 0.0)
    probs = torch.softmax(scores, dim=-1, out=scores) if in_place else torch.softmax(scores, dim=-1)
    if row_has_key is not None:
        probs = probs.masked_fill_(~row_has_key, 0.0) if in_place else probs.masked_fill(~row_has_key, 0.0)

    weights = probs
    if call.dropout_p > 0.0:
        keep = torch.rand(probs.shape, device=probs.device) >= call.dropout_p
        weights = probs * keep / (1.0 - call.dropout_p)
    weights5 = weights.view(B, G, H // G, T, S)  # (B, H, T, S) -> (B, G, R, T, S)
    out = (weights5 @ v.unsqueeze(2)).view(B, H, T, v.shape[-1])  # (B, G, R, T, Dv) -> (B, H, T, Dv)
    return AttentionWithWeights(out, probs)
