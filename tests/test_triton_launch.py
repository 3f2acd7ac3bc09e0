"""How the Triton kernels are launched (issue 13, item 1), checked without a GPU.

- No host sync on the path: `supports`, `forward` and the backward read no tensor's value on the
  host (every Tensor.__bool__/item/__int__/... and torch.equal raises while they run), and the host
  code has no such call in its source. On a GPU, tests/test_triton.py::test_gpu_no_host_sync checks
  the same with torch.cuda.set_sync_debug_mode("error").
- Keys from the key length on are never read: unwritten cache slots (NaN here) change nothing.
- The autotuners' key holds a power-of-two bucket of T and S, and each head dim gets only the tiles
  configs.py keeps (compiled clean for sm_90a: tests/test_triton_compile.py).
- int64 offsets: tests/test_triton_compile.py reads every kernel's TTIR.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

import multihead as mh
from multihead.backends import triton as tb
from multihead.backends.triton import configs
from conftest import assert_matches_reference, make_qkv

pytestmark = pytest.mark.skipif(not tb.triton_installed(), reason="triton is not installed")
TRITON_DIR = Path(tb.__file__).parent


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---- no host sync


HOST_READS = ("__bool__", "item", "__int__", "__float__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor's value on the host raises while inside (each one a GPU sync)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    saved_equal = torch.equal

    def refuse(what):
        def read(*args, **kwargs):
            raise AssertionError(f"host read on the triton path: {what}")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    torch.equal = refuse("torch.equal")
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.equal = saved_equal


def test_the_detector_catches_what_the_old_path_did():
    """The syncs the path had before issue 13 (key_lengths_from_mask, _check_key_lengths) all raise here."""
    lengths = torch.tensor([3, 5])
    for old in (lambda: bool((lengths == 5).all()), lambda: torch.equal(lengths, lengths),
                lambda: int(lengths.max()), lambda: lengths.tolist(), lambda: lengths[0].item()):
        with no_host_reads(), pytest.raises(AssertionError, match="host read on the triton path"):
            old()
    assert bool((lengths == 5).any())  # and everything is back afterwards


@pytest.mark.parametrize("T,S,mask", [(5, 40, "prefix"), (2, 90, "holes"), (3, 70, None)])
def test_supports_forward_and_backward_read_no_value(T, S, mask):
    """The forward kernel (T = 5) and the decode kernel (T <= 16, S >= 64), with a key-padding mask (a prefix
    or one with holes: the host turns both into a KeyRange the same way, never asking which) and without."""
    B = 2
    q, k, v = make_qkv(B, 4, 2, T, S, 16, seed=T + S, requires_grad=True)
    attn_mask = None
    if mask is not None:
        keep = torch.arange(S)[None, :] < torch.tensor([S, S // 3])[:, None]  # (B, S)
        if mask == "holes":
            keep[0, 5:9] = False
        attn_mask = keep[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    call = mh.core.call.make_call(q, k, v, attn_mask=attn_mask, causal=True)
    backend = mh.backends.get("triton")
    with no_host_reads():
        assert backend.supports(call, need_lse=True) is None
        out, lse = backend.forward(call, need_lse=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert lse.shape == (B, 4, T) and all(torch.isfinite(g).all() for g in grads)
    with no_host_reads():
        lengths = torch.tensor([S, 1])
        tb.triton_attention(q, k, v, causal=True, key_lengths=lengths)  # the public function: no value check either


def test_supports_refuses_from_shapes_alone():
    q, k, v = make_qkv(2, 2, 2, 5, 7, 16)
    backend = mh.backends.get("triton")
    with no_host_reads():
        dense = backend.supports(mh.core.call.make_call(q, k, v, attn_mask=torch.ones(2, 1, 5, 7, dtype=torch.bool)))
        floating = backend.supports(mh.core.call.make_call(q, k, v, attn_mask=torch.zeros(2, 1, 1, 7)))
    assert "is not a key-padding mask" in dense and "dense float mask" in floating


HOST_CALLS = {"item", "tolist", "numpy", "cpu", "equal"}  # methods (and torch.equal) that read values on the host
REDUCTIONS = {"all", "any", "max", "min", "sum", "amax", "amin", "item"}


def host_reads_in(source: str) -> list:
    """Calls in host code that read a tensor's value: x.item(), torch.equal(...), bool(x.all()), int(x.max())."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in HOST_CALLS:
            found.append(f"line {node.lineno}: .{node.func.attr}()")
        if (isinstance(node.func, ast.Name) and node.func.id in ("bool", "int", "float") and node.args
                and isinstance(node.args[0], ast.Call) and isinstance(node.args[0].func, ast.Attribute)
                and node.args[0].func.attr in REDUCTIONS):
            found.append(f"line {node.lineno}: {node.func.id}(.{node.args[0].func.attr}())")
    return found


def test_the_host_code_has_no_value_reads():
    old = ("lengths = rows.sum(-1)\nif not torch.equal(a, b): pass\n"
           "if bool((lengths == S).all()): pass\nn = int(x.max())")
    assert len(host_reads_in(old)) == 3  # the detector sees the old key_lengths_from_mask and _check_key_lengths
    offences = {path.name: host_reads_in(path.read_text()) for path in TRITON_DIR.glob("*.py")}
    assert {name: lines for name, lines in offences.items() if lines} == {}


