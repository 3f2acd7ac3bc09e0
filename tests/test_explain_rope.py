"""multihead.explain on a module with a rotary embedding (RoPE) and a causal mask: the loop redoes both."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import multihead.explain as ex_mod
from multihead import MultiHeadAttention
from multihead.explain import (
    check_against_module,
    explain,
    explain_module,
    projections_from_arrays,
    projections_from_module,
)
from multihead.nn.rope import RotaryEmbedding, apply_rotary

TOL = 1e-12


def rope_module(C=8, H=4, G=None, D=4, *, causal=True, seed=0) -> MultiHeadAttention:
    torch.manual_seed(seed)
    m = MultiHeadAttention(C, H, num_kv_heads=G, head_dim=D, causal=causal, rope=RotaryEmbedding(D),
                           dtype=torch.float64)
    with torch.no_grad():  # nn.Linear's default biases are small; make them matter
        for p in (m.q_proj.bias, m.k_proj.bias, m.v_proj.bias, m.out_proj.bias):
            p.normal_()
    return m.eval()


def module_output(m: MultiHeadAttention, x: np.ndarray, key_mask: np.ndarray | None = None) -> np.ndarray:
    """The float64 module itself on one sequence, independently of check_against_module."""
    km = None if key_mask is None else torch.from_numpy(key_mask)[None]  # (S,) -> (1, S)
    with torch.no_grad():
        out = m(torch.from_numpy(x)[None], key_mask=km).output  # (T, C) -> (1, T, C)
    return out[0].numpy()  # (1, T, C) -> (T, C)


@pytest.mark.parametrize("G", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_key_mask", [False, True], ids=["nomask", "keymask"])
def test_rope_module_is_explained_exactly(G, causal, with_key_mask):
    # Regression: the loop used to leave RoPE out and land 0.1-0.3 away from the module.
    m = rope_module(G=G, causal=causal)
    x = np.random.default_rng(1).normal(size=(9, 8))
    key_mask = np.array([True, True, False, True, True, True, False, True, True]) if with_key_mask else None

    ex = explain_module(m, x, key_mask=key_mask)
    np.testing.assert_allclose(ex.output, module_output(m, x, key_mask), rtol=0, atol=TOL)
    assert ex.causal == causal and ex.projections.rope_base == 10000.0
    check = check_against_module(m, x, key_mask=key_mask)
    assert check.passed, str(check)
    assert check.max_abs_diff <= TOL


def test_projections_from_module_carry_rope_to_a_direct_explain():
    # The path explain(x, projections_from_module(m)) used to drop RoPE without a word.
    m = rope_module()
    x = np.random.default_rng(2).normal(size=(7, 8))
    projections = projections_from_module(m)
    assert projections.rope_base == m.rope.base
    ex = explain(x, projections, causal=m.config.causal)
    np.testing.assert_allclose(ex.output, module_output(m, x), rtol=0, atol=TOL)


def test_leaving_rope_out_is_visible_and_the_check_catches_it(monkeypatch):
    # What the old loop did: the same projections without the rotation. At these sizes that
    # is far from the module, so the exact-agreement tests above cannot pass by accident.
    m = rope_module()
    x = np.random.default_rng(3).normal(size=(7, 8))
    unturned = dataclasses.replace(projections_from_module(m), rope_base=None)
    assert np.abs(explain(x, unturned, causal=True).output - module_output(m, x)).max() > 1e-2

    real = ex_mod.projections_from_module
    monkeypatch.setattr(ex_mod, "projections_from_module", lambda module: dataclasses.replace(real(module),
                                                                                              rope_base=None))
    check = ex_mod.check_against_module(m, x)
    assert not check.passed and check.output_diff > 1e-2
    assert "DISAGREE" in str(check)


def test_the_rotation_is_kept_as_a_step():
    m = rope_module(H=2, D=4)
    T = 6
    ex = explain_module(m, np.random.default_rng(4).normal(size=(T, 8)))
    # angles[m, j] = m · 10000^(-2j/D): with D = 4, θ = (1, 1/100)
    np.testing.assert_allclose(ex.rope_angles, np.arange(T)[:, None] * np.array([[1.0, 0.01]]), rtol=1e-15, atol=0)
    cos, sin = RotaryEmbedding(4)(torch.arange(T), dtype=torch.float64)  # (1, 1, T, D) each
    for h in ex.heads:
        for before, after in ((h.q, h.q_rotated), (h.k, h.k_rotated)):
            expected = apply_rotary(torch.from_numpy(np.array(before))[None, None], cos, sin)[0, 0]  # (T, D)
            np.testing.assert_allclose(after, expected.numpy(), rtol=0, atol=TOL)
            np.testing.assert_array_equal(after[0], before[0])  # position 0: angle 0, nothing turns
            assert not np.allclose(after[1:], before[1:])
        np.testing.assert_allclose(h.scores, h.q_rotated @ h.k_rotated.T, rtol=0, atol=TOL)
        assert not np.triu(h.allowed, 1).any()  # the module's causal mask came along


def test_rope_errors_are_clear():
    m = rope_module()
    x = np.zeros((5, 8))
    projections = projections_from_module(m)
    with pytest.raises(ValueError, match=r"RoPE \(rope_base=10000.0\).*self-attention only, leave key and value None"):
        explain(x, projections, key=x)
    odd = [np.zeros((8, 3))] * 2
    with pytest.raises(ValueError, match="rope_base needs an even head dim D .* got D=3"):
        projections_from_arrays(odd, odd, odd, np.zeros((6, 8)), rope_base=10000.0)
    even = [np.zeros((8, 2))] * 2
    for bad in (1.0, float("nan"), True, "10000"):
        with pytest.raises(ValueError, match=r"rope_base must be None or a finite number > 1"):
            projections_from_arrays(even, even, even, np.zeros((4, 8)), rope_base=bad)

    class ScaledRotary(RotaryEmbedding):  # a subclass may compute other angles: refused, not ignored
        pass

    m.rope = ScaledRotary(4)
    with pytest.raises(TypeError, match="module.rope is a ScaledRotary"):
        explain_module(m, x)
