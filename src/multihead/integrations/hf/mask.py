"""The mask function transformers calls for attn_implementation="multihead".

transformers builds every model's masks through `masking_utils`, which asks
the function registered under the implementation's name in
`AttentionMaskInterface`; an implementation with none registered gets no
mask at all (padding would be ignored). This one speaks multihead's
convention: a bool mask (B, 1, T, S), True where a query may attend, or
None where `causal` alone says it.

A sliding window and a packed batch are not written out. Where the mask
transformers asks for is exactly causal (bottom-right), with a sliding
window and/or documents, it returns a `StructuredMask`: a (B, 1, T, S) bool
tensor that holds no T x S memory and that the hook passes to multihead as
`causal=True, window=(W - 1, 0), documents=ids` (and a padded batch's keys
as a (B, 1, 1, S) key mask), so the chunked backend skips the tiles outside
them and nothing of size T x S is made. Any other code
that reads it (a model that slices or combines its mask) gets the dense
mask, written out then: a StructuredMask is never wrong, only sometimes
not cheap. It is made where all of these hold (`structure`):

- the mask function is transformers' causal one, with its sliding-window
  overlay and/or its packed-sequence pair (documents from position_ids that
  restart, as `DataCollatorWithFlattening` makes them): read from the
  functions transformers composes (their code objects, not their names), so
  a mask function of any other kind (an image-token overlay, chunked
  attention, a transformers whose functions differ) is written out;
- padding (a 2D attention_mask with a zero in the keys' span: checked on
  the values, once per forward, as transformers' sdpa does) only beside a
  window or documents: it becomes the key mask; padding alone is
  transformers' own mask, as before;
- the queries end where the keys end (q_offset - kv_offset == S - T, int
  offsets: no cache, a dynamic cache, a sliding dynamic cache), so that
  transformers' positions are multihead's bottom-right alignment; a static
  cache (tensor offset, empty slots) is written out;
- not under torch.compile (there it is written out, as before).

Otherwise it is transformers' own `sdpa_mask` (the same mask functions,
padding, sliding windows, packed sequences, static-cache slots), with one
difference: sdpa may return None ("use is_causal") for shapes where SDPA's
top-left causal flag and multihead's bottom-right one disagree (a prefill
into a larger static cache: T < S with q_offset 0). Here the mask is left
out only, with no padding and no window that bites, for a square call
(T == S), where the two alignments are the same triangle, and for a
decoding step after cached tokens (T = 1 with an int q_offset > 0, a
dynamic cache), where both see every key.

transformers calls it once per forward, with the model's config, before the
first layer runs: the options' layers and heads are checked against the
model here, so that a selection the model does not have is refused before
any cache is written (`multihead.hf.options`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree
from transformers import masking_utils
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .options import current


class Structure(NamedTuple):
    """A mask that is causal (bottom-right) and, where given, a sliding window and documents."""

    window: int | None  # transformers' sliding_window W: key k kept for query q when q - k < W; None: no window
    documents: Tensor | None  # (B, T) int64 document ids of a packed batch (T == S); None: one document
    keys: Tensor | None = None  # (B, S) bool, True = a real key (the padding mask over the call's keys); None: all


class StructuredMask(Tensor):
    """A (B, 1, T, S) bool mask known by its `structure`, holding no T x S memory (see the module docstring).

    Any torch operation on it computes on the dense mask (`dense()`), so code that reads it as a
    tensor gets the right values; the multihead hook reads `structure` instead.
    """

    structure: Structure

    @staticmethod
    def __new__(cls, structure: Structure, batch: int, q_len: int, kv_len: int, device) -> "StructuredMask":
        mask = Tensor._make_wrapper_subclass(cls, (batch, 1, q_len, kv_len), dtype=torch.bool, device=device)
        mask.structure = structure
        return mask

    __torch_function__ = torch._C._disabled_torch_function_impl  # results stay plain tensors

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def dense(x):
            return x.dense() if isinstance(x, StructuredMask) else x
        return func(*_pytree.tree_map(dense, args), **_pytree.tree_map(dense, kwargs or {}))

    def fits(self, T: int, S: int) -> bool:
        """Whether it is the mask of a call with T queries and S keys."""
        return self.shape[2] == T and self.shape[3] == S

    def dense(self) -> Tensor:
        """The (B, 1, T, S) bool mask written out (True = may attend), as transformers' sdpa_mask builds it."""
        B, _, T, S = self.shape
        query = torch.arange(T, device=self.device)[:, None] + (S - T)  # (T, 1) bottom-right positions
        key = torch.arange(S, device=self.device)[None, :]  # (1, S)
        allowed = key <= query  # (T, S)
        if self.structure.window is not None:
            allowed = allowed & (key > query - self.structure.window)
        allowed = allowed[None, None].expand(B, 1, T, S)  # (T, S) -> (B, 1, T, S)
        ids = self.structure.documents
        if ids is not None:
            allowed = allowed & (ids[:, :, None] == ids[:, None, :])[:, None]  # (B, T, S) -> (B, 1, T, S)
        keys = self.structure.keys
        if keys is not None:
            allowed = allowed & keys[:, None, None, :]  # (B, S) -> (B, 1, 1, S): padding keys ruled out
        return allowed.contiguous()

    def __deepcopy__(self, memo) -> "StructuredMask":
        # torch's default wants clone() to keep the subclass; a copy of the structure
        copied = Structure(*(x.clone() if isinstance(x, Tensor) else x for x in self.structure))
        return StructuredMask(copied, self.shape[0], self.shape[2], self.shape[3], self.device)

    def __repr__(self) -> str:
        window, ids, keys = self.structure
        parts = ["causal"] + ([f"window {window}"] if window is not None else []) + \
            ([f"documents {tuple(ids.shape)}"] if ids is not None else []) + \
            ([f"padding keys {tuple(keys.shape)}"] if keys is not None else [])
        return f"StructuredMask({tuple(self.shape)}: {', '.join(parts)})"


