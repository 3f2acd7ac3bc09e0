"""The attention family's speed on the CPU: what each variant costs, windows on the chunked backend, FlexAttention.

    python benchmarks/variants.py              # the three tables (about 10 minutes on 2 cores)
    python benchmarks/variants.py --quick      # tiny sizes, to check the script itself
    python benchmarks/variants.py --tables cost,window --threads 1

fp32, B=1, H=8, D=64, T=S. Candidates of one row are timed in turns, the
median of the repeats counts (`multihead.tools.timing.timeit_side_by_side`);
on a shared CPU only the ratios of one run mean anything.

cost    each variant through backend "auto" against the plain call of the same
        shape (`multihead.attention(q, k, v)`, no mask), T in {1024, 4096},
        forward (no grad) and forward+backward (q, k, v, and the sinks and the
        score_mod's table, require a gradient): time / plain's; target <= 1.2x.
        window=(255, 0) (256 keys, sliding and causal), softcap=50 (Gemma-2),
        ALiBi with the usual 2^(-8i/H) slopes, sinks (gpt-oss), documents (four
        packed documents of T/4 tokens), score_mod (a learned per-head
        relative-position table, score + table[h, q - kv + S - 1]). Where auto
        takes a fused kernel (the variant as a dense mask), the chunked backend
        is timed too; "fused+lse" models sinks on the fused CPU kernel (its
        output rescaled by its logsumexp), which multihead does not do yet.
window  the chunked backend with a window of w=256 keys, window=(255, 0),
        against the same backend with no window, T = 1k..16k, forward: the
        window's time per query should stay flat (T·w), the full call's grow with T.
flex    multihead ("auto") against torch.nn.attention.flex_attention compiled
        with inductor, forward (Flex's CPU path has no backward), for softcap,
        ALiBi, a window and documents at T in {1024, 4096}: time / Flex's, and
        Flex's compile time (its first call, inductor's caches empty) and
        block-mask build time beside it; the chunked backend's time too.

Writes benchmarks/results/variants-<device>.json with the device, the versions and the raw times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import multihead as mh
from multihead.backends.chunked import visited_tiles
from multihead.core.call import make_call
from multihead.tools.timing import device_name, print_table, slug, timeit_side_by_side

ROOT = Path(__file__).resolve().parents[1]
B, H, D = 1, 8, 64
WINDOW = 256  # keys each query sees in the window rows: window=(WINDOW - 1, 0)
SOFTCAP = 50.0  # Gemma-2's attn_logit_softcapping
DOCUMENTS = 4  # packed documents of T / 4 tokens each


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's slopes for a power-of-two head count: 2^(-8 i / H), i = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * i / heads) for i in range(1, heads + 1)])


def make_inputs(T: int, grad: bool) -> dict:
    """q, k, v (B, H, T, D) and the variants' tensors; with grad, q, k, v, sinks and the table are leaves."""
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).requires_grad_(grad) for _ in range(3))
    sinks = torch.randn(H, generator=gen).requires_grad_(grad)
    table = (0.1 * torch.randn(H, 2 * T - 1, generator=gen)).requires_grad_(grad)  # (H, 2S - 1)
    documents = (torch.arange(T) * DOCUMENTS // T)[None].expand(B, T)  # (B, T) sorted ids 0..3
    return dict(q=q, k=k, v=v, sinks=sinks, table=table, slopes=alibi_slopes(H), documents=documents)


def relative_table(table: torch.Tensor, S: int):
    """A learned relative-position bias as a score_mod: score + table[h, q_idx - kv_idx + S - 1]."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + (S - 1)]
    return score_mod


def variants(x: dict) -> dict[str, dict]:
    """name -> the keywords of `multihead.attention` for that variant ("plain": none)."""
    T = x["q"].shape[2]
    return {
        "plain": {},
        "window": dict(window=(WINDOW - 1, 0)),
        "softcap": dict(softcap=SOFTCAP),
        "alibi": dict(alibi_slopes=x["slopes"]),
        "sinks": dict(sinks=x["sinks"]),
        "documents": dict(documents=x["documents"]),
        "score_mod": dict(score_mod=relative_table(x["table"], T)),
    }


def _forward(x: dict, keywords: dict, backend: str = "auto"):
    def run():
        with torch.no_grad():
            return mh.attention(x["q"], x["k"], x["v"], backend=backend, **keywords)
    return run


def _forward_backward(x: dict, keywords: dict, grad_out: torch.Tensor, backend: str = "auto"):
    leaves = [x["q"], x["k"], x["v"]] + [x[n] for n in ("sinks", "table") if _reads(keywords, n)]

    def run():
        out = mh.attention(x["q"], x["k"], x["v"], backend=backend, **keywords)
        return torch.autograd.grad(out, leaves, grad_out)
    return run


def _reads(keywords: dict, name: str) -> bool:
    return (name == "sinks" and "sinks" in keywords) or (name == "table" and "score_mod" in keywords)


def _sinks_on_the_fused_kernel(x: dict):
    """A model of sinks on the CPU's fused kernel (not what multihead does today): its output and logsumexp, then
    each row rescaled by the sink's share, out · exp(lse - log(exp(lse) + exp(sink))): exact, one T-sized step."""
    def run():
        with torch.no_grad():
            out, lse = mh.attention(x["q"], x["k"], x["v"], backend="cpu_flash", return_lse=True)
            total = torch.logaddexp(lse, x["sinks"][None, :, None])  # (B, H, T)
            return out * torch.exp(lse - total)[..., None]  # (B, H, T, D)
    return run


def cost_table(lengths: list[int], repeats: int) -> list[dict]:
    """Each variant through "auto" against the plain call, forward and forward+backward; where auto does not
    take the chunked backend, the chunked backend too (what a dispatch that preferred it would give)."""
    rows = []
    for T in lengths:
        for mode in ("forward", "forward+backward"):
            x = make_inputs(T, grad=mode != "forward")
            chosen = variants(x)
            grad_out = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))
            backends = {name: mh.which_backend(x["q"], x["k"], x["v"], **kw).chosen for name, kw in chosen.items()}
            fns = {}
            for name, kw in chosen.items():
                for backend in ("auto", "chunked") if backends[name] != "chunked" and name != "plain" else ("auto",):
                    fns[name, backend] = (_forward(x, kw, backend) if mode == "forward"
                                          else _forward_backward(x, kw, grad_out, backend))
            if mode == "forward":
                fns["sinks", "fused"] = _sinks_on_the_fused_kernel(x)
            times = timeit_side_by_side(fns, repeats)
            plain = times["plain", "auto"]
            for name in chosen:
                chunked, fused = times.get((name, "chunked")), times.get((name, "fused"))
                rows.append(dict(T=T, mode=mode, variant=name, backend=backends[name], seconds=times[name, "auto"],
                                 vs_plain=times[name, "auto"] / plain, chunked_s=chunked,
                                 chunked_vs_plain=None if chunked is None else chunked / plain, fused_s=fused,
                                 fused_vs_plain=None if fused is None else fused / plain))
    return rows


