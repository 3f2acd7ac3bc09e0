"""multihead: multi-head attention from the whiteboard to the GPU.

Dimension legend, used in every shape comment of the package:

    B   batch
    T   query length
    S   key/value length
    H   query heads
    G   key/value heads (H % G == 0; G == H is multi-head, G == 1 multi-query)
    R   query heads per key/value head, H / G
    D   head dim of q and k (d_k)
    Dv  head dim of v (d_v)
    C   model width (d_model)

Internal layout is (B, H, T, D); modules take and return batch-first (B, T, C).
Masks: bool True = may attend, float = added to the scores (see `multihead.masks`).
"""

import importlib

from . import backends, masks
from .backends import Dispatch
from .backends.reference import ReferenceOutput, attention_ref
from .call import AttentionCall, AttentionOutput, Gradients, make_call
from .functional import (
    AttentionWithWeights,
    attention,
    attention_with_lse,
    attention_with_weights,
    chunked_attention,
    explain_dispatch,
)
from .weights import AttentionStats, attention_and_weights, attention_stats, attention_weights
from .cache import DynamicCache, KVCache, StaticCache, kv_bytes_per_token
from .latent import MultiHeadLatentAttention
from .module import HeadProjections, MultiHeadAttention, MultiHeadAttentionConfig, MultiHeadAttentionOutput
from .rope import RotaryEmbedding

__version__ = "0.1.0"

# Subpackages with optional extras or a cost to import, reachable as attributes on first use:
# `multihead.compat`, `multihead.models` (safetensors, tokenizers), `multihead.viz` (matplotlib), ...
_LAZY = ("compat", "distributed", "explain", "generate", "hf", "models", "timing", "viz")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)  # cached in sys.modules and set on the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AttentionCall",
    "AttentionOutput",
    "AttentionStats",
    "AttentionWithWeights",
    "Dispatch",
    "DynamicCache",
    "Gradients",
    "HeadProjections",
    "KVCache",
    "MultiHeadAttention",
    "MultiHeadAttentionConfig",
    "MultiHeadAttentionOutput",
    "MultiHeadLatentAttention",
    "ReferenceOutput",
    "RotaryEmbedding",
    "StaticCache",
    "attention",
    "attention_and_weights",
    "attention_ref",
    "attention_stats",
    "attention_weights",
    "attention_with_lse",
    "attention_with_weights",
    "backends",
    "chunked_attention",
    "explain_dispatch",
    "kv_bytes_per_token",
    "make_call",
    "masks",
]
