"""What each rank runs in the distributed tests (importable by spawned processes), and the jobs that run it.

tests/test_distributed.py (agreement with one process), tests/test_distributed_refusals.py
(bad arguments, disagreements, refusals) and tests/test_run_local.py (the job runner
itself) assert on what these functions return. One job per world size, `everything(N)`,
runs every case of both distributed test files: a spawned process costs seconds to start
(torch's import), the cases themselves milliseconds. `job(N)` runs it once per test session,
also across pytest-xdist's workers.

Every function here runs on every rank of a `run_local` job and returns plain values
(errors as (type name, message) pairs), so the tests assert in the parent. Inputs come
from fixed seeds: every rank builds the same full tensors, cuts its part, runs the
context-parallel attention, gathers the output and backpropagates one loss computed
identically on every rank; the gradients of the full inputs then come back through
shard_sequence. The reference is single-process: attention_ref in float64, and
attention_ref / mh.attention in the case's dtype for the rule's yardstick.

Order matters within a job: a group remembers the signature its ranks last agreed on
(docs/distributed.md), so the collective count comes first, and the cases where one rank
differs from the others either use arguments no earlier call agreed on, or a group of their own.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import zlib
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

import multihead as mh
from multihead.backends.reference import attention_ref
from multihead.core.call import make_call
from multihead.distributed import (ContextParallel, Sharding, gather_sequence, ring_attention, shard_sequence,
                                   ulysses_attention)

METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}


def attempt(f):
    """("ok", value) or (exception type name, message)."""
    try:
        return ("ok", f())
    except Exception as exc:  # every failure is a result to assert on
        return (type(exc).__name__, str(exc))


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0



# -- the attention cases: every method, layout, mask and world size against one process --------------------


class Case(NamedTuple):
    name: str
    method: str  # "ring" or "ulysses"
    layout: str  # "zigzag" or "contiguous"
    causal: bool
    T: int  # global length, often not divisible by the world size
    H: int
    G: int
    D: int
    Dv: int
    mask: str  # "none", "padding" (one sequence right-padded), "empty" (one sequence with no key at all)
    dtype: str  # "float64" or "float32"
    B: int = 2


def cases_for(N: int) -> list[Case]:
    """The attention cases of the world-size-N job."""
    T = {1: 7, 2: 19, 3: 23, 4: 29}[N]  # not divisible by N (nor 2N): the last part carries padding
    H, G = 2 * N, N  # divisible by N for ulysses; GQA with two query heads per kv head
    found = []
    for method in ("ring", "ulysses"):
        for layout in ("zigzag", "contiguous"):
            for causal in (True, False):
                name = f"{method}-{layout}-{'causal' if causal else 'full'}-padded-f64"
                found.append(Case(name, method, layout, causal, T, H, G, 8, 12, "padding", "float64"))
        found.append(Case(f"{method}-zigzag-causal-f32", method, "zigzag", True, T, H, G, 16, 16, "none", "float32"))
        found.append(Case(f"{method}-contiguous-empty-f32", method, "contiguous", False, T, H, G, 8, 8, "empty",
                          "float32"))
    found.append(Case("ring-zigzag-causal-mqa-f64", "ring", "zigzag", True, T, 3, 1, 8, 4, "none", "float64"))
    found.append(Case("ring-zigzag-causal-divisible-f32", "ring", "zigzag", True, 8 * N, H, G, 8, 8, "padding",
                      "float32"))
    return found


MODULE_CASES = {1: [("ring", "zigzag"), ("ulysses", "contiguous")], 2: [("ring", "zigzag"), ("ulysses", "contiguous")],
                3: [("ring", "contiguous"), ("ulysses", "zigzag")], 4: [("ring", "zigzag")]}


def _inputs(case: Case, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))  # hash() differs between processes
    shapes = ((case.B, case.H, case.T, case.D), (case.B, case.G, case.T, case.D), (case.B, case.G, case.T, case.Dv))
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    grad = torch.randn(case.B, case.H, case.T, case.Dv, generator=gen, dtype=torch.float64)
    key_mask = None
    if case.mask != "none":
        key_mask = torch.ones(case.B, case.T, dtype=torch.bool)
        key_mask[1, (case.T // 3 if case.mask == "padding" else 0):] = False  # right padding; or nothing real
    return [x.to(dtype) for x in (q, k, v)], grad.to(dtype), key_mask


def _single(q, k, v, key_mask, causal, grad, run):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
    out = run(*leaves, mask, causal)
    (out * grad).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def _naive(q, k, v, mask, causal):
    return attention_ref(q, k, v, attn_mask=mask, causal=causal, upcast=False).out


def _library(q, k, v, mask, causal):
    return mh.attention(q, k, v, attn_mask=mask, causal=causal)


def _distributed(case: Case, q, k, v, key_mask, grad):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    parts = [shard_sequence(x, dim=2, layout=case.layout) for x in leaves]
    mask_part = None if key_mask is None else shard_sequence(key_mask, dim=1, layout=case.layout)
    out_part = METHODS[case.method](*parts, key_mask=mask_part, causal=case.causal, layout=case.layout,
                                    length=case.T)
    out = gather_sequence(out_part, dim=2, layout=case.layout, length=case.T)
    (out * grad).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def attention_case(case: Case) -> dict:
    """The distributed run's errors against float64, and the yardsticks of the rule."""
    dtype = getattr(torch, case.dtype)
    (q, k, v), grad, key_mask = _inputs(case, dtype)
    golden, golden_grads = _single(q.double(), k.double(), v.double(), key_mask, case.causal, grad.double(),
                                   _naive)
    out, grads = _distributed(case, q, k, v, key_mask, grad)
    naive, naive_grads = _single(q, k, v, key_mask, case.causal, grad, _naive)
    library, _ = _single(q, k, v, key_mask, case.causal, grad, _library)
    names = ("dq", "dk", "dv")
    errors = {"out": _err(out, golden), **{n: _err(a, b) for n, a, b in zip(names, grads, golden_grads)}}
    yardstick = {"out": _err(naive, golden), **{n: _err(a, b) for n, a, b in zip(names, naive_grads, golden_grads)}}
    finite = all(bool(torch.isfinite(x).all()) for x in (out, *grads))
    empty_rows = None
    if case.mask == "empty":  # sequence 1 has no key: output and query gradient exactly 0
        empty_rows = float(out[1].abs().max()) + float(grads[0][1].abs().max())
    return {"errors": errors, "yardstick": yardstick, "to_library": _err(out, library), "finite": finite,
            "empty_rows": empty_rows, "shape": tuple(out.shape)}


