"""KV caches: every layer's keys and values of the tokens seen so far, per sequence.

Decoding one token at a time recomputes nothing when the keys and values of the
past are kept: each step projects only the new chunk, appends its k and v, and
attends its queries to everything cached. A cache holds num_layers layer caches;
`cache[i]` is what layer i's `MultiHeadAttention(..., causal=True)` takes as
`cache=`.

    cache = DynamicCache(num_layers)                      # grows, capacity doubling
    cache = StaticCache(num_layers, B, max_length, G, D)  # preallocated, fixed shapes
    cache = SlidingWindowCache(num_layers, B, window, G, D)  # only a sliding window's tokens: fixed memory
    out = mha(x_chunk, cache=cache[i]).output             # inside layer i

One write, as transformers' and gpt-fast's caches have it:

    cached = layer.update(k, v, chunk_lengths)   # append; CachedKV(k (B, G, S, D), v (B, G, S, Dv), mask)

and read-only questions around it: `lengths`, `positions(T)`, and `plan(k, v,
chunk_lengths)`, which makes every check `update` makes and says where the
chunk would go (a `ChunkLayout`) without writing anything. A caller with
checks of its own (a module: its attn_mask over the S keys, the backend's
answer) plans, checks, then writes with `update(k, v, layout=plan)`; a
refused call has written nothing, so there is nothing to undo.

Layout. Slot j of sequence b holds the token at absolute position j of that
sequence, so the cached tokens of b are slots 0 .. lengths[b] - 1 and a new
chunk of T tokens is written at slots lengths[b] .. lengths[b] + T - 1. Every
sequence has its own length (prompts of different lengths share a batch), and
`lengths[:, None] + arange(T)` are the new tokens' positions (RoPE's offset).
A SlidingWindowCache keeps each sequence's last left + 1 tokens in a ring
instead (position p in slot p mod (left + 1)); every layout says which
position each returned key holds (`ChunkLayout.key_positions`), so a module
places its window and ALiBi by positions, whatever the kind of cache.

Padding. A chunk is (B, T) for every sequence, so a sequence with fewer new
tokens is padded on the right; `chunk_lengths` (B,) says how many are real.
Only real tokens count: lengths grow by chunk_lengths, and the next chunk
overwrites what padding left behind (the static cache never stores it at all),
so no later query ever attends to a padded token.

The mask `update` returns, (B, 1, T, S) bool, True = may attend. The new query
i of sequence b sits at position p = lengths[b] + i; it sees the slots j <= p
that hold real tokens: the causal mask aligned bottom-right, per sequence.

    lengths = (3, 1), chunk T = 2, chunk_lengths = (2, 1), S = 5
    b = 0:  keys 0 1 2 3 4        b = 1:  keys 0 1 2 3 4
       q0 (p=3)  x x x x .           q0 (p=1)  x x . . .
       q1 (p=4)  x x x x x           q1 (pad)  x x . . .   <- padded query: sees the real tokens,
                                                              so its output is finite (and unused)

Decoding loops. `KVCache.layout(T, chunk_lengths)` works out once per step
where the chunk goes in every layer (positions, slots, lengths after the
chunk, the mask), without a check that reads a tensor; each layer then
`update(k, v, layout=layout)`s. It is for loops that ran their first chunk
through the checked path and know the rest fits (`multihead.generate`): one
chunk's bookkeeping per step instead of one per layer, and no host sync.

The caches are for inference: run decoding under torch.no_grad(). They write in
place, so autograd refuses a backward through a step whose keys were written
over since.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..core.checks import key_mask as check_key_mask
from ..core.checks import positive_int
from ..core.variants import check_window


class CachedKV(NamedTuple):
    k: Tensor  # (B, G, S, D): every cached key of the layer, the new chunk's included
    v: Tensor  # (B, G, S, Dv): likewise for the values
    attn_mask: Tensor  # (B, 1, T, S) bool, True = may attend: causal per sequence, real tokens only


class ChunkLayout(NamedTuple):
    """Where a chunk goes, the same in every layer of a cache (`LayerCache.plan`, `KVCache.layout`)."""

    positions: Tensor  # (B, T) int64: absolute position of each of the chunk's tokens (RoPE's, a position embedding's)
    slots: Tensor  # (B, T) int64: the storage slot each token is written to; padding goes where no query reads it
    new_lengths: Tensor  # (B,) int64: each sequence's length after the chunk
    attn_mask: Tensor  # (B, 1, T, S) bool, True = may attend: causal per sequence, real tokens only
    kv_len: int  # S, the key length `update` returns
    key_positions: Tensor  # (B|1, S) int64: the absolute position of the token each of the S keys holds (-1: none)


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes one token of one sequence costs in a KV cache: G·(D + Dv)·size per layer (2·G·D·size when Dv = D).

    Multi-head attention (G = H) pays 2·H·D per layer, grouped-query 2·G·D,
    multi-query (G = 1) 2·D.
    """
    positive_int("num_layers", num_layers)
    positive_int("num_kv_heads", num_kv_heads)
    positive_int("head_dim", head_dim)
    v_head_dim = head_dim if v_head_dim is None else positive_int("v_head_dim", v_head_dim)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return num_layers * num_kv_heads * (head_dim + v_head_dim) * dtype.itemsize


