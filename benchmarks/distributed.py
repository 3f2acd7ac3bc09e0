"""Context-parallel benchmark: ring and Ulysses attention on N processes against one, bytes counted, a model.

    python benchmarks/distributed.py              # the full tables (about two minutes on 2 cores)
    python benchmarks/distributed.py --quick      # tiny sizes, to check the script itself

Three tables, each printed and written to benchmarks/results/distributed-<device>.json
with the device, the versions and the raw numbers:

1. Time per call, forward and forward+backward, of `ring_attention` (zigzag
   and contiguous layouts) and `ulysses_attention` on 1, 2 and 4 gloo processes
   of this machine (`multihead.distributed.local.run_local`), against
   `multihead.attention` on the same total sequence in one process ("single":
   rank 0 alone while the others wait, timed in turns with the job's calls).
   fp32, causal, B=1, H=8, D=64, a row with G=8 (MHA) and one with G=2
   (GQA; Ulysses then runs only where N divides G), T in {1024, 4096}.
   Every process, the single one included, runs with 1 thread, so the ratio
   single / parallel is the parallel speed-up on this CPU: with 2 cores,
   world 2 is at best ~2x faster, and world 4 is oversubscribed (4 processes
   on 2 cores). Each repeat starts with a barrier; the time of a repeat is
   the slowest rank's, and the median of the repeats counts. The single
   process and the methods of one job take turns (A B C A B C ...), as in
   benchmarks/cpu.py, so each ratio comes from one stretch of time.
2. Bytes each rank sends per call, counted at the torch.distributed layer
   (the isend ops handed to `batch_isend_irecv`, and what `all_to_all_single`
   sends to the other ranks, i.e. its input less this rank's own slice) beside
   the model, which must agree exactly (the script stops otherwise):
       ring     forward  (N-1)·(k+v)          backward  (N-1)·(k+v) + N·(dk+dv)
       ulysses  forward  (N-1)/N·(q+k+v+out)  backward  (N-1)/N·(dout+dq+dk+dv)
   k, v, q, out: this rank's part in the input dtype; dk, dv in float32
   (float64 for float64 inputs): the ring's accumulators. The ranks' agreement
   check (one all_gather of ~15 int64 on a signature's first call, as the
   counted forward is; none on a repeated call) is counted apart.
3. A model of both methods on N GPUs (default 8x H100 SXM, bf16, Llama-like
   shapes H=32, G=8 and H=G=32, D=128): from which per-rank length P = T/N
   the ring's transfers hide behind its compute, on NVLink and on 400 Gb/s
   InfiniBand, and how much communication is exposed at a few lengths. The
   formulas are printed with the table and written to the JSON.

`benchmarks/distributed_torchrun.py` runs table 1 (and 2) on a multi-GPU
machine with NCCL and imports its code from here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import multihead as mh
from multihead import backends
from multihead.core.call import make_call
from multihead.distributed import ring_attention, shard_sequence, ulysses_attention
from multihead.distributed.layout import make_sharding
from multihead.timing import device_name, print_table, slug

RESULTS = Path(__file__).resolve().parent / "results"

# method -> (function, layout). Ulysses puts the sequence in global order before attending,
# so its layout only changes which rows a rank holds; contiguous is its natural one.
METHODS = {
    "ring-zigzag": ("ring", "zigzag"),
    "ring-contiguous": ("ring", "contiguous"),
    "ulysses": ("ulysses", "contiguous"),
}
MODES = ("forward", "forward+backward")




@dataclass(frozen=True)
class Shape:
    """One attention: q (B, H, T, D), k and v (B, G, T, D), causal over the whole sequence of T tokens."""

    name: str  # "MHA" or "GQA"
    B: int
    H: int
    G: int
    D: int
    T: int
    causal: bool = True


# ---------------------------------------------------------------------------------------------- the ranks' side
# Everything below up to the model runs inside the ranks (gloo processes here, torchrun/NCCL ranks there).


def skip_reason(method: str, shape: Shape, world: int) -> str | None:
    """Why a method cannot run this shape on `world` ranks, or None."""
    if METHODS[method][0] == "ulysses" and (shape.H % world or shape.G % world):
        return f"ulysses needs N | H and N | G (H={shape.H}, G={shape.G}, N={world})"
    return None


class WallClock:
    """Seconds of host time: the CPU/gloo clock (gloo calls return once their data has moved)."""

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self.started


class CudaClock:
    """Seconds between two CUDA events on the current stream, read after synchronizing."""

    def start(self) -> None:
        torch.cuda.synchronize()
        self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.begin.record()

    def stop(self) -> float:
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3


def full_inputs(shape: Shape, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """The same full q, k, v and output gradient on every rank (one seed): (B,H,T,D), (B,G,T,D) x2, (B,H,T,D)."""
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = ((shape.B, shape.H, shape.T, shape.D), (shape.B, shape.G, shape.T, shape.D),
             (shape.B, shape.G, shape.T, shape.D), (shape.B, shape.H, shape.T, shape.D))
    return tuple(torch.randn(s, generator=gen, device=device).to(dtype) for s in sizes)


def parallel_step(method: str, shape: Shape, full, backward: bool, group=None):
    """One call of `method` on this rank's part (forward, or forward and backward), as a function of nothing."""
    kind, layout = METHODS[method]
    attend = ring_attention if kind == "ring" else ulysses_attention
    with torch.no_grad():
        q, k, v, grad = (shard_sequence(x, dim=2, layout=layout, group=group) for x in full)  # (B, ·, part, D)
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]

    def run():
        if not backward:
            with torch.no_grad():
                return attend(*leaves, causal=shape.causal, layout=layout, length=shape.T, group=group)
        out = attend(*leaves, causal=shape.causal, layout=layout, length=shape.T, group=group)
        return torch.autograd.grad(out, leaves, grad)

    return run


