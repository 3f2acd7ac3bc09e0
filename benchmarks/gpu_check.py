"""One short GPU run that decides: ceilings, every backend on CUDA against float64, speed, decode.

    python benchmarks/gpu_check.py --budget 300 --out DIR       # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run [--budget S]       # the plan and each phase's budget, anywhere
    python benchmarks/gpu_check.py --cpu-check --out DIR        # every phase in triton's interpreter, tiny sizes
    python benchmarks/gpu_check.py --probe                      # is there anything to run here? (make gpu-check)

`make gpu-check` runs the GPU tests and then this script; see the Makefile.

Phases, each skipped when the budget left is below half its estimate, each stopping at its own
deadline (the budget less what the later phases need), each row written to
DIR/gpu-check-<device>.json as soon as it is measured (so a run cut short still leaves its data)
and printed to stderr as progress:

1. ceilings: device copy bandwidth (GB/s) and a bf16 8192^3 matmul (TFLOP/s);
2. correctness: first a smoke test of the triton kernels (forward, backward, the decode path; the
   phase stops there if it fails), then `multihead.attention` on every backend that supports the
   call (triton, sdpa, chunked; reference as a yardstick) against the float64 reference on the GPU,
   under the project's rule (error at most 2x the naive same-dtype reference's error + 1e-5,
   gradients 3x), forward and backward, bf16 with an fp16 and an fp32 case, the decode kernel at
   T in {1, 3, 16}; the logsumexp against float64 and the weights; NaN propagation through
   the compiled kernels; bitwise determinism; the int32 probe (a strided q of T = 262,208 rows,
   H·D = 8192: the last rows sit past 2^31 elements); every kept tile at D = 128, causal, T = S = 1040;
3. speed: forward and forward+backward, bf16, B·T = 16k tokens, H·D = 2048,
   T in {1k, 4k, 16k}, D = 128, causal or not: triton, SDPA flash, SDPA cuDNN
   (`triton.testing.do_bench` medians, TFLOP/s as flash-attention counts them), triton's tile;
4. decode: a few queries against a long cache: triton's split-KV kernel and SDPA, eager and
   replayed from a CUDA graph, `multihead.attention` with a key-padding mask (host cost included),
   GB/s of K and V read against the measured copy bandwidth; the graph replayed with new inputs
   and new lengths must match an eager call;
5. overhead: per-call host cost against torch, and graph breaks under torch.compile.

Last, the summary: every phase as a Markdown table (speed as a fraction of the measured matmul,
decode of the measured copy bandwidth), the targets of issue 13 (met, missed, not measured),
printed to stdout and written to DIR/gpu-check-<device>.md. Exit status: 0, or 1 when a
correctness row breaks the rule, a check fails (smoke, lse, NaN, determinism, int32 probe, tiles,
graph replay) or a phase crashed; 124 when stopped by SIGTERM (the summary of what was measured
is still written); 2 without CUDA.

--cpu-check runs the same phase functions on the CPU under TRITON_INTERPRET=1, fp32, at tiny
sizes, timing with a wall clock and "replaying" graphs by calling again: the numbers mean
nothing, the point is that every line of the script runs before the first GPU run does
(tests/test_gpu_check.py runs it).

Set MULTIHEAD_TRITON_CONFIGS=few to keep the autotuners to one tile each.
The module level and --probe run on any python3 >= 3.9 without torch (the
Makefile calls them with the machine's own python3).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

RESULTS = Path(__file__).resolve().parent / "results"
NO_CUDA = "gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to run"
PROBE_NOTHING_TO_RUN = 3  # --probe's exit status when there is no CUDA: make gpu-check then exits 0
CORRECTNESS = [  # (B, H, G, T, S, D, causal, mask, dtype): mask in None, "padding" (key lengths [S, 2S/3, 0, 1]),
    # "holes" (a key-padding mask with holes), "bool" (a dense mask)
    (1, 8, 2, 1025, 1025, 128, True, None, "bf16"), (2, 4, 4, 113, 777, 64, False, None, "bf16"),
    (1, 4, 4, 777, 113, 64, True, None, "bf16"), (1, 4, 1, 1, 4099, 128, True, None, "bf16"),
    (2, 4, 4, 333, 333, 40, False, None, "bf16"), (1, 4, 2, 513, 700, 96, True, None, "bf16"),
    (1, 2, 2, 257, 1029, 256, True, None, "bf16"), (3, 8, 2, 700, 1500, 64, True, "padding", "bf16"),
    (2, 4, 2, 257, 300, 64, False, "bool", "bf16"), (1, 16, 16, 4096, 4096, 128, True, None, "bf16"),
    (2, 8, 2, 300, 700, 64, True, "padding", "fp16"), (1, 4, 2, 200, 300, 64, True, None, "fp32"),
    # the split-KV decode kernel: T in {1, 3, 16}, GQA ratios 4 and 8, cache lengths 0 and 1
    (4, 32, 8, 1, 4096, 128, True, "padding", "bf16"), (4, 32, 4, 3, 5000, 128, True, "padding", "bf16"),
    (2, 16, 2, 16, 2048, 96, True, "holes", "bf16"), (1, 8, 1, 16, 32768, 64, False, None, "bf16"),
]
SPEED_LENGTHS = [1024, 4096, 16384]
DECODE = [  # (B, H, G, T, S, D): the playbook's decode shapes, and a speculative chunk of 4
    (1, 32, 8, 1, 4096, 128), (1, 32, 8, 1, 32768, 128), (16, 32, 8, 1, 4096, 128), (1, 32, 32, 1, 32768, 128),
    (1, 32, 8, 4, 32768, 128),
]
OVERHEAD_LENGTHS = [1, 14, 128, 1024, 4096]  # MultiHeadAttention vs torch.nn.MultiheadAttention, B=1, C=512, H=8
ESTIMATES = {"ceilings": 10, "correctness": 80, "speed": 30, "decode": 20, "overhead": 15}  # seconds, rough
PROBE = (1, 64, 262_208, 128, 128)  # (B, H, T, D, S): q (B, T, H, D) seen as (B, H, T, D); row T-1 at 2.1e9 > 2^31
TILE_CASE = (1, 8, 2, 1040, 1040, 128)  # (B, H, G, T, S, D), causal: every kept tile at D = 128
TARGETS = [  # issue 13, item 4: what the first GPU run reads
    "forward T=16k D=128 >= 0.9x SDPA's best backend, non-causal and causal",
    "decode S=32k >= 85% of the measured copy bandwidth",
    "every correctness row within the 2x (output) / 3x (gradient) rule",
]


class Setup(NamedTuple):
    """Where the phases run: the GPU for real, or the CPU under triton's interpreter (--cpu-check)."""

    device: str  # "cuda", or "cpu" under the interpreter
    tiny: bool  # the interpreter's sizes: the logic runs, the numbers mean nothing
    dtypes: dict  # the names in CORRECTNESS -> the dtype to run (everything fp32 in the interpreter)

    def dtype(self, name: str = "bf16"):
        import torch

        return getattr(torch, self.dtypes[name])