def attention_cases(cases: list[Case]) -> dict:
    return {case.name: attention_case(case) for case in cases}


# -- the attention family across ranks: every variant on ring zigzag, ring contiguous and ulysses ----------


VARIANTS = ("window", "softcap", "alibi", "sinks", "documents", "score_mod", "all")
VARIANT_METHODS = (("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "zigzag"))


def variant_names(N: int) -> list[str]:
    """The variant cases of the world-size-N job: method/layout/variant."""
    found = [f"{m}/{layout}/{variant}" for m, layout in VARIANT_METHODS for variant in VARIANTS]
    return found + (["ulysses/contiguous/all"] if N == 2 else [])


def _documents(B: int, T: int) -> torch.Tensor:
    """(B, T) sorted ids, as a packed batch has them: three documents, then two."""
    first = torch.tensor([0] * (T // 3) + [1] * (T // 3) + [2] * (T - 2 * (T // 3)))
    second = torch.tensor([5] * (T - T // 4) + [6] * (T // 4))
    return torch.stack([first, second])[:B]


def _relative_bias(table: torch.Tensor, T: int):
    """A score_mod reading a captured (H, 2T - 1) table by head and global distance (it takes a gradient)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + T - 1]  # (1, h, 1, 1), (1, 1, t, s) -> (1, h, t, s)
    return score_mod


def _family(variant: str, B: int, H: int, T: int, gen) -> tuple[dict, dict, bool, str]:
    """One case's variant keywords (tensors as float64 leaves, named), causality and key mask."""
    tensors, keywords = {}, {}
    if variant == "alibi":  # fixed (H,) slopes, as a model's: the ring's steps run on cpu_flash, as a mask
        keywords["alibi_slopes"] = torch.rand(H, generator=gen, dtype=torch.float64) * 0.5
    if variant == "all":  # learned (B, H) slopes, one row per sequence: a gradient through the blocks' scores
        tensors["alibi_slopes"] = torch.rand(B, H, generator=gen, dtype=torch.float64) * 0.5
    if variant in ("sinks", "all"):
        tensors["sinks"] = torch.randn(H, generator=gen, dtype=torch.float64)
    if variant in ("score_mod", "all"):
        tensors["table"] = torch.randn(H, 2 * T - 1, generator=gen, dtype=torch.float64) * 0.5
    if variant == "window":
        keywords["window"] = (5, 2)
    if variant == "all":
        keywords["window"] = (6, None)
    if variant in ("softcap", "all"):
        keywords["softcap"] = 1.5
    if variant == "documents":  # the pair form: query ids and key ids apart
        keywords["documents"] = (_documents(B, T), _documents(B, T).clone())
    if variant == "all":
        keywords["documents"] = _documents(B, T)
    causal = variant not in ("window", "score_mod")
    return tensors, keywords, causal, "padding" if variant == "all" else "none"


def _bound(tensors: dict, keywords: dict, T: int) -> dict:
    """The keywords with the tensors in place (score_mod: a closure over the table)."""
    bound = dict(keywords)
    bound.update({n: x for n, x in tensors.items() if n != "table"})
    if "table" in tensors:
        bound["score_mod"] = _relative_bias(tensors["table"], T)
    return bound


def _one_process(q, k, v, grad, tensors, keywords, causal, key_mask, dtype):
    """mh.attention on the reference backend in `dtype`: output and every gradient by name."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    extra = {n: x.detach().to(dtype).requires_grad_() for n, x in tensors.items()}
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
    out = mh.attention(*leaves, attn_mask=mask, causal=causal, backend="reference",
                       **_bound(extra, keywords, q.shape[2]))
    (out * grad.to(dtype)).sum().backward()
    grads = {f"d{n}": x.grad for n, x in zip("qkv", leaves)} | {f"d{n}": x.grad for n, x in extra.items()}
    return out.detach(), grads


def _across(method, layout, q, k, v, grad, tensors, keywords, causal, key_mask):
    """The same on the ranks: parts in, output gathered; the variant tensors' gradients summed over ranks."""
    T = q.shape[2]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    extra = {n: x.detach().to(q.dtype).requires_grad_() for n, x in tensors.items()}
    bound = _bound(extra, keywords, T)
    if "documents" in bound:  # this part's ids, cut as key_mask; a pair, each of them
        ids = bound["documents"]
        cut = [shard_sequence(x, dim=1, layout=layout) for x in (ids if isinstance(ids, tuple) else (ids,))]
        bound["documents"] = tuple(cut) if isinstance(ids, tuple) else cut[0]
    parts = [shard_sequence(x, dim=2, layout=layout) for x in leaves]
    mask_part = None if key_mask is None else shard_sequence(key_mask, dim=1, layout=layout)
    out_part = METHODS[method](*parts, key_mask=mask_part, causal=causal, layout=layout, length=T, **bound)
    out = gather_sequence(out_part, dim=2, layout=layout, length=T)
    (out * grad).sum().backward()
    grads = {f"d{n}": x.grad for n, x in zip("qkv", leaves)}
    for n, x in extra.items():
        total = torch.zeros_like(x) if x.grad is None else x.grad.clone()
        dist.all_reduce(total)  # each rank holds its rows' (ring) or heads' (ulysses) share
        grads[f"d{n}"] = total
    return out.detach(), grads


def variant_case(name: str, N: int) -> dict:
    """One variant case's errors against float64, with the yardstick of the rule (float32 reference)."""
    method, layout, variant = name.split("/")
    T = {1: 7, 2: 19, 3: 23, 4: 29}[N]  # not divisible by N (nor 2N): padding in the last part
    B, H, G, D = 2, 2 * N, N, 8
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v = (torch.randn(B, h, T, D, generator=gen, dtype=torch.float64).float() for h in (H, G, G))
    grad = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).float()
    tensors, keywords, causal, mask = _family(variant, B, H, T, gen)
    key_mask = None
    if mask == "padding":
        key_mask = torch.ones(B, T, dtype=torch.bool)
        key_mask[1, T // 3:] = False
    golden, golden_grads = _one_process(q, k, v, grad, tensors, keywords, causal, key_mask, torch.float64)
    naive, naive_grads = _one_process(q, k, v, grad, tensors, keywords, causal, key_mask, torch.float32)
    out, grads = _across(method, layout, q, k, v, grad, tensors, keywords, causal, key_mask)
    errors = {"out": _err(out, golden)} | {n: _err(g, golden_grads[n]) for n, g in grads.items()}
    yardstick = {"out": _err(naive, golden)} | {n: _err(naive_grads[n], golden_grads[n]) for n in grads}
    return {"errors": errors, "yardstick": yardstick, "finite": all(bool(torch.isfinite(x).all())
                                                                     for x in (out, *grads.values()))}


def variant_cases(N: int) -> dict:
    return {name: attempt(lambda: variant_case(name, N)) for name in variant_names(N)}


SKIP_CASES = {  # name -> (layout, causal, window, document length or None, global length per rank)
    "contiguous/causal": ("contiguous", True, None, None, 6),
    "contiguous/window": ("contiguous", False, (0, 3), None, 6),
    "contiguous/documents": ("contiguous", False, None, 6, 6),
    "zigzag/causal window": ("zigzag", True, (2, None), None, 6),
    "zigzag/window (0, 0)": ("zigzag", False, (0, 0), None, 4),
    "zigzag/documents": ("zigzag", True, None, 3, 6),
    "zigzag/window, padding": ("zigzag", False, (2, 1), None, 5),
}


def _dead_blocks(layout, causal, window, ids, T, N, rank) -> int:
    """The steps whose block no (query, key) pair of real tokens may attend, from the one-process mask."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (j >= i - window[0]) & (True if window[1] is None else j <= i + window[1])
    if ids is not None:
        allowed &= (ids[:, :, None] == ids[:, None, :]).any(dim=0)  # (B, T, T) -> (T, T): some batch row
    sharding = Sharding(layout, T, N)
    rows = sharding.positions(rank)[sharding.positions(rank) < T]  # this rank's real queries
    dead = 0
    for source in range(N):
        cols = sharding.positions(source)[sharding.positions(source) < T]
        dead += not bool(allowed[rows][:, cols].any())
    return dead


def skipped_steps() -> dict:
    """Per case: the ring's (computed, skipped) forward steps on this rank, the count the one-process mask
    gives, and the output's error against attention_ref (float64)."""
    from multihead.distributed.ring import ring_steps

    N, rank = dist.get_world_size(), dist.get_rank()
    found = {}
    for name, (layout, causal, window, doc_length, per_rank) in SKIP_CASES.items():
        T = per_rank * N
        q, k, v = inputs(B=2, H=2, G=1, T=T)
        ids = None if doc_length is None else (torch.arange(T) // doc_length).repeat(2, 1)  # (B, T)
        parts = [shard_sequence(x, 2, layout=layout) for x in (q, k, v)]
        family = {} if ids is None else {"documents": shard_sequence(ids, 1, layout=layout)}
        ring_steps(reset=True)
        with torch.no_grad():
            out = ring_attention(*parts, causal=causal, window=window, layout=layout, length=T, **family)
        steps = ring_steps()
        full = gather_sequence(out, 2, layout=layout, length=T)
        expected = attention_ref(q, k, v, causal=causal, variants=make_call(
            q, k, v, window=window, documents=ids).variants).out
        dead = _dead_blocks(layout, causal, window, ids, T, N, rank)
        found[name] = {"steps": tuple(steps), "expected": (N - dead, dead), "error": _err(full, expected)}
    return found


def module_variants_case(method: str, layout: str, T: int) -> dict:
    """MultiHeadAttention with a window, softcap, ALiBi and learned sinks: context-parallel against one process."""
    torch.manual_seed(0)
    C, H, G = 24, 6, 2 if method == "ring" else dist.get_world_size()
    mha = mh.MultiHeadAttention(C, H, num_kv_heads=G, causal=True, rope=mh.RotaryEmbedding(C // H), window=(3, None),
                                softcap=4.0, alibi=True, sinks=True).double()
    with torch.no_grad():
        mha.sinks.copy_(torch.randn(H, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(2, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    single_x = x.clone().requires_grad_()
    expected = mha(single_x).output
    (expected * grad).sum().backward()
    expected_param = {n: p.grad.clone() for n, p in mha.named_parameters()}
    mha.zero_grad()
    cp = ContextParallel(length=T, layout=layout, method=method)
    leaf = x.clone().requires_grad_()
    y = gather_sequence(mha(shard_sequence(leaf, dim=1, layout=layout), context_parallel=cp).output, dim=1,
                        layout=layout, length=T)
    (y * grad).sum().backward()
    worst = {"out": _err(y, expected), "dx": _err(leaf.grad, single_x.grad)}
    for n, p in mha.named_parameters():  # each rank's share, summed over ranks: the sinks' included
        total = p.grad.clone()
        dist.all_reduce(total)
        worst[n] = _err(total, expected_param[n])
    return worst


# -- the module and model paths ------------------------------------------------------------------------


def module_case(method: str, layout: str, T: int) -> dict:
    """MultiHeadAttention with RoPE and GQA, causal, padded: context-parallel against one process, float64."""
    torch.manual_seed(0)
    C, H, G = 24, 6, 2 if method == "ring" else dist.get_world_size()
    rope = mh.RotaryEmbedding(C // H)
    mha = mh.MultiHeadAttention(C, H, num_kv_heads=G, causal=True, rope=rope).double()
    x = torch.randn(2, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[0, T - 3:] = False
    grad = torch.randn(2, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    single_x = x.clone().requires_grad_()
    expected = mha(single_x, key_mask=key_mask).output
    (expected * grad).sum().backward()
    expected_param = {n: p.grad.clone() for n, p in mha.named_parameters()}
    mha.zero_grad()

    cp = ContextParallel(length=T, layout=layout, method=method)
    leaf = x.clone().requires_grad_()
    y_part = mha(shard_sequence(leaf, dim=1, layout=layout), key_mask=shard_sequence(key_mask, dim=1, layout=layout),
                 context_parallel=cp).output
    y = gather_sequence(y_part, dim=1, layout=layout, length=T)
    (y * grad).sum().backward()
    real = key_mask.unsqueeze(-1)  # padded tokens' outputs are not compared (one process gives them a value)
    param_errors = {}
    for n, p in mha.named_parameters():  # each rank's parameter gradients cover its part: summed over ranks
        total = p.grad.clone()
        dist.all_reduce(total)
        param_errors[n] = _err(total, expected_param[n])
    return {"out": _err(torch.where(real, y, 0), torch.where(real, expected, 0)),
            "dx": _err(leaf.grad, single_x.grad), "params": param_errors}


def model_case(name: str, T: int) -> dict:
    """A tiny random GPT-2 (learned positions) or Llama (RoPE, GQA): context-parallel logits against one process."""
    from multihead.models.gpt2 import GPT2, GPT2Config
    from multihead.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    if name == "gpt2":
        model = GPT2(GPT2Config(vocab_size=50, max_positions=64, d_model=32, num_layers=2, num_heads=4))
    else:
        model = Llama(LlamaConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  d_mlp=48))
    model = model.double().eval()
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(3))
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[1, T // 2:] = False
    expected = model(ids, key_mask=key_mask).logits
    cp = ContextParallel(length=T, layout="zigzag")
    part = model(shard_sequence(ids, dim=1), key_mask=shard_sequence(key_mask, dim=1), context_parallel=cp).logits
    logits = gather_sequence(part, dim=1, length=T)
    real = key_mask.unsqueeze(-1)
    return {"logits": _err(torch.where(real, logits, 0), torch.where(real, expected, 0))}


# -- the agreement's toll: what each call sends -------------------------------------------------------


COUNTED = ("all_gather", "all_gather_object", "batch_isend_irecv", "all_to_all_single")  # torch.distributed's
HOST_READS = ("tolist", "item")  # Tensor methods that copy to the host (on a GPU: a sync)


@contextlib.contextmanager
def counting(counts: dict):
    """Count, inside, each call of the collectives above and of the host reads (this process only)."""
    patched = [(dist, name) for name in COUNTED] + [(torch.Tensor, name) for name in HOST_READS]
    originals = [getattr(owner, name) for owner, name in patched]

    def counted(name, f):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return f(*args, **kwargs)
        return wrapper

    for (owner, name), f in zip(patched, originals):
        setattr(owner, name, counted(name, f))
    try:
        yield counts
    finally:
        for (owner, name), f in zip(patched, originals):
            setattr(owner, name, f)


def collectives_counted() -> dict:
    """The collectives and host reads of a sequence of calls, one count dict per call (every rank the same)."""
    q, k, v = (shard_sequence(torch.randn(1, h, 11, 8, generator=torch.Generator().manual_seed(7)), dim=2)
               for h in (4, 2, 2))  # (1, ·, 11, 8) -> (1, ·, 6, 8): this rank's part, one padding token
    calls = {
        "ring, first": lambda: ring_attention(q, k, v, causal=True, length=11),
        "ring, again": lambda: ring_attention(q, k, v, causal=True, length=11),
        "ring, check=True": lambda: ring_attention(q, k, v, causal=True, length=11, check=True),
        "ring, causal flipped": lambda: ring_attention(q, k, v, causal=False, length=11),
        "ring, flipped again": lambda: ring_attention(q, k, v, causal=False, length=11),
        "ulysses, first": lambda: ulysses_attention(q, k, v, causal=True, length=11),
        "ulysses, again": lambda: ulysses_attention(q, k, v, causal=True, length=11),
        "ring, first again": lambda: ring_attention(q, k, v, causal=True, length=11),
    }
    found, outs = {}, {}
    with torch.no_grad():  # forward only: the counts are the forward's
        for name, call in calls.items():
            with counting({}) as counts:
                outs[name] = call()
            found[name] = {key: n for key, n in counts.items() if n}
    found["same output"] = all(torch.equal(outs["ring, first"], outs[name]) for name in
                               ("ring, again", "ring, check=True", "ring, first again"))
    return found


# -- edge cases against attention_ref, under the rule --------------------------------------------------


def inputs(B=2, H=2, G=2, T=9, D=8, Dv=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, G, T, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, G, T, Dv or D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def compare(method, q, k, v, *, key_mask=None, causal=True, layout="zigzag", scale=None, backend="auto",
            grad_of="qkv", transform=None) -> dict:
    """The distributed run's errors against attention_ref in float64, with the naive same-dtype yardstick."""
    T = q.shape[2]
    go = torch.randn(q.shape[0], q.shape[1], T, v.shape[-1], generator=torch.Generator().manual_seed(99),
                     dtype=torch.float64)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
    golden = [x.detach().double().requires_grad_(n in grad_of) for n, x in zip("qkv", (q, k, v))]
    (attention_ref(*golden, attn_mask=mask, causal=causal, scale=scale, upcast=True).out * go).sum().backward()
    naive = [x.detach().clone().requires_grad_(n in grad_of) for n, x in zip("qkv", (q, k, v))]
    naive_out = attention_ref(*naive, attn_mask=mask, causal=causal, scale=scale, upcast=False).out
    (naive_out * go.to(q.dtype)).sum().backward()
    leaves = [x.detach().clone().requires_grad_(n in grad_of) for n, x in zip("qkv", (q, k, v))]
    parts = [shard_sequence(x, dim=2, layout=layout) for x in leaves]
    if transform is not None:
        parts = transform(parts)
    mask_part = None if key_mask is None else shard_sequence(key_mask, dim=1, layout=layout)
    out_part = METHODS[method](*parts, key_mask=mask_part, causal=causal, layout=layout, length=T, scale=scale,
                               backend=backend)
    out = gather_sequence(out_part, dim=2, layout=layout, length=T)
    (out * go.to(q.dtype)).sum().backward()
    reference_out = attention_ref(*(x.detach().double() for x in (q, k, v)), attn_mask=mask, causal=causal,
                                  scale=scale, upcast=True).out
    result = {"out": (_err(out, reference_out), _err(naive_out, reference_out)), "dtype": str(out.dtype)}
    for n, a, b, c in zip("qkv", leaves, golden, naive):
        if n in grad_of:
            result["d" + n] = (None if a.grad is None else _err(a.grad, b.grad), _err(c.grad, b.grad))
    return result


def _rule(result) -> bool | str:
    """True when a compare() result is within docs/design.md's rule, else the result."""
    if result[0] != "ok":
        return f"{result}"
    r = result[1]
    ok = r["out"][0] <= 2 * r["out"][1] + 1e-5
    for key in ("dq", "dk", "dv"):
        if key in r:
            ok = ok and r[key][0] is not None and r[key][0] <= 3 * r[key][1] + 1e-5
    return True if ok else f"{r}"


def _strided(parts):
    out = []
    for p in parts:
        wide = torch.zeros(*p.shape[:-1], 2 * p.shape[-1], dtype=p.dtype)
        out.append(wide.index_add(-1, torch.arange(0, 2 * p.shape[-1], 2), p)[..., ::2])  # stride 2 in the last dim
    return out


def exactness() -> dict:
    found = {}
    q, k, v = inputs(H=2, G=2, T=9)
    empty = torch.ones(2, 9, dtype=torch.bool)
    empty[1] = False  # sequence 1: no real key
    empty[0, 0] = False  # query 0 of sequence 0: no key under the causal mask
    holes = torch.rand(2, 9, generator=torch.Generator().manual_seed(5)) > 0.5
    for method in METHODS:
        for dtype in (torch.float16, torch.bfloat16):
            found[f"{method}/{dtype}"] = _rule(attempt(lambda: compare(method, *inputs(T=9, dtype=dtype))))
        found[f"{method}/scale=0"] = _rule(attempt(lambda: compare(method, q, k, v, scale=0.0)))
        found[f"{method}/scale=-2"] = _rule(attempt(lambda: compare(method, q, k, v, scale=-2.0)))
        found[f"{method}/grad of v only"] = _rule(attempt(lambda: compare(method, q, k, v, grad_of="v")))
        found[f"{method}/strided"] = _rule(attempt(lambda: compare(method, q, k, v, transform=_strided)))
        found[f"{method}/transposed"] = _rule(attempt(lambda: compare(
            method, q, k, v, transform=lambda ps: [p.transpose(1, 2).contiguous().transpose(1, 2) for p in ps])))
        expanded = (q[:, :1].expand(2, 2, 9, 8), k[:1].expand(2, 2, 9, 8), v)
        found[f"{method}/expanded"] = _rule(attempt(lambda: compare(method, *expanded)))
        found[f"{method}/holes"] = _rule(attempt(lambda: compare(method, q, k, v, key_mask=holes)))
        for T in (1, 3):
            for layout in ("zigzag", "contiguous"):
                found[f"{method}/T={T}/{layout}"] = _rule(attempt(
                    lambda: compare(method, *inputs(T=T), layout=layout)))
    for method, backend in (("ring", "chunked"), ("ring", "reference"), ("ulysses", "sdpa")):
        found[f"{method}/{backend}"] = _rule(attempt(lambda: compare(method, q, k, v, backend=backend)))
        found[f"{method}/{backend}/empty rows"] = attempt(lambda: _empty_rows(method, backend, q, k, v, empty))
    return found


def _empty_rows(method, backend, q, k, v, key_mask) -> float:
    """The largest |output| or |dq| of the queries with no key: 0 exactly, as everywhere."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    parts = [shard_sequence(x, 2) for x in leaves]
    out = gather_sequence(METHODS[method](*parts, key_mask=shard_sequence(key_mask, 1), causal=True, length=9,
                                          backend=backend), 2, length=9)
    out.sum().backward()
    empty = [out[1], out[0, :, 0], leaves[0].grad[1], leaves[0].grad[0, :, 0]]
    if not all(bool(torch.isfinite(x).all()) for x in (out, *(leaf.grad for leaf in leaves))):
        return float("nan")
    return max(x.abs().max().item() for x in empty)


def gradients() -> dict:
    found = {}
    q, k, v = inputs(H=2, G=2, T=8)
    which = dist.get_rank()  # rank 0: only q requires grad; rank 1: only k

    for method, f in METHODS.items():
        def pattern():
            parts = [shard_sequence(x, 2).detach().requires_grad_(i == which) for i, x in enumerate((q, k, v))]
            f(*parts, causal=True, length=8).sum().backward()
            single = [x.clone().requires_grad_() for x in (q, k, v)]
            attention_ref(*single, causal=True).out.sum().backward()
            return _err(parts[which].grad, shard_sequence(single[which].grad, 2))
        found[f"{method}/grad pattern differs"] = attempt(pattern)

        def twice():
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = gather_sequence(f(*(shard_sequence(x, 2) for x in leaves), causal=True, length=8), 2, length=8)
            out.sum().backward(retain_graph=True)
            first = [x.grad.clone() for x in leaves]
            out.sum().backward()
            return max(_err(x.grad, 2 * g) for x, g in zip(leaves, first))
        found[f"{method}/backward twice"] = attempt(twice)

        def second_order():
            parts = [shard_sequence(x, 2).detach().requires_grad_() for x in (q, k, v)]
            out = f(*parts, causal=True, length=8, backend="reference")
            g = torch.autograd.grad((out ** 2).sum(), parts[0], create_graph=True)[0]
            dv = torch.autograd.grad((g ** 2).sum() + (parts[2] ** 2).sum(), parts[2])[0]
            single = [x.clone().requires_grad_() for x in (q, k, v)]
            g1 = torch.autograd.grad((attention_ref(*single, causal=True).out ** 2).sum(), single[0],
                                     create_graph=True)[0]
            dv1 = torch.autograd.grad((g1 ** 2).sum() + (single[2] ** 2).sum(), single[2])[0]
            return _err(dv, shard_sequence(dv1, 2))
        found[f"{method}/second order"] = attempt(second_order)
    return found


def layouts_and_gather() -> dict:
    found = {}
    ints = torch.arange(14).view(2, 7)
    found["int roundtrip, dim=-1"] = attempt(lambda: torch.equal(
        gather_sequence(shard_sequence(ints, dim=-1), dim=-1, length=7), ints))
    bools = ints % 3 == 0
    found["bool roundtrip, contiguous"] = attempt(lambda: torch.equal(gather_sequence(
        shard_sequence(bools, dim=1, layout="contiguous"), dim=1, layout="contiguous", length=7), bools))
    found["bool padding"] = attempt(lambda: shard_sequence(torch.ones(1, 3, dtype=torch.bool), dim=1).tolist())
    part = shard_sequence(torch.arange(8).view(1, 8), dim=1, layout="zigzag").clone()  # plain: the agreement's case
    layout = "zigzag" if dist.get_rank() == 0 else "contiguous"
    found["gather layouts differ"] = attempt(lambda: gather_sequence(part, dim=1, layout=layout, length=8).tolist())
    return found


def modules() -> dict:
    """MultiHeadAttention under context_parallel: what it refuses, and training with RoPE, GQA and padding."""
    found = {}
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    cp = ContextParallel(length=7)
    xp = shard_sequence(x, dim=1)
    mha = mh.MultiHeadAttention(16, 2, causal=True, dropout=0.1).double()
    found["dropout in training"] = attempt(lambda: mha.train()(xp, context_parallel=cp).output.shape)
    mha.eval()
    found["need_weights"] = attempt(lambda: mha(xp, context_parallel=cp, need_weights=True).output.shape)
    found["need_weights=0"] = attempt(lambda: mha(xp, context_parallel=cp, need_weights=0).output.shape)
    found["attn_mask"] = attempt(lambda: mha(xp, context_parallel=cp, attn_mask=torch.ones(4, 4, dtype=torch.bool)))
    found["cross"] = attempt(lambda: mha(xp, xp.clone(), context_parallel=cp).output.shape)
    found["not a ContextParallel"] = attempt(lambda: mha(xp, context_parallel="ring").output.shape)
    found["method"] = attempt(lambda: ContextParallel(length=7, method="tree"))
    rope = mh.MultiHeadAttention(16, 4, num_kv_heads=2, causal=True, rope=mh.RotaryEmbedding(4)).double().train()
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[1, 3:] = False
    for method in METHODS:
        def train():
            rope.zero_grad()
            y = rope(x, key_mask=key_mask).output
            (y * key_mask[..., None]).sum().backward()
            expected = {n: p.grad.clone() for n, p in rope.named_parameters()}
            rope.zero_grad()
            c = ContextParallel(length=7, method=method)
            part = rope(xp, key_mask=shard_sequence(key_mask, dim=1), context_parallel=c).output
            y_cp = gather_sequence(part, dim=1, length=7)
            (y_cp * key_mask[..., None]).sum().backward()
            worst = _err(y_cp * key_mask[..., None], y * key_mask[..., None])
            for n, p in rope.named_parameters():
                total = p.grad.clone()
                dist.all_reduce(total)
                worst = max(worst, _err(total, expected[n]))
            return worst
        found[f"train {method}"] = attempt(train)
    # the full sequence passed where the part belongs
    found["rope, full sequence"] = attempt(lambda: mh.MultiHeadAttention(16, 2, rope=mh.RotaryEmbedding(8))(
        x.float(), context_parallel=ContextParallel(length=7)).output.shape)
    return found


def models() -> dict:
    """GPT-2 and Llama with padding and odd lengths, and what they refuse."""
    from multihead.models.gpt2 import GPT2, GPT2Config
    from multihead.models.llama import Llama, LlamaConfig

    found = {}
    torch.manual_seed(0)
    gpt = GPT2(GPT2Config(vocab_size=50, max_positions=8, d_model=16, num_layers=2, num_heads=2)).double().eval()
    llama = Llama(LlamaConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                              d_mlp=16)).double().eval()
    for name, model, T in (("gpt2", gpt, 7), ("llama", llama, 9)):
        ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(T))
        key_mask = torch.ones(2, T, dtype=torch.bool)
        key_mask[1, T - 4:] = False
        for method, layout in (("ring", "zigzag"), ("ulysses", "contiguous")):
            def run():
                cp = ContextParallel(length=T, layout=layout, method=method)
                part = model(shard_sequence(ids, dim=1, layout=layout), key_mask=shard_sequence(key_mask, 1, layout),
                             context_parallel=cp).logits
                logits = gather_sequence(part, dim=1, layout=layout, length=T)
                return _err(logits * key_mask[..., None], model(ids, key_mask=key_mask).logits * key_mask[..., None])
            found[f"{name}/{method}"] = attempt(run)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    found["gpt2 beyond max_positions"] = attempt(
        lambda: gpt(shard_sequence(ids, dim=1), context_parallel=ContextParallel(length=9)).logits.shape)
    found["gpt2 full sequence"] = attempt(
        lambda: gpt(ids[:, :8], context_parallel=ContextParallel(length=8)).logits.shape)
    return found


# -- refusals: the same bad argument on every rank, or one rank's call different ---------------------------


BAD_ARGUMENTS = {  # name -> keyword arguments, each wrong on every rank
    "layout='zig'": dict(layout="zig"), "length=8.0": dict(length=8.0), "length=0": dict(length=0),
    "length=True": dict(length=True), "group='default'": dict(group="default"), "backend='nope'": dict(backend="nope"),
    "backend=None": dict(backend=None), "scale=nan": dict(scale=float("nan")), "scale=inf": dict(scale=float("inf")),
    "causal=1": dict(causal=1), "check=1": dict(check=1),
    "key_mask int": dict(key_mask=torch.ones(2, 4, dtype=torch.int64)),
    "key_mask (2, 5)": dict(key_mask=torch.ones(2, 5, dtype=torch.bool)),
    "length=100": dict(length=100),
    "window=(-1, 0)": dict(window=(-1, 0)), "sinks (3,)": dict(sinks=torch.zeros(3, dtype=torch.float64)),
    "documents float": dict(documents=torch.zeros(2, 4)),
}


def argument_errors() -> dict:
    """Every rank passes the same bad argument."""
    q, k, v = inputs(T=8)
    P = [shard_sequence(x, 2) for x in (q, k, v)]
    found = {}
    for method, f in METHODS.items():
        for name, kw in BAD_ARGUMENTS.items():
            found[f"{method}/{name}"] = attempt(lambda: f(*P, **kw).shape)
        found[f"{method}/k float32"] = attempt(lambda: f(P[0], P[1].float(), P[2]).shape)
    found["ring/sdpa"] = attempt(lambda: ring_attention(*P, backend="sdpa").shape)
    x = torch.randn(2, 3, 7)
    found["shard/dim"] = attempt(lambda: shard_sequence(x, dim=3).shape)
    found["shard/layout"] = attempt(lambda: shard_sequence(x, dim=1, layout="zz").shape)
    found["gather/length"] = attempt(lambda: gather_sequence(x, dim=2, length=100).shape)
    return found


def disagreements() -> dict:
    """Each argument valid on its own, different on rank 1 (rank 0's call agreed on by no earlier call).

    Plain parts (a clone does not carry shard_sequence's record of the cut): the agreement itself is the case."""
    r = dist.get_rank()
    q, k, v = inputs(T=8)
    P = [shard_sequence(x, 2).clone() for x in (q, k, v)]
    km = torch.ones(2, 4, dtype=torch.bool)
    cases = {
        "length": lambda: ring_attention(*P, length=8 if r == 0 else 7),
        "layout": lambda: ring_attention(*P, length=8, layout="zigzag" if r == 0 else "contiguous"),
        "dtype": lambda: ring_attention(*(P if r == 0 else [p.float() for p in P]), length=8),
        "key_mask": lambda: ring_attention(*P, length=8, key_mask=km if r == 0 else None),
        "scale": lambda: ring_attention(*P, length=8, scale=0.5 if r == 0 else None),
        "backend": lambda: ring_attention(*P, length=8, backend="chunked" if r == 0 else "cpu_flash"),
        "B": lambda: ring_attention(*(P if r == 0 else [p[:1] for p in P]), length=8),
        "grad": lambda: ring_attention(*(P if r == 0 else [p.clone().requires_grad_() for p in P]), length=8),
        "Dv": lambda: ring_attention(P[0], P[1], P[2] if r == 0 else P[2][..., :4], length=8),
        "variants": lambda: ulysses_attention(*P, length=8, window=(2, 0) if r == 0 else None),
    }
    found = {name: attempt(lambda: f().shape) for name, f in cases.items()}
    found["sdpa_on_rank_1"] = attempt(lambda: ring_attention(*P, length=8, backend="sdpa" if r == 1 else "auto").shape)
    return found


def one_rank_refuses(method: str) -> str:
    """Rank 1 passes a part one token too long; every rank must raise, and say which rank refused and why."""
    T = 16
    q = torch.randn(1, 2, T, 8)
    parts = [shard_sequence(x, dim=2) for x in (q, q[:, :1], q[:, :1])]
    if dist.get_rank() == 1:
        parts[0] = torch.cat([parts[0], parts[0][:, :, :1]], dim=2)
    try:
        METHODS[method](*parts, causal=True, length=T)
    except (RuntimeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def ranks_disagree() -> str:
    """Every rank's arguments are valid on their own, but rank 0 asks for causal and the others do not."""
    q = torch.randn(1, 2, 4, 8)
    try:
        ring_attention(q, q[:, :1], q[:, :1], causal=dist.get_rank() == 0)
    except (RuntimeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


ALONE_TIMEOUT = 30  # seconds a group of one of the cases below waits for a rank that never comes


def one_rank_differs() -> dict:
    """Rank 1's module or gather call differs from rank 0's, each case on a group of its own (ranks [0, 1]).

    Before their fixes these left the group broken (one rank raised, the other waited for it), so each
    has its own group: a regression fails that case at its group's timeout, not the rest of the job.
    Each result: (what the call gave, seconds it took)."""
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1], timeout=timedelta(seconds=ALONE_TIMEOUT)) for _ in range(3)]

    def timed(f):
        start = time.monotonic()
        return attempt(f), time.monotonic() - start

    torch.manual_seed(0)
    found = {}
    mha = mh.MultiHeadAttention(16, 2, causal=True)
    x = torch.randn(1, 8, 16)
    found["rank 1 asks for weights"] = timed(lambda: mha(
        shard_sequence(x, dim=1, group=groups[0]), context_parallel=ContextParallel(length=8, group=groups[0]),
        need_weights=rank == 1).output.shape)
    found["rank 1 gathers another length"] = timed(lambda: gather_sequence(
        torch.randn(1, 4), dim=1, length=8 if rank == 0 else 3, group=groups[1]).shape)
    double = mh.MultiHeadAttention(16, 2, causal=True).double()
    cp = ContextParallel(length=8, method="ring" if rank == 0 else "ulysses", group=groups[2])
    found["ranks call different methods"] = timed(lambda: double(
        shard_sequence(x.double(), dim=1, group=groups[2]), context_parallel=cp).output.shape)
    return found


def cuts() -> dict:
    """Parts used with another layout or length than they were cut with, on a group of their own.

    Once silently wrong (errors of 1.3-1.8, no exception): a part did not know how it was cut. T = 8 over
    2 ranks gives zigzag and contiguous parts of the same size, so only the record tells them apart. First
    on the fresh group, rank 0 cutting zigzag and rank 1 contiguous: rank 0's call is agreed on by no earlier
    call, so it enters the agreement and hears rank 1's refusal."""
    rank = dist.get_rank()
    group = dist.new_group([0, 1], timeout=timedelta(seconds=ALONE_TIMEOUT))
    q, k, v = inputs(H=2, G=1, T=8)
    found = {}
    mixed = [shard_sequence(x, 2, layout="zigzag" if rank == 0 else "contiguous", group=group) for x in (q, k, v)]
    found["rank 1 cut contiguous"] = attempt(lambda: ring_attention(*mixed, causal=True, length=8, group=group).shape)
    zigzag = [shard_sequence(x, 2, group=group) for x in (q, k, v)]
    for method, f in METHODS.items():
        found[f"{method}, called contiguous"] = attempt(lambda: f(*zigzag, causal=True, layout="contiguous",
                                                                  length=8, group=group).shape)
    seven = [shard_sequence(x[:, :, :7], 2, group=group) for x in (q, k, v)]  # padded to 8: the same part size
    found["ring, length not given"] = attempt(lambda: ring_attention(*seven, causal=True, group=group).shape)
    out = ring_attention(*zigzag, causal=True, length=8, group=group)
    found["gather the ring's output as contiguous"] = attempt(lambda: gather_sequence(
        out, 2, layout="contiguous", length=8, group=group).shape)
    found["gather a part as contiguous"] = attempt(lambda: gather_sequence(
        shard_sequence(torch.arange(8).view(1, 8), 1, group=group), 1, layout="contiguous", group=group).shape)
    plain = ring_attention(*(p.detach().clone() for p in zigzag), causal=True, length=8, group=group)
    found["plain parts as told"] = attempt(lambda: _err(gather_sequence(plain, 2, length=8, group=group),
                                                        attention_ref(q, k, v, causal=True).out))
    torch.manual_seed(0)
    mha = mh.MultiHeadAttention(16, 2, causal=True).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    cp = ContextParallel(length=8, group=group)  # zigzag
    found["module"] = attempt(lambda: mha(shard_sequence(x, 1, layout="contiguous", group=group),
                                          context_parallel=cp).output.shape)
    from multihead.models.llama import Llama, LlamaConfig

    llama = Llama(LlamaConfig(vocab_size=50, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_mlp=16))
    ids = torch.arange(8).view(1, 8)
    found["model"] = attempt(lambda: llama(shard_sequence(ids, 1, layout="contiguous", group=group),
                                           context_parallel=cp).logits.shape)
    return found


def one_rank_changes_its_call():
    """The ranks agree on a call; then rank 1 flips causal while rank 0 repeats it: with check=True, and without.

    On a group of its own, with a short timeout: the unchecked call is found only when that group times out."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=3))  # how long the unchecked call waits
    q = shard_sequence(torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0)), dim=2)
    agreed = attempt(lambda: ring_attention(q, q, q, causal=True, length=8, group=group).shape)
    changed = dist.get_rank() == 0
    checked = attempt(lambda: ring_attention(q, q, q, causal=changed, length=8, group=group, check=True).shape)
    unchecked = attempt(lambda: ring_attention(q, q, q, causal=changed, length=8, group=group).shape)
    return agreed, checked, unchecked


# -- world 3's sub-groups and world 1 -------------------------------------------------------------------


def subgroups() -> dict:
    """World 3: parts that are all padding but one token, and a ring on the sub-groups [0, 1] and [1, 2]."""
    found = {}
    rank = dist.get_rank()
    for method in METHODS:
        for layout in ("zigzag", "contiguous"):
            found[f"{method}/T=1/{layout}"] = _rule(attempt(lambda: compare(method, *inputs(H=3, G=3, T=1),
                                                                         layout=layout)))
    g01, g12 = dist.new_group([0, 1]), dist.new_group([1, 2])  # every rank makes every group
    q, k, v = inputs(H=2, G=1, T=7)

    def on(group):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        parts = [shard_sequence(x, 2, group=group) for x in leaves]
        out = gather_sequence(ring_attention(*parts, causal=True, length=7, group=group), 2, length=7, group=group)
        out.sum().backward()
        single = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = attention_ref(*single, causal=True).out
        expected.sum().backward()
        return max([_err(out, expected)] + [_err(a.grad, b.grad) for a, b in zip(leaves, single)])

    if rank in (0, 1):
        found["group [0, 1]"] = attempt(lambda: on(g01))
    if rank in (1, 2):
        found["group [1, 2]"] = attempt(lambda: on(g12))
    if rank == 2:
        found["not a member"] = attempt(lambda: ring_attention(*(x[:, :, :4] for x in (q, k, v)), group=g01).shape)
    dist.barrier()
    return found


def ring_forward_without_grad() -> tuple:
    """The ring's forward under no_grad (world 1: the blocks stay on the rank) against attention_ref."""
    q, k, v = inputs(T=6)
    with torch.no_grad():
        return attempt(lambda: _err(ring_attention(*(shard_sequence(x, 2) for x in (q, k, v)), causal=True, length=6),
                                    attention_ref(q, k, v, causal=True).out))


# -- one job per world size ------------------------------------------------------------------------------


def everything(N: int) -> dict:
    """What one rank of the world-size-N job runs, in an order that keeps the cases apart (module docstring)."""
    results = {"toll": collectives_counted() if N == 2 else None}  # first: before any other agreement
    if N == 2:  # rank 0's disagreeing calls: before any call of the same signature is agreed on
        results.update(arguments=argument_errors(), disagree=disagreements(), exact=exactness(),
                       gradients=gradients(), layouts=layouts_and_gather(), modules=modules(), models=models())
    results["attention"] = attention_cases(cases_for(N))
    results["variants"] = variant_cases(N)
    if N >= 2:
        results["skipped steps"] = skipped_steps()
    results["module"] = {f"{m}-{layout}": module_case(m, layout, 4 * N + 3) for m, layout in MODULE_CASES[N]}
    if N in (2, 3):
        results["module variants"] = {f"{m}-{layout}": attempt(lambda: module_variants_case(m, layout, 4 * N + 3))
                                      for m, layout in MODULE_CASES[N]}
    if N == 1:
        results["ring forward"] = ring_forward_without_grad()
    if N == 2:
        results["model"] = {name: model_case(name, 13) for name in ("gpt2", "llama")}
    if N >= 3:
        results["refused"] = {m: one_rank_refuses(m) for m in METHODS}
        results["disagree"] = ranks_disagree()
    if N == 3:
        results["subgroups"] = subgroups()
    if N == 2:  # last: on groups of their own, which they may break
        results["cuts"] = cuts()
        results["one rank differs"] = one_rank_differs()
        results["changes its call"] = one_rank_changes_its_call()
    results["rank"] = dist.get_rank()
    return results


TIMEOUT = 240.0  # seconds for one world size's whole job (4 processes on 2 busy cores take about a minute)
_DONE: dict = {}


def job(N: int, shared=None) -> list:
    """Every rank's results of everything(N), run once per test session.

    shared: a folder that every pytest-xdist worker of this run sees (tmp_path_factory's base's parent): the
    first worker to ask runs the job and leaves its outcome there, the others wait for it and read it."""
    from multihead.distributed.local import RankFailed, run_local

    def run():
        try:
            return True, run_local(everything, N, (N,), timeout=TIMEOUT)
        except RankFailed as failure:
            return False, str(failure)

    if N not in _DONE:
        if shared is None or "PYTEST_XDIST_WORKER" not in os.environ:
            _DONE[N] = run()
        else:
            import fcntl

            with open(os.path.join(shared, f"distributed-job-{N}.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                path = os.path.join(shared, f"distributed-job-{N}.pickle")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        _DONE[N] = pickle.load(f)
                else:
                    _DONE[N] = run()
                    with open(path, "wb") as f:
                        pickle.dump(_DONE[N], f)
    ok, value = _DONE[N]
    if not ok:
        raise RankFailed(value)
    return value


def mismatches(result, kind: str, *words: str) -> list:
    """What in a rank's (error kind, message) differs from the expected kind and words: [] when nothing."""
    if result[0] != kind:
        return [("kind", kind, result)]
    return [(word, result) for word in words if word not in result[1]]


# -- run_local itself: jobs that fail -------------------------------------------------------------------


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("this result cannot be pickled")


def raise_on_rank(rank: int) -> int:
    """Rank `rank` raises; the others wait for it in a barrier: only the failure (or the timeout) ends them."""
    if dist.get_rank() == rank:
        raise KeyError(f"rank {rank} fails on purpose")
    dist.barrier()
    return dist.get_rank()


def unpicklable_or_exit():
    """Rank 0 returns what cannot be pickled, rank 1's process exits with code 3 without answering.

    Both first meet in a barrier: gloo's init can return on rank 0 while rank 1 still connects, and rank 0
    leaving then made rank 1's init fail (seen once under load) instead of its exit with code 3."""
    dist.barrier()
    if dist.get_rank() == 1:
        os._exit(3)
    return _Unpicklable()


def sleep_forever():
    time.sleep(3600)


def rank():
    return dist.get_rank()
