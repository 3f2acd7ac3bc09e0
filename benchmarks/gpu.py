"""GPU benchmark: multihead's triton kernels against torch SDPA and flash-attn, in one run.

    python benchmarks/gpu.py                 # the FlashAttention grid (needs a CUDA device)
    python benchmarks/gpu.py --quick         # T up to 2048, a check of the script on a GPU
    python benchmarks/gpu.py --dry-run       # print the grid and the candidates; runs anywhere

The grid is FlashAttention's: B·T = 16k tokens, width H·D = 2048, D in {64, 128},
T from 512 to 16k, causal and not, bf16. For each point, forward and
forward+backward of

- triton: `multihead.backends.triton.triton_attention`;
- sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math: torch SDPA with one of its
  backends pinned by `torch.nn.attention.sdpa_kernel` (a backend that cannot
  run the point, or runs out of memory, is recorded as such, not fatal);
- flash-attn: `flash_attn.flash_attn_func`, when the package is importable.

TFLOP/s as FlashAttention counts them: forward 4·B·H·T·S·D, halved when causal;
forward+backward 3.5x the forward (the backward is 2.5x). The fraction of peak
is against the device's dense bf16 peak (989 TFLOP/s on H100 SXM; --peak to
give another). Peak memory is torch.cuda.max_memory_allocated during the call,
beyond what was allocated before it.

A second table prices weights on demand: the weights of one head for all
queries (`multihead.attention_weights(..., heads=[0])`) against the forward
alone, and against the eager path that materializes every head's weights
(`multihead.backends.reference.attention_ref` in place, in bf16).

Everything is printed and written to benchmarks/results/gpu-<device>.json with
the device name, the versions and the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = 16 * 1024  # B·T, FlashAttention's grid
WIDTH = 2048  # H·D
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [512, 1024, 2048]
HEAD_DIMS = [64, 128]
SDPA_BACKENDS = ["flash", "efficient", "cudnn", "math"]

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; sparsity not counted).
PEAKS = {
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def device_peak(name: str) -> float | None:
    for key in sorted(PEAKS, key=len, reverse=True):  # the longest match: "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return PEAKS[key]
    if "h100" in name.lower():
        return PEAKS["H100 SXM"]
    return None


def grid(quick: bool):
    """(B, H, T, D, causal) points: B·T = 16k tokens, H·D = 2048."""
    points = []
    for D in HEAD_DIMS:
        for T in (QUICK_LENGTHS if quick else LENGTHS):
            for causal in (False, True):
                points.append((max(1, TOKENS // T), WIDTH // D, T, D, causal))
    return points


def forward_flops(B, H, T, S, D, causal) -> float:
    flops = 4.0 * B * H * T * S * D
    return flops / 2 if causal else flops


def flash_attn_func():
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:  # not installed, or built for another torch
        return None
    return fn


def candidates(have_flash_attn: bool) -> list[str]:
    names = ["triton"] + [f"sdpa-{b}" for b in SDPA_BACKENDS]
    return names + (["flash-attn"] if have_flash_attn else [])


def make_call(name, q, k, v, causal):
    """A zero-argument function running one candidate's forward on (B, H, T, D) tensors."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "triton":
        from multihead.backends.triton import triton_attention

        return lambda: triton_attention(q, k, v, causal=causal).out
    if name.startswith("sdpa-"):
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name[5:]]

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run
    if name == "flash-attn":
        fn = flash_attn_func()
        # flash-attn takes (B, T, H, D); the transposes are views, the kernel wants them contiguous
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in (q, k, v))
        return lambda: fn(qt, kt, vt, causal=causal)
    raise ValueError(name)


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, CUDA events around each, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(fn, repeats: int) -> dict:
    """Time and peak extra memory of fn; an error (OOM, unsupported) becomes a row that says so."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = cuda_time(fn, repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(error="out of memory")
    except Exception as exc:  # a pinned SDPA backend that cannot run this point, say
        torch.cuda.synchronize()
        return dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return dict(seconds=seconds, peak_bytes=torch.cuda.max_memory_allocated() - base)


def attention_table(points, names, repeats, peak):
    rows = []
    for B, H, T, D, causal in points:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        fwd_flops = forward_flops(B, H, T, T, D, causal)
        for name in names:
            forward = make_call(name, q, k, v, causal)

            def forward_backward(forward=forward):
                out = forward()
                out.backward(grad if out.shape == grad.shape else grad.transpose(1, 2))

            for mode, fn, flops in (("fwd", forward, fwd_flops), ("fwd+bwd", forward_backward, 3.5 * fwd_flops)):
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    result = measure(fn, repeats)
                row = dict(B=B, H=H, T=T, D=D, causal=causal, candidate=name, mode=mode, **result)
                if "seconds" in result:
                    row["tflops"] = flops / result["seconds"] / 1e12
                    row["fraction_of_peak"] = row["tflops"] / peak if peak else None
                rows.append(row)
                q.grad = k.grad = v.grad = None
        q = k = v = grad = None  # free this point's tensors before the next one is allocated
    return rows


def weights_table(points, repeats):
    """One head's weights for every query, against the forward and the eager path."""
    import multihead as mh
    from multihead.backends.reference import attention_ref
    from multihead.backends.triton import triton_attention

    rows = []
    for B, H, T, D, causal in points:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with torch.no_grad():
            forward = measure(lambda: triton_attention(q, k, v, causal=causal), repeats)
            one_head = measure(lambda: mh.attention_weights(q, k, v, heads=[0], causal=causal), repeats)
            eager = measure(lambda: attention_ref(q, k, v, causal=causal, upcast=False, in_place=True), repeats)
        row = dict(B=B, H=H, T=T, D=D, causal=causal, forward=forward, weights_one_head=one_head, eager_all_heads=eager)
        if "seconds" in forward and "seconds" in one_head:
            row["weights_vs_forward"] = one_head["seconds"] / forward["seconds"]
        rows.append(row)
        q = k = v = None  # free this point's tensors before the next one is allocated
    return rows


