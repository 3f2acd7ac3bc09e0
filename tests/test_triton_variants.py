"""The attention variants inside the Triton kernels against the float64 reference, under the 2x/3x rule.

window, softcap, ALiBi, sinks and documents run inside the forward, the backward (dq, dk, dv; the
sinks' gradient from the lse) and the split-KV decode kernels (backends/triton/variants.py). On the CPU
they run in triton's interpreter, fp32, at small sizes (T, S in {1, 17, 33}, T != S, GQA): each variant
alone and all of them together, output, lse and gradients. The golden value is the reference backend
in float64, the yardstick the same reference in the kernels' dtype. Tiles that the window rules out are
skipped: the interpreter lets a test count the tiles each kernel visits. A score_mod is refused with its
reason. Where CUDA is present the `test_gpu_*` test runs the compiled kernels in fp16 and bf16 (`make
gpu-check` selects it); without CUDA it skips.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import multihead as mh
from multihead.backends import triton as tb
from multihead.backends.triton import configs
from multihead.backends.reference import ReferenceBackend, attention_ref
from multihead.core.call import make_call
from multihead.core.variants import Positions
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR, make_qkv, max_err

pytestmark = [pytest.mark.skipif(not tb.triton_installed(), reason="triton is not installed"),
              pytest.mark.usefixtures("triton_interpreter")]

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _variant_args(variants: dict, dtype: torch.dtype, inputs_dtype: torch.dtype) -> dict:
    """The variants' float tensors as fresh leaves in `dtype` (sinks requiring grad): the sinks first rounded
    to the inputs' dtype, as a model in that dtype holds them, so that the golden value sees the same ones;
    the ALiBi slopes in float32 at least (the calls promote them so)."""
    out = {}
    for name, value in variants.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            stored = inputs_dtype if name == "sinks" else torch.promote_types(inputs_dtype, torch.float32)
            value = value.detach().to(stored).to(dtype).requires_grad_(name == "sinks")
        out[name] = value
    return out


def _lse_err(lse: torch.Tensor, golden: torch.Tensor) -> float:
    """Max error of the finite lse values; rows of -inf must be -inf in both."""
    assert torch.equal(torch.isneginf(lse), torch.isneginf(golden)), "rows without a key differ"
    finite = torch.isfinite(golden)
    return max_err(lse[finite], golden[finite])


def _run(role, q, k, v, causal, launch, variants, grad_out):
    """(out, lse, grads of q, k, v and sinks) of one role: the kernels, the golden float64 reference, or the
    naive reference in the inputs' dtype (conftest's: attention_ref without upcasting; its lse from the
    reference backend)."""
    dtype = torch.float64 if role == "golden" else q.dtype
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    extra = _variant_args(variants, dtype, q.dtype)
    if role == "triton" and launch is not None:
        out, lse = tb.triton_attention(*xs, causal=causal, **extra, **launch)
    elif role == "naive":
        checked = make_call(*xs, causal=causal, **extra).variants
        out = attention_ref(*xs, causal=causal, upcast=False, variants=checked).out
        with torch.no_grad():
            lse = mh.attention(*xs, causal=causal, backend="reference", return_lse=True, **extra).lse
    else:
        backend = "triton" if role == "triton" else "reference"
        out, lse = mh.attention(*xs, causal=causal, backend=backend, return_lse=True, **extra)
    leaves = xs + ([extra["sinks"]] if "sinks" in extra else [])
    return (out, lse, *torch.autograd.grad(out, leaves, grad_out.to(dtype)))


def check_variants(q, k, v, *, causal=False, launch=None, **variants):
    """Triton (out, lse, dq, dk, dv, d sinks) against the reference under the rule; returns the errors.

    launch: tiles and the decode path (`triton_attention`'s block_m, block_n, decode, num_splits);
    None runs through `multihead.attention(backend="triton")`, the registry's door.
    """
    gen = torch.Generator().manual_seed(1234)
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen, dtype=torch.float64).to(q.device)
    results = {role: _run(role, q, k, v, causal, launch, variants, grad_out) for role in ("triton", "golden", "naive")}
    errors = {}
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv", "dsinks"][:len(results["triton"])]):
        got, golden, naive = (results[role][i] for role in ("triton", "golden", "naive"))
        measure = _lse_err if name == "lse" else max_err
        err, naive_err = measure(got, golden), measure(naive, golden)
        factor = OUT_FACTOR if name in ("out", "lse") else GRAD_FACTOR
        assert err <= factor * naive_err + ABS_SLACK, f"{name} error {err:.3g} > {factor} x naive {naive_err:.3g}"
        errors[name] = (err, naive_err)
    return errors


def _documents(B, T, S, seed, shared=False):
    """Document ids: queries and keys in a few documents, unsorted, one query document absent from the keys."""
    gen = torch.Generator().manual_seed(seed)
    q_ids = torch.randint(0, 4, (B, T), generator=gen)
    if shared:
        return q_ids
    kv_ids = torch.randint(0, 3, (B, S), generator=gen)  # document 3 has no key: its queries see nothing
    return q_ids, kv_ids


# (name, T, S, causal, variants, launch): each variant alone once, with GQA (H = 4, G = 2), T != S, lengths
# off the tile of 16; tiles of 16 where a window or the documents cut several tiles (and rule some out)
SINGLE = [
    ("window", 17, 33, False, dict(window=(6, 3)), dict(block_m=16, block_n=16)),
    ("window-causal", 33, 17, True, dict(window=(5, None)), dict(block_m=16, block_n=16)),
    ("softcap", 33, 17, False, dict(softcap=1.5), None),
    ("alibi", 17, 33, True, dict(alibi_slopes=torch.tensor([[0.5, 0.25, 0.125, 1.0], [0.3, 0.2, 0.1, 0.05]])),
     None),
    ("sinks", 1, 17, True, dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])), None),
    ("documents", 17, 33, False, dict(documents=_documents(2, 17, 33, 0)), dict(block_m=16, block_n=16)),
]


@pytest.mark.parametrize("name,T,S,causal,variants,launch", SINGLE, ids=[c[0] for c in SINGLE])
def test_each_variant_against_reference(name, T, S, causal, variants, launch):
    q, k, v = make_qkv(2, 4, 2, T, S, 16, seed=T + S)
    if name == "softcap":
        q = q * 4  # scores of several c: tanh saturates in places
    check_variants(q, k, v, causal=causal, launch=launch, **variants)


ALL = dict(window=(9, 4), softcap=2.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]),
           sinks=torch.tensor([1.0, -0.5, 0.0, 3.0]))


@pytest.mark.parametrize("decode", [False, True])
def test_all_variants_together(decode):
    """Every variant at once with causal and GQA: the prefill kernels (T = S = 33, one documents tensor), and
    the split-KV decode path (T = 3 against S = 100 in 4 slices, documents as a pair), whose out and lse feed
    the same backward."""
    T, S = (3, 100) if decode else (33, 33)
    q, k, v = make_qkv(2, 4, 2, T, S, 16, seed=7 + decode)
    documents = _documents(2, T, S, 3, shared=not decode)
    launch = dict(decode=True, num_splits=4, block_n=16) if decode else dict(block_m=16, block_n=16)
    check_variants(q * 2, k, v, causal=True, launch=launch, documents=documents, **ALL)


def test_a_shards_global_positions_as_the_ring_gives_them():
    """A context-parallel shard's call (`Positions`: zigzag-like global query and key positions) runs the
    window and ALiBi at those positions, forward (lse) and the backward from a given out and lse (what the
    ring calls), against the reference backend under the rule; every tile is masked there, none skipped."""
    q, k, v = make_qkv(1, 4, 2, 16, 12, 16, seed=9)
    positions = Positions(torch.cat([torch.arange(0, 8), torch.arange(24, 32)]), torch.arange(12, 24), 0)
    kw = dict(window=(6, 2), alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.3]),
              documents=(torch.tensor([[0] * 10 + [1] * 6]), torch.tensor([[0] * 3 + [1] * 9])))
    calls = {}
    for name, dtype in (("triton", torch.float32), ("golden", torch.float64), ("naive", torch.float32)):
        call = make_call(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
        calls[name] = call._replace(variants=call.variants._replace(positions=positions))
    grad_out = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    backends = {"triton": tb.TritonBackend(), "golden": ReferenceBackend(), "naive": ReferenceBackend()}
    got = {}
    for name, call in calls.items():
        out, lse = backends[name].forward(call, need_lse=True)
        golden = got.get("golden")
        given = (out, lse) if golden is None else (golden[0].to(out.dtype), golden[1].float())  # the ring's out, lse
        got[name] = (out, lse, *backends[name].backward(call, grad_out.to(out.dtype), *given))
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        measure = _lse_err if name == "lse" else max_err
        err, naive_err = measure(got["triton"][i], got["golden"][i]), measure(got["naive"][i], got["golden"][i])
        factor = OUT_FACTOR if name in ("out", "lse") else GRAD_FACTOR
        assert err <= factor * naive_err + ABS_SLACK, f"{name} error {err:.3g} > {factor} x naive {naive_err:.3g}"


def test_the_registry_runs_the_variants_on_triton():
    """auto picks triton in the interpreter for the variants it computes, with the lse; mh.attention's door
    gives the same result as the kernels' own entry."""
    q, k, v = make_qkv(1, 2, 1, 5, 9, 16, seed=3)
    kw = dict(window=(2, 1), softcap=3.0, alibi_slopes=torch.tensor([0.5, 0.1]), sinks=torch.tensor([0.0, 1.0]),
              documents=(torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2]])))
    assert mh.which_backend(q, k, v, return_lse=True, **kw).chosen == "triton"
    door = mh.attention(q, k, v, return_lse=True, backend="triton", **kw)
    own = tb.triton_attention(q, k, v, **kw)
    assert torch.equal(door.out, own.out) and torch.equal(door.lse, own.lse)