GPU = Setup("cuda", False, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"})
CPU = Setup("cpu", True, {"bf16": "float32", "fp16": "float32", "fp32": "float32"})
TINY = {  # the interpreter's stand-ins for the sizes above: same phases, same code, seconds in all
    "correctness": [(2, 4, 2, 17, 40, 16, True, "padding", "bf16"), (1, 4, 1, 3, 80, 16, True, "padding", "bf16"),
                    (2, 2, 2, 9, 5, 16, True, None, "fp32"), (2, 4, 2, 5, 70, 24, False, "holes", "bf16")],
    "speed": [32], "decode": [(2, 4, 2, 1, 96, 16), (1, 4, 1, 3, 80, 16)], "overhead": [1, 14],
    "probe": (1, 2, 300, 16, 16), "tile_case": (1, 2, 1, 40, 40, 16), "matmul": 64, "copy": 2**20,
}


class Recorder:
    """Rows by phase, written to DIR/gpu-check-<device>.json after every row and printed to stderr."""

    def __init__(self, out: Path | None, device: str = "unknown device") -> None:
        self.data: dict = {"device": device, "phases": {}}
        self.path = None if out is None else out / f"gpu-check-{slug(device)}.json"

    def add(self, phase: str, row: dict) -> None:
        self.data["phases"].setdefault(phase, []).append(row)
        print(f"[{phase}] " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()), file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=1))

    def write_summary(self, text: str) -> Path | None:
        """The Markdown summary beside the JSON: DIR/gpu-check-<device>.md."""
        if self.path is None:
            return None
        path = self.path.with_suffix(".md")
        path.write_text(text)
        return path


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200', as the other benchmark scripts name their files."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def deadlines(budget: float) -> dict:
    """Each phase's deadline, in seconds from the start: the budget less half the estimates of the later phases."""
    names = list(ESTIMATES)
    return {name: budget - sum(ESTIMATES[later] for later in names[i + 1:]) / 2 for i, name in enumerate(names)}


def plan(budget: float = 300.0) -> str:
    lines = ["phases: " + ", ".join(f"{k} (~{v} s)" for k, v in ESTIMATES.items())]
    lines += [f"budget: {name} ~{ESTIMATES[name]} s, starts with >= {ESTIMATES[name] / 2:g} s left, "
              f"stops by +{end:.0f} s of {budget:g}" for name, end in deadlines(budget).items()]
    lines += ["smoke: triton forward+backward (B,H,G,T,S,D) = (1,2,2,64,64,64) and the decode path (1,4,1,1,256,64); "
              "correctness stops here on a failure"]
    lines += [f"correctness: B,H,G,T,S,D,causal,mask,dtype = {case}" for case in CORRECTNESS]
    lines += ["checks: lse and weights (2,8,2,300,700,64) causal, padding; NaN in a value, a key, a decode step; "
              "determinism (2,8,2,2048,2048,128) causal fwd+bwd and a decode step, 3 runs bitwise; "
              f"int32 probe B,H,T,D,S = {PROBE} (last 64 rows, forward and dq); "
              f"tiles: every kept forward/dkdv/dq tile at B,H,G,T,S,D = {TILE_CASE} causal"]
    lines += [f"speed: T={T}, B={16384 // T}, H=16, D=128, causal in (False, True)" for T in SPEED_LENGTHS]
    lines += [f"decode: B,H,G,T,S,D = {case}: triton split-KV and SDPA, eager and CUDA-graph replay; "
              f"multihead.attention with a mask" for case in DECODE]
    lines += [f"overhead: module T={T}, C=512, H=8 against torch.nn.MultiheadAttention" for T in OVERHEAD_LENGTHS]
    lines += [f"target: {target}" for target in TARGETS]
    lines += ["writes: OUT/gpu-check-<device>.json (every row as measured) and OUT/gpu-check-<device>.md (summary)"]
    return "\n".join(lines)


# ---- helpers the phases share


def bench(setup: Setup) -> Callable:
    """ms per call: triton.testing.do_bench on the GPU; in the interpreter a wall-clock median of 3."""
    if setup.device == "cuda":
        from triton.testing import do_bench

        return do_bench

    def wall(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return wall


def capture(fn, setup: Setup) -> Callable:
    """fn recorded into a CUDA graph (after a warm-up on a side stream): returns replay. In the
    interpreter there is no graph: the "replay" calls fn again, so the rest of the logic still runs."""
    import torch

    if setup.device != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles and autotunes outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _inputs(B, H, G, T, S, D, dtype, seed, device="cuda"):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device, dtype=torch.float64).to(dtype)
            for shape in ((B, H, T, D), (B, G, S, D), (B, G, S, D))]


