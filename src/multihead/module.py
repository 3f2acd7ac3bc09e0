"""MultiHeadAttention: projections, split into heads, attend, merge, W^O.

The seeds' picture, batched: every head i has its own W_i^Q, W_i^K, W_i^V;
here they are stacked side by side into one projection per role, so a single
matmul computes all heads at once, and `head(i)` cuts head i's matrices back
out. Grouped-query attention (num_kv_heads < num_heads) lets R = H / G query
heads share one key/value head; num_kv_heads = 1 is multi-query attention.

    x (B, T, C) --W^Q--> (B, T, H·D) -> (B, H, T, D) --+
    y (B, S, kdim) --W^K--> (B, G, S, D) --------------+-- attention --> (B, H, T, Dv)
    y (B, S, vdim) --W^V--> (B, G, S, Dv) -------------+        |
                                                   concat heads (B, T, H·Dv) --W^O--> (B, T, C)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import backends, masks
from ._checks import positive_int, probability
from .cache import LayerCache
from .functional import attention, attention_with_weights, check_mask
from .weights import attention_and_weights
from .rope import RotaryEmbedding, apply_rotary, check_positions


@dataclass(frozen=True)
class MultiHeadAttentionConfig:
    d_model: int  # C: width of the query input and of the output
    num_heads: int  # H: query heads
    num_kv_heads: int  # G: key/value heads; H % G == 0 (G == H: MHA, G == 1: MQA)
    head_dim: int  # D: width of each query/key head (d_k)
    v_head_dim: int  # Dv: width of each value head (d_v)
    kdim: int  # width of the key input (d_model for self-attention)
    vdim: int  # width of the value input (d_model for self-attention)
    bias: bool  # whether the four projections have a bias
    dropout: float  # dropout on the attention weights, in training only
    causal: bool  # bottom-right aligned causal mask on every call
    backend: str  # "auto" or a registered backend name


def make_config(
    d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
    v_head_dim: int | None = None, kdim: int | None = None, vdim: int | None = None,
    bias: bool = True, dropout: float = 0.0, causal: bool = False, backend: str = "auto",
) -> MultiHeadAttentionConfig:
    """Check the constructor's arguments and fill in the textbook defaults (d_k = d_v = d_model / h)."""
    positive_int("d_model", d_model)
    positive_int("num_heads", num_heads)
    if head_dim is None:
        if d_model % num_heads != 0:
            raise ValueError(
                f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                f"pass head_dim to choose the per-head width yourself"
            )
        head_dim = d_model // num_heads
    positive_int("head_dim", head_dim)
    v_head_dim = head_dim if v_head_dim is None else positive_int("v_head_dim", v_head_dim)
    num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} "
            f"(each key/value head serves num_heads / num_kv_heads query heads)"
        )
    kdim = d_model if kdim is None else positive_int("kdim", kdim)
    vdim = d_model if vdim is None else positive_int("vdim", vdim)
    probability("dropout", dropout)
    if backend != "auto":
        backends.get(backend)  # unknown name -> ValueError listing the known ones
    return MultiHeadAttentionConfig(
        d_model, num_heads, num_kv_heads, head_dim, v_head_dim, kdim, vdim,
        bool(bias), float(dropout), bool(causal), backend,
    )


def weights_on_demand(device: torch.device) -> bool:
    """Whether need_weights reads the weights off a fused kernel's logsumexp on this device (see forward)."""
    return device.type != "cpu"


class MultiHeadAttentionOutput(NamedTuple):
    output: Tensor  # (B, T, C)
    weights: Tensor | None  # (B, H, T, S) softmax weights per head when need_weights, else None


