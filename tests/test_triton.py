"""The triton backend against the float64 reference, under docs/design.md's 2x/3x rule.

On the CPU the kernels run in triton's interpreter, fp32, at small sizes: every
CPU test here sets TRITON_INTERPRET=1 for itself only (a fixture), so tests of
other modules running in the same process still see the CPU refused. The kernel
modules are imported in the mode triton.language was first imported in (on a
machine without CUDA conftest.py imports it for the interpreter), whichever test
imports them first (`multihead.backends.triton.kernel_modules`). Where CUDA is
present the `gpu` tests run the compiled kernels in fp16/bf16 at full sizes;
without it they skip.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multihead as mh
from multihead.backends import triton as tb
from conftest import assert_matches_reference, load_script, make_qkv, max_err

pytestmark = [pytest.mark.skipif(not tb.triton_installed(), reason="triton is not installed"),
              pytest.mark.usefixtures("triton_interpreter")]

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def run_triton(block_m=None, block_n=None):
    def run(q, k, v, *, causal=False, scale=None, attn_mask=None):
        if attn_mask is None and (block_m or block_n):
            return tb.triton_attention(q, k, v, causal=causal, scale=scale, block_m=block_m, block_n=block_n).out
        return mh.attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, backend="triton")
    return run


def padding_mask(lengths, S):
    return mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor(lengths), S))


# ---- forward and backward against the reference (interpreter, fp32)

# (T, S, D, causal), hand-picked rather than the cross product (the interpreter is slow): each length pair
# once, no length a multiple of the tile of 32: T < S, T > S and T = S over several tiles, a single query (the
# forward kernel at S = 17, the decode path at S = 200), a single key (causal: 16 rows see none); each head dim
# (40 and 80 padded to a power of two) once without and once with causal.
SIZE_CASES = [
    (1, 17, 40, False), (17, 1, 64, True), (17, 113, 80, True), (113, 17, 16, False),
    (113, 200, 64, False), (200, 113, 40, True), (1, 200, 80, False), (200, 200, 16, True),
]


@pytest.mark.parametrize("T,S,D,causal", SIZE_CASES)
def test_sizes_against_reference(T, S, D, causal):
    B, H, G = (1, 2, 1) if max(T, S) > 150 else (2, 2, 1)
    q, k, v = make_qkv(B, H, G, T, S, D, seed=T * 1000 + S + D)
    assert_matches_reference(run_triton(), q, k, v, causal=causal)


@pytest.mark.parametrize("block_m,block_n,T,S", [(16, 64, 50, 77), (16, 64, 77, 50), (64, 16, 50, 77),
                                                 (64, 16, 77, 50)])
def test_tile_shapes(block_m, block_n, T, S):
    """Tiles smaller and larger than the diagonal's step: the masked/unmasked split holds. (Equal 16 x 16
    tiles, T < S and T > S: test_every_diagonal_offset.)"""
    q, k, v = make_qkv(1, 2, 1, T, S, 24, seed=block_m + block_n + T)
    assert_matches_reference(run_triton(block_m, block_n), q, k, v, causal=True)


@pytest.mark.parametrize("offset", [-17, -15, -1, 1, 15, 17, 30])
def test_every_diagonal_offset(offset):
    """S - T around the tile size: where the diagonal starts and ends a tile, off by one either way
    (T > S and T < S; 30 is two tiles less two)."""
    T = 40  # one head: the diagonal is the same in every head
    q, k, v = make_qkv(1, 1, 1, T, T + offset, 16, seed=offset + 100)
    assert_matches_reference(run_triton(16, 16), q, k, v, causal=True)


@pytest.mark.parametrize("H,G", [(6, 6), (6, 3), (6, 1)])
def test_grouped_query_and_value_width(H, G):
    """kv head h // R, read in place; dk, dv summed over each group's R heads; Dv != D."""
    q, k, v = make_qkv(1, H, G, 37, 53, 16, Dv=24, seed=H * 10 + G)
    assert_matches_reference(run_triton(), q, k, v, causal=True)


