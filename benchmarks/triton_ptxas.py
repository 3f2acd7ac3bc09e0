"""Compile the Triton kernels' tiles for sm_90a, without a GPU: registers, spills, shared memory.

    python benchmarks/triton_ptxas.py                  # every tile configs.py keeps, every kernel
    python benchmarks/triton_ptxas.py --quick          # one tile per kernel (tests/test_triton_compile.py)
    python benchmarks/triton_ptxas.py --candidates     # also the tiles configs.py dropped, to see why
    python benchmarks/triton_ptxas.py --json FILE      # the rows as JSON too

How: `triton.compile` with GPUTarget("cuda", 90, 64) lowers each kernel to PTX on any machine, and the
ptxas that triton bundles assembles it for sm_90a with triton's own flags (`-lineinfo -v
--regAllocOptLevel=2`); its log gives registers and spills, triton's metadata the shared memory. Each
kernel is specialised as a real launch would be (`native_specialize_impl` on meta tensors of a
representative shape: pointer alignment, strides divisible by 16, ints equal to 1), so these are the
kernels a GPU would build with this triton. Where the older ptxas 12.9 is bundled too (the GPU
machines run triton 3.6, which uses a 12.x ptxas for sm_90), it assembles the same PTX (its
`.version` lowered to 8.8) for a second opinion.

Each kernel's TTIR is also read for its pointer arithmetic: every tensor of offsets added to a
pointer must be int64 (a row or key index times a stride in int32 wraps past 2^31 elements).

A tile is "ok" when neither ptxas spills, its shared memory fits sm_90's 227 KB and its offsets are
int64. Exit status: 0 when every kept tile is ok, 1 otherwise, 3 when this machine cannot compile
for sm_90a (no triton, or no NVIDIA backend / ptxas).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
CANNOT_COMPILE = 3
SMEM_LIMIT = 227 * 1024  # sm_90: shared memory a block may opt into
WIDTHS = (64, 128, 256)  # padded head dims: each configs.py table
PTXAS_FLAGS = ["-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a"]  # as triton runs it
# Tiles compiled with --candidates beside the kept ones: the lists before issue 13 and the playbook's additions.
CANDIDATES = {
    "forward": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                (128, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 4), (128, 128, 8, 2), (64, 32, 4, 3),
                (128, 32, 8, 2)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (32, 32, 4, 2), (16, 128, 8, 3),
             (16, 128, 4, 3), (16, 64, 4, 2), (32, 128, 4, 3), (64, 128, 8, 2)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2),
           (64, 64, 4, 3), (128, 64, 8, 2)],
    "decode": [(bn, 4, s) for bn in (32, 64, 128) for s in (2, 3, 4)],
}


class Job(NamedTuple):
    kernel: str  # forward, dkdv, dq, decode, merge, preprocess
    width: int  # padded head dim
    tile: tuple  # (BLOCK_M, BLOCK_N, warps, stages)
    kept: bool  # whether configs.py keeps it


class Row(NamedTuple):
    kernel: str
    width: int
    tile: str  # "BLOCK_MxBLOCK_N w warps s stages"
    kept: bool
    regs: int | None  # ptxas 13.x (this triton's)
    spill_stores: int | None  # bytes
    spill_loads: int | None
    smem_kb: float | None  # triton's metadata.shared
    smem_est_kb: float | None  # configs.shared_bytes, what the autotuners prune by (forward, dkdv, dq)
    regs_12: int | None  # ptxas 12.9, where bundled
    spills_12: int | None  # stores + loads, bytes
    int64_offsets: bool | None
    seconds: float
    error: str | None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.spill_stores == 0 and self.spill_loads == 0 and not self.spills_12
                and self.smem_kb is not None and self.smem_kb * 1024 <= SMEM_LIMIT and self.int64_offsets is True)


def can_compile() -> str | None:
    """None if this machine can compile for sm_90a, else why not."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 64))
        from triton.backends.nvidia.compiler import get_ptxas

        if not Path(get_ptxas(90).path).exists():
            return "triton's ptxas is missing"
    except Exception as exc:  # no triton, no nvidia backend, no ptxas: nothing to measure here
        return f"{type(exc).__name__}: {exc}"
    return None


