"""torch.nn.MultiheadAttention's exact signature and semantics, on multihead's attention.

`MultiheadAttention` here is a drop-in replacement for `torch.nn.MultiheadAttention`:
the same constructor, the same forward, the same parameters under the same
names (so state dicts move between the two in both directions), the same
initialisation (same seed, same weights). The projections are done here and
the attention itself runs through `multihead.attention` /
`multihead.ops.run`, the one path every multihead module takes, so it gets
multihead's backends and its weights on demand.

`from_torch(m)` turns an existing torch module into this drop-in (the same
call gives the same numbers); `to_multihead(m)` into multihead's own
`MultiHeadAttention` (batch-first, True = may attend); `to_torch` goes back.

This is the only place in multihead that speaks torch's inverted mask
convention, and it converts at the edge:

    torch (this module's arguments)          multihead (everything inside)
    bool True  = NOT allowed to attend       bool True = may attend
    key_padding_mask True = padding          key_mask True = a real token
    float mask: added to the scores          float mask: added to the scores

Layouts, also converted at the edge: batch_first=False inputs are (T, B, C),
batch_first=True (B, T, C), unbatched (T, C); inside everything is (B, H, T, D).

Where this module deliberately differs from torch (each is tested):

- A query row that may attend no key gives weights 0 and a per-head output 0
  (so the row's output is out_proj's bias when every head is empty), with
  gradient 0. torch gives the same 0 on its scaled_dot_product_attention path
  (need_weights=False) but NaN on its need_weights=True path and its fast path.
- `is_causal=True` is, as in torch, a hint that `attn_mask` is causal, and,
  as in torch, it needs `attn_mask` (without one it is an error). torch then
  sometimes trusts the hint and swaps in its own top-left causal mask
  (need_weights=False, no key_padding_mask), and sometimes applies attn_mask
  (otherwise). The two disagree when the hint is wrong, and also with
  add_bias_kv / add_zero_attn, whose extra key the swapped-in mask hides. Here
  the attn_mask given is always what is applied, so a correct hint gives
  torch's result and a wrong hint gives the mask's, never a path-dependent one.
- Bad arguments raise ValueError / TypeError that name the argument, what was
  expected and what came, where torch raises AssertionError / RuntimeError.
- dropout with need_weights=True returns the dropped weights, as torch does,
  but the keep mask is multihead's own draw from torch's default generator:
  `torch.manual_seed` makes it reproducible, not bit-equal to torch's draw.
  dropout must lie in [0, 1) (torch also accepts 1.0, which zeroes every weight).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..backends.reference import reference_call
from ..core.call import DTYPES, AttentionCall
from ..core.checks import check_like_parameters, flag, mask_tensor, positive_int, probability
from ..core.masks import combine, drop, keep_mask
from ..ops.run import run
from .mha import MultiHeadAttention

__all__ = [
    "CompatAttentionOutput",
    "FusedInProjection",
    "InProjection",
    "MultiheadAttention",
    "from_torch",
    "fuse_in_proj",
    "split_in_proj",
    "to_multihead",
    "to_torch",
]


class CompatAttentionOutput(NamedTuple):
    """torch's (attn_output, attn_output_weights) pair; a tuple, so it unpacks as torch's does.

    Under torch.jit.trace weights not asked for come back as an empty tensor (0 elements), where
    torch's own module fails to trace: a traced graph cannot return None."""

    attn_output: Tensor  # (T, B, C), (B, T, C) when batch_first, (T, C) unbatched
    attn_output_weights: Tensor | None  # (B, T, S) averaged, (B, H, T, S) per head; no B unbatched; None

    @classmethod
    def returned(cls, attn_output: Tensor, attn_output_weights: Tensor | None) -> CompatAttentionOutput:
        """What forward returns: weights None stays None, except under torch.jit.trace."""
        if attn_output_weights is None and torch.jit.is_tracing():  # a graph's outputs are tensors, never None
            attn_output_weights = attn_output.new_empty(0)  # (0,): no weights
        return cls(attn_output, attn_output_weights)


