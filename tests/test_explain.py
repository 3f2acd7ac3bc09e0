"""multihead.explain: the per-head loop keeps every step, and equals the batched module."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead.explain as ex_mod
from multihead import MultiHeadAttention
from multihead.explain import (
    Check,
    Explanation,
    Projections,
    check_against_module,
    explain,
    explain_module,
    projections_from_arrays,
    projections_from_fused,
    projections_from_module,
    split_columns,
)

TOL = 1e-12


def make_module(C=8, H=4, G=None, D=3, *, bias=True, causal=False, seed=0, **kw) -> MultiHeadAttention:
    torch.manual_seed(seed)
    m = MultiHeadAttention(C, H, num_kv_heads=G, head_dim=D, bias=bias, causal=causal, **kw)
    if bias:  # nn.Linear's default biases are small; make them matter
        with torch.no_grad():
            for p in (m.q_proj.bias, m.k_proj.bias, m.v_proj.bias, m.out_proj.bias):
                p.normal_()
    return m


def module_forward64(m: MultiHeadAttention, x: np.ndarray, key=None, value=None, key_mask=None) -> np.ndarray:
    """The batched module in float64, computed here independently of check_against_module."""
    import copy

    twin = copy.deepcopy(m).double().eval()
    t = lambda a: None if a is None else torch.from_numpy(np.array(a))[None]  # noqa: E731  (n, w) -> (1, n, w)
    with torch.no_grad():
        out = twin(t(x), t(key), t(value), key_mask=t(key_mask)).output  # (1, T, C)
    return out[0].numpy()


# --------------------------------------------------------------------------- loop == batched


@pytest.mark.parametrize("G", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("with_key_mask", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_loop_equals_batched_module(G, causal, with_key_mask, bias):
    m = make_module(C=8, H=4, G=G, D=3, bias=bias, causal=causal)
    x = np.random.default_rng(1).normal(size=(7, 8))
    key_mask = np.array([True, True, False, True, True, False, True]) if with_key_mask else None

    check = check_against_module(m, x, key_mask=key_mask)
    assert isinstance(check, Check)
    assert check.passed, str(check)
    assert check.max_abs_diff <= TOL
    assert check.explanation.causal == causal

    # The same comparison, written independently of Check.
    expected = module_forward64(m, x, key_mask=key_mask)
    got = explain_module(m, x, key_mask=key_mask).output
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


def test_cross_attention_with_kdim_vdim_and_bottom_right_causal():
    # T = 3 queries against S = 5 keys: query t sees keys s <= t + 2.
    m = make_module(C=6, H=2, D=4, kdim=5, vdim=7, causal=True)
    rng = np.random.default_rng(2)
    x, y_k, y_v = rng.normal(size=(3, 6)), rng.normal(size=(5, 5)), rng.normal(size=(5, 7))
    check = check_against_module(m, x, key=y_k, value=y_v)
    assert check.passed, str(check)
    allowed = check.explanation.heads[0].allowed
    expected = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(allowed, expected)
    np.testing.assert_allclose(check.explanation.output, module_forward64(m, x, y_k, y_v), rtol=0, atol=TOL)


def test_rows_with_no_key_give_zero_and_still_match():
    # T = 5 > S = 3, causal: the first two queries see nothing (bottom-right alignment).
    m = make_module(C=4, H=2, D=2, causal=True)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    ex = explain_module(m, x, key=y)
    for h in ex.heads:
        assert not h.allowed[:2].any() and h.allowed[2:].any(axis=1).all()
        np.testing.assert_array_equal(h.weights[:2], 0.0)
        np.testing.assert_array_equal(h.z[:2], 0.0)
        assert np.isfinite(h.weights).all()
    check = check_against_module(m, x, key=y)
    assert check.passed, str(check)


def test_check_fails_when_the_loop_is_wrong(monkeypatch):
    m = make_module(C=8, H=2, D=4)
    x = np.random.default_rng(4).normal(size=(5, 8))
    real = ex_mod.projections_from_module

    def swapped(module):  # the loop reads head 1's W^Q as head 0's and vice versa
        proj = real(module)
        return dataclasses.replace(proj, w_q=proj.w_q[::-1])

    monkeypatch.setattr(ex_mod, "projections_from_module", swapped)
    check = ex_mod.check_against_module(m, x)
    assert not check.passed
    assert check.max_abs_diff > 1e-6
    assert "DISAGREE" in str(check)


@settings(max_examples=25, deadline=None)
@given(
    H=st.sampled_from([1, 2, 3, 4, 6]), G_div=st.integers(0, 3), D=st.integers(1, 5),
    T=st.integers(1, 6), S=st.integers(1, 6), causal=st.booleans(), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_loop_equals_batched_property(H, G_div, D, T, S, causal, bias, seed):
    divisors = [g for g in range(1, H + 1) if H % g == 0]
    G = divisors[G_div % len(divisors)]
    m = make_module(C=5, H=H, G=G, D=D, bias=bias, causal=causal, seed=seed)
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(T, 5)), rng.normal(size=(S, 5))
    key_mask = rng.random(S) > 0.3
    check = check_against_module(m, x, key=y, key_mask=key_mask)
    assert check.passed, str(check)


def test_check_leaves_the_callers_module_alone():
    m = make_module(C=8, H=2, D=4).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    check_against_module(m, np.random.default_rng(5).normal(size=(4, 8)))
    assert m.training
    for k, v in m.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, before[k])


# --------------------------------------------------------------------------- the intermediates


def test_every_step_is_what_the_textbook_writes():
    m = make_module(C=8, H=2, D=3, bias=True, causal=True)
    X = np.random.default_rng(6).normal(size=(6, 8))
    key_mask = np.array([True, True, True, False, True, True])
    ex = explain_module(m, X, key_mask=key_mask)
    w = ex.projections
    assert w.rope_base is None and ex.rope_angles is None
    for h in ex.heads:
        i = h.index
        np.testing.assert_allclose(h.q, X @ w.w_q[i] + w.b_q[i], rtol=0, atol=TOL)
        np.testing.assert_allclose(h.k, X @ w.w_k[i] + w.b_k[i], rtol=0, atol=TOL)
        np.testing.assert_allclose(h.v, X @ w.w_v[i] + w.b_v[i], rtol=0, atol=TOL)
        assert h.q_rotated is h.q and h.k_rotated is h.k  # no RoPE: nothing turned
        np.testing.assert_allclose(h.scores, h.q @ h.k.T, rtol=0, atol=TOL)
        np.testing.assert_allclose(h.scaled, h.scores / math.sqrt(3), rtol=0, atol=TOL)
        # causal and the padding key 3: allowed is the lower triangle minus column 3
        expected_allowed = np.tril(np.ones((6, 6), dtype=bool)) & key_mask[None, :]
        np.testing.assert_array_equal(h.allowed, expected_allowed)
        assert np.all(h.masked[~h.allowed] == -np.inf)
        np.testing.assert_array_equal(h.masked[h.allowed], h.scaled[h.allowed])
        np.testing.assert_array_equal(h.weights[~h.allowed], 0.0)
        assert np.all(h.weights[h.allowed] > 0)
        np.testing.assert_allclose(h.weights.sum(axis=1), 1.0, rtol=0, atol=TOL)
        # softmax itself: row t is exp(masked) / sum over the allowed keys
        e = np.where(h.allowed, np.exp(h.scaled), 0.0)
        np.testing.assert_allclose(h.weights, e / e.sum(axis=1, keepdims=True), rtol=0, atol=TOL)
        assert h.keep is None and h.dropped is h.weights
        np.testing.assert_allclose(h.z, h.weights @ h.v, rtol=0, atol=TOL)
        np.testing.assert_array_equal(ex.concat[:, 3 * i:3 * (i + 1)], h.z)
    np.testing.assert_allclose(ex.output, ex.concat @ w.w_o + w.b_o, rtol=0, atol=TOL)


def test_head_projections_are_cut_out_by_head_i():
    m = make_module(C=8, H=4, G=2, D=2)
    w = projections_from_module(m)
    assert (w.num_heads, w.num_kv_heads, w.head_dim, w.v_head_dim, w.d_model, w.d_out) == (4, 2, 2, 2, 8, 8)
    for i in range(4):
        hw = m.head(i)
        assert w.kv_index(i) == hw.kv_index == i // 2
        np.testing.assert_array_equal(w.w_q[i], hw.w_q.double().numpy())
        np.testing.assert_array_equal(w.w_k[w.kv_index(i)], hw.w_k.double().numpy())
        np.testing.assert_array_equal(w.w_v[w.kv_index(i)], hw.w_v.double().numpy())
        # head i's rows of W^O are the rows that read head i's slot of the concatenation
        np.testing.assert_array_equal(w.w_o[2 * i:2 * (i + 1)], hw.w_o.double().numpy())


def test_gqa_heads_share_keys_and_values_but_not_queries():
    m = make_module(C=8, H=4, G=2, D=3)
    ex = explain_module(m, np.random.default_rng(7).normal(size=(5, 8)))
    h = ex.heads
    assert [t.kv_index for t in h] == [0, 0, 1, 1]
    np.testing.assert_array_equal(h[0].k, h[1].k)
    np.testing.assert_array_equal(h[0].v, h[1].v)
    assert not np.allclose(h[1].k, h[2].k)
    assert not np.allclose(h[0].q, h[1].q)


@pytest.mark.parametrize("G", [None, 2], ids=["mha", "gqa"])
def test_concatenation_follows_the_modules_head_order(G):
    # Perturb the module's value rows for one kv head: exactly the concat slots of the
    # query heads that read it change. A loop that concatenated heads in another order
    # than the module stacks them would move the change to another slot.
    H, Dv = 4, 3
    m = make_module(C=8, H=H, G=G, D=Dv, causal=True)
    x = np.random.default_rng(8).normal(size=(6, 8))
    before = explain_module(m, x).concat
    g = 1
    with torch.no_grad():
        m.v_proj.weight[g * Dv:(g + 1) * Dv] += 1.0  # kv head g's W_g^V, in the module's layout
    after = explain_module(m, x)
    readers = [i for i in range(H) if after.heads[i].kv_index == g]
    assert readers == ([1] if G is None else [2, 3])
    for i in range(H):
        slot = slice(i * Dv, (i + 1) * Dv)
        changed = not np.array_equal(before[:, slot], after.concat[:, slot])
        assert changed == (i in readers), f"head {i}: slot changed={changed}"
    assert check_against_module(m, x).passed


def test_check_compares_the_concatenation_not_only_the_output(monkeypatch):
    # Reverse the heads AND W^O's row blocks: the output is unchanged, the concat order is wrong.
    m = make_module(C=8, H=2, D=4, bias=False)
    x = np.random.default_rng(9).normal(size=(5, 8))
    real = ex_mod.projections_from_module

    def reversed_heads(module):
        proj = real(module)
        w_o = np.concatenate([proj.w_o[4:], proj.w_o[:4]])  # (H·Dv, C) with head blocks swapped
        return dataclasses.replace(proj, w_q=proj.w_q[::-1], w_k=proj.w_k[::-1], w_v=proj.w_v[::-1], w_o=w_o)

    monkeypatch.setattr(ex_mod, "projections_from_module", reversed_heads)
    check = ex_mod.check_against_module(m, x)
    assert check.output_diff <= TOL  # the output alone cannot tell
    assert check.concat_diff > 1e-6 and not check.passed


def test_fused_split_equals_per_head():
    m = make_module(C=8, H=2, D=2, bias=True)
    x = np.random.default_rng(10).normal(size=(11, 8))
    fused = projections_from_fused(
        m.q_proj.weight.detach().T, m.k_proj.weight.detach().T, m.v_proj.weight.detach().T,
        m.out_proj.weight.detach().T, num_heads=2,
        b_q=m.q_proj.bias.detach(), b_k=m.k_proj.bias.detach(), b_v=m.v_proj.bias.detach(),
        b_o=m.out_proj.bias.detach(),
    )
    a = explain(x, fused, causal=True)
    b = explain(x, projections_from_module(m), causal=True)
    np.testing.assert_array_equal(a.output, b.output)
    # X W_q then cut into column blocks == X W_qi per head
    w_q = m.q_proj.weight.detach().double().numpy().T  # (H·D, C) = (4, 8) -> (C, H·D) = (8, 4)
    for i, part in enumerate(split_columns("W_q", x @ w_q, 2)):
        np.testing.assert_allclose(part, a.heads[i].q - fused.b_q[i], rtol=0, atol=TOL)


def test_plain_numpy_projections():
    rng = np.random.default_rng(11)
    H, C, D = 2, 8, 2
    w = projections_from_arrays(
        [rng.normal(size=(C, D)) for _ in range(H)], [rng.normal(size=(C, D)) for _ in range(H)],
        [rng.normal(size=(C, D)) for _ in range(H)], rng.normal(size=(H * D, 4)),
    )
    assert isinstance(w, Projections) and w.rope_base is None
    x = rng.normal(size=(11, C))
    ex = explain(x, w, causal=True)
    assert isinstance(ex, Explanation)
    assert ex.output.shape == (11, 4)
    z = [(np.where(np.tril(np.ones((11, 11))) > 0, (x @ w.w_q[i]) @ (x @ w.w_k[i]).T / math.sqrt(D), -np.inf))
         for i in range(H)]
    for i in range(H):
        p = np.exp(z[i] - z[i].max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(ex.heads[i].z, p @ (x @ w.w_v[i]), rtol=0, atol=TOL)


def test_dropout_scales_kept_weights_and_is_reproducible():
    m = make_module(C=8, H=2, D=4, causal=True)
    x = np.random.default_rng(12).normal(size=(6, 8))
    a = explain_module(m, x, dropout=0.5, rng=0)
    b = explain_module(m, x, dropout=0.5, rng=np.random.default_rng(0))
    plain = explain_module(m, x)
    for ha, hb, hp in zip(a.heads, b.heads, plain.heads):
        assert ha.keep is not None and ha.keep.dtype == bool
        assert 0 < ha.keep.mean() < 1
        np.testing.assert_array_equal(ha.keep, hb.keep)
        np.testing.assert_array_equal(ha.weights, hp.weights)  # softmax is before dropout
        np.testing.assert_allclose(ha.dropped, ha.weights * ha.keep * 2.0, rtol=0, atol=TOL)
        np.testing.assert_allclose(ha.z, ha.dropped @ ha.v, rtol=0, atol=TOL)
    assert not np.array_equal(a.output, plain.output)


def test_the_classic_11_by_8_two_head_example_shapes():
    # 11 tokens of width d_in = 8, projected to d_out = 4, two heads of size 2.
    m = MultiHeadAttention(8, 2, head_dim=2, bias=False, causal=True)
    x = np.random.default_rng(13).normal(size=(11, 8))
    ex = explain_module(m, x)
    w = ex.projections
    assert [a.shape for a in w.w_q] == [(8, 2), (8, 2)]
    assert w.w_o.shape == (4, 8)
    assert len(ex.heads) == 2
    for h in ex.heads:
        assert h.q.shape == h.k.shape == h.v.shape == (11, 2)
        assert h.scores.shape == h.scaled.shape == h.masked.shape == h.weights.shape == (11, 11)
        assert h.z.shape == (11, 2)
        assert np.triu(h.masked, 1)[np.triu_indices(11, 1)].tolist() == [-np.inf] * 55
    assert ex.concat.shape == (11, 4)
    assert ex.output.shape == (11, 8)
    assert ex.scale == pytest.approx(math.sqrt(2))


def test_records_are_frozen_snapshots():
    m = make_module(C=8, H=2, D=4)
    x = np.random.default_rng(14).normal(size=(3, 8))
    ex = explain_module(m, x)
    with pytest.raises(ValueError):
        ex.heads[0].weights[0, 0] = 5.0
    with pytest.raises(AttributeError):
        ex.output = None
    x[0, 0] = 100.0  # the caller's array is copied, not referenced
    assert ex.x[0, 0] != 100.0


# --------------------------------------------------------------------------- errors


def test_wrong_shapes_and_types_give_clear_errors():
    m = make_module(C=8, H=2, D=4)
    w = projections_from_module(m)
    x = np.zeros((5, 8))
    with pytest.raises(ValueError, match=r"x has 3 dims, \(tokens, C=8\) expected, got \(1, 5, 8\); pass one sequence"):
        explain(x[None], w)
    with pytest.raises(ValueError, match=r"x has width 7, C=8 expected, got \(5, 7\)"):
        explain(np.zeros((5, 7)), w)
    with pytest.raises(ValueError, match=r"key_mask must be \(S,\) = \(5,\)"):
        explain(x, w, key_mask=np.ones(4, dtype=bool))
    with pytest.raises(TypeError, match="key_mask must be bool"):
        explain(x, w, key_mask=np.ones(5))
    with pytest.raises(ValueError, match="dropout must be a float in"):
        explain(x, w, dropout=1.0)
    with pytest.raises(ValueError, match="value was given without key"):
        explain(x, w, value=x)
    with pytest.raises(TypeError, match="projections must be a Projections"):
        explain(x, m)
    with pytest.raises(TypeError, match="must be a multihead.MultiHeadAttention"):
        check_against_module(torch.nn.Linear(8, 8), x)
    with pytest.raises(ValueError, match=r"w_q\[1\] must be \(C, D\) with D=2, got \(8, 3\)"):
        projections_from_arrays([np.zeros((8, 2)), np.zeros((8, 3))], [np.zeros((8, 2))] * 2,
                                [np.zeros((8, 2))] * 2, np.zeros((4, 8)))
    with pytest.raises(ValueError, match=r"w_o must be \(H·Dv, C_out\) with H·Dv=4, got \(5, 8\)"):
        projections_from_arrays([np.zeros((8, 2))] * 2, [np.zeros((8, 2))] * 2, [np.zeros((8, 2))] * 2,
                                np.zeros((5, 8)))
    with pytest.raises(ValueError, match="H must be a multiple of G"):
        projections_from_arrays([np.zeros((8, 2))] * 3, [np.zeros((8, 2))] * 2, [np.zeros((8, 2))] * 2,
                                np.zeros((6, 8)))
    with pytest.raises(ValueError, match="not divisible into 3 heads"):
        split_columns("W_q", np.zeros((8, 4)), 3)
