"""SlidingWindowCache: a KV cache that keeps only what a sliding window lets a query see.

Decoding through it equals the module's full forward (float64) whatever the
chunks (one token, chunks longer than the window, prompts of different
lengths); its memory stays fixed while a DynamicCache grows; a module whose
window reaches further back is refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch

from multihead import DynamicCache, KVCache, MultiHeadAttention, RotaryEmbedding, SlidingWindowCache, StaticCache
from multihead.models.llama import Llama, LlamaConfig
from conftest import max_err

LEFT = 3  # the module's window (3, 0): a query sees itself and the 3 tokens before it


def _module(**config) -> MultiHeadAttention:
    torch.manual_seed(0)
    config = dict(dict(window=(LEFT, 0)), **config)
    return MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, dtype=torch.float64, **config).eval()


def _decode(module, cache, x, chunks) -> torch.Tensor:
    """x (B, T, C) fed to the module in chunks of the given sizes, outputs concatenated (B, T, C)."""
    outputs, start = [], 0
    for size in chunks:
        outputs.append(module(x[:, start:start + size], cache=cache[0]).output)
        start += size
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("chunks", [[5] + [1] * 8, [2, 6, 1, 4], [1] * 13, [13]],
                         ids=["prompt-then-tokens", "chunks-longer-than-the-window", "token-by-token", "one-chunk"])
@pytest.mark.parametrize("config", [dict(), dict(softcap=2.0, alibi=True, sinks=True),
                                    dict(rope=RotaryEmbedding(8)), dict(window=(LEFT - 1, 0))],
                         ids=["window", "all-variants", "rope", "module-window-narrower"])
def test_decoding_through_the_window_cache_equals_the_full_forward(chunks, config):
    module = _module(**config)
    if module.sinks is not None:
        with torch.no_grad():
            module.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    cache = SlidingWindowCache(1, 2, (LEFT, 0), 2, 8, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(_decode(module, cache, x, chunks), module(x).output) < 1e-12
    assert cache.lengths.tolist() == [13, 13]


def test_prompts_of_different_lengths_then_steps():
    """Right-padded prompts of 6 and 2 real tokens, then one token at a time: each sequence as its own forward."""
    module = _module(alibi=True)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    lengths = [6, 2]
    cache = SlidingWindowCache(1, 2, (LEFT, 0), 2, 8, dtype=torch.float64)
    key_mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]  # (B, 6)
    with torch.no_grad():
        first = module(x[:, :6], cache=cache[0], key_mask=key_mask).output
        steps = [module(torch.stack([x[b, lengths[b] + t] for b in range(2)])[:, None], cache=cache[0]).output
                 for t in range(6)]
        for b, length in enumerate(lengths):
            full = module(x[b:b + 1, :length + 6]).output[0]  # (length + 6, C)
            assert max_err(first[b, :length], full[:length]) < 1e-12
            assert max_err(torch.cat([s[b] for s in steps]), full[length:]) < 1e-12


def test_memory_stays_fixed_while_a_dynamic_cache_grows():
    module = _module()
    window, dynamic = SlidingWindowCache(1, 1, (LEFT, 0), 2, 8, dtype=torch.float64), DynamicCache(1)
    sizes = []
    with torch.no_grad():
        for t in range(64):
            token = torch.randn(1, 1, 32, dtype=torch.float64)
            module(token, cache=window[0])
            module(token, cache=dynamic[0])
            sizes.append((window.nbytes, dynamic.nbytes))
    slots = LEFT + 2  # left + 1 kept, one scratch slot for padding
    assert {w for w, _ in sizes} == {slots * 2 * (8 + 8) * 8 + slots * 8}  # k, v in float64 and int64 positions
    assert sizes[-1][1] == 64 * 2 * (8 + 8) * 8  # the dynamic cache's capacity doubled to 64 tokens
    assert sizes[-1][1] > 7 * sizes[-1][0]


def test_a_step_reads_the_ring_in_place_and_a_chunk_reads_ring_and_chunk():
    cache = SlidingWindowCache(1, 1, (LEFT, 0), 1, 2)
    layer = cache[0]
    chunk = layer.update(torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2))
    assert chunk.k.shape[2] == LEFT + 1 + 6  # the (empty) ring and the 6 new keys
    step = layer.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    assert step.k.shape[2] == LEFT + 1
    assert step.k.data_ptr() == layer._k.data_ptr()  # a view of the storage, no copy
    # the step at position 6 sees positions 3..6, held in slots 3, 0, 1, 2 (position p in slot p mod 4)
    assert step.attn_mask.tolist() == [[[[True, True, True, True]]]]


@pytest.mark.parametrize("window, message", [
    (None, "window must be"), ((None, 0), "left an int"), ((-1, 0), "window's left"), (3, r"\(left, right\)"),
])
def test_a_cache_without_a_left_limit_is_refused(window, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindowCache(1, 2, window, 2, 8)


@pytest.mark.parametrize("module_window, advice", [
    (None, "give it a DynamicCache or a StaticCache"), ((LEFT + 1, 0), "make the cache with the module's window")])
def test_a_module_that_sees_further_back_is_refused_and_nothing_is_written(module_window, advice):
    module = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, window=module_window)
    cache = SlidingWindowCache(1, 2, (LEFT, 0), 2, 8)
    MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, window=(LEFT, 0))(torch.randn(2, 3, 32), cache=cache[0])
    before = (cache.lengths.clone(), cache[0]._k.clone(), cache[0]._positions.clone())
    with pytest.raises(ValueError, match=rf"keeps 3 positions back .* {advice}"):
        module(torch.randn(2, 3, 32), cache=cache[0])
    after = (cache.lengths, cache[0]._k, cache[0]._positions)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("refusing, message", [
    (lambda: SlidingWindowCache(1, 2, (LEFT, 0), 2, 8)[0], "keeps 3 positions back"),
    (lambda: StaticCache(1, 2, 4, 2, 8)[0], "StaticCache overflow"),
], ids=["window-cache-for-a-windowless-layer", "static-layer-too-short"])
def test_a_model_checks_every_layer_s_cache_before_the_first_writes(refusing, message):
    """Once failed: a model's call checked only the number of layers, so a KVCache whose second layer refused
    the chunk was refused after the first layer had written its keys."""
    model = Llama(LlamaConfig(vocab_size=50, max_positions=64, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, d_mlp=64)).eval()
    cache = KVCache([DynamicCache(1, batch_size=2)[0], refusing()])
    with pytest.raises(ValueError, match=message):
        model(torch.randint(0, 50, (2, 5)), cache=cache)
    assert [layer.lengths.tolist() for layer in cache] == [[0, 0], [0, 0]]


def _window(left: int):
    return SlidingWindowCache(1, 1, (left, 0), 1, 2)[0]


def _static(length: int):
    return StaticCache(1, 1, length, 1, 2)[0]


@pytest.mark.parametrize("layers", [
    lambda: [_window(LEFT), _static(8)], lambda: [_static(8), _static(9)], lambda: [_window(LEFT), _window(LEFT + 1)],
], ids=["two-kinds", "two-static-lengths", "two-windows"])
def test_one_layout_for_layers_that_place_chunks_differently_is_refused(layers):
    mixed = KVCache(layers())
    assert not mixed.uniform
    with pytest.raises(ValueError, match="mix kinds of cache"):
        mixed.layout(1)


def test_layers_of_one_kind_and_size_share_one_layout():
    alike = KVCache([_static(8), _static(8)])
    assert alike.uniform and alike.layout(1).kv_len == 8


def test_decoding_steps_compile_into_one_graph():
    """fullgraph=True (a graph break raises); every later one-token step reuses the first step's graph."""
    module = _module(alibi=True).float()
    cache = SlidingWindowCache(1, 2, (LEFT, 0), 2, 8)
    frames = []

    def counting(graph, example_inputs):
        frames.append(graph)
        return graph.forward

    compiled = torch.compile(module, backend=counting, fullgraph=True, dynamic=False)
    reference = SlidingWindowCache(1, 2, (LEFT, 0), 2, 8)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        module(x[:, :4], cache=cache[0])
        module(x[:, :4], cache=reference[0])
        for t in range(4, 10):
            assert max_err(compiled(x[:, t:t + 1], cache=cache[0]).output,
                           module(x[:, t:t + 1], cache=reference[0]).output) < 1e-6
    assert len(frames) == 1
