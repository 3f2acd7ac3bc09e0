"""The process group as multihead uses it: who we are, who is next on the ring, and agreeing before sending.

Everything underneath is torch.distributed (gloo on CPUs, NCCL on GPUs):
`batch_isend_irecv` for the ring, `all_to_all_single` and `all_gather` for
the rest. Nothing here is home-made transport.

Before a collective call sends any block, every rank checks its own
arguments and then all ranks exchange one small row: "did my checks pass,
and with which shapes" (`agree`). A rank whose arguments are wrong raises
its error, and every other rank raises one that names that rank and quotes
it, instead of waiting forever for a block that never comes. The exchange
costs one all_gather of a few integers (on a GPU, one host read).

The ring and ulysses pay it once per signature, not per call (`agree_once`):
each process group remembers the one signature (shapes, dtype, flags,
layout, backend, grad flags) that all its ranks last agreed on, and a call
whose signature is that one sends nothing but its own blocks. Only one is
remembered, so that the ranks' memories stay equal (each changes only in an
agreement that all of them made) and every rank whose call differs from the
remembered one enters the agreement:

    ranks' calls, remembered A     what happens
    all A                          no agreement: the steady state
    all B                          all agree on B, which is remembered
    some B, some C (or a refusal)  all agree: all raise, naming the field (or the rank)
    some A, some B (or a refusal)  the B ranks agree, the A ranks send blocks:
                                   they wait until the group's timeout

With two remembered (A, B), ranks calling A and B would each skip the
agreement, and where only a flag differs (causal) the blocks still fit: a
wrong result and no error. With one, a disagreement is never silent, but the
last case is found only at the group's timeout (the failed transfer's error
then says so). No scheme without a message per call can do better: a rank
cannot know that another's call changed unless it is told. `check=True` (the
same on every rank) agrees on every call, with the full errors.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class Group(NamedTuple):
    """A process group and this process's place in it."""

    handle: object  # the torch.distributed ProcessGroup (None: the default group)
    rank: int  # this process's rank within the group
    world: int  # N, the group's size

    def global_rank(self, rank: int) -> int:
        """A group rank as the global rank that point-to-point ops address."""
        return rank if self.handle is None else dist.get_global_rank(self.handle, rank)

    def collective_device(self) -> torch.device:
        """Where this group's small exchanges live: the current GPU for NCCL, else the CPU."""
        if dist.get_backend(self.handle) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def check_group(group) -> Group:
    """The group to use (None: the default one), with a clear error when torch.distributed is not set up."""
    if not dist.is_available():
        raise RuntimeError("multihead.distributed needs torch.distributed, which this torch build does not have")
    if not dist.is_initialized():
        raise RuntimeError("multihead.distributed needs a process group: call "
                           "torch.distributed.init_process_group(...) first, or start the script with torchrun")
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:  # new_group's answer to outsiders
        raise ValueError("this process is not a member of group (new_group(ranks) left its rank out); "
                         "only the group's members call it")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None (the default group), "
                        f"got {type(group).__name__}")
    return Group(group, dist.get_rank(group), dist.get_world_size(group))


class Pending(NamedTuple):
    """Blocks in flight from the previous rank; `wait()` gives them once they have arrived."""

    works: list
    arrived: list[Tensor]

    def wait(self) -> list[Tensor]:
        try:
            for work in self.works:
                work.wait()
        except RuntimeError as exc:  # the group's timeout, or a peer gone
            raise stalled("ring_attention", exc) from exc
        return self.arrived


STALLED = ("if one rank's call differs from the signature the group agreed on last while the others repeat it, "
           "only the group's timeout finds it: check=True on every rank agrees on every call and names the "
           "difference (docs/distributed.md, Limits)")


def stalled(what: str, exc: Exception) -> RuntimeError:
    """A transfer that failed (timed out, or its peer is gone), with the one cause this package can name."""
    return RuntimeError(f"{what}: a transfer between the ranks failed ({type(exc).__name__}: {exc}); {STALLED}")


def pass_on(tensors: list[Tensor], group: Group) -> Pending:
    """Send each tensor to the next rank and receive the same shapes from the previous one (asynchronous).

    In a group of one the next and the previous rank are this one: the tensors stay, nothing is sent.
    """
    if group.world == 1:
        return Pending([], list(tensors))
    after = group.global_rank((group.rank + 1) % group.world)
    before = group.global_rank((group.rank - 1) % group.world)
    tensors = [t.contiguous() for t in tensors]  # sent and received as dense buffers
    arrived = [torch.empty_like(t) for t in tensors]
    ops = []
    for sent, received in zip(tensors, arrived):
        ops.append(dist.P2POp(dist.isend, sent, after, group.handle))
        ops.append(dist.P2POp(dist.irecv, received, before, group.handle))
    return Pending(dist.batch_isend_irecv(ops), arrived)