@dataclass(frozen=True)
class HeadProjections:
    """Head i's own matrices, in the seeds' X @ W orientation (views of the fused weights)."""

    index: int  # i, the query head
    kv_index: int  # the key/value head it reads: i // (num_heads / num_kv_heads)
    w_q: Tensor  # W_i^Q (C, D):     Q_i = X @ w_q + b_q
    w_k: Tensor  # W_i^K (kdim, D):  K_i = Y @ w_k + b_k
    w_v: Tensor  # W_i^V (vdim, Dv): V_i = Y @ w_v + b_v
    w_o: Tensor  # head i's rows of W^O (Dv, C): output = sum_i Z_i @ w_o + b_o
    b_q: Tensor | None  # (D,)
    b_k: Tensor | None  # (D,)
    b_v: Tensor | None  # (Dv,)


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch-first: (B, T, C) in, (B, T, C) out.

    MultiHeadAttention(d_model, num_heads, *, num_kv_heads=None, head_dim=None,
                       v_head_dim=None, kdim=None, vdim=None, bias=True,
                       dropout=0.0, causal=False, backend="auto", rope=None)

    Defaults follow the textbook: head_dim = v_head_dim = d_model / num_heads
    and one key/value head per query head.

    rope: a `multihead.rope.RotaryEmbedding` of width head_dim rotates q and k
    to their positions after the projections and before the cache (Llama's
    order), so cached keys keep the rotation of the position they were
    written at.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
        head_dim: int | None = None, v_head_dim: int | None = None, kdim: int | None = None,
        vdim: int | None = None, bias: bool = True, dropout: float = 0.0, causal: bool = False,
        backend: str = "auto", rope: RotaryEmbedding | None = None, device=None, dtype=None,
    ) -> None:
        super().__init__()
        cfg = make_config(
            d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            v_head_dim=v_head_dim, kdim=kdim, vdim=vdim, bias=bias, dropout=dropout,
            causal=causal, backend=backend,
        )
        self.config = cfg
        if rope is not None and not isinstance(rope, RotaryEmbedding):
            raise TypeError(f"rope must be a multihead.rope.RotaryEmbedding or None, got {type(rope).__name__}")
        if rope is not None and rope.head_dim != cfg.head_dim:
            raise ValueError(f"rope rotates head_dim={rope.head_dim}, the heads have head_dim={cfg.head_dim}")
        self.rope = rope  # a module without weights: the state dict is unchanged
        factory = dict(device=device, dtype=dtype)
        H, G, D, Dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
        # W^Q = [W_1^Q | ... | W_H^Q] as one Linear; likewise W^K, W^V over the G kv heads.
        self.q_proj = nn.Linear(cfg.d_model, H * D, bias=cfg.bias, **factory)
        self.k_proj = nn.Linear(cfg.kdim, G * D, bias=cfg.bias, **factory)
        self.v_proj = nn.Linear(cfg.vdim, G * Dv, bias=cfg.bias, **factory)
        self.out_proj = nn.Linear(H * Dv, cfg.d_model, bias=cfg.bias, **factory)

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, num_heads={c.num_heads}, num_kv_heads={c.num_kv_heads}, "
                f"head_dim={c.head_dim}, v_head_dim={c.v_head_dim}, causal={c.causal}, "
                f"backend={c.backend!r}")

    def _check_input(self, name: str, x, width: int, width_name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, len, {width_name}), got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} has {x.dim()} dims, (B, len, {width_name}={width}) expected, got {tuple(x.shape)}")
        if x.shape[-1] != width:
            raise ValueError(f"{name} has width {x.shape[-1]}, {width_name}={width} expected, got {tuple(x.shape)}")

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        need_weights: bool = False,
        cache: LayerCache | None = None,
        positions: Tensor | None = None,
    ) -> MultiHeadAttentionOutput:
        """query (B, T, C); key (B, S, kdim) and value (B, S, vdim), both default to query.

        attn_mask: bool (True = may attend) or float (added to the scores),
            (T, S) or (B|1, H|1, T|1, S).
        key_mask: (B, S) bool, True = a real token, False = padding.
        need_weights: also return the per-head weights (B, H, T, S), the softmax
            probabilities before dropout. On a GPU the output still comes from
            the fused kernel, which returns the logsumexp, and the weights are
            read off it exactly (`multihead.weights.attention_and_weights`);
            those weights carry no gradient (the output does). On the CPU the
            eager path (`attention_with_weights`, one T x S buffer worked in
            place, weights differentiable) is faster than recomputing from the
            logsumexp (0.98x against 0.57x of torch's time at T=128 here), so
            it runs there.
        cache: a layer cache (`cache[i]` of a `multihead.cache` KVCache), for
            decoding: the chunk's k and v are appended and its T queries attend
            to every real cached token, causal per sequence (bottom-right
            aligned at each sequence's own length). Self-attention of a causal
            module only (key and value are the query; a non-causal module
            would let cached tokens see the future, so it is refused).
            key_mask (B, T) then marks the chunk's real tokens, right-padded:
            padded ones are not cached. attn_mask, if any, is over the cache's
            S keys (S = k.shape[2] after the update) and is combined with it.
        positions: (B, T) or (T,) absolute positions of the query tokens, for
            rope only; default: the cache's lengths[:, None] + arange(T), or
            arange(T) without a cache.
        """
        cfg = self.config
        if key is None and value is not None:
            raise ValueError("value was given without key; pass key too (value alone is ambiguous)")
        key = query if key is None else key
        value = key if value is None else value
        self._check_input("query", query, cfg.d_model, "d_model")
        self._check_input("key", key, cfg.kdim, "kdim")
        self._check_input("value", value, cfg.vdim, "vdim")
        B, T, _ = query.shape
        S = key.shape[1]
        if key.shape[0] != B or value.shape[0] != B or value.shape[1] != S:
            raise ValueError(
                f"query (B, T, C), key (B, S, kdim), value (B, S, vdim) must agree on B and S, "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        H, G, D, Dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim

        q = self.q_proj(query).view(B, T, H, D).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
        k = self.k_proj(key).view(B, S, G, D).transpose(1, 2)  # (B, S, kdim) -> (B, G, S, D)
        v = self.v_proj(value).view(B, S, G, Dv).transpose(1, 2)  # (B, S, vdim) -> (B, G, S, Dv)

        causal = cfg.causal
        if cache is not None or positions is not None or self.rope is not None:
            q, k, v, attn_mask, key_mask, causal = self._rotate_and_cache(
                query, key, value, q, k, v, attn_mask, key_mask, cache, positions)
            S = k.shape[2]  # with a cache: every cached slot, (B, G, S, D)

        mask = check_mask(attn_mask, q, B, H, T, S)
        if key_mask is not None:
            if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
                got = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
                raise TypeError(f"key_mask must be a bool tensor (B, S), True = a real token, got {got}")
            if tuple(key_mask.shape) != (B, S):
                raise ValueError(f"key_mask must be (B, S) = {(B, S)}, got {tuple(key_mask.shape)}")
            mask = masks.combine(mask, masks.key_mask_to_attn_mask(key_mask), q.dtype)

        call = dict(attn_mask=mask, causal=causal,
                    dropout_p=cfg.dropout if self.training else 0.0)
        weights = None
        if need_weights:
            if not weights_on_demand(q.device):
                out, weights = attention_with_weights(q, k, v, **call)  # (B, H, T, Dv), (B, H, T, S)
            else:
                on_demand = attention_and_weights(q, k, v, **call)
                out, weights = on_demand.out, on_demand.weights  # (B, H, T, Dv), (B, H, T, S)
        else:
            out = attention(q, k, v, backend=cfg.backend, **call)  # (B, H, T, Dv)
        out = out.transpose(1, 2).reshape(B, T, H * Dv)  # (B, H, T, Dv) -> (B, T, H·Dv): concat heads
        return MultiHeadAttentionOutput(self.out_proj(out), weights)

    def _rotate_and_cache(self, query, key, value, q, k, v, attn_mask, key_mask, cache, positions):
        """RoPE on q and k, then the cache: (q, k, v, attn_mask, key_mask, causal) for the attention call.

        With a cache, k and v become everything cached (B, G, S, ·), the cache's
        mask (causal per sequence) joins attn_mask, key_mask is used up as the
        chunk's real tokens, and causal is off: the cache's mask already is it.
        """
        cfg = self.config
        B, H, T, _ = q.shape
        if key is not query or value is not query:
            raise ValueError(
                "cache= and rope= are for self-attention: key and value must be the query itself "
                "(leave them None); a separate key/value has positions and a history of its own"
            )
        chunk_lengths = None
        if cache is not None:
            if not isinstance(cache, LayerCache):
                hint = "; pass one layer's cache, cache[i]" if hasattr(cache, "layers") else ""
                raise TypeError(f"cache must be a multihead.cache.LayerCache, got {type(cache).__name__}{hint}")
            if not cfg.causal:
                raise ValueError(
                    "cache= needs a causal module (MultiHeadAttention(..., causal=True)): decoding appends "
                    "tokens that must not be seen by the ones before them"
                )
            if key_mask is not None:
                chunk_lengths = _right_padded_lengths(key_mask, B, T)
                key_mask = None  # the cache's mask now says which keys are real

        if positions is not None and self.rope is None:
            raise ValueError("positions= is only used by rope, and this module has rope=None")
        if self.rope is not None:
            if positions is None:
                positions = (torch.arange(T, device=q.device) if cache is None
                             else cache.positions(T, batch_size=B, device=q.device).to(q.device))  # (B, T)
            check_positions(positions, batch_size=B, length=T)
            if positions.device != q.device:
                raise ValueError(f"positions is on {positions.device} but the query is on {q.device}")
            cos, sin = self.rope(positions, dtype=q.dtype)  # (B|1, 1, T, D) each
            q = apply_rotary(q, cos, sin)  # (B, H, T, D)
            k = apply_rotary(k, cos, sin)  # (B, G, T, D)
        if cache is None:
            return q, k, v, attn_mask, key_mask, cfg.causal

        k, v, cache_mask = cache.update(k, v, chunk_lengths)  # (B, G, S, D), (B, G, S, Dv), (B, 1, T, S)
        S = k.shape[2]
        attn_mask = masks.combine(check_mask(attn_mask, q, B, H, T, S), cache_mask, q.dtype)
        return q, k, v, attn_mask, key_mask, False

    def head(self, i: int) -> HeadProjections:
        """Head i's W_i^Q, W_i^K, W_i^V and its rows of W^O, cut out of the fused projections."""
        cfg = self.config
        H, G, D, Dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
        if isinstance(i, bool) or not isinstance(i, int) or not -H <= i < H:
            raise IndexError(f"head index must be an int in [0, {H}), got {i!r}")
        i = i % H
        g = i // (H // G)

        def rows(linear: nn.Linear, index: int, width: int):
            weight = linear.weight.detach()[index * width:(index + 1) * width]  # (width, in)
            bias = None if linear.bias is None else linear.bias.detach()[index * width:(index + 1) * width]
            return weight.T, bias  # (width, in) -> (in, width): the X @ W orientation

        w_q, b_q = rows(self.q_proj, i, D)
        w_k, b_k = rows(self.k_proj, g, D)
        w_v, b_v = rows(self.v_proj, g, Dv)
        w_o = self.out_proj.weight.detach()[:, i * Dv:(i + 1) * Dv].T  # (C, Dv) -> (Dv, C)
        return HeadProjections(i, g, w_q, w_k, w_v, w_o, b_q, b_k, b_v)


def _right_padded_lengths(key_mask, B: int, T: int) -> Tensor:
    """key_mask (B, T) of a cached chunk, True = real, right-padded -> real tokens per sequence (B,)."""
    if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
        got = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
        raise TypeError(f"key_mask must be a bool tensor (B, T), True = a real token, got {got}")
    if tuple(key_mask.shape) != (B, T):
        raise ValueError(f"with a cache, key_mask marks the new chunk's real tokens: (B, T) = {(B, T)} "
                         f"expected, got {tuple(key_mask.shape)}")
    if not torch.compiler.is_compiling() and bool((key_mask[:, 1:] & ~key_mask[:, :-1]).any()):
        raise ValueError("with a cache, key_mask must pad on the right (True for the real tokens, then False): "
                         "a cached sequence's tokens sit at consecutive positions")
    return key_mask.sum(dim=-1)  # (B, T) -> (B,)
