"""The mask function transformers calls for attn_implementation="multihead".

transformers builds every model's masks through `masking_utils`, which asks
the function registered under the implementation's name in
`AttentionMaskInterface`; an implementation with none registered gets no
mask at all (padding would be ignored). This one speaks multihead's
convention: a bool mask (B, 1, T, S), True where a query may attend, or
None where `causal` alone says it.

It is transformers' own `sdpa_mask` (the same mask functions, padding,
sliding windows, packed sequences, static-cache slots), with one
difference: sdpa may return None ("use is_causal") for shapes where SDPA's
top-left causal flag and multihead's bottom-right one disagree (a prefill
into a larger static cache: T < S with q_offset 0). Here the mask is left
out only, with no padding and no window that bites, for a square call
(T == S), where the two alignments are the same triangle, and for a
decoding step after cached tokens (T = 1 with an int q_offset > 0, a
dynamic cache), where both see every key.
"""

from __future__ import annotations

from torch import Tensor
from transformers.masking_utils import sdpa_mask


def multihead_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, *args,
                   allow_is_causal_skip: bool = True, **kwargs) -> Tensor | None:
    """transformers' mask-interface signature -> (B, 1, T, S) bool, True = may attend, or None (causal alone)."""
    # bottom-right == top-left on the square; a decoding step after cached tokens (an int offset: a
    # dynamic cache) sees every key either way. Not a first token into a static cache (q_offset 0 or a tensor).
    decoding = q_length == 1 and isinstance(q_offset, int) and q_offset > 0
    skip = allow_is_causal_skip and (q_length == kv_length or decoding)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, *args, allow_is_causal_skip=skip, **kwargs)


__all__ = ["multihead_mask"]