def kernels():
    """The kernel modules, compiled (TRITON_INTERPRET off before triton's first import), and the tiles module."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said out loud (no warning)
    sys.path.insert(0, str(ROOT / "src"))
    from multihead.backends.triton import configs, kernel_modules

    compiled = kernel_modules()
    if compiled.interpreted:
        raise RuntimeError("triton was imported for its interpreter before this script set TRITON_INTERPRET=0")
    return compiled, configs


def jobs(configs, quick: bool, candidates: bool) -> list:
    """Every (kernel, width, tile) to compile: the kept tiles, and with --candidates the dropped ones."""
    out = []
    for kernel in ("forward", "dkdv", "dq"):
        for width in ((64,) if quick else WIDTHS):
            kept = configs.tiles(kernel, width, only_first=quick)
            extra = [t for t in CANDIDATES[kernel] if t not in kept] if candidates else []
            out += [Job(kernel, width, t, True) for t in kept] + [Job(kernel, width, t, False) for t in extra]
    for width in ((64,) if quick else WIDTHS):
        bn, w, s = configs.decode_tile(width)
        for block_m in ((16,) if quick else (16, 64)):
            out.append(Job("decode", width, (block_m, bn, w, s), True))
            extra = [t for t in CANDIDATES["decode"] if t != (bn, w, s)] if candidates and block_m == 16 else []
            out += [Job("decode", width, (block_m, *t), False) for t in extra]
        out += [Job("merge", width, (0, 16, 4, 1), True), Job("preprocess", width, (64, 0, 4, 1), True)]
    return out


def launch_spec(mods, job: Job):
    """(jit function, positional args, constexprs) as the host wrappers build them, on meta tensors."""
    import torch

    bm, bn, _, _ = job.tile
    D = job.width
    meta = dict(device="meta", dtype=torch.bfloat16)
    if job.kernel in ("forward", "dkdv", "dq", "preprocess"):
        B, H, G, T, S = 2, 16, 4, 4096, 4096
        q, k, v = torch.empty(B, H, T, D, **meta), torch.empty(B, G, S, D, **meta), torch.empty(B, G, S, D, **meta)
        lse = torch.empty(B, H, T, device="meta", dtype=torch.float32)
        if job.kernel == "forward":
            args, consts = mods.forward.kernel_args(q, k, v, torch.empty_like(q), lse, None, True, D ** -0.5, "tf32")
            return mods.forward._fwd_kernel, args, dict(consts, BLOCK_M=bm, BLOCK_N=bn)
        if job.kernel == "preprocess":
            args = (q, q, lse, lse, lse, *q.stride()[:3], *q.stride()[:3], H, T)
            return mods.backward._bwd_preprocess, args, dict(HEAD_DIM_V=D, BLOCK_DV=D, BLOCK_M=bm)
        (dkdv, dq), consts = mods.backward.kernel_args(torch.empty_like(q), q, k, v, lse, lse, torch.empty_like(q),
                                                       torch.empty_like(k), torch.empty_like(v), None, True,
                                                       D ** -0.5, "tf32")
        fn = mods.backward._bwd_dkdv_kernel if job.kernel == "dkdv" else mods.backward._bwd_dq_kernel
        return fn, (dkdv if job.kernel == "dkdv" else dq), dict(consts, BLOCK_M=bm, BLOCK_N=bn)
    B, H, G, S = 4, 32, (8 if bm == 16 else 4), 32768
    T = 1 if bm == 16 else 16  # 4 packed rows -> BLOCK_M 16; 8 heads x 16 queries = 128 rows -> 64
    q, k, v = torch.empty(B, H, T, D, **meta), torch.empty(B, G, S, D, **meta), torch.empty(B, G, S, D, **meta)
    plan = mods.decode.plan(q, k, v, block_n=bn)._replace(warps=job.tile[2], stages=job.tile[3])
    part_o = torch.empty(B, H, T, plan.splits, D, device="meta", dtype=torch.float32)
    part_lse = torch.empty(B, H, T, plan.splits, device="meta", dtype=torch.float32)
    if job.kernel == "merge":
        out = torch.empty(B, H, T, D, **meta)
        args = (part_o, part_lse, out, part_lse, *out.stride()[:3], H, T, plan.splits)
        return mods.decode._decode_merge_kernel, args, dict(HEAD_DIM_V=D, BLOCK_DV=D, SPLITS=32, BLOCK_S=16)
    args, consts = mods.decode.kernel_args(q, k, v, part_o, part_lse, None, True, D ** -0.5, "tf32", plan)
    assert consts["BLOCK_M"] == bm, (consts["BLOCK_M"], bm)
    return mods.decode._decode_split_kernel, args, consts


def specialise(fn, args, consts):
    """(signature, constexprs, attrs) exactly as triton's JIT builds them for a launch with these args."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 64))
    positional = iter(args)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = consts[param.name] if param.is_constexpr else next(positional)
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(backend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":  # an int equal to 1
            constexprs[(i,)] = value
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    leftover = list(positional)
    assert not leftover, f"{fn.__name__}: {len(leftover)} arguments more than parameters"
    return signature, constexprs, attrs


def compile_sm90(fn, args, consts, warps: int, stages: int):
    """triton.compile for sm_90a: the CompiledKernel (asm: ttir, ptx, cubin; metadata.shared)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialise(fn, args, consts)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": warps,
                                                                            "num_stages": stages})


ADDPTR = re.compile(r"tt\.addptr .*: tensor<[^>]*!tt\.ptr<[^>]*>>, tensor<[0-9x]*x(i\d+)>")


def narrow_offsets(ttir: str) -> list:
    """The TTIR lines that add a tensor of offsets narrower than int64 to a tensor of pointers."""
    return [line.strip()[:160] for line in ttir.splitlines() if (m := ADDPTR.search(line)) and m.group(1) != "i64"]


def ptxas_report(ptx: str, ptxas: str, version: str | None = None) -> tuple:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`; version rewrites the PTX's .version."""
    if version is not None:
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {version}", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, *PTXAS_FLAGS, str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-300:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else 0,
            int(spills.group(2)) if spills else 0)