def single_step(shape: Shape, full, backward: bool, backend: str = "auto"):
    """`multihead.attention` on the whole sequence in this one process."""
    leaves = [x.detach().requires_grad_(backward) for x in full[:3]]
    grad = full[3]

    def run():
        if not backward:
            with torch.no_grad():
                return mh.attention(*leaves, causal=shape.causal, backend=backend)
        out = mh.attention(*leaves, causal=shape.causal, backend=backend)
        return torch.autograd.grad(out, leaves, grad)

    return run


def local_backends(shape: Shape, world: int, dtype, device) -> dict:
    """Which backend runs each local step: the single call's, the ring's block steps', Ulysses' call's."""
    P = make_sharding("zigzag", shape.T, world).part
    q = torch.zeros(shape.B, shape.H, shape.T, shape.D, dtype=dtype, device=device)
    k = torch.zeros(shape.B, shape.G, shape.T, shape.D, dtype=dtype, device=device)
    full = make_call(q, k, k, causal=shape.causal)
    block = make_call(q[:, :, :P], k[:, :, :P], k[:, :, :P], causal=shape.causal)
    heads = make_call(q[:, :max(1, shape.H // world)], k[:, :max(1, shape.G // world)],
                      k[:, :max(1, shape.G // world)], causal=shape.causal)
    return {"single": backends.dispatch(full, "auto").name,
            "ring_forward": backends.dispatch(block, "auto", need_lse=True).name,
            "ring_backward": backends.dispatch(block, "auto", need_lse=True, need_backward=True).name,
            "ulysses": backends.dispatch(heads, "auto").name}


class Counter:
    """Bytes this rank hands to torch.distributed for other ranks, while `counting()` is open.

    p2p: the tensors of the isend ops given to batch_isend_irecv (the ring);
    all_to_all: all_to_all_single's input less the slice that stays on this rank (Ulysses);
    agreement: all_gather inputs times the other ranks (the ranks' agreement, on a new signature only).
    Patched on the torch.distributed module in this process only, and restored after.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.p2p_bytes = self.p2p_calls = self.all_to_all_bytes = self.all_to_all_calls = 0
        self.agreement_bytes = self.agreement_calls = 0

    @property
    def data_bytes(self) -> int:
        return self.p2p_bytes + self.all_to_all_bytes

    @contextlib.contextmanager
    def counting(self):
        originals = dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather
        batch, to_all, gather = originals

        def batch_isend_irecv(ops):
            self.p2p_calls += 1
            self.p2p_bytes += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return batch(ops)

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                              async_op=False):
            if input_split_sizes is not None:
                raise NotImplementedError("the counter knows only equal splits")
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            own = input.narrow(0, rank * input.shape[0] // world, input.shape[0] // world)
            self.all_to_all_calls += 1
            self.all_to_all_bytes += (input.numel() - own.numel()) * input.element_size()
            return to_all(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        def all_gather(tensor_list, tensor, group=None, async_op=False):
            self.agreement_calls += 1
            self.agreement_bytes += tensor.numel() * tensor.element_size() * (dist.get_world_size(group) - 1)
            return gather(tensor_list, tensor, group=group, async_op=async_op)

        dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather = (batch_isend_irecv, all_to_all_single,
                                                                           all_gather)
        try:
            yield self
        finally:
            dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather = originals


def modelled_bytes(method: str, shape: Shape, world: int, elem: int, acc: int) -> dict:
    """Bytes one rank sends per call, by the model: {"forward": ..., "backward": ...} (Dv = D)."""
    N, P = world, make_sharding(METHODS[method][1], shape.T, world).part
    kv = shape.B * shape.G * P * 2 * shape.D  # elements of this rank's k and v parts
    if METHODS[method][0] == "ring":
        hops = N if N > 1 else 0  # the sums go N hops, home; a group of one sends nothing
        return {"forward": (N - 1) * kv * elem, "backward": (N - 1) * kv * elem + hops * kv * acc}
    q = o = shape.B * shape.H * P * shape.D
    moved = (q + kv + o) * elem * (N - 1) // N
    return {"forward": moved, "backward": moved}


def count_bytes(method: str, shape: Shape, full, group=None) -> dict:
    """One forward and one backward of `method`, counted (not timed)."""
    counter = Counter()
    kind, layout = METHODS[method]
    attend = ring_attention if kind == "ring" else ulysses_attention
    with torch.no_grad():
        q, k, v, grad = (shard_sequence(x, dim=2, layout=layout, group=group) for x in full)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with counter.counting():
        out = attend(*leaves, causal=shape.causal, layout=layout, length=shape.T, group=group)
    forward = dict(bytes=counter.data_bytes, p2p_calls=counter.p2p_calls, all_to_all_calls=counter.all_to_all_calls,
                   agreement_calls=counter.agreement_calls, agreement_bytes=counter.agreement_bytes)
    counter.reset()
    with counter.counting():
        torch.autograd.grad(out, leaves, grad)
    backward = dict(bytes=counter.data_bytes, p2p_calls=counter.p2p_calls, all_to_all_calls=counter.all_to_all_calls,
                    agreement_calls=counter.agreement_calls, agreement_bytes=counter.agreement_bytes)
    return {"forward": forward, "backward": backward}


def timed_in_turns(steps: dict, repeats: int, clock, group=None, barrier: bool = True) -> dict[str, list[float]]:
    """This rank's seconds per repeat of each step, the steps taking turns; a barrier before each repeat."""
    for step in steps.values():  # warm-up
        if barrier:
            dist.barrier(group=group)
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if barrier:
                dist.barrier(group=group)
            clock.start()
            step()
            times[name].append(clock.stop())
    return times


def gathered(value, group=None) -> list:
    """Every rank's `value` (a picklable object), in group rank order."""
    values: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def measure_parallel(shapes: list[Shape], methods: list[str], world: int, repeats: int, dtype, device, clock,
                     group=None) -> dict:
    """Inside each rank of a group of `world`: timing rows and byte rows (the same on every rank)."""
    elem = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    timings, counts = [], []
    for shape in shapes:
        full = full_inputs(shape, dtype, device)
        able = [m for m in methods if skip_reason(m, shape, world) is None]
        for method in methods:
            if method not in able:
                counts.append(dict(shape=asdict(shape), world=world, method=method,
                                   skipped=skip_reason(method, shape, world)))
                continue
            counted = gathered(count_bytes(method, shape, full, group), group)  # every rank's counts
            model = modelled_bytes(method, shape, world, elem, acc)
            row = dict(shape=asdict(shape), world=world, method=method, skipped=None, dtype=str(dtype),
                       part=make_sharding(METHODS[method][1], shape.T, world).part)
            for phase in ("forward", "backward"):
                per_rank = [c[phase]["bytes"] for c in counted]
                row[phase] = dict(counted_bytes=max(per_rank), counted_per_rank=per_rank, model_bytes=model[phase],
                                  agree=all(b == model[phase] for b in per_rank),
                                  **{key: counted[0][phase][key] for key in
                                     ("p2p_calls", "all_to_all_calls", "agreement_calls", "agreement_bytes")})
            counts.append(row)
        for mode in MODES:
            # "single": multihead.attention on the whole sequence on rank 0 alone (the others wait in the next
            # barrier), timed in turns with the parallel calls, so the ratios come from one stretch of time
            alone = single_step(shape, full, mode != "forward") if dist.get_rank(group) == 0 else (lambda: None)
            steps = {"single": alone, **{m: parallel_step(m, shape, full, mode != "forward", group) for m in able}}
            mine = timed_in_turns(steps, repeats, clock, group)
            everyone = gathered(mine, group)  # [rank][method] -> per-repeat seconds
            for method in ["single", *methods]:
                if method != "single" and method not in able:
                    timings.append(dict(shape=asdict(shape), world=world, method=method, mode=mode,
                                        skipped=skip_reason(method, shape, world)))
                    continue
                per_rank = [r[method] for r in everyone]
                slowest = [max(column) for column in zip(*per_rank)]  # the slowest rank of each repeat
                timings.append(dict(shape=asdict(shape), world=world, method=method, mode=mode, skipped=None,
                                    seconds=statistics.median(slowest), per_repeat_max_s=slowest,
                                    per_rank_s=per_rank))
        del full
    return dict(timings=timings, bytes=counts, threads=torch.get_num_threads(),
                backends={s.name + f"-T{s.T}": local_backends(s, world, dtype, device) for s in shapes})


def cpu_rank_main(shapes: list[Shape], methods: list[str], repeats: int) -> dict:
    """What each gloo process runs (top level, so that spawned processes can import it): 1 thread, fp32."""
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1, set by run_local in the child, comes too late for torch
    return measure_parallel(shapes, methods, dist.get_world_size(), repeats, torch.float32, "cpu", WallClock())


# ------------------------------------------------------------------------------------------------ rows, printed


def with_speedups(timings: list[dict]) -> list[dict]:
    """Each timing row with the single-process time of its shape, mode and job, and single / this."""
    key = lambda r: (r["shape"]["name"], r["shape"]["T"], r["mode"], r["world"])  # noqa: E731
    base = {key(r): r["seconds"] for r in timings if r["method"] == "single"}
    rows = []
    for r in timings:
        r = dict(r)
        if not r.get("skipped"):
            r["single_s"] = base[key(r)]
            r["speedup"] = r["single_s"] / r["seconds"]
        rows.append(r)
    return rows


def shape_label(s: dict) -> str:
    return f"{s['name']} H={s['H']} G={s['G']}"


def timing_table(rows: list[dict], title: str, cores: int | None = None, unit: float = 1e3, unit_name: str = "ms"):
    order = {m: i for i, m in enumerate(["single", *METHODS])}
    rows = sorted(rows, key=lambda r: (r["shape"]["T"], r["shape"]["name"], r["mode"] == "forward+backward",
                                       r["world"], order[r["method"]]))
    printed = []
    for r in rows:
        note = ""
        if cores is not None and r["world"] > cores and r["method"] != "single":
            note = f"oversubscribed: {r['world']} processes on {cores} cores"
        if r.get("skipped"):
            printed.append([shape_label(r["shape"]), str(r["shape"]["T"]), r["mode"], str(r["world"]), r["method"],
                            "-", "-", f"skipped: {r['skipped']}"])
            continue
        printed.append([shape_label(r["shape"]), str(r["shape"]["T"]), r["mode"], str(r["world"]), r["method"],
                        f"{r['seconds'] * unit:.2f}", f"{r['speedup']:.2f}x", note])
    print_table(title, ["shape", "T", "mode", "world", "method", unit_name, "speed-up", "note"], printed)


def bytes_table(rows: list[dict], title: str) -> None:
    printed = []
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (r["shape"]["T"], r["shape"]["name"], r["world"], order[r["method"]])):
        if r.get("skipped"):
            continue
        f, b = r["forward"], r["backward"]
        printed.append([shape_label(r["shape"]), str(r["shape"]["T"]), str(r["world"]), r["method"], str(r["part"]),
                        f"{f['counted_bytes']:,}", f"{f['model_bytes']:,}", f"{b['counted_bytes']:,}",
                        f"{b['model_bytes']:,}", "yes" if f["agree"] and b["agree"] else "NO",
                        f"{f['p2p_calls'] + f['all_to_all_calls']}+{b['p2p_calls'] + b['all_to_all_calls']}",
                        f"{f['agreement_calls']}+{b['agreement_calls']} ({f['agreement_bytes']} B)"])
    print_table(title, ["shape", "T", "world", "method", "part", "fwd counted B", "fwd model B", "bwd counted B",
                        "bwd model B", "equal", "data calls f+b", "agreement calls f+b"], printed)


def check_bytes(rows: list[dict]) -> None:
    wrong = [r for r in rows if not r.get("skipped") and not (r["forward"]["agree"] and r["backward"]["agree"])]
    if wrong:
        raise SystemExit(f"counted bytes differ from the model in {len(wrong)} rows, e.g. {wrong[0]}")


# ----------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Machine:
    """N GPUs joined by a link; the compute rate is peak x efficiency."""

    name: str
    gpus: int
    peak_flops: float  # dense bf16 FLOP/s
    efficiency: float  # achieved fraction of the peak in the attention kernels (an assumption)
    link: str
    link_bytes_per_s: float  # per GPU, one direction (a ring hop sends one way and receives the other)

    @property
    def flops(self) -> float:
        return self.peak_flops * self.efficiency


MODEL_SHAPES = [("Llama GQA", 32, 8, 128), ("Llama MHA", 32, 32, 128)]  # (name, H, G, D); B = 1
MODEL_LENGTHS = [16384, 65536, 262144, 1048576]  # global T for the exposed-communication table

MODEL_TEXT = """\
Model (per rank, one step of the ring; P = T/N tokens per rank, B = 1, Dv = D, causal, zigzag):
  compute of one block  t_c = F / (peak x efficiency),  F = 4·B·H·P²·D / 2: with zigzag every rank does
      half of a PxP block at every step (its own part causally; another rank's: one chunk of P/2 against P,
      or P against P/2), so the N steps total 4·B·H·T²·D/(2N), half of full attention over N ranks.
  forward transfer      t_kv = B·G·P·2D·e / bw  (one k+v block, e bytes per element)
      hides when t_kv <= t_c, i.e. from P_f = G·e·(peak·eff) / (H·bw)
  backward              2.5x the forward FLOPs; sends k, v (e bytes) and dk, dv (a = 4 bytes, float32):
      all four overlapped: hides from P_b = 2·G·(e+a)·(peak·eff) / (5·H·bw)
      as implemented: at each step the k, v block for the next step and the dk, dv sums of the step before
      travel while the step computes, so a step takes max(t_cb, t_kv + t_dkdv); only the last hop of the
      sums (home, after the last step) is exposed: N·max(t_cb, t_kv + t_dkdv) + t_dkdv in all.
  Ulysses (no overlap: all_to_all, attention, all_to_all): per rank sends (N-1)/N·B·P·D·e·2(H+G) (q, k, v,
      out) in a forward, and as much again in a backward; computes 4·B·(H/N)·T²·D/2 (forward); that
      all_to_all volume costs as much time as the compute at
      P_u = (N-1)·(H+G)·e·(peak·eff) / (H·N²·bw), and 10% of it from 10·P_u (backward: 2.5x the compute).
  bw: per GPU and direction. Contiguous layout (not modelled): the slowest rank does a full block per step,
      so its transfers hide from P_f/2 but every step takes twice as long."""


def ring_times(P: float, H: int, G: int, D: int, m: Machine, elem: int = 2, acc: int = 4) -> dict:
    """Seconds of one ring step per rank, B = 1, causal zigzag."""
    compute = 4 * H * P * P * D / 2 / m.flops
    kv = G * P * 2 * D * elem / m.link_bytes_per_s
    dkdv = G * P * 2 * D * acc / m.link_bytes_per_s
    return dict(compute_f=compute, kv=kv, compute_b=2.5 * compute, dkdv=dkdv)


def ulysses_times(P: float, N: int, H: int, G: int, D: int, m: Machine, elem: int = 2) -> dict:
    """Seconds per rank of Ulysses' all_to_alls (each way) and its attention, B = 1, causal."""
    T = N * P
    moved = (N - 1) / N * P * D * elem * 2 * (H + G) / m.link_bytes_per_s
    compute = 4 * (H / N) * T * T * D / 2 / m.flops
    return dict(comm=moved, compute_f=compute, compute_b=2.5 * compute)


def exposed(P: float, N: int, H: int, G: int, D: int, m: Machine) -> dict:
    """Communication not hidden, as a share of the compute, at P tokens per rank."""
    r, u = ring_times(P, H, G, D, m), ulysses_times(P, N, H, G, D, m)
    return dict(ring_forward=max(0.0, r["kv"] - r["compute_f"]) / r["compute_f"],
                ring_backward_overlapped=max(0.0, r["kv"] + r["dkdv"] - r["compute_b"]) / r["compute_b"],
                ring_backward_as_implemented=(N * max(r["compute_b"], r["kv"] + r["dkdv"]) + r["dkdv"])
                / (N * r["compute_b"]) - 1,
                ulysses_forward=u["comm"] / u["compute_f"], ulysses_backward=u["comm"] / u["compute_b"])


def crossovers(N: int, H: int, G: int, D: int, m: Machine, elem: int = 2, acc: int = 4) -> dict:
    """Per-rank lengths P (tokens) from which communication hides, or costs the stated share of compute."""
    s, bw = m.flops, m.link_bytes_per_s
    out = dict(ring_forward_P=G * elem * s / (H * bw),
               ring_backward_overlapped_P=2 * G * (elem + acc) * s / (5 * H * bw),
               ulysses_equal_forward_P=(N - 1) * (H + G) * elem * s / (H * N * N * bw))
    out["ulysses_equal_backward_P"] = out["ulysses_equal_forward_P"] / 2.5
    out["ulysses_10pct_forward_P"] = 10 * out["ulysses_equal_forward_P"]
    out["ulysses_10pct_backward_P"] = 10 * out["ulysses_equal_backward_P"]
    # the closed forms against the step times they come from
    r = ring_times(out["ring_forward_P"], H, G, D, m, elem, acc)
    assert math.isclose(r["kv"], r["compute_f"], rel_tol=1e-9), r
    r = ring_times(out["ring_backward_overlapped_P"], H, G, D, m, elem, acc)
    assert math.isclose(r["kv"] + r["dkdv"], r["compute_b"], rel_tol=1e-9), r
    u = ulysses_times(out["ulysses_equal_forward_P"], N, H, G, D, m, elem)
    assert math.isclose(u["comm"], u["compute_f"], rel_tol=1e-9), u
    return out


def machines(gpus: int, peak_tflops: float, efficiency: float, nvlink_gbs: float, ib_gbs: float) -> list[Machine]:
    return [Machine(f"{gpus}x H100 SXM", gpus, peak_tflops * 1e12, efficiency, f"NVLink {nvlink_gbs:g} GB/s",
                    nvlink_gbs * 1e9),
            Machine(f"{gpus}x H100 SXM", gpus, peak_tflops * 1e12, efficiency, f"InfiniBand {ib_gbs * 8:g} Gb/s",
                    ib_gbs * 1e9)]


def model_rows(ms: list[Machine]) -> tuple[list[dict], list[dict]]:
    cross, share = [], []
    for m in ms:
        for name, H, G, D in MODEL_SHAPES:
            c = crossovers(m.gpus, H, G, D, m)
            cross.append(dict(machine=m.name, link=m.link, shape=name, H=H, G=G, D=D, N=m.gpus, **c,
                              **{k.replace("_P", "_T"): v * m.gpus for k, v in c.items()}))
            for T in MODEL_LENGTHS:
                share.append(dict(machine=m.name, link=m.link, shape=name, H=H, G=G, D=D, N=m.gpus, T=T,
                                  P=T // m.gpus, **exposed(T / m.gpus, m.gpus, H, G, D, m)))
    return cross, share


def tokens(x: float) -> str:
    x = math.ceil(x)
    return f"{x / 1024:.1f}k" if x >= 10240 else str(x)


def print_model(ms: list[Machine], cross: list[dict], share: list[dict]) -> None:
    m = ms[0]
    print(f"\n{MODEL_TEXT}")
    print(f"  assumed: {m.name}, bf16 dense peak {m.peak_flops / 1e12:g} TFLOP/s x efficiency {m.efficiency:g} "
          f"(an assumption, not a measurement) = {m.flops / 1e12:g} TFLOP/s achieved; links at their nominal "
          f"bandwidth per GPU and direction: " + ", ".join(x.link for x in ms) +
          " (NVLink 4's 900 GB/s is both directions together; a ring hop uses one)")
    print_table(f"Ring and Ulysses on N={m.gpus}: per-rank length P from which communication hides "
                f"(ring) or costs as much as the compute (Ulysses); global T = N·P in brackets",
                ["link", "shape", "ring fwd hides", "ring bwd hides", "ulysses fwd = compute", "ulysses bwd = compute", "ulysses fwd <=10%"],
                [[r["link"], f"{r['shape']} H={r['H']} G={r['G']} D={r['D']}",
                  f"{tokens(r['ring_forward_P'])} [{tokens(r['ring_forward_T'])}]",
                  f"{tokens(r['ring_backward_overlapped_P'])} [{tokens(r['ring_backward_overlapped_T'])}]",
                  f"{tokens(r['ulysses_equal_forward_P'])} [{tokens(r['ulysses_equal_forward_T'])}]",
                  f"{tokens(r['ulysses_equal_backward_P'])} [{tokens(r['ulysses_equal_backward_T'])}]",
                  f"{tokens(r['ulysses_10pct_forward_P'])} [{tokens(r['ulysses_10pct_forward_T'])}]"]
                 for r in cross])
    print_table(f"Exposed communication as a share of the compute, N={m.gpus} (0% = hidden)",
                ["link", "shape", "T", "P", "ring fwd", "ring bwd all hidden", "ring bwd as impl.", "ulysses fwd",
                 "ulysses bwd"],
                [[r["link"], r["shape"], tokens(r["T"]), tokens(r["P"]), f"{r['ring_forward']:.0%}",
                  f"{r['ring_backward_overlapped']:.0%}", f"{r['ring_backward_as_implemented']:.0%}",
                  f"{r['ulysses_forward']:.0%}", f"{r['ulysses_backward']:.0%}"] for r in share])


def model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=8, help="N of the model (default 8)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--efficiency", type=float, default=0.5, help="assumed achieved fraction of the peak")
    parser.add_argument("--nvlink-gbs", type=float, default=450.0,
                        help="NVLink GB/s per GPU and direction (H100 SXM: 900 both ways = 450 each)")
    parser.add_argument("--ib-gbs", type=float, default=50.0, help="InfiniBand GB/s per GPU and direction (400 Gb/s)")


def model_section(args) -> dict:
    ms = machines(args.gpus, args.peak_tflops, args.efficiency, args.nvlink_gbs, args.ib_gbs)
    cross, share = model_rows(ms)
    print_model(ms, cross, share)
    return dict(text=MODEL_TEXT, machines=[asdict(m) for m in ms], crossovers=cross, exposed=share,
                bytes_per_element=2, accumulator_bytes=4)


# ----------------------------------------------------------------------------------------------------------- main


def cpu_shapes(quick: bool) -> list[Shape]:
    if quick:  # G=1: on 2 processes Ulysses is skipped (N must divide G), so --worlds 1,2 meets every row kind
        return [Shape("MHA", 1, 4, 4, 16, 128), Shape("GQA", 1, 4, 1, 16, 128)]
    return [Shape(name, 1, 8, G, 64, T) for T in (1024, 4096) for name, G in (("MHA", 8), ("GQA", 2))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--worlds", default="1,2,4",
                        help="process counts (default 1,2,4; 1: the methods' own cost with nothing to send)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9; 2 with --quick)")
    model_args(parser)
    args = parser.parse_args(argv)

    from multihead.distributed.local import run_local

    started = time.perf_counter()
    shapes = cpu_shapes(args.quick)
    repeats = args.repeats or (2 if args.quick else 9)
    worlds = [int(w) for w in args.worlds.split(",")]
    cores = os.cpu_count() or 1
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}; every process 1 thread, fp32, gloo")

    timings, counts, threads, chosen = [], [], {}, {}
    for world in worlds:
        timeout = 300.0 if args.quick else 3600.0
        results = run_local(cpu_rank_main, world, args=(shapes, list(METHODS), repeats), timeout=timeout)
        timings += results[0]["timings"]
        counts += results[0]["bytes"]
        threads[world] = [r["threads"] for r in results]
        chosen[world] = results[0]["backends"]
    rows = with_speedups(timings)

    timing_table(rows, f"Time per call, fp32, causal, B=1, D={shapes[0].D}; single = multihead.attention on the "
                       f"whole sequence in one process with 1 thread, timed in turns with the job's parallel "
                       f"calls; speed-up = single / this (every process 1 thread, "
                       f"{cores} cores: world 2 at best ~{min(2, cores)}x)", cores=cores)
    bytes_table(counts, "Bytes sent per rank per call: counted at torch.distributed vs the model "
                        "(ring fwd (N-1)(k+v), bwd (N-1)(k+v) + N(dk+dv fp32); ulysses (N-1)/N(q+k+v+out) each)")
    check_bytes(counts)
    model = model_section(args)
    elapsed = time.perf_counter() - started
    print(f"\nlocal backends (auto): {chosen}; threads per rank: {threads}; {elapsed:.1f} s in all")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"distributed-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(
        device=device, cores=cores, threads_per_process=1, threads_seen=threads, backend="gloo", dtype="float32",
        torch=torch.__version__, python=platform.python_version(), multihead=mh.__version__,
        date=time.strftime("%Y-%m-%d"), quick=args.quick, repeats=repeats, worlds=worlds,
        local_backends=chosen, timings=rows, bytes=counts, model=model, seconds=elapsed,
    ), indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
