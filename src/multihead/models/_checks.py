"""Input checks that every model in `multihead.models` (and `multihead.generate`) shares."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_token_ids(input_ids, vocab_size: int, max_positions: int | None) -> tuple[int, int]:
    """(B, T) of a batch of token ids, or an error naming input_ids, what was expected and what came.

    max_positions: the longest T the model takes (its learned positions); None for no limit (RoPE).
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor (B, T) of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids (B, T), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has {input_ids.dim()} dims, (B, T) expected, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if max_positions is None and T < 1:
        raise ValueError(f"input_ids has T={T} tokens; expected T >= 1, got shape {tuple(input_ids.shape)}")
    if max_positions is not None and not 1 <= T <= max_positions:
        raise ValueError(f"input_ids has T={T} tokens; expected 1 <= T <= max_positions={max_positions}, "
                         f"the model's learned positions")
    out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
    if out_of_range.any():
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got token id "
                         f"{input_ids[out_of_range][0].item()}")
    return B, T


def check_hf_config(config, model_type: str) -> None:
    """A parsed config.json (a dict) of `model_type` (a config that names none is taken as one)."""
    from .checkpoint_map import CheckpointError

    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
    found = config.get("model_type", model_type)
    if found != model_type:
        raise CheckpointError(f"config.json says model_type={found!r}, {model_type!r} expected")


def int_at_least(name: str, value, minimum: int) -> int:
    """An int >= minimum (a bool is not an int here): TypeError for another type, ValueError below it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def positive_number(name: str, value) -> float:
    """A finite int or float > 0 (a bool is not a number here), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
