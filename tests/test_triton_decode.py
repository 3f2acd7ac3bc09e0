"""The split-KV decode kernel (backends/triton/decode.py) in triton's interpreter, fp32, against float64.

A few queries per sequence (T in {1, 3, 16}: a decode step, a speculative chunk) against a long cache,
GQA ratios 1, 4 and 8 packed into the tile's rows, head dims 64, 96 and 128, key lengths 0 and 1,
the key range cut into slices merged by their logsumexp. The interpreter runs every program of the
split kernel and of the merge (T x H x B programs) in Python, so the cases are hand-picked: each T,
ratio and head dim once, not their cross product. The cases with S up to 5000 are marked slow; the
rest run in seconds. On a GPU the same kernel is checked compiled, and under CUDA-graph capture, by
the test_gpu_decode_* tests in tests/test_triton.py (`make gpu-check` runs those).
"""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead.backends import triton as tb
from conftest import assert_matches_reference, make_qkv, max_err

pytestmark = pytest.mark.skipif(not tb.triton_installed(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def decode_module():
    return tb.kernel_modules().decode


def run_decode(block_n=None, num_splits=None, key_lengths=None):
    """The decode path forced (decode=True), whatever the shapes would pick."""
    def run(q, k, v, *, causal=False, scale=None, attn_mask=None):
        assert attn_mask is None or key_lengths is not None  # the reference gets the mask, the kernel the lengths
        return tb.triton_attention(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, decode=True,
                                   block_n=block_n, num_splits=num_splits).out
    return run


def padding_mask(lengths, S):
    return mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor(lengths), S))


# (T, S, H, G, D, causal): every T, every GQA ratio R = H / G, every head dim, both causal settings, each
# once; T = 16 with R = 8 packs 128 rows into two row blocks; S = 65 is just past the path's MIN_S = 64
CASES = [
    (1, 300, 4, 4, 64, True), (3, 257, 8, 2, 96, False), (16, 300, 8, 1, 128, True), (3, 65, 4, 1, 64, True),
]
# long caches: eight slices of many tiles each; a step (T = 1) and a chunk (T = 3), S not a multiple of a tile
LONG = [(1, 5000, 8, 1, 128, True), (3, 4099, 4, 1, 64, False)]


