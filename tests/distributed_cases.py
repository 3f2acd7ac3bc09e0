"""What each rank runs in tests/test_distributed.py (importable by spawned processes).

Every rank builds the same full inputs from a seed, cuts its part, runs the
context-parallel attention, gathers the output, and backpropagates one loss
computed identically on every rank; the gradients of the full inputs then come
back through shard_sequence. The reference is single-process: attention_ref
in float64, and attention_ref / multihead.attention in the case's dtype for
the rule's yardstick. Each rank returns the measured errors; the tests assert.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

import multihead
from multihead.backends.reference import attention_ref
from multihead.distributed import ContextParallel, gather_sequence, ring_attention, shard_sequence, ulysses_attention


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
    return multihead.attention(q, k, v, attn_mask=mask, causal=causal)


def _distributed(case: Case, q, k, v, key_mask, grad):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    parts = [shard_sequence(x, dim=2, layout=case.layout) for x in leaves]
    mask_part = None if key_mask is None else shard_sequence(key_mask, dim=1, layout=case.layout)
    attend = ring_attention if case.method == "ring" else ulysses_attention
    out_part = attend(*parts, key_mask=mask_part, causal=case.causal, layout=case.layout, length=case.T)
    out = gather_sequence(out_part, dim=2, layout=case.layout, length=case.T)
    (out * grad).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


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


# -- the module path -------------------------------------------------------------------------------


def module_case(method: str, layout: str, T: int) -> dict:
    """MultiHeadAttention with RoPE and GQA, causal, padded: context-parallel against one process, float64."""
    torch.manual_seed(0)
    C, H, G = 24, 6, 2 if method == "ring" else dist.get_world_size()
    rope = multihead.RotaryEmbedding(C // H)
    mha = multihead.MultiHeadAttention(C, H, num_kv_heads=G, causal=True, rope=rope).double()
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


# -- failures ------------------------------------------------------------------------------------


def one_rank_refuses(method: str) -> str:
    """Rank 1 passes a part one token too long; every rank must raise, and say which rank refused and why."""
    T = 16
    q = torch.randn(1, 2, T, 8)
    parts = [shard_sequence(x, dim=2) for x in (q, q[:, :1], q[:, :1])]
    if dist.get_rank() == 1:
        parts[0] = torch.cat([parts[0], parts[0][:, :, :1]], dim=2)
    attend = ring_attention if method == "ring" else ulysses_attention
    try:
        attend(*parts, causal=True, length=T)
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


def raise_on_rank(rank: int) -> int:
    if dist.get_rank() == rank:
        raise KeyError(f"rank {rank} fails on purpose")
    dist.barrier()  # the others wait for it: only the timeout or the failure ends this
    return dist.get_rank()
