"""Side-by-side timing on a shared machine, and the demo's check against torch.nn.MultiheadAttention.

On a shared CPU only ratios measured in one run mean anything: candidates
are timed in turns (A B C A B C ...) so that a slow spell hits every
candidate alike, and the median of the repeats is kept. `benchmarks/cpu.py`
builds its tables on `timeit_side_by_side`; `compare_with_torch` is the short
table that `multihead demo` prints.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ..core.checks import positive_int


def device_name() -> str:
    """The CPU model and core count, e.g. 'Intel(R) Xeon(R) Processor @ 2.80GHz x2'."""
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': how benchmark scripts name their result files."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def print_table(title: str, header: list[str], rows: list[list[str]], *, right: bool = False) -> None:
    """A plain-text table: the title, the header, a rule, then the rows; columns padded to fit."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    pad = str.rjust if right else str.ljust
    print(f"\n{title}")
    print("  ".join(pad(h, w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(pad(c, w) for c, w in zip(row, widths)))


def timeit_side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per candidate after one warm-up call each, timed in turns."""
    positive_int("repeats", repeats)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class ComparisonRow(NamedTuple):
    batch: int  # B
    length: int  # T
    need_weights: bool  # both sides also return per-head weights
    multihead_s: float  # median seconds of multihead.MultiHeadAttention
    torch_s: float  # median seconds of torch.nn.MultiheadAttention(batch_first=True)
    max_abs_diff: float  # largest |difference| between the two outputs (same weights)

    @property
    def speedup(self) -> float:
        """torch's time over ours: above 1 means multihead is faster."""
        return self.torch_s / self.multihead_s


def compare_with_torch(
    d_model: int, num_heads: int, shapes: Sequence[tuple[int, int, bool]], *, repeats: int = 7, seed: int = 0,
) -> list[ComparisonRow]:
    """multihead.MultiHeadAttention against torch.nn.MultiheadAttention holding the same weights.

    shapes: (B, T, need_weights) per row. Both modules run in eval mode under
    no_grad, batch-first, fp32, on the CPU; the outputs are compared too, so
    the table cannot time two different computations.
    """
    from ..nn.mha import MultiHeadAttention

    positive_int("repeats", repeats)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        theirs = torch.nn.MultiheadAttention(d_model, num_heads, batch_first=True).eval()
    ours = MultiHeadAttention(d_model, num_heads).eval()
    with torch.no_grad():
        q_w, k_w, v_w = theirs.in_proj_weight.chunk(3)  # (3C, C) -> 3 x (C, C)
        q_b, k_b, v_b = theirs.in_proj_bias.chunk(3)  # (3C,) -> 3 x (C,)
        for linear, w, b in ((ours.q_proj, q_w, q_b), (ours.k_proj, k_w, k_b), (ours.v_proj, v_w, v_b),
                             (ours.out_proj, theirs.out_proj.weight, theirs.out_proj.bias)):
            linear.weight.copy_(w)
            linear.bias.copy_(b)
    rows = []
    with torch.no_grad():
        for B, T, need_weights in shapes:
            x = torch.randn(B, T, d_model, generator=generator)  # (B, T, C)
            mine = ours(x, need_weights=need_weights)
            reference = theirs(x, x, x, need_weights=need_weights, average_attn_weights=False)
            diff = (mine.output - reference[0]).abs().max().item()
            if need_weights:
                diff = max(diff, (mine.weights - reference[1]).abs().max().item())
            t = timeit_side_by_side({
                "multihead": lambda: ours(x, need_weights=need_weights),
                "torch": lambda: theirs(x, x, x, need_weights=need_weights, average_attn_weights=False),
            }, repeats)
            rows.append(ComparisonRow(B, T, need_weights, t["multihead"], t["torch"], diff))
    return rows
