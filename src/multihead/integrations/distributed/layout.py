"""How a sequence is cut into one part per rank, and put back together.

    part = shard_sequence(x, dim=2, layout="zigzag")          # this rank's part of the full x
    full = gather_sequence(part, dim=2, layout="zigzag", length=T)

The sequence of `length` tokens is padded at its end to equal parts. With N
ranks, "contiguous" cuts it into N chunks and gives rank r chunk r;
"zigzag" cuts it into 2N chunks and gives rank r chunks r and 2N-1-r (head and
tail), so under a causal mask every rank has the same amount of work:

    length 7, N = 2        contiguous (chunk 4)          zigzag (chunk 2)
    positions              0 1 2 3 4 5 6 [7]             0 1 2 3 4 5 6 [7]
    rank 0                 0 1 2 3                       0 1 . . . . 6 [7]
    rank 1                         4 5 6 [7]             . . 2 3 4 5 . .

[7] is padding: zeros in a part, never attended as a key, 0 as a query's
output, and dropped by `gather_sequence`. Within a part the positions ascend,
and two parts of one layout have the same chunk sizes, which is what lets the
ring run a part against itself with an ordinary causal mask.

A part knows how it was cut: `shard_sequence` records its layout, length,
dim, world and rank on the tensor it returns (and `ring_attention` and
`ulysses_attention` on theirs), and `ring_attention`, `ulysses_attention`,
`gather_sequence` and `ContextParallel` refuse a part used with another
layout, length or group, on every rank, instead of computing a wrong answer.
The record is an attribute of that tensor object only: what is made from it
(an op, `.detach()`, `.clone()`) is a plain tensor again, trusted to follow
the arguments it is given, as every part was before.

Gradients: a tensor every rank holds in full (the input of `shard_sequence`,
the output of `gather_sequence`) has the same gradient on every rank, the
gradient of one loss. So `gather_sequence`'s backward keeps this rank's part
of it (no communication) and `shard_sequence`'s backward gathers the parts'
gradients into the full one. The objective is the sum of what the ranks
compute on their parts; a loss computed identically on every rank from a
gathered tensor counts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .group import Group, agree, check_group

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Sharding:
    """One sequence of `length` tokens cut into `world` equal parts by `layout`."""

    layout: str  # "zigzag" (chunks r and 2N-1-r) or "contiguous" (chunk r)
    length: int  # the real tokens of the global sequence; the rest of `padded` is padding
    world: int  # N, the ranks of the group

    @property
    def pieces(self) -> int:  # chunks the padded sequence is cut into
        return 2 * self.world if self.layout == "zigzag" else self.world

    @property
    def chunk(self) -> int:  # tokens per chunk
        return max(1, math.ceil(self.length / self.pieces))

    @property
    def padded(self) -> int:  # the sequence with its padding: pieces · chunk
        return self.pieces * self.chunk

    @property
    def part(self) -> int:  # tokens per rank
        return self.padded // self.world

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The chunk indices rank holds, in the order its part stores them (ascending positions)."""
        if self.layout == "zigzag":
            return (rank, self.pieces - 1 - rank)
        return (rank,)

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """(part,) global positions of rank's tokens; those >= length are padding."""
        starts = [c * self.chunk for c in self.chunks(rank)]
        return torch.cat([torch.arange(s, s + self.chunk, device=device) for s in starts])  # (part,)

    def padding_in(self, rank: int, start: int, stop: int) -> bool:
        """Whether rank's part holds padding among its local tokens [start, stop) (decided from ints)."""
        for index, c in enumerate(self.chunks(rank)):
            lo = max(start, index * self.chunk)
            hi = min(stop, (index + 1) * self.chunk)
            if lo < hi and c * self.chunk + (hi - index * self.chunk) > self.length:
                return True
        return False

    def order(self) -> list[int]:
        """The global position of every row of the parts concatenated in rank order (padded · 1).

        From ints alone, as `positions` for every rank: ulysses builds its index from it on every call."""
        return [c * self.chunk + i for rank in range(self.world) for c in self.chunks(rank) for i in range(self.chunk)]


