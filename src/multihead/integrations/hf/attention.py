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

- attention_mask: the mask of `multihead.hf.mask`: a `StructuredMask`
  (causal, bottom-right, with a sliding window and/or packed documents,
  which reaches multihead as `causal=True, window=(W - 1, 0), documents=ids`,
  a padded batch's keys as a (B, 1, 1, S) key mask, and is never written out
  as T x S), a bool mask (True = may attend), a
  float mask (added), or None. With None, `is_causal` (or the module's
  `is_causal`) means what SDPA's flag means in transformers: top-left
  aligned, and a single query sees every key. That is multihead's
  bottom-right `causal` on a square call or a single query; any other shape
  gets the top-left mask explicitly.
- sliding_window (W: a key is kept when q - k < W): already inside the mask
  transformers built (a `StructuredMask` carries it); applied here only to a
  causal call that came with no mask and is longer than the window, as
  `window=(W - 1, 0)` where the alignments agree (a square call or a single
  query), as the top-left mask otherwise.
- position_bias (T5 and its kind): a float bias added to the scores.
- dropout: the probability, in training; scaling: the scale (None: 1/sqrt(D)).
- softcap (Gemma-2's attn_logit_softcapping): `softcap=`, scores ->
  c · tanh(scores / c) before the mask, as Gemma-2's eager code does.
- s_aux (gpt-oss's learned `sinks` parameter) or sinks, one logit per query
  head (H,): `sinks=`, one more term in each row's softmax denominator; the
  weights returned are the real keys' (rows sum to less than 1), as gpt-oss's
  eager code returns them, and the sinks get their gradient. A sink of
  another shape (one per query token) is refused.
- indices / block_indices (sparse attention over selected keys) change the
  formula in a way multihead does not compute: a call with one is refused
  with a one-line ValueError naming the model and the feature (`UNSUPPORTED`),
  never run without it.
- anything else (position_ids, cu_seq_lens_*, max_length_*, use_cache, ...)
  carries nothing the mask has not already said: transformers 5 passes the
  layer's position_ids here, and the packed documents they make are those
  the mask function found (`multihead.hf.mask`).

Weights are returned when transformers asks for them: `output_attentions`
on the call, or among the outputs transformers collects (GPT-2 and most
models in transformers >= 5), or, for an attention layer whose own forward
takes `output_attentions` by name and does not pass it on (Falcon), the
value that forward received (read from its frame; under torch.compile,
which cannot, such a layer follows `config.output_attentions`). They are
those of the layers, heads and rows that `multihead.hf.options` selects:
the output from the backend's kernel and the chosen weights from
their own rows' scores, or everything from multihead's one-pass eager
formula (`options(weights_from=...)`; the default takes the kernel whenever
heads or rows are chosen). The chosen rows' weights carry no gradient; the
one pass's are part of the graph, as
eager's are, and a module in training mode whose inputs need a gradient
always takes it. They are the softmax before dropout (eager returns them
after). A query row with no key to attend (a left-padding position) has
output 0 and weights 0, where eager spreads it evenly over the masked keys.

Each call is planned before it runs (`plan`: which weights, from where, and
the options checked against the model) and then run (`execute`);
`multihead.hf.report` shows every call's plan and backend. Under
torch.compile the hook traces whole (no graph break: `options.current`
reads no ContextVar there).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from ... import backends
from ...backends import Dispatch
from ...core import masks
from ...core.call import AttentionCall, make_call
from ...ops.run import run
from ...ops.weights import weights_of
from .mask import StructuredMask
from .options import Options, current

try:  # transformers' record of the outputs a forward collects; some models do not pass output_attentions down
    from transformers.utils.output_capturing import _active_collector as _COLLECTOR
except ImportError:  # an older or newer transformers: fall back on the config
    _COLLECTOR = None

NAME = "multihead"  # what attn_implementation= takes
CALLER_DEPTH = 4  # frames above the hook searched for the attention layer's own output_attentions

# keyword -> what it would add to the formula; a call with one of them set is refused
UNSUPPORTED = {
    "indices": "sparse attention over selected keys",
    "block_indices": "sparse attention over selected key blocks",
}
SINKS = ("s_aux", "sinks")  # transformers' names for the attention sinks (gpt-oss: s_aux=module.sinks)


def describe(module) -> str:
    """'llama (LlamaAttention, layer 3)': the model and the layer, for messages."""
    model = getattr(getattr(module, "config", None), "model_type", None) or "model"
    layer = getattr(module, "layer_idx", None)
    where = f", layer {layer}" if isinstance(layer, int) else ""
    return f"{model} ({type(module).__name__}{where})"


def _refusal(module, feature: str, name: str, value) -> ValueError:
    shown = f"tensor {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
    return ValueError(f"attn_implementation='multihead' cannot run {describe(module)}: it uses {feature} "
                      f"({name}={shown}), which multihead does not compute; load the model with "
                      f"attn_implementation='eager'")


def refuse_unsupported(module, kwargs: dict) -> None:
    """ValueError for a keyword that changes the formula (`UNSUPPORTED`), before anything runs."""
    for name, feature in UNSUPPORTED.items():
        value = kwargs.get(name)
        if value is not None:
            raise _refusal(module, feature, name, value)


def sinks_of(module, heads: int, kwargs: dict) -> Tensor | None:
    """The attention sinks transformers passes (s_aux or sinks) as multihead's (H,), or None; else refused."""
    given = [(name, kwargs[name]) for name in SINKS if kwargs.get(name) is not None]
    if not given:
        return None
    name, sinks = given[0]
    if len(given) > 1:
        raise ValueError(f"attn_implementation='multihead' got both s_aux and sinks in {describe(module)}; "
                         f"transformers passes one")
    if not isinstance(sinks, Tensor) or tuple(sinks.shape) != (heads,):
        raise _refusal(module, f"attention sinks that are not one logit per query head (H,) = ({heads},)", name, sinks)
    return sinks


def implied_mask(T: int, S: int, window: int | None, device: torch.device) -> Tensor:
    """(T, S) bool: transformers' causal flag with no mask, top-left aligned (one query sees all), and the window."""
    first = S - 1 if T == 1 else 0  # position of query 0 among the keys
    query_pos = torch.arange(T, device=device)[:, None] + first  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = key_pos <= query_pos  # (T, S)
    if window is not None:
        allowed = allowed & (key_pos > query_pos - window)  # the last `window` keys, itself included
    return allowed


class Masking(NamedTuple):
    """How transformers' mask and flags reach multihead's call (see the module docstring)."""

    attn_mask: Tensor | None  # (B|1, 1, T, S) bool or float, or None
    causal: bool  # bottom-right causal
    window: tuple[int, int] | None  # (W - 1, 0): transformers' sliding window W
    documents: Tensor | None  # (B, T) document ids of a packed batch


def _window(size: int) -> tuple[int, int]:
    return (size - 1, 0)  # transformers keeps key k for query q when q - k < W: W - 1 keys back, q itself


def _masking(module, attention_mask, causal: bool, T: int, S: int, window, device) -> Masking:
    """The Masking for the mask transformers gave (see the module docstring)."""
    if isinstance(attention_mask, StructuredMask) and attention_mask.fits(T, S):
        known = attention_mask.structure  # causal, a window, documents, padding: no T x S mask for the backend
        keys = None if known.keys is None else known.keys[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        return Masking(keys, True, None if known.window is None else _window(known.window), known.documents)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attn_implementation='multihead' takes a tensor attention_mask (bool or float), got "
                            f"{type(attention_mask).__name__} in {describe(module)}; masks of another "
                            f"implementation (flex_attention's BlockMask) do not carry over")
        return Masking(attention_mask, False, None, None)  # the mask already holds causality and the window
    window_bites = window is not None and window < S
    if window_bites and not causal:
        raise ValueError(f"attn_implementation='multihead' cannot run {describe(module)}: a bidirectional sliding "
                         f"window (sliding_window={window}, S={S}) given with no mask; pass the mask transformers "
                         f"builds for it")
    aligned = T in (1, S)  # top-left and bottom-right agree: a square call or a single query
    if causal and not aligned:
        return Masking(implied_mask(T, S, window if window_bites else None, device), False, None, None)
    return Masking(None, causal and T > 1, _window(window) if causal and window_bites else None, None)


def translate(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs) -> AttentionCall:
    """transformers' arguments -> one checked multihead call; refused (ValueError) where it would change the formula."""
    refuse_unsupported(module, kwargs)
    for name, x, dims in (("query", query, "(B, H, T, D)"), ("key", key, "(B, G, S, D)")):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be {dims} as transformers passes it, got {got} in {describe(module)}")
    sinks = sinks_of(module, query.shape[1], kwargs)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    T, S = query.shape[2], key.shape[2]
    masking = _masking(module, attention_mask, causal, T, S, kwargs.get("sliding_window"), query.device)
    mask = masking.attn_mask
    bias = kwargs.get("position_bias")
    if bias is not None:
        mask = masks.combine(bias, mask)  # float: the bias, -inf where the mask forbids
    return make_call(query, key, value, attn_mask=mask, causal=masking.causal, scale=scaling,
                     dropout_p=float(dropout), window=masking.window, documents=masking.documents,
                     softcap=kwargs.get("softcap"), sinks=sinks)


def weights_asked(module, kwargs: dict) -> bool:
    """Whether transformers wants this call's weights (see the module docstring: where the flag is found)."""
    asked = kwargs.get("output_attentions")
    if asked is not None:
        return bool(asked)
    collected = _COLLECTOR.get() if _COLLECTOR is not None else None
    if collected is not None:
        return any(key.endswith("attentions") for key in collected)
    if not torch.compiler.is_compiling() and _takes_the_flag(type(module)):
        asked = _flag_of_caller(module)
        if asked is not None:
            return bool(asked)
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


_TAKES_FLAG: dict[type, bool] = {}  # attention class -> whether its forward takes output_attentions itself


def _takes_the_flag(cls: type) -> bool:
    """Whether the attention layer's forward takes output_attentions by name (and so keeps it from the hook)."""
    if cls not in _TAKES_FLAG:
        try:
            _TAKES_FLAG[cls] = "output_attentions" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):  # a forward with no signature to read
            _TAKES_FLAG[cls] = False
    return _TAKES_FLAG[cls]


def _flag_of_caller(module) -> bool | None:
    """output_attentions as the module's own forward received it (Falcon's kind), from the calling frame."""
    frame = sys._getframe(3)  # above here, weights_asked and multihead_attention: the layer's forward, or near it
    for _ in range(CALLER_DEPTH):
        if frame is None:
            return None
        found = frame.f_locals
        if found.get("self") is module and "output_attentions" in found:
            return found["output_attentions"]
        frame = frame.f_back
    return None


class Plan(NamedTuple):
    """What the hook does with one call, decided before anything runs (`multihead.hf.report` shows it)."""

    weights: str  # "none" (not asked for), "skipped" (a layer not selected: empty), "kernel", "one_pass"
    heads: list[int] | None  # heads of the returned weights, positions in [0, H); None = all
    rows: list[int] | None  # rows of the returned weights, positions in [0, T) that the call has; None = all


def plan(module, call: AttentionCall, chosen: Options, asked: bool) -> Plan:
    """The weights this call returns and where they come from; ValueError for a selection the model lacks."""
    chosen.check_model(getattr(module, "config", None), call.heads)
    if not asked:
        return Plan("none", None, None)
    heads, rows = chosen.heads_in(call.heads), chosen.rows_in(call.q_len)
    if not chosen.wants_layer(module):
        return Plan("skipped", heads, rows)
    every = heads is None and rows is None and chosen.backend == "auto"  # a pinned backend keeps its kernel
    one_pass = chosen.weights_from == "one_pass" or (chosen.weights_from == "auto" and every)
    if one_pass or (getattr(module, "training", False) and call.needs_grad()):
        return Plan("one_pass", heads, rows)
    return Plan("kernel", heads, rows)


def execute(call: AttentionCall, backend: str, planned: Plan) -> tuple[Tensor, Tensor | None]:
    """out (B, H, T, Dv) and the planned weights (B, h, t, S) or None, as the module docstring says."""
    if planned.weights == "one_pass":
        attended = run(call, "reference", need_weights=True)  # one pass that keeps the weights
        weights = attended.weights
        if planned.heads is not None:
            weights = weights[:, planned.heads]  # (B, H, T, S) -> (B, h, T, S)
        if planned.rows is not None:
            weights = weights[:, :, planned.rows]  # (B, h, T, S) -> (B, h, t, S)
        return attended.out, weights
    out = run(call, backend).out
    if planned.weights == "none":
        return out, None
    if planned.weights == "skipped":
        t = call.q_len if planned.rows is None else len(planned.rows)
        return out, call.q.new_zeros((call.batch, 0, t, call.kv_len))  # (B, 0, t, S): attentions[i] = layer i
    return out, weights_of(call, planned.heads, planned.rows).to(call.q.dtype)


_RECORDING: tuple[int, list] | None = None  # (thread, what it saw) while `recording()` runs


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect (module, call, options, plan) of every hook call this thread makes in the block (eager only)."""
    global _RECORDING
    if _RECORDING is not None:
        raise RuntimeError("multihead.hf.report is already running; one report at a time")
    seen: list = []
    _RECORDING = (threading.get_ident(), seen)
    try:
        yield seen
    finally:
        _RECORDING = None


def multihead_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                        **kwargs) -> tuple[Tensor, Tensor | None]:
    """The function registered as "multihead" in transformers' AttentionInterface (see the module docstring).

    query (B, H, T, D), key/value (B, G, S, D) -> (out (B, T, H, Dv), weights (B, h, t, S) or None).
    """
    call = translate(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    chosen = current()
    planned = plan(module, call, chosen, weights_asked(module, kwargs))
    if _RECORDING is not None and _RECORDING[0] == threading.get_ident():
        _RECORDING[1].append((module, call, chosen, planned))
    out, weights = execute(call, chosen.backend, planned)
    return out.transpose(1, 2).contiguous(), weights  # (B, H, T, Dv) -> (B, T, H, Dv)


def which_backend(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  **kwargs) -> Dispatch:
    """Which backend `multihead_attention` runs for these arguments, and why (`multihead.which_backend`)."""
    call = translate(module, query, key, value, attention_mask, **kwargs)
    return backends.survey(call, current().backend)


__all__ = ["NAME", "SINKS", "UNSUPPORTED", "Masking", "Plan", "execute", "implied_mask", "multihead_attention", "plan", "recording",
           "translate", "weights_asked", "which_backend"]