def test_score_mod_and_alibi_gradients_are_refused_with_their_reason():
    q, k, v = make_qkv(1, 2, 1, 5, 9, 16, seed=4)
    reason = mh.which_backend(q, k, v, return_lse=True, score_mod=lambda s, b, h, i, j: s).reasons["triton"]
    assert "score_mod" in reason and "\n" not in reason
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    reason = tb.TritonBackend().supports(make_call(q, k, v, alibi_slopes=slopes))
    assert "ALiBi slopes that require grad" in reason and "\n" not in reason
    with torch.no_grad():  # no gradient recorded: the slopes' requires_grad does not matter
        assert tb.TritonBackend().supports(make_call(q, k, v, alibi_slopes=slopes)) is None
    with pytest.raises(ValueError, match="ALiBi slopes that require grad"):
        tb.triton_attention(q, k, v, alibi_slopes=slopes)


def test_a_plain_call_compiles_with_every_variant_flag_off():
    """The variants are constexpr flags: a call without them launches the kernels with every flag False
    (the code they had before the variants; the extra arguments are never read)."""
    kernels = tb.kernel_modules()
    q = torch.empty(1, 2, 4, 16, device="meta")
    lse = torch.empty(1, 2, 4, device="meta")
    _, meta = kernels.forward.kernel_args(q, q, q, q, lse, None, True, 0.25, "ieee")
    assert {name: meta[name] for name in tb.variants.FLAGS} == dict.fromkeys(tb.variants.FLAGS, False)
    for tuner in (kernels.forward._fwd_launch, kernels.backward._dkdv_launch, kernels.backward._dq_launch):
        assert set(tb.variants.FLAGS) <= set(tuner.keys)  # a variant kernel is tuned apart from the plain one