def window_table(lengths: list[int], window: int, repeats: int) -> list[dict]:
    """The chunked backend with window=(w - 1, 0) against no window, forward."""
    rows = []
    for T in lengths:
        x = make_inputs(T, grad=False)
        keywords = dict(window=(window - 1, 0))
        times = timeit_side_by_side({"window": _forward(x, keywords, "chunked"), "full": _forward(x, {}, "chunked")},
                                    repeats if T <= 4096 else max(1, repeats // 2))  # a full 16k call: seconds
        tiles = visited_tiles(make_call(x["q"], x["k"], x["v"], **keywords))
        rows.append(dict(T=T, w=window, window_s=times["window"], full_s=times["full"],
                         window_us_per_query=times["window"] / T * 1e6, full_us_per_query=times["full"] / T * 1e6,
                         window_tiles=tiles, full_tiles=visited_tiles(make_call(x["q"], x["k"], x["v"])),
                         window_vs_full=times["window"] / times["full"]))
    return rows


def _flex_mods(x: dict, window: int):
    """name -> (score_mod, mask_mod) for FlexAttention, the same variants as multihead's keywords."""
    slopes, documents = x["slopes"], x["documents"]
    return {
        "softcap": (lambda s, b, h, i, j: SOFTCAP * torch.tanh(s / SOFTCAP), None),
        "alibi": (lambda s, b, h, i, j: s - slopes[h] * (i - j).abs(), None),
        "window": (None, lambda b, h, i, j: (j <= i) & (i - j < window)),
        "documents": (None, lambda b, h, i, j: documents[b, i] == documents[b, j]),
    }


@contextlib.contextmanager
def cold_inductor_cache():
    """inductor's caches in a fresh folder for the block (then removed, the variable restored): the compile
    times are those of a first run, not of a rerun that finds its kernels on disk."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    folder = tempfile.mkdtemp(prefix="variants-flex-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def flex_table(lengths: list[int], repeats: int, compile_backend: str) -> list[dict]:
    """multihead ("auto") against FlexAttention compiled, forward; Flex's compile and block-mask times apart."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows = []
    for T in lengths:
        x = make_inputs(T, grad=False)
        ours = variants(x)
        for name, (score_mod, mask_mod) in _flex_mods(x, WINDOW).items():
            torch._dynamo.reset()  # each row compiles its own Flex from scratch; the caches stay small
            start = time.perf_counter()
            block_mask = None if mask_mod is None else create_block_mask(mask_mod, B, None, T, T, device="cpu")
            mask_s = time.perf_counter() - start
            flex = torch.compile(flex_attention, backend=compile_backend, fullgraph=True)

            def theirs():
                with torch.no_grad():
                    return flex(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask)
            start = time.perf_counter()
            first = theirs()
            compile_s = time.perf_counter() - start
            mine, chunked = _forward(x, ours[name]), _forward(x, ours[name], "chunked")
            diff = max((first - f()).abs().max().item() for f in (mine, chunked))  # all compute the same thing
            times = timeit_side_by_side({"multihead": mine, "chunked": chunked, "flex": theirs}, repeats)
            backend = mh.which_backend(x["q"], x["k"], x["v"], **ours[name]).chosen
            rows.append(dict(T=T, variant=name, backend=backend, multihead_s=times["multihead"],
                             flex_s=times["flex"], vs_flex=times["multihead"] / times["flex"],
                             chunked_s=times["chunked"], chunked_vs_flex=times["chunked"] / times["flex"],
                             flex_compile_s=compile_s, flex_block_mask_s=mask_s, max_abs_diff=diff))
    torch._dynamo.reset()
    return rows


def print_tables(result: dict) -> None:
    if result.get("cost"):
        print_table("Each variant through auto against the plain call (fp32, B=1, H=8, D=64; time / plain's)",
                    ["T", "pass", "variant", "backend", "ms", "x plain", "chunked ms", "chunked x plain",
                     "fused+lse x plain"],
                    [[str(r["T"]), r["mode"], r["variant"], r["backend"], f"{r['seconds'] * 1e3:.1f}",
                      f"{r['vs_plain']:.2f}", "" if r["chunked_s"] is None else f"{r['chunked_s'] * 1e3:.1f}",
                      "" if r["chunked_s"] is None else f"{r['chunked_vs_plain']:.2f}",
                      "" if r["fused_s"] is None else f"{r['fused_vs_plain']:.2f}"] for r in result["cost"]])
    if result.get("window"):
        print_table("Chunked backend, a window of w keys against none (forward; time per query should stay flat)",
                    ["T", "w", "window ms", "full ms", "window us/query", "full us/query", "tiles", "full tiles",
                     "window / full"],
                    [[str(r["T"]), str(r["w"]), f"{r['window_s'] * 1e3:.1f}", f"{r['full_s'] * 1e3:.1f}",
                      f"{r['window_us_per_query']:.1f}", f"{r['full_us_per_query']:.1f}", str(r["window_tiles"]),
                      str(r["full_tiles"]), f"{r['window_vs_full']:.3f}"] for r in result["window"]])
    if result.get("flex"):
        print_table("multihead (auto) against FlexAttention compiled (forward; time / Flex's)",
                    ["T", "variant", "backend", "multihead ms", "flex ms", "x flex", "chunked ms", "chunked x flex",
                     "flex compile s", "block mask ms", "max |diff|"],
                    [[str(r["T"]), r["variant"], r["backend"], f"{r['multihead_s'] * 1e3:.1f}",
                      f"{r['flex_s'] * 1e3:.1f}", f"{r['vs_flex']:.2f}", f"{r['chunked_s'] * 1e3:.1f}",
                      f"{r['chunked_vs_flex']:.2f}", f"{r['flex_compile_s']:.1f}",
                      f"{r['flex_block_mask_s'] * 1e3:.1f}", f"{r['max_abs_diff']:.1e}"] for r in result["flex"]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--tables", default="cost,window,flex", help="which tables: cost, window, flex")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    tables = set(args.tables.split(","))
    if not tables <= {"cost", "window", "flex"}:
        parser.error(f"--tables takes cost, window, flex; got {args.tables!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    quick = args.quick
    result = dict(device=device, threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version(), multihead=mh.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                  quick=quick)
    repeats = 1 if quick else 5
    if "cost" in tables:
        result["cost"] = cost_table([64] if quick else [1024, 4096], repeats)
    if "window" in tables:
        result["window"] = window_table([256, 512] if quick else [1024, 2048, 4096, 8192, 16384],
                                        16 if quick else WINDOW, repeats)
    if "flex" in tables:  # quick: Flex compiled with backend="eager", seconds instead of minutes
        with contextlib.nullcontext() if quick else cold_inductor_cache():
            result["flex"] = flex_table([32] if quick else [1024, 4096], repeats, "eager" if quick else "inductor")
    print_tables(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"variants-{slug(device)}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
