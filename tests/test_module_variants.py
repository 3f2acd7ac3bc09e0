"""MultiHeadAttention configured with the attention family: window, softcap, ALiBi and learned sinks.

The module's output equals its own projections through the one door with the
same variants (the reference backend, float64), and a cached decode (dynamic,
static and sliding-window caches, prompts of different lengths) equals the full
forward.
"""

from __future__ import annotations

import pytest
import torch

import multihead
from multihead import DynamicCache, MultiHeadAttention, SlidingWindowCache, StaticCache
from multihead.core.variants import alibi_slopes
from conftest import max_err

CONFIGS = {
    "window": dict(window=(3, 0)),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi=True),
    "sinks": dict(sinks=True),
    "all": dict(window=(4, 0), softcap=3.0, alibi=True, sinks=True),
}


def _module(config: dict, heads: int = 4) -> MultiHeadAttention:
    torch.manual_seed(0)
    module = MultiHeadAttention(32, heads, num_kv_heads=2, causal=True, dtype=torch.float64, **config).eval()
    if module.sinks is not None:
        with torch.no_grad():
            module.sinks.copy_(torch.linspace(-1.0, 2.0, heads))
    return module


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_module_computes_the_door_formula(name):
    module = _module(CONFIGS[name])
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q, k, v = module.project(x, x, x)
    want = module.merge(multihead.attention(
        q, k, v, causal=True, backend="reference", window=module.config.window, softcap=module.config.softcap,
        alibi_slopes=module.alibi_slopes, sinks=module.sinks))
    assert max_err(module(x).output, want) < 1e-12


def _cache(kind: str, module: MultiHeadAttention):
    if kind == "dynamic":
        return DynamicCache(1)
    if kind == "static":
        return StaticCache(1, 2, 16, 2, 8, dtype=torch.float64)
    return SlidingWindowCache(1, 2, module.config.window, 2, 8, dtype=torch.float64)  # keeps left + 1 tokens


CACHED = [(name, kind) for name in sorted(CONFIGS) for kind in ("dynamic", "static")] + [
    (name, "window") for name in sorted(CONFIGS) if CONFIGS[name].get("window")]


@pytest.mark.parametrize("name, kind", CACHED)
def test_a_cached_decode_equals_the_full_forward(name, kind):
    """Prompts of 6 and 4 real tokens in one batch, then one token at a time: every output as the full forward's."""
    module = _module(CONFIGS[name])
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    cache = _cache(kind, module)
    lengths = [6, 4]
    key_mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]  # (B, 6): right-padded prompts
    with torch.no_grad():
        first = module(x[:, :6], cache=cache[0], key_mask=key_mask).output
        steps = [module(torch.stack([x[b, lengths[b] + t] for b in range(2)])[:, None], cache=cache[0]).output
                 for t in range(4)]
    for b, length in enumerate(lengths):
        sequence = torch.cat([x[b, :length], torch.stack([x[b, length + t] for t in range(4)])])[None]
        full = module(sequence).output[0]  # (length + 4, C)
        assert max_err(first[b, :length], full[:length]) < 1e-12
        assert max_err(torch.cat([s[b] for s in steps]), full[length:]) < 1e-12


def test_sinks_are_learned_and_alibi_slopes_are_fixed():
    module = MultiHeadAttention(16, 4, causal=True, sinks=True, alibi=True)
    assert "sinks" in dict(module.named_parameters())
    assert "alibi_slopes" not in module.state_dict()  # computed from H, not stored
    assert torch.equal(module.alibi_slopes, alibi_slopes(4))
    x = torch.randn(2, 5, 16)
    module(x).output.square().sum().backward()
    assert module.sinks.grad is not None and module.sinks.grad.abs().sum() > 0


def test_weights_of_a_module_with_sinks_sum_to_less_than_one():
    module = _module(dict(sinks=True))
    weights = module(torch.randn(1, 7, 32, dtype=torch.float64), need_weights=True).weights
    assert (weights.sum(-1) < 1).all()
    assert (weights.sum(-1) > 0).all()


def test_the_configuration_is_shown():
    assert "window=(3, 0), softcap=2.0, alibi=True, sinks=True" in repr(
        MultiHeadAttention(16, 4, window=(3, 0), softcap=2.0, alibi=True, sinks=True))


@pytest.mark.parametrize("keywords, message", [
    (dict(window=3), r"window must be \(left, right\)"),
    (dict(softcap=-1.0), "softcap must be a finite number > 0"),
    (dict(alibi="yes"), "alibi"),
    (dict(sinks=1), "sinks"),
])
def test_bad_configuration_is_refused(keywords, message):
    with pytest.raises((TypeError, ValueError), match=message):
        MultiHeadAttention(16, 4, **keywords)


@pytest.mark.parametrize("name", ["window", "sinks"])  # a mask for sdpa, and the chunked kernel
def test_the_module_compiles_whole_and_once(name):
    """fullgraph=True (a graph break raises), and new input values reuse the graph."""
    module = MultiHeadAttention(32, 4, causal=True, **CONFIGS[name])
    frames = []

    def counting(graph, example_inputs):
        frames.append(graph)
        return graph.forward

    compiled = torch.compile(module, backend=counting, fullgraph=True)
    for seed in range(2):
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(seed))
        assert max_err(compiled(x).output, module(x).output) < 1e-6
    assert len(frames) == 1
