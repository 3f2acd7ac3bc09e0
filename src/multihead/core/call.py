"""AttentionCall: one attention call, checked once and typed.

    call = make_call(q, k, v, attn_mask=None, causal=False, scale=None, dropout_p=0.0)
    backend.supports(call, need_lse=False)   # None, or why it cannot run the call
    backend.forward(call, need_lse=False)    # AttentionOutput(out, lse or None)
    backend.backward(call, grad_out, out, lse)   # Gradients(dq, dk, dv), where a backend has one

Every entry point that needs attention (`multihead.attention`, the modules,
the weights on demand) builds its call here, so every backend receives
arguments that are already consistent: q (B, H, T, D), k (B, G, S, D),
v (B, G, S, Dv) of one floating dtype on one device, H a multiple of G, the
mask 4-dimensional and broadcastable to (B, H, T, S), the scale a float
that stays finite in the compute dtype. Backends never check these again.

This module sits below the backends and imports none of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import masks
from .checks import flag, mask_tensor, probability
from .variants import Variants, check_variants


DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))  # what every backend computes in


class AttentionOutput(NamedTuple):
    """What a backend's forward returns, and `multihead.attention(..., return_lse=True)`."""

    out: Tensor  # (B, H, T, Dv), in q's dtype
    lse: Tensor | None  # (B, H, T) float32 (float64 for float64 inputs); -inf for a row with no key; None unless asked


class Gradients(NamedTuple):
    """What a backend's backward from a given logsumexp returns: the gradients of q, k and v."""

    dq: Tensor  # (B, H, T, D), in q's dtype
    dk: Tensor  # (B, G, S, D), in k's dtype
    dv: Tensor  # (B, G, S, Dv), in v's dtype


class AttentionCall(NamedTuple):
    """A checked call: everything a backend needs to compute softmax(q kᵀ · scale + mask) v.

    Immutable (a NamedTuple: built in a fraction of a microsecond, which
    matters at decode sizes where the whole call takes tens of them).
    """

    q: Tensor  # (B, H, T, D)
    k: Tensor  # (B, G, S, D)
    v: Tensor  # (B, G, S, Dv)
    attn_mask: Tensor | None  # None; bool (True = may attend) or floating (added to the scores, own dtype); (b, h, t, S)
    causal: bool  # bottom-right aligned: query i sees keys j <= i + S - T
    scale: float  # multiplies q·k; finite in the compute dtype
    dropout_p: float  # probability of dropping a weight, in [0, 1)
    variants: Variants | None = None  # window, softcap, ALiBi, sinks, documents, score_mod; None = plain

    @property
    def batch(self) -> int:  # B
        return self.q.shape[0]

    @property
    def heads(self) -> int:  # H
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:  # G
        return self.k.shape[1]

    @property
    def q_len(self) -> int:  # T
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:  # S
        return self.k.shape[2]

    def needs_grad(self) -> bool:
        """Whether autograd records this call (grad mode on and an input that requires grad).

        Under torch.compile a score_mod's captured tensors are out of sight (`Variants.captured`): with
        grad mode on, such a call is taken to need a gradient, so nothing runs in place beneath it.
        """
        extra = () if self.variants is None else self.variants.captured()
        if records_grad(self.q, self.k, self.v, self.attn_mask, *extra):
            return True
        return (self.variants is not None and self.variants.score_mod is not None and torch.is_grad_enabled()
                and torch.compiler.is_compiling())

    def may_have_empty_rows(self) -> bool:
        """Whether a query row can be left with no key, decided from shapes and flags alone."""
        masked = self.attn_mask is not None or (self.variants is not None and self.variants.masks_keys())
        return masks.rows_can_be_empty(masked, self.causal, self.q_len, self.kv_len)


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records work on these tensors: grad mode on and one of them requires grad."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_tensors(q, k, v) -> None:
    """q, k, v dense 4-dim tensors of one supported dtype on one device; the common case costs one expression."""
    if (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
            and q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.dtype in DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and k.device == q.device and v.device == q.device
            and not (q.is_nested or k.is_nested or v.is_nested)):
        return
    _explain_tensors(q, k, v)