@pytest.mark.parametrize("lengths,causal", [([41, 30, 0], True), ([1, 17, 40], False)])
def test_key_padding_mask(causal, lengths):
    """A bool (B, 1, 1, S) prefix mask runs as key lengths, 0 and 1 included, with and without causal."""
    B, H, G, T, S = 3, 4, 2, 29, 41
    q, k, v = make_qkv(B, H, G, T, S, 32, seed=sum(lengths) + causal)
    mask = padding_mask(lengths, S)
    assert mh.which_backend(q, k, v, attn_mask=mask, causal=causal, return_lse=True).chosen == "triton"
    assert_matches_reference(run_triton(), q, k, v, attn_mask=mask, causal=causal)


@pytest.mark.parametrize("decode", [False, True])
def test_key_mask_with_holes_runs_on_the_device(decode):
    """A bool (B|1, 1, 1, S) mask that is not a prefix (holes before real keys) is taken, not refused:
    whether it is a prefix is never asked on the host; keys in [lo, hi) are masked one by one."""
    B, H, G, T, S = 3, 2, 1, 5, 100
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=11)
    mask = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[1, ..., 40:] = True  # a prefix with holes, then a whole tile of 32 keys (64-95) and a cut one
    mask[2] = False  # no key at all
    assert mh.which_backend(q, k, v, attn_mask=mask, return_lse=True).chosen == "triton"

    def run(q, k, v, *, attn_mask, causal, scale):
        key_range = tb.keys.from_mask(attn_mask, B)
        return tb._apply(q, k, v, key_range, causal, scale, tb.Launch(block_m=16, block_n=32, decode=decode)).out

    assert_matches_reference(run, q, k, v, attn_mask=mask, causal=True, scale=0.25)
    one_row = mask[:1]  # (1, 1, 1, S): the same keys for every sequence
    assert_matches_reference(run_triton(), q, k, v, attn_mask=one_row, backward=False)


def test_key_lengths_argument_is_the_padding_mask():
    B, H, G, T, S = 3, 2, 1, 21, 35
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=4)
    lengths = torch.tensor([35, 12, 3])

    def run(q, k, v, *, attn_mask, causal):  # the reference gets the mask, triton the lengths
        return tb.triton_attention(q, k, v, causal=causal, key_lengths=lengths).out

    assert_matches_reference(run, q, k, v, attn_mask=padding_mask(lengths.tolist(), S), causal=True)


def test_custom_scale_noncontiguous_inputs():
    """(B, T, H, D) storage seen as (B, H, T, D): strides, not copies; a negative scale too."""
    B, T, S, H, D = 2, 19, 23, 4, 40
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, D, generator=gen).transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
    k = torch.randn(B, S, 2, D, generator=gen).transpose(1, 2)
    v = torch.randn(B, S, 2, 8, generator=gen).transpose(1, 2)
    assert not q.is_contiguous()
    assert_matches_reference(run_triton(), q, k, v, scale=0.3, causal=True)
    assert_matches_reference(run_triton(), q, k, v, scale=-0.2, backward=False)


def test_half_precision_in_the_interpreter():
    q, k, v = make_qkv(1, 4, 2, 33, 65, 32, dtype=torch.float16, seed=6)
    assert_matches_reference(run_triton(), q, k, v, causal=True, backward=False)


# ---- the call's contract: lse, rows with no key, NaN


def test_lse_is_the_softmax_normaliser():
    B, H, G, T, S = 2, 4, 2, 33, 47
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=5)
    lengths = torch.tensor([47, 20])
    out, lse = tb.triton_attention(q, k, v, causal=True, key_lengths=lengths)
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    allowed = mh.masks.causal_mask(T, S) & padding_mask(lengths.tolist(), S)

    def naive_lse(q, k):
        scores = q @ mh.backends.reference.repeat_kv(k, H).transpose(-2, -1) / 4.0  # (B, H, T, S)
        return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)

    golden, naive = naive_lse(q.double(), k.double()), naive_lse(q, k)
    # docs/design.md's output rule, applied to the lse
    assert max_err(lse, golden) <= 2 * max_err(naive, golden) + 1e-5


