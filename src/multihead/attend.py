"""attend: the attention step that every attention module shares.

    attended = attend(q, k, v, attn_mask=mask, causal=False, scale=None,
                      dropout_p=0.0, backend="auto", need_weights=False)
    attended.out      # (B, H, T, Dv)
    attended.weights  # (B, H, T, S) when need_weights, else None

`MultiHeadAttention`, `MultiHeadLatentAttention` and `compat.MultiheadAttention`
project, rotate and cache in their own way; from there on they call this, so
the backend choice and the weights policy are the same for all of them:

- need_weights=False: `multihead.attention` on the chosen backend (`backend=`).
- need_weights=True with backend="auto" (or "reference"), or where the
  weights must carry a gradient (training): the eager path
  (`attention_with_weights`, the reference formula in the inputs'
  precision, in place where nothing needs a gradient). Every weight is
  asked for, so computing them is the whole cost, and one pass that keeps
  them does it fastest (BENCHMARKS.md); its weights are part of the graph.
- need_weights=True with a named backend, where nothing needs a gradient:
  the output from that backend with its logsumexp (`attention_with_lse`)
  and the weights read off it (`multihead.weights`), so a fused kernel
  still makes the output; a backend that gives no logsumexp is refused
  with its reason. (`multihead.weights.attention_and_weights` does the same
  for chosen heads and rows only, where the logsumexp pays off most.)
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import backends
from ._checks import flag
from .call import AttentionCall, make_call
from .functional import attention_with_weights
from .weights import attention_and_weights


class Attended(NamedTuple):
    out: Tensor  # (B, H, T, Dv)
    weights: Tensor | None  # (B, H, T, S) softmax probabilities before dropout, when need_weights


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    need_weights: bool = False,
) -> Attended:
    """q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> Attended(out, weights); see the module docstring."""
    flag("need_weights", need_weights)
    backends.check_name(backend)
    call = make_call(q, k, v, attn_mask=attn_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    return attend_call(call, backend=backend, need_weights=need_weights)


def attend_call(call: AttentionCall, *, backend: str = "auto", need_weights: bool = False) -> Attended:
    """attend() for a call already checked: by `make_call`, or built by a module from q, k, v it projected itself."""
    if not need_weights:
        return Attended(backends.dispatch(call, backend).forward(call).out, None)
    q, k, v = call.q, call.k, call.v
    arguments = dict(attn_mask=call.attn_mask, causal=call.causal, scale=call.scale, dropout_p=call.dropout_p)
    if backend in ("auto", "reference") or call.needs_grad():
        return Attended(*attention_with_weights(q, k, v, **arguments))
    on_demand = attention_and_weights(q, k, v, backend=backend, **arguments)
    return Attended(on_demand.out, on_demand.weights)