class InProjection(NamedTuple):
    """The three input projections, in torch's Linear orientation: q = x @ q_weight.T + q_bias."""

    q_weight: Tensor  # (C, C)
    k_weight: Tensor  # (C, kdim)
    v_weight: Tensor  # (C, vdim)
    q_bias: Tensor | None  # (C,)
    k_bias: Tensor | None  # (C,)
    v_bias: Tensor | None  # (C,)


class FusedInProjection(NamedTuple):
    """torch's packed layout: the q, k, v rows stacked, in that order."""

    weight: Tensor  # in_proj_weight (3C, C)
    bias: Tensor | None  # in_proj_bias (3C,)


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_constructor(embed_dim, num_heads, dropout, kdim, vdim, flags: dict) -> None:
    positive_int("embed_dim", embed_dim)
    positive_int("num_heads", num_heads)
    for name, dim in (("kdim", kdim), ("vdim", vdim)):
        if dim is not None:
            positive_int(name, dim)
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
            f"(each head gets embed_dim / num_heads features)"
        )
    probability("dropout", dropout)
    for name, value in flags.items():
        flag(name, value)


class MultiheadAttention(nn.Module):
    """Drop-in `torch.nn.MultiheadAttention` whose attention runs on multihead's backends.

    MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                       add_zero_attn=False, kdim=None, vdim=None, batch_first=False,
                       device=None, dtype=None)

    Parameters, exactly torch's (names, shapes, registration order, init):
        in_proj_weight (3C, C)        when kdim == vdim == embed_dim, else None and
        q_proj_weight (C, C), k_proj_weight (C, kdim), v_proj_weight (C, vdim)
        in_proj_bias (3C,)            when bias
        out_proj.weight (C, C), out_proj.bias (C,)
        bias_k, bias_v (1, 1, C)      when add_bias_kv

    Masks use torch's polarity (bool True = NOT allowed); see the module docstring.
    """

    __constants__ = ["batch_first"]
    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        _check_constructor(embed_dim, num_heads, dropout, kdim, vdim,
                           dict(bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                batch_first=batch_first))
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        # torch's name: True when one packed (3C, C) weight can project q, k and v.
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads

        # Same registration order as torch, so state_dict() lists the same keys in the same order.
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # torch's own class for out_proj, so quantization tooling treats it as it treats torch's.
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation, drawing from the generator in torch's order (same seed, same weights)."""
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    # torch.nn.TransformerEncoderLayer's fused inference path calls self_attn.merge_masks;
    # torch's implementation only reads num_heads, so it serves this class unchanged.
    merge_masks = nn.MultiheadAttention.merge_masks

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
                f"vdim={self.vdim}, dropout={self.dropout}, add_bias_kv={self.bias_k is not None}, "
                f"add_zero_attn={self.add_zero_attn}, batch_first={self.batch_first}")

    def in_projection(self) -> InProjection:
        """q, k, v projection weights and biases, whichever layout this module stores (its own: not checked)."""
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)  # (3C, C) -> 3 x (C, C)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)  # (3C,) -> 3 x (C,)
        return InProjection(*weights, *biases)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> CompatAttentionOutput:
        """torch.nn.MultiheadAttention.forward, argument for argument.

        query (T, B, C), key (S, B, kdim), value (S, B, vdim); (B, ·, ·) when
            batch_first; (T, C), (S, kdim), (S, vdim) unbatched.
        key_padding_mask: (B, S) or (S,) unbatched; bool True = padding (ignored),
            or float added to the scores.
        need_weights: also return the attention weights (after dropout, as torch).
        attn_mask: (T, S) or (B·num_heads, T, S) ((num_heads, T, S) unbatched);
            bool True = NOT allowed to attend, or float added to the scores.
        average_attn_weights: average the weights over heads, (B, T, S), instead
            of per head, (B, H, T, S).
        is_causal: hint that attn_mask is causal; needs attn_mask (as torch).
            The mask given is what is applied.

        Returns (attn_output, attn_output_weights) in the input's layout; the
        weights are None when need_weights is False.
        """
        # The edge: every argument is checked here, once; what follows builds the call from checked values.
        query, key, value, batched = self._check_inputs(query, key, value)
        dropout = self._check_flags(need_weights, average_attn_weights, is_causal, attn_mask)
        # The self-attention identity is read before the layout edge makes new tensor objects.
        self_attention = query is key and key is value
        query, key, value = (self._to_batch_first(x, batched) for x in (query, key, value))  # (B, ·, ·)
        B, T, S = query.shape[0], query.shape[1], key.shape[1]
        mask = combine(
            self._attn_mask_may_attend(attn_mask, batched, B, T, S, query.device),
            self._padding_may_attend(key_padding_mask, batched, B, S, query.device),
        )  # (T, S), or 4 dims broadcastable to (B, H, T, S); True / finite = may attend

        q, k, v = self._project(query, key, value, self_attention)  # (B, H, T, D), (B, H, S, D) x2
        k, v, mask = self._extra_keys(k, v, mask)  # (B, H, S', D) with S' = S + bias_kv + zero_attn
        dropout_p = dropout if self.training else 0.0
        out, weights = self._attend(q, k, v, mask, dropout_p, need_weights)  # (B, H, T, D), (B, H, T, S') or None

        out = self.out_proj(out.transpose(1, 2).reshape(B, T, self.embed_dim))  # (B, H, T, D) -> (B, T, C)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, H, T, S') -> (B, T, S')
        if not batched and weights is not None:
            weights = weights.squeeze(0)  # (1, ...) -> (...)
        return CompatAttentionOutput.returned(self._from_batch_first(out, batched), weights)

    def __prepare_scriptable__(self):
        raise TypeError("multihead.compat.MultiheadAttention does not support torch.jit.script; "
                        "use torch.compile, or torch.export.export(module, (query, key, value)) for a graph "
                        "(torch.jit.trace works too)")

    def _check_flags(self, need_weights, average_attn_weights, is_causal, attn_mask) -> float:
        """The flags, and the dropout probability as a float."""
        for name, value in (("need_weights", need_weights), ("average_attn_weights", average_attn_weights),
                            ("is_causal", is_causal)):
            flag(name, value)
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True is a hint that attn_mask is causal and needs attn_mask, as in torch; "
                "got attn_mask=None. Pass attn_mask=nn.Transformer.generate_square_subsequent_mask(T), "
                "or use multihead.MultiHeadAttention(..., causal=True)"
            )
        return probability("dropout", self.dropout)  # a plain attribute in torch, so it may have been reassigned

    def _to_batch_first(self, x: Tensor, batched: bool) -> Tensor:
        """The layout edge: (T, C) unbatched -> (1, T, C); (T, B, C) -> (B, T, C) unless batch_first."""
        if not batched:
            return x.unsqueeze(0)  # (T, C) -> (1, T, C)
        return x if self.batch_first else x.transpose(0, 1)  # (T, B, C) -> (B, T, C)

    def _from_batch_first(self, out: Tensor, batched: bool) -> Tensor:
        """(B, T, C) back to the caller's layout."""
        if not batched:
            return out.squeeze(0)  # (1, T, C) -> (T, C)
        return out if self.batch_first else out.transpose(0, 1)  # (B, T, C) -> (T, B, C)

    def _extra_keys(self, k: Tensor, v: Tensor, mask: Tensor | None):
        """add_bias_kv and add_zero_attn: keys appended after the S real ones, which every query may attend."""
        B, H, _, D = k.shape
        extra = []
        if self.bias_k is not None:
            extra.append((self.bias_k.reshape(1, H, 1, D).expand(B, H, 1, D),  # (1, 1, C) -> (B, H, 1, D)
                          self.bias_v.reshape(1, H, 1, D).expand(B, H, 1, D)))  # (1, 1, C) -> (B, H, 1, D)
        if self.add_zero_attn:
            zeros = k.new_zeros(B, H, 1, D)  # (B, H, 1, D)
            extra.append((zeros, zeros))
        if not extra:
            return k, v, mask
        k = torch.cat([k, *(ek for ek, _ in extra)], dim=2)  # (B, H, S, D) -> (B, H, S + n, D)
        v = torch.cat([v, *(ev for _, ev in extra)], dim=2)  # (B, H, S, D) -> (B, H, S + n, D)
        if mask is not None:
            # bool pads with True (may attend), float with 0 (no bias): torch pads its
            # additive masks with 0, which is the same.
            mask = F.pad(mask, (0, len(extra)), value=True if mask.dtype == torch.bool else 0.0)  # (..., S + n)
        return k, v, mask

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, need_weights: bool):
        """(out, weights or None); in training with dropout the weights are the dropped ones, as torch's.

        The call is built here, not by make_call: the inputs, the masks and dropout were checked at
        forward's edge, and q, k, v are this module's own projections of them.
        """
        if mask is not None and mask.dim() == 2:
            mask = mask[None, None]  # (T, S') -> (1, 1, T, S')
        call = AttentionCall(q, k, v, mask, False, 1.0 / math.sqrt(q.shape[-1]), dropout_p)  # scale 1/sqrt(D)
        if need_weights and dropout_p > 0.0:
            return _attention_with_dropped_weights(call)
        attended = run(call, need_weights=need_weights)
        return attended.out, attended.weights

    def _check_inputs(self, query, key, value) -> tuple[Tensor, Tensor, Tensor, bool]:
        """Types, dims, widths, dtypes and the agreement of B and S; returns (q, k, v, batched)."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.is_nested:
                raise TypeError(f"{name} is a nested tensor; multihead.compat.MultiheadAttention takes dense "
                                f"tensors (pad the batch and pass key_padding_mask)")
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query has {query.dim()} dims, (T, B, C) / (B, T, C) batched or (T, C) unbatched "
                f"expected, got {_shape(query)}"
            )
        batched = query.dim() == 3
        layout = "(T, C)" if not batched else "(B, T, C)" if self.batch_first else "(T, B, C)"
        for name, x in (("key", key), ("value", value)):
            if x.dim() != query.dim():
                raise ValueError(
                    f"{name} has {x.dim()} dims, {query.dim()} expected like query {layout}, got {_shape(x)}"
                )
        for name, x, width, width_name in (("query", query, self.embed_dim, "embed_dim"),
                                           ("key", key, self.kdim, "kdim"), ("value", value, self.vdim, "vdim")):
            if x.shape[-1] != width:
                raise ValueError(f"{name} has width {x.shape[-1]}, {width_name}={width} expected, got {_shape(x)}")
        seq_dim, batch_dim = (0, None) if not batched else (1, 0) if self.batch_first else (0, 1)
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(
                f"key and value must have the same length S (dim {seq_dim}), "
                f"got key {_shape(key)}, value {_shape(value)}"
            )
        if batch_dim is not None and not query.shape[batch_dim] == key.shape[batch_dim] == value.shape[batch_dim]:
            raise ValueError(
                f"query, key and value must have the same batch size B (dim {batch_dim}, {layout} layout), "
                f"got query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
            )
        check_like_parameters(self.out_proj.weight, query=query, key=key, value=value)
        if query.dtype not in DTYPES:  # a complex module: the parameters' dtype, which no backend computes in
            raise TypeError(f"query must be float16, bfloat16, float32 or float64, got {query.dtype}")
        return query, key, value, batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool):
        """(B, T, C), (B, S, kdim), (B, S, vdim) -> q (B, H, T, D), k and v (B, H, S, D)."""
        B, T, _ = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        if self_attention and self._qkv_same_embed_dim:
            # One matmul for all three roles, as torch does for self-attention.
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, T, C) -> (B, T, 3C)
            qkv = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, T, 3C) -> (3, B, H, T, D)
            return qkv[0], qkv[1], qkv[2]
        w = self.in_projection()
        q = F.linear(query, w.q_weight, w.q_bias).reshape(B, T, H, D).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
        k = F.linear(key, w.k_weight, w.k_bias).reshape(B, S, H, D).transpose(1, 2)  # (B, S, kdim) -> (B, H, S, D)
        v = F.linear(value, w.v_weight, w.v_bias).reshape(B, S, H, D).transpose(1, 2)  # (B, S, vdim) -> (B, H, S, D)
        return q, k, v

    def _attn_mask_may_attend(self, attn_mask, batched: bool, B: int, T: int, S: int, device: torch.device):
        """torch's attn_mask, checked -> multihead's convention, broadcastable to (B, H, T, S)."""
        if attn_mask is None:
            return None
        mask = _check_mask_tensor("attn_mask", attn_mask, device)
        H = self.num_heads
        heads = (B * H, T, S) if batched else (H, T, S)
        heads_name = "(B*num_heads, T, S)" if batched else "(num_heads, T, S)"
        if mask.dim() == 2 and _shape(mask) == (T, S):
            return _may_attend(mask)  # (T, S), shared by every batch element and head
        if mask.dim() == 3 and _shape(mask) == heads:
            # torch's 3-D layout puts batch element b's heads at rows b*H .. b*H + H-1.
            return _may_attend(mask).reshape(B, H, T, S)  # (B*H, T, S) -> (B, H, T, S)
        raise ValueError(
            f"attn_mask must be (T, S) = {(T, S)} or {heads_name} = {heads}, got {_shape(mask)}"
        )

    def _padding_may_attend(self, key_padding_mask, batched: bool, B: int, S: int, device: torch.device):
        """torch's key_padding_mask (True = padding), checked -> (B, 1, 1, S), True / finite = may attend."""
        if key_padding_mask is None:
            return None
        mask = _check_mask_tensor("key_padding_mask", key_padding_mask, device)
        expected = (B, S) if batched else (S,)
        if _shape(mask) != expected:
            dims = "(B, S)" if batched else "(S,) for unbatched input"
            raise ValueError(f"key_padding_mask must be {dims} = {expected}, got {_shape(mask)}")
        return _may_attend(mask).reshape(B, 1, 1, S)  # (B, S) or (S,) -> (B, 1, 1, S)


