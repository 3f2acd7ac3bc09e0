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

When each selection is checked, so that a refused forward changes nothing:

- the types (ints, a sequence of ints, a slice), where the block is entered;
- layers against the model's layer count and heads against its query heads,
  when the model meets the options: in the mask function, which
  transformers calls before the first layer runs (so before any cache is
  written), and again at each attention call for a model that builds no
  mask there (against the call's own heads);
- rows never refuse: they index each call's own queries, and a call has
  only the rows it has. A row that a call does not have is skipped, as a
  slice's bounds are: under `rows=3`, the 6-token prefill returns row 3
  and each 1-token decoding step returns (B, h, 0, S). A refusal at the
  decoding step would come after transformers has written the step into
  the cache of the layers before it, and the rows that a generation's
  later steps have are not known when the block is entered.

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
other's. Under `torch.compile` (a compiled model, or transformers'
compiled static-cache generation), which cannot trace a ContextVar, the
hook reads a plain module global instead, which every `options()` block
sets on entry and restores on exit; dynamo guards on it, so a compiled
forward called inside a block follows the block's options (each distinct
set of options compiles once more), and outside any block the defaults.
Under compile the options are therefore process-wide: blocks entered at
the same time in other threads or tasks are not kept apart, as with
transformers' own compiled output capture. Enter the block outside the
compiled function: inside one, `options()` raises (with fullgraph=True the
compile fails with that message; without it dynamo runs the function
eagerly, where the block works).
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ... import backends
from ...ops.weights import Index, check_index

_UNSET = object()  # a field that an options() block leaves as the enclosing one had it

WEIGHTS_FROM = ("kernel", "one_pass", "auto")  # where the returned weights come from (Options.weights_from)

# config attributes that count a model's attention layers / query heads (an encoder-decoder has one per stack)
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers")
HEAD_COUNTS = ("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads")


def _largest(config, names: tuple[str, ...]) -> int | None:
    """The largest int among the config's attributes `names` (None where it states none)."""
    found = [getattr(config, name, None) for name in names]
    counts = [n for n in found if isinstance(n, int) and not isinstance(n, bool)]
    return max(counts) if counts else None


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

    def check_model(self, config, heads: int | None = None) -> None:
        """ValueError where `layers` or `heads` name what this model does not have (see the module docstring).

        config: the model's (or the attention module's) config; heads: a call's query heads where one is
        at hand, else the config's count. A count the config does not state is not checked.
        """
        if self.layers is None and self.heads is None:
            return
        model = getattr(config, "model_type", None) or "the model"
        count = _largest(config, LAYER_COUNTS)
        beyond = [i for i in self.layers or () if count is not None and i >= count]
        if beyond:
            raise ValueError(f"multihead.hf.options(layers={list(self.layers)}) names layers that {model} does not "
                             f"have: it has {count} attention layers (layer_idx 0 to {count - 1}), got {beyond}")
        heads = _largest(config, HEAD_COUNTS) if heads is None else heads
        if self.heads is not None and heads is not None:
            try:
                check_index("heads", self.heads, heads)
            except ValueError:
                raise ValueError(f"multihead.hf.options(heads={self.heads!r}) is out of range for {model}: it has "
                                 f"{heads} query heads (0 to {heads - 1}, or negative from the end)") from None

    def heads_in(self, size: int) -> list[int] | None:
        """The chosen heads as positions in [0, size) (None: all); `check_model` has refused any beyond."""
        return check_index("heads", self.heads, size)

    def rows_in(self, size: int) -> list[int] | None:
        """The chosen rows that a call of `size` queries has, as positions in [0, size) (None: all).

        A row the call does not have is skipped, as a slice's bounds are (see the module docstring).
        """
        rows = self.rows
        if rows is None or isinstance(rows, slice):
            return None if rows is None else list(range(size)[rows])
        return [i % size for i in ((rows,) if isinstance(rows, int) else rows) if -size <= i < size]


_CURRENT: ContextVar[Options] = ContextVar("multihead_hf_options", default=Options())
_UNDER_COMPILE = Options()  # what compiled code reads (module docstring): the innermost block entered, any thread


def current() -> Options:
    """The options in force here (the defaults outside any `options()` block)."""
    if torch.compiler.is_compiling():
        return _UNDER_COMPILE  # dynamo cannot trace ContextVar.get; it guards on this global instead
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
    """heads/rows: an int, a sequence of ints, a slice or None; the range is checked against the model (heads)."""
    if index is None or isinstance(index, slice) or (isinstance(index, int) and not isinstance(index, bool)):
        return index
    if isinstance(index, (str, bytes)) or not isinstance(index, Sequence):
        raise TypeError(f"{name} must be an int, a sequence of ints, a slice or None, got {type(index).__name__}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        raise TypeError(f"{name} must hold ints, got {list(index)!r}")
    return tuple(index)


def _changes(backend, layers, heads, rows, weights_from) -> dict:
    """The checked fields an options() block sets (the ones given); TypeError/ValueError naming the argument."""
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
    return changes


@contextlib.contextmanager
def options(*, backend=_UNSET, layers=_UNSET, heads=_UNSET, rows=_UNSET, weights_from=_UNSET) -> Iterator[Options]:
    """Set the hook's backend and weight selection for the calls inside the block (see the module docstring).

    Every argument is checked before anything changes; the ones not given
    keep the enclosing block's value. Yields the options in force.
    """
    global _UNDER_COMPILE
    if torch.compiler.is_compiling():
        raise RuntimeError("multihead.hf.options() cannot be entered inside a compiled function: enter the block "
                           "around the call of the compiled model (its options are read there)")
    chosen = dataclasses.replace(current(), **_changes(backend, layers, heads, rows, weights_from))
    token = _CURRENT.set(chosen)
    _UNDER_COMPILE = chosen
    try:
        yield chosen
    finally:
        _CURRENT.reset(token)
        _UNDER_COMPILE = _CURRENT.get()  # this context's enclosing block: all blocks closed leaves the defaults


__all__ = ["HEAD_COUNTS", "LAYER_COUNTS", "Options", "current", "options"]
