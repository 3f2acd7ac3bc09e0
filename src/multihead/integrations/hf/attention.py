"""The attention function transformers calls for attn_implementation="multihead".

transformers calls it from every attention layer of a model that uses the
AttentionInterface, after the projections, the rotary embedding and the
cache update:

    out, weights = multihead_attention(module, query, key, value, attention_mask,
                                       dropout=..., scaling=..., **kwargs)

query (B, H, T, D), key and value (B, G, S, D) with G key/value heads, not
repeated for grouped-query attention -> out (B, T, H, D) and the weights
(B, h, t, S) or None. `translate` turns that into one checked multihead
call, which enters `multihead.ops.run`, so the registry chooses the
backend and `which_backend` says why.

What transformers' arguments mean here:

- attention_mask: the bool mask of `multihead.hf.mask` (True = may attend),
  a float mask (added), or None. With None, `is_causal` (or the module's
  `is_causal`) means what SDPA's flag means in transformers: top-left
  aligned, and a single query sees every key. That is multihead's
  bottom-right `causal` on a square call or a single query; any other shape
  gets the top-left mask explicitly.
- sliding_window: already inside the mask transformers built; applied here
  only to a causal call that came with no mask and is longer than the window.
- position_bias (T5 and its kind): a float bias added to the scores.
- dropout: the probability, in training; scaling: the scale (None: 1/sqrt(D)).
- softcap (Gemma-2 logit softcapping), s_aux / sinks (gpt-oss attention
  sinks) and indices / block_indices (sparse attention) change the formula;
  multihead does not compute them, so a call with one is refused with a
  one-line ValueError naming the model and the feature, never run without it.
- anything else (position_ids, cu_seq_lens_*, use_cache, ...) carries
  nothing the mask has not already said, as with transformers' sdpa.

Weights are returned when transformers asks for them (`output_attentions=True`
on the call), for the layers, heads and rows that `multihead.hf.options`
selects: the output from the backend's kernel and the chosen weights from
their own rows' scores, or everything from multihead's one-pass eager
formula (`options(weights_from=...)`; the default takes the kernel whenever
heads or rows are chosen). The chosen rows' weights carry no gradient; the
one pass's are part of the graph, as
eager's are, and a module in training mode whose inputs need a gradient
always takes it. They are the softmax before dropout (eager returns them
after). A query row with no key to attend (a left-padding position) has
output 0 and weights 0, where eager spreads it evenly over the masked keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from ...backends import Dispatch
from ...core import masks
from ...core.call import AttentionCall, make_call
from ...ops.run import run
from ...ops.weights import Index, check_index, weights_of
from .options import Options, current

try:  # transformers' record of the outputs a forward collects; some models do not pass output_attentions down
    from transformers.utils.output_capturing import _active_collector as _COLLECTOR
except ImportError:  # an older or newer transformers: fall back on the config
    _COLLECTOR = None

# keyword -> what it would add to the formula; a call with one of them set is refused
UNSUPPORTED = {
    "softcap": "attention logit softcapping (scores -> softcap * tanh(scores / softcap))",
    "s_aux": "attention sinks (a learned logit per head that takes part in the softmax)",
    "sinks": "attention sinks (a learned logit per head that takes part in the softmax)",
    "indices": "sparse attention over selected keys",
    "block_indices": "sparse attention over selected key blocks",
}


def describe(module) -> str:
    """'llama (LlamaAttention, layer 3)': the model and the layer, for messages."""
    model = getattr(getattr(module, "config", None), "model_type", None) or "model"
    layer = getattr(module, "layer_idx", None)
    where = f", layer {layer}" if isinstance(layer, int) else ""
    return f"{model} ({type(module).__name__}{where})"


def refuse_unsupported(module, kwargs: dict) -> None:
    """ValueError for a keyword that changes the formula (`UNSUPPORTED`), before anything runs."""
    for name, feature in UNSUPPORTED.items():
        value = kwargs.get(name)
        if value is not None:
            shown = f"tensor {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(f"attn_implementation='multihead' cannot run {describe(module)}: it uses {feature} "
                             f"({name}={shown}), which multihead does not compute; load the model with "
                             f"attn_implementation='eager'")


def implied_mask(T: int, S: int, window: int | None, device: torch.device) -> Tensor:
    """(T, S) bool: transformers' causal flag with no mask, top-left aligned (one query sees all), and the window."""
    first = S - 1 if T == 1 else 0  # position of query 0 among the keys
    query_pos = torch.arange(T, device=device)[:, None] + first  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = key_pos <= query_pos  # (T, S)
    if window is not None:
        allowed = allowed & (key_pos > query_pos - window)  # the last `window` keys, itself included
    return allowed


