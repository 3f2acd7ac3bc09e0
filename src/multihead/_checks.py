"""Argument checks shared by the public entry points: one wording for one mistake."""

from __future__ import annotations


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
