"""Argument checks shared by the public entry points: one wording for one mistake."""

from __future__ import annotations

import torch
from torch import Tensor


def positive_int(name: str, value) -> int:
    """An int > 0 (bool is not an int here), else TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def probability(name: str, value) -> float:
    """A dropout probability in [0, 1): 1 would drop every weight and divide by zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


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
