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
