"""Every backend against the float64 reference, under docs/design.md's 2x/3x rule."""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead.backends.chunked import chunked_forward, dropout_keep_mask
from multihead.core.call import make_call
from conftest import assert_matches_reference, chunked, make_qkv, max_err
from multihead.backends.reference import attention_ref

BACKENDS = ["reference", "sdpa", "chunked"]
LENGTH_PAIRS = [(1, 17), (17, 1), (17, 113), (113, 17), (113, 1025), (1025, 113), (1, 1025), (113, 113)]
HEAD_DIMS = [8, 40, 64, 80, 128]


def run_backend(name):
    def run(q, k, v, **call):
        return mh.attention(q, k, v, backend=name, **call)
    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,S", LENGTH_PAIRS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_odd_sizes_against_reference(backend, T, S, D, causal):
    B, H, G = (1, 2, 1) if max(T, S) > 200 else (2, 4, 2)
    q, k, v = make_qkv(B, H, G, T, S, D, seed=T * 1000 + S + D)
    assert_matches_reference(run_backend(backend), q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,G", [(6, 6), (6, 3), (6, 2), (6, 1)])
def test_grouped_query(backend, H, G):
    q, k, v = make_qkv(2, H, G, 37, 53, 16, Dv=24, seed=H * 10 + G)
    assert_matches_reference(run_backend(backend), q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool_key", "bool_full", "float_bias", "float_inf_rows"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks(backend, mask_kind, causal):
    B, H, G, T, S = 2, 4, 2, 29, 41
    q, k, v = make_qkv(B, H, G, T, S, 32, seed=7)
    gen = torch.Generator().manual_seed(3)
    if mask_kind == "bool_key":  # padding: the second sequence has 30 real keys
        mask = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor([41, 30]), S))
    elif mask_kind == "bool_full":  # per head and query, with some rows fully masked
        mask = torch.rand(B, H, T, S, generator=gen) > 0.5
        mask[:, :, 3] = False
    elif mask_kind == "float_bias":  # ALiBi-like finite biases
        mask = torch.randn(1, H, T, S, generator=gen)
    else:  # float -inf on whole rows and scattered entries
        mask = torch.randn(B, 1, T, S, generator=gen)
        mask[torch.rand(B, 1, T, S, generator=gen) > 0.7] = float("-inf")
        mask[:, :, 5] = float("-inf")
    assert_matches_reference(run_backend(backend), q, k, v, attn_mask=mask, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_value_width(backend):
    q, k, v = make_qkv(1, 3, 3, 19, 23, 40, Dv=8, seed=11)
    assert_matches_reference(run_backend(backend), q, k, v, scale=0.3)


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (7, 16), (16, 7), (64, 64), (1000, 3)])
@pytest.mark.parametrize("T,S", [(17, 113), (113, 17), (40, 40)])
def test_chunked_block_sizes(block_q, block_k, T, S):
    q, k, v = make_qkv(2, 4, 2, T, S, 16, seed=block_q + block_k)
    mask = torch.rand(2, 1, T, S, generator=torch.Generator().manual_seed(block_k)) > 0.3

    def run(q, k, v, **call):
        return chunked(q, k, v, block_q=block_q, block_k=block_k, **call).out

    assert_matches_reference(run, q, k, v, causal=True, attn_mask=mask)