def _explain_tensors(q, k, v) -> None:
    """Raise the error that names what is wrong with q, k or v (called once the quick check failed)."""
    for name, x, dims in (("q", q, "(B, H, T, D)"), ("k", k, "(B, G, S, D)"), ("v", v, "(B, G, S, Dv)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
        if x.is_nested:
            raise TypeError(f"{name} is a nested tensor; multihead takes dense {dims} tensors "
                            f"(pad the batch and pass a mask)")
        if x.dim() != 4:
            raise ValueError(f"{name} has {x.dim()} dims, {dims} expected, got {_shape(x)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; cast them to one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move them to one device")
    raise AssertionError("unreachable: the quick check failed but no rule did")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    """The shapes agree; returns (D, S)."""
    B, H, _, D = q.shape
    Bk, G, S, Dk = k.shape
    Bv, Gv, Sv, _ = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (dim 0 is B)")
    if Gv != G or Sv != S:
        raise ValueError(f"k (B, G, S, D) and v (B, G, S, Dv) must agree on G and S, "
                         f"got k {_shape(k)}, v {_shape(v)}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim D, got q {_shape(q)}, k {_shape(k)}")
    if G == 0 or H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads G={G} "
                         f"(q {_shape(q)}, k {_shape(k)})")
    return D, S


def check_scale(scale, head_dim: int, dtype: torch.dtype) -> float:
    """The scale as a float: 1/sqrt(D) for None; else a finite number that stays finite in the compute dtype.

    A scale beyond the compute dtype's range (1e300 for float32) is infinite
    there, so every score would be, and it is refused. A representable scale
    can still overflow scores (scale · q·k beyond the dtype's range gives
    inf, then NaN), as any overflow does. Zero and negative scales are
    computed like any other (a zero scale spreads each query evenly over the
    keys it may attend).
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0  # D > 0 once make_call has checked q
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (= 1/sqrt(D)), got {scale!r}")
    largest = torch.finfo(torch.promote_types(dtype, torch.float32)).max
    if abs(scale) > largest:
        raise ValueError(f"scale={scale!r} overflows the compute dtype (largest finite {largest:.3g}); "
                         f"every score would be infinite")
    return float(scale)


def check_mask(attn_mask, q: Tensor, S: int) -> Tensor | None:
    """A user's attn_mask checked against the scores (B, H, T, S) of q; returned with 4 dims.

    A float mask keeps its own dtype: each backend adds it to the scores in
    its compute dtype, so a large finite bias (-1e30) never becomes -inf by a
    cast to float16.
    """
    if attn_mask is None:
        return None
    mask_tensor("attn_mask", attn_mask, q.device, "True = may attend")
    B, H, T = q.shape[0], q.shape[1], q.shape[2]
    if attn_mask.dim() == 2:
        attn_mask = attn_mask[None, None]  # (T, S) -> (1, 1, T, S)
    elif attn_mask.dim() != 4:
        raise ValueError(
            f"attn_mask has {attn_mask.dim()} dims, (T, S) or (B|1, H|1, T|1, S) expected, "
            f"got {_shape(attn_mask)}; a per-batch (B, T, S) mask is mask[:, None]"
        )
    expected = (B, H, T, S)
    if any(size not in (full, 1) for size, full in zip(attn_mask.shape, expected)):
        raise ValueError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to (B, H, T, S) = {expected}")
    if attn_mask.shape[-1] != S:
        raise ValueError(f"attn_mask's last dim must be S={S} (one entry per key), got {_shape(attn_mask)}")
    return attn_mask


def check_backward(call: AttentionCall, grad_out, out, lse) -> None:
    """The arguments of `backend.backward(call, grad_out, out, lse)`, checked against the call; else raise.

    grad_out and out (B, H, T, Dv) floating, lse (B, H, T) float32 or float64, all on q's device. A call
    with dropout is refused: the gradients from a given logsumexp cannot replay a dropout draw.
    Shapes, dtypes and devices only: no tensor's value is read.
    """
    if call.dropout_p > 0.0:
        raise ValueError(f"dropout_p={call.dropout_p}: a backward from a given logsumexp takes no dropout "
                         f"(it cannot replay the forward's draw); use autograd through the forward")
    B, H, T, Dv = call.batch, call.heads, call.q_len, call.v.shape[-1]
    for name, x, dims, shape in (("grad_out", grad_out, "(B, H, T, Dv)", (B, H, T, Dv)),
                                 ("out", out, "(B, H, T, Dv)", (B, H, T, Dv)),
                                 ("lse", lse, "(B, H, T)", (B, H, T))):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating, got {x.dtype}")
        if _shape(x) != shape:
            raise ValueError(f"{name} must be {dims} = {shape} for this call, got {_shape(x)}")
        if x.device != call.q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {call.q.device}; move them to one device")
    if lse.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lse must be float32 (float64 for float64 inputs), got {lse.dtype}")


def make_call(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, causal: bool = False,
    scale: float | None = None, dropout_p: float = 0.0, window=None, softcap: float | None = None,
    alibi_slopes: Tensor | None = None, sinks: Tensor | None = None, documents=None, score_mod=None,
) -> AttentionCall:
    """Check the arguments of an attention call once; raise TypeError/ValueError naming the culprit.

    The common values (no mask, no scale, no dropout, no variant) cost one
    comparison each: at a decode step the whole call takes tens of
    microseconds. The variants are those of `multihead.core.variants`.
    """
    _check_tensors(q, k, v)
    D, S = _check_shapes(q, k, v)
    if causal is not False and causal is not True:
        flag("causal", causal)
    if dropout_p != 0.0 or type(dropout_p) is not float:
        dropout_p = probability("dropout_p", dropout_p)
    scale = check_scale(scale, D, q.dtype)
    mask = None if attn_mask is None else check_mask(attn_mask, q, S)
    variants = check_variants(q, S, window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                              documents=documents, score_mod=score_mod)
    return AttentionCall(q, k, v, mask, causal, scale, dropout_p, variants)


__all__ = ["DTYPES", "AttentionCall", "AttentionOutput", "Gradients", "check_backward", "check_mask", "check_scale",
           "make_call", "records_grad"]
