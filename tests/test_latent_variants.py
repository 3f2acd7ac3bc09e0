"""Multi-head latent attention with the attention family: window, softcap, ALiBi and learned sinks.

The module equals an independent expansion into plain multi-head attention
(test_latent.expand_to_mha) through the reference with the same variants, on
both paths; cached decoding (dynamic, static and window caches) equals the
full forward; a window really limits what a query sees.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from multihead import DynamicCache
from multihead.backends.reference import attention_ref
from multihead.core.variants import Variants
from multihead.nn.latent import make_static_cache, make_window_cache
from conftest import max_err
from test_latent import DR, DV, DC, C, D, H, expand_to_mha, make_mla, randn
from test_module_variants import CONFIGS  # the same variants as MultiHeadAttention's tests


def _mla(name: str):
    m = make_mla(**CONFIGS[name])
    if m.sinks is not None:
        with torch.no_grad():
            m.sinks.copy_(torch.linspace(-1.0, 2.0, H))
    return m


def _expected(m, x):
    """The module's output from its weights, expanded to per-head q, k, v, through the reference's variants."""
    q, k, v = expand_to_mha(m, x)
    cfg = m.config
    slopes = None if m.alibi_slopes is None else m.alibi_slopes[None]  # (H,) -> (1, H)
    variants = Variants(cfg.window, cfg.softcap, slopes, m.sinks, None, None, None)
    ref = attention_ref(q, k, v, causal=True, scale=1 / math.sqrt(D + DR), variants=variants)
    B, T, _ = x.shape
    out = ref.out.transpose(1, 2).reshape(B, T, H * DV)  # (B, H, T, Dv) -> (B, T, H·Dv)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias), ref.probs


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_both_paths_equal_the_expansion_through_the_reference(name, absorb):
    m = _mla(name)
    x = randn(2, 11, C)
    want, probs = _expected(m, x)
    got = m(x, absorb=absorb, need_weights=True)
    assert max_err(got.output, want) < 1e-12
    assert max_err(got.weights, probs) < 1e-12


def _cache(kind: str, m):
    if kind == "dynamic":
        return DynamicCache(1)
    if kind == "static":
        return make_static_cache(m.config, 1, 2, 16, dtype=torch.float64)
    return make_window_cache(m.config, 1, 2, dtype=torch.float64)


CACHED = [(name, kind) for name in ("all", "sinks", "window") for kind in ("dynamic", "static")] + [
    ("all", "window"), ("window", "window")]


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("name, kind", CACHED)
def test_cached_decode_equals_the_full_forward(name, kind, absorb):
    m = _mla(name)
    x = randn(2, 12, C)
    cache = _cache(kind, m)
    with torch.no_grad():
        steps = [m(x[:, :5], cache=cache[0], absorb=absorb).output]
        steps += [m(x[:, t:t + 1], cache=cache[0], absorb=absorb).output for t in range(5, 12)]
        assert max_err(torch.cat(steps, dim=1), m(x).output) < 1e-12


def test_a_window_limits_what_a_query_sees():
    """Changing token 0 changes the outputs of the queries whose window holds it (0..3), and no other."""
    m = _mla("window")
    x = randn(1, 9, C)
    changed = x.clone()
    changed[:, 0] += 1.0
    moved = (m(changed).output - m(x).output).abs().amax(dim=-1)[0]  # (T,)
    assert (moved[:4] > 1e-3).all()
    assert (moved[4:] == 0).all()


def test_the_sinks_are_learned_and_take_weight_from_the_keys():
    m = _mla("sinks")
    out = m(randn(2, 6, C), need_weights=True)
    assert (out.weights.sum(-1) < 1).all()
    out.output.square().sum().backward()
    assert m.sinks.grad is not None and m.sinks.grad.abs().sum() > 0
    assert "sinks" in dict(m.named_parameters()) and "alibi_slopes" not in m.state_dict()


def test_the_latent_window_cache_keeps_the_window_of_latents():
    m = _mla("window")
    cache = make_window_cache(m.config, 2, 3)
    assert cache.nbytes == 2 * 3 * (3 + 2) * ((DC + DR) * 4 + 8)  # layers x B x (left + 2 slots) x (c_KV, k^R, pos)


@pytest.mark.parametrize("keywords, error, message", [
    (dict(window=(None, 0)), ValueError, "left side is limited"),
    (dict(), ValueError, "left side is limited"),
])
def test_a_window_cache_needs_a_window(keywords, error, message):
    with pytest.raises(error, match=message):
        make_window_cache(make_mla(**keywords).config, 1, 2)


@pytest.mark.parametrize("make", [lambda config: make_static_cache(config, 1, 2, 8),
                                  lambda config: make_window_cache(config, 1, 2)], ids=["static", "window"])
def test_a_cache_made_for_other_latents_is_refused_by_their_names(make):
    """Once unclear: the cache's own check named (B, G, D, Dv), where an MLA layer's sizes are d_c and d_rope."""
    other = dataclasses.replace(make_mla(window=(3, 0)).config, kv_latent_dim=DC + 4)
    cache = make(other)
    with pytest.raises(ValueError, match=rf"holds \(heads, d_c, d_rope\) = \(1, {DC + 4}, {DR}\).*kv_latent_dim={DC}"):
        make_mla(window=(3, 0))(randn(2, 3, C), cache=cache[0])
    assert cache.lengths.tolist() == [0, 0]


def test_a_window_cache_refuses_a_config_that_is_not_one():
    with pytest.raises(TypeError, match="MultiHeadLatentAttentionConfig"):
        make_window_cache({"window": (3, 0)}, 1, 2)


@pytest.mark.parametrize("keywords, message", [
    (dict(window=3), r"window must be \(left, right\)"),
    (dict(softcap=0.0), "softcap must be a finite number > 0"),
    (dict(alibi="yes"), "alibi"),
])
def test_bad_variants_are_refused(keywords, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make_mla(**keywords)