def _check_mask_tensor(name: str, mask, device: torch.device) -> Tensor:
    return mask_tensor(name, mask, device, "True = not allowed, torch's polarity")


def _may_attend(torch_mask: Tensor) -> Tensor:
    """torch's polarity -> multihead's: bool True = not allowed becomes True = may attend;
    a float mask is added to the scores in both conventions and passes unchanged."""
    return ~torch_mask if torch_mask.dtype == torch.bool else torch_mask


def _attention_with_dropped_weights(call: AttentionCall):
    """Attention whose returned weights are the dropped ones, as torch returns in training.

    The keep mask is drawn here (`masks.keep_mask`, torch's default
    generator) and replayed by the eager path, so the output and the
    returned weights are made with the same draw.
    """
    shape = (call.batch, call.heads, call.q_len, call.kv_len)  # (B, H, T, S)
    keep = keep_mask(shape, call.dropout_p, device=call.q.device)  # (B, H, T, S)
    out, probs, _ = reference_call(call, dropout_mask=keep)
    return out, drop(probs, keep, call.dropout_p)  # (B, H, T, S): the weights the output was made with


# ---------------------------------------------------------------------------
# Converters: torch's packed layout, torch's module <-> compat's drop-in and multihead.MultiHeadAttention
# ---------------------------------------------------------------------------

