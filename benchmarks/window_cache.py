"""A sliding window's KV cache: the bytes a SlidingWindowCache saves against the caches that keep every token.

    python benchmarks/window_cache.py            # decoding to 8192 tokens (about a minute on 2 cores)
    python benchmarks/window_cache.py --quick    # tiny sizes, to check the script itself

Two tables, printed and written to benchmarks/results/window-cache-<device>.json:

1. Measured. A stack of 4 `MultiHeadAttention` layers (C=256, 8 query heads, 2 key/value heads of 32,
   causal, RoPE, window=(255, 0): each query sees itself and 255 tokens back), fp32, B=1, decodes one
   token at a time from random inputs (the values do not change what is stored). Three caches take
   the same tokens: DynamicCache (grows, capacity doubling), StaticCache (max_length = the longest
   run) and SlidingWindowCache (the window's 256 tokens and a scratch slot). At each checkpoint:
   `nbytes` of each cache (what it holds), the largest difference between the window cache's outputs
   and the dynamic cache's (they compute the same attention), and the median time of a decoding step
   over the last 32 steps before the checkpoint, window / dynamic, the two taking turns step by step
   (a ratio from one run; absolute times on a shared CPU mean little).
2. At a real model's size: Mistral-7B v0.1's attention (32 layers, 8 key/value heads of 128,
   sliding_window 4096, bf16), B=1. The window cache is allocated and its `nbytes` read; a cache that
   keeps every token costs kv_bytes_per_token x tokens (`multihead.nn.cache.kv_bytes_per_token`,
   computed, not allocated).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import multihead as mh
from multihead.nn.cache import DynamicCache, SlidingWindowCache, StaticCache, kv_bytes_per_token
from multihead.timing import device_name, print_table, slug

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20


def layers(quick: bool, left: int) -> list[mh.MultiHeadAttention]:
    C, H, G = (32, 4, 2) if quick else (256, 8, 2)
    torch.manual_seed(0)
    return [mh.MultiHeadAttention(C, H, num_kv_heads=G, causal=True, window=(left, 0),
                                  rope=mh.RotaryEmbedding(C // H)).eval() for _ in range(4)]


def step(stack, x: torch.Tensor, cache) -> torch.Tensor:
    for i, layer in enumerate(stack):
        x = layer(x, cache=cache[i]).output
    return x


def measured_table(quick: bool) -> list[dict]:
    left = 15 if quick else 255
    checkpoints = [64, 128] if quick else [1024, 4096, 8192]
    stack = layers(quick, left)
    C, G, D = stack[0].config.d_model, stack[0].config.num_kv_heads, stack[0].config.head_dim
    caches = {"dynamic": DynamicCache(4), "static": StaticCache(4, 1, checkpoints[-1], G, D),
              "window": SlidingWindowCache(4, 1, (left, 0), G, D)}
    times = {"dynamic": [], "window": []}
    rows, worst = [], 0.0
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in range(1, checkpoints[-1] + 1):
            x = torch.randn(1, 1, C, generator=generator)
            outputs = {}
            for name in ("dynamic", "window"):  # taking turns, step by step
                start = time.perf_counter()
                outputs[name] = step(stack, x, caches[name])
                times[name].append(time.perf_counter() - start)
            step(stack, x, caches["static"])
            worst = max(worst, float((outputs["window"] - outputs["dynamic"]).abs().max()))
            if t in checkpoints:
                recent = {name: statistics.median(seconds[-32:]) for name, seconds in times.items()}
                rows.append(dict(tokens=t, dynamic_bytes=caches["dynamic"].nbytes,
                                 static_bytes=caches["static"].nbytes, window_bytes=caches["window"].nbytes,
                                 max_abs_diff=worst, window_step_s=recent["window"],
                                 dynamic_step_s=recent["dynamic"],
                                 window_vs_dynamic_time=recent["window"] / recent["dynamic"]))
    return rows


def model_table(quick: bool) -> list[dict]:
    num_layers, G, D, window = (2, 2, 16, 64) if quick else (32, 8, 128, 4096)  # Mistral-7B v0.1
    cache = SlidingWindowCache(num_layers, 1, (window - 1, 0), G, D, dtype=torch.bfloat16)
    per_token = kv_bytes_per_token(num_layers, G, D, dtype=torch.bfloat16)
    return [dict(model="Mistral-7B v0.1 attention" if not quick else "tiny", tokens=n,
                 every_token_bytes=per_token * n, window_bytes=cache.nbytes,
                 saved=1 - cache.nbytes / (per_token * n)) for n in ([128, 1024] if quick else [8192, 32768])]


def print_tables(result: dict) -> None:
    print_table("1. Decoding through 4 layers with window (left, 0): what each cache holds (MiB)",
                ["tokens", "dynamic", "static", "window", "window / dynamic", "max |diff|", "step time window / dynamic"],
                [[str(r["tokens"]), f"{r['dynamic_bytes'] / MIB:.2f}", f"{r['static_bytes'] / MIB:.2f}",
                  f"{r['window_bytes'] / MIB:.2f}", f"{r['window_bytes'] / r['dynamic_bytes']:.3f}",
                  f"{r['max_abs_diff']:.1e}", f"{r['window_vs_dynamic_time']:.2f}"] for r in result["measured"]])
    print_table("2. One sequence at a real model's size (MiB): every token kept, against the window's",
                ["model", "tokens", "every token", "window cache", "saved"],
                [[r["model"], str(r["tokens"]), f"{r['every_token_bytes'] / MIB:.0f}",
                  f"{r['window_bytes'] / MIB:.0f}", f"{r['saved']:.1%}"] for r in result["model"]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = dict(device=device, threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version(), multihead=mh.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M"), quick=args.quick,
                  measured=measured_table(args.quick), model=model_table(args.quick))
    print_tables(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"window-cache-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
