"""The public doors: check the arguments once, build the typed call, enter `run`.

    out = attention(q, k, v, attn_mask=None, causal=False, scale=None,
                    dropout_p=0.0, backend="auto")
    out, lse = attention(q, k, v, causal=True, return_lse=True)   # AttentionOutput(out, lse)
    print(which_backend(q, k, v, causal=True))                      # which backend runs, and why not the others

q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv).
H must be a multiple of G (grouped-query attention; G == H is plain
multi-head, G == 1 multi-query). Masks follow `multihead.masks`: a bool mask
is True where a query may attend, a float mask is added to the scores; both
are (T, S) or broadcastable (B|1, H|1, T|1, S). `causal` is bottom-right
aligned:

    causal=True, T=3, S=5 (i' = i + S - T)     keys j: 0 1 2 3 4
        query 0 sees j <= 2                            x x x . .
        query 1 sees j <= 3                            x x x x .
        query 2 sees j <= 4                            x x x x x

Every check happens in `multihead.core.call.make_call`, once.
"""

from __future__ import annotations

from torch import Tensor

from .. import backends
from ..core.call import AttentionOutput, make_call
from ..core.checks import flag
from ..core.variants import ScoreMod
from .run import run


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score_mod: ScoreMod | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | AttentionOutput:
    """Scaled dot-product attention, softmax(q kᵀ · scale + mask) v, per head.

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv), or
    with return_lse=True AttentionOutput(out, lse): lse (B, H, T) is
    log sum_j exp(score_j) over the keys each query may attend (the masked
    scores, before dropout), float32 (float64 for float64 inputs), -inf for a
    row with no key; it comes from the first backend that gives one. out is
    differentiable, lse is not. A query with no key to attend gets output 0
    (and gradient 0). `which_backend` with the same arguments says which
    backend runs.

    The attention family (`multihead.core.variants`, in this order):
    softcap=c gives c · tanh(s / c); alibi_slopes (H,) or (B, H) adds
    -slope · |i' - j|; score_mod(score, b, h, q_idx, kv_idx) -> score for
    anything else; window=(left, right) keeps keys i' - left <= j <= i' + right
    (None: no limit on that side; i' = i + S - T); documents, (B, T) ids or
    (query ids (B, T), key ids (B, S)), keeps keys of the query's own
    document; sinks (H,) adds one logit per head to the softmax's denominator
    (the lse includes it). Gradients flow to the sinks, the slopes and the
    tensors a score_mod captures.
    """
    backends.check_name(backend)
    if return_lse is not False and return_lse is not True:
        flag("return_lse", return_lse)
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p, window=window,
                     softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, documents=documents,
                     score_mod=score_mod)
    result = run(call, backend, need_lse=return_lse)
    return AttentionOutput(result.out, result.lse) if return_lse else result.out


def which_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    documents: Tensor | tuple[Tensor, Tensor] | None = None,
    score_mod: ScoreMod | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> backends.Dispatch:
    """Which backend `attention` with the same arguments would run, and why each other one would not.

    print(which_backend(q, k, v, causal=True)) gives one line per backend.
    """
    backends.check_name(backend)
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p, window=window,
                     softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, documents=documents,
                     score_mod=score_mod)
    return backends.survey(call, backend, need_lse=flag("return_lse", return_lse))


__all__ = ["attention", "which_backend"]
