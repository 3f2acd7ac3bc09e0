"""run: the one path from a checked call to a backend.

    call = make_call(q, k, v, ...)            # or built by a module from what it projected itself
    result = run(call, "auto", need_lse=False, need_weights=False)
    result.out       # (B, H, T, Dv)
    result.lse       # (B, H, T) when need_lse, else None
    result.weights   # (B, H, T, S) when need_weights, else None

Every caller that needs attention enters here with a call it checked once:
the public doors (`multihead.attention`, `which_backend`), the modules, the
decoders' decode step, the Hugging Face hook and the ring's local step.
Nothing below checks the arguments again.

The weights policy, the same for every module:

- need_weights with backend "auto" or "reference", or where the weights
  must carry a gradient (training): the eager pass, the reference formula in
  the inputs' precision, in place where nothing needs a gradient. Every
  weight is asked for, so computing them is the whole cost, and one pass that
  keeps them is the fastest exact way (BENCHMARKS.md); its weights are part
  of the graph.
- need_weights with a named backend, where nothing needs a gradient: the
  output from that backend (a fused kernel stays a fused kernel), and the
  weights from the one-pass formula of `multihead.ops.weights` (exact, no
  gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import backends
from ..backends.reference import reference_call
from ..core.call import AttentionCall
from .weights import weights_of


class Attended(NamedTuple):
    out: Tensor  # (B, H, T, Dv), in q's dtype
    lse: Tensor | None  # (B, H, T) float32 (float64 for float64 inputs), -inf for a row with no key; when asked
    weights: Tensor | None  # (B, H, T, S) softmax probabilities before dropout, in q's dtype; when asked


def choose(call: AttentionCall, backend: str = "auto", *, need_lse: bool = False,
           need_weights: bool = False) -> backends.Backend | None:
    """The backend `run` takes for this call, or None for the eager weights pass; raises as `run` would.

    A module with a cache asks this before it writes, so a refused call leaves the cache as it was.
    """
    if need_weights and (backend in ("auto", "reference") or call.needs_grad()):
        return None
    return backends.dispatch(call, backend, need_lse=need_lse)


def run(call: AttentionCall, backend: str = "auto", *, need_lse: bool = False,
        need_weights: bool = False) -> Attended:
    """Run a checked call on `backend` ("auto" or a registered name); see the module docstring."""
    chosen = choose(call, backend, need_lse=need_lse, need_weights=need_weights)
    if chosen is None:
        eager = reference_call(call, need_lse=need_lse)
        lse = None if eager.lse is None else eager.lse.to(torch.promote_types(call.q.dtype, torch.float32))
        return Attended(eager.out, lse, eager.probs.to(call.q.dtype))
    out, lse = chosen.forward(call, need_lse=need_lse)
    weights = weights_of(call).to(call.q.dtype) if need_weights else None
    return Attended(out, lse, weights)


__all__ = ["Attended", "choose", "run"]