@pytest.mark.parametrize("kind", ["causal_T_gt_S", "key_length_0"])
def test_rows_with_no_key_give_zero_output_and_gradient(kind):
    if kind == "causal_T_gt_S":  # the first T - S = 4 queries see no key
        q, k, v = make_qkv(2, 4, 2, 9, 5, 16, seed=0, requires_grad=True)
        call = dict(causal=True)
        empty = torch.zeros(2, 4, 9, dtype=torch.bool)
        empty[:, :, :4] = True
    else:  # the second sequence has no key at all
        q, k, v = make_qkv(2, 4, 2, 9, 12, 16, seed=0, requires_grad=True)
        call = dict(attn_mask=padding_mask([12, 0], 12))
        empty = torch.zeros(2, 4, 9, dtype=torch.bool)
        empty[1] = True
    out = mh.attention(q, k, v, backend="triton", **call)
    lengths = None if kind == "causal_T_gt_S" else torch.tensor([12, 0])
    lse = tb.triton_attention(q, k, v, causal=call.get("causal", False), key_lengths=lengths).lse
    assert torch.all(out[empty] == 0) and torch.all(out[~empty].abs().sum(-1) > 0)
    assert torch.all(lse[empty] == float("-inf")) and torch.isfinite(lse[~empty]).all()
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.all(dq[empty] == 0)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    if kind == "key_length_0":
        assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0)


@pytest.mark.parametrize("T,S", [(0, 5), (5, 0)])
def test_zero_length(T, S):
    q, k, v = make_qkv(2, 4, 2, T, S, 8, Dv=6, requires_grad=True)
    out, lse = tb.triton_attention(q, k, v, causal=True)
    assert out.shape == (2, 4, T, 6) and torch.all(out == 0) and torch.all(lse == float("-inf"))
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert torch.all(g == 0)


def test_nan_in_an_attended_key_propagates():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 16, seed=9)
    k[0, 0, 3, 0] = float("nan")
    out = mh.attention(q, k, v, causal=True, backend="triton")
    assert torch.isnan(out[0, 0, 3:]).any(dim=-1).all()  # queries 3..5 attend key 3
    assert torch.isfinite(out[0, 0, :3]).all() and torch.isfinite(out[0, 1]).all()


# ---- dispatch: what it refuses, and why


def test_auto_never_picks_triton_on_the_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = make_qkv(1, 2, 2, 5, 7, 16)
    report = mh.which_backend(q, k, v, causal=True)
    assert report.chosen != "triton"
    assert "TRITON_INTERPRET=1" in report.reasons["triton"]
    assert "triton     cannot: q is on the CPU" in str(report)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: q is on the CPU"):
        mh.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="triton_attention cannot run this call: q is on the CPU"):
        tb.triton_attention(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tb, "_triton_interprets", lambda: False)  # triton first imported compiled
    assert "first imported without TRITON_INTERPRET=1" in mh.which_backend(q, k, v, return_lse=True).reasons["triton"]


