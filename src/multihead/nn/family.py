"""The attention family inside a module: what MultiHeadAttention and MultiHeadLatentAttention share.

A module is configured with the variants of `multihead.core.variants` that a
model fixes once (`window`, `softcap`, `alibi`, `sinks`) and passes them to
every attention call it makes:

    without a cache   the call carries them all, aligned bottom-right as
                      `causal` is (`call_variants(..., cached=False)`)
    with a cache      the keys are the cache's slots, each holding the token
                      of a known position (`ChunkLayout.key_positions`) and
                      every sequence has a length of its own, so the window
                      and ALiBi go into the cache's mask at those positions
                      (`cache_mask`) and the call carries softcap and the
                      sinks only (`call_variants(..., cached=True)`)

ALiBi's slopes are fixed (a buffer outside the state dict) and the sinks are
learned (a parameter, 0 at the start: each head's sink weighs like one key
of score 0); `add_family` gives a module both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.variants import Variants, alibi_slopes, window_allowed
from .cache import ChunkLayout, LayerCache, SlidingWindowLayerCache


def add_family(module: nn.Module, num_heads: int, *, alibi: bool, sinks: bool, device, dtype) -> None:
    """module.alibi_slopes (H,) float32 buffer or None, and module.sinks (H,) parameter or None."""
    slopes = alibi_slopes(num_heads).to(device) if alibi else None
    module.register_buffer("alibi_slopes", slopes, persistent=False)
    module.sinks = nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype)) if sinks else None


def family_repr(window, softcap, alibi: bool, sinks: bool) -> str:
    """", window=(3, 0), sinks=True": the variants a module was configured with, for its extra_repr."""
    return "".join(f", {name}={value!r}" for name, value in
                   (("window", window), ("softcap", softcap), ("alibi", alibi), ("sinks", sinks))
                   if value not in (None, False))


def call_variants(window, softcap, slopes: Tensor | None, sinks: Tensor | None, *, cached: bool) -> Variants | None:
    """The variants of a module's call; None for a plain module (the common case costs one comparison).

    cached: the keys are a cache's slots, whose window and ALiBi are in the cache's mask (`cache_mask`),
    so the variants carry neither (a cache's S is its capacity, not the aligned length).
    """
    window = None if cached else window
    slopes = None if slopes is None or cached else slopes[None]  # (H,) -> (1, H)
    if window is None and softcap is None and slopes is None and sinks is None:
        return None
    return Variants(window, softcap, slopes, sinks, None, None, None)


def cache_mask(mask: Tensor, layout: ChunkLayout, window, slopes: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The cache's mask (B, 1, T, S) with the window and ALiBi at each query's and each key's own position.

    The queries sit at layout.positions (B, T) and the keys at layout.key_positions (B|1, S). ALiBi
    becomes a float bias (B, H, T, S) in dtype (float32 at least), exact also beside the sinks.
    """
    if window is None and slopes is None:
        return mask
    if window is not None:
        mask = mask & window_allowed(window, layout.positions, layout.key_positions[:, None])[:, None]  # (B, 1, T, S)
    if slopes is None:
        return mask
    distance = (layout.positions[..., None] - layout.key_positions[:, None]).abs()[:, None]  # (B, 1, T, S)
    slopes = slopes.to(torch.promote_types(dtype, torch.float32))
    bias = -slopes.view(1, -1, 1, 1) * distance  # (1, H, 1, 1) * (B, 1, T, S) -> (B, H, T, S)
    return bias.masked_fill(~mask, float("-inf"))


def check_cache_window(cache: LayerCache, window) -> None:
    """A SlidingWindowCache keeps `left` positions back: a module whose window reaches further is refused."""
    if not isinstance(cache, SlidingWindowLayerCache):
        return
    kept = cache.window[0]
    if window is None or window[0] is None:
        raise ValueError(f"this SlidingWindowCache keeps {kept} positions back (window={cache.window}), the module's "
                         f"window={window} sees every earlier key: give it a DynamicCache or a StaticCache, "
                         f"which keep every token")
    if window[0] > kept:
        raise ValueError(f"this SlidingWindowCache keeps {kept} positions back (window={cache.window}), the module's "
                         f"window={window} sees {window[0]} positions back: make the cache with the module's window")
