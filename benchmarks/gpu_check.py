"""One short GPU run that decides: ceilings, every backend on CUDA against float64, speed, decode.

    python benchmarks/gpu_check.py --budget 300 --out DIR       # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run                    # the plan, anywhere
    python benchmarks/gpu_check.py --probe                      # is there anything to run here? (make gpu-check)

`make gpu-check` runs the GPU tests and then this script; see the Makefile.

Phases, each skipped when the budget left is below its estimate, each row
written to DIR/gpu-check-<device>.json as soon as it is measured (so a run cut
short still leaves its data) and printed to stderr as progress:

1. ceilings: device copy bandwidth (GB/s) and a bf16 8192^3 matmul (TFLOP/s);
2. correctness: `multihead.attention` on every backend that supports the call
   (triton, sdpa, chunked; reference as a yardstick) against the float64
   reference on the GPU, under the project's rule (error at most 2x the naive
   same-dtype reference's error + 1e-5), forward and backward; the logsumexp
   of triton and chunked against float64; weights on demand; NaN propagation
   through the compiled kernel;
3. speed: forward and forward+backward, bf16, B·T = 16k tokens, H·D = 2048,
   T in {1k, 4k, 16k}, D = 128, causal or not: triton, SDPA flash, SDPA cuDNN
   (`triton.testing.do_bench` medians, TFLOP/s as flash-attention counts them);
4. decode: one query against a long cache (T = 1), triton vs SDPA, GB/s of
   K and V read against the measured copy bandwidth;
5. overhead: per-call host cost against torch, and graph breaks under torch.compile.

Last, the summary: every phase as a Markdown table (speed as a fraction of the
measured matmul, decode of the measured copy bandwidth), printed to stdout and
written to DIR/gpu-check-<device>.md. Exit status: 0, or 1 when a correctness
row breaks the rule, a logsumexp check fails or a phase crashed; 124 when
stopped by SIGTERM (the summary of what was measured is still written); 2
without CUDA.

Set MULTIHEAD_TRITON_CONFIGS=few to keep the autotuners to two tiles each.
The module level and --probe run on any python3 >= 3.9 without torch (the
Makefile calls them with the machine's own python3).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NO_CUDA = "gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to run"
PROBE_NOTHING_TO_RUN = 3  # --probe's exit status when there is no CUDA: make gpu-check then exits 0
CORRECTNESS = [  # (B, H, G, T, S, D, causal, mask): mask in None, "padding" (key lengths), "bool"
    (1, 8, 2, 1025, 1025, 128, True, None), (2, 4, 4, 113, 777, 64, False, None),
    (1, 4, 4, 777, 113, 64, True, None), (1, 4, 1, 1, 4099, 128, True, None),
    (2, 4, 4, 333, 333, 40, False, None), (1, 4, 2, 513, 700, 96, True, None),
    (3, 8, 2, 700, 1500, 64, True, "padding"), (2, 4, 2, 257, 300, 64, False, "bool"),
]
SPEED_LENGTHS = [1024, 4096, 16384]
DECODE = [(1, 32, 8, 32768, 128), (16, 32, 8, 4096, 128)]  # (B, H, G, S, D), T = 1
OVERHEAD_LENGTHS = [1, 14, 128, 1024, 4096]  # MultiHeadAttention vs torch.nn.MultiheadAttention, B=1, C=512, H=8
ESTIMATES = {"ceilings": 15, "correctness": 60, "speed": 120, "decode": 20, "overhead": 40}  # seconds, rough


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


def plan() -> str:
    lines = ["phases: " + ", ".join(f"{k} (~{v} s)" for k, v in ESTIMATES.items())]
    lines += [f"correctness: B,H,G,T,S,D,causal,mask = {case}" for case in CORRECTNESS]
    lines += [f"speed: T={T}, B={16384 // T}, H=16, D=128, causal in (False, True)" for T in SPEED_LENGTHS]
    lines += [f"decode: B,H,G,S,D = {case}" for case in DECODE]
    lines += [f"overhead: module T={T}, C=512, H=8 against torch.nn.MultiheadAttention" for T in OVERHEAD_LENGTHS]
    lines += ["writes: OUT/gpu-check-<device>.json (every row as measured) and OUT/gpu-check-<device>.md (summary)"]
    return "\n".join(lines)


# ---- phases


def ceilings(rec: Recorder) -> None:
    import torch
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    rec.add("ceilings", {"what": "copy", "GB/s": 2 * src.numel() / ms / 1e6})
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ a)
    rec.add("ceilings", {"what": "bf16 matmul 8192^3", "TFLOP/s": 2 * 8192**3 / ms / 1e9})


def _inputs(B, H, G, T, S, D, dtype, seed):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64).to(dtype)
            for shape in ((B, H, T, D), (B, G, S, D), (B, G, S, D))]


def _mask(kind, B, H, T, S):
    import torch

    import multihead as mh

    if kind == "padding":
        lengths = torch.tensor([S, S * 2 // 3, 0][:B], device="cuda")
        return mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(lengths, S))
    if kind == "bool":
        gen = torch.Generator(device="cuda").manual_seed(5)
        return torch.rand(B, 1, T, S, generator=gen, device="cuda") > 0.3
    return None


def _errors(run, q, k, v, call):
    """(out error, naive out error, max grad error / naive) against float64, as the project's rule reads them."""
    import torch

    import multihead as mh

    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gold_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    naive_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = run(*xs)
    gold = mh.attention_ref(*gold_in, **call).out
    naive = mh.attention_ref(*naive_in, upcast=False, **call).out
    err = (out.double() - gold).abs().max().item()
    naive_err = (naive.double() - gold).abs().max().item()
    grad = torch.randn_like(gold)
    g = torch.autograd.grad(out, xs, grad.to(out.dtype))
    gg = torch.autograd.grad(gold, gold_in, grad)
    gn = torch.autograd.grad(naive, naive_in, grad.to(naive.dtype))
    worst = max(((a.double() - b).abs().max().item() - 1e-5) / max((c.double() - b).abs().max().item(), 1e-12)
                for a, b, c in zip(g, gg, gn))
    return err, naive_err, worst


