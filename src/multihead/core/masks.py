"""The one mask convention of multihead, and the one numerical core every path shares.

A boolean mask is True where a query MAY attend to a key. A float mask is added
to the scores (0 keeps a key, -inf removes it, anything else biases it).
Masks broadcast against the scores' shape (B, H, T, S).

`causal=True` is aligned to the bottom-right corner: query i of T sees the keys
j <= i + (S - T). With T == S this is the usual lower triangle; when decoding
one new token (T = 1) against a cache of S keys it sees all of them; with
T > S the first T - S queries see nothing (their output is 0).

    T = 3, S = 5 (offset 2)        T = 5, S = 3 (offset -2)
         keys 0 1 2 3 4                 keys 0 1 2
    q0        x x x . .            q0        . . .    <- no key: output 0
    q1        x x x x .            q1        . . .
    q2        x x x x x            q2        x . .
                                   q3        x x .
                                   q4        x x x

Only `multihead.compat.MultiheadAttention` speaks torch.nn's inverted
convention (True = masked out), and it converts at its edge.

The numerics that every backend, the weights on demand and compat share live
here, once each:

    apply(scores, mask)          a bool mask fills -inf, a float mask is added in the
                                 scores' dtype (a finite bias stays finite)
    causal_allowed(rows, keys)   the bottom-right alignment, for any tile of positions
    softmax(scores, ...)         a row with no key (all -inf) gives zeros and gradient 0
    open_empty_rows(mask)        the same rule for fused kernels: such rows are opened
                                 before the kernel and their output zeroed after it
    keep_mask / drop             the one dropout draw and its scaling
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def causal_allowed(query_pos: Tensor, key_pos: Tensor, T: int, S: int) -> Tensor:
    """(t, s) bool: query at position query_pos[i] of T may see key key_pos[j] of S (bottom-right aligned)."""
    return key_pos[None, :] <= query_pos[:, None] + (S - T)  # (1, s) <= (t, 1) -> (t, s)


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right aligned causal mask, (T, S) bool, True = may attend."""
    return causal_allowed(torch.arange(T, device=device), torch.arange(S, device=device), T, S)


