"""MultiHeadAttention: project -> rotate -> cache -> attend -> merge.

The textbook picture, batched: every head i has its own W_i^Q, W_i^K, W_i^V;
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

from .. import backends
from ..core import masks
from ..core.call import DTYPES, AttentionCall, check_mask, check_scale
from ..core.checks import check_like_parameters, flag, positive_int, probability
from ..core.checks import key_mask as check_key_mask
from ..core.variants import Variants, check_softcap, check_window
from ..ops.run import choose, run
from .cache import ChunkLayout, LayerCache, check_layer_cache, chunk_lengths_from_key_mask, token_positions
from .family import add_family, cache_mask, call_variants, check_cache_window, family_repr
from .linear_call import call_linear
from .rope import Rotary, RotaryEmbedding, apply_rotary, check_positions


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
    window: tuple[int | None, int | None] | None = None  # (left, right) keys around each query; None: all
    softcap: float | None = None  # scores -> softcap · tanh(scores / softcap) (Gemma-2); None: off
    alibi: bool = False  # ALiBi's fixed per-head slopes (`multihead.core.variants.alibi_slopes`)
    sinks: bool = False  # a learned sink logit per head in the softmax's denominator (gpt-oss)


def make_config(
    d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
    v_head_dim: int | None = None, kdim: int | None = None, vdim: int | None = None,
    bias: bool = True, dropout: float = 0.0, causal: bool = False, backend: str = "auto",
    window=None, softcap: float | None = None, alibi: bool = False, sinks: bool = False,
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
    backends.check_name(backend)  # unknown name -> ValueError listing the known ones
    return MultiHeadAttentionConfig(
        d_model, num_heads, num_kv_heads, head_dim, v_head_dim, kdim, vdim,
        flag("bias", bias), float(dropout), flag("causal", causal), backend,
        check_window(window), check_softcap(softcap), flag("alibi", alibi), flag("sinks", sinks),
    )


class MultiHeadAttentionOutput(NamedTuple):
    """What the modules return. Under torch.jit.trace the traced module returns the plain tuple
    (output, weights), with an empty tensor (0 elements) for weights not asked for: a traced graph
    cannot return None."""

    output: Tensor  # (B, T, C)
    weights: Tensor | None  # (B, H, T, S) softmax weights per head when need_weights, else None

    @classmethod
    def returned(cls, output: Tensor, weights: Tensor | None) -> MultiHeadAttentionOutput:
        """The result a module's forward returns: weights None stays None, except under torch.jit.trace."""
        if weights is None and torch.jit.is_tracing():  # a graph's outputs are tensors: None cannot leave it
            weights = output.new_empty(0)  # (0,): no weights
        return cls(output, weights)