def correctness(rec: Recorder, deadline: float) -> None:
    import torch

    import multihead as mh

    for B, H, G, T, S, D, causal, kind in CORRECTNESS:
        if time.monotonic() > deadline:
            rec.add("correctness", {"skipped": "budget"})
            return
        q, k, v = _inputs(B, H, G, T, S, D, torch.bfloat16, seed=T + S + D)
        call = dict(causal=causal, attn_mask=_mask(kind, B, H, T, S))
        report = mh.explain_dispatch(q, k, v, **call)
        for name, reason in report.reasons.items():
            if reason is not None or name == "reference":
                continue
            try:
                err, naive, grad_ratio = _errors(lambda a, b, c: mh.attention(a, b, c, backend=name, **call), q, k, v,
                                                 call)
                ok = err <= 2 * naive + 1e-5 and grad_ratio <= 3
                rec.add("correctness", {"case": f"{B},{H},{G},{T},{S},{D},{causal},{kind}", "backend": name,
                                        "err": err, "naive": naive, "grad/naive": grad_ratio, "ok": ok})
            except Exception as exc:  # record and go on: one failure must not hide the rest
                rec.add("correctness", {"case": f"{B},{H},{G},{T},{S},{D},{causal},{kind}", "backend": name,
                                        "error": f"{type(exc).__name__}: {exc}"[:300], "ok": False})
    _lse_and_weights(rec)
    _nan_propagates(rec)