def test_interpreting_reads_the_variable_as_triton_does(monkeypatch):
    import triton

    for value in ("1", "true", "ON", "Yes", "y", "0", "off", "", "2", " 1"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert tb.interpreting() == triton.knobs.runtime.interpret, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not tb.interpreting()


def test_sdpa_comes_first_and_triton_gives_the_lse_where_it_runs():
    """The measured order (BENCHMARKS.md, H200): SDPA first; triton first among the backends with an lse."""
    q, k, v = make_qkv(1, 2, 2, 5, 7, 16)
    assert mh.backends.names()[:2] == ["sdpa", "triton"]
    assert mh.which_backend(q, k, v, causal=True).chosen == "sdpa"
    assert mh.which_backend(q, k, v, causal=True, return_lse=True).chosen == "triton"  # the interpreter is on here


@pytest.mark.parametrize("case,reason", [
    ("float_mask", "a dense float mask is not supported"),
    ("per_query_mask", "is not a key-padding mask (B, 1, 1, S)"),
    ("dropout", "dropout is not implemented"),
    ("float64", "dtype torch.float64 not supported"),
    ("bf16_interpreted", "no bf16 arithmetic"),
    ("head_dim_512", "head dims up to 256"),
])
def test_refusals_name_the_reason_and_auto_moves_on(case, reason):
    B, T, S = 2, 5, 7
    D = 512 if case == "head_dim_512" else 16
    dtype = {"float64": torch.float64, "bf16_interpreted": torch.bfloat16}.get(case, torch.float32)
    q, k, v = make_qkv(B, 2, 2, T, S, D, dtype=dtype)
    call = {}
    if case == "float_mask":
        call["attn_mask"] = torch.zeros(B, 1, 1, S)
    elif case == "per_query_mask":
        call["attn_mask"] = torch.ones(B, 1, T, S, dtype=torch.bool)
    elif case == "dropout":
        call["dropout_p"] = 0.1
    report = mh.which_backend(q, k, v, **call)
    assert reason in report.reasons["triton"]
    assert report.chosen == "sdpa"
    with pytest.raises(ValueError, match="backend='triton' cannot run this call"):
        mh.attention(q, k, v, backend="triton", **call)


def test_without_triton_the_backend_says_so(monkeypatch):
    monkeypatch.setattr(tb, "_installed", False)
    q, k, v = make_qkv(1, 2, 2, 5, 7, 16)
    assert mh.which_backend(q, k, v).reasons["triton"] == "triton is not installed (pip install triton)"


def test_importing_multihead_does_not_import_triton():
    code = "import sys, multihead; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_argument_errors():
    q, k, v = make_qkv(2, 2, 2, 5, 7, 16)
    with pytest.raises(ValueError, match="key_lengths has 3 entries, expected one per sequence"):
        tb.triton_attention(q, k, v, key_lengths=torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match=r"key_lengths must be \(B,\)"):
        tb.triton_attention(q, k, v, key_lengths=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        tb.triton_attention(q, k, v, block_m=24)
    with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
        tb.triton_attention(q, k, v, num_splits=0)
    with pytest.raises(TypeError, match="decode must be a bool or None"):
        tb.triton_attention(q, k, v, decode=1)
    with pytest.raises(ValueError, match="query heads H=2 must be a multiple"):
        tb.triton_attention(q, k[:, :1].expand(2, 3, 7, 16), v[:, :1].expand(2, 3, 7, 16))


def test_key_lengths_outside_the_keys_are_clamped_on_the_device():
    """Lengths are never read on the host (no sync): the kernels clamp them to [0, S], so a length past
    S reads no memory beyond k and v, and a negative one attends nothing."""
    q, k, v = make_qkv(3, 2, 2, 5, 7, 16, seed=8)
    clamped = tb.triton_attention(q, k, v, key_lengths=torch.tensor([7, 0, 3]))
    for decode in (False, True):
        wild = tb.triton_attention(q, k, v, key_lengths=torch.tensor([9, -4, 3]), decode=decode)
        assert torch.allclose(wild.out, clamped.out, atol=1e-6) and torch.equal(wild.lse.isinf(), clamped.lse.isinf())
    assert torch.all(clamped.out[1] == 0)


def test_the_kernel_modules_are_imported_once_in_tritons_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # what triton.language was first imported under decides, not this
    kernels = tb.kernel_modules()
    assert tb.kernel_modules() is kernels and kernels._fields == ("forward", "backward", "decode")
    assert {module.INTERPRET for module in kernels} == {kernels.interpreted} == {tb._triton_interprets()}
    for name, module in zip(kernels._fields, kernels):  # ordinary modules, under their own names
        assert importlib.import_module(f"multihead.backends.triton.{name}") is module


# ---- on a GPU: the compiled kernels, fp16/bf16, full sizes

GPU_CASES = [  # (B, H, G, T, S, D, causal)
    (2, 8, 8, 4096, 4096, 128, True), (2, 8, 2, 4096, 4096, 64, False), (1, 4, 4, 1025, 4096, 256, True),
    (1, 4, 1, 4096, 1025, 96, True), (4, 8, 4, 1, 4096, 128, True), (2, 4, 4, 113, 1025, 40, False),
    (2, 4, 2, 2048, 2048, 80, True),
]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,G,T,S,D,causal", GPU_CASES)
def test_gpu_against_reference(B, H, G, T, S, D, causal, dtype):
    q, k, v = (x.cuda() for x in make_qkv(B, H, G, T, S, D, dtype=dtype, seed=T + S + D))
    assert mh.which_backend(q, k, v, causal=causal, return_lse=True).chosen == "triton"
    assert_matches_reference(run_triton(), q, k, v, causal=causal)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_key_padding_and_dtypes(dtype):
    B, H, G, T, S = 3, 8, 2, 700, 1500
    q, k, v = (x.cuda() for x in make_qkv(B, H, G, T, S, 64, dtype=dtype, seed=1))
    mask = padding_mask([1500, 999, 0], S).cuda()
    assert_matches_reference(run_triton(), q, k, v, attn_mask=mask, causal=True)


@gpu
def test_gpu_deterministic():
    """Same inputs: the forward bitwise the same; the backward too (no atomics)."""
    q, k, v = (x.cuda().requires_grad_() for x in make_qkv(2, 8, 2, 2048, 2048, 128, dtype=torch.bfloat16))
    grad_out = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        out = mh.attention(q, k, v, causal=True, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for again in runs[1:]:
        for first, second in zip(runs[0], again):
            assert torch.equal(first, second)


# ---- the GPU benchmark script: its grid and its refusal on a machine without CUDA


def test_gpu_benchmark_script_dry_run_and_cpu_refusal(monkeypatch, capsys):
    """The script's main() in this process (its argv parsed as on the command line): no new python to start."""
    script = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py", "gpu_benchmark")
    assert script.main(["--dry-run"]) == 0
    stdout = capsys.readouterr().out
    assert "candidates: triton, sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math" in stdout
    # B·T = 16k, H·D = 2048: 4·B·H·T²·D = 2199 GFLOP at T = 16k, D = 128, half of it causal
    assert "| 1 | 16 | 16384 | 128 | False | 2199 |" in stdout
    assert "| 1 | 16 | 16384 | 128 | True | 1100 |" in stdout
    assert stdout.count("\n| ") == 1 + 2 * 6 * 2  # header + D x T x causal
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal, on any machine
    assert script.main(["--quick"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# ---- on a GPU: the split-KV decode kernel, CUDA-graph capture, no host sync (issue 13)

GPU_DECODE_CASES = [  # (B, H, G, T, S, D, causal), padding lengths [S, 2S/3, 0, 1][:B]
    (4, 32, 8, 1, 4096, 128, True), (2, 16, 2, 16, 2048, 96, True), (1, 8, 1, 3, 5000, 64, False),
]


@gpu
@pytest.mark.parametrize("B,H,G,T,S,D,causal", GPU_DECODE_CASES)
def test_gpu_decode_against_reference(B, H, G, T, S, D, causal):
    q, k, v = (x.cuda() for x in make_qkv(B, H, G, T, S, D, dtype=torch.bfloat16, seed=T + S + D))
    mask = padding_mask([S, S * 2 // 3, 0, 1][:B], S).cuda()
    assert tb.kernel_modules().decode.applies(T, S)
    assert_matches_reference(run_triton(), q, k, v, attn_mask=mask, causal=causal)


@gpu
def test_gpu_decode_cuda_graph_replays_new_inputs_and_lengths():
    """A decode step captured once, replayed after writing new q, K, V and cache lengths into its tensors:
    the same output as an eager call, bitwise, and within the rule against float64."""
    B, H, G, T, S, D = 4, 32, 8, 1, 8192, 128
    q, k, v = (x.cuda() for x in make_qkv(B, H, G, T, S, D, dtype=torch.bfloat16, seed=1))
    lengths = torch.full((B,), S, dtype=torch.int32, device="cuda")
    result = {}

    def step():
        result["out"] = tb.triton_attention(q, k, v, causal=True, key_lengths=lengths).out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed, new_lengths in ((2, [S // 2, 1, 0, S]), (3, [17, S, 4000, 2])):
        for static, fresh in zip((q, k, v), make_qkv(B, H, G, T, S, D, dtype=torch.bfloat16, seed=seed)):
            static.copy_(fresh)
        lengths.copy_(torch.tensor(new_lengths))
        graph.replay()
        eager = tb.triton_attention(q, k, v, causal=True, key_lengths=lengths).out
        assert torch.equal(result["out"], eager)
        assert_matches_reference(lambda *a, **c: result["out"].clone(), q, k, v, causal=True, backward=False,
                                 attn_mask=padding_mask(new_lengths, S).cuda())


@gpu
@pytest.mark.parametrize("T,S", [(300, 700), (1, 4096)])
def test_gpu_no_host_sync(T, S):
    """supports, forward and backward with a key-padding mask never wait for the GPU (set_sync_debug_mode
    raises on any synchronising call), once the kernels are compiled and tuned."""
    q, k, v = (x.cuda().requires_grad_() for x in make_qkv(2, 8, 2, T, S, 64, dtype=torch.bfloat16, seed=T))
    mask = padding_mask([S, S // 3], S).cuda()

    def step():
        out = mh.attention(q, k, v, attn_mask=mask, causal=True, backend="triton")
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    step()  # compile and autotune first: the autotuner times configs once per key, which syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
