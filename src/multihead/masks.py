"""The one mask convention of multihead.

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
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right aligned causal mask, (T, S) bool, True = may attend."""
    offset = S - T
    query_pos = torch.arange(T, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return key_pos <= query_pos + offset  # (T, S)


def sliding_window_mask(
    T: int, S: int, window: int, device: torch.device | str | None = None
) -> Tensor:
    """Causal mask that also forgets keys more than `window - 1` positions back.

    (T, S) bool: query i sees keys j with i + offset - window < j <= i + offset.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    offset = S - T
    query_pos = torch.arange(T, device=device)[:, None] + offset  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return (key_pos <= query_pos) & (key_pos > query_pos - window)  # (T, S)


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


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = may attend) as a float mask: 0 where allowed, -inf elsewhere."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, float("-inf"))


def combine(first: Tensor | None, second: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Both masks at once: bool & bool stays bool, anything with a float becomes float."""
    if first is None:
        return second
    if second is None:
        return first
    if first.dtype == torch.bool and second.dtype == torch.bool:
        return first & second
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