def _mask_and_causal(module, attention_mask, causal: bool, T: int, S: int, window, device) -> tuple:
    """(attn_mask, causal) in multihead's convention for the mask transformers gave (see the module docstring)."""
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attn_implementation='multihead' takes a tensor attention_mask (bool or float), got "
                            f"{type(attention_mask).__name__} in {describe(module)}; masks of another "
                            f"implementation (flex_attention's BlockMask) do not carry over")
        return attention_mask, False  # the mask already holds causality and the window
    window_bites = window is not None and window < S
    if window_bites and not causal:
        raise ValueError(f"attn_implementation='multihead' cannot run {describe(module)}: a bidirectional sliding "
                         f"window (sliding_window={window}, S={S}) given with no mask; pass the mask transformers "
                         f"builds for it")
    if causal and (window_bites or T not in (1, S)):
        return implied_mask(T, S, window if window_bites else None, device), False
    return None, causal and T > 1  # square or single query: the two alignments agree


def translate(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs) -> AttentionCall:
    """transformers' arguments -> one checked multihead call; refused (ValueError) where it would change the formula."""
    refuse_unsupported(module, kwargs)
    for name, x, dims in (("query", query, "(B, H, T, D)"), ("key", key, "(B, G, S, D)")):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be {dims} as transformers passes it, got {got} in {describe(module)}")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    T, S = query.shape[2], key.shape[2]
    mask, causal = _mask_and_causal(module, attention_mask, causal, T, S, kwargs.get("sliding_window"),
                                    query.device)
    bias = kwargs.get("position_bias")
    if bias is not None:
        mask = masks.combine(bias, mask)  # float: the bias, -inf where the mask forbids
    return make_call(query, key, value, attn_mask=mask, causal=causal, scale=scaling, dropout_p=float(dropout))


def weights_asked(module, kwargs: dict) -> bool:
    """Whether transformers wants this call's weights: output_attentions on the call, or in the outputs it collects."""
    asked = kwargs.get("output_attentions")
    if asked is not None:
        return bool(asked)
    collected = _COLLECTOR.get() if _COLLECTOR is not None else None
    if collected is not None:
        return any(key.endswith("attentions") for key in collected)
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def positions(name: str, index: Index, size: int) -> list[int] | None:
    """heads/rows of the options as positions in [0, size) (None stays None: all); ValueError out of range."""
    try:
        return check_index(name, index, size)
    except ValueError:
        raise ValueError(f"multihead.hf.options({name}={index!r}) is out of range for a call with {size} {name}") from None


def _with_weights(module, call: AttentionCall, chosen: Options) -> tuple[Tensor, Tensor]:
    """out (B, H, T, Dv) and the chosen weights (B, h, t, S), as the module docstring says."""
    heads = positions("heads", chosen.heads, call.heads)
    rows = positions("rows", chosen.rows, call.q_len)
    if not chosen.wants_layer(module):
        t = call.q_len if rows is None else len(rows)
        empty = call.q.new_zeros((call.batch, 0, t, call.kv_len))  # (B, 0, t, S): keeps attentions[i] = layer i
        return run(call, chosen.backend).out, empty
    every = heads is None and rows is None and chosen.backend == "auto"  # a pinned backend keeps its kernel
    one_pass = chosen.weights_from == "one_pass" or (chosen.weights_from == "auto" and every)
    if one_pass or (getattr(module, "training", False) and call.needs_grad()):
        attended = run(call, "reference", need_weights=True)  # one pass that keeps the weights
        weights = attended.weights
        if heads is not None:
            weights = weights[:, heads]  # (B, H, T, S) -> (B, h, T, S)
        if rows is not None:
            weights = weights[:, :, rows]  # (B, h, T, S) -> (B, h, t, S)
        return attended.out, weights
    return run(call, chosen.backend).out, weights_of(call, heads, rows).to(call.q.dtype)


def multihead_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                        **kwargs) -> tuple[Tensor, Tensor | None]:
    """The function registered as "multihead" in transformers' AttentionInterface (see the module docstring).

    query (B, H, T, D), key/value (B, G, S, D) -> (out (B, T, H, Dv), weights (B, h, t, S) or None).
    """
    call = translate(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    chosen = current()
    if weights_asked(module, kwargs):
        out, weights = _with_weights(module, call, chosen)
    else:
        out, weights = run(call, chosen.backend).out, None
    return out.transpose(1, 2).contiguous(), weights  # (B, H, T, Dv) -> (B, T, H, Dv)


def which_backend(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  **kwargs) -> Dispatch:
    """Which backend `multihead_attention` runs for these arguments, and why (`multihead.which_backend`)."""
    call = translate(module, query, key, value, attention_mask, **kwargs)
    return backends.survey(call, current().backend)


__all__ = ["UNSUPPORTED", "implied_mask", "multihead_attention", "translate", "weights_asked", "which_backend"]