def older_ptxas() -> str | None:
    """The bundled ptxas 12.x (triton 3.6's choice for sm_90), if this triton ships one beside its own."""
    from triton.backends.nvidia.compiler import get_ptxas
    from triton import knobs

    legacy = Path(knobs.nvidia.ptxas.path)
    return str(legacy) if legacy.exists() and str(legacy) != get_ptxas(90).path else None


def _estimate(job: Job) -> float | None:
    from multihead.backends.triton import configs

    if job.kernel not in ("forward", "dkdv", "dq"):
        return None
    return configs.shared_bytes(job.kernel, job.tile, job.width, job.width, 2) / 1024


def measure(mods, job: Job) -> Row:
    from triton.backends.nvidia.compiler import get_ptxas

    started = time.monotonic()
    tile = f"{job.tile[0]}x{job.tile[1]} {job.tile[2]}w {job.tile[3]}s"
    try:
        fn, args, consts = launch_spec(mods, job)
        compiled = compile_sm90(fn, args, consts, job.tile[2], job.tile[3])
        regs, stores, loads = ptxas_report(compiled.asm["ptx"], get_ptxas(90).path)
        regs_12 = spills_12 = None
        legacy = older_ptxas()
        if legacy is not None:
            try:
                regs_12, st, ld = ptxas_report(compiled.asm["ptx"], legacy, version="8.8")
                spills_12 = st + ld
            except RuntimeError:
                pass  # this PTX needs a newer ptxas than 12.x: only the first opinion counts
        narrow = narrow_offsets(compiled.asm["ttir"])
        return Row(job.kernel, job.width, tile, job.kept, regs, stores, loads, compiled.metadata.shared / 1024,
                   _estimate(job), regs_12, spills_12, not narrow, time.monotonic() - started,
                   None if not narrow else f"int32 offsets: {narrow[0]}")
    except Exception as exc:  # a tile that does not compile is a row, not a crash
        return Row(job.kernel, job.width, tile, job.kept, None, None, None, None, _estimate(job), None, None, None,
                   time.monotonic() - started, f"{type(exc).__name__}: {str(exc).strip()[:200]}")


def table(rows: list) -> str:
    lines = ["| kernel | D | tile (BLOCK_M x BLOCK_N, warps, stages) | kept | regs | spill st/ld B | smem KB "
             "(est.) | ptxas 12.9 regs / spill B | int64 offsets | ok |",
             "|---|---:|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        older = "n/a" if r.regs_12 is None else f"{r.regs_12} / {r.spills_12}"
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        smem = "" if r.smem_kb is None else f"{r.smem_kb:.0f}"
        smem += "" if r.smem_est_kb is None else f" ({r.smem_est_kb:.0f})"
        verdict = "yes" if r.ok else ("**no**: " + r.error if r.error else "**no**")
        lines.append(f"| {r.kernel} | {r.width} | {r.tile} | {'yes' if r.kept else 'no'} | {r.regs or ''} | "
                     f"{spills} | {smem} | {older} | {r.int64_offsets} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tile per kernel at D = 64")
    parser.add_argument("--candidates", action="store_true", help="also compile the tiles configs.py dropped")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    reason = can_compile()
    if reason is not None:
        print(f"triton_ptxas: cannot compile for sm_90a here ({reason})")
        return CANNOT_COMPILE
    mods, configs = kernels()
    rows = []
    for job in jobs(configs, args.quick, args.candidates):
        rows.append(measure(mods, job))
        print(f"[{len(rows)}] {rows[-1].kernel} D={rows[-1].width} {rows[-1].tile}: regs {rows[-1].regs}, "
              f"spills {rows[-1].spill_stores}/{rows[-1].spill_loads}, ok {rows[-1].ok}", file=sys.stderr, flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps([dict(r._asdict(), ok=r.ok) for r in rows], indent=1))
    print(table(rows))
    bad = [r for r in rows if r.kept and not r.ok]
    print(f"\n{len(rows)} compiled, {len(bad)} kept tile(s) not ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
