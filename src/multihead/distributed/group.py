"""The process group as multihead uses it: who we are, who is next on the ring, and agreeing before sending.

Everything underneath is torch.distributed (gloo on CPUs, NCCL on GPUs):
`batch_isend_irecv` for the ring, `all_to_all_single` and `all_gather` for
the rest. Nothing here is home-made transport.

Before a collective call sends any block, every rank checks its own
arguments and then all ranks exchange one small row: "did my checks pass,
and with which shapes" (`agree`). A rank whose arguments are wrong raises
its error, and every other rank raises one that names that rank and quotes
it, instead of waiting forever for a block that never comes. The exchange
costs one all_gather of a few integers per call (on a GPU, one host read).
"""

from __future__ import annotations

import struct
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
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None (the default group), "
                        f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return Group(group, rank, dist.get_world_size(group))


class Pending(NamedTuple):
    """Blocks in flight from the previous rank; `wait()` gives them once they have arrived."""

    works: list
    arrived: list[Tensor]

    def wait(self) -> list[Tensor]:
        for work in self.works:
            work.wait()
        return self.arrived


def pass_on(tensors: list[Tensor], group: Group) -> Pending:
    """Send each tensor to the next rank and receive the same shapes from the previous one (asynchronous)."""
    after = group.global_rank((group.rank + 1) % group.world)
    before = group.global_rank((group.rank - 1) % group.world)
    tensors = [t.contiguous() for t in tensors]  # sent and received as dense buffers
    arrived = [torch.empty_like(t) for t in tensors]
    ops = []
    for sent, received in zip(tensors, arrived):
        ops.append(dist.P2POp(dist.isend, sent, after, group.handle))
        ops.append(dist.P2POp(dist.irecv, received, before, group.handle))
    return Pending(dist.batch_isend_irecv(ops), arrived)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def signature_of(*fields: int | float | bool | str | torch.dtype | None) -> tuple[int, ...]:
    """Arguments that every rank must give alike, as integers (floats by their bits, dtypes by index)."""
    row = []
    for field in fields:
        if isinstance(field, torch.dtype):
            row.append(_DTYPES.index(field) if field in _DTYPES else -1)
        elif isinstance(field, float):
            row.append(struct.unpack("<q", struct.pack("<d", field))[0])
        elif isinstance(field, str):
            row.append(sum(ord(ch) << (7 * (i % 8)) for i, ch in enumerate(field)) % (1 << 62))
        else:
            row.append(-1 if field is None else int(field))
    return tuple(row)


def agree(what: str, names: tuple[str, ...], signature: tuple[int, ...] | None, error: Exception | None,
          group: Group) -> None:
    """All ranks learn whether every rank accepted the call, with the same `names` fields, before any block moves.

    signature: this rank's values of the fields named in `names` (`signature_of`), or None with an error.
    Raises this rank's own error, or a RuntimeError naming the rank that refused and quoting it, or a
    ValueError naming the fields the ranks disagree on. Every rank raises, so none waits for a block.
    """
    width = len(names)
    row = torch.tensor([0 if error is None else 1, *(signature or (0,) * width)], dtype=torch.int64,
                       device=group.collective_device())
    rows = [torch.empty_like(row) for _ in range(group.world)]
    dist.all_gather(rows, row, group=group.handle)
    table = torch.stack(rows).tolist()  # (N, 1 + fields): the one host read
    refused = [rank for rank, answer in enumerate(table) if answer[0]]
    if refused:
        messages: list = [None] * group.world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                               group=group.handle)
        if error is not None:
            raise error
        first = refused[0]
        raise RuntimeError(f"{what}: rank {first} of the group refused the call, so every rank stops: "
                           f"{messages[first]}")
    differ = [i for i in range(width) if len({answer[1 + i] for answer in table}) > 1]
    if differ:
        listed = "; ".join(f"{names[i]}: " + ", ".join(f"rank {rank} {answer[1 + i]}" for rank, answer
                                                        in enumerate(table)) for i in differ)
        raise ValueError(f"{what}: every rank must call with the same arguments, but they differ ({listed}; "
                         f"dtypes, floats and names compared by code)")