def _lse_and_weights(rec: Recorder) -> None:
    import torch

    import multihead as mh

    q, k, v = _inputs(2, 8, 2, 300, 700, 64, torch.bfloat16, seed=3)
    mask = _mask("padding", 2, 8, 300, 700)
    gold = mh.attention_with_lse(q.double(), k.double(), v.double(), attn_mask=mask, causal=True,
                                 backend="reference").lse
    probs = mh.attention_ref(q.double(), k.double(), v.double(), attn_mask=mask, causal=True).probs
    for name in ("triton", "chunked"):
        try:
            out, lse = mh.attention_with_lse(q, k, v, attn_mask=mask, causal=True, backend=name)
            finite = torch.isfinite(gold)
            same_empty = bool(torch.equal(torch.isfinite(lse), finite))
            w = mh.attention_weights(q, k, lse, attn_mask=mask, causal=True)
            rec.add("lse", {"backend": name, "lse_err": (lse[finite].double() - gold[finite]).abs().max().item(),
                            "empty_rows_agree": same_empty, "weights_err": (w.double() - probs).abs().max().item()})
        except Exception as exc:
            rec.add("lse", {"backend": name, "error": f"{type(exc).__name__}: {exc}"[:300]})


def _nan_propagates(rec: Recorder) -> None:
    import torch

    import multihead as mh

    q, k, v = _inputs(1, 2, 2, 64, 64, 64, torch.bfloat16, seed=9)
    v[0, 0, 10, 3] = float("nan")  # key 10 is seen by every query from 10 on (causal)
    out = mh.attention(q, k, v, causal=True, backend="triton")
    rec.add("nan", {"rows_before_10_finite": bool(torch.isfinite(out[0, 0, :10]).all()),
                    "rows_from_10_nan": bool(torch.isnan(out[0, 0, 10:, 3]).all())})


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


def speed(rec: Recorder, deadline: float) -> None:
    import torch
    from triton.testing import do_bench

    for T in SPEED_LENGTHS:
        for causal in (False, True):
            B, H, D = 16384 // T, 16, 128
            q, k, v = (x.requires_grad_() for x in _inputs(B, H, H, T, T, D, torch.bfloat16, seed=T))
            flops = 4.0 * B * H * T * T * D / (2 if causal else 1)
            grad = torch.randn_like(q)
            for name, fn in _candidates(q, k, v, causal).items():
                if time.monotonic() > deadline:
                    rec.add("speed", {"skipped": "budget"})
                    return
                try:
                    fwd = do_bench(fn)
                    both = do_bench(lambda: torch.autograd.grad(fn(), (q, k, v), grad))
                    rec.add("speed", {"T": T, "causal": causal, "candidate": name, "fwd_ms": fwd,
                                      "fwd_TFLOP/s": flops / fwd / 1e9, "fwd+bwd_ms": both,
                                      "fwd+bwd_TFLOP/s": 3.5 * flops / both / 1e9})
                except Exception as exc:
                    rec.add("speed", {"T": T, "causal": causal, "candidate": name,
                                      "error": f"{type(exc).__name__}: {exc}"[:200]})


def decode(rec: Recorder, deadline: float) -> None:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    import multihead as mh
    from multihead.backends.triton import triton_attention

    for B, H, G, S, D in DECODE:
        if time.monotonic() > deadline:
            rec.add("decode", {"skipped": "budget"})
            return
        q, k, v = _inputs(B, H, G, 1, S, D, torch.bfloat16, seed=S)
        read = 2 * B * G * S * D * 2  # K and V, bytes
        runs = {"triton": lambda: triton_attention(q, k, v, causal=True).out,
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                "multihead auto": lambda: mh.attention(q, k, v, causal=True)}
        for name, fn in runs.items():
            ms = do_bench(fn)
            rec.add("decode", {"B": B, "H": H, "G": G, "S": S, "candidate": name, "us": ms * 1e3,
                               "GB/s": read / ms / 1e6})


