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

The layers, each importing only from those below it (tests/test_contract.py):

    tools/ (whiteboard, viz, cli, timing)
    integrations/ (hf, distributed)   models/ (BERT, GPT-2, Llama, generate)
    nn/ (MultiHeadAttention, MLA, compat, caches, RoPE)
    ops/ (attention, attention_weights, attention_stats, which_backend; run)
    backends/ (registry, reference, sdpa, cpu_flash, chunked, triton)
    core/ (the checked call, masks, argument checks)
"""

import importlib
import importlib.abc
import importlib.util
import sys

# The public names, each imported on first use (PEP 562): `import multihead` alone costs no torch,
# so the command line answers --help at once; `multihead.attention` imports what it needs.
_PUBLIC = {
    "backends": ("multihead.backends", None),
    "AttentionOutput": ("multihead.core.call", "AttentionOutput"),
    "DynamicCache": ("multihead.nn.cache", "DynamicCache"),
    "KVCache": ("multihead.nn.cache", "KVCache"),
    "StaticCache": ("multihead.nn.cache", "StaticCache"),
    "SlidingWindowCache": ("multihead.nn.cache", "SlidingWindowCache"),
    "MultiHeadLatentAttention": ("multihead.nn.latent", "MultiHeadLatentAttention"),
    "MultiHeadAttention": ("multihead.nn.mha", "MultiHeadAttention"),
    "MultiHeadAttentionOutput": ("multihead.nn.mha", "MultiHeadAttentionOutput"),
    "RotaryEmbedding": ("multihead.nn.rope", "RotaryEmbedding"),
    "attention": ("multihead.ops.functional", "attention"),
    "which_backend": ("multihead.ops.functional", "which_backend"),
    "AttentionStats": ("multihead.ops.weights", "AttentionStats"),
    "attention_stats": ("multihead.ops.weights", "attention_stats"),
    "attention_weights": ("multihead.ops.weights", "attention_weights"),
}

__version__ = "0.1.0"

# The short names users import (`import multihead.hf`, `from multihead.generate import generate`,
# `multihead.viz.head_view`) for modules that live in the layer folders. Each is the same module object
# as its long name, imported on first use: optional extras and their import cost only for those who use them.
_SHORT_NAMES = {
    "compat": "multihead.nn.compat",
    "distributed": "multihead.integrations.distributed",
    "explain": "multihead.tools.whiteboard",
    "generate": "multihead.models.generate",
    "masks": "multihead.core.masks",
    "hf": "multihead.integrations.hf",
    "models": "multihead.models",
    "timing": "multihead.tools.timing",
    "viz": "multihead.tools.viz",
}


def _long_name(fullname: str) -> str | None:
    """multihead.hf.options -> multihead.integrations.hf.options; None for a name that is not short."""
    if not fullname.startswith(f"{__name__}."):
        return None
    head, _, rest = fullname[len(__name__) + 1:].partition(".")
    long_name = _SHORT_NAMES.get(head, fullname) + (f".{rest}" if rest and head in _SHORT_NAMES else "")
    return None if long_name == fullname else long_name


class _ShortNameFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import multihead.<short>[.sub]` with the module of its long name (one module, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        long_name = _long_name(fullname)
        return None if long_name is None else importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(_long_name(spec.name))
        spec.loader_state = module.__spec__  # the import system sets the short name's next; exec_module restores it
        return module

    def exec_module(self, module):  # the long name's import ran it; its relative imports need its own spec
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _ShortNameFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ShortNameFinder())  # before the path finder, which would load a second copy


def __getattr__(name: str):
    if name in _PUBLIC:
        module_name, attribute = _PUBLIC[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value  # once: the next lookup is a plain attribute
        return value
    if name in _SHORT_NAMES:
        return importlib.import_module(f"{__name__}.{name}")  # both names in sys.modules, one module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SHORT_NAMES) | set(_PUBLIC))


# One name, one purpose (docs/design.md has the table). Everything else lives in its layer's module:
# the checked call in multihead.core.call, the reference in multihead.backends.reference, ...
__all__ = [
    "AttentionOutput",
    "AttentionStats",
    "DynamicCache",
    "KVCache",
    "MultiHeadAttention",
    "MultiHeadAttentionOutput",
    "MultiHeadLatentAttention",
    "RotaryEmbedding",
    "SlidingWindowCache",
    "StaticCache",
    "attention",
    "attention_stats",
    "attention_weights",
    "backends",
    "masks",
    "which_backend",
]
