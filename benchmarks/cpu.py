"""CPU benchmark: multihead against torch, side by side in one run.

    python benchmarks/cpu.py                 # the full table (a few minutes on 2 cores)
    python benchmarks/cpu.py --quick         # tiny sizes, to check the script itself

Five tables, each printed and written to benchmarks/results/cpu-<device>.json
with the device, the versions and the raw times:

0. Per-call cost where attention is cheap (the targets of "fast where it
   counts"): MultiHeadAttention against torch.nn.MultiheadAttention (the
   faster of its two layouts) at T in {1, 14, 128, 1024, 4096}, and
   `multihead.attention` against calling SDPA directly at T=1, S=512 (a
   decode step) and T=S=128; eval, fp32, B=1, C=512, H=8, no grad, with 1
   and with 2 threads. Each sample times a batch of calls (about 20 ms), the
   candidates take turns, and the median sample counts.
1. multihead.MultiHeadAttention against torch.nn.MultiheadAttention (eval,
   fp32, B=1, H=8, D=64 so C=512), need_weights False and True, torch both
   with batch_first=True (its fused inference path) and with its default
   sequence-first layout (its functional path); per-head weights on both
   sides (torch with average_attn_weights=False).
2. multihead.attention with each backend against torch SDPA on the same q, k, v.
3. Peak memory of the chunked backend against the reference at T=16384:
   the CPU allocator's peak during the call over its total before it, read
   from torch's memory profiler.

On a shared CPU only ratios measured in the same run mean anything: the
candidates of a row are timed in turns, median of several repeats each.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import multihead as mh
from multihead.timing import device_name, print_table, slug, timeit_side_by_side

RESULTS = Path(__file__).resolve().parent / "results"



def timeit(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    return timeit_side_by_side({"fn": fn}, repeats)["fn"]


OVERHEAD_LENGTHS = [1, 14, 128, 1024, 4096]
SDPA_SHAPES = [(1, 512), (128, 128)]  # (T, S): a decode step, a short prefill


def per_call(fns, samples: int, sample_seconds: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each candidate; a sample is a batch of calls lasting about sample_seconds."""
    batch = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()  # warm-up, and a first estimate of one call
        batch[name] = max(1, int(sample_seconds / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            times[name].append((time.perf_counter() - start) / batch[name])
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def overhead_module_rows(lengths, threads: int, samples: int):
    rows = []
    C, H = 512, 8
    torch.manual_seed(0)
    ours = mh.MultiHeadAttention(C, H).eval()
    batch_first = torch.nn.MultiheadAttention(C, H, batch_first=True).eval()
    seq_first = torch.nn.MultiheadAttention(C, H).eval()
    for T in lengths:
        x = torch.randn(1, T, C)
        xs = x.transpose(0, 1).contiguous()  # (B, T, C) -> (T, B, C)
        with torch.no_grad():
            t = per_call({"multihead": lambda: ours(x),
                          "torch_batch_first": lambda: batch_first(x, x, x, need_weights=False),
                          "torch_seq_first": lambda: seq_first(xs, xs, xs, need_weights=False)}, samples)
        best = min(t["torch_batch_first"], t["torch_seq_first"])
        rows.append(dict(threads=threads, T=T, multihead_s=t["multihead"], torch_batch_first_s=t["torch_batch_first"],
                         torch_seq_first_s=t["torch_seq_first"], best_torch_over_multihead=best / t["multihead"]))
    return rows


def overhead_sdpa_rows(shapes, threads: int, samples: int):
    rows = []
    for T, S in shapes:
        torch.manual_seed(0)
        q = torch.randn(1, 8, T, 64)
        k, v = torch.randn(1, 8, S, 64), torch.randn(1, 8, S, 64)
        with torch.no_grad():
            t = per_call({"multihead": lambda: mh.attention(q, k, v),
                          "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}, samples)
        rows.append(dict(threads=threads, T=T, S=S, multihead_s=t["multihead"], sdpa_s=t["sdpa"],
                         multihead_over_sdpa=t["multihead"] / t["sdpa"]))
    return rows


def overhead_tables(lengths, shapes, samples: int):
    """Both per-call tables with 1 thread, then with 2; the thread setting is restored after."""
    before = torch.get_num_threads()
    modules, calls = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            modules += overhead_module_rows(lengths, threads, samples)
            calls += overhead_sdpa_rows(shapes, threads, samples)
    finally:
        torch.set_num_threads(before)
    return modules, calls


def print_overhead(modules, calls) -> None:
    print_table("Per call: MultiHeadAttention vs torch.nn.MultiheadAttention (eval, fp32, B=1, C=512, H=8, no grad)",
                ["threads", "T", "multihead us", "torch batch_first us", "torch seq-first us", "best torch / multihead"],
                [[str(r["threads"]), str(r["T"]), f"{r['multihead_s'] * 1e6:.0f}", f"{r['torch_batch_first_s'] * 1e6:.0f}",
                  f"{r['torch_seq_first_s'] * 1e6:.0f}", f"{r['best_torch_over_multihead']:.2f}x"] for r in modules])
    print_table("Per call: multihead.attention vs F.scaled_dot_product_attention (fp32, B=1, H=8, D=64)",
                ["threads", "T", "S", "multihead us", "SDPA us", "multihead / SDPA time"],
                [[str(r["threads"]), str(r["T"]), str(r["S"]), f"{r['multihead_s'] * 1e6:.1f}",
                  f"{r['sdpa_s'] * 1e6:.1f}", f"{r['multihead_over_sdpa']:.3f}"] for r in calls])


def module_table(lengths, repeats):
    """Ours against torch's module in both layouts: batch_first=True takes torch's
    fused inference path where it can, batch_first=False (torch's default) the
    functional path. Weights are per head on both sides (average_attn_weights=False)."""
    rows = []
    C, H = 512, 8
    for T in lengths:
        torch.manual_seed(0)
        x = torch.randn(1, T, C)
        x_seq_first = x.transpose(0, 1).contiguous()  # (B, T, C) -> (T, B, C)
        ours = mh.MultiHeadAttention(C, H).eval()
        batch_first = torch.nn.MultiheadAttention(C, H, batch_first=True).eval()
        seq_first = torch.nn.MultiheadAttention(C, H).eval()
        with torch.no_grad():
            for need_weights in (False, True):
                t = timeit_side_by_side({
                    "multihead": lambda: ours(x, need_weights=need_weights),
                    "torch_batch_first": lambda: batch_first(
                        x, x, x, need_weights=need_weights, average_attn_weights=False),
                    "torch_seq_first": lambda: seq_first(
                        x_seq_first, x_seq_first, x_seq_first, need_weights=need_weights,
                        average_attn_weights=False),
                }, repeats)
                rows.append(dict(
                    T=T, need_weights=need_weights, multihead_s=t["multihead"],
                    torch_batch_first_s=t["torch_batch_first"], torch_seq_first_s=t["torch_seq_first"],
                    speedup_vs_batch_first=t["torch_batch_first"] / t["multihead"],
                    speedup_vs_seq_first=t["torch_seq_first"] / t["multihead"],
                ))
    return rows


def backend_table(lengths, repeats):
    rows = []
    for T in lengths:
        for causal in (False, True):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, 8, T, 64) for _ in range(3))
            fns = {"torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
            # only the backends that can run here (triton needs a GPU or its interpreter)
            able = [name for name, reason in mh.which_backend(q, k, v, causal=causal).reasons.items()
                    if reason is None]
            for name in able:
                fns[name] = lambda name=name: mh.attention(q, k, v, causal=causal, backend=name)
            with torch.no_grad():
                t = timeit_side_by_side(fns, repeats)
            for name in able:
                rows.append(dict(T=T, causal=causal, backend=name, seconds=t[name],
                                 torch_sdpa_s=t["torch_sdpa"], vs_torch_sdpa=t[name] / t["torch_sdpa"]))
    return rows


def peak_extra_bytes(fn) -> int:
    """Peak bytes the CPU allocator held during fn() beyond what it held before.

    torch's profiler records every allocation and free with the allocator's
    running total ("Total Allocated"); the peak of that total over the call,
    minus the total at its start, is the call's own peak memory.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


def memory_table(T: int, H: int):
    """Peak extra memory and time of one forward per backend (time measured without the profiler)."""
    rows = []
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, T, 64) for _ in range(3))
    with torch.no_grad():
        for name in ("chunked", "reference", "sdpa"):
            peak = peak_extra_bytes(lambda: mh.attention(q, k, v, backend=name))
            seconds = timeit(lambda: mh.attention(q, k, v, backend=name), repeats=1)
            rows.append(dict(T=T, H=H, D=64, backend=name, peak_extra_bytes=peak, seconds=seconds))
    return rows



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)

    lengths = [64, 128] if args.quick else [1024, 4096]
    repeats = 2 if args.quick else 5
    memory_T, memory_H = (512, 2) if args.quick else (16384, 2)
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    overhead_lengths = [1, 14] if args.quick else OVERHEAD_LENGTHS
    overhead_modules, overhead_calls = overhead_tables(overhead_lengths, SDPA_SHAPES, 3 if args.quick else 15)
    print_overhead(overhead_modules, overhead_calls)

    modules = module_table(lengths, repeats)
    print_table("MultiHeadAttention vs torch.nn.MultiheadAttention (eval, fp32, B=1, H=8, D=64)",
                ["T", "need_weights", "multihead ms", "torch batch_first ms", "speed-up",
                 "torch seq-first ms", "speed-up"],
                [[str(r["T"]), str(r["need_weights"]), f"{r['multihead_s'] * 1e3:.1f}",
                  f"{r['torch_batch_first_s'] * 1e3:.1f}", f"{r['speedup_vs_batch_first']:.2f}x",
                  f"{r['torch_seq_first_s'] * 1e3:.1f}", f"{r['speedup_vs_seq_first']:.2f}x"]
                 for r in modules])

    backends = backend_table(lengths, repeats)
    print_table("multihead.attention backends vs torch SDPA (fp32, B=1, H=8, D=64; time / SDPA's)",
                ["T", "causal", "backend", "ms", "SDPA ms", "x SDPA time"],
                [[str(r["T"]), str(r["causal"]), r["backend"], f"{r['seconds'] * 1e3:.1f}",
                  f"{r['torch_sdpa_s'] * 1e3:.1f}", f"{r['vs_torch_sdpa']:.2f}"] for r in backends])

    memory = memory_table(memory_T, memory_H)
    ref_bytes = next(r["peak_extra_bytes"] for r in memory if r["backend"] == "reference")
    print_table(f"Peak memory of one forward at T={memory_T} (B=1, H={memory_H}, D=64, fp32)",
                ["backend", "extra peak MiB", "share of reference", "s"],
                [[r["backend"], f"{r['peak_extra_bytes'] / 2**20:.0f}",
                  f"{r['peak_extra_bytes'] / max(ref_bytes, 1):.3f}", f"{r['seconds']:.2f}"]
                 for r in memory])

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(
        device=device, threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), multihead=mh.__version__,
        date=time.strftime("%Y-%m-%d"), overhead_module=overhead_modules, overhead_attention=overhead_calls,
        module=modules, backends=backends, memory=memory,
    ), indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
