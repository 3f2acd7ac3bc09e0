"""Run a function on N processes of this machine, each in one process group: for tests, benchmarks and trying.

    results = run_local(fn, world=2, args=(...,))      # fn(*args) on ranks 0..1; every rank's return value

Each process is started with torch.multiprocessing's "spawn", joins a gloo
group (a file rendezvous in a temporary folder, so no port is chosen), runs
fn(*args) and sends its result back. If a rank raises (or its process dies, or
its result cannot be pickled), `run_local` raises a RankFailed naming every
rank that failed, with its traceback or exit code; if the ranks
are not all done within `timeout` seconds (or GRACE seconds after the first
failure), every process is killed and RankFailed says which ranks never
answered. The group's own timeout is set
to the same bound, so a rank blocked on a peer gives up too.

fn and args are pickled once, in the parent, before any process starts. A
function the children can import (a module's top level, a script's) goes by
name; one they cannot (defined in a notebook, in `python -` or `python -c`, a
lambda, a nested function) goes by its code, with the globals it names
(shipping.py). A class defined in such a notebook or `python -` cannot be sent:
run_local refuses it up front, saying where to define it. Tensors in args are
copied to each process (pickled), not shared with the parent.
On a GPU machine, torchrun and NCCL are the way (benchmarks/distributed_torchrun.py).
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ...core.checks import positive_int
from .shipping import dumps, main_hidden


class RankFailed(RuntimeError):
    """One or more ranks of a `run_local` job raised, died or did not finish in time."""


def _rank_main(rank: int, world: int, rendezvous: str, timeout: float, threads: int, payload: bytes,
               results) -> None:
    torch.set_num_threads(threads)  # N processes share the cores (OMP_NUM_THREADS is read before this runs)
    try:
        fn, args = pickle.loads(payload)  # here, where a failure is reported with its traceback
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
        answer = (rank, True, pickle.dumps(value))  # here, not in the queue's thread, where a failure is lost
    except BaseException:  # every failure goes back to the parent, with its traceback
        answer = (rank, False, traceback.format_exc())
    results.put(answer)


def _check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def run_local(fn, world: int, args: tuple = (), *, timeout: float = 120.0, threads: int = 1) -> list:
    """fn(*args) on `world` local processes in one gloo group -> [rank 0's result, rank 1's, ...].

    threads: torch's intra-op threads in each process (1: the processes share the cores).
    """
    positive_int("world", world)
    positive_int("threads", threads)
    timeout = _check_timeout(timeout)
    payload = _payload(fn, args)
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = os.path.join(folder, "rendezvous")
        processes = [context.Process(target=_rank_main, daemon=True,
                                     args=(rank, world, rendezvous, timeout, threads, payload, results))
                     for rank in range(world)]
        with main_hidden():  # spawn would run a __main__ that has no file (`python -`) in each child
            for process in processes:
                process.start()
        answers = _collect(results, processes, time.monotonic() + timeout)
        for rank, process in enumerate(processes):
            if rank in answers:
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return _results(answers, world, timeout)


def _payload(fn, args) -> bytes:
    """fn and args as the children unpickle them, or a TypeError before any process starts."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple (fn's positional arguments), got {type(args).__name__}")
    try:
        return dumps((fn, tuple(args)))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(f"run_local cannot send fn and args to the processes: {exc}") from exc


def _results(answers: dict, world: int, timeout: float) -> list:
    failed = {rank: text for rank, (ok, text) in answers.items() if not ok}
    missing = [rank for rank in range(world) if rank not in answers]
    if failed or missing:
        lines = [f"rank {rank} failed:\n{text}" for rank, text in sorted(failed.items())]
        if missing:
            lines.append(f"ranks {missing} did not finish within {timeout:g} s (or {GRACE:g} s after another "
                         f"rank failed) and were killed")
        raise RankFailed("\n".join(lines))
    return [pickle.loads(answers[rank][1]) for rank in range(world)]


GRACE = 15.0  # seconds the other ranks get to finish (or raise) once one rank has failed
POLL = 0.2  # seconds between looks at the processes while waiting for answers


def _collect(results, processes, deadline: float) -> dict:
    """rank -> (ok, pickled value or traceback), until every rank answered, one died, or the deadline."""
    answers: dict = {}
    while len(answers) < len(processes) and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=POLL)
            answers[rank] = (ok, value)
            if not ok:  # the others either raise too (they agreed first) or are stuck waiting for this rank
                deadline = min(deadline, time.monotonic() + GRACE)
        except queue.Empty:
            for rank, process in enumerate(processes):
                if rank not in answers and process.exitcode is not None and results.empty():
                    answers[rank] = (False, f"the process exited with code {process.exitcode} without answering")
                    deadline = min(deadline, time.monotonic() + GRACE)
    return answers