def test_chunked_logsumexp_is_the_softmax_normaliser():
    q, k, v = make_qkv(2, 4, 2, 33, 47, 16, dtype=torch.float64, seed=5)
    mask = torch.rand(2, 4, 33, 47, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[0, 1, 2] = False
    out, lse = chunked(q, k, v, attn_mask=mask, causal=True, block_q=8, block_k=8)
    scores = (q @ mh.backends.reference.repeat_kv(k, 4).transpose(-2, -1)) / 4.0
    scores = scores.masked_fill(~(mask & mh.masks.causal_mask(33, 47)), float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)
    assert lse.shape == (2, 4, 33)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert max_err(lse[finite], expected[finite]) < 1e-12
    # the weights from the lse are the reference's probabilities
    probs = attention_ref(q, k, v, attn_mask=mask, causal=True).probs
    assert max_err(torch.exp(scores - lse[..., None]).nan_to_num(0.0), probs) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_dropout_replays_the_reference(causal):
    """chunked's dropout, replayed into the reference: same output, same gradients."""
    B, H, G, T, S, p, seed = 2, 4, 2, 23, 31, 0.3, 987
    blocks = dict(block_q=5, block_k=8)
    q, k, v = make_qkv(B, H, G, T, S, 16, dtype=torch.float64, seed=1, requires_grad=True)
    out = chunked_forward(make_call(q, k, v, causal=causal, scale=0.25, dropout_p=p), seed=seed, **blocks).out
    keep = dropout_keep_mask(B, H, T, S, causal=causal, dropout_p=p, seed=seed, **blocks)
    drawn = mh.masks.causal_mask(T, S) if causal else torch.ones(T, S, dtype=torch.bool)
    assert 0.55 < keep[:, :, drawn].float().mean().item() < 0.85
    ref = attention_ref(q, k, v, causal=causal, scale=0.25, dropout_p=p, dropout_mask=keep).out
    assert max_err(out, ref) < 1e-12
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_same_result(backend):
    q, k, v = make_qkv(2, 4, 2, 33, 33, 16, seed=2)
    torch.manual_seed(42)
    first = mh.attention(q, k, v, dropout_p=0.2, backend=backend)
    torch.manual_seed(42)
    again = mh.attention(q, k, v, dropout_p=0.2, backend=backend)
    torch.manual_seed(43)
    other = mh.attention(q, k, v, dropout_p=0.2, backend=backend)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p(backend, p):
    """With q = 0 every weight is 1/S, and v = I makes out[t, j] = keep[t, j] / ((1 - p) S)."""
    B, H, S = 1, 4, 256
    q = torch.zeros(B, H, S, 8)
    k = torch.randn(B, H, S, 8)
    v = torch.eye(S).expand(B, H, S, S).contiguous()
    torch.manual_seed(0)
    out = mh.attention(q, k, v, dropout_p=p, backend=backend)
    kept = out * S * (1 - p)  # 0 or 1 per (query, key)
    assert torch.allclose(kept, kept.round(), atol=1e-4)
    assert abs(kept.mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gradcheck_float64(backend):
    q, k, v = make_qkv(1, 4, 2, 6, 9, 5, Dv=3, dtype=torch.float64, seed=3, requires_grad=True)
    mask = torch.tensor([[True] * 7 + [False] * 2]).expand(6, 9).clone()
    mask[1] = False  # one row with nothing to attend: output and gradient 0

    def f(q, k, v):
        if backend == "chunked":
            return chunked(q, k, v, attn_mask=mask, causal=True, block_q=4, block_k=4).out
        return attention_ref(q, k, v, attn_mask=mask, causal=True).out

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_chunked_with_dropout():
    q, k, v = make_qkv(1, 2, 1, 5, 7, 4, dtype=torch.float64, seed=4, requires_grad=True)

    def f(q, k, v):
        return chunked_forward(make_call(q, k, v, scale=0.5, dropout_p=0.4), block_q=2, block_k=3, seed=77).out

    assert torch.autograd.gradcheck(f, (q, k, v))


def _empty_row_case(kind):
    if kind == "causal_T_gt_S":  # the first T - S = 4 queries see no key
        q, k, v = make_qkv(2, 4, 2, 9, 5, 16, seed=0)
        return q, k, v, dict(causal=True), torch.arange(9) < 4
    q, k, v = make_qkv(2, 4, 2, 9, 12, 16, seed=0)
    empty = torch.zeros(9, dtype=torch.bool)
    empty[[2, 7]] = True
    if kind == "bool":
        mask = torch.ones(9, 12, dtype=torch.bool)
        mask[empty] = False
    else:
        mask = torch.zeros(9, 12)
        mask[empty] = float("-inf")
    return q, k, v, dict(attn_mask=mask), empty


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal_T_gt_S", "bool", "float"])
def test_rows_with_no_key_give_zero_output_and_gradient(backend, kind):
    q, k, v, call, empty = _empty_row_case(kind)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = mh.attention(q, k, v, backend=backend, **call)
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(out[:, :, ~empty].abs().sum(-1) > 0)
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.all(dq[:, :, empty] == 0)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("T,S", [(0, 5), (5, 0), (0, 0)])
def test_zero_length(backend, T, S):
    q, k, v = make_qkv(2, 4, 2, T, S, 8, Dv=6, requires_grad=True)
    if backend == "sdpa" and (T == 0 or S == 0):
        with pytest.raises(ValueError, match="zero-length"):
            mh.attention(q, k, v, backend=backend)
        return
    out = mh.attention(q, k, v, backend=backend, causal=True)
    assert out.shape == (2, 4, T, 6)
    assert torch.all(out == 0)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, x in zip(grads, (q, k, v)):
        assert g is None or (g.shape == x.shape and torch.all(g == 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_an_attended_key_propagates(backend, where):
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, seed=9)
    (k if where == "k" else v)[0, 0, 3, 0] = float("nan")
    out = mh.attention(q, k, v, causal=True, backend=backend)
    # head 0: queries 3..5 attend key 3, so their outputs must show the NaN
    assert torch.isnan(out[0, 0, 3:]).any(dim=-1).all()
    assert torch.isfinite(out[0, 1]).all()  # head 1 reads the other kv head


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision(backend, dtype):
    q, k, v = make_qkv(1, 4, 2, 33, 65, 32, dtype=dtype, seed=6)
    assert_matches_reference(run_backend(backend), q, k, v, causal=True, backward=False)


def test_sdpa_without_autograd_zeroes_rows_with_no_key_and_keeps_nan_where_attended():
    """Without autograd the sdpa backend passes the mask as it is (no opened copy) and zeroes the rows
    that see no key in place: they must still be exactly 0, the others equal to the reference, and a
    NaN in an attended value must still reach the rows that attend it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    lengths = torch.tensor([5, 2, 0])
    mask = (torch.arange(5)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    with torch.no_grad():
        out = mh.attention(q, k, v, attn_mask=mask, backend="sdpa")
        expected = mh.attention(q.double(), k.double(), v.double(), attn_mask=mask, backend="reference")
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        assert (out.double() - expected).abs().max() < 1e-5
        v_nan = v.clone()
        v_nan[1, :, 0] = float("nan")  # key 0 of sequence 1: attended by all its rows
        out_nan = mh.attention(q, k, v_nan, attn_mask=mask, backend="sdpa")
    assert out_nan[1].isnan().all() and not out_nan[0].isnan().any()
    assert torch.equal(out_nan[2], torch.zeros_like(out_nan[2]))


# ---- the scale, half-precision biases and what a backend cannot do


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.4])
def test_zero_and_negative_scales_are_computed_on_every_backend(backend, scale):
    q, k, v = make_qkv(2, 4, 2, 9, 9, 8, seed=1)
    out = mh.attention(q, k, v, causal=True, scale=scale, backend=backend)
    golden = attention_ref(q.double(), k.double(), v.double(), causal=True, scale=scale).out
    assert torch.isfinite(out).all() and max_err(out, golden) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scale_that_overflows_is_refused(backend):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="scale=1e\\+300 overflows the compute dtype"):
        mh.attention(q, k, v, scale=1e300, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finite_bias_stays_finite_in_half_precision(backend):
    """-1e30 must not become -inf in float16 and turn a row into one with no key."""
    q, k, v = make_qkv(1, 2, 2, 3, 4, 8, seed=3)
    mask = torch.zeros(1, 1, 3, 4)
    mask[..., 1, :] = -1e30  # row 1: every key carries a huge but finite bias
    want = mh.attention(q, k, v, attn_mask=mask, backend=backend)  # float32
    got = mh.attention(q.half(), k.half(), v.half(), attn_mask=mask, backend="auto" if backend == "sdpa" else backend)
    assert got[0, :, 1].abs().sum() > 0  # the row attends (uniformly): not the output 0 of "no key"
    assert max_err(got, want) < 1e-2


def test_a_head_dim_of_zero_gives_the_mean_of_the_values():
    q, k, v = torch.zeros(1, 1, 2, 0), torch.zeros(1, 1, 3, 0), torch.randn(1, 1, 3, 2)  # D = 0: every score 0
    assert torch.allclose(attention_ref(q, k, v).out, v.mean(dim=2, keepdim=True).expand(1, 1, 2, 2))


def test_a_second_backward_through_chunked_says_it_cannot():
    q, k, v = make_qkv(1, 2, 2, 4, 5, 8, requires_grad=True)
    out = mh.attention(q, k, v, backend="chunked")
    with pytest.raises(RuntimeError, match="the chunked backend has no second derivative"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