def _check_tensor(name: str, x, dims: str, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} has {x.dim()} dims, {dims} expected, got {_shape(x)}")


def split_in_proj(in_proj_weight: Tensor, in_proj_bias: Tensor | None = None) -> InProjection:
    """torch's packed in_proj_weight (3C, C) and in_proj_bias (3C,) -> the q, k, v parts.

    The parts are views of the packed tensors (torch's own chunk(3)); clone them
    to own them.
    """
    _check_tensor("in_proj_weight", in_proj_weight, "(3C, C)", 2)
    C = in_proj_weight.shape[1]
    if in_proj_weight.shape[0] != 3 * C:
        raise ValueError(f"in_proj_weight must be (3C, C) = {(3 * C, C)}, got {_shape(in_proj_weight)}")
    w_q, w_k, w_v = in_proj_weight.chunk(3)  # (3C, C) -> 3 x (C, C)
    if in_proj_bias is None:
        return InProjection(w_q, w_k, w_v, None, None, None)
    _check_tensor("in_proj_bias", in_proj_bias, "(3C,)", 1)
    if in_proj_bias.shape[0] != 3 * C:
        raise ValueError(f"in_proj_bias must be (3C,) = {(3 * C,)} to match in_proj_weight, got {_shape(in_proj_bias)}")
    b_q, b_k, b_v = in_proj_bias.chunk(3)  # (3C,) -> 3 x (C,)
    return InProjection(w_q, w_k, w_v, b_q, b_k, b_v)


