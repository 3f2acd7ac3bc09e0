"""What the decoders (GPT-2, Llama) share: the pre-norm block, their output, the cache and mask checks.

    x = x + attention(attention_norm(x))      causal MultiHeadAttention, with the layer's cache
    x = x + mlp(mlp_norm(x))

A decoder's `forward(input_ids, *, key_mask, cache, need_weights)` returns a
`DecoderOutput`; its `make_cache(...)` is `make_decoder_cache`. Each model
file builds its blocks from its own norm and MLP, with the same four names,
so the weight maps address `blocks.{i}.attention_norm` etc. for both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._checks import positive_int
from ..cache import DynamicCache, KVCache, StaticCache


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    attentions: tuple[Tensor, ...] | None  # per layer (B, H, T, S) when need_weights, else None; S = T without a cache


class BlockOutput(NamedTuple):
    hidden: Tensor  # (B, T, C)
    weights: Tensor | None  # (B, H, T, T) when need_weights


class PreNormBlock(nn.Module):
    """x = x + attention(attention_norm(x)); x = x + mlp(mlp_norm(x))."""

    def __init__(self, attention_norm: nn.Module, attention: nn.Module, mlp_norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attention_norm = attention_norm
        self.attention = attention
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(self, x: Tensor, key_mask: Tensor | None, need_weights: bool, cache=None,
                positions: Tensor | None = None) -> BlockOutput:
        rotary = {} if positions is None else {"positions": positions}  # only rotary attention takes positions
        attended = self.attention(self.attention_norm(x), key_mask=key_mask, need_weights=need_weights,
                                  cache=cache, **rotary)
        x = x + attended.output
        x = x + self.mlp(self.mlp_norm(x))
        return BlockOutput(x, attended.weights)


def make_decoder_cache(model: nn.Module, *, num_kv_heads: int, head_dim: int, batch_size: int | None,
                       max_length: int | None, static: bool, default_max_length: int) -> KVCache:
    """The cache a decoder's `make_cache` returns: one layer cache per block, on the model's device/dtype."""
    weight = next(model.parameters())
    num_layers = model.config.num_layers
    if not isinstance(static, bool):
        raise TypeError(f"static must be a bool, got {type(static).__name__}")
    if not static:
        if max_length is not None:
            raise ValueError("max_length is for a static cache (static=True); a dynamic cache grows")
        return DynamicCache(num_layers, batch_size=batch_size, device=weight.device)
    if batch_size is None:
        raise ValueError("a static cache needs batch_size (it is preallocated), got None")
    max_length = default_max_length if max_length is None else positive_int("max_length", max_length)
    return StaticCache(num_layers, batch_size, max_length, num_kv_heads, head_dim,
                       dtype=weight.dtype, device=weight.device)


def check_cache(cache, num_layers: int) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a multihead.cache.KVCache (model.make_cache()), got {type(cache).__name__}")
    if cache.num_layers != num_layers:
        raise ValueError(f"cache has {cache.num_layers} layers, the model has num_layers={num_layers}")


def check_key_mask(key_mask, input_ids: Tensor) -> None:
    if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
        got = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
        raise TypeError(f"key_mask must be a bool tensor (B, T), True = a real token, got {got}")
    if key_mask.shape != input_ids.shape:
        raise ValueError(f"key_mask must have input_ids' shape (B, T) = {tuple(input_ids.shape)}, "
                         f"got {tuple(key_mask.shape)}")
    if key_mask.device != input_ids.device:
        raise ValueError(f"key_mask is on {key_mask.device} but input_ids is on {input_ids.device}")
    if (key_mask[:, 1:] & ~key_mask[:, :-1]).any():  # a real token after padding
        rows = (key_mask[:, 1:] & ~key_mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"key_mask must pad on the right (True for the real tokens, then False), "
            f"got a real token after padding in rows {rows}"
        )


def init_weights(module: nn.Module) -> None:
    """GPT-2's and Llama's initialisation (normal, std 0.02; zero biases), for a model trained rather than loaded."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
