"""Which backend each attention layer of a transformers model runs on "multihead", and why.

    report = multihead.hf.report(model, **batch)          # one forward, no gradient
    print(report)                                        # one line per attention call
    report.calls[0].computes                             # 'causal, window (3, 0), softcap 1.0': what reached multihead
    report.calls[0].backend, report.calls[0].why         # 'sdpa', 'the fastest backend that supports the call'

`multihead.hf.which_backend(module, q, k, v, mask)` answers for one call
whose tensors the caller already holds; this answers for a model and an
input: it runs `model(**inputs)` once, without gradient, and every call the
hook receives is recorded with what the hook decided for it (the options
in force, the weights plan) and the registry's survey of every backend.
The forward is the model's own, so the options of an enclosing
`multihead.hf.options` block apply, and `output_attentions=True` among the
inputs shows where the weights come from. A cache passed in the inputs is
copied first: the report leaves it as it was. Eager models only (a compiled
forward does not record).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ... import backends
from ...backends import Dispatch
from ...core.call import AttentionCall
from .attention import NAME, Plan, recording
from .options import Options

CACHE_INPUTS = ("past_key_values", "cache")  # the inputs that carry a cache the forward would write

WEIGHTS = {  # Plan.weights -> what the report says about the weights
    "none": "",
    "skipped": "weights: empty (layer not selected)",
    "kernel": "weights: the chosen heads/rows apart",
    "one_pass": "weights: from the one pass",
}


class CallReport(NamedTuple):
    """One attention call of the forward: where, its shape, what computed it and why."""

    where: str  # the attention module's name in the model and its class: "model.layers.0.self_attn (LlamaAttention)"
    layer: int | None  # the module's layer_idx (None where it has none)
    q: tuple[int, ...]  # (B, H, T, D) as transformers passed it
    kv: tuple[int, ...]  # (B, G, S, Dv) of the values
    backend: str  # the backend that computed the output, or "one pass" (multihead's eager formula, no backend)
    why: str  # why that one: the backends before it that cannot, a pinned backend, or why the one pass
    weights: str  # the plan's weights: "none", "skipped", "kernel" or "one_pass" (`multihead.hf.attention.Plan`)
    dispatch: Dispatch | None  # every backend's answer to the call (None for the one pass)
    computes: str = ""  # how the mask and variants reached multihead: "causal, window (3, 0), softcap 1.0", ...


@dataclass(frozen=True)
class Report:
    """What `report` returns: every attention call of one forward, in the order they ran."""

    model: str  # the model's class name
    calls: tuple[CallReport, ...]  # one per attention call (per layer; self and cross apart in encoder-decoders)

    def __str__(self) -> str:
        width = max(len(c.where) for c in self.calls)
        formulas = max(len(c.computes) for c in self.calls)
        lines = [f"{self.model} on attn_implementation={NAME!r}: {len(self.calls)} attention calls"]
        for c in self.calls:
            shape = f"T={c.q[2]} S={c.kv[2]}"
            tail = f"; {WEIGHTS[c.weights]}" if WEIGHTS[c.weights] else ""
            lines.append(f"  {c.where:<{width}}  {shape:<12} {c.computes:<{formulas}}  {c.backend:<10} {c.why}{tail}")
        return "\n".join(lines)


def computes(call: AttentionCall) -> str:
    """How transformers' mask and variants reached multihead in this call: 'causal, window (3, 0), sinks', ..."""
    parts = ["causal"] if call.causal else []
    if call.attn_mask is not None:
        kind = "bool" if call.attn_mask.dtype == torch.bool else "float"
        parts.append(f"{kind} mask {tuple(call.attn_mask.shape)}")
    variants = call.variants
    if variants is not None:
        named = [("window", variants.window), ("documents", variants.q_documents),
                 ("softcap", variants.softcap), ("sinks", variants.sinks), ("ALiBi", variants.alibi_slopes),
                 ("score_mod", variants.score_mod)]
        for name, value in named:
            if value is None:
                continue
            parts.append(f"{name} {value}" if name in ("window", "softcap") else name)
    return ", ".join(parts) or "no mask"


def _why_one_pass(chosen: Options) -> str:
    """The report runs without gradient, so the one pass was chosen by the options or for every weight."""
    if chosen.weights_from == "one_pass":
        return "options(weights_from='one_pass'): multihead's eager formula keeps every weight"
    return "every weight asked for: one pass computes them with the output (faster than kernel + weights)"


def _why(dispatch: Dispatch) -> str:
    """Why the dispatch chose its backend: pinned, or the refusals of every backend ranked above it."""
    if dispatch.requested != "auto":
        return f"pinned by multihead.hf.options(backend={dispatch.requested!r})"
    before = []
    for name, reason in dispatch.reasons.items():
        if name == dispatch.chosen:
            break
        before.append(f"{name} cannot: {reason}")
    return "; ".join(["the first that supports the call"] + before) if before else \
        "the fastest backend that supports the call"


def _call_report(names: dict, module, call, chosen: Options, planned: Plan) -> CallReport:
    where = f"{names.get(id(module), '?')} ({type(module).__name__})"
    layer = getattr(module, "layer_idx", None)
    shapes = tuple(call.q.shape), tuple(call.v.shape)
    if planned.weights == "one_pass":
        return CallReport(where, layer, *shapes, "one pass", _why_one_pass(chosen), planned.weights, None,
                          computes(call))
    dispatch = backends.survey(call, chosen.backend)
    return CallReport(where, layer, *shapes, dispatch.chosen, _why(dispatch), planned.weights, dispatch,
                      computes(call))


def report(model, /, **inputs) -> Report:
    """Run `model(**inputs)` once without gradient and report each attention call (see the module docstring).

    TypeError for something that is not a torch module; ValueError for a model that is not on
    attn_implementation="multihead" or whose attention layers never reached the hook.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers model (a torch.nn.Module), got {type(model).__name__}")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(f"multihead.hf.report needs a model on attn_implementation={NAME!r}, got {impl!r}: load it "
                         f"with attn_implementation={NAME!r} or call model.set_attn_implementation({NAME!r})")
    inputs = {key: copy.deepcopy(value) if key in CACHE_INPUTS and value is not None else value
              for key, value in inputs.items()}
    names = {id(module): name for name, module in model.named_modules()}
    with torch.no_grad(), recording() as seen:
        model(**inputs)
    if not seen:
        raise ValueError(f"multihead.hf.report ran {type(model).__name__} but no attention call reached multihead: "
                         f"its attention layers do not call transformers' AttentionInterface "
                         f"(model.is_backend_compatible() says whether they do)")
    return Report(type(model).__name__, tuple(_call_report(names, *entry) for entry in seen))


__all__ = ["CallReport", "Report", "computes", "report"]