@pytest.mark.parametrize("T,S,H,G,D,causal", CASES)
def test_decode_against_reference(T, S, H, G, D, causal):
    """Forward (the decode kernel) and backward (the regular kernels, from its out and lse)."""
    q, k, v = make_qkv(1, H, G, T, S, D, seed=T * 7 + S + D)
    assert_matches_reference(run_decode(), q, k, v, causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize("T,S,H,G,D,causal", LONG)
def test_decode_long_cache_against_reference(T, S, H, G, D, causal):
    q, k, v = make_qkv(1, H, G, T, S, D, seed=S + D)
    assert_matches_reference(run_decode(), q, k, v, causal=causal, backward=False)


@pytest.mark.parametrize("T,causal", [(1, False), (3, True)])
def test_key_lengths_zero_and_one(T, causal):
    """Per-sequence cache lengths 0 (no key: output 0, lse -inf) and 1, beside a full and a cut one."""
    lengths = [0, 1, 100, 37]
    q, k, v = make_qkv(4, 2, 1, T, 100, 64, seed=T + causal)
    seen = {}

    def run(q, k, v, *, causal, attn_mask):  # the call checked against the reference, its out and lse kept
        seen["out"], seen["lse"] = tb.triton_attention(q, k, v, causal=causal, key_lengths=torch.tensor(lengths),
                                                       decode=True)
        return seen["out"]

    assert_matches_reference(run, q, k, v, causal=causal, attn_mask=padding_mask(lengths, 100))
    out, lse = seen["out"].detach(), seen["lse"]
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.isfinite(lse[1:]).all()
    assert torch.allclose(out[1], v[1, :, :1].expand(2, T, 64), atol=1e-6)  # one key: its value, every query


def test_the_mask_path_picks_decode_by_shape_and_matches():
    """`multihead.attention(..., backend="triton")` with a key-padding mask: decode chosen by shape, lengths 0, 1."""
    lengths = [0, 1, 100]
    q, k, v = make_qkv(3, 4, 1, 1, 100, 64, seed=3)
    assert_matches_reference(lambda *a, **c: mh.attention(*a, backend="triton", **c), q, k, v,
                             attn_mask=padding_mask(lengths, 100), causal=True)


@pytest.mark.parametrize("num_splits", [1, 7, 40])
def test_slices_merge_by_their_logsumexp(num_splits):
    """The key range in 1 slice, 7 (the last one short) or 40 asked (19: one per tile of 16 keys); many slices
    hold no key of a short sequence (weight 0)."""
    lengths = torch.tensor([300, 20, 0])
    q, k, v = make_qkv(3, 4, 2, 3, 300, 32, seed=num_splits)
    seen = {}

    def run(q, k, v, *, causal, attn_mask):  # the call checked against the reference, its lse kept
        out, seen["lse"] = tb.triton_attention(q, k, v, causal=causal, key_lengths=lengths, decode=True, block_n=16,
                                               num_splits=num_splits)
        return out

    assert_matches_reference(run, q, k, v, causal=True, attn_mask=padding_mask(lengths.tolist(), 300),
                             backward=False)
    lse = seen["lse"]
    allowed = mh.masks.causal_mask(3, 300) & padding_mask(lengths.tolist(), 300)  # (B, 1, T, S)

    def naive_lse(q, k):
        scores = q @ mh.backends.reference.repeat_kv(k, 4).transpose(-2, -1) * 32 ** -0.5  # (B, H, T, S)
        return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # (B, H, T)

    golden, naive = naive_lse(q.double(), k.double()), naive_lse(q, k)
    finite = torch.isfinite(golden)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_err(lse[finite], golden[finite]) <= 2 * max_err(naive[finite], golden[finite]) + 1e-5


# ---- the plan: rows packed per group, slices from shapes


class _Spy:
    """Stands in for a jit function: records each launch's grid and constexprs, then launches."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.fn[grid](*args, **kwargs)
        return launch


# (B, H, G, T, block_m, row_blocks); one sequence where T = 16 (the merge runs T x H x B programs)
@pytest.mark.parametrize("B,H,G,T,block_m,row_blocks", [(2, 8, 2, 1, 16, 1), (2, 8, 1, 3, 32, 1),
                                                        (1, 8, 1, 16, 64, 2), (1, 4, 4, 16, 16, 1)])
def test_a_groups_query_heads_share_one_program(monkeypatch, B, H, G, T, block_m, row_blocks):
    """The grid's second axis is G x row blocks, not H: K and V are read once per group (R * T rows);
    the third is B."""
    spy = _Spy(decode_module()._decode_split_kernel)
    monkeypatch.setattr(decode_module(), "_decode_split_kernel", spy)
    q, k, v = make_qkv(B, H, G, T, 96, 16, seed=H + G + T)
    assert_matches_reference(run_decode(), q, k, v, causal=True, backward=False)
    (grid, meta), = spy.launches
    assert meta["BLOCK_M"] == block_m and grid[1] == G * row_blocks and grid[2] == B


def test_split_count_comes_from_shapes():
    split_count = decode_module().split_count
    assert split_count(programs=8, S=32768, block_n=64, sms=132) == 33  # two waves over 132 SMs
    assert split_count(programs=128, S=4096, block_n=64, sms=132) == 3
    assert split_count(programs=1, S=100, block_n=64, sms=132) == 1  # 2 tiles: one slice
    assert split_count(programs=1, S=10 ** 7, block_n=64, sms=1000) == decode_module().MAX_SPLITS
    plan = decode_module().plan(*make_qkv(1, 4, 1, 1, 300, 16), block_n=16, num_splits=7)
    assert plan.chunk % 16 == 0 and plan.splits == 7
    assert (plan.splits - 1) * plan.chunk < 300 <= plan.splits * plan.chunk  # no empty slice at the end


def test_the_path_is_chosen_by_shape(monkeypatch):
    """T <= 16 and S >= 64 take the decode kernel; more queries or fewer keys the forward kernel."""
    calls = []
    kernels = tb.kernel_modules()
    for module, name in ((kernels.decode, "attention_decode"), (kernels.forward, "attention_forward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    for T, S in ((1, 64), (16, 200), (17, 200), (1, 63)):
        q, k, v = make_qkv(1, 2, 1, T, S, 16)
        mh.attention(q, k, v, causal=True, backend="triton")
    assert calls == ["attention_decode", "attention_decode", "attention_forward", "attention_forward"]
    assert decode_module().applies(16, 64) and not decode_module().applies(0, 64)
