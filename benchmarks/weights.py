"""Weights on demand: what asking for weights costs beside the plain call, and the two ways to make them.

    python benchmarks/weights.py            # T in {1024, 4096}, a minute or two on 2 cores
    python benchmarks/weights.py --quick    # tiny sizes, to check the script itself

B=1, H=8, D=64, fp32, causal, no grad, every candidate timed in turns in one run
(median of several repeats). Per T, the time of each candidate divided by the
plain call's (`multihead.attention`, backend "auto"):

- one row: the output and the weights of one head's last query row
  - "weights apart" (what multihead does): attention() on the fastest kernel,
    then attention_weights(heads=[0], rows=[-1]), one (1, S) row of scores;
  - "read off the lse" (the earlier design): attention(return_lse=True) on the
    fastest kernel that gives one, then exp(s - lse) for the same row;
- every weight: the output and all (B, H, T, S) weights
  - "one pass": the module's eager pass (ops.run with need_weights, backend "auto");
  - "weights apart": attention() on the fastest kernel, then attention_weights() of every row;
  - "read off the lse": attention(return_lse=True), then exp(s - lse) of every row.

Writes benchmarks/results/weights-<device>.json with the device, the versions and the raw times.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import multihead as mh
from multihead.backends.reference import repeat_kv
from multihead.core.call import make_call
from multihead.ops.run import run
from multihead.tools.timing import device_name, print_table, slug, timeit_side_by_side

ROOT = Path(__file__).resolve().parents[1]


def read_off_lse(q, k, lse, rows: slice) -> torch.Tensor:
    """The earlier design's weights: exp(scale·q·kᵀ - lse) for the rows, causal (bottom-right), all heads."""
    T, S = q.shape[2], k.shape[2]
    scores = (q[:, :, rows] * q.shape[-1] ** -0.5) @ repeat_kv(k, q.shape[1]).transpose(-2, -1)  # (B, H, t, S)
    positions = torch.arange(T)[rows][:, None] + (S - T)  # (t, 1) each row's place among the keys
    scores = scores.masked_fill(torch.arange(S)[None, :] > positions, float("-inf"))
    return (scores - lse[:, :, rows, None]).exp()  # (B, H, t, S)


def candidates(q, k, v) -> dict[str, dict[str, callable]]:
    """The candidates of each table: name -> a function that makes the output and the weights."""
    def one_row_apart():
        return mh.attention(q, k, v, causal=True), mh.attention_weights(q, k, v, causal=True, heads=[0], rows=[-1])

    def one_row_lse():
        out, lse = mh.attention(q, k, v, causal=True, return_lse=True)
        return out, read_off_lse(q[:, :1], k[:, :1], lse[:, :1], slice(-1, None))

    def every_lse():
        out, lse = mh.attention(q, k, v, causal=True, return_lse=True)
        return out, read_off_lse(q, k, lse, slice(None))

    plain = {"plain attention": lambda: mh.attention(q, k, v, causal=True)}
    return {
        "one row": {**plain, "weights apart": one_row_apart, "read off the lse": one_row_lse},
        "every weight": {**plain,
                         "one pass": lambda: run(make_call(q, k, v, causal=True), need_weights=True),
                         "weights apart": lambda: (mh.attention(q, k, v, causal=True),
                                                   mh.attention_weights(q, k, v, causal=True)),
                         "read off the lse": every_lse},
    }


def measure(lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for T in lengths:
        gen = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(1, 8, T, 64, generator=gen) for _ in range(3))
        with torch.no_grad():
            for table, fns in candidates(q, k, v).items():
                times = timeit_side_by_side(fns, repeats)
                base = times["plain attention"]
                rows += [dict(T=T, asked=table, candidate=name, seconds=s, vs_plain=s / base)
                         for name, s in times.items()]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = measure([64, 128] if args.quick else [1024, 4096], 2 if args.quick else 7)
    print_table("Weights on demand (fp32, B=1, H=8, D=64, causal; time / plain attention's)",
                ["T", "weights asked", "candidate", "ms", "x plain"],
                [[str(r["T"]), r["asked"], r["candidate"], f"{r['seconds'] * 1e3:.1f}", f"{r['vs_plain']:.2f}"]
                 for r in rows])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"weights-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(device=device, threads=torch.get_num_threads(), torch=torch.__version__,
                                    python=platform.python_version(), multihead=mh.__version__,
                                    date=time.strftime("%Y-%m-%d"), rows=rows), indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
