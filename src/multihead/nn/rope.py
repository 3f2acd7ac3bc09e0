"""Rotary position embeddings (RoPE, Su et al. 2021), in the Hugging Face Llama convention.

RoPE encodes a token's absolute position m by rotating its query and key: the
head dim D is cut into D/2 pairs, and pair i is turned by the angle m·θ_i,
θ_i = base^(-2i/D). A rotation keeps lengths, and the score between a query at
m and a key at n, (R_m q)·(R_n k) = q·(R_{n-m} k), depends only on n - m: the
scores see relative positions although every token was given an absolute one.
It is applied to q and k after their projections and before caching, so a
cached key keeps the rotation of the position it was written at.

Two conventions pair the dimensions differently, and a checkpoint only works
with the one it was trained in:

    interleaved (GPT-J, Meta's original Llama code):  pairs (x0, x1), (x2, x3), ...
    half-split  (GPT-NeoX, Hugging Face Llama):        pairs (x0, x_{D/2}), (x1, x_{D/2+1}), ...

This module is the HALF-SPLIT one, `rotate_half` of Hugging Face's Llama: pair
i is (x_i, x_{i + D/2}), seen as the complex number x_i + j·x_{i+D/2} and
multiplied by e^{j·m·θ_i}. Llama checkpoints from Hugging Face work unchanged
(their converter permuted W^Q and W^K rows from Meta's interleaved layout);
Meta's original checkpoints would need that permutation first.

    RotaryEmbedding(head_dim, base=10000.0)(positions) -> Rotary(cos, sin)   # (B, 1, T, D) each
    apply_rotary(x, cos, sin)                                                # x (B, H, T, D)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.checks import positive_int


class Rotary(NamedTuple):
    cos: Tensor  # (B, 1, T, D): cos(m·θ_i), each angle twice (half-split layout); broadcasts over heads
    sin: Tensor  # (B, 1, T, D): sin(m·θ_i), likewise


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: multiplication by j, pair by pair."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (..., D) -> (..., D)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every pair (x_i, x_{i+D/2}) of x (B, H|G, T, D) by the angles whose cos and sin are given.

    cos and sin broadcast against x: (B, 1, T, D) from `RotaryEmbedding`. The
    result has x's dtype: cos and sin are cast to it first, as Hugging Face does.
    """
    if x.shape[-1] != cos.shape[-1] or cos.shape != sin.shape:
        raise ValueError(
            f"apply_rotary: x (..., D) and cos, sin (..., D) must agree on D, "
            f"got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin  # (B, H, T, D)


class RotaryEmbedding(nn.Module):
    """cos and sin of m·θ_i for given positions m, θ_i = base^(-2i/D), half-split layout.

    RotaryEmbedding(head_dim, base=10000.0)

    forward(positions, dtype=torch.float32) -> Rotary(cos, sin), each (B, 1, T, D):
    positions is (B, T) (every row its own offset, as in a batch decoded from
    a cache) or (T,) for all rows alike (then B = 1).

    The angles are computed from the positions on every call, not looked up in
    a table: a table must know the largest position on the host before it can
    be indexed (a device sync per layer per step on a GPU, and a recompile
    under torch.compile when it grows), while computing them costs B·T·D/2 cos
    and sin, nothing next to the projections. The inverse frequencies are made
    lazily, once per device and precision. The angles are computed in float32
    (exactly Hugging Face Llama's arithmetic, so its checkpoints give the same
    numbers) or in float64 when float64 is asked for.

    head_dim and base are read-only: the memoised frequencies (and a model's
    config, such as MultiHeadLatentAttention's rope_base) were made from them,
    so setting either raises AttributeError instead of leaving stale angles.
    For another base, build a new RotaryEmbedding.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        positive_int("head_dim", head_dim)
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dims), got {head_dim}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 1:
            raise ValueError(f"base must be a finite number > 1 (10000.0 in Llama), got {base!r}")
        self._head_dim = head_dim
        self._base = float(base)
        # Not a buffer: module.half() would round the frequencies to fp16; these stay exact per precision.
        self._inv_freq: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    # Read-only: the frequencies memoised in _inv_freq (and compiled graphs) hold these values.
    @property
    def head_dim(self) -> int:
        """D, the width this embedding rotates (fixed at construction)."""
        return self._head_dim

    @head_dim.setter
    def head_dim(self, value) -> None:
        _read_only("head_dim", self._head_dim, value)

    @property
    def base(self) -> float:
        """The base of θ_i = base^(-2i/D) (fixed at construction)."""
        return self._base

    @base.setter
    def base(self, value) -> None:
        _read_only("base", self._base, value)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, convention='half-split (HF Llama)'"

    def inv_freq(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """θ_i = base^(-2i/D) for i < D/2, (D/2,), computed as Hugging Face does in float32."""
        device = torch.device("cpu") if device is None else torch.device(device)
        # Computed in the graph: under torch.compile a memo would add a guard; under torch.jit.trace a first
        # trace would record the ops and trace's re-run check the memo's constant, "Graphs differed".
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._frequencies(device, dtype)
        key = (device, dtype)
        if key not in self._inv_freq:
            self._inv_freq[key] = self._frequencies(device, dtype)
        return self._inv_freq[key]

    def _frequencies(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=dtype) / self.head_dim  # (D/2,)
        return (1.0 / (self.base ** exponents)).to(device)  # (D/2,)

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> Rotary:
        """cos and sin (B|1, 1, T, D) for integer positions (B, T) or (T,).

        The values are not read (no host sync per step): callers that take
        positions from a user check them with `check_positions`.
        """
        positions = _check_kind(positions)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        # Angles in float32 (HF's arithmetic) unless float64 is asked for; cast at the end.
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        if positions.dim() == 1:
            positions = positions[None]  # (T,) -> (1, T)
        inv_freq = self.inv_freq(positions.device, compute)  # (D/2,)
        freqs = positions[..., None].to(compute) * inv_freq  # (B, T, 1) * (D/2,) -> (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, T, D/2) -> (B, 1, T, D): pair i is (i, i + D/2)
        return Rotary(angles.cos().to(dtype), angles.sin().to(dtype))

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, H, T, D) rotated to its positions (B, T) or (T,) >= 0: apply_rotary with this embedding's angles."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, H, T, D) tensor, got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x has head dim {x.shape[-1]}, this RotaryEmbedding has head_dim={self.head_dim}")
        check_positions(positions, batch_size=x.shape[0], length=x.shape[2])
        cos, sin = self(positions, dtype=x.dtype)
        return apply_rotary(x, cos, sin)


def check_positions(positions, batch_size: int | None = None, length: int | None = None,
                    device: torch.device | None = None) -> Tensor:
    """positions: an integer tensor (T,) or (B, T) of absolute positions >= 0 (sizes and device checked when given).

    The values are read on the host (one sync), except under torch.compile.
    """
    positions = _check_kind(positions)
    if device is not None and positions.device != device:
        raise ValueError(f"positions is on {positions.device} but the input is on {device}")
    if length is not None and positions.shape[-1] != length:
        raise ValueError(f"positions has {positions.shape[-1]} columns, one per query T={length} expected, "
                         f"got {tuple(positions.shape)}")
    if batch_size is not None and positions.dim() == 2 and positions.shape[0] not in (1, batch_size):
        raise ValueError(f"positions has {positions.shape[0]} rows, B={batch_size} (or 1) expected, "
                         f"got {tuple(positions.shape)}")
    if not torch.compiler.is_compiling() and positions.numel() and bool((positions < 0).any()):
        raise ValueError(f"positions must be >= 0 (absolute token positions), got min {int(positions.min())}")
    return positions


def _read_only(name: str, current, value) -> None:
    raise AttributeError(
        f"RotaryEmbedding.{name} is read-only (it is {current!r}; got {value!r}): the frequencies made from it "
        f"are memoised per device and precision, so a new value would be silently ignored. Build a new "
        f"RotaryEmbedding(head_dim, base=...) instead (and give it to the module as its rope)"
    )


def _check_kind(positions) -> Tensor:
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor (B, T) or (T,), got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"positions must hold integers (absolute token positions), got {positions.dtype}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions has {positions.dim()} dims, (B, T) or (T,) expected, got {tuple(positions.shape)}")
    return positions