def fmt(row) -> str:
    if "error" in row:
        return row["error"][:24]
    return f"{row['tflops']:.0f}"


def print_table(title, header, rows):
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def attention_rows_for_print(rows, names):
    """One line per (D, T, causal, mode): each candidate's TFLOP/s, then triton's fraction of peak and memory."""
    by_point = {}
    for r in rows:
        by_point.setdefault((r["D"], r["T"], r["causal"], r["mode"]), {})[r["candidate"]] = r
    lines = []
    for (D, T, causal, mode), cands in by_point.items():
        ours = cands.get("triton", {})
        best_sdpa = max((c.get("tflops", 0.0) for n, c in cands.items() if n.startswith("sdpa-")), default=0.0)
        frac = ours.get("fraction_of_peak")
        lines.append([str(D), str(T), str(causal), mode] + [fmt(cands[n]) if n in cands else "-" for n in names] + [
            f"{ours['tflops'] / best_sdpa:.2f}x" if "tflops" in ours and best_sdpa else "-",
            f"{frac:.0%}" if frac else "-",
            f"{ours['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in ours else "-",
        ])
    return lines


def versions() -> dict:
    out = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        import flash_attn

        out["flash_attn"] = flash_attn.__version__
    except Exception:
        out["flash_attn"] = None
    import multihead

    out["multihead"] = multihead.__version__
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T up to 2048 only")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and candidates, time nothing")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per candidate (median)")
    parser.add_argument("--peak", type=float, default=None, help="the device's dense bf16 TFLOP/s, if not known")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)

    points = grid(args.quick)
    names = candidates(flash_attn_func() is not None)
    if args.dry_run:
        print(f"candidates: {', '.join(names)}; bf16; forward and forward+backward")
        print_table("grid (B·T = 16k tokens, H·D = 2048)", ["B", "H", "T", "D", "causal", "fwd GFLOP"],
                    [[str(B), str(H), str(T), str(D), str(c), f"{forward_flops(B, H, T, T, D, c) / 1e9:.0f}"]
                     for B, H, T, D, c in points])
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device, and torch sees none "
              f"(torch {torch.__version__}); --dry-run prints the grid anywhere.", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name()
    peak = args.peak or device_peak(device)
    vers = versions()
    print(f"device: {device}; peak bf16 {peak or '?'} TFLOP/s; " + ", ".join(f"{k} {v}" for k, v in vers.items()))

    rows = attention_table(points, names, args.repeats, peak)
    print_table("TFLOP/s, bf16 (forward 4·B·H·T·S·D, halved when causal; fwd+bwd 3.5x)",
                ["D", "T", "causal", "mode"] + names + ["triton / best SDPA", "triton % peak", "triton MiB"],
                attention_rows_for_print(rows, names))

    weights = weights_table([p for p in points if p[2] <= (2048 if args.quick else 16384)], args.repeats)
    print_table("weights on demand: one head, all queries, from the lse",
                ["D", "T", "causal", "forward ms", "one head ms", "x forward", "MiB", "eager all heads ms", "MiB"],
                [[str(r["D"]), str(r["T"]), str(r["causal"]),
                  *(f"{r[key]['seconds'] * 1e3:.2f}" if "seconds" in r[key] else r[key]["error"][:20]
                    for key in ("forward", "weights_one_head")),
                  f"{r['weights_vs_forward']:.2f}" if "weights_vs_forward" in r else "-",
                  f"{r['weights_one_head'].get('peak_bytes', 0) / 2**20:.0f}",
                  f"{r['eager_all_heads']['seconds'] * 1e3:.2f}" if "seconds" in r["eager_all_heads"]
                  else r["eager_all_heads"]["error"][:20],
                  f"{r['eager_all_heads'].get('peak_bytes', 0) / 2**20:.0f}"] for r in weights])

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(
        device=device, peak_tflops=peak, **vers, date=time.strftime("%Y-%m-%d"),
        grid=dict(tokens=TOKENS, width=WIDTH, dtype="bf16"), attention=rows, weights=weights,
    ), indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