def fuse_in_proj(
    q_weight: Tensor, k_weight: Tensor, v_weight: Tensor,
    q_bias: Tensor | None = None, k_bias: Tensor | None = None, v_bias: Tensor | None = None,
) -> FusedInProjection:
    """q, k, v weights (C, C) and biases (C,) -> torch's packed (3C, C) weight and (3C,) bias.

    The packed layout exists only when kdim == vdim == C; biases are all given or all None.
    """
    _check_tensor("q_weight", q_weight, "(C, C)", 2)
    C = q_weight.shape[0]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight)):
        _check_tensor(name, w, "(C, C)", 2)
        if _shape(w) != (C, C):
            raise ValueError(
                f"{name} must be (C, C) = {(C, C)} to pack with q_weight (the packed layout needs "
                f"kdim == vdim == embed_dim; keep q/k/v_proj_weight separate otherwise), got {_shape(w)}"
            )
    biases = (("q_bias", q_bias), ("k_bias", k_bias), ("v_bias", v_bias))
    given = [name for name, b in biases if b is not None]
    if given and len(given) != 3:
        raise ValueError(f"q_bias, k_bias, v_bias must be all given or all None, got only {', '.join(given)}")
    weight = torch.cat([q_weight, k_weight, v_weight], dim=0)  # 3 x (C, C) -> (3C, C)
    if not given:
        return FusedInProjection(weight, None)
    for name, b in biases:
        _check_tensor(name, b, "(C,)", 1)
        if _shape(b) != (C,):
            raise ValueError(f"{name} must be (C,) = {(C,)}, got {_shape(b)}")
    return FusedInProjection(weight, torch.cat([q_bias, k_bias, v_bias]))  # 3 x (C,) -> (3C,)