@dataclass(frozen=True)
class HeadProjections:
    """Head i's own projection matrices, in the textbook's X @ W orientation (views of the fused parameters)."""

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

    rope: a `multihead.nn.rope.RotaryEmbedding` of width head_dim rotates q and k
    to their positions after the projections and before the cache (Llama's
    order), so cached keys keep the rotation of the position they were
    written at.
    backend: "auto" or a registered backend name, for every call of this
    module (with need_weights too; see forward).
    """

    def __init__(
        self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
        head_dim: int | None = None, v_head_dim: int | None = None, kdim: int | None = None,
        vdim: int | None = None, bias: bool = True, dropout: float = 0.0, causal: bool = False,
        backend: str = "auto", rope: RotaryEmbedding | None = None, window=None, softcap: float | None = None,
        alibi: bool = False, sinks: bool = False, device=None, dtype=None,
    ) -> None:
        super().__init__()
        cfg = make_config(
            d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            v_head_dim=v_head_dim, kdim=kdim, vdim=vdim, bias=bias, dropout=dropout,
            causal=causal, backend=backend, window=window, softcap=softcap, alibi=alibi, sinks=sinks,
        )
        self.config = cfg
        if rope is not None and not isinstance(rope, RotaryEmbedding):
            raise TypeError(f"rope must be a multihead.nn.rope.RotaryEmbedding or None, got {type(rope).__name__}")
        if rope is not None and rope.head_dim != cfg.head_dim:
            raise ValueError(f"rope rotates head_dim={rope.head_dim}, the heads have head_dim={cfg.head_dim}")
        self.rope = rope  # a module without parameters: the state dict is unchanged
        factory = dict(device=device, dtype=dtype)
        H, G, D, Dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
        # W^Q = [W_1^Q | ... | W_H^Q] as one Linear; likewise W^K, W^V over the G kv heads.
        self.q_proj = nn.Linear(cfg.d_model, H * D, bias=cfg.bias, **factory)
        self.k_proj = nn.Linear(cfg.kdim, G * D, bias=cfg.bias, **factory)
        self.v_proj = nn.Linear(cfg.vdim, G * Dv, bias=cfg.bias, **factory)
        self.out_proj = nn.Linear(H * Dv, cfg.d_model, bias=cfg.bias, **factory)
        self._scale = check_scale(None, cfg.head_dim, self.out_proj.weight.dtype)  # 1/sqrt(D), the textbook's
        add_family(self, H, alibi=cfg.alibi, sinks=cfg.sinks, **factory)  # self.alibi_slopes, self.sinks

    def extra_repr(self) -> str:
        c = self.config
        family = family_repr(c.window, c.softcap, c.alibi, c.sinks)
        return (f"d_model={c.d_model}, num_heads={c.num_heads}, num_kv_heads={c.num_kv_heads}, "
                f"head_dim={c.head_dim}, v_head_dim={c.v_head_dim}, causal={c.causal}, "
                f"backend={c.backend!r}{family}")

    def __prepare_scriptable__(self):
        raise TypeError(f"{type(self).__name__} does not support torch.jit.script; use torch.compile, or "
                        f"torch.export.export(module, (x,)) for a graph (torch.jit.trace(module, x) works too, and "
                        f"returns the tuple (output, weights))")

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
        context_parallel=None,
        head_mask: Tensor | None = None,
    ) -> MultiHeadAttentionOutput:
        """query (B, T, C); key (B, S, kdim) and value (B, S, vdim), both default to query.

        attn_mask: bool (True = may attend) or float (added to the scores),
            (T, S) or (B|1, H|1, T|1, S).
        key_mask: (B, S) bool, True = a real token, False = padding.
        need_weights: also return the per-head weights (B, H, T, S), the softmax
            probabilities before dropout. With backend="auto", or where the
            weights must carry a gradient (training), the eager path computes
            output and weights in one pass. With a named backend and nothing
            needing a gradient, the output comes from that backend's kernel
            and the weights are computed apart, exactly (`multihead.ops.run`
            says why).
        cache: a layer cache (`cache[i]` of a `multihead.nn.cache` KVCache), for
            decoding: the chunk's k and v are appended and its T queries attend
            to every real cached token, causal per sequence (bottom-right
            aligned at each sequence's own length). Self-attention of a causal
            module only. key_mask (B, T) then marks the chunk's real tokens,
            right-padded: padded ones are not cached. attn_mask, if any, is
            over the S keys held after the chunk is appended, and is combined
            with the cache's mask. Every argument is checked before the cache
            is written: a refused call leaves it as it was.
        positions: (B, T) or (T,) absolute positions >= 0 of the query tokens,
            for rope only; default: the cache's lengths[:, None] + arange(T), or
            arange(T) without a cache.
        context_parallel: a `multihead.distributed.ContextParallel`: query is this
            rank's part of the sequence (`shard_sequence(x, dim=1)`), key_mask its
            part of the mask, and attention runs over the whole sequence across
            the group (ring or all-to-all); RoPE rotates by global positions.
            Self-attention only, without cache, attn_mask, weights or dropout.
        head_mask: (H,): 1 keeps head i, 0 sets its output Z_i to 0 before W^O (`merge` says more).
        """
        if context_parallel is not None:
            return self._context_parallel(query, key, value, attn_mask, need_weights, cache, context_parallel,
                                          key_mask=key_mask, positions=positions, head_mask=head_mask)
        query, key, value = self._check_inputs(query, key, value, cache, positions)
        flag("need_weights", need_weights)
        gate = self._head_gate(head_mask)  # (1, H, 1, 1) or None; checked before a cache is written
        q, k, v = self.project(query, key, value)  # (B, H, T, D), (B, G, S, D), (B, G, S, Dv)
        if self.rope is not None:
            q, k = self.rotate(q, k, token_positions(positions, cache, q.shape[0], q.shape[2], q.device))
        if cache is None:
            call = self._call(q, k, v, self._mask(q, k, attn_mask, key_mask), self.config.causal)
        else:  # every check, the backend's answer included, before the chunk is written
            call = self._cached_call(q, k, v, attn_mask, key_mask, cache, need_weights)
        attended = run(call, self.config.backend, need_weights=need_weights)  # (B, H, T, Dv)
        return MultiHeadAttentionOutput.returned(self.merge(attended.out, gate), attended.weights)

    def decode(self, x: Tensor, cache: LayerCache, layout: ChunkLayout, rotation: Rotary | None = None) -> Tensor:
        """forward(x, cache=cache).output for a chunk x (B, T, C) whose place in the cache is `layout`: unchecked.

        The same stages as forward (project, RoPE, the cache's update, run,
        merge) without its checks, for a decoding loop that checked once what
        forward checks on every call (`multihead.models.decoder.Decoder.decode_step`):
        x is self-attention input of this module's dtype and device, `layout`
        comes from `cache.layout(T, chunk_lengths)` (or `KVCache.layout`) and
        the chunk fits. Nothing reads a tensor's value: under torch.compile
        the step is one graph.
        rotation: RoPE's (cos, sin) at layout.positions, when the loop computed
            them once for every layer; None: computed here (modules with rope).
        """
        q, k, v = self.project(x, x, x)  # (B, H, T, D), (B, G, T, D), (B, G, T, Dv)
        if self.rope is not None:
            cos, sin = self.rope(layout.positions, dtype=q.dtype) if rotation is None else rotation  # (B, 1, T, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cached = cache.update(k, v, layout=layout)  # (B, G, S, D), (B, G, S, Dv), mask (B, 1, T, S)
        mask = self._cache_mask(cached.attn_mask, layout)  # causal, the window, ALiBi: in the cache's mask
        call = self._call(q, cached.k, cached.v, mask, causal=False, cached=True)
        return self.merge(run(call, self.config.backend).out)  # (B, H, T, Dv) -> (B, T, C)

    # -- the stages ------------------------------------------------------------------

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C), (B, S, kdim), (B, S, vdim) -> q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv)."""
        cfg = self.config
        B, T, S = query.shape[0], query.shape[1], key.shape[1]
        q = call_linear(self.q_proj, query)  # (B, T, C) -> (B, T, H·D)
        k = call_linear(self.k_proj, key)  # (B, S, kdim) -> (B, S, G·D)
        v = call_linear(self.v_proj, value)  # (B, S, vdim) -> (B, S, G·Dv)
        q = q.view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (B, T, H·D) -> (B, H, T, D)
        k = k.view(B, S, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, S, G·D) -> (B, G, S, D)
        v = v.view(B, S, cfg.num_kv_heads, cfg.v_head_dim).transpose(1, 2)  # (B, S, G·Dv) -> (B, G, S, Dv)
        return q, k, v

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE: q (B, H, T, D) and k (B, G, T, D) turned to their positions (B, T) or (T,)."""
        cos, sin = self.rope(positions, dtype=q.dtype)  # (B|1, 1, T, D) each
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def merge(self, out: Tensor, gate: Tensor | None = None) -> Tensor:
        """Concatenate the heads and apply W^O: (B, H, T, Dv) -> (B, T, C).

        gate: head_mask as `_head_gate` made it, (1, H, 1, 1): head i's output
        is multiplied by its factor first. 1 (True) keeps the head, 0 (False)
        sets its Z_i to 0, so the layer computes concat(Z_1, .., 0, ..) W^O
        (+ the bias of W^O); other values scale Z_i, and a float mask that
        requires grad gives each head's gradient (an importance score). x * 1
        is exact, so a mask of ones changes nothing, bit for bit. The weights
        a forward returns are the heads' softmax probabilities, which the mask
        leaves as they were.
        """
        if gate is not None:  # decided by an argument, never by a tensor's value
            out = out * gate  # (B, H, T, Dv) * (1, H, 1, 1)
        B, H, T, Dv = out.shape
        concatenated = out.transpose(1, 2).reshape(B, T, H * Dv)  # (B, H, T, Dv) -> (B, T, H·Dv)
        return call_linear(self.out_proj, concatenated)  # (B, T, H·Dv) -> (B, T, C)

    def _context_parallel(self, query, key, value, attn_mask, need_weights, cache, cp, *, key_mask,
                          positions, head_mask=None) -> MultiHeadAttentionOutput:
        """forward with the sequence split across cp's group: per-token stages on the part, attention across.

        A check that fails on one rank is told to every rank (each raises, naming it) before it raises here.
        """
        # Known by what it does: the class lives in multihead.integrations, a layer above this one.
        if not all(callable(getattr(cp, name, None)) for name in ("refusals_heard", "part", "positions", "attention")):
            raise TypeError(f"context_parallel must be a multihead.distributed.ContextParallel or None, "
                            f"got {type(cp).__name__}")
        with cp.refusals_heard("MultiHeadAttention"):
            self._check_context_parallel(query, key, value, attn_mask, need_weights, cache, cp, positions)
            gate = self._head_gate(head_mask)  # (1, H, 1, 1) or None
        q, k, v = self.project(query, query, query)  # (B, H, part, D), (B, G, part, D), (B, G, part, Dv)
        if self.rope is not None:
            q, k = self.rotate(q, k, cp.positions(q.device) if positions is None else positions)
        cfg = self.config  # the module's attention family, over global positions across the group
        out = cp.attention(q, k, v, key_mask=key_mask, causal=cfg.causal, scale=self._scale, backend=cfg.backend,
                           window=cfg.window, softcap=cfg.softcap, alibi_slopes=self.alibi_slopes,
                           sinks=self.sinks)  # (B, H, part, Dv)
        return MultiHeadAttentionOutput.returned(self.merge(out, gate), None)

    def _check_context_parallel(self, query, key, value, attn_mask, need_weights, cache, cp, positions) -> None:
        refused = {"key/value other than the query": key is not None and key is not query
                   or value is not None and value is not query,
                   "cache": cache is not None, "attn_mask (use key_mask)": attn_mask is not None,
                   "need_weights": flag("need_weights", need_weights),
                   "dropout in training": self.training and self.config.dropout > 0}
        named = [name for name, given in refused.items() if given]
        if named:
            raise ValueError(f"context_parallel runs self-attention over a split sequence; it takes no "
                             f"{', '.join(named)}")
        self._check_inputs(query, None, None, None, positions)
        part = cp.part()
        if query.shape[1] != part:
            raise ValueError(f"query has {query.shape[1]} tokens; under context_parallel it must be this rank's "
                             f"part, {part} tokens of length={cp.length} (cut it with "
                             f"shard_sequence(x, dim=1, layout={cp.layout!r}))")
        cp.check_part("query", query)  # a part cut with another layout or length: refused, not silently wrong

    # -- checks and the cache ---------------------------------------------------------

    def _check_inputs(self, query, key, value, cache, positions) -> tuple[Tensor, Tensor, Tensor]:
        """The inputs as (query, key, value), key and value defaulting to the query; every shape checked."""
        cfg = self.config
        if key is None and value is not None:
            raise ValueError("value was given without key; pass key too (value alone is ambiguous)")
        if key is None and (cfg.kdim != cfg.d_model or cfg.vdim != cfg.d_model):
            raise ValueError(f"key and value default to the query (width d_model={cfg.d_model}), but this module "
                             f"projects keys of width kdim={cfg.kdim} and values of width vdim={cfg.vdim}; "
                             f"pass key (B, S, kdim) and value (B, S, vdim)")
        key = query if key is None else key
        value = key if value is None else value
        _check_input("query", query, cfg.d_model, "d_model")
        if key is not query or cfg.kdim != cfg.d_model:  # the same tensor checked against the same width: once
            _check_input("key", key, cfg.kdim, "kdim")
        if value is not query or cfg.vdim != cfg.d_model:
            _check_input("value", value, cfg.vdim, "vdim")
        B, S = query.shape[0], key.shape[1]
        if key.shape[0] != B or value.shape[0] != B or value.shape[1] != S:
            raise ValueError(
                f"query (B, T, C), key (B, S, kdim), value (B, S, vdim) must agree on B and S, "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if key is query and value is query:
            check_like_parameters(self.out_proj.weight, query=query)
        else:
            check_like_parameters(self.out_proj.weight, query=query, key=key, value=value)
        self._check_cache_use(query, key, value, cache, positions)
        return query, key, value

    def _check_cache_use(self, query, key, value, cache, positions) -> None:
        if cache is None and positions is None and self.rope is None:
            return
        if key is not query or value is not query:
            raise ValueError(
                "cache= and rope= are for self-attention: key and value must be the query itself "
                "(leave them None); a separate key/value has positions and a history of its own"
            )
        if positions is not None and self.rope is None:
            raise ValueError("positions= is only used by rope, and this module has rope=None")
        if cache is not None:
            check_layer_cache(cache, query.shape[0], "query")
            check_cache_window(cache, self.config.window)
            if not self.config.causal:
                raise ValueError(
                    "cache= needs a causal module (MultiHeadAttention(..., causal=True)): decoding appends "
                    "tokens that must not be seen by the ones before them"
                )
        if positions is not None:
            check_positions(positions, batch_size=query.shape[0], length=query.shape[1], device=query.device)

    def _head_gate(self, head_mask) -> Tensor | None:
        """head_mask (H,) checked where it enters, as the factor (1, H, 1, 1) on the heads' outputs; None: none."""
        if head_mask is None:
            return None
        check_head_mask(head_mask, self.config.num_heads, self.out_proj.weight.device)
        # In the outputs' dtype: a float64 mask must not promote a float32 layer (1.0 is exact in every dtype).
        return head_mask.to(self.out_proj.weight.dtype).view(1, -1, 1, 1)  # (H,) -> (1, H, 1, 1)

    def _call(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, *,
              cached: bool = False) -> AttentionCall:
        """The attention call, built here once and not checked again: q, k, v are this module's own projections
        of checked inputs, the mask is checked, the scale, dropout and variants are the module's.

        cached: the keys are a cache's slots, whose window and ALiBi are in the cache's mask (`_cache_mask`),
        so the variants carry neither (a cache's S is its capacity, not the aligned length).
        """
        return AttentionCall(q, k, v, mask, causal, self._scale, self.config.dropout if self.training else 0.0,
                             self._variants(cached))

    def _variants(self, cached: bool) -> Variants | None:
        """The module's variants for a call (`family.call_variants`)."""
        cfg = self.config
        return call_variants(cfg.window, cfg.softcap, self.alibi_slopes, self.sinks, cached=cached)

    def _mask(self, q, k, attn_mask, key_mask) -> Tensor | None:
        """Without a cache: attn_mask and key_mask checked and combined over the S keys."""
        mask = check_mask(attn_mask, q, k.shape[2])
        if key_mask is None:
            return mask
        real = check_key_mask(key_mask, q.shape[0], k.shape[2], q.device)
        return masks.combine(mask, masks.key_mask_to_attn_mask(real))

    def _cached_call(self, q, k, v, attn_mask, key_mask, cache: LayerCache, need_weights: bool) -> AttentionCall:
        """The call over everything cached once the chunk k (B, G, T, D), v (B, G, T, Dv) is appended.

        The chunk is checked against the cache (`plan`), attn_mask against the
        S keys it will hold, and the backend asked whether it runs the call,
        all before the one write (`update`): a refused call leaves the cache
        as it was. With a cache the causal rule is in the cache's mask (per
        sequence), not the causal flag.
        """
        B, G, T = k.shape[0], k.shape[1], k.shape[2]
        chunk_lengths = None if key_mask is None else chunk_lengths_from_key_mask(key_mask, B, T, q.device)
        layout = cache.plan(k, v, chunk_lengths)  # checked; nothing written
        S = layout.kv_len
        mask = masks.combine(check_mask(attn_mask, q, S), self._cache_mask(layout.attn_mask, layout))  # (B|1, H|1, T, S)
        keys, values = stand_in(k, B, G, S, k.shape[3]), stand_in(v, B, G, S, v.shape[3])  # (B, G, S, D), (.., Dv)
        planned = self._call(q, keys, values, mask, causal=False, cached=True)
        choose(planned, self.config.backend, need_weights=need_weights)  # raises before the cache is written
        cached = cache.update(k, v, layout=layout)  # (B, G, S, D), (B, G, S, Dv): the keys the stand-ins stood for
        return planned._replace(k=cached.k, v=cached.v)

    def _cache_mask(self, mask: Tensor, layout: ChunkLayout) -> Tensor:
        """The cache's mask (B, 1, T, S) with the module's window and ALiBi at the queries' and keys' own
        positions (`family.cache_mask`)."""
        return cache_mask(mask, layout, self.config.window, self.alibi_slopes, self.out_proj.weight.dtype)

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


def stand_in(like: Tensor, *shape: int) -> Tensor:
    """A tensor of `shape` with like's dtype and device, one value expanded: the shape of keys not written yet.

    What `choose` needs of the keys and values a cache will hold: a
    backend's `supports` reads shapes, dtypes, devices and flags, never values.
    """
    return like.new_empty(()).expand(*shape)  # () -> shape, no copy


def check_head_mask(head_mask, num_heads: int, device: torch.device, *, num_layers: int | None = None) -> Tensor:
    """head_mask as it enters a module (H,) or a model ((H,) or (L, H)): checked, returned unchanged.

    One factor per head on its output before W^O: 1 or True keeps the head, 0
    or False sets its output to 0. The shapes are Hugging Face's head_mask
    shapes; only the meaning differs (transformers multiplies the softmax
    probabilities, which changes the same head output).
    """
    shapes = f"({num_heads},)" if num_layers is None else f"({num_heads},) or ({num_layers}, {num_heads})"
    what = "(H,)" if num_layers is None else "(H,) for every layer or (L, H)"
    if not isinstance(head_mask, Tensor):
        raise TypeError(f"head_mask must be a tensor {what}, 1 = keep a head and 0 = remove it, "
                        f"got {type(head_mask).__name__}")
    if head_mask.is_complex() or head_mask.is_quantized:
        raise TypeError(f"head_mask must be a bool, integer or floating tensor, got {head_mask.dtype}")
    allowed = [(num_heads,)] + ([] if num_layers is None else [(num_layers, num_heads)])
    if tuple(head_mask.shape) not in allowed:
        raise ValueError(f"head_mask must have shape {what} = {shapes}, got {tuple(head_mask.shape)}")
    if head_mask.device != torch.device(device):
        raise ValueError(f"head_mask is on {head_mask.device} but the parameters are on {device}")
    return head_mask


def head_masks_per_layer(head_mask, num_layers: int, num_heads: int, device: torch.device) -> list:
    """A model's head_mask (None, (H,) or (L, H)) checked once, as one (H,) mask (or None) per layer."""
    if head_mask is None:
        return [None] * num_layers
    check_head_mask(head_mask, num_heads, device, num_layers=num_layers)
    if head_mask.dim() == 1:
        return [head_mask] * num_layers  # (H,): the same heads removed in every layer
    return list(head_mask.unbind(0))  # (L, H) -> L x (H,)


def _check_input(name: str, x, width: int, width_name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, len, {width_name}), got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{name} is a nested tensor; pass a padded (B, len, {width_name}) tensor and a key_mask")
    if x.dim() != 3:
        raise ValueError(f"{name} has {x.dim()} dims, (B, len, {width_name}={width}) expected, got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has width {x.shape[-1]}, {width_name}={width} expected, got {tuple(x.shape)}")