def _wall_us(fn, calls: int = 200) -> float:
    """Median wall-clock microseconds per call over 5 runs of `calls` calls: host work included."""
    import statistics

    import torch

    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def overhead(rec: Recorder, deadline: float) -> None:
    """Per-call cost with the host included: attention() vs raw SDPA, the module vs torch's,
    graph breaks under torch.compile (a host sync shows up as one)."""
    import torch
    import torch.nn.functional as F

    import multihead as mh

    for T, S in ((1, 512), (128, 128)):
        q = torch.randn(1, 8, T, 64, device="cuda")
        k, v = (torch.randn(1, 8, S, 64, device="cuda") for _ in range(2))
        rec.add("overhead", {"call": f"attention T={T} S={S} fp32",
                             "multihead_us": _wall_us(lambda: mh.attention(q, k, v)),
                             "sdpa_us": _wall_us(lambda: F.scaled_dot_product_attention(q, k, v))})
    ours = mh.MultiHeadAttention(512, 8).cuda().eval()
    theirs = torch.nn.MultiheadAttention(512, 8, batch_first=True).cuda().eval()
    with torch.no_grad():
        for T in OVERHEAD_LENGTHS:
            if time.monotonic() > deadline:
                rec.add("overhead", {"skipped": "budget"})
                return
            x = torch.randn(1, T, 512, device="cuda")
            rec.add("overhead", {"call": f"module T={T} fp32", "multihead_us": _wall_us(lambda: ours(x)),
                                 "torch_us": _wall_us(lambda: theirs(x, x, x, need_weights=False))})
        x = torch.randn(2, 64, 512, device="cuda")
        key_mask = torch.ones(2, 64, dtype=torch.bool, device="cuda")
        key_mask[1, 40:] = False
        causal = mh.MultiHeadAttention(512, 8, causal=True).cuda().eval()
        for name, module, kwargs in (("key_mask", ours, {"key_mask": key_mask}), ("causal", causal, {})):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(module)(x, **kwargs)
            rec.add("overhead", {"call": f"dynamo.explain module {name}", "graph_breaks": explained.graph_break_count,
                                 "reasons": [str(b.reason)[:120] for b in explained.break_reasons][:3]})


# ---- the summary: Markdown tables built from the recorded rows (no torch needed)

PHASE_ORDER = ["ceilings", "correctness", "lse", "nan", "speed", "decode", "overhead", "timing"]
TITLES = {
    "ceilings": "Ceilings: copy bandwidth and a bf16 matmul, as measured here",
    "correctness": "Correctness against float64 (ok: err <= 2 x naive + 1e-5 and grad/naive <= 3)",
    "lse": "Logsumexp against float64, and weights read off it",
    "nan": "NaN in one value (key 10, causal) through the triton kernel (earlier rows may see it as 0 · NaN)",
    "speed": "Speed, bf16, B·T = 16k tokens, H = 16, D = 128 (% of the measured bf16 matmul)",
    "decode": "Decode step, T = 1: K and V read per second (% of the measured copy bandwidth)",
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
    bad += [f"phase {name} crashed: {row['phase_error']}"
            for name, rows in phases.items() for row in rows if "phase_error" in row]
    return bad


def summary(data: dict) -> str:
    """The whole run as Markdown: a verdict, then one table per phase."""
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    bad = failures(data)
    checked = [r for r in data.get("phases", {}).get("correctness", []) if "skipped" not in r]
    verdict = (f"**FAILED**: {len(bad)} problem(s)\n" + "\n".join(f"- {line}" for line in bad) if bad
               else f"**ok**: {len(checked)} correctness rows within the rule")
    lines = [f"# gpu-check: {data.get('device', 'unknown device')}", "", versions, "", verdict]
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


def run_phases(rec: Recorder, budget: float) -> None:
    end = time.monotonic() + budget
    for name, phase in (("ceilings", lambda: ceilings(rec)), ("correctness", lambda: correctness(rec, end - 40)),
                        ("speed", lambda: speed(rec, end - 15)), ("decode", lambda: decode(rec, end - 30)),
                        ("overhead", lambda: overhead(rec, end))):
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


def measure_and_summarize(rec: Recorder, budget: float) -> int:
    """The phases, then the summary (stdout and the .md beside the JSON); returns the exit status.

    SIGTERM (the Makefile's timeout) stops the phases but not the summary of what was measured.
    """
    previous = signal.signal(signal.SIGTERM, _stop)
    stopped = False
    try:
        run_phases(rec, budget)
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
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--probe", action="store_true",
                        help=f"exit 0 where CUDA, torch and triton are here, {PROBE_NOTHING_TO_RUN} (one line) "
                             f"where there is no CUDA, 1 where a GPU machine cannot run it")
    args = parser.parse_args(argv)
    if args.probe:
        return probe()
    if args.dry_run:
        print(plan())
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