# ---- keys from the key length on are never read


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("how", ["lengths", "mask"])
def test_unwritten_cache_slots_are_never_read(decode, how):
    """K and V past each sequence's length are NaN (a torch.empty cache): outputs and gradients stay exactly
    those of the same call with zeros there, and dk, dv past the length are 0. Tiles of 32 keys (both paths):
    the length 29 cuts the first, a whole one and a cut one lie past it."""
    B, H, G, T, S = 3, 2, 1, 3, 70
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=5)
    lengths = torch.tensor([70, 29, 0])
    unwritten = torch.arange(S)[None, :] >= lengths[:, None]  # (B, S)
    k_nan = k.masked_fill(unwritten[:, None, :, None], float("nan"))  # (B, S) -> (B, 1, S, 1)
    v_nan = v.masked_fill(unwritten[:, None, :, None], float("nan"))
    key_range = (tb.keys.from_lengths(lengths, B) if how == "lengths"
                 else tb.keys.from_mask(~unwritten[:, None, None, :], B))  # (B, S) -> (B, 1, 1, S)
    options = tb.Launch(block_m=16, block_n=32, decode=decode)
    results = []
    for kk, vv in ((k_nan, v_nan), (k, v)):
        xs = [x.clone().requires_grad_() for x in (q, kk, vv)]
        out, lse = tb._apply(*xs, key_range, True, 0.25, options)
        results.append((out, lse, *torch.autograd.grad(out.square().sum(), xs)))
    for with_nan, clean in zip(*results):
        assert torch.isfinite(with_nan[torch.isfinite(clean)]).all()
        assert torch.equal(with_nan.nan_to_num(), clean.nan_to_num())
    dk, dv = results[0][3], results[0][4]
    assert torch.all(dk[unwritten[:, None, :, None].expand_as(dk)] == 0)
    assert torch.all(dv[unwritten[:, None, :, None].expand_as(dv)] == 0)


# ---- the autotuners: a length bucket in the key, the kept tiles per head dim


def test_length_buckets():
    assert [configs.length_bucket(n) for n in (0, 1, 16, 17, 1000, 1024, 1025, 16384)] == [
        16, 16, 16, 32, 1024, 1024, 2048, 16384]


def _kernels():
    return tb.kernel_modules()  # the autotuners are built in either mode (the interpreter does not launch them)


def test_the_autotuners_key_on_length_buckets():
    """A decode call (T = 1) and a 16k prefill land in different autotune keys, on every kernel."""
    kernels = _kernels()
    for tuner in (kernels.forward._fwd_launch, kernels.backward._dkdv_launch, kernels.backward._dq_launch):
        assert {"T_BUCKET", "S_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KEYMASK"} <= set(tuner.keys)
    q, k, v = (torch.empty(1, 8, T, 128, device="meta") for T in (1, 16384, 16384))
    lse = torch.empty(1, 8, 1, device="meta")
    decode_args, _ = kernels.forward.kernel_args(q, k, v, q, lse, None, True, 0.1, "tf32")
    prefill_args, _ = kernels.forward.kernel_args(k, k, v, k, lse, None, True, 0.1, "tf32")
    names = kernels.forward._fwd_kernel.arg_names  # the arguments, then the constexprs
    bucket = {name: (decode_args[names.index(name)], prefill_args[names.index(name)])
              for name in ("T_BUCKET", "S_BUCKET")}
    assert bucket == {"T_BUCKET": (16, 16384), "S_BUCKET": (16384, 16384)}


@pytest.mark.parametrize("kernel,prune", [("forward", lambda k: k.forward._prune),
                                          ("dkdv", lambda k: k.backward._pruner("dkdv")),
                                          ("dq", lambda k: k.backward._pruner("dq"))])
def test_each_head_dim_gets_only_the_kept_tiles(monkeypatch, kernel, prune):
    kernels = _kernels()
    tuner = {"forward": kernels.forward._fwd_launch, "dkdv": kernels.backward._dkdv_launch,
             "dq": kernels.backward._dq_launch}[kernel]
    tiles = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cs]  # noqa: E731
    assert set(tiles(tuner.configs)) == set(configs.all_tiles(kernel))
    for d, width in ((40, 64), (96, 128), (128, 128), (256, 256)):
        block_d = max(16, 1 << (d - 1).bit_length())
        kept = tiles(prune(kernels)(tuner.configs, {}, BLOCK_D=block_d, BLOCK_DV=16))
        assert sorted(kept) == sorted(configs.TILES[kernel][width]), (kernel, d)
    monkeypatch.setenv("MULTIHEAD_TRITON_CONFIGS", "few")
    assert tiles(prune(kernels)(tuner.configs, {}, BLOCK_D=128, BLOCK_DV=128)) == configs.TILES[kernel][128][:1]


def test_gradients_through_both_paths_still_match():
    """The decode path's out and lse feed the regular backward: a GQA call with a mask, both ways."""
    q, k, v = make_qkv(2, 2, 1, 2, 80, 32, seed=1)
    mask = torch.arange(80)[None, :] < torch.tensor([80, 50])[:, None]  # (B, S)
    for decode in (False, True):
        def run(q, k, v, *, attn_mask, causal):
            return tb._apply(q, k, v, tb.keys.from_mask(attn_mask, 2), causal, 32 ** -0.5,
                             tb.Launch(decode=decode)).out
        assert_matches_reference(run, q, k, v, attn_mask=mask[:, None, None, :], causal=True)
