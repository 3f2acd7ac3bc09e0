"""Run a function on N processes of this machine, each in one process group: for tests, benchmarks and trying.

    results = run_local(fn, world=2, args=(...,))      # fn(*args) on ranks 0..1; every rank's return value

Each process is started with torch.multiprocessing's "spawn", joins a gloo
group (a file rendezvous in a temporary folder, so no port is chosen), runs
fn(*args) and sends its result back. If a rank raises, `run_local` raises a
RankFailed naming every rank that failed with its traceback; if the ranks
are not all done within `timeout` seconds (or GRACE seconds after the first
failure), every process is killed and RankFailed says which ranks never
answered. The group's own timeout is set
to the same bound, so a rank blocked on a peer gives up too.

fn must be importable by the children (defined at a module's top level).
On a GPU machine, torchrun and NCCL are the way (benchmarks/distributed_torchrun.py).
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """One or more ranks of a `run_local` job raised or did not finish in time."""


def _rank_main(rank: int, world: int, rendezvous: str, timeout: float, fn, args, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N processes share the cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        try:
            results.put((rank, True, fn(*args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # every failure goes back to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_local(fn, world: int, args: tuple = (), *, timeout: float = 120.0) -> list:
    """fn(*args) on `world` local processes in one gloo group -> [rank 0's result, rank 1's, ...]."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = os.path.join(folder, "rendezvous")
        processes = [context.Process(target=_rank_main, args=(rank, world, rendezvous, timeout, fn, args, results),
                                     daemon=True) for rank in range(world)]
        for process in processes:
            process.start()
        answers = _collect(results, world, time.monotonic() + timeout)
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    failed = {rank: text for rank, (ok, text) in answers.items() if not ok}
    missing = [rank for rank in range(world) if rank not in answers]
    if failed or missing:
        lines = [f"rank {rank} raised:\n{text}" for rank, text in sorted(failed.items())]
        if missing:
            lines.append(f"ranks {missing} did not finish within {timeout} s and were killed")
        raise RankFailed("\n".join(lines))
    return [answers[rank][1] for rank in range(world)]


GRACE = 15.0  # seconds the other ranks get to finish (or raise) once one rank has failed


def _collect(results, world: int, deadline: float) -> dict:
    answers: dict = {}
    while len(answers) < world:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, ok, value = results.get(timeout=left)
        except queue.Empty:
            break
        answers[rank] = (ok, value)
        if not ok:  # the others either raise too (they agreed first) or are stuck waiting for this rank
            deadline = min(deadline, time.monotonic() + GRACE)
    return answers
