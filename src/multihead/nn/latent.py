"""Multi-head latent attention (MLA), as DeepSeek-V2 defines it (arXiv 2405.04434, section 2.1).

A KV cache of plain multi-head attention keeps every head's key and value for
every past token: 2·H·D numbers per token per layer. MLA keeps one small
latent vector c_KV (width d_c) per token instead, plus one rotary key k^R
(width d_rope) that all heads share, and rebuilds the heads' keys and values
from the latent with up-projections:

    h (B, T, C) --W_DKV--> c_KV (d_c) --RMSNorm--+--W_UK--> k^C per head (H, D)   --+
                                                 +--W_UV--> v   per head (H, Dv)    |
    h ----------W_KR---> RoPE --> k^R (d_rope), ONE for all heads ----------------+-- k = [k^C; k^R]
    h --W_DQ--> c_Q (d_c') --RMSNorm--+--W_UQ--> q^C per head (H, D)                |
      (or W_Q, W_QR straight from h)  +--W_QR--> RoPE --> q^R per head (H, d_rope) -+-- q = [q^C; q^R]

    scores = q·k / sqrt(D + d_rope);  out = W_O [softmax(scores) v over the heads]

The rotary part is "decoupled": RoPE cannot be applied to k^C, because a
rotation between W_UK and the query would stop W_UK from folding into the
query (below); so position lives in extra dims, q^R and k^R, and k^C carries
none.

Two paths give the same output (`absorb=`):

    plain     up-project the latent into per-head k, v (B, H, S, ·) and
              attend: what training and prefill want.
    absorbed  fold W_UK into the query, q^C_h·(W_UK,h c) = (W_UK,hᵀ q^C_h)·c,
              and W_UV after the weights, Σ_j p_j W_UV,h c_j = W_UV,h Σ_j p_j c_j:
              then every head attends to the SAME key [c_KV; k^R] and value
              c_KV, i.e. multi-query attention (G = 1) with head dim
              d_c + d_rope, straight on the cache, with no per-head k or v ever
              built: what decoding wants.

The cache holds c_KV as a (B, 1, S, d_c) "k" and the rotary key k^R as a
(B, 1, S, d_rope) "v" in the ordinary `multihead.nn.cache` classes:
(d_c + d_rope) elements per token per layer. `cache_elements_per_token`
gives that and MHA's, GQA's and MQA's counts for comparison (docs/latent.md).

On both paths the module builds its attention call itself, from tensors it
computed out of a checked input (no second check), and enters
`multihead.ops.run`; with a cache, the chunk is checked (`plan`) and the
backend asked before the cache's one write (`update`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import backends
from ..core import masks
from ..core.checks import check_like_parameters, flag, positive_int
from ..core.checks import key_mask as check_key_mask
from ..core.call import AttentionCall
from ..core.variants import check_softcap, check_window
from ..ops.run import choose, run
from .cache import (LayerCache, SlidingWindowCache, SlidingWindowLayerCache, StaticCache, StaticLayerCache,
                    check_layer_cache, chunk_lengths_from_key_mask, token_positions)
from .family import add_family, cache_mask, call_variants, check_cache_window, family_repr
from .mha import MultiHeadAttentionOutput, stand_in
from .rope import RotaryEmbedding, apply_rotary, check_positions

__all__ = [
    "CacheCost",
    "MultiHeadLatentAttention",
    "MultiHeadLatentAttentionConfig",
    "cache_comparison",
    "cache_comparison_table",
    "cache_elements_per_token",
    "make_latent_config",
    "make_static_cache",
    "make_window_cache",
]


@dataclass(frozen=True)
class MultiHeadLatentAttentionConfig:
    d_model: int  # C: width of the input h and of the output
    num_heads: int  # H: query heads (each gets its own k^C and v from the shared latent)
    head_dim: int  # D: width of the per-head "nope" query/key part q^C, k^C (d_h in the paper)
    rope_dim: int  # d_rope: width of q^R (per head) and of the one shared rotary key k^R; even
    v_head_dim: int  # Dv: width of each value head
    kv_latent_dim: int  # d_c: width of the cached latent c_KV
    q_latent_dim: int | None  # d_c': width of the query latent c_Q; None = no query compression
    rope_base: float  # RoPE's base (theta_i = base^(-2i/d_rope))
    bias: bool  # bias on the projections that read h (W_DKV, W_KR, W_DQ or W_Q, W_QR) and on W_O
    latent_norm: bool  # RMSNorm on c_KV (and c_Q) before their up-projections, as DeepSeek-V2 does
    norm_eps: float  # the RMSNorm's epsilon (1e-6 in DeepSeek-V2)
    backend: str  # "auto" or a registered attention backend name
    window: tuple[int | None, int | None] | None = None  # (left, right) keys around each query; None: all
    softcap: float | None = None  # scores -> softcap · tanh(scores / softcap); None: off
    alibi: bool = False  # ALiBi's fixed per-head slopes (`multihead.core.variants.alibi_slopes`)
    sinks: bool = False  # a learned sink logit per head in the softmax's denominator (gpt-oss)


def make_latent_config(
    d_model: int, num_heads: int, *, head_dim: int, rope_dim: int, kv_latent_dim: int,
    v_head_dim: int | None = None, q_latent_dim: int | None = None, rope_base: float = 10000.0,
    bias: bool = False, latent_norm: bool = True, norm_eps: float = 1e-6, backend: str = "auto",
    window=None, softcap: float | None = None, alibi: bool = False, sinks: bool = False,
) -> MultiHeadLatentAttentionConfig:
    """Check the constructor's arguments; v_head_dim defaults to head_dim."""
    positive_int("d_model", d_model)
    positive_int("num_heads", num_heads)
    positive_int("head_dim", head_dim)
    positive_int("rope_dim", rope_dim)
    if rope_dim % 2 != 0:
        raise ValueError(f"rope_dim must be even (RoPE rotates pairs of dims), got {rope_dim}")
    v_head_dim = head_dim if v_head_dim is None else positive_int("v_head_dim", v_head_dim)
    positive_int("kv_latent_dim", kv_latent_dim)
    if q_latent_dim is not None:
        positive_int("q_latent_dim", q_latent_dim)
    if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not math.isfinite(rope_base) \
            or rope_base <= 1:
        raise ValueError(f"rope_base must be a finite number > 1 (10000.0 in DeepSeek-V2), got {rope_base!r}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise ValueError(f"norm_eps must be a number > 0, got {norm_eps!r}")
    backends.check_name(backend)  # unknown name -> ValueError listing the known ones
    return MultiHeadLatentAttentionConfig(
        d_model, num_heads, head_dim, rope_dim, v_head_dim, kv_latent_dim, q_latent_dim,
        float(rope_base), flag("bias", bias), flag("latent_norm", latent_norm), float(norm_eps), backend,
        check_window(window), check_softcap(softcap), flag("alibi", alibi), flag("sinks", sinks),
    )


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2's multi-head latent attention, causal, batch-first: (B, T, C) in, (B, T, C) out.

    MultiHeadLatentAttention(d_model, num_heads, *, head_dim, rope_dim, kv_latent_dim,
                             v_head_dim=None, q_latent_dim=None, rope_base=10000.0,
                             bias=False, latent_norm=True, norm_eps=1e-6,
                             backend="auto", absorb=False, window=None, softcap=None,
                             alibi=False, sinks=False)

    Parameters, named after the paper's matrices (nn.Linear, y = x Wᵀ):
        kv_down  W_DKV (C -> d_c)          k_rope  W_KR (C -> d_rope)
        k_up     W_UK  (d_c -> H·D)        v_up    W_UV (d_c -> H·Dv)
        q_down   W_DQ  (C -> d_c')         q_up    W_UQ (d_c' -> H·D)      with q_latent_dim
        q_rope   W_QR  (d_c' or C -> H·d_rope)
        q_proj   W_Q   (C -> H·D)                                          without q_latent_dim
        out_proj W_O   (H·Dv -> C)
        kv_norm, q_norm: RMSNorm on c_KV and c_Q (latent_norm=True), as DeepSeek-V2.

    The up-projections from a latent (W_UK, W_UV, W_UQ and W_QR after c_Q)
    never have a bias: DeepSeek-V2 has none anywhere, and W_UK, W_UV must be
    plain linear maps to fold into the absorbed path. The cached latent is
    c_KV after its RMSNorm, so both paths read the same numbers.

    absorb: the default decoding path (forward's absorb=None uses it); both
    give the same output, see the module docstring.
    window, softcap, alibi, sinks: the attention family, as on
    `MultiHeadAttention` (`multihead.nn.family`); the scores are the same on
    both paths, so each variant applies to both. A `SlidingWindowCache` made
    with `make_window_cache` keeps only the window's latents.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: int, rope_dim: int, kv_latent_dim: int,
        v_head_dim: int | None = None, q_latent_dim: int | None = None, rope_base: float = 10000.0,
        bias: bool = False, latent_norm: bool = True, norm_eps: float = 1e-6, backend: str = "auto",
        absorb: bool = False, window=None, softcap: float | None = None, alibi: bool = False, sinks: bool = False,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        cfg = make_latent_config(
            d_model, num_heads, head_dim=head_dim, rope_dim=rope_dim, kv_latent_dim=kv_latent_dim,
            v_head_dim=v_head_dim, q_latent_dim=q_latent_dim, rope_base=rope_base, bias=bias,
            latent_norm=latent_norm, norm_eps=norm_eps, backend=backend, window=window, softcap=softcap,
            alibi=alibi, sinks=sinks,
        )
        if not isinstance(absorb, bool):
            raise TypeError(f"absorb must be a bool, got {type(absorb).__name__}")
        self.config = cfg
        self.absorb = absorb
        factory = dict(device=device, dtype=dtype)
        C, H, D, Dr, Dv, Dc = (cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.rope_dim,
                               cfg.v_head_dim, cfg.kv_latent_dim)
        self.kv_down = nn.Linear(C, Dc, bias=cfg.bias, **factory)
        self.kv_norm = nn.RMSNorm(Dc, eps=cfg.norm_eps, **factory) if cfg.latent_norm else None
        self.k_up = nn.Linear(Dc, H * D, bias=False, **factory)
        self.v_up = nn.Linear(Dc, H * Dv, bias=False, **factory)
        self.k_rope = nn.Linear(C, Dr, bias=cfg.bias, **factory)
        if cfg.q_latent_dim is None:
            self.q_down = self.q_norm = self.q_up = None
            self.q_proj = nn.Linear(C, H * D, bias=cfg.bias, **factory)
            self.q_rope = nn.Linear(C, H * Dr, bias=cfg.bias, **factory)
        else:
            Dq = cfg.q_latent_dim
            self.q_proj = None
            self.q_down = nn.Linear(C, Dq, bias=cfg.bias, **factory)
            self.q_norm = nn.RMSNorm(Dq, eps=cfg.norm_eps, **factory) if cfg.latent_norm else None
            self.q_up = nn.Linear(Dq, H * D, bias=False, **factory)
            self.q_rope = nn.Linear(Dq, H * Dr, bias=False, **factory)
        self.out_proj = nn.Linear(H * Dv, C, bias=cfg.bias, **factory)
        self.rope = RotaryEmbedding(Dr, base=cfg.rope_base)
        add_family(self, H, alibi=cfg.alibi, sinks=cfg.sinks, **factory)  # self.alibi_slopes, self.sinks

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, num_heads={c.num_heads}, head_dim={c.head_dim}, "
                f"rope_dim={c.rope_dim}, v_head_dim={c.v_head_dim}, kv_latent_dim={c.kv_latent_dim}, "
                f"q_latent_dim={c.q_latent_dim}, latent_norm={c.latent_norm}, absorb={self.absorb}"
                f"{family_repr(c.window, c.softcap, c.alibi, c.sinks)}")

    def __prepare_scriptable__(self):
        raise TypeError(f"{type(self).__name__} does not support torch.jit.script; use torch.compile, or "
                        f"torch.export.export(module, (x,)) for a graph (torch.jit.trace(module, x) works too, and "
                        f"returns the tuple (output, weights))")

    @property
    def scale(self) -> float:
        """1 / sqrt(D + d_rope): a head's score is a dot product over [q^C; q^R], D + d_rope dims."""
        return 1.0 / math.sqrt(self.config.head_dim + self.config.rope_dim)

    def cache_elements_per_token(self) -> int:
        """Numbers one token of one sequence costs in this layer's cache: d_c + d_rope."""
        return self.config.kv_latent_dim + self.config.rope_dim

    def bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one token of one sequence costs in this layer's cache: (d_c + d_rope)·size.

        dtype: the cache's dtype; default the module's parameters' dtype.
        """
        if dtype is None:
            dtype = self.kv_down.weight.dtype
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        return self.cache_elements_per_token() * dtype.itemsize

    # -- the pieces -----------------------------------------------------------------

    def latent(self, x: Tensor) -> Tensor:
        """c_KV = RMSNorm(W_DKV h): (B, T, C) -> (B, T, d_c), what the cache keeps per token."""
        c = self.kv_down(x)  # (B, T, C) -> (B, T, d_c)
        return c if self.kv_norm is None else self.kv_norm(c)

    def _queries(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q^C (B, H, T, D) and the unrotated q^R (B, H, T, d_rope), through c_Q when compressed."""
        cfg = self.config
        B, T, _ = x.shape
        H, D, Dr = cfg.num_heads, cfg.head_dim, cfg.rope_dim
        if self.q_proj is not None:
            q_nope, q_rot = self.q_proj(x), self.q_rope(x)  # (B, T, C) -> (B, T, H·D), (B, T, H·d_rope)
        else:
            c_q = self.q_down(x)  # (B, T, C) -> (B, T, d_c')
            if self.q_norm is not None:
                c_q = self.q_norm(c_q)
            q_nope, q_rot = self.q_up(c_q), self.q_rope(c_q)  # (B, T, d_c') -> (B, T, H·D), (B, T, H·d_rope)
        q_nope = q_nope.view(B, T, H, D).transpose(1, 2)  # (B, T, H·D) -> (B, H, T, D)
        q_rot = q_rot.view(B, T, H, Dr).transpose(1, 2)  # (B, T, H·d_rope) -> (B, H, T, d_rope)
        return q_nope, q_rot

    def _check_input(self, x) -> None:
        C = self.config.d_model
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor (B, T, d_model={C}), got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x has {x.dim()} dims, (B, T, d_model={C}) expected, got {tuple(x.shape)}")
        if x.shape[-1] != C:
            raise ValueError(f"x has width {x.shape[-1]}, d_model={C} expected, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        check_like_parameters(self.out_proj.weight, x=x)

    # -- forward --------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        positions: Tensor | None = None,
        need_weights: bool = False,
        absorb: bool | None = None,
    ) -> MultiHeadAttentionOutput:
        """x (B, T, C) -> MultiHeadAttentionOutput(output (B, T, C), weights (B, H, T, S) or None). Causal.

        key_mask: (B, T) bool, True = a real token. Without a cache it masks
            the keys (any pattern). With a cache it marks the chunk's real
            tokens, right-padded; padded ones are not cached.
        cache: one layer's cache (`cache[i]` of a `multihead.nn.cache`
            DynamicCache, a StaticCache from `make_static_cache`, or, for a
            module with a window, a SlidingWindowCache from
            `make_window_cache`, which keeps only the window's latents): the
            chunk's c_KV and k^R are appended, and its T queries attend to
            every real cached token, causal per sequence (bottom-right
            aligned at each sequence's own length). A refused call leaves it
            as it was.
        positions: (B, T) or (T,) absolute positions >= 0 of the chunk's tokens,
            for RoPE; default the cache's lengths[:, None] + arange(T), or
            arange(T) without a cache.
        need_weights: also return the per-head softmax weights, the same
            numbers on both paths; chosen as in `MultiHeadAttention`
            (`multihead.ops.run`: the eager path for backend="auto", else read
            off the named backend's logsumexp).
        absorb: True = the absorbed path, False = the plain one, None = the
            module's `absorb` attribute.
        """
        absorb = self._check_call(x, key_mask, cache, positions, need_weights, absorb)
        positions = token_positions(positions, cache, x.shape[0], x.shape[1], x.device)  # (B, T) or (T,)
        cos, sin = self.rope(positions, dtype=x.dtype)  # (B|1, 1, T, d_rope) each
        c_kv = self.latent(x)[:, None]  # (B, T, d_c) -> (B, 1, T, d_c): one "kv head"
        k_rot = apply_rotary(self.k_rope(x)[:, None], cos, sin)  # (B, T, d_rope) -> (B, 1, T, d_rope)
        q_nope, q_rot = self._queries(x)  # (B, H, T, D), (B, H, T, d_rope)
        q = self._query(q_nope, apply_rotary(q_rot, cos, sin), absorb)  # (B, H, T, D + d_rope | d_c + d_rope)
        if cache is None:
            mask = None if key_mask is None else masks.key_mask_to_attn_mask(key_mask)  # (B, 1, 1, S)
            call = self._call(q, *self._keys_values(c_kv, k_rot, absorb), mask, causal=True)
        else:  # every check, the backend's answer included, before the chunk is written
            call = self._cached_call(q, c_kv, k_rot, key_mask, cache, need_weights, absorb)
        attended = run(call, self.config.backend, need_weights=need_weights)  # (B, H, T, Dv | d_c)
        out = self._values_up(attended.out) if absorb else attended.out  # (B, H, T, Dv)
        B, H, T, Dv = out.shape
        out = out.transpose(1, 2).reshape(B, T, H * Dv)  # (B, H, T, Dv) -> (B, T, H·Dv): concat heads
        return MultiHeadAttentionOutput.returned(self.out_proj(out), attended.weights)

    def _check_call(self, x, key_mask, cache, positions, need_weights, absorb) -> bool:
        """Every argument of forward checked before anything is computed or cached; returns absorb."""
        self._check_input(x)
        absorb = self.absorb if absorb is None else absorb
        flag("absorb", absorb)
        flag("need_weights", need_weights)
        B, T = x.shape[0], x.shape[1]
        if cache is not None:
            check_layer_cache(cache, B, "input x")
            check_cache_window(cache, self.config.window)
            check_latent_cache(cache, self.config)
        if key_mask is not None and cache is None:
            check_key_mask(key_mask, B, T, x.device, what="T")
        if positions is not None:
            check_positions(positions, batch_size=B, length=T, device=x.device)
        return absorb

    def _call(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, *,
              cached: bool = False) -> AttentionCall:
        """The attention call, built once from this module's own tensors of a checked input: not checked again.

        The explicit scale matters on the absorbed path, whose q is d_c + d_rope wide but means D + d_rope.
        cached: the keys are a cache's slots, whose window and ALiBi are in the mask (`family.cache_mask`).
        """
        cfg = self.config
        variants = call_variants(cfg.window, cfg.softcap, self.alibi_slopes, self.sinks, cached=cached)
        return AttentionCall(q, k, v, mask, causal, self.scale, 0.0, variants)

    def _cached_call(self, q, c_kv, k_rot, key_mask, cache: LayerCache, need_weights: bool,
                     absorb: bool) -> AttentionCall:
        """The call over everything cached once the chunk's c_KV (B, 1, T, d_c) and k^R (B, 1, T, d_rope) are in.

        c_KV rides in the cache's "k" slot and k^R in its "v" slot. The chunk is
        checked against the cache (`plan`) and the backend asked, on keys and
        values of the shapes they will have, before the one write (`update`):
        a refused call leaves the cache as it was.
        """
        B, T = c_kv.shape[0], c_kv.shape[2]
        chunk_lengths = None if key_mask is None else chunk_lengths_from_key_mask(key_mask, B, T, c_kv.device)
        layout = cache.plan(c_kv, k_rot, chunk_lengths)  # checked; nothing written
        cfg, S = self.config, layout.kv_len
        # the shapes _keys_values will give: one shared head of [c_KV; k^R] and c_KV, or H heads of D + d_rope and Dv
        G, Dk, Dv = ((1, cfg.kv_latent_dim + cfg.rope_dim, cfg.kv_latent_dim) if absorb
                     else (cfg.num_heads, cfg.head_dim + cfg.rope_dim, cfg.v_head_dim))
        keys, values = stand_in(q, B, G, S, Dk), stand_in(q, B, G, S, Dv)  # (B, G, S, Dk), (B, G, S, Dv)
        mask = cache_mask(layout.attn_mask, layout, cfg.window, self.alibi_slopes, self.out_proj.weight.dtype)
        planned = self._call(q, keys, values, mask, causal=False, cached=True)  # mask (B, 1|H, T, S)
        choose(planned, self.config.backend, need_weights=need_weights)  # raises before the cache is written
        cached = cache.update(c_kv, k_rot, layout=layout)  # (B, 1, S, d_c), (B, 1, S, d_rope), mask (B, 1, T, S)
        k, v = self._keys_values(cached.k, cached.v, absorb)  # (B, G, S, Dk), (B, G, S, Dv): as the stand-ins
        return planned._replace(k=k, v=v)

    def _query(self, q_nope: Tensor, q_rot: Tensor, absorb: bool) -> Tensor:
        """Every head's query: [q^C; q^R] (B, H, T, D + d_rope), absorbed [W_UKᵀ q^C; q^R] (B, H, T, d_c + d_rope)."""
        if absorb:
            cfg = self.config
            # W_UK,h as (D, d_c) per head: q^C_h·(W_UK,h c) = (W_UK,hᵀ q^C_h)·c, so the query meets c itself.
            w_uk = self.k_up.weight.view(cfg.num_heads, cfg.head_dim, cfg.kv_latent_dim)  # (H·D, d_c) -> (H, D, d_c)
            q_nope = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, D) -> (B, H, T, d_c)
        return torch.cat((q_nope, q_rot), dim=-1)  # (B, H, T, D | d_c) + (B, H, T, d_rope)

    def _keys_values(self, c_kv: Tensor, k_rot: Tensor, absorb: bool) -> tuple[Tensor, Tensor]:
        """The keys and values every head attends to, from c_KV (B, 1, S, d_c) and k^R (B, 1, S, d_rope)."""
        return (self._absorbed if absorb else self._plain)(c_kv, k_rot)

    def _plain(self, c_kv: Tensor, k_rot: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head k (B, H, S, D + d_rope) and v (B, H, S, Dv) up-projected from the latent."""
        cfg = self.config
        B, S, H = c_kv.shape[0], c_kv.shape[2], cfg.num_heads
        k_nope = self.k_up(c_kv[:, 0]).view(B, S, H, cfg.head_dim).transpose(1, 2)  # (B, S, d_c) -> (B, H, S, D)
        v = self.v_up(c_kv[:, 0]).view(B, S, H, cfg.v_head_dim).transpose(1, 2)  # (B, S, d_c) -> (B, H, S, Dv)
        k = torch.cat((k_nope, k_rot.expand(B, H, S, cfg.rope_dim)), dim=-1)  # (B, H, S, D + d_rope): k^R to every head
        return k, v

    def _absorbed(self, c_kv: Tensor, k_rot: Tensor) -> tuple[Tensor, Tensor]:
        """W_UK folded into the query: every head meets the same key [c_KV; k^R] and value c_KV (G = 1)."""
        k = torch.cat((c_kv, k_rot), dim=-1)  # (B, 1, S, d_c + d_rope): one key for all heads
        return k, c_kv  # the heads' weights average the latent; W_UV comes after

    def _values_up(self, out: Tensor) -> Tensor:
        """Σ_j p_j W_UV,h c_j = W_UV,h (Σ_j p_j c_j): (B, H, T, d_c) -> (B, H, T, Dv)."""
        cfg = self.config
        w_uv = self.v_up.weight.view(cfg.num_heads, cfg.v_head_dim, cfg.kv_latent_dim)  # (H·Dv, d_c) -> (H, Dv, d_c)
        return torch.einsum("bhtc,hvc->bhtv", out, w_uv)  # (B, H, T, d_c) -> (B, H, T, Dv)


def check_latent_cache(cache: LayerCache, config: MultiHeadLatentAttentionConfig) -> None:
    """A preallocated cache must hold this config's latents: one "head" of c_KV (d_c) and k^R (d_rope)."""
    if not isinstance(cache, (StaticLayerCache, SlidingWindowLayerCache)):
        return  # a dynamic cache takes the shapes of its first chunk and checks the rest against them
    held = (cache.num_kv_heads, cache.head_dim, cache.v_head_dim)
    if held != (1, config.kv_latent_dim, config.rope_dim):
        kind = type(cache).__name__.replace("LayerCache", "Cache")
        raise ValueError(f"this {kind} holds (heads, d_c, d_rope) = {held} per token, the module's latents are "
                         f"(1, kv_latent_dim={config.kv_latent_dim}, rope_dim={config.rope_dim}): make the cache "
                         f"for this config (make_static_cache or make_window_cache)")


def make_static_cache(
    config: MultiHeadLatentAttentionConfig, num_layers: int, batch_size: int, max_length: int, *,
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
) -> StaticCache:
    """A StaticCache shaped for MLA layers of this config: "k" = c_KV (1, d_c), "v" = k^R (1, d_rope)."""
    if not isinstance(config, MultiHeadLatentAttentionConfig):
        raise TypeError(f"config must be a MultiHeadLatentAttentionConfig (module.config), "
                        f"got {type(config).__name__}")
    return StaticCache(num_layers, batch_size, max_length, 1, config.kv_latent_dim, config.rope_dim,
                       dtype=dtype, device=device)


def make_window_cache(
    config: MultiHeadLatentAttentionConfig, num_layers: int, batch_size: int, *,
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
) -> SlidingWindowCache:
    """A SlidingWindowCache for MLA layers of this config (which has a window): the last left + 1 latents."""
    if not isinstance(config, MultiHeadLatentAttentionConfig):
        raise TypeError(f"config must be a MultiHeadLatentAttentionConfig (module.config), "
                        f"got {type(config).__name__}")
    if config.window is None or config.window[0] is None:
        raise ValueError(f"a window cache needs a config with a window whose left side is limited, "
                         f"got window={config.window}")
    return SlidingWindowCache(num_layers, batch_size, config.window, 1, config.kv_latent_dim, config.rope_dim,
                              dtype=dtype, device=device)


# -- what a token costs in the cache ----------------------------------------------------

_KINDS = ("mha", "gqa", "mqa", "mla")


def cache_elements_per_token(
    kind: str, *, num_heads: int | None = None, head_dim: int | None = None,
    num_kv_heads: int | None = None, kv_latent_dim: int | None = None, rope_dim: int | None = None,
) -> int:
    """Numbers one token of one sequence keeps in one layer's cache (multiply by the dtype's size for bytes).

        "mha": 2·H·D       (num_heads, head_dim)     a key and a value per head
        "gqa": 2·G·D       (num_kv_heads, head_dim)  per key/value group
        "mqa": 2·D         (head_dim)                one key and one value for all heads
        "mla": d_c + d_rope (kv_latent_dim, rope_dim) the latent and the shared rotary key
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    needed = {"mha": ("num_heads", "head_dim"), "gqa": ("num_kv_heads", "head_dim"), "mqa": ("head_dim",),
              "mla": ("kv_latent_dim", "rope_dim")}[kind]
    given = dict(num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
                 kv_latent_dim=kv_latent_dim, rope_dim=rope_dim)
    for name in needed:
        if given[name] is None:
            raise ValueError(f"kind={kind!r} needs {' and '.join(needed)}; {name} is missing")
        positive_int(name, given[name])
    if kind == "mha":
        return 2 * num_heads * head_dim
    if kind == "gqa":
        return 2 * num_kv_heads * head_dim
    if kind == "mqa":
        return 2 * head_dim
    return kv_latent_dim + rope_dim


class CacheCost(NamedTuple):
    name: str  # "MHA", "GQA (8 groups)", ...
    formula: str  # the per-layer count in the paper's symbols
    elements: int  # numbers per token per layer
    vs_mha: float  # elements / MHA's elements
    gqa_groups: float  # the n_g of a GQA with the same cache: elements / (2·d_h) (MLA: 2.25 in the paper)


def cache_comparison(num_heads: int, head_dim: int, num_kv_heads: int, kv_latent_dim: int,
                     rope_dim: int) -> list[CacheCost]:
    """MHA, GQA (num_kv_heads groups), MQA and MLA side by side, for one attention size."""
    mha = cache_elements_per_token("mha", num_heads=num_heads, head_dim=head_dim)
    rows = [
        ("MHA", "2·n_h·d_h", mha),
        (f"GQA ({num_kv_heads} groups)", "2·n_g·d_h",
         cache_elements_per_token("gqa", num_kv_heads=num_kv_heads, head_dim=head_dim)),
        ("MQA", "2·d_h", cache_elements_per_token("mqa", head_dim=head_dim)),
        ("MLA", "d_c + d_h^R",
         cache_elements_per_token("mla", kv_latent_dim=kv_latent_dim, rope_dim=rope_dim)),
    ]
    return [CacheCost(name, formula, n, n / mha, n / (2 * head_dim)) for name, formula, n in rows]


def cache_comparison_table(num_heads: int = 128, head_dim: int = 128, num_kv_heads: int = 8,
                           kv_latent_dim: int = 512, rope_dim: int = 64, num_layers: int = 60) -> str:
    """The comparison as a Markdown table (defaults: DeepSeek-V2's sizes), as docs/latent.md carries it.

    Bytes are for bf16 (2 per number); the last column adds up num_layers layers.
    """
    positive_int("num_layers", num_layers)
    lines = [
        "| attention | per token per layer | elements | vs MHA | as GQA with n_g = | bf16 bytes per layer "
        f"| bf16 KiB, {num_layers} layers |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in cache_comparison(num_heads, head_dim, num_kv_heads, kv_latent_dim, rope_dim):
        size = row.elements * torch.bfloat16.itemsize
        lines.append(f"| {row.name} | {row.formula} | {row.elements:,} | {row.vs_mha:.2%} | {row.gqa_groups:g} "
                     f"| {size:,} | {size * num_layers / 1024:,.1f} |")
    return "\n".join(lines)
