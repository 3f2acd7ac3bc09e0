"""What the Hugging Face hook does in the current context: the backend, and which weights it returns.

    with multihead.hf.options(layers=[3], heads=[0, 5], rows=-1):
        out = model(**batch, output_attentions=True)
    out.attentions[3]        # (B, 2, 1, S): layer 3, heads 0 and 5, each call's last query
    out.attentions[0]        # (B, 0, 1, S): no weights made for a layer not asked for

Transformers decides *whether* attention weights are returned
(`output_attentions=True` on the call); these options decide *which*: the
layers (the attention module's `layer_idx`), the query heads and the query
rows of each call. A layer that is not selected returns an empty
(B, 0, t, S) tensor, so `out.attentions[i]` stays layer i. In an
encoder-decoder model an index names that layer of the encoder, of the
decoder and of its cross-attention (transformers numbers each stack from 0). rows index each
attention call's own queries: `rows=-1` is the prompt's last token at the
prefill and the new token at each decoding step.

Where the weights come from (`weights_from`): "kernel" runs the backend's
kernel for the output and computes the chosen weights from their own rows'
scores (`multihead.ops.weights`): nothing of size T x S is made for a head
or row not asked for. "one_pass" runs multihead's eager pass (the reference
formula in place, `multihead.ops.run` with need_weights), which
keeps every weight as it computes the output. When every head and row is
asked for, computing them is the whole cost and the one pass is the faster
exact way (BENCHMARKS.md, "Hugging Face models"), so "auto" (the default)
takes it there and the kernel wherever heads or rows are chosen or a
backend is pinned.

The options live in a `contextvars.ContextVar`: nested `with` blocks
override field by field, and threads or asyncio tasks do not see each
other's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

from ... import backends
from ...ops.weights import Index

_UNSET = object()  # a field that an options() block leaves as the enclosing one had it

WEIGHTS_FROM = ("kernel", "one_pass", "auto")  # where the returned weights come from (Options.weights_from)


@dataclass(frozen=True)
class Options:
    """The hook's settings for the calls made in one context."""

    backend: str = "auto"  # multihead backend of every call ("auto": the registry's first that supports it)
    layers: tuple[int, ...] | None = None  # layer_idx values whose weights are returned; None = every layer
    heads: Index = None  # query heads of the returned weights (int, ints, slice); None = all
    rows: Index = None  # query rows of each call (int, ints, slice; negative from the end); None = all
    weights_from: str = "auto"  # "kernel": the output from the backend's kernel, the chosen rows' weights
    # computed apart; "one_pass": multihead's eager pass, which keeps them all; "auto": one_pass where every
    # head and row is asked for with backend "auto", kernel otherwise

    def wants_layer(self, module) -> bool:
        """Whether this attention module's weights are asked for; a layer filter needs its layer_idx."""
        if self.layers is None:
            return True
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            raise ValueError(f"multihead.hf.options(layers={list(self.layers)}) selects by the attention module's "
                             f"layer_idx, but {type(module).__name__} has layer_idx={layer!r}; select heads/rows "
                             f"only (layers=None)")
        return layer in self.layers


_CURRENT: ContextVar[Options] = ContextVar("multihead_hf_options", default=Options())


def current() -> Options:
    """The options in force here (the defaults outside any `options()` block)."""
    return _CURRENT.get()


def _check_layers(layers) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        items = tuple(layers)
    except TypeError:
        raise TypeError(f"layers must be an int, a sequence of ints or None, got {type(layers).__name__}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"layers must hold layer indices >= 0 (the modules' layer_idx), got {list(items)!r}")
    return items


def _check_index(name: str, index) -> Index:
    """heads/rows: an int, a sequence of ints, a slice or None; the range is checked per call, against H and T."""
    if index is None or isinstance(index, slice) or (isinstance(index, int) and not isinstance(index, bool)):
        return index
    if isinstance(index, (str, bytes)) or not isinstance(index, Sequence):
        raise TypeError(f"{name} must be an int, a sequence of ints, a slice or None, got {type(index).__name__}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        raise TypeError(f"{name} must hold ints, got {list(index)!r}")
    return tuple(index)


@contextlib.contextmanager
def options(*, backend=_UNSET, layers=_UNSET, heads=_UNSET, rows=_UNSET, weights_from=_UNSET) -> Iterator[Options]:
    """Set the hook's backend and weight selection for the calls inside the block (see the module docstring).

    Every argument is checked before anything changes; the ones not given
    keep the enclosing block's value. Yields the options in force.
    """
    changes = {}
    if backend is not _UNSET:
        changes["backend"] = backends.check_name(backend)
    if layers is not _UNSET:
        changes["layers"] = _check_layers(layers)
    if heads is not _UNSET:
        changes["heads"] = _check_index("heads", heads)
    if rows is not _UNSET:
        changes["rows"] = _check_index("rows", rows)
    if weights_from is not _UNSET:
        if weights_from not in WEIGHTS_FROM:
            raise ValueError(f"weights_from must be one of {WEIGHTS_FROM}, got {weights_from!r}")
        changes["weights_from"] = weights_from
    chosen = dataclasses.replace(current(), **changes)
    token = _CURRENT.set(chosen)
    try:
        yield chosen
    finally:
        _CURRENT.reset(token)


__all__ = ["Options", "current", "options"]
