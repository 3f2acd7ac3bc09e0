"""Hugging Face transformers on multihead: attn_implementation="multihead".

    import multihead.hf                      # registers "multihead" (or call multihead.hf.register())
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multihead")
    # or, on a model already loaded: model.set_attn_implementation("multihead")
    out = model(**batch, output_attentions=True)   # every layer's weights, equal to eager's

    with multihead.hf.options(layers=[3], heads=[0, 5], rows=-1):   # only the weights you look at
        out = model(**batch, output_attentions=True)

Importing this package registers the name "multihead" twice in transformers:
in `AttentionInterface` (`attention.multihead_attention`: every attention
call of the model is checked once and enters `multihead.ops.run`, so the
registry picks the backend and `which_backend` says why) and in `AttentionMaskInterface`
(`mask.multihead_mask`: multihead's bool masks, True = may attend; a
sliding window or a packed batch as a `mask.StructuredMask`, which reaches
multihead as `window=` / `documents=` and is never written out as T x S).
Gemma-2's softcap and gpt-oss's sinks reach it as `softcap=` and `sinks=`.
`options(backend=...)` pins a backend for the calls in a block.
`report(model, **inputs)` runs one forward and says, for each attention
layer, what reached multihead, which backend ran and why (`which_backend` answers for one call
whose q, k, v and mask you hold). Under `torch.compile` (fullgraph
included) the hook traces whole; `options` then reads a process-wide
setting (see `multihead.hf.options`).

Needs transformers (`pip install multihead[hf]`). A model whose attention
layers do not call the AttentionInterface ignores the name: transformers
warns on `set_attn_implementation`, and `model.is_backend_compatible()` says
whether a model class routes its attention through the interface.
"""

from __future__ import annotations

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("multihead.hf needs transformers >= 5: pip install 'multihead[hf]'") from error

from .attention import NAME, UNSUPPORTED, multihead_attention, translate, which_backend
from .mask import multihead_mask
from .options import Options, current, options
from .report import CallReport, Report, report


def register() -> str:
    """Register NAME for attention and for masks in transformers (idempotent); returns NAME."""
    AttentionInterface.register(NAME, multihead_attention)
    AttentionMaskInterface.register(NAME, multihead_mask)
    return NAME


def is_registered() -> bool:
    """Whether transformers maps NAME to multihead's functions, for attention and for masks."""
    return (AttentionInterface._global_mapping.get(NAME) is multihead_attention
            and AttentionMaskInterface._global_mapping.get(NAME) is multihead_mask)


register()

__all__ = [
    "NAME",
    "CallReport",
    "Options",
    "Report",
    "UNSUPPORTED",
    "current",
    "is_registered",
    "multihead_attention",
    "multihead_mask",
    "options",
    "register",
    "report",
    "translate",
    "which_backend",
]