def _check_source(module) -> bool:
    """module is a torch or compat MultiheadAttention whose biases are torch's bias flag; returns that flag."""
    if not isinstance(module, (nn.MultiheadAttention, MultiheadAttention)):
        raise TypeError(
            f"module must be a torch.nn.MultiheadAttention or multihead.compat.MultiheadAttention, "
            f"got {type(module).__name__}"
        )
    has_bias = module.in_proj_bias is not None
    if has_bias != (module.out_proj.bias is not None):
        raise ValueError(
            f"module must have both in_proj_bias and out_proj.bias or neither (torch's bias flag), "
            f"got in_proj_bias={'set' if has_bias else None}, out_proj.bias={'set' if not has_bias else None}"
        )
    return has_bias


def from_torch(module: nn.MultiheadAttention | MultiheadAttention) -> MultiheadAttention:
    """The drop-in for a torch (or compat) MultiheadAttention: a multihead.compat.MultiheadAttention that
    answers the same calls with the same numbers, its attention on multihead's backends.

    Everything the call depends on is the source's: batch_first (so torch's default (T, B, C) stays
    (T, B, C)), the forward's arguments and their order, torch's mask polarity, the
    (attn_output, attn_output_weights) result with weights averaged over heads by default, kdim,
    vdim, bias, add_bias_kv, add_zero_attn, dropout, the device, the dtype and the training mode.
    The parameters are copies (the source is not shared), with the source's requires_grad. For
    multihead's own module (batch-first, True = may attend, per-head weights) use `to_multihead`.
    """
    has_bias = _check_source(module)
    ref = module.out_proj.weight
    # Built on the meta device and filled from the source: no initialisation, so the global RNG is not drawn.
    result = MultiheadAttention(
        module.embed_dim, module.num_heads, dropout=module.dropout, bias=has_bias,
        add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
        vdim=module.vdim, batch_first=module.batch_first, device="meta", dtype=ref.dtype,
    ).to_empty(device=ref.device)
    with torch.no_grad():
        result.load_state_dict(module.state_dict())
    sources = dict(module.named_parameters())
    for name, parameter in result.named_parameters():
        parameter.requires_grad_(sources[name].requires_grad)
    return result.train(module.training)