class _Read(NamedTuple):
    """What a transformers mask function says, as far as `_read` understands it."""

    causal: bool  # causal_mask_function is part of it
    window: int | None  # sliding_window_overlay's W
    documents: Tensor | None  # packed_sequence_mask_function's (B, T) ids
    remapped: bool  # positions remapped to the packed sequences' own (remap_positions_for_packed_sequence)


def _codes() -> dict:
    """The code objects of transformers' mask-function factories -> what each makes; {} if they are not there."""
    try:
        ids = torch.zeros(1, 1, dtype=torch.long)
        return {masking_utils.and_masks(causal_mask_function).__code__: "and",
                masking_utils.sliding_window_overlay(1).__code__: "window",
                masking_utils.packed_sequence_mask_function(ids).__code__: "documents",
                masking_utils.remap_positions_for_packed_sequence(causal_mask_function, ids).__code__: "remap"}
    except (AttributeError, TypeError):  # a transformers without them: every mask is written out
        return {}


_KINDS = _codes()


def _cells(fn) -> dict:
    code, closure = fn.__code__, fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, closure)}


def _merge(parts: list[_Read | None]) -> _Read | None:
    """The conjunction of several read functions; None where one is unknown or two set the same thing."""
    if any(part is None for part in parts):
        return None
    windows = [p.window for p in parts if p.window is not None]
    documents = [p.documents for p in parts if p.documents is not None]
    if len(windows) > 1 or len(documents) > 1:
        return None
    return _Read(any(p.causal for p in parts), windows[0] if windows else None,
                 documents[0] if documents else None, any(p.remapped for p in parts))


def _read(fn, depth: int = 0) -> _Read | None:
    """transformers' composed mask function as (causal, window, documents), or None for anything else."""
    if fn is causal_mask_function:
        return _Read(True, None, None, False)
    kind = _KINDS.get(getattr(fn, "__code__", None))
    if kind is None or depth > 4:
        return None
    cells = _cells(fn)
    if kind == "window":
        size = cells.get("sliding_window")
        ok = isinstance(size, int) and not isinstance(size, bool) and size >= 1
        return _Read(False, size, None, False) if ok else None
    if kind == "documents":
        ids = cells.get("packed_sequence_mask")
        return _Read(False, None, ids, False) if isinstance(ids, Tensor) and ids.dim() == 2 else None
    if kind == "remap":
        inner = _read(cells.get("mask_function"), depth + 1)
        return None if inner is None or inner.remapped else inner._replace(remapped=True)
    return _merge([_read(part, depth + 1) for part in cells.get("mask_functions", (None,))])


def _padding_keys(attention_mask, kv_length: int, kv_offset: int) -> Tensor | None:
    """The 2D padding mask (B, >= kv_offset + S) over the call's keys, (B, S) bool; None where every key is real."""
    if attention_mask is None:
        return None
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    keys = padding[:, kv_offset:kv_offset + kv_length].bool()  # (B, >= kv_offset + S) -> (B, S)
    return None if bool(keys.all()) else keys  # once per forward, as sdpa_mask's own check


def structure(batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset, mask_function,
              attention_mask) -> Structure | None:
    """The Structure of the mask transformers asks for, or None where it must be written out (module docstring)."""
    if torch.compiler.is_compiling() or not _KINDS:
        return None
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)) or q_offset - kv_offset != kv_length - q_length:
        return None  # transformers' positions are not the bottom-right alignment (a static cache)
    read = _read(mask_function)
    if read is None or not read.causal or (read.remapped and read.documents is None):
        return None
    ids = read.documents
    if ids is not None and (tuple(ids.shape) != (batch_size, q_length) or q_length != kv_length or q_offset != 0):
        return None
    window = read.window if read.window is not None and read.window < kv_length else None  # else it never bites
    keys = _padding_keys(attention_mask, kv_length, kv_offset)
    if keys is not None and (keys.shape[0] != batch_size or (window is None and ids is None)):
        # padding alone: transformers' own mask, as before (a key mask with causal is no cheaper); a padding
        # mask of another batch size: transformers' own refusal, not a key mask that broadcasts
        return None
    return Structure(window, None if ids is None else ids.long(), keys)


def multihead_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=causal_mask_function, attention_mask=None, *args,
                   allow_is_causal_skip: bool = True, **kwargs) -> Tensor | None:
    """transformers' mask-interface signature -> (B, 1, T, S) bool, True = may attend, or None (causal alone)."""
    current().check_model(kwargs.get("config"))  # before any layer writes its cache
    # bottom-right == top-left on the square; a decoding step after cached tokens (an int offset: a
    # dynamic cache) sees every key either way. Not a first token into a static cache (q_offset 0 or a tensor).
    decoding = q_length == 1 and isinstance(q_offset, int) and q_offset > 0
    skip = allow_is_causal_skip and (q_length == kv_length or decoding)
    found = structure(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
    if found is not None:
        if all(part is None for part in found) and skip:
            return None  # causal alone
        return StructuredMask(found, batch_size, q_length, kv_length, kwargs.get("device", "cpu"))
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, *args,
                     allow_is_causal_skip=skip, **kwargs)


__all__ = ["Structure", "StructuredMask", "multihead_mask", "structure"]
