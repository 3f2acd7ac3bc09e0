"""What each rank runs in tests/test_distributed_adversarial.py (importable by spawned processes).

Every function here runs on every rank of a `run_local` job and returns plain
values (errors as (type name, message) pairs), so the tests can assert in the
parent. Inputs come from fixed seeds: every rank builds the same full tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import multihead as mh
from multihead.backends.reference import attention_ref
from multihead.distributed import ContextParallel, gather_sequence, ring_attention, shard_sequence, ulysses_attention

METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}


def attempt(f):
    """("ok", value) or (exception type name, message)."""
    try:
        return ("ok", f())
    except Exception as exc:  # every failure is a result to assert on
        return (type(exc).__name__, str(exc))


def inputs(B=2, H=2, G=2, T=9, D=8, Dv=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, G, T, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, G, T, Dv or D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


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
    result = {"out": (err(out, reference_out), err(naive_out, reference_out)), "dtype": str(out.dtype)}
    for n, a, b, c in zip("qkv", leaves, golden, naive):
        if n in grad_of:
            result["d" + n] = (None if a.grad is None else err(a.grad, b.grad), err(c.grad, b.grad))
    return result


# -- world 2: one job, many checks ---------------------------------------------------------------------


def _argument_errors() -> dict:
    """Every rank passes the same bad argument."""
    q, k, v = inputs(T=8)
    P = [shard_sequence(x, 2) for x in (q, k, v)]
    cases = {
        "layout": dict(layout="zig"), "length": dict(length=8.0), "length ": dict(length=0),
        "length  ": dict(length=True), "group": dict(group="default"), "backend": dict(backend="nope"),
        "backend ": dict(backend=None), "scale": dict(scale=float("nan")), "scale ": dict(scale=float("inf")),
        "causal": dict(causal=1), "check": dict(check=1),
        "key_mask": dict(key_mask=torch.ones(2, 4, dtype=torch.int64)),
        "key_mask ": dict(key_mask=torch.ones(2, 5, dtype=torch.bool)),
    }
    found = {}
    for method, f in METHODS.items():
        for name, kw in cases.items():
            found[f"{method}/{name}"] = attempt(lambda: f(*P, **kw).shape)
        found[f"{method}/length_too_big"] = attempt(lambda: f(*P, length=100).shape)
        found[f"{method}/k_dtype"] = attempt(lambda: f(P[0], P[1].float(), P[2]).shape)
    found["ring/sdpa"] = attempt(lambda: ring_attention(*P, backend="sdpa").shape)
    x = torch.randn(2, 3, 7)
    found["shard/dim"] = attempt(lambda: shard_sequence(x, dim=3).shape)
    found["shard/layout"] = attempt(lambda: shard_sequence(x, dim=1, layout="zz").shape)
    found["gather/length"] = attempt(lambda: gather_sequence(x, dim=2, length=100).shape)
    return found


def _disagreements() -> dict:
    """Each argument valid on its own, different on rank 1."""
    r = dist.get_rank()
    q, k, v = inputs(T=8)
    P = [shard_sequence(x, 2) for x in (q, k, v)]
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
    }
    found = {name: attempt(lambda: f().shape) for name, f in cases.items()}
    found["sdpa_on_rank_1"] = attempt(lambda: ring_attention(*P, length=8, backend="sdpa" if r == 1 else "auto").shape)
    return found


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


def _exactness() -> dict:
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


def _gradients() -> dict:
    found = {}
    q, k, v = inputs(H=2, G=2, T=8)
    which = dist.get_rank()  # rank 0: only q requires grad; rank 1: only k

    for method, f in METHODS.items():
        def pattern():
            parts = [shard_sequence(x, 2).detach().requires_grad_(i == which) for i, x in enumerate((q, k, v))]
            f(*parts, causal=True, length=8).sum().backward()
            single = [x.clone().requires_grad_() for x in (q, k, v)]
            attention_ref(*single, causal=True).out.sum().backward()
            return err(parts[which].grad, shard_sequence(single[which].grad, 2))
        found[f"{method}/grad pattern differs"] = attempt(pattern)

        def twice():
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = gather_sequence(f(*(shard_sequence(x, 2) for x in leaves), causal=True, length=8), 2, length=8)
            out.sum().backward(retain_graph=True)
            first = [x.grad.clone() for x in leaves]
            out.sum().backward()
            return max(err(x.grad, 2 * g) for x, g in zip(leaves, first))
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
            return err(dv, shard_sequence(dv1, 2))
        found[f"{method}/second order"] = attempt(second_order)
    return found


def _layouts_and_gather() -> dict:
    found = {}
    ints = torch.arange(14).view(2, 7)
    found["int roundtrip, dim=-1"] = attempt(lambda: torch.equal(
        gather_sequence(shard_sequence(ints, dim=-1), dim=-1, length=7), ints))
    bools = ints % 3 == 0
    found["bool roundtrip, contiguous"] = attempt(lambda: torch.equal(gather_sequence(
        shard_sequence(bools, dim=1, layout="contiguous"), dim=1, layout="contiguous", length=7), bools))
    found["bool padding"] = attempt(lambda: shard_sequence(torch.ones(1, 3, dtype=torch.bool), dim=1).tolist())
    part = shard_sequence(torch.arange(8).view(1, 8), dim=1, layout="zigzag")
    layout = "zigzag" if dist.get_rank() == 0 else "contiguous"
    found["gather layouts differ"] = attempt(lambda: gather_sequence(part, dim=1, layout=layout, length=8).tolist())
    return found


def _modules() -> dict:
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
            worst = err(y_cp * key_mask[..., None], y * key_mask[..., None])
            for n, p in rope.named_parameters():
                total = p.grad.clone()
                dist.all_reduce(total)
                worst = max(worst, err(total, expected[n]))
            return worst
        found[f"train {method}"] = attempt(train)
    # the full sequence passed where the part belongs
    found["rope, full sequence"] = attempt(lambda: mh.MultiHeadAttention(16, 2, rope=mh.RotaryEmbedding(8))(
        x.float(), context_parallel=ContextParallel(length=7)).output.shape)
    return found


def _models() -> dict:
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
                return err(logits * key_mask[..., None], model(ids, key_mask=key_mask).logits * key_mask[..., None])
            found[f"{name}/{method}"] = attempt(run)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    found["gpt2 beyond max_positions"] = attempt(
        lambda: gpt(shard_sequence(ids, dim=1), context_parallel=ContextParallel(length=9)).logits.shape)
    found["gpt2 full sequence"] = attempt(
        lambda: gpt(ids[:, :8], context_parallel=ContextParallel(length=8)).logits.shape)
    return found


def one_rank_changes_its_call():
    """The ranks agree on a call; then rank 1 flips causal while rank 0 repeats it: with check=True, and without.

    On a group of its own, with a short timeout: the unchecked call is found only when that group times out."""
    from datetime import timedelta

    group = dist.new_group([0, 1], timeout=timedelta(seconds=3))  # how long the unchecked call waits
    q = shard_sequence(torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0)), dim=2)
    agreed = attempt(lambda: ring_attention(q, q, q, causal=True, length=8, group=group).shape)
    changed = dist.get_rank() == 0
    checked = attempt(lambda: ring_attention(q, q, q, causal=changed, length=8, group=group, check=True).shape)
    unchecked = attempt(lambda: ring_attention(q, q, q, causal=changed, length=8, group=group).shape)
    return agreed, checked, unchecked


def world_two() -> dict:
    found = {"arguments": _argument_errors(), "disagree": _disagreements(), "exact": _exactness(),
             "gradients": _gradients(), "layouts": _layouts_and_gather(), "modules": _modules(), "models": _models()}
    found["changes its call"] = one_rank_changes_its_call()  # last: it breaks its own group (not the default one)
    return found


# -- world 3 and world 1 -----------------------------------------------------------------------------------


def world_three() -> dict:
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
        return max([err(out, expected)] + [err(a.grad, b.grad) for a, b in zip(leaves, single)])

    if rank in (0, 1):
        found["group [0, 1]"] = attempt(lambda: on(g01))
    if rank in (1, 2):
        found["group [1, 2]"] = attempt(lambda: on(g12))
    if rank == 2:
        found["not a member"] = attempt(lambda: ring_attention(*(x[:, :, :4] for x in (q, k, v)), group=g01).shape)
    dist.barrier()
    return found


def world_one() -> dict:
    q, k, v = inputs(T=6)
    found = {}
    for method in METHODS:
        found[method] = _rule(attempt(lambda: compare(method, q, k, v)))
    with torch.no_grad():
        found["ring forward"] = attempt(lambda: err(ring_attention(*(shard_sequence(x, 2) for x in (q, k, v)),
                                                                   causal=True, length=6),
                                                    attention_ref(q, k, v, causal=True).out))
    return found


# -- one rank differs: each alone in a job, as it may break the group ------------------------------------------


def rank_1_asks_for_weights():
    torch.manual_seed(0)
    mha = mh.MultiHeadAttention(16, 2, causal=True)
    x = torch.randn(1, 8, 16)
    return attempt(lambda: mha(shard_sequence(x, dim=1), context_parallel=ContextParallel(length=8),
                               need_weights=dist.get_rank() == 1).output.shape)


def rank_1_gathers_another_length():
    return attempt(lambda: gather_sequence(torch.randn(1, 4), dim=1, length=8 if dist.get_rank() == 0 else 3).shape)


def ranks_call_different_methods():
    torch.manual_seed(0)
    mha = mh.MultiHeadAttention(16, 2, causal=True).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    cp = ContextParallel(length=8, method="ring" if dist.get_rank() == 0 else "ulysses")
    return attempt(lambda: mha(shard_sequence(x, dim=1), context_parallel=cp).output.shape)


# -- run_local itself --------------------------------------------------------------------------------------


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("this result cannot be pickled")


def unpicklable_result():
    return _Unpicklable()


def exit_on_rank_1():
    import os

    if dist.get_rank() == 1:
        os._exit(3)
    return dist.get_rank()


def sleep_forever():
    import time

    time.sleep(3600)


def rank():
    return dist.get_rank()