def sliding_window_mask(
    T: int, S: int, window: int, device: torch.device | str | None = None
) -> Tensor:
    """Causal mask that also forgets keys more than `window - 1` positions back.

    (T, S) bool: query i sees keys j with i + offset - window < j <= i + offset.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    query_pos = torch.arange(T, device=device)
    key_pos = torch.arange(S, device=device)
    recent = causal_allowed(query_pos - window, key_pos, T, S)  # (T, S): keys at or before i + offset - window
    return causal_allowed(query_pos, key_pos, T, S) & ~recent  # (T, S)


def key_mask_to_attn_mask(key_mask: Tensor) -> Tensor:
    """(B, S) bool, True = a real token  ->  (B, 1, 1, S) bool, True = may attend."""
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be bool (True = a real token), got {key_mask.dtype}")
    if key_mask.dim() != 2:
        raise ValueError(
            f"key_mask has {key_mask.dim()} dims, (B, S) expected, got {tuple(key_mask.shape)}"
        )
    return key_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)


def lengths_to_key_mask(lengths: Tensor, S: int) -> Tensor:
    """Per-sequence key lengths (B,) -> (B, S) bool, True for the first lengths[b] keys."""
    key_pos = torch.arange(S, device=lengths.device)  # (S,)
    return key_pos[None, :] < lengths[:, None]  # (B, S)


def cast_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A float mask in `dtype`, finite values kept finite: -1e30 becomes float16's lowest, not -inf.

    A bias only saturates where the target cannot hold it; -inf and +inf stay
    what they are (-inf is how a float mask says "never").
    """
    if mask.dtype == dtype:
        return mask
    if torch.finfo(mask.dtype).max <= torch.finfo(dtype).max:
        return mask.to(dtype)  # widening: exact
    limit = torch.finfo(dtype).max
    return torch.where(mask.isinf(), mask, mask.clamp(-limit, limit)).to(dtype)


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as a float mask in `dtype`: bool -> 0 where allowed, -inf elsewhere; float -> `cast_bias`."""
    if mask.dtype != torch.bool:
        return cast_bias(mask, dtype)
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, float("-inf"))


def combine(first: Tensor | None, second: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """Both masks at once: bool & bool stays bool, anything with a float becomes float.

    dtype: the float result's dtype; default the float mask's own (the wider of two).
    """
    if first is None:
        return second
    if second is None:
        return first
    if first.dtype == torch.bool and second.dtype == torch.bool:
        return first & second
    if dtype is None:
        floats = [m.dtype for m in (first, second) if m.dtype != torch.bool]
        dtype = torch.promote_types(floats[0], floats[-1])
    return to_additive(first, dtype) + to_additive(second, dtype)


def allowed(mask: Tensor) -> Tensor:
    """Where a mask lets a query see a key (bool of the mask's shape), either kind."""
    if mask.dtype == torch.bool:
        return mask
    return mask != float("-inf")


def materialize(
    attn_mask: Tensor | None,
    causal: bool,
    T: int,
    S: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The user's mask and the causal mask as one mask broadcastable to (B, H, T, S)."""
    causal_part = causal_mask(T, S, device) if causal else None
    return combine(attn_mask, causal_part, dtype)


# ---- the numerical core


def apply(scores: Tensor, mask: Tensor | None, *, in_place: bool = False) -> Tensor:
    """scores (..., t, s) with a broadcastable mask applied: bool False -> -inf, float added.

    The float mask is added in the scores' dtype (the compute dtype), through
    `cast_bias`, so a large finite bias stays finite and never turns a row
    into one with no key.
    """
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill_(~mask, float("-inf")) if in_place else scores.masked_fill(~mask, float("-inf"))
    bias = cast_bias(mask, scores.dtype)
    return scores.add_(bias) if in_place else scores + bias


def rows_can_be_empty(has_mask: bool, causal: bool, T: int, S: int) -> bool:
    """Whether some query row may be left with no key, from shapes and flags alone (no tensor is read)."""
    return has_mask or S == 0 or (causal and T > S)


def softmax(scores: Tensor, *, may_have_empty_rows: bool, in_place: bool = False) -> Tensor:
    """softmax over the keys (last dim) of masked scores; a row with no key gives zeros, not NaN.

    A row with no key is all -inf: its scores are set to 0 for the softmax and
    its probabilities to 0 after it, so neither the output nor the gradient
    sees a NaN (the gradient of such a row is 0). A NaN score is not -inf and
    propagates. may_have_empty_rows comes from shapes and flags
    (`AttentionCall.may_have_empty_rows`), never from reading the scores on
    the host. in_place reuses the scores' buffer (no autograd).
    """
    if scores.shape[-1] == 0:
        return scores  # (..., t, 0): nothing to normalise, output 0
    if not may_have_empty_rows:
        return torch.softmax(scores, dim=-1, out=scores) if in_place else torch.softmax(scores, dim=-1)
    empty = scores.amax(dim=-1, keepdim=True) == float("-inf")  # (..., t, 1); a NaN row is not empty
    if in_place:
        probs = torch.softmax(scores.masked_fill_(empty, 0.0), dim=-1, out=scores)
        return probs.masked_fill_(empty, 0.0)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def rows_with_key(mask: Tensor) -> Tensor:
    """(b, h, t, 1) bool: which query rows a (b, h, t, S) mask lets see at least one key."""
    return allowed(mask).any(dim=-1, keepdim=True)


def open_empty_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The empty-row rule for fused kernels: (mask with every empty row opened, rows_with_key).

    A kernel given a row with no key returns NaN (and a NaN gradient). Opened
    rows see every key instead; the caller then zeroes their output with
    torch.where(rows_with_key, out, 0), which also zeroes their gradient.
    """
    has_key = rows_with_key(mask)  # (b, h, t, 1)
    opened = mask.masked_fill(~has_key, True if mask.dtype == torch.bool else 0.0)
    return opened, has_key


class FusedMask(NamedTuple):
    """A call's masks as a fused kernel with a top-left `is_causal` flag takes them."""

    mask: Tensor | None  # (b, h, t, S), empty rows opened; None when none is needed
    is_causal: bool  # pass the kernel's own causal flag (T == S, no other mask)
    has_key: Tensor | None  # (b, h, t, 1) rows that see a key; zero the others' output with it


def for_fused_kernel(attn_mask: Tensor | None, causal: bool, T: int, S: int, scale: float,
                     dtype: torch.dtype, device: torch.device, *, open_rows: bool = True) -> FusedMask:
    """The masks of a call for a fused kernel (SDPA, CPU flash): causal made explicit where needed, empty rows opened.

    Kernels align is_causal top-left; ours is bottom-right. The two agree on a
    square (T == S), and a single query (T == 1) sees every key, so only the
    other shapes pass the causal mask explicitly (combined with attn_mask in
    `dtype`). The kernels' own causal path gives NaN for a scale <= 0 (it
    scales its -inf), so such scales pass the mask explicitly too.

    open_rows=False, where no gradient is recorded: the mask goes to the
    kernel as it is (no copy) and only `has_key` is computed; whatever the
    kernel writes in a row with no key (NaN) is then replaced by 0. Opening
    the rows is only needed to keep NaN out of the backward.
    """
    if causal and attn_mask is None and T == S and scale > 0:
        return FusedMask(None, True, None)
    if causal and T > 1:
        attn_mask = materialize(attn_mask, True, T, S, dtype, device)
    if attn_mask is None:
        return FusedMask(None, False, None)
    if attn_mask.dim() == 2:
        attn_mask = attn_mask[None, None]  # (T, S) -> (1, 1, T, S)
    if not open_rows:
        return FusedMask(attn_mask, False, rows_with_key(attn_mask))
    opened, has_key = open_empty_rows(attn_mask)
    return FusedMask(opened, False, has_key)


def zero_empty_rows(out: Tensor, has_key: Tensor | None, *, in_place: bool = False) -> Tensor:
    """out (B, H, T, ·) with the rows that see no key set to 0 (and so their gradient); in_place without autograd."""
    if has_key is None:
        return out
    if in_place:
        return out.masked_fill_(~has_key, 0.0)
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


def keep_mask(shape: torch.Size | tuple[int, ...], dropout_p: float, *, device: torch.device,
              generator: torch.Generator | None = None) -> Tensor:
    """The one dropout draw: bool, True = keep, each entry kept with probability 1 - dropout_p."""
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def drop(probs: Tensor, keep: Tensor, dropout_p: float) -> Tensor:
    """Dropped weights: the kept ones scaled by 1 / (1 - p), so their expectation is unchanged."""
    return probs * keep / (1.0 - dropout_p)