def _compiling() -> bool:
    """Under torch.compile the checks that read tensor values are skipped: each would be a graph break."""
    return torch.compiler.is_compiling()


def _check_num_new(num_new) -> int:
    if isinstance(num_new, bool) or not isinstance(num_new, int) or num_new < 0:
        raise ValueError(f"num_new must be an int >= 0 (tokens in the next chunk), got {num_new!r}")
    return num_new


def _check_chunk(k, v) -> None:
    for name, x, dims in (("k", k, "(B, G, T, D)"), ("v", v, "(B, G, T, Dv)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} has {x.dim()} dims, {dims} expected, got {tuple(x.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k (B, G, T, D) and v (B, G, T, Dv) must agree on B, G and T, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.dtype != k.dtype or v.device != k.device:
        raise TypeError(f"k and v must share dtype and device, got k {k.dtype} on {k.device}, "
                        f"v {v.dtype} on {v.device}")


def _check_chunk_lengths(chunk_lengths, B: int, T: int, device: torch.device) -> Tensor | None:
    """chunk_lengths (B,) ints in [0, T] -> int64 on the cache's device; None = all T tokens are real."""
    if chunk_lengths is None:
        return None
    if not isinstance(chunk_lengths, Tensor):
        items = list(chunk_lengths) if isinstance(chunk_lengths, (list, tuple)) else None
        if items is None or not all(isinstance(n, int) and not isinstance(n, bool) for n in items):
            raise TypeError(f"chunk_lengths must be a (B,) tensor or a list of ints (real tokens per sequence), "
                            f"got {chunk_lengths!r}")
        chunk_lengths = torch.tensor(items, dtype=torch.int64)
    if chunk_lengths.dtype == torch.bool or chunk_lengths.is_floating_point() or chunk_lengths.is_complex():
        raise TypeError(f"chunk_lengths must hold integers (real tokens per sequence), got {chunk_lengths.dtype}")
    if tuple(chunk_lengths.shape) != (B,):
        raise ValueError(f"chunk_lengths must be (B,) = ({B},), one count per sequence, "
                         f"got {tuple(chunk_lengths.shape)}")
    chunk_lengths = chunk_lengths.to(device=device, dtype=torch.int64)
    if not _compiling() and bool(((chunk_lengths < 0) | (chunk_lengths > T)).any()):
        raise ValueError(f"chunk_lengths must lie in [0, T={T}] (real tokens among the chunk's T), "
                         f"got {chunk_lengths.tolist()}")
    return chunk_lengths


def chunk_lengths_from_key_mask(key_mask, batch: int, length: int, device: torch.device) -> Tensor:
    """key_mask (B, T) of a chunk to cache, True = real, right-padded -> real tokens per sequence (B,).

    A cached sequence's tokens sit at consecutive positions, so padding may
    only follow the real tokens (checked on the host, except under torch.compile).
    """
    key_mask = check_key_mask(key_mask, batch, length, device, what="T")
    if not _compiling() and bool((key_mask[:, 1:] & ~key_mask[:, :-1]).any()):
        raise ValueError("with a cache, key_mask must pad on the right (True for the real tokens, then False): "
                         "a cached sequence's tokens sit at consecutive positions")
    return key_mask.sum(dim=-1)  # (B, T) -> (B,)


def check_layer_cache(cache, batch: int, holder: str) -> None:
    """cache= of a module: one layer's cache (not the model's), holding `batch` sequences once it holds any.

    holder names the input whose batch is compared ("query", "input x").
    """
    if not isinstance(cache, LayerCache):
        hint = "; pass one layer's cache, cache[i]" if hasattr(cache, "layers") else ""
        raise TypeError(f"cache must be a multihead.nn.cache.LayerCache, got {type(cache).__name__}{hint}")
    if cache.sequences not in (None, batch):
        raise ValueError(f"the cache holds {cache.sequences} sequences, the {holder} has B={batch}; "
                         f"reset() the cache for a new batch")


def token_positions(positions: Tensor | None, cache: LayerCache | None, batch: int, length: int,
                    device: torch.device) -> Tensor:
    """A chunk's absolute positions: the given ones, else right after the cache's tokens (B, T), else 0..T-1 (T,)."""
    if positions is not None:
        return positions
    if cache is None:
        return torch.arange(length, device=device)  # (T,)
    return cache.positions(length, batch_size=batch, device=device).to(device)  # (B, T)


def _decode_mask(positions: Tensor, key_positions: Tensor, new_lengths: Tensor, left: int | None = None) -> Tensor:
    """(B, 1, T, S) bool: the query at positions[b, i] sees the keys that hold a real token (at a position in
    [0, new_lengths[b])) at or before its own position, and with `left`, at most `left` positions before it."""
    delta = key_positions[:, None, :] - positions[:, :, None]  # (B|1, 1, S) - (B, T, 1) -> (B, T, S): j - p
    real = (key_positions >= 0) & (key_positions < new_lengths[:, None])  # (B|1, S) < (B, 1) -> (B, S)
    allowed = (delta <= 0) & real[:, None, :]  # (B, T, S) & (B, 1, S)
    if left is not None:
        allowed = allowed & (delta >= -left)
    return allowed[:, None]  # (B, T, S) -> (B, 1, T, S)


def _slot_index(slots: Tensor, storage: Tensor) -> Tensor:
    B, G, width = storage.shape[0], storage.shape[1], storage.shape[3]
    return slots[:, None, :, None].expand(B, G, slots.shape[1], width)  # (B, T) -> (B, G, T, width)


def _write_both(keys: Tensor, values: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """keys[b, g, slots[b, t]] = k[b, g, t] and likewise v, in place: O(T) writes whatever the capacity.

    One index serves both where D == Dv."""
    index = _slot_index(slots, keys)  # (B, G, T, D)
    keys.scatter_(2, index, k)
    values.scatter_(2, index if values.shape[3] == keys.shape[3] else _slot_index(slots, values), v)


class LayerCache:
    """One layer's keys and values for B sequences, each with its own length.

    What a `MultiHeadAttention` takes as `cache=`. The three kinds differ in
    where the tokens are kept: `DynamicLayerCache` grows, `StaticLayerCache`
    was allocated once, `SlidingWindowLayerCache` keeps a window's last
    tokens in a ring allocated once.
    """

    _lengths: Tensor | None

    @property
    def lengths(self) -> Tensor:
        """(B,) int64: real tokens cached per sequence = the position of each sequence's next token."""
        if self._lengths is None:
            raise ValueError(
                "this cache has seen no tokens yet and does not know the batch size; "
                "pass batch_size= to DynamicCache, or use positions(T, batch_size=B)"
            )
        return self._lengths

    @property
    def sequences(self) -> int | None:
        """B, the sequences this cache holds, once known (None before a dynamic cache's first chunk)."""
        return None if self._lengths is None else self._lengths.shape[0]

    def positions(self, num_new: int, *, batch_size: int | None = None,
                  device: torch.device | str | None = None) -> Tensor:
        """(B, T) absolute positions of the next chunk of num_new tokens: lengths[:, None] + arange(T).

        batch_size and device serve only a cache that has not seen a batch yet
        (everything starts at position 0 then).
        """
        _check_num_new(num_new)
        if self._lengths is None:
            if batch_size is None:
                self.lengths  # raises, saying what is missing
            B = positive_int("batch_size", batch_size)
            return torch.arange(num_new, device=device).expand(B, num_new)  # (T,) -> (B, T)
        return self._lengths[:, None] + torch.arange(num_new, device=self._lengths.device)  # (B, 1) + (T,) -> (B, T)

    def update(self, k: Tensor, v: Tensor, chunk_lengths: Tensor | None = None, *,
               layout: ChunkLayout | None = None) -> CachedKV:
        """Append a chunk k (B, G, T, D), v (B, G, T, Dv); return all cached keys, values and the mask (B, 1, T, S).

        The one write. chunk_lengths (B,) ints: how many of the T new tokens of
        each sequence are real (the rest is right padding, never attended to
        later); None means all T. Each sequence's length grows by its count.
        The chunk is checked first (`plan`): a refused one raises before
        anything is written.
        layout: where the chunk goes, from `plan(k, v, chunk_lengths)` or
            `KVCache.layout`; then nothing is checked again (and chunk_lengths,
            part of the layout, is not passed).
        """
        if layout is None:
            layout = self.plan(k, v, chunk_lengths)
        elif chunk_lengths is not None:
            raise ValueError("update takes chunk_lengths or a layout (which holds them), not both")
        return self._write(layout, k, v)

    def plan(self, k: Tensor, v: Tensor, chunk_lengths: Tensor | None = None) -> ChunkLayout:
        """Every check `update(k, v, chunk_lengths)` makes, and where the chunk would go; nothing is written.

        Raises TypeError/ValueError for a chunk this cache refuses (shapes,
        dtype, device, chunk_lengths, room). Under torch.compile the checks
        that read a tensor's value are skipped.
        """
        _check_chunk(k, v)
        return self._layout(k.shape[2], *self._checked(k, v, chunk_lengths))

    def layout(self, num_new: int, chunk_lengths: Tensor | None = None) -> ChunkLayout:
        """Where the next chunk of num_new tokens goes (chunk_lengths (B,): real ones per sequence; None: all).

        Nothing is checked that would read a tensor (no host sync): the
        caller knows the chunk fits (a static cache drops what would not, as
        under torch.compile), and a dynamic cache's S is its upper bound
        (the longest length before the chunk + num_new). Nothing is written.
        """
        _check_num_new(num_new)
        return self._layout(num_new, *self._advance(num_new, chunk_lengths))

    def _layout(self, num_new: int, new_lengths: Tensor, kv_len: int) -> ChunkLayout:
        lengths = self._before(new_lengths)
        positions = lengths[:, None] + torch.arange(num_new, device=lengths.device)  # (B, 1) + (T,) -> (B, T)
        slots = self._slots(positions, new_lengths)  # (B, T)
        key_positions = self._key_positions(positions, slots, kv_len)  # (B|1, S)
        mask = _decode_mask(positions, key_positions, new_lengths, self._left())  # (B, 1, T, S)
        return ChunkLayout(positions, slots, new_lengths, mask, kv_len, key_positions)

    def _key_positions(self, positions: Tensor, slots: Tensor, kv_len: int) -> Tensor:
        """(B|1, S) the position each returned key holds: slot j holds position j (overridden by a ring)."""
        return torch.arange(kv_len, device=positions.device)[None]  # (S,) -> (1, S)

    def _left(self) -> int | None:
        """How many positions back from a query the cache keeps keys for; None: all of them."""
        return None

    def placement(self) -> tuple:
        """What decides where a chunk goes: layers with equal placements put a chunk in the same slots."""
        return (type(self).__name__,)

    def _checked(self, k: Tensor, v: Tensor, chunk_lengths) -> tuple[Tensor, int]:
        """The chunk checked against what the cache holds: (lengths after it (B,), S), else raise."""
        raise NotImplementedError

    def _advance(self, num_new: int, chunk_lengths: Tensor | None) -> tuple[Tensor, int]:
        """(lengths after the chunk (B,), S), unchecked: what `plan` gives for a chunk that passes its checks."""
        raise NotImplementedError

    def _before(self, new_lengths: Tensor) -> Tensor:
        """(B,) lengths before a chunk that brings the sequences to new_lengths."""
        return self.lengths

    def _slots(self, positions: Tensor, new_lengths: Tensor) -> Tensor:
        """(B, T) storage slots of a chunk's tokens at `positions`, real ones those before new_lengths."""
        raise NotImplementedError

    def _write(self, layout: ChunkLayout, k: Tensor, v: Tensor) -> CachedKV:
        """Write k and v where `layout` says; the lengths become layout.new_lengths (a new tensor)."""
        raise NotImplementedError

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence costs in this layer: G·(D + Dv)·dtype size."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes this layer's cache holds now: its key and value storage, allocated (and its bookkeeping)."""
        return sum(x.nbytes for x in self._tensors() if x is not None)

    def _tensors(self) -> tuple:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every token (a new batch of prompts can start)."""
        raise NotImplementedError


class DynamicLayerCache(LayerCache):
    """A layer cache that grows: storage (B, G, capacity, D) doubles when full, so appending is amortised O(T).

    Batch size, heads, head dims, dtype and device come from the first update.
    S, the key length it returns, is the longest sequence's length: the others'
    surplus slots are masked.
    """

    def __init__(self, *, batch_size: int | None = None, device: torch.device | str | None = None,
                 initial_capacity: int = 16) -> None:
        self.initial_capacity = positive_int("initial_capacity", initial_capacity)
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        self._device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        self._k: Tensor | None = None  # (B, G, capacity, D)
        self._v: Tensor | None = None  # (B, G, capacity, Dv)
        self._lengths = (None if self.batch_size is None
                         else torch.zeros(self.batch_size, dtype=torch.int64, device=self._device))
        # max(lengths), known on the host so that S and the capacity need no device sync
        self._high = 0

    @property
    def capacity(self) -> int:
        """Slots allocated per sequence (0 before the first update)."""
        return 0 if self._k is None else self._k.shape[2]

    def _tensors(self) -> tuple:
        return self._k, self._v

    def bytes_per_token(self) -> int:
        if self._k is None:
            raise ValueError("a DynamicCache learns its heads, head dims and dtype from its first update; "
                             "use kv_bytes_per_token(...) to know the cost before that")
        G, D, Dv = self._k.shape[1], self._k.shape[3], self._v.shape[3]
        return G * (D + Dv) * self._k.dtype.itemsize

    def _checked(self, k: Tensor, v: Tensor, chunk_lengths) -> tuple[Tensor, int]:
        B, G, T, D = k.shape
        Dv = v.shape[3]
        if self._k is None:
            if self.batch_size is not None and B != self.batch_size:
                raise ValueError(f"k has batch size {B}, this cache was made for batch_size={self.batch_size}; "
                                 f"got k {tuple(k.shape)}")
        else:
            held = (self._k.shape[0], self._k.shape[1], self._k.shape[3], self._v.shape[3])
            if (B, G, D, Dv) != held:
                raise ValueError(
                    f"this cache holds (B, G, D, Dv) = {held}, the chunk brings {(B, G, D, Dv)} "
                    f"(k {tuple(k.shape)}, v {tuple(v.shape)}); reset() it for a new batch"
                )
            if k.dtype != self._k.dtype or k.device != self._k.device:
                raise TypeError(f"this cache holds {self._k.dtype} on {self._k.device}, "
                                f"got k {k.dtype} on {k.device}")
        chunk_lengths = _check_chunk_lengths(chunk_lengths, B, T, k.device)
        lengths = self._current_lengths(B, k.device)
        if chunk_lengths is None:
            return lengths + T, self._high + T
        new_lengths = lengths + chunk_lengths
        # exact when it costs nothing more than the check above; an upper bound under compile
        return new_lengths, self._high + T if _compiling() else int(new_lengths.max())

    def _current_lengths(self, B: int, device: torch.device) -> Tensor:
        """(B,) lengths before the chunk: zeros for a cache that has seen nothing on this device yet."""
        if self._lengths is None or self._lengths.device != device:
            return torch.zeros(B, dtype=torch.int64, device=device)
        return self._lengths

    def _write(self, layout: ChunkLayout, k: Tensor, v: Tensor) -> CachedKV:
        B, G, T, D = k.shape
        if self._k is None:
            capacity = max(self.initial_capacity, T)
            self._k = torch.zeros(B, G, capacity, D, dtype=k.dtype, device=k.device)
            self._v = torch.zeros(B, G, capacity, v.shape[3], dtype=k.dtype, device=k.device)
        needed = self._high + T  # padded tokens are written too (after the real ones), then overwritten later
        if needed > self.capacity:
            self._grow(max(needed, 2 * self.capacity))
        _write_both(self._k, self._v, layout.slots, k, v)
        self._lengths = layout.new_lengths  # a new tensor: a caller's `lengths` from before the step stays valid
        self._high = S = layout.kv_len
        # (B, G, capacity, D) -> (B, G, S, D): views, no copy
        return CachedKV(self._k[:, :, :S], self._v[:, :, :S], layout.attn_mask)

    def _advance(self, num_new: int, chunk_lengths: Tensor | None) -> tuple[Tensor, int]:
        added = num_new if chunk_lengths is None else chunk_lengths
        return self.lengths + added, self._high + num_new  # S: an upper bound, known without reading the lengths

    def _before(self, new_lengths: Tensor) -> Tensor:
        return self._current_lengths(new_lengths.shape[0], new_lengths.device)

    def _slots(self, positions: Tensor, new_lengths: Tensor) -> Tensor:
        return positions  # padding lands after the real tokens, where the next chunk overwrites it

    def _grow(self, capacity: int) -> None:
        """Reallocate to `capacity` slots: zeros beyond the old ones, so a masked slot never holds NaN."""
        B, G, old, D = self._k.shape
        Dv = self._v.shape[3]
        k = torch.zeros(B, G, capacity, D, dtype=self._k.dtype, device=self._k.device)
        v = torch.zeros(B, G, capacity, Dv, dtype=self._v.dtype, device=self._v.device)
        k[:, :, :old] = self._k
        v[:, :, :old] = self._v
        self._k, self._v = k, v


class _PreallocatedLayerCache(LayerCache):
    """What the caches allocated once share: (B, G, slots + 1, D) keys and values, the last slot scratch for
    padded tokens (callers never see it), and the check of a chunk against the shapes they were made for."""

    def __init__(self, batch_size: int, slots: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.batch_size = positive_int("batch_size", batch_size)
        self.num_kv_heads = positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.v_head_dim = head_dim if v_head_dim is None else positive_int("v_head_dim", v_head_dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        B, G = self.batch_size, self.num_kv_heads
        # Zeros, not empty: a masked slot still meets a 0 weight in weights @ v, and 0 * NaN would be NaN.
        self._k = torch.zeros(B, G, slots + 1, self.head_dim, dtype=dtype, device=device)
        self._v = torch.zeros(B, G, slots + 1, self.v_head_dim, dtype=dtype, device=device)
        self.reset()

    def reset(self) -> None:
        self._lengths = torch.zeros(self.batch_size, dtype=torch.int64, device=self._k.device)

    def bytes_per_token(self) -> int:
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * self._k.dtype.itemsize

    def _tensors(self) -> tuple:
        return self._k, self._v

    def _check_held(self, k: Tensor, v: Tensor, chunk_lengths) -> Tensor | None:
        """The chunk against the shapes, dtype and device this cache holds; chunk_lengths checked (B,) or None."""
        B, G, T, D = k.shape
        Dv = v.shape[3]
        kind = type(self).__name__.replace("LayerCache", "Cache")
        held = (self.batch_size, self.num_kv_heads, self.head_dim, self.v_head_dim)
        if (B, G, D, Dv) != held:
            raise ValueError(f"this {kind} holds (B, G, D, Dv) = {held}, the chunk brings {(B, G, D, Dv)} "
                             f"(k {tuple(k.shape)}, v {tuple(v.shape)})")
        if k.dtype != self._k.dtype or k.device != self._k.device:
            raise TypeError(f"this {kind} holds {self._k.dtype} on {self._k.device}, "
                            f"got k {k.dtype} on {k.device}")
        return _check_chunk_lengths(chunk_lengths, B, T, k.device)


class StaticLayerCache(_PreallocatedLayerCache):
    """A layer cache allocated once, (B, G, max_length, D): fixed shapes, so torch.compile traces it once.

    Attention runs over all max_length slots with a mask (S = max_length),
    whatever the lengths. One more slot past the end takes the padded tokens
    of a chunk, so padding never occupies a sequence's room. Appending more
    real tokens than max_length raises (the check reads the lengths, so under
    torch.compile it is skipped and the excess tokens are dropped).
    """

    def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.max_length = positive_int("max_length", max_length)
        super().__init__(batch_size, max_length, num_kv_heads, head_dim, v_head_dim, dtype, device)

    def _checked(self, k: Tensor, v: Tensor, chunk_lengths) -> tuple[Tensor, int]:
        T = k.shape[2]
        chunk_lengths = self._check_held(k, v, chunk_lengths)
        L, lengths = self.max_length, self._lengths
        new_lengths = lengths + (T if chunk_lengths is None else chunk_lengths)
        if not _compiling() and bool((new_lengths > L).any()):
            b = int(torch.argmax(new_lengths))
            added = T if chunk_lengths is None else int(chunk_lengths[b])
            raise ValueError(
                f"StaticCache overflow: sequence {b} holds {int(lengths[b])} tokens and the chunk adds "
                f"{added} real ones (T={T}), {int(new_lengths[b])} > max_length={L}; "
                f"make a StaticCache with a larger max_length"
            )
        return new_lengths.clamp(max=L), L  # the clamp only acts under torch.compile, unchecked

    def _advance(self, num_new: int, chunk_lengths: Tensor | None) -> tuple[Tensor, int]:
        added = num_new if chunk_lengths is None else chunk_lengths
        return (self._lengths + added).clamp(max=self.max_length), self.max_length  # the clamp: as _checked's

    def placement(self) -> tuple:
        return type(self).__name__, self.max_length

    def _slots(self, positions: Tensor, new_lengths: Tensor) -> Tensor:
        """(B, T) where the chunk's tokens go: after each sequence's tokens; padding to the scratch slot."""
        real = positions < new_lengths[:, None]  # (B, T) < (B, 1) -> (B, T): right padding comes after the real
        return torch.where(real, positions, self.max_length)  # (B, T): padding (and, compiled, any excess) to scratch

    def _write(self, layout: ChunkLayout, k: Tensor, v: Tensor) -> CachedKV:
        L = self.max_length
        _write_both(self._k, self._v, layout.slots, k, v)
        self._lengths = layout.new_lengths  # a new tensor: a caller's `lengths` from before the step stays valid
        # (B, G, L + 1, D) -> (B, G, L, D): views without the scratch slot
        return CachedKV(self._k[:, :, :L], self._v[:, :, :L], layout.attn_mask)

    def storage(self) -> tuple[Tensor, Tensor]:
        """The preallocated keys (B, G, L + 1, D) and values (B, G, L + 1, Dv), written in place (slot L: scratch).

        What CUDA graphs need at fixed addresses (torch._dynamo.mark_static_address).
        """
        return self._k, self._v


class SlidingWindowLayerCache(_PreallocatedLayerCache):
    """A layer cache that keeps only what a sliding window lets a query see: each sequence's last left + 1
    tokens, for a window of (left, right). Its memory is fixed, however long the sequences grow.

    The left + 1 slots are a ring: position p lives in slot p mod (left + 1),
    and the cache records the position each slot holds (-1: none yet). A
    decoding step (T = 1) writes its token first, over the one that has just
    left every later query's window, and attends to the left + 1 slots
    (S = left + 1, views, no copy). A longer chunk attends to the ring as it
    was and to its own T tokens (S = left + 1 + T, one copy of the ring), then
    keeps each sequence's last left + 1 real tokens. The mask it returns is
    causal per sequence and limited to `left` positions back; a module with a
    window of its own applies it on top (its left may not exceed the cache's).
    """

    def __init__(self, batch_size: int, window, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        window = check_window(window)
        if window is None or window[0] is None:
            raise ValueError(f"window must be (left, right) with left an int >= 0: the cache keeps each sequence's "
                             f"last left + 1 tokens, got {window!r}")
        self.window = window
        super().__init__(batch_size, window[0] + 1, num_kv_heads, head_dim, v_head_dim, dtype, device)

    @property
    def slots(self) -> int:
        """Tokens kept per sequence: left + 1."""
        return self.window[0] + 1

    def reset(self) -> None:
        super().reset()
        # the position each slot holds, the scratch slot's included; -1: none
        self._positions = torch.full((self.batch_size, self.slots + 1), -1, dtype=torch.int64,
                                     device=self._k.device)

    def _tensors(self) -> tuple:
        return self._k, self._v, self._positions

    def _left(self) -> int:
        return self.window[0]

    def placement(self) -> tuple:
        return type(self).__name__, self.window[0]

    def _kv_len(self, num_new: int) -> int:
        return self.slots if num_new <= 1 else self.slots + num_new

    def _checked(self, k: Tensor, v: Tensor, chunk_lengths) -> tuple[Tensor, int]:
        chunk_lengths = self._check_held(k, v, chunk_lengths)
        return self._advance(k.shape[2], chunk_lengths)

    def _advance(self, num_new: int, chunk_lengths: Tensor | None) -> tuple[Tensor, int]:
        added = num_new if chunk_lengths is None else chunk_lengths
        return self._lengths + added, self._kv_len(num_new)

    def _slots(self, positions: Tensor, new_lengths: Tensor) -> Tensor:
        """(B, T): slot p mod W for a real token among each sequence's last W; the scratch slot W for the rest."""
        W = self.slots
        kept = (positions < new_lengths[:, None]) & (positions >= new_lengths[:, None] - W)  # (B, T)
        return torch.where(kept, positions % W, W)  # (B, T)

    def _key_positions(self, positions: Tensor, slots: Tensor, kv_len: int) -> Tensor:
        W = self.slots
        if kv_len == W:  # a step of at most one token: the ring once its token is in
            return self._positions.scatter(1, slots, positions)[:, :W]  # (B, W + 1) -> (B, W)
        return torch.cat((self._positions[:, :W], positions), dim=1)  # (B, W) + (B, T) -> (B, W + T)

    def _write(self, layout: ChunkLayout, k: Tensor, v: Tensor) -> CachedKV:
        W = self.slots
        if layout.kv_len == W:  # written first, then read in place
            keys, values = self._k[:, :, :W], self._v[:, :, :W]  # (B, G, W + 1, D) -> (B, G, W, D): views
        else:  # the ring as it was and the whole chunk, before the chunk's last tokens take their slots
            keys = torch.cat((self._k[:, :, :W], k), dim=2)  # (B, G, W, D) + (B, G, T, D) -> (B, G, W + T, D)
            values = torch.cat((self._v[:, :, :W], v), dim=2)  # (B, G, W + T, Dv)
        _write_both(self._k, self._v, layout.slots, k, v)
        self._positions.scatter_(1, layout.slots, layout.positions)
        self._lengths = layout.new_lengths  # a new tensor: a caller's `lengths` from before the step stays valid
        return CachedKV(keys, values, layout.attn_mask)


class KVCache:
    """The caches of every layer of a model: cache[i] is layer i's, and all share one batch.

    lengths: layer 0's lengths (B,). Read before a forward over the layers,
        they are the positions of the chunk about to come (RoPE's offset, a
        learned position embedding's index); every layer advances its own
        lengths when it appends, so after the forward all of them agree.
    """

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = list(layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def lengths(self) -> Tensor:
        return self.layers[0].lengths

    def positions(self, num_new: int, *, batch_size: int | None = None,
                  device: torch.device | str | None = None) -> Tensor:
        """(B, T) absolute positions of the next chunk of num_new tokens, from layer 0's lengths."""
        return self.layers[0].positions(num_new, batch_size=batch_size, device=device)

    def layout(self, num_new: int, chunk_lengths: Tensor | None = None) -> ChunkLayout:
        """Where the next chunk goes in every layer, from layer 0's lengths: `LayerCache.layout`, once per step.

        Then `cache[i].update(k, v, layout=layout)` in every layer. Unchecked: for a
        loop whose first chunk went through the checked path (`update`, or a
        model's forward) and whose later chunks fit.
        """
        if not self.uniform:
            raise ValueError("KVCache.layout serves layers that place a chunk alike, and these mix kinds of cache "
                             f"(or sizes: {sorted({layer.placement() for layer in self.layers})}); update each "
                             f"layer with its own plan instead")
        return self.layers[0].layout(num_new, chunk_lengths)

    @property
    def uniform(self) -> bool:
        """Every layer places a chunk alike (one kind of cache, one size): what one layer accepts, all do."""
        return len({layer.placement() for layer in self.layers}) == 1

    def copy_lengths(self) -> None:
        """Give the layers copies of their lengths: same values, new tensors (one per tensor the layers share).

        A step replayed as a CUDA graph leaves the new lengths in the graph's
        memory, which its next replay reuses; the copies stay valid.
        """
        copies: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (the original, kept alive: no id reused; its copy)
        for layer in self.layers:
            lengths = layer._lengths
            if lengths is None:
                continue
            if id(lengths) not in copies:
                copies[id(lengths)] = (lengths, lengths.clone())
            layer._lengths = copies[id(lengths)][1]

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence costs across all layers: sum of G·(D + Dv)·size."""
        return sum(layer.bytes_per_token() for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes the layers' caches hold now, all together (`LayerCache.nbytes`)."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


class DynamicCache(KVCache):
    """KV caches that grow as tokens come, for num_layers layers.

    DynamicCache(num_layers, *, batch_size=None, device=None, initial_capacity=16)

    Each layer doubles its storage when full (amortised O(1) per token, not a
    concatenation per step). Shapes and dtype come from each layer's first
    update; batch_size (optional) lets `lengths` answer before that.
    """

    def __init__(self, num_layers: int, *, batch_size: int | None = None,
                 device: torch.device | str | None = None, initial_capacity: int = 16) -> None:
        positive_int("num_layers", num_layers)
        super().__init__([DynamicLayerCache(batch_size=batch_size, device=device,
                                            initial_capacity=initial_capacity) for _ in range(num_layers)])

    @property
    def batch_size(self) -> int | None:
        """B, once given or seen (None before)."""
        layer = self.layers[0]
        if layer.batch_size is not None:
            return layer.batch_size
        return None if layer._lengths is None else layer._lengths.shape[0]


class StaticCache(KVCache):
    """KV caches preallocated to max_length tokens per sequence, for num_layers layers.

    StaticCache(num_layers, batch_size, max_length, num_kv_heads, head_dim,
                v_head_dim=None, *, dtype=torch.float32, device=None)

    Fixed shapes, so torch.compile traces a decoding step once: attention runs
    over all max_length slots with a mask. Appending past max_length real
    tokens raises a ValueError naming the sizes.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
                 head_dim: int, v_head_dim: int | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        positive_int("num_layers", num_layers)
        super().__init__([StaticLayerCache(batch_size, max_length, num_kv_heads, head_dim, v_head_dim,
                                           dtype=dtype, device=device) for _ in range(num_layers)])
        self.batch_size = batch_size
        self.max_length = max_length


class SlidingWindowCache(KVCache):
    """KV caches that keep only a sliding window's tokens, for num_layers layers of that window.

    SlidingWindowCache(num_layers, batch_size, window, num_kv_heads, head_dim,
                       v_head_dim=None, *, dtype=torch.float32, device=None)

    window: the layers' (left, right) (`MultiHeadAttention(window=...)`):
    each sequence keeps its last left + 1 tokens (and one scratch slot for
    padding), so memory stays num_layers·B·(left + 2)·(G·(D + Dv)·size + 8)
    bytes however long decoding runs (`nbytes`; the 8: each slot's int64
    position), where a DynamicCache grows with every token. A module whose
    window reaches further back than the cache's is refused.
    """

    def __init__(self, num_layers: int, batch_size: int, window, num_kv_heads: int, head_dim: int,
                 v_head_dim: int | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        positive_int("num_layers", num_layers)
        super().__init__([SlidingWindowLayerCache(batch_size, window, num_kv_heads, head_dim, v_head_dim,
                                                  dtype=dtype, device=device) for _ in range(num_layers)])
        self.batch_size = batch_size
        self.window = self.layers[0].window
