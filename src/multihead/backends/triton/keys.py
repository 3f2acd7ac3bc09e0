"""Which keys each sequence attends, in the form the kernels take: (lo, hi, mask), on the device.

    lengths [4, 2]          ->  lo = hi = [4, 2], no mask
    mask row  x x . x . .   ->  lo = 2 (keys before it all attended), hi = 4 (none from it on), mask = the row

Keys in [0, lo) are attended whole, so the kernels walk them without a mask;
keys from hi on are never read; keys in [lo, hi) are masked one by one (by
the row of the bool mask, when there is one). A key-padding mask that is a
prefix (the usual padding) gives lo = hi = its length and costs nothing
more than key lengths; any other bool (B|1, 1, 1, S) mask (holes before a
real token) is just as correct, with more tiles masked.

Everything here is computed from shapes or on the device: nothing reads a
tensor's value on the host, so a call never waits for the GPU and can be
captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class KeyRange(NamedTuple):
    lo: Tensor  # (B,) int32: every key j < lo[b] is attended
    hi: Tensor  # (B,) int32: no key j >= hi[b] is attended (the kernels never read them)
    mask: Tensor | None  # (B, S) uint8 (stride 0 over B when shared), 1 = attended; None: all of [lo, hi) attended


def refusal(attn_mask: Tensor) -> str | None:
    """None if attn_mask is a key-padding mask the kernels take (bool (B|1, 1, 1, S)), else why not.

    Decided from its dtype and shape alone: its values are never read here.
    """
    if attn_mask.dtype != torch.bool:
        return ("a dense float mask is not supported; triton takes key-padding masks only "
                "(bool (B, 1, 1, S), True = may attend)")
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        return (f"attn_mask of shape {tuple(attn_mask.shape)} is not a key-padding mask "
                "(B, 1, 1, S); triton takes one row of keys per sequence")
    return None


def from_lengths(lengths: Tensor, B: int) -> KeyRange:
    """Key lengths (B,) -> lo = hi = lengths (int32, on their device); the kernels clamp them to [0, S]."""
    lengths = lengths.to(torch.int32).expand(B).contiguous()  # (B,) or (1,) -> (B,)
    return KeyRange(lengths, lengths, None)


def from_mask(attn_mask: Tensor, B: int) -> KeyRange:
    """A bool (B|1, 1, 1, S) mask (True = may attend) -> its KeyRange, computed on the mask's device."""
    b, S = attn_mask.shape[0], attn_mask.shape[-1]
    rows = attn_mask.reshape(b, S)  # (b, 1, 1, S) -> (b, S)
    if S == 0:
        empty = torch.zeros(B, dtype=torch.int32, device=attn_mask.device)  # (B,)
        return KeyRange(empty, empty, None)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()  # the kernels read a row's keys at stride 1
    pos = torch.arange(S, device=rows.device, dtype=torch.int32)  # (S,)
    hi = torch.where(rows, pos + 1, 0).amax(dim=-1)  # (b, S) -> (b,): the last attended key + 1, 0 if none
    lo = torch.where(rows, S, pos).amin(dim=-1)  # (b, S) -> (b,): the first key not attended, S if none
    lo = lo.to(torch.int32).expand(B).contiguous()  # (b,) -> (B,)
    hi = hi.to(torch.int32).expand(B).contiguous()  # (b,) -> (B,)
    rows = rows.expand(B, S)  # (b, S) -> (B, S): one row shared by every sequence has batch stride 0
    return KeyRange(lo, hi, rows.view(torch.uint8))  # (B, S) bool -> (B, S) uint8, same storage


__all__ = ["KeyRange", "from_lengths", "from_mask", "refusal"]
