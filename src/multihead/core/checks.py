"""Argument checks shared by every entry point: one wording for one mistake, written once.

Each helper checks one kind of value where it enters the library and returns
it (normalised where that helps: a probability as a float); everything below
the entry point trusts the value. Errors name the argument, what was expected
and what came (docs/design.md, Conventions).

    int_at_least, positive_int   an int with a lower bound (a bool is not an int here)
    flag                         a bool, and only a bool
    probability                  a dropout probability in [0, 1)
    positive_number              a finite number > 0
    check_token_ids              a (B, T) batch of token ids in [0, vocab_size)
    mask_tensor                  an attention mask's kind and device
    key_mask                     a (B, S) bool key_mask, True = a real token
    check_like_parameters        inputs with the module's dtype and device
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def int_at_least(name: str, value, minimum: int, *, expected: str | None = None) -> int:
    """An int >= minimum (a bool is not an int here): TypeError for another type, ValueError below it.

    expected: how the bound reads in the error ("positive"); default "an int >= minimum".
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {expected or f'an int >= {minimum}'}, got {value}")
    return value


def positive_int(name: str, value) -> int:
    """An int > 0 (bool is not an int here), else TypeError/ValueError naming `name`."""
    return int_at_least(name, value, 1, expected="positive")


def flag(name: str, value) -> bool:
    """A bool, and only a bool: "false" or 0 would otherwise pass as a truth value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def probability(name: str, value) -> float:
    """A dropout probability in [0, 1): 1 would drop every weight and divide by zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def positive_number(name: str, value) -> float:
    """A finite int or float > 0 (a bool is not a number here), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_token_ids(input_ids, vocab_size: int, max_positions: int | None) -> tuple[int, int]:
    """(B, T) of a batch of token ids, or an error naming input_ids, what was expected and what came.

    max_positions: the longest T the model takes (its learned positions); None for no limit (RoPE).
    The ids' values are read (one host sync): a model's edge, not a hot path.
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


def mask_tensor(name: str, mask, device: torch.device, bool_meaning: str) -> Tensor:
    """A mask's kind: a Tensor, bool or floating, on `device`.

    bool_meaning says what True means to the caller ("True = may attend", or
    torch's "True = not allowed" in compat), so the error speaks its convention.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name} must be bool ({bool_meaning}) or floating (added to the scores), got {mask.dtype}"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    return mask


def key_mask(value, batch: int, length: int, device: torch.device, what: str = "S") -> Tensor:
    """key_mask (B, length) bool, True = a real token, on `device`; else TypeError/ValueError saying so."""
    if not isinstance(value, Tensor) or value.dtype != torch.bool:
        got = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"key_mask must be a bool tensor (B, {what}), True = a real token, got {got}")
    if tuple(value.shape) != (batch, length):
        raise ValueError(f"key_mask must be (B, {what}) = {(batch, length)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"key_mask is on {value.device} but the input is on {device}")
    return value


def check_like_parameters(parameter: Tensor, **inputs: Tensor) -> None:
    """Each input has the module's dtype and device (those of `parameter`), else TypeError/ValueError saying how."""
    for name, x in inputs.items():
        if x.dtype != parameter.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {parameter.dtype}; "
                            f"cast the input or the module (module.to({x.dtype}))")
        if x.device != parameter.device:
            raise ValueError(f"{name} is on {x.device} but the module's parameters are on {parameter.device}")


__all__ = ["check_like_parameters", "check_token_ids", "flag", "int_at_least", "key_mask", "mask_tensor",
           "positive_int", "positive_number", "probability"]