def to_multihead(module: nn.MultiheadAttention | MultiheadAttention, *, backend: str = "auto") -> MultiHeadAttention:
    """A multihead.MultiHeadAttention with the same weights as a torch (or compat) MultiheadAttention.

    The result speaks multihead's conventions, not the source's: batch-first
    (B, T, C) input whatever the source's batch_first, masks with True = may
    attend (key_mask, True = a real token), and a MultiHeadAttentionOutput
    (output, per-head weights) result; it answers other calls than the
    source (`from_torch` gives the one that answers the same). add_bias_kv
    and add_zero_attn have no counterpart in MultiHeadAttention and are refused.
    """
    has_bias = _check_source(module)
    if module.bias_k is not None or module.bias_v is not None:
        raise ValueError(
            "module has add_bias_kv=True (bias_k, bias_v); multihead.MultiHeadAttention has no "
            "learned extra key/value, use multihead.compat.from_torch (a compat.MultiheadAttention) for it instead"
        )
    if module.add_zero_attn:
        raise ValueError(
            "module has add_zero_attn=True; multihead.MultiHeadAttention has no zero key/value, "
            "use multihead.compat.from_torch (a compat.MultiheadAttention) for it instead"
        )
    w = MultiheadAttention.in_projection(module)  # reads only torch's attribute names: serves torch's module too
    ref = module.out_proj.weight
    result = MultiHeadAttention(
        module.embed_dim, module.num_heads, kdim=module.kdim, vdim=module.vdim, bias=has_bias,
        dropout=module.dropout, backend=backend, device=ref.device, dtype=ref.dtype,
    )
    with torch.no_grad():
        for linear, weight, bias in ((result.q_proj, w.q_weight, w.q_bias), (result.k_proj, w.k_weight, w.k_bias),
                                     (result.v_proj, w.v_weight, w.v_bias),
                                     (result.out_proj, module.out_proj.weight, module.out_proj.bias)):
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
    return result.train(module.training)


def to_torch(module: MultiHeadAttention, *, batch_first: bool = True) -> nn.MultiheadAttention:
    """A torch.nn.MultiheadAttention with the same weights as a multihead.MultiHeadAttention.

    Only plain multi-head attention has a torch counterpart: num_kv_heads ==
    num_heads, head_dim == v_head_dim == d_model / num_heads, and no built-in
    causal mask. batch_first defaults to True because MultiHeadAttention is
    batch-first; the torch module then takes the same (B, T, C) tensors (with
    torch's mask polarity). `from_torch` of the result is the same module on
    multihead's attention (a compat.MultiheadAttention); `to_multihead` gives
    back a MultiHeadAttention with module's weights.
    """
    if not isinstance(module, MultiHeadAttention):
        raise TypeError(f"module must be a multihead.MultiHeadAttention, got {type(module).__name__}")
    flag("batch_first", batch_first)
    cfg = module.config
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(
            f"module has num_kv_heads={cfg.num_kv_heads} < num_heads={cfg.num_heads} (grouped-query); "
            f"torch.nn.MultiheadAttention needs one key/value head per query head"
        )
    if cfg.head_dim * cfg.num_heads != cfg.d_model or cfg.v_head_dim != cfg.head_dim:
        raise ValueError(
            f"module has head_dim={cfg.head_dim}, v_head_dim={cfg.v_head_dim}; torch.nn.MultiheadAttention "
            f"needs both equal to d_model / num_heads = {cfg.d_model} / {cfg.num_heads}"
        )
    if cfg.causal:
        raise ValueError(
            "module has causal=True; torch.nn.MultiheadAttention has no built-in causal mask. "
            "Convert a causal=False module and pass the causal attn_mask on each call"
        )
    ref = module.out_proj.weight
    result = nn.MultiheadAttention(
        cfg.d_model, cfg.num_heads, dropout=cfg.dropout, bias=cfg.bias, kdim=cfg.kdim, vdim=cfg.vdim,
        batch_first=batch_first, device=ref.device, dtype=ref.dtype,
    )
    q, k, v = module.q_proj, module.k_proj, module.v_proj
    with torch.no_grad():
        if result._qkv_same_embed_dim:
            result.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))  # 3 x (C, C) -> (3C, C)
        else:
            result.q_proj_weight.copy_(q.weight)
            result.k_proj_weight.copy_(k.weight)
            result.v_proj_weight.copy_(v.weight)
        if cfg.bias:
            result.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))  # 3 x (C,) -> (3C,)
            result.out_proj.bias.copy_(module.out_proj.bias)
        result.out_proj.weight.copy_(module.out_proj.weight)
    return result.train(module.training)