@dataclass(frozen=True)
class Cut:
    """How a part was cut from its sequence: recorded on the part, compared where the part is used."""

    sharding: Sharding  # the layout, the global length, the world size
    dim: int  # the sequence's dimension in the part (non-negative)
    rank: int  # whose part it is, in the group it was cut for
    by: str = field(default="shard_sequence", compare=False)  # what made it, for the error message

    def fields(self) -> dict:
        s = self.sharding
        return {"layout": s.layout, "length": s.length, "dim": self.dim, "world": s.world, "rank": self.rank}


CUT = "_multihead_cut"  # the attribute that holds a part's Cut: on that tensor object only, never on its copies


def record_cut(part: Tensor, cut: Cut) -> Tensor:
    """part, knowing how it was cut (not under torch.compile, which traces no attributes of its own)."""
    if not torch.compiler.is_compiling():
        setattr(part, CUT, cut)
    return part


def check_cut(name: str, x, expected: Cut, what: str, note: str = "") -> None:
    """Refuse a part that was cut otherwise than `what` was told (a plain tensor, with no record, passes).

    Decided from the part's record and the arguments alone (ints and strings), never from its values."""
    cut = None if torch.compiler.is_compiling() else getattr(x, CUT, None)
    if not isinstance(cut, Cut) or cut == expected:
        return
    had, given = cut.fields(), expected.fields()
    differ = [key for key in had if had[key] != given[key]]
    listed = ", ".join(f"{key}={had[key]!r}" for key in differ)
    asked = ", ".join(f"{key}={given[key]!r}" for key in differ)
    note = note if "length" in differ else ""
    raise ValueError(f"{name} was cut by {cut.by} with {listed}, but {what} was given {asked}{note}: pass the "
                     f"layout, length and group it was cut with")


def make_sharding(layout, length, world: int) -> Sharding:
    """A checked Sharding: layout one of LAYOUTS, length an int >= 1."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int (the global sequence length), got {type(length).__name__} "
                        f"{length!r}")
    if length < 1:
        raise ValueError(f"length must be >= 1 (the global sequence length), got {length}")
    return Sharding(layout, length, world)


def part_of(full: Tensor, dim: int, sharding: Sharding, rank: int) -> Tensor:
    """rank's part of a tensor whose `dim` has the padded length: its chunks, concatenated."""
    c = sharding.chunk
    return torch.cat([full.narrow(dim, i * c, c) for i in sharding.chunks(rank)], dim=dim)  # (..., part, ...)


def pad(full: Tensor, dim: int, sharding: Sharding) -> Tensor:
    """(..., length, ...) -> (..., padded, ...) with zeros (False for bool) at the end."""
    missing = sharding.padded - full.shape[dim]
    if missing == 0:
        return full
    shape = list(full.shape)
    shape[dim] = missing
    return torch.cat([full, full.new_zeros(shape)], dim=dim)  # (..., length, ...) -> (..., padded, ...)


def assemble(parts: list[Tensor], dim: int, sharding: Sharding) -> Tensor:
    """Every rank's part -> the full tensor, padding dropped: (..., part, ...) x N -> (..., length, ...)."""
    c = sharding.chunk
    chunks: list[Tensor | None] = [None] * sharding.pieces
    for rank, part in enumerate(parts):
        for index, i in enumerate(sharding.chunks(rank)):
            chunks[i] = part.narrow(dim, index * c, c)
    full = torch.cat(chunks, dim=dim)  # (..., padded, ...)
    return full.narrow(dim, 0, sharding.length)  # (..., padded, ...) -> (..., length, ...)


def all_parts(part: Tensor, group: Group) -> list[Tensor]:
    """Every rank's part, in rank order (no autograd): a collective, for calls whose ranks have agreed."""
    part = part.contiguous()  # all_gather writes dense tensors: empty_like keeps the strides it is given
    parts = [torch.empty_like(part) for _ in range(group.world)]
    dist.all_gather(parts, part, group=group.handle)
    return parts