def test_variant_launches_drop_the_tiles_that_spill():
    """The autotuners' pruners keep for a launch with per-score variants (documents here) only the tiles that
    compile without a spill with them (configs.VARIANT_SPILLS), and every tile for a plain launch."""
    kernels = tb.kernel_modules()
    spills = configs.VARIANT_SPILLS["forward"][64]
    tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    candidates = kernels.forward._fwd_launch.configs
    plain = {tile(c) for c in kernels.forward._prune(candidates, {}, BLOCK_D=64, BLOCK_DV=64)}
    documents = {tile(c) for c in kernels.forward._prune(candidates, {}, BLOCK_D=64, BLOCK_DV=64, HAS_DOCS=True)}
    assert plain == set(configs.TILES["forward"][64]) and documents == plain - set(spills) != set()
    sinks_only = {tile(c) for c in kernels.forward._prune(candidates, {}, BLOCK_D=64, BLOCK_DV=64, HAS_SINKS=True)}
    assert sinks_only == plain


# ---- the tiles a window rules out are skipped


def _recording(monkeypatch, module, name: str) -> list:
    """Replace a kernel helper in the interpreter with one that records (start, MASKED) of each call."""
    original = getattr(module, name)
    signature = inspect.signature(original.fn)
    start = "start_n" if "start_n" in signature.parameters else "m0"
    calls = []

    def recorded(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append((int(bound[start]), bool(bound["MASKED"])))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


def _expected_tiles(T, S, left, right, block_rows, block_cols, by_keys):
    """The (start, masked) pairs a minimal walk visits, by brute force over (query, key) pairs: a tile of
    keys for a block of queries (by_keys: a block of queries for a tile of keys) is visited if one pair
    is in the window, and unmasked if every pair of real queries and keys is."""
    offset = S - T
    expected = []
    outer, inner = (S, T) if by_keys else (T, S)
    outer_block, inner_block = (block_cols, block_rows) if by_keys else (block_rows, block_cols)
    for o in range(0, outer, outer_block):
        for i in range(0, -(-inner // inner_block) * inner_block, inner_block):
            rows = range(i, min(i + inner_block, T)) if by_keys else range(o, min(o + outer_block, T))
            keys = range(o, o + outer_block) if by_keys else range(i, i + inner_block)
            seen = [[0 <= j < S and i2 + offset - left <= j <= i2 + offset + right for j in keys] for i2 in rows]
            if any(any(r) for r in seen):
                expected.append((i, not all(all(r) for r in seen)))
    return sorted(expected)


def test_tiles_outside_the_window_are_skipped(monkeypatch):
    """T = S = 96, window (24, 16), tiles of 16: the forward and dq walk for each query block only the key
    tiles its rows' windows reach (4 of 6), unmasked where every row sees the whole tile; dk/dv walk for
    each key tile only the query blocks that reach it. The visits equal a brute-force minimal walk's."""
    kernels = tb.kernel_modules()
    T = S = 96
    forward = _recording(monkeypatch, kernels.forward, "attend_tile")
    dq = _recording(monkeypatch, kernels.backward, "_dq_step")
    dkdv = _recording(monkeypatch, kernels.backward, "_dkdv_step")
    q, k, v = make_qkv(1, 1, 1, T, S, 16, seed=5, requires_grad=True)
    out = tb.triton_attention(q, k, v, window=(24, 16), block_m=16, block_n=16).out
    out.sum().backward()
    by_query_block = _expected_tiles(T, S, 24, 16, 16, 16, by_keys=False)
    assert sorted(forward) == by_query_block and sorted(dq) == by_query_block
    assert sorted(dkdv) == _expected_tiles(T, S, 24, 16, 16, 16, by_keys=True)
    assert len(forward) == 20 < (T // 16) * (S // 16)  # 20 of the 36 (block, tile) pairs
    assert sum(not masked for _, masked in forward) == T // 16  # the diagonal tiles, seen whole by their rows


# ---- on a GPU: the compiled kernels in fp16 and bf16


@gpu
@pytest.mark.parametrize("dtype,T,S,decode", [(torch.bfloat16, 1000, 1000, False), (torch.float16, 4, 3000, True)])
def test_gpu_variants_against_reference(dtype, T, S, decode):
    """Every variant at once (causal, GQA, documents as a pair), compiled: the prefill kernels in bf16 and the
    split-KV decode in fp16, forward, lse and backward (its sinks' gradient too) under the rule."""
    B, H, G, D = 2, 8, 2, 64
    q, k, v = (x.cuda() for x in make_qkv(B, H, G, T, S, D, dtype=dtype, seed=T + S))
    gen = torch.Generator().manual_seed(0)
    documents = (torch.randint(0, 3, (B, T), generator=gen).sort().values.cuda(),
                 torch.randint(0, 3, (B, S), generator=gen).sort().values.cuda())
    variants = dict(window=(256, 16), softcap=20.0, alibi_slopes=torch.rand(B, H, generator=gen).cuda() * 0.05,
                    sinks=torch.randn(H, generator=gen).cuda(), documents=documents)
    check_variants(q, k, v, causal=True, launch=dict(decode=decode), **variants)