WIDTH = 24  # ints in every rank's row: the refusal flag, then the call's fields (each call fits)


def _code(value) -> int:
    """A field's value as one int64, the same in every process (hash() is salted per process)."""
    digest = hashlib.blake2b(repr((type(value).__name__, value)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _refused(what: str, error: Exception | None, table: list[list[int]], group: Group) -> None:
    """Every rank learns each refusing rank's message; each raises (its own error where it has one)."""
    messages: list = [None] * group.world
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                           group=group.handle)
    if error is not None:
        raise error
    first = next(rank for rank, row in enumerate(table) if row[0])
    raise RuntimeError(f"{what}: rank {first} of the group refused the call, so every rank stops: {messages[first]}")


def _disagreed(what: str, fields: dict, group: Group) -> None:
    """The fields in which the ranks' calls differ, with every rank's value (the slow path: only on failure)."""
    every: list = [None] * group.world
    dist.all_gather_object(every, fields, group=group.handle)
    names = list(dict.fromkeys(name for f in every for name in f))
    differ = [name for name in names if len({repr(f.get(name)) for f in every}) > 1]
    listed = "; ".join(f"{name}: " + ", ".join(f"rank {rank} {f.get(name)!r}" for rank, f in enumerate(every))
                       for name in differ)
    raise ValueError(f"{what}: every rank of the group must make the same call with the same arguments, "
                     f"but they differ ({listed})")


def agree(what: str, fields: dict | None, error: Exception | None, group: Group) -> None:
    """All ranks learn whether every rank accepted its call, with the same fields, before any block moves.

    fields: name -> value of what every rank must give alike (the call's name first, then its shapes,
    dtypes and flags), or None with an error. Raises this rank's own error, or a RuntimeError naming the
    rank that refused and quoting it, or a ValueError naming the fields the ranks differ in with every
    rank's value. Every rank raises, so none waits for a block that never comes. A rank whose checks
    failed elsewhere (a module's) calls agree(what, None, error, group) to be heard.
    """
    codes = [_code(v) for v in (fields or {}).values()]
    if len(codes) >= WIDTH:
        raise AssertionError(f"{what} agrees on {len(codes)} fields, more than the row's {WIDTH - 1}")
    row = torch.tensor([0 if error is None else 1, *codes, *[0] * (WIDTH - 1 - len(codes))], dtype=torch.int64,
                       device=group.collective_device())
    rows = [torch.empty_like(row) for _ in range(group.world)]
    try:
        dist.all_gather(rows, row, group=group.handle)
    except RuntimeError as exc:  # the others did not come: they sent blocks (see the module docstring), or died
        raise (stalled(what, exc) if error is None else error) from exc
    table = torch.stack(rows).tolist()  # (N, WIDTH): the one host read
    if any(r[0] for r in table):
        _refused(what, error, table, group)
    if any(r[1:] != table[0][1:] for r in table):
        _disagreed(what, fields, group)


_AGREED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ProcessGroup -> the signature all its ranks
#   last agreed on (weak: a destroyed group's entry goes with it, and a new group starts with none)


def agree_once(what: str, fields: dict | None, error: Exception | None, group: Group, check: bool) -> None:
    """`agree`, unless `fields` are those the group last agreed on and check is False (module docstring).

    A refusal (fields None) always enters the agreement, so the ranks that agree with it hear it. The
    remembered signature changes only after an agreement that every rank passed: a rejected call
    changes nothing.
    """
    handle = dist.group.WORLD if group.handle is None else group.handle
    signature = None if fields is None else tuple(fields.items())
    if not check and signature is not None and _AGREED.get(handle) == signature:
        return  # the steady state: no collective, no host read
    agree(what, fields, error, group)
    _AGREED[handle] = signature


def refusal_heard(what: str, group: Group):
    """A context manager: a TypeError/ValueError raised inside is first told to every rank (see agree)."""
    return _RefusalHeard(what, group)


class _RefusalHeard:
    def __init__(self, what: str, group: Group) -> None:
        self.what, self.group = what, group

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, trace) -> bool:
        if error is not None and isinstance(error, (TypeError, ValueError)):
            agree(self.what, None, error, self.group)  # raises error on this rank, after the others heard it
        return False
