"""MultiHeadAttention: shapes, per-head matrices, GQA, cross-attention, masks, weights."""

from __future__ import annotations

import math

import pytest
import torch

import multihead as mh
from multihead import MultiHeadAttention
from conftest import count_checks, max_err


def per_head_by_hand(mha: MultiHeadAttention, x, y, causal=False, allowed=None):
    """The seeds' loop over heads, built only from head(i): sum_i softmax(Q_i K_iᵀ/√d) V_i W_i^O."""
    c = mha.config
    T, S = x.shape[1], y.shape[1]
    total = 0.0
    for i in range(c.num_heads):
        h = mha.head(i)
        Q = x @ h.w_q + (h.b_q if h.b_q is not None else 0)  # (B, T, D)
        K = y @ h.w_k + (h.b_k if h.b_k is not None else 0)  # (B, S, D)
        V = y @ h.w_v + (h.b_v if h.b_v is not None else 0)  # (B, S, Dv)
        scores = Q @ K.transpose(-2, -1) / math.sqrt(c.head_dim)  # (B, T, S)
        mask = torch.ones(T, S, dtype=torch.bool)
        if causal:
            mask = mask & mh.masks.causal_mask(T, S)
        if allowed is not None:
            mask = mask & allowed
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        total = total + (weights @ V) @ h.w_o  # (B, T, Dv) @ (Dv, C) -> (B, T, C)
    return total + (mha.out_proj.bias if mha.out_proj.bias is not None else 0)


@pytest.mark.parametrize("H,G,bias,causal", [(4, 4, True, False), (4, 2, False, True), (6, 1, True, True)])
def test_output_equals_the_per_head_loop(H, G, bias, causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, H, num_kv_heads=G, bias=bias, causal=causal).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    out = mha(x).output
    assert out.shape == (2, 9, 24)
    assert max_err(out, per_head_by_hand(mha, x, x, causal)) < 1e-12


def test_cross_attention_with_own_widths_and_head_dims():
    torch.manual_seed(1)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, head_dim=6, v_head_dim=5, kdim=10, vdim=10).double()
    assert mha.q_proj.weight.shape == (24, 16) and mha.k_proj.weight.shape == (12, 10)
    assert mha.v_proj.weight.shape == (10, 10) and mha.out_proj.weight.shape == (16, 20)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    memory = torch.randn(3, 11, 10, dtype=torch.float64)
    result = mha(x, memory, need_weights=True)
    assert result.output.shape == (3, 7, 16) and result.weights.shape == (3, 4, 7, 11)
    assert max_err(result.output, per_head_by_hand(mha, x, memory)) < 1e-12


def test_head_cuts_views_of_the_fused_weights():
    mha = MultiHeadAttention(8, 2, num_kv_heads=1)
    h1 = mha.head(1)
    assert (h1.index, h1.kv_index) == (1, 0)
    assert h1.w_q.shape == (8, 4) and h1.w_o.shape == (4, 8)
    assert torch.equal(h1.w_q, mha.q_proj.weight[4:8].T.detach())
    assert torch.equal(h1.w_o, mha.out_proj.weight[:, 4:8].T.detach())
    assert torch.equal(mha.head(-1).w_q, h1.w_q)
    with torch.no_grad():
        mha.q_proj.weight[4, 0] = 123.0
    assert h1.w_q[0, 0] == 123.0  # a view: what you see is the module's weight
    with pytest.raises(IndexError, match=r"head index must be an int in \[0, 2\), got 2"):
        mha.head(2)


def test_key_mask_equals_the_attn_mask_it_stands_for():
    torch.manual_seed(2)
    mha = MultiHeadAttention(16, 4)
    x = torch.randn(2, 6, 16)
    key_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    by_key_mask = mha(x, key_mask=key_mask).output
    by_attn_mask = mha(x, attn_mask=key_mask[:, None, None, :]).output
    assert max_err(by_key_mask, by_attn_mask) < 1e-6
    # padding keys do not matter: change them and the real rows stay put
    x2 = x.clone()
    x2[1, 4:] = 50.0
    assert max_err(mha(x2, key_mask=key_mask).output[1, :4], by_key_mask[1, :4]) < 1e-5
    # float and bool masks combine
    bias = torch.zeros(6, 6)
    combined = mha(x, attn_mask=bias, key_mask=key_mask).output
    assert max_err(combined, by_key_mask) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "sdpa", "chunked"])
def test_weights_on_request_match_the_reference_and_the_output(backend):
    torch.manual_seed(3)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, backend=backend)
    x = torch.randn(2, 10, 32)
    plain = mha(x)
    assert plain.weights is None
    with_weights = mha(x, need_weights=True)
    assert with_weights.weights.shape == (2, 4, 10, 10)
    assert max_err(with_weights.output, plain.output) < 1e-5
    assert (with_weights.weights.triu(1) == 0).all()
    assert max_err(with_weights.weights.sum(-1), torch.ones(2, 4, 10)) < 1e-5


def test_backends_give_the_same_module_output_and_gradients():
    torch.manual_seed(4)
    x = torch.randn(2, 13, 32)
    results = []
    for backend in ["reference", "sdpa", "chunked"]:
        torch.manual_seed(5)
        mha = MultiHeadAttention(32, 8, num_kv_heads=4, causal=True, backend=backend)
        out = mha(x).output
        out.square().sum().backward()
        results.append((out, mha.q_proj.weight.grad, mha.v_proj.weight.grad))
    for out, gq, gv in results[1:]:
        assert max_err(out, results[0][0]) < 1e-5
        assert max_err(gq, results[0][1]) < 1e-4 and max_err(gv, results[0][2]) < 1e-4


