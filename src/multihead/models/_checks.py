"""Input checks that every model in `multihead.models` shares."""

from __future__ import annotations

import torch
from torch import Tensor


def check_token_ids(input_ids, vocab_size: int, max_positions: int) -> tuple[int, int]:
    """(B, T) of a batch of token ids, or an error naming input_ids, what was expected and what came."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor (B, T) of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids (B, T), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has {input_ids.dim()} dims, (B, T) expected, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if not 1 <= T <= max_positions:
        raise ValueError(f"input_ids has T={T} tokens; expected 1 <= T <= max_positions={max_positions}, "
                         f"the model's learned positions")
    out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
    if out_of_range.any():
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got token id "
                         f"{input_ids[out_of_range][0].item()}")
    return B, T