def _lengths(B, S, device="cuda"):
    import torch

    return torch.tensor([S, S * 2 // 3, 0, 1][:B], device=device)


def _mask(kind, B, H, T, S, device="cuda"):
    import torch

    import multihead as mh

    if kind == "padding":
        return mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(_lengths(B, S, device), S))
    gen = torch.Generator(device=device).manual_seed(5)
    if kind == "holes":
        return torch.rand(B, 1, 1, S, generator=gen, device=device) > 0.3
    if kind == "bool":
        return torch.rand(B, 1, T, S, generator=gen, device=device) > 0.3
    return None


def _errors(run, q, k, v, call):
    """(out error, naive out error, max grad error / naive) against float64, as the project's rule reads them."""
    import torch

    from multihead.backends.reference import attention_ref

    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gold_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    naive_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = run(*xs)
    gold = attention_ref(*gold_in, **call).out
    naive = attention_ref(*naive_in, upcast=False, **call).out
    err = (out.double() - gold).abs().max().item()
    naive_err = (naive.double() - gold).abs().max().item()
    grad = torch.randn_like(gold)
    g = torch.autograd.grad(out, xs, grad.to(out.dtype))
    gg = torch.autograd.grad(gold, gold_in, grad)
    gn = torch.autograd.grad(naive, naive_in, grad.to(naive.dtype))
    worst = max(((a.double() - b).abs().max().item() - 1e-5) / max((c.double() - b).abs().max().item(), 1e-12)
                for a, b, c in zip(g, gg, gn))
    return err, naive_err, worst


def _error_row(exc: Exception, **row) -> dict:
    return dict(row, error=f"{type(exc).__name__}: {exc}"[:300], ok=False)


# ---- phases


def ceilings(rec: Recorder, setup: Setup = GPU) -> None:
    import torch

    n = TINY["copy"] if setup.tiny else 2**30  # 1 GiB on the GPU
    src = torch.empty(n, dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    ms = bench(setup)(lambda: dst.copy_(src))
    rec.add("ceilings", {"what": "copy", "GB/s": 2 * src.numel() / ms / 1e6})
    m = TINY["matmul"] if setup.tiny else 8192
    a = torch.randn(m, m, dtype=setup.dtype(), device=setup.device)
    ms = bench(setup)(lambda: a @ a)
    rec.add("ceilings", {"what": f"bf16 matmul {m}^3", "TFLOP/s": 2 * m**3 / ms / 1e9})


def correctness(rec: Recorder, deadline: float, setup: Setup = GPU) -> None:
    if not smoke(rec, setup):
        rec.add("correctness", {"skipped": "the smoke test failed"})
        return
    for case in TINY["correctness"] if setup.tiny else CORRECTNESS:
        if time.monotonic() > deadline:
            rec.add("correctness", {"skipped": "budget"})
            return
        _correctness_case(rec, case, setup)
    for check in (_lse_and_weights, _nan_propagates, _deterministic, _int32_probe, _every_tile):
        if time.monotonic() > deadline:
            rec.add("correctness", {"skipped": f"budget, before {check.__name__.strip('_')}"})
            return
        check(rec, setup)


def smoke(rec: Recorder, setup: Setup) -> bool:
    """One small triton call on each path, forward and backward: False (and a row saying why) if it fails."""
    import torch

    from multihead.backends.triton import triton_attention

    ok = True
    for name, (B, H, G, T, S, D) in (("forward", (1, 2, 2, 64, 64, 64)), ("decode", (1, 4, 1, 1, 256, 64))):
        q, k, v = (x.requires_grad_() for x in _inputs(B, H, G, T, S, D, setup.dtype(), 0, setup.device))
        try:
            out, lse = triton_attention(q, k, v, causal=True)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
            rec.add("smoke", {"path": name, "finite": finite, "ok": finite})
            ok = ok and finite
        except Exception as exc:  # the kernels cannot run here: say so once, do not try every case
            rec.add("smoke", _error_row(exc, path=name))
            ok = False
    return ok


def _correctness_case(rec: Recorder, case, setup: Setup) -> None:
    import multihead as mh

    B, H, G, T, S, D, causal, kind, dtype = case
    q, k, v = _inputs(B, H, G, T, S, D, setup.dtype(dtype), seed=T + S + D, device=setup.device)
    call = dict(causal=causal, attn_mask=_mask(kind, B, H, T, S, setup.device))
    report = mh.which_backend(q, k, v, **call)
    for name, reason in report.reasons.items():
        if reason is not None or name == "reference":
            continue
        label = {"case": ",".join(str(x) for x in case), "backend": name}
        try:
            err, naive, grad_ratio = _errors(lambda a, b, c: mh.attention(a, b, c, backend=name, **call), q, k, v,
                                             call)
            ok = err <= 2 * naive + 1e-5 and grad_ratio <= 3
            rec.add("correctness", dict(label, err=err, naive=naive, **{"grad/naive": grad_ratio}, ok=ok))
        except Exception as exc:  # record and go on: one failure must not hide the rest
            rec.add("correctness", _error_row(exc, **label))


def _lse_and_weights(rec: Recorder, setup: Setup) -> None:
    import torch

    import multihead as mh
    from multihead.backends.reference import attention_ref

    B, H, G, T, S, D = (2, 4, 2, 30, 70, 16) if setup.tiny else (2, 8, 2, 300, 700, 64)
    q, k, v = _inputs(B, H, G, T, S, D, setup.dtype(), seed=3, device=setup.device)
    mask = _mask("padding", B, H, T, S, setup.device)
    gold = mh.attention(q.double(), k.double(), v.double(), attn_mask=mask, causal=True, backend="reference",
                        return_lse=True).lse
    probs = attention_ref(q.double(), k.double(), v.double(), attn_mask=mask, causal=True).probs
    w = mh.attention_weights(q, k, v, attn_mask=mask, causal=True)  # its own pass, the same for every backend
    for name in ("triton", "chunked"):
        try:
            out, lse = mh.attention(q, k, v, attn_mask=mask, causal=True, backend=name, return_lse=True)
            finite = torch.isfinite(gold)
            same_empty = bool(torch.equal(torch.isfinite(lse), finite))
            rec.add("lse", {"backend": name, "lse_err": (lse[finite].double() - gold[finite]).abs().max().item(),
                            "empty_rows_agree": same_empty, "weights_err": (w.double() - probs).abs().max().item()})
        except Exception as exc:
            rec.add("lse", {"backend": name, "error": f"{type(exc).__name__}: {exc}"[:300]})


def _nan_propagates(rec: Recorder, setup: Setup) -> None:
    """A NaN in an attended value or key reaches exactly the rows that see it, through the compiled
    kernels (tl.max drops NaN compiled, unlike the interpreter): the forward and the decode path."""
    import torch

    import multihead as mh

    for where, (T, S), at in (("value", (64, 64), 10), ("key", (64, 64), 10), ("decode value", (1, 256), 100)):
        q, k, v = _inputs(1, 2, 2, T, S, 64 if not setup.tiny else 16, setup.dtype(), seed=9, device=setup.device)
        (k if where == "key" else v)[0, 0, at, 3] = float("nan")
        try:
            out = mh.attention(q, k, v, causal=True, backend="triton")
            first = at - (S - T)  # the first query that sees key `at` (bottom-right causal)
            before = bool(torch.isfinite(out[0, 0, :max(first, 0)]).all())
            after = bool(torch.isnan(out[0, 0, max(first, 0):]).any(dim=-1).all())
            other_head = bool(torch.isfinite(out[0, 1]).all())
            # rows before it may see a NaN value as 0 · NaN (docs/design.md); a NaN key they never see
            ok = after and other_head and (before or where != "key")
            rec.add("nan", {"where": where, "rows_before_finite": before, "rows_after_nan": after,
                            "other_head_finite": other_head, "ok": ok})
        except Exception as exc:
            rec.add("nan", _error_row(exc, where=where))


def _deterministic(rec: Recorder, setup: Setup) -> None:
    """Three runs bitwise equal: the forward and backward (no atomics) and a decode step (fixed split)."""
    import torch

    from multihead.backends.triton import triton_attention

    shapes = {"fwd+bwd": (2, 8, 2, 2048, 2048, 128), "decode": (1, 32, 8, 1, 32768, 128)}
    if setup.tiny:
        shapes = {"fwd+bwd": (1, 2, 1, 40, 40, 16), "decode": (1, 4, 1, 1, 90, 16)}
    for name, (B, H, G, T, S, D) in shapes.items():
        q, k, v = (x.requires_grad_() for x in _inputs(B, H, G, T, S, D, setup.dtype(), 1, setup.device))
        grad = torch.randn(B, H, T, D, device=setup.device, dtype=q.dtype)
        try:
            runs = []
            for _ in range(3):
                out = triton_attention(q, k, v, causal=True).out
                runs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
            same = all(torch.equal(a, b) for again in runs[1:] for a, b in zip(runs[0], again))
            rec.add("determinism", {"what": name, "bitwise_equal": same, "ok": same})
        except Exception as exc:
            rec.add("determinism", _error_row(exc, what=name))


def _int32_probe(rec: Recorder, setup: Setup) -> None:
    """q (B, T, H, D) seen as (B, H, T, D): stride_qt = H·D, so row T-1 starts past 2^31 elements. The last
    rows' output and dq against float64 (non-causal: each row depends on its own q row alone)."""
    import torch

    from multihead.backends.reference import attention_ref
    from multihead.backends.triton import triton_attention

    B, H, T, D, S = TINY["probe"] if setup.tiny else PROBE
    last = 64 if not setup.tiny else 8
    try:
        gen = torch.Generator(device=setup.device).manual_seed(7)
        q = torch.randn(B, T, H, D, generator=gen, device=setup.device, dtype=setup.dtype()).transpose(1, 2)
        k, v = (torch.randn(B, H, S, D, generator=gen, device=setup.device, dtype=setup.dtype()) for _ in range(2))
        q.requires_grad_()
        out = triton_attention(q, k, v).out  # (B, T, H, D) -> (B, H, T, D) view: strides, no copy
        grad = torch.randn_like(out)
        (dq,) = torch.autograd.grad(out, (q,), grad)
        g_tail = grad[:, :, -last:]
        gold_q = q[:, :, -last:].detach().double().requires_grad_()
        gold = attention_ref(gold_q, k.double(), v.double()).out
        (gold_dq,) = torch.autograd.grad(gold, (gold_q,), g_tail.double())
        naive_q = q[:, :, -last:].detach().clone().requires_grad_()
        naive = attention_ref(naive_q, k, v, upcast=False).out
        (naive_dq,) = torch.autograd.grad(naive, (naive_q,), g_tail)
        err = (out[:, :, -last:].double() - gold).abs().max().item()
        naive_err = (naive.double() - gold).abs().max().item()
        dq_err = (dq[:, :, -last:].double() - gold_dq).abs().max().item()
        naive_dq_err = (naive_dq.double() - gold_dq).abs().max().item()
        ok = err <= 2 * naive_err + 1e-5 and dq_err <= 3 * naive_dq_err + 1e-5
        rec.add("probe", {"T": T, "stride_qt": q.stride(2), "last_row_offset": (T - 1) * q.stride(2), "err": err,
                          "naive": naive_err, "dq_err": dq_err, "naive_dq": naive_dq_err, "ok": ok})
    except Exception as exc:
        rec.add("probe", _error_row(exc, T=T))


@contextlib.contextmanager
def _only_tiles(tiles: dict, width: int):
    """configs.TILES narrowed to one tile per kernel at this width, the autotuners' memory cleared."""
    from multihead.backends.triton import configs, kernel_modules

    saved = {kernel: list(configs.TILES[kernel][width]) for kernel in tiles}
    kernels = kernel_modules()
    tuners = (kernels.forward._fwd_launch, kernels.backward._dkdv_launch, kernels.backward._dq_launch)
    try:
        for kernel, tile in tiles.items():
            configs.TILES[kernel][width] = [tile]
        for tuner in tuners:
            getattr(tuner, "cache", {}).clear()
        yield
    finally:
        for kernel, kept in saved.items():
            configs.TILES[kernel][width] = kept
        for tuner in tuners:
            getattr(tuner, "cache", {}).clear()


def _every_tile(rec: Recorder, setup: Setup) -> None:
    """Each kept tile of forward, dkdv and dq at D = 128 runs and passes the rule (the GPU normally
    autotunes among them, or takes the first with MULTIHEAD_TRITON_CONFIGS=few)."""
    from multihead.backends.triton import configs, triton_attention

    B, H, G, T, S, D = TINY["tile_case"] if setup.tiny else TILE_CASE
    q, k, v = _inputs(B, H, G, T, S, D, setup.dtype(), seed=11, device=setup.device)
    kernels = ("forward", "dkdv", "dq")
    for i in range(max(len(configs.TILES[kernel][128]) for kernel in kernels)):
        tiles = {kernel: configs.TILES[kernel][128][i % len(configs.TILES[kernel][128])] for kernel in kernels}
        label = {"forward": str(tiles["forward"]), "dkdv": str(tiles["dkdv"]), "dq": str(tiles["dq"])}
        block_m, block_n = tiles["forward"][:2]  # the interpreter takes the tile from the call

        def run(a, b, c):
            return triton_attention(a, b, c, causal=True, block_m=block_m, block_n=block_n, decode=False).out

        try:
            with _only_tiles(tiles, 128):
                err, naive, grad_ratio = _errors(run, q, k, v, dict(causal=True))
            ok = err <= 2 * naive + 1e-5 and grad_ratio <= 3
            rec.add("tiles", dict(label, err=err, naive=naive, **{"grad/naive": grad_ratio}, ok=ok))
        except Exception as exc:
            rec.add("tiles", _error_row(exc, **label))


def _candidates(q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from multihead.backends.triton import triton_attention

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    return {"triton": lambda: triton_attention(q, k, v, causal=causal).out,
            "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def _best_tile() -> str | None:
    """The tile triton's forward autotuner picked last (None in the interpreter)."""
    from multihead.backends.triton import kernel_modules

    best = getattr(kernel_modules().forward._fwd_launch, "best_config", None)
    return None if best is None else f"{best.kwargs.get('BLOCK_M')}x{best.kwargs.get('BLOCK_N')} " \
                                     f"{best.num_warps}w {best.num_stages}s"


def speed(rec: Recorder, deadline: float, setup: Setup = GPU) -> None:
    import torch

    measure = bench(setup)
    tokens, H, D = (64, 2, 16) if setup.tiny else (16384, 16, 128)
    for T in TINY["speed"] if setup.tiny else SPEED_LENGTHS:
        for causal in (False, True):
            B = tokens // T
            q, k, v = (x.requires_grad_() for x in _inputs(B, H, H, T, T, D, setup.dtype(), T, setup.device))
            flops = 4.0 * B * H * T * T * D / (2 if causal else 1)
            grad = torch.randn_like(q)
            for name, fn in _candidates(q, k, v, causal).items():
                if time.monotonic() > deadline:
                    rec.add("speed", {"skipped": "budget"})
                    return
                try:
                    fwd = measure(fn)
                    both = measure(lambda: torch.autograd.grad(fn(), (q, k, v), grad))
                    row = {"T": T, "causal": causal, "candidate": name, "fwd_ms": fwd,
                           "fwd_TFLOP/s": flops / fwd / 1e9, "fwd+bwd_ms": both,
                           "fwd+bwd_TFLOP/s": 3.5 * flops / both / 1e9}
                    if name == "triton" and setup.device == "cuda":
                        row["tile"] = _best_tile()
                    rec.add("speed", row)
                except Exception as exc:
                    rec.add("speed", {"T": T, "causal": causal, "candidate": name,
                                      "error": f"{type(exc).__name__}: {exc}"[:200]})


def _decode_runs(q, k, v, lengths, mask):
    """The decode candidates, each a no-argument call on fixed tensors (so a graph can record it)."""
    import torch.nn.functional as F

    import multihead as mh
    from multihead.backends.triton import triton_attention

    T, S = q.shape[2], k.shape[2]
    causal_mask = mh.masks.causal_mask(T, S, q.device)  # (T, S): SDPA's is_causal is top-left aligned
    return {"triton split-KV": lambda: triton_attention(q, k, v, causal=True, key_lengths=lengths).out,
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=None if T == 1 else causal_mask,
                                                           enable_gqa=True),
            "multihead triton, mask": lambda: mh.attention(q, k, v, attn_mask=mask, causal=True, backend="triton"),
            "multihead auto": lambda: mh.attention(q, k, v, causal=True)}


def decode(rec: Recorder, deadline: float, setup: Setup = GPU) -> None:
    """GB/s of K and V read, eager and from a CUDA graph; the graph replayed on new inputs must match eager."""
    import torch

    import multihead as mh

    measure = bench(setup)
    for B, H, G, T, S, D in TINY["decode"] if setup.tiny else DECODE:
        if time.monotonic() > deadline:
            rec.add("decode", {"skipped": "budget"})
            return
        q, k, v = _inputs(B, H, G, T, S, D, setup.dtype(), seed=S, device=setup.device)
        lengths = torch.full((B,), S, dtype=torch.int32, device=setup.device)
        mask = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(lengths, S))
        read = 2 * B * G * S * D * q.element_size()  # K and V, bytes
        for name, fn in _decode_runs(q, k, v, lengths, mask).items():
            graphed = name in ("triton split-KV", "sdpa")
            try:
                ms = measure(fn)
                rec.add("decode", {"B": B, "H": H, "G": G, "T": T, "S": S, "candidate": name, "us": ms * 1e3,
                                   "GB/s": read / ms / 1e6})
                if graphed:
                    replay = capture(fn, setup)
                    ms = measure(replay)
                    rec.add("decode", {"B": B, "H": H, "G": G, "T": T, "S": S, "candidate": name + " (graph)",
                                       "us": ms * 1e3, "GB/s": read / ms / 1e6})
            except Exception as exc:
                rec.add("decode", {"B": B, "H": H, "G": G, "T": T, "S": S, "candidate": name,
                                   "error": f"{type(exc).__name__}: {exc}"[:200]})
        _graph_replays_new_inputs(rec, (B, H, G, T, S, D), setup)


def _graph_replays_new_inputs(rec: Recorder, shape, setup: Setup) -> None:
    """Record the split-KV step once; write new q, K, V and cache lengths into its tensors; replay: the
    output must be bitwise an eager call's (the lengths stay on the device, nothing baked in)."""
    import torch

    from multihead.backends.triton import triton_attention

    B, H, G, T, S, D = shape
    q, k, v = _inputs(B, H, G, T, S, D, setup.dtype(), seed=1, device=setup.device)
    lengths = torch.full((B,), S, dtype=torch.int32, device=setup.device)
    out = {}

    def step():
        out["graph"] = triton_attention(q, k, v, causal=True, key_lengths=lengths).out

    try:
        replay = capture(step, setup)
        fresh = _inputs(B, H, G, T, S, D, setup.dtype(), seed=2, device=setup.device)
        for static, new in zip((q, k, v), fresh):
            static.copy_(new)
        lengths.copy_(torch.tensor([S // 2, 1, 0, S][:B] if B > 1 else [S // 3], device=setup.device))
        replay()
        eager = triton_attention(q, k, v, causal=True, key_lengths=lengths).out
        same = bool(torch.equal(out["graph"], eager))
        rec.add("graph", {"B": B, "H": H, "G": G, "T": T, "S": S, "replay_equals_eager": same, "ok": same})
    except Exception as exc:
        rec.add("graph", _error_row(exc, B=B, H=H, G=G, T=T, S=S))


def _wall_us(fn, calls: int = 200, device: str = "cuda") -> float:
    """Median wall-clock microseconds per call over 5 runs of `calls` calls: host work included."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def overhead(rec: Recorder, deadline: float, setup: Setup = GPU) -> None:
    """Per-call cost with the host included: attention() vs raw SDPA, the module vs torch's,
    graph breaks under torch.compile (a host sync shows up as one)."""
    import torch
    import torch.nn.functional as F

    import multihead as mh

    dev, calls = setup.device, (3 if setup.tiny else 200)
    for T, S in ((1, 512), (128, 128)):
        q = torch.randn(1, 8, T, 64, device=dev)
        k, v = (torch.randn(1, 8, S, 64, device=dev) for _ in range(2))
        rec.add("overhead", {"call": f"attention T={T} S={S} fp32",
                             "multihead_us": _wall_us(lambda: mh.attention(q, k, v), calls, dev),
                             "sdpa_us": _wall_us(lambda: F.scaled_dot_product_attention(q, k, v), calls, dev)})
    ours = mh.MultiHeadAttention(512, 8).to(dev).eval()
    theirs = torch.nn.MultiheadAttention(512, 8, batch_first=True).to(dev).eval()
    with torch.no_grad():
        for T in TINY["overhead"] if setup.tiny else OVERHEAD_LENGTHS:
            if time.monotonic() > deadline:
                rec.add("overhead", {"skipped": "budget"})
                return
            x = torch.randn(1, T, 512, device=dev)
            rec.add("overhead", {"call": f"module T={T} fp32", "multihead_us": _wall_us(lambda: ours(x), calls, dev),
                                 "torch_us": _wall_us(lambda: theirs(x, x, x, need_weights=False), calls, dev)})
        x = torch.randn(2, 64, 512, device=dev)
        key_mask = torch.ones(2, 64, dtype=torch.bool, device=dev)
        key_mask[1, 40:] = False
        causal = mh.MultiHeadAttention(512, 8, causal=True).to(dev).eval()
        for name, module, kwargs in (("key_mask", ours, {"key_mask": key_mask}), ("causal", causal, {})):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(module)(x, **kwargs)
            rec.add("overhead", {"call": f"dynamo.explain module {name}", "graph_breaks": explained.graph_break_count,
                                 "reasons": [str(b.reason)[:120] for b in explained.break_reasons][:3]})


# ---- the summary: Markdown tables built from the recorded rows (no torch needed)

PHASE_ORDER = ["ceilings", "smoke", "correctness", "lse", "nan", "determinism", "probe", "tiles", "speed", "decode",
               "graph", "overhead", "timing"]
CHECKS = ("smoke", "nan", "determinism", "probe", "tiles", "graph")  # a row with ok False or an error fails the run
TITLES = {
    "ceilings": "Ceilings: copy bandwidth and a bf16 matmul, as measured here",
    "smoke": "Smoke: one small triton call per path, forward and backward",
    "correctness": "Correctness against float64 (ok: err <= 2 x naive + 1e-5 and grad/naive <= 3)",
    "lse": "Logsumexp against float64, and the weights (multihead.attention_weights)",
    "nan": "NaN in one value or key through the triton kernels (earlier rows may see a value as 0 · NaN)",
    "determinism": "Bitwise determinism over three runs",
    "probe": "The int32 probe: a strided q whose last rows sit past 2^31 elements (last rows vs float64)",
    "tiles": "Every kept tile at D = 128, causal, T = S = 1040, against float64",
    "speed": "Speed, bf16, B·T = 16k tokens, H = 16, D = 128 (% of the measured bf16 matmul)",
    "decode": "Decode step, T = 1: K and V read per second (% of the measured copy bandwidth)",
    "graph": "The split-KV step replayed from a CUDA graph on new inputs and lengths, against an eager call",
    "overhead": "Per-call overhead with the host included (µs), graph breaks under torch.compile",
    "timing": "Seconds per phase",
}


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list, columns: list | None = None) -> str:
    """Rows (dicts) as a Markdown table; columns in order of first appearance, numbers right-aligned."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   for row in rows if row.get(c) is not None) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _ceiling(phases: dict, key: str) -> float | None:
    for row in phases.get("ceilings", []):
        if isinstance(row.get(key), (int, float)) and row[key] > 0:
            return float(row[key])
    return None


def _with_fraction(row: dict, key: str, name: str, ceiling: float) -> dict:
    value = row.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return row
    return dict(row, **{name: 100 * value / ceiling})


def with_fractions(phases: dict) -> dict:
    """Speed rows gain % of the measured matmul TFLOP/s, decode rows % of the measured copy GB/s."""
    matmul, copy = _ceiling(phases, "TFLOP/s"), _ceiling(phases, "GB/s")
    out = dict(phases)
    if matmul is not None and "speed" in phases:
        out["speed"] = [_with_fraction(_with_fraction(row, "fwd_TFLOP/s", "fwd % of matmul", matmul),
                                       "fwd+bwd_TFLOP/s", "fwd+bwd % of matmul", matmul) for row in phases["speed"]]
    if copy is not None and "decode" in phases:
        out["decode"] = [_with_fraction(row, "GB/s", "% of copy", copy) for row in phases["decode"]]
    return out


def failures(data: dict) -> list:
    """What makes the run fail: a correctness row off the rule (or one that raised), a logsumexp
    check that failed, a phase that crashed. Budget skips and a speed candidate's error do not."""
    phases = data.get("phases", {})
    bad = [f"correctness {row.get('case')} on {row.get('backend')}: "
           + (row["error"] if "error" in row else f"err {_cell(row.get('err'))}, naive {_cell(row.get('naive'))}, "
              f"grad/naive {_cell(row.get('grad/naive'))}")
           for row in phases.get("correctness", []) if "skipped" not in row and row.get("ok") is not True]
    bad += [f"lse on {row.get('backend')}: " + (row.get("error") or "empty rows disagree with float64")
            for row in phases.get("lse", []) if "error" in row or row.get("empty_rows_agree") is False]
    bad += [f"{name}: " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items() if k != "ok")
            for name in CHECKS for row in phases.get(name, []) if row.get("ok") is False or "error" in row]
    bad += [f"phase {name} crashed: {row['phase_error']}"
            for name, rows in phases.items() for row in rows if "phase_error" in row]
    return bad


def _forward_target(phases: dict, causal: bool) -> str:
    rows = [r for r in phases.get("speed", []) if r.get("T") == 16384 and r.get("causal") is causal
            and isinstance(r.get("fwd_TFLOP/s"), (int, float))]
    ours = [r["fwd_TFLOP/s"] for r in rows if r.get("candidate") == "triton"]
    sdpa = [r["fwd_TFLOP/s"] for r in rows if str(r.get("candidate", "")).startswith("sdpa")]
    if not ours or not sdpa:
        return "not measured"
    ratio = ours[0] / max(sdpa)
    return f"{'met' if ratio >= 0.9 else 'missed'}: {ratio:.2f}x SDPA's best"


def _decode_target(phases: dict) -> str:
    copy = _ceiling(phases, "GB/s")
    best = {}
    for r in phases.get("decode", []):
        if r.get("S") == 32768 and r.get("T", 1) == 1 and str(r.get("candidate", "")).startswith("triton split-KV") \
                and isinstance(r.get("GB/s"), (int, float)):
            case = (r.get("B"), r.get("H"), r.get("G"))
            best[case] = max(best.get(case, 0.0), r["GB/s"])
    if copy is None or not best:
        return "not measured"
    worst = min(best.values()) / copy
    return f"{'met' if worst >= 0.85 else 'missed'}: {100 * worst:.0f}% of copy at worst"


def targets(data: dict) -> list:
    """Issue 13's targets (item 4) as read off this run: met, missed, or not measured."""
    phases = data.get("phases", {})
    rows = [r for r in phases.get("correctness", []) + phases.get("tiles", []) + phases.get("probe", [])
            if "skipped" not in r]
    correct = "not measured" if not rows else "met" if all(r.get("ok") is True for r in rows) else "missed"
    forward = f"non-causal {_forward_target(phases, False)}; causal {_forward_target(phases, True)}"
    return [f"{TARGETS[0]}: {forward}", f"{TARGETS[1]}: {_decode_target(phases)}", f"{TARGETS[2]}: {correct}"]


def summary(data: dict) -> str:
    """The whole run as Markdown: a verdict, then one table per phase."""
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    bad = failures(data)
    checked = [r for r in data.get("phases", {}).get("correctness", []) if "skipped" not in r]
    verdict = (f"**FAILED**: {len(bad)} problem(s)\n" + "\n".join(f"- {line}" for line in bad) if bad
               else f"**ok**: {len(checked)} correctness rows within the rule")
    lines = [f"# gpu-check: {data.get('device', 'unknown device')}", "", versions, "", verdict, "",
             "Targets (issue 13, item 4):"] + [f"- {line}" for line in targets(data)]
    phases = with_fractions(data.get("phases", {}))
    for name in PHASE_ORDER + sorted(set(phases) - set(PHASE_ORDER)):
        if phases.get(name):
            lines += ["", f"## {TITLES.get(name, name)}", "", markdown_table(phases[name])]
    return "\n".join(lines) + "\n"


# ---- running it


def probe() -> int:
    """For `make gpu-check`: 0 = CUDA, torch and triton are here, run; PROBE_NOTHING_TO_RUN = no CUDA
    (one line said); 1 = a GPU machine that cannot run it (nvidia-smi is here, but not torch with CUDA)."""
    gpu_here = shutil.which("nvidia-smi") is not None
    try:
        import torch
    except ImportError as exc:
        if gpu_here:
            print(f"gpu-check: nvidia-smi is here but {sys.executable} cannot import torch ({exc}); "
                  f"run with GPU_PYTHON= a python that has torch and triton", file=sys.stderr)
            return 1
        print(f"gpu-check: no CUDA device here ({sys.executable} cannot import torch); nothing to run")
        return PROBE_NOTHING_TO_RUN
    if not torch.cuda.is_available():
        if gpu_here:
            print(f"gpu-check: nvidia-smi is here but torch {torch.__version__} sees no CUDA device "
                  f"(torch.cuda.is_available() is False): a CPU build of torch, or CUDA_VISIBLE_DEVICES?",
                  file=sys.stderr)
            return 1
        print(NO_CUDA)
        return PROBE_NOTHING_TO_RUN
    if importlib.util.find_spec("triton") is None:
        print(f"gpu-check: CUDA is here but {sys.executable} has no triton", file=sys.stderr)
        return 1
    return 0


class Stopped(BaseException):
    """SIGTERM (make's `timeout`): stop measuring, still write the summary."""


def _stop(signum, frame):
    raise Stopped()


def run_phases(rec: Recorder, budget: float, setup: Setup = GPU) -> None:
    start = time.monotonic()
    end = start + budget
    ends = {name: start + offset for name, offset in deadlines(budget).items()}
    for name, phase in (("ceilings", lambda: ceilings(rec, setup)),
                        ("correctness", lambda: correctness(rec, ends["correctness"], setup)),
                        ("speed", lambda: speed(rec, ends["speed"], setup)),
                        ("decode", lambda: decode(rec, ends["decode"], setup)),
                        ("overhead", lambda: overhead(rec, ends["overhead"], setup))):
        left = end - time.monotonic()
        if left < ESTIMATES[name] / 2:
            rec.add(name, {"skipped": f"budget ({left:.0f} s left)"})
            continue
        started = time.monotonic()
        try:
            phase()
        except Exception as exc:  # record and go on: one phase must not hide the others
            rec.add(name, {"phase_error": f"{type(exc).__name__}: {exc}"[:300]})
        rec.add("timing", {"phase": name, "seconds": time.monotonic() - started})


def measure_and_summarize(rec: Recorder, budget: float, setup: Setup = GPU) -> int:
    """The phases, then the summary (stdout and the .md beside the JSON); returns the exit status.

    SIGTERM (the Makefile's timeout) stops the phases but not the summary of what was measured.
    """
    previous = signal.signal(signal.SIGTERM, _stop)
    stopped = False
    try:
        run_phases(rec, budget, setup)
    except Stopped:
        stopped = True
        rec.add("timing", {"phase": "stopped by SIGTERM", "seconds": None})
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = summary(rec.data)
    rec.write_summary(text)
    print(text, flush=True)
    return 124 if stopped else 1 if failures(rec.data) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for all phases (default 300)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for gpu-check-<device>.json and .md (default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and each phase's budget, and exit")
    parser.add_argument("--cpu-check", action="store_true",
                        help="run every phase on the CPU in triton's interpreter at tiny sizes "
                             "(the logic, not the numbers)")
    parser.add_argument("--probe", action="store_true",
                        help=f"exit 0 where CUDA, torch and triton are here, {PROBE_NOTHING_TO_RUN} (one line) "
                             f"where there is no CUDA, 1 where a GPU machine cannot run it")
    args = parser.parse_args(argv)
    if args.probe:
        return probe()
    if args.dry_run:
        print(plan(args.budget))
        return 0
    if args.cpu_check:
        return cpu_check(args.out, args.budget)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out, torch.cuda.get_device_name())
    rec.data["versions"] = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    rec.data["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rec.data["budget_s"] = args.budget
    return measure_and_summarize(rec, args.budget)


def cpu_check(out: Path, budget: float) -> int:
    """Every phase on the CPU, in triton's interpreter (set before triton is first imported), tiny sizes."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, "cpu-interpreter")
    rec.data["versions"] = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    rec.data["budget_s"] = budget
    return measure_and_summarize(rec, budget, CPU)


if __name__ == "__main__":
    sys.exit(main())