def test_dropout_only_in_training():
    torch.manual_seed(6)
    mha = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 8, 16)
    mha.eval()
    assert torch.equal(mha(x).output, mha(x).output)
    mha.train()
    torch.manual_seed(0)
    a = mha(x).output
    torch.manual_seed(0)
    b = mha(x).output
    assert torch.equal(a, b)
    assert not torch.allclose(a, mha.eval()(x).output)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(d_model=10, num_heads=3), ValueError, "d_model=10 is not divisible by num_heads=3; pass head_dim"),
    (dict(d_model=8, num_heads=4, num_kv_heads=3), ValueError, "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(d_model=8, num_heads=2, dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\), got 1.0"),
    (dict(d_model=8, num_heads=2, dropout=-0.5), ValueError, "dropout must be a float"),
    (dict(d_model=8, num_heads=0), ValueError, "num_heads must be positive, got 0"),
    (dict(d_model=8.0, num_heads=2), TypeError, "d_model must be an int, got float"),
    (dict(d_model=8, num_heads=2, backend="nope"), ValueError, "backend must be 'auto' or one of"),
])
def test_bad_configuration(kwargs, error, message):
    with pytest.raises(error, match=message):
        MultiHeadAttention(**kwargs)


def test_head_dim_makes_any_width_possible():
    mha = MultiHeadAttention(10, 3, head_dim=4)
    assert mha(torch.randn(1, 2, 10)).output.shape == (1, 2, 10)


def test_bad_forward_inputs():
    mha = MultiHeadAttention(8, 2, kdim=6)
    x = torch.randn(2, 5, 8)
    y = torch.randn(2, 7, 6)
    with pytest.raises(ValueError, match=r"query has 2 dims, \(B, len, d_model=8\) expected"):
        mha(x[0], y)
    with pytest.raises(ValueError, match=r"key and value default to the query \(width d_model=8\), but this "
                                         r"module projects keys of width kdim=6"):
        mha(x)  # self-attention needs kdim == d_model
    with pytest.raises(ValueError, match=r"key has width 8, kdim=6 expected"):
        mha(x, x, y)
    with pytest.raises(ValueError, match="value was given without key"):
        mha(x, value=y)
    with pytest.raises(ValueError, match="must agree on B and S"):
        mha(x, y[:1], torch.randn(1, 7, 8))
    with pytest.raises(TypeError, match="key_mask must be a bool tensor"):
        mha(x, y, torch.randn(2, 7, 8), key_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"key_mask must be \(B, S\) = \(2, 7\), got \(2, 5\)"):
        mha(x, y, torch.randn(2, 7, 8), key_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        mha(x, y, torch.randn(2, 7, 8), attn_mask=torch.ones(5, 7, dtype=torch.int32))


def test_zero_length_sequences():
    mha = MultiHeadAttention(8, 2, causal=True)
    assert mha(torch.randn(2, 0, 8)).output.shape == (2, 0, 8)
    out = mha(torch.randn(2, 3, 8), torch.randn(2, 0, 8)).output
    assert out.shape == (2, 3, 8)
    assert max_err(out, mha.out_proj.bias.expand(2, 3, 8)) == 0.0  # attention gives 0, then W^O's bias


# ---- one door, one path: a call's arguments are checked once


PADDED = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # (B, T) key_mask, right-padded
CALLS = {  # (module keyword arguments, forward keyword arguments)
    "self": (dict(), dict()),
    "masks and weights": (dict(), dict(attn_mask=torch.rand(5, 5) > 0.3, key_mask=PADDED, need_weights=True)),
    "cross": (dict(kdim=6, vdim=6), dict(key=torch.randn(2, 7, 6), value=torch.randn(2, 7, 6))),
    "dynamic cache": (dict(causal=True), dict(cache="dynamic", key_mask=PADDED)),
    "static cache, mask, weights": (dict(causal=True), dict(cache="static", need_weights=True,
                                                            attn_mask=torch.ones(5, 8, dtype=torch.bool))),
    "rope, named backend": (dict(causal=True, rope=mh.RotaryEmbedding(4), backend="chunked"),
                            dict(cache="dynamic", positions=torch.arange(5))),
}


@pytest.mark.parametrize("case", sorted(CALLS))
def test_a_module_call_checks_its_arguments_once(case, monkeypatch):
    from multihead.nn.cache import DynamicCache, StaticCache
    import multihead.nn.mha as mha_module

    assert "make_call" not in vars(mha_module), "the module builds its own call from checked parts"
    module_kwargs, kwargs = CALLS[case]
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, **module_kwargs).eval()
    kwargs = dict(kwargs)
    if "cache" in kwargs:
        kwargs["cache"] = (DynamicCache(1) if kwargs["cache"] == "dynamic" else StaticCache(1, 2, 8, 2, 4))[0]
    attention = mh.attention  # loaded now (multihead imports its public names on first use): the counters wrap
    counts = count_checks(monkeypatch)  # the checks bound in the multihead modules loaded when they start
    with torch.no_grad():
        out = mha(torch.randn(2, 5, 8), **kwargs)
    cached = "cache" in kwargs
    assert counts == dict(inputs=1, latent=0, make_call=0, check_mask=1, plan=int(cached), update=int(cached),
                          decode=0), counts
    assert torch.isfinite(out.output).all()
    # the counters see a check wherever one runs: the public door checks its call once, with make_call
    q = torch.randn(1, 2, 3, 4)
    attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    assert counts["make_call"] == 1 and counts["check_mask"] == 2