class _Shard(torch.autograd.Function):
    """full -> this rank's part; its backward is `_Gather` (so gradients of gradients flow too)."""

    @staticmethod
    def forward(ctx, full, dim, sharding, group):
        ctx.dim, ctx.sharding, ctx.group = dim, sharding, group
        return part_of(pad(full, dim, sharding), dim, sharding, group.rank)

    @staticmethod
    def backward(ctx, grad_part):
        return _Gather.apply(grad_part, ctx.dim, ctx.sharding, ctx.group), None, None, None


class _Gather(torch.autograd.Function):
    """Every rank's part -> the full tensor on every rank; its backward is `_Shard`."""

    @staticmethod
    def forward(ctx, part, dim, sharding, group):
        ctx.dim, ctx.sharding, ctx.group = dim, sharding, group
        return assemble(all_parts(part, group), dim, sharding)

    @staticmethod
    def backward(ctx, grad_full):
        return _Shard.apply(grad_full, ctx.dim, ctx.sharding, ctx.group), None, None, None


def gather_parts(part: Tensor, dim: int, sharding: Sharding, group: Group) -> Tensor:
    """gather_sequence without the checks and the agreement: for calls whose ranks have agreed already."""
    return _Gather.apply(part, dim, sharding, group)


def _check_tensor(name: str, x, dim) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}, "
                         f"got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: Tensor, dim: int = 2, layout: str = "zigzag", group=None) -> Tensor:
    """This rank's part of x along `dim` (the sequence): (..., T, ...) -> (..., part, ...).

    x is the full tensor, the same on every rank; T = x.shape[dim] is the global
    length to pass on as `length=`. The part is padded with zeros (False) when
    T does not divide into equal parts. The part records how it was cut
    (layout, length, dim, group), and the calls that take it refuse other
    arguments (module docstring). Differentiable: x's gradient is gathered
    from every rank's part.
    """
    dim = _check_tensor("x", x, dim)
    g = check_group(group)
    sharding = make_sharding(layout, x.shape[dim], g.world)
    return record_cut(_Shard.apply(x, dim, sharding, g), Cut(sharding, dim, g.rank))


def gather_sequence(part: Tensor, dim: int = 2, layout: str = "zigzag", length: int | None = None,
                    group=None) -> Tensor:
    """Every rank's part put back in order, padding dropped: (..., part, ...) -> (..., length, ...).

    Collective: every rank of the group calls it, alike (the ranks agree first, as
    ring_attention's do), and receives the full tensor.
    length: the global sequence length (default: the parts' total, when there
    was no padding). A part that records its cut (from shard_sequence,
    ring_attention, ulysses_attention) must have been cut with this layout,
    length and dim, else every rank raises. Differentiable: the gradient of
    the full tensor (the same on every rank) gives each rank its part's.
    """
    g = check_group(group)
    error, sharding = None, None
    try:
        dim, sharding = _check_part(part, dim, layout, length, g)
    except (TypeError, ValueError) as exc:
        error = exc
    fields = None if sharding is None else {"call": "gather_sequence", "dim": dim, "layout": layout,
                                            "length": sharding.length, "shape": tuple(part.shape),
                                            "dtype": str(part.dtype)}
    agree("gather_sequence", fields, error, g)
    return _Gather.apply(part, dim, sharding, g)


def _check_part(part, dim, layout, length, group: Group) -> tuple[int, Sharding]:
    dim = _check_tensor("part", part, dim)
    given = "" if length is not None else " (length not given: taken as part · N)"
    if length is None:
        length = part.shape[dim] * group.world
    sharding = make_sharding(layout, length, group.world)
    if part.shape[dim] != sharding.part:
        raise ValueError(f"part has {part.shape[dim]} tokens along dim {dim}; a {layout} part of length={length}"
                         f"{given} over {group.world} ranks has {sharding.part}")
    check_cut("part", part, Cut(sharding, dim, group.rank), "gather_sequence", given)
    return dim, sharding
