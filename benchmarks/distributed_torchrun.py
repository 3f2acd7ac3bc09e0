"""Context-parallel benchmark on a multi-GPU machine: ring and Ulysses attention with NCCL, against one GPU.

    torchrun --nproc-per-node 8 benchmarks/distributed_torchrun.py --seq 65536
    torchrun --nproc-per-node 8 benchmarks/distributed_torchrun.py --quick     # T=4096, a check of the script

The GPU counterpart of benchmarks/distributed.py, whose code it imports (the
steps, the turns, the byte counter and the model): bf16, causal, B=1,
Llama-like shapes (H=32, D=128; G=8 and G=32), T = --seq tokens in all.
`multihead.attention` on one GPU (rank 0, the others waiting) is the
comparison; then ring (zigzag, contiguous) and Ulysses on the first 2, 4, ...
ranks (`--worlds`, default powers of two up to the world size; a subgroup
per size). Each repeat starts with a barrier and is timed with CUDA events on
every rank; the slowest rank's time counts, the median over repeats is
reported. Bytes per rank are counted at torch.distributed and checked
against the model; the model's table (N=8 H100 SXM) is printed too. Rank 0
prints everything and writes benchmarks/results/distributed-<gpu>-x<N>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def load_cpu_benchmark():
    """benchmarks/distributed.py as a module (by its path, under a name no installed package has)."""
    spec = importlib.util.spec_from_file_location("multihead_benchmarks_distributed", HERE / "distributed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def refusal() -> str | None:
    """Why this process cannot run the benchmark (one line), or None."""
    import torch

    if not torch.cuda.is_available():
        return ("distributed_torchrun.py needs CUDA GPUs and NCCL, and this machine has no CUDA device; "
                "on CPUs run benchmarks/distributed.py")
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        return (f"distributed_torchrun.py must be started by torchrun ({', '.join(missing)} not set): "
                f"torchrun --nproc-per-node 8 benchmarks/distributed_torchrun.py --seq 65536")
    local = int(os.environ["LOCAL_RANK"])
    if local >= torch.cuda.device_count():
        return (f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: "
                f"give torchrun --nproc-per-node <= {torch.cuda.device_count()}")
    return None


def parse(bench, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536, help="global sequence length T (default 65536)")
    parser.add_argument("--quick", action="store_true", help="T=4096 and 2 repeats: check the script")
    parser.add_argument("--worlds", default=None,
                        help="group sizes, e.g. 2,4,8 (default: powers of two up to the world size)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON")
    bench.model_args(parser)  # the model's machine: --gpus, --peak-tflops, --efficiency, --nvlink-gbs, --ib-gbs
    return parser.parse_args(argv)


def main(argv=None) -> int:
    bench = load_cpu_benchmark()
    args = parse(bench, argv)
    reason = refusal()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2

    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=30))
    try:
        versions = dict(cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
        run(args, bench, device, torch.bfloat16, bench.CudaClock(), torch.cuda.get_device_name(device), versions)
    finally:
        dist.destroy_process_group()
    return 0


def run(args, bench, device, dtype, clock, device_label: str, versions: dict):
    """The benchmark in an initialized process group (NCCL from main; gloo on CPUs to test this script).

    Every rank calls it; rank 0 prints and writes the JSON and returns its path, the others None.
    """
    import torch
    import torch.distributed as dist

    import multihead as mh

    on_cuda = torch.device(device).type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    T = 4096 if args.quick else args.seq
    repeats = args.repeats or (2 if args.quick else 5)
    worlds = ([int(w) for w in args.worlds.split(",")] if args.worlds
              else [2 ** i for i in range(1, world.bit_length()) if 2 ** i <= world])
    worlds = [w for w in worlds if 2 <= w <= world]
    shapes = [bench.Shape("GQA", 1, 32, 8, 128, T), bench.Shape("MHA", 1, 32, 32, 128, T)]
    methods = list(bench.METHODS)
    started = time.perf_counter()

    timings, counts, chosen = [], [], {}
    for w in worlds:
        group = dist.new_group(list(range(w)))  # every rank calls new_group, members or not
        if rank < w:
            result = bench.measure_parallel(shapes, methods, w, repeats, dtype, device, clock, group)
            if rank == 0:
                timings += result["timings"]
                counts += result["bytes"]
                chosen[w] = result["backends"]
        if on_cuda:
            torch.cuda.empty_cache()
        dist.barrier()
    if rank != 0:
        return None

    backend, dtype_name = dist.get_backend(), str(dtype).removeprefix("torch.")
    name = f"{device_label} x{world}"
    rows = bench.with_speedups(timings)
    bench.timing_table(rows, f"Time per call on {name}, {backend}, {dtype_name}, causal, B=1, H=32, D=128, T={T}; "
                             f"single = multihead.attention on one device, timed in turns with each job's calls; "
                             f"speed-up = single / this (at best N)")
    bench.bytes_table(counts, "Bytes sent per rank per call: counted at torch.distributed vs the model")
    bench.check_bytes(counts)
    model = bench.model_section(args)
    elapsed = time.perf_counter() - started
    print(f"\nlocal backends (auto): {chosen}; {elapsed:.1f} s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"distributed-{bench.slug(name)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(
        device=name, backend=backend, dtype=dtype_name, torch=torch.__version__, **versions,
        python=platform.python_version(), multihead=mh.__version__, date=time.strftime("%Y-%m-%d"),
        quick=args.quick, T=T, repeats=repeats, worlds=worlds, local_backends=chosen, timings=rows,
        bytes=counts, model=model, seconds=elapsed,
    ), indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
