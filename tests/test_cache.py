"""KV caches: cached decoding equals the full causal forward, per-sequence lengths, padding, limits, sizes."""

from __future__ import annotations

import time

import pytest
import torch

from multihead import MultiHeadAttention
from multihead.nn.cache import CachedKV, DynamicCache, StaticCache, kv_bytes_per_token
from conftest import max_err

C, H, D = 24, 4, 6  # model width, query heads, head dim (C / H)
TIGHT = 1e-12  # float64: a cached decode does the same sums as the full forward, in other groupings


def make_mha(G: int, seed: int = 0, **kwargs) -> MultiHeadAttention:
    torch.manual_seed(seed)
    return MultiHeadAttention(C, H, num_kv_heads=G, causal=True, **kwargs).double().eval()


def make_cache(kind: str, B: int, max_length: int, G: int, num_layers: int = 1):
    if kind == "dynamic":
        return DynamicCache(num_layers, initial_capacity=1)  # grows many times on the way
    return StaticCache(num_layers, B, max_length, G, D, dtype=torch.float64)


def decode_in_chunks(mha, layer_cache, x, chunk: int):
    with torch.no_grad():
        outs = [mha(x[:, s:s + chunk], cache=layer_cache).output for s in range(0, x.shape[1], chunk)]
    return torch.cat(outs, dim=1)  # chunks of (B, chunk, C) -> (B, T, C)


def run_schedule(mha, layer_cache, streams, schedule, *, pad_extra=0, garbage_seed=0):
    """Feed each sequence its own token stream, counts[b] real tokens per step, right-padded with garbage.

    streams: per sequence (L_b, C); schedule: per step, the real tokens of each
    sequence. A step's chunk is (B, max(counts) + pad_extra, C). Returns the
    outputs at every sequence's real tokens, (L_b, C) each.
    """
    B = len(streams)
    taken = [0] * B
    outs = [[] for _ in range(B)]
    gen = torch.Generator().manual_seed(garbage_seed)
    for counts in schedule:
        T = max(counts) + pad_extra
        x = 100 * torch.randn(B, T, C, generator=gen, dtype=torch.float64)  # garbage wherever no token goes
        key_mask = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(counts):
            x[b, :n] = streams[b][taken[b]:taken[b] + n]
            key_mask[b, :n] = True
        with torch.no_grad():
            out = mha(x, cache=layer_cache, key_mask=key_mask).output  # (B, T, C)
        assert torch.isfinite(out).all(), "padded query rows must not produce NaN or inf"
        for b, n in enumerate(counts):
            outs[b].append(out[b, :n])
            taken[b] += n
    assert taken == [s.shape[0] for s in streams]
    return [torch.cat(o) for o in outs]


# Prompts of lengths 5, 9, 2, then chunks where sequences bring different counts (some none).
SCHEDULE = [(5, 9, 2), (3, 0, 1), (1, 1, 1), (2, 7, 0), (1, 1, 1), (0, 2, 3)]


def streams_for(schedule, seed=1):
    gen = torch.Generator().manual_seed(seed)
    totals = [sum(step[b] for step in schedule) for b in range(len(schedule[0]))]
    return [torch.randn(L, C, generator=gen, dtype=torch.float64) for L in totals]


# every (G, chunk) pair once; each cache kind meets every G and every chunk size
ATTENTION = {4: "MHA", 2: "GQA", 1: "MQA"}


@pytest.mark.parametrize("kind, G, chunk", [
    pytest.param(kind, G, chunk, id=f"{kind}-{ATTENTION[G]}-{chunk}") for kind, G, chunk in (
        ("dynamic", 4, 1), ("static", 4, 3), ("dynamic", 4, 7),
        ("static", 2, 1), ("dynamic", 2, 3), ("static", 2, 7),
        ("dynamic", 1, 1), ("static", 1, 3), ("static", 1, 7))])
def test_cached_decoding_equals_the_full_causal_forward(kind, G, chunk):
    mha = make_mha(G)
    x = torch.randn(2, 17, C, dtype=torch.float64, generator=torch.Generator().manual_seed(G + chunk))
    with torch.no_grad():
        full = mha(x).output  # (B, T, C), causal
    cache = make_cache(kind, 2, 17, G)
    cached = decode_in_chunks(mha, cache[0], x, chunk)
    assert max_err(cached, full) < TIGHT
    assert cache.lengths.tolist() == [17, 17]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("G", [2, 1], ids=["GQA", "MQA"])
def test_sequences_of_different_lengths_equal_each_decoded_alone(kind, G):
    mha = make_mha(G)
    streams = streams_for(SCHEDULE)
    cache = make_cache(kind, 3, 40, G)
    outs = run_schedule(mha, cache[0], streams, SCHEDULE)
    assert cache.lengths.tolist() == [s.shape[0] for s in streams]
    for b, stream in enumerate(streams):
        with torch.no_grad():
            alone = mha(stream[None]).output[0]  # (L_b, C): the full causal forward of this sequence only
        assert max_err(outs[b], alone) < TIGHT, f"sequence {b}"


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_real_outputs_do_not_move_when_padding_changes(kind):
    mha = make_mha(2)
    streams = streams_for(SCHEDULE)
    first = run_schedule(mha, make_cache(kind, 3, 40, 2)[0], streams, SCHEDULE, pad_extra=0, garbage_seed=1)
    more = run_schedule(mha, make_cache(kind, 3, 40, 2)[0], streams, SCHEDULE, pad_extra=5, garbage_seed=2)
    for b in range(3):
        assert max_err(first[b], more[b]) < TIGHT, f"sequence {b}"


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_padded_query_rows_are_finite_even_with_nothing_to_see(kind):
    mha = make_mha(2)
    cache = make_cache(kind, 2, 8, 2)
    x = torch.randn(2, 3, C, dtype=torch.float64)
    key_mask = torch.tensor([[True, True, False], [False, False, False]])  # sequence 1 has no token yet
    with torch.no_grad():
        out = mha(x, cache=cache[0], key_mask=key_mask).output
    assert torch.isfinite(out).all()
    # a query with no key attends to nothing: its heads give 0, and only W^O's bias is left
    assert max_err(out[1], mha.out_proj.bias.detach().expand(3, C)) < TIGHT
    assert cache.lengths.tolist() == [2, 0]


def test_update_returns_every_cached_key_and_the_mask_of_the_docstring():
    layer = DynamicCache(1)[0]
    k0 = torch.arange(2 * 1 * 3 * 2, dtype=torch.float64).view(2, 1, 3, 2)  # (B, G, T, D)
    layer.update(k0, -k0, chunk_lengths=torch.tensor([3, 1]))
    k1 = 100 + torch.arange(2 * 1 * 2 * 2, dtype=torch.float64).view(2, 1, 2, 2)
    result = layer.update(k1, -k1, chunk_lengths=torch.tensor([2, 1]))
    assert isinstance(result, CachedKV)
    assert layer.lengths.tolist() == [5, 2]
    assert result.k.shape == (2, 1, 5, 2) and result.attn_mask.shape == (2, 1, 2, 5)
    # sequence 0: its 3 prompt keys, then both new ones; sequence 1: its 1 real prompt key, then 1 new one
    assert torch.equal(result.k[0, 0], torch.cat([k0[0, 0], k1[0, 0]]))
    assert torch.equal(result.k[1, 0, :2], torch.stack([k0[1, 0, 0], k1[1, 0, 0]]))
    assert torch.equal(result.v, -result.k)
    expected = torch.tensor([
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],  # b = 0: positions 3 and 4
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]],  # b = 1: position 1, then a padded query that sees the real keys
    ], dtype=torch.bool)
    assert torch.equal(result.attn_mask[:, 0], expected)


def test_layers_keep_their_own_lengths_and_positions_come_from_layer_zero():
    torch.manual_seed(3)
    layers = [make_mha(2, seed=s) for s in range(2)]
    cache = DynamicCache(2, batch_size=2)
    assert cache.lengths.tolist() == [0, 0] and cache.batch_size == 2

    def forward(x, key_mask=None):
        for i, layer in enumerate(layers):
            x = x + layer(x, cache=cache[i], key_mask=key_mask).output
            if i == 0:  # mid-forward: layer 0 has advanced, layer 1 not yet
                assert cache.lengths.tolist() != cache[1].lengths.tolist()
        return x

    x = torch.randn(2, 4, C, dtype=torch.float64)
    with torch.no_grad():
        full = forward(x.clone(), key_mask=torch.tensor([[True] * 4, [True, True, False, False]]))
    assert [c.lengths.tolist() for c in cache] == [[4, 2], [4, 2]]
    before = cache.lengths
    assert cache.positions(3).tolist() == [[4, 5, 6], [2, 3, 4]]
    with torch.no_grad():
        forward(torch.randn(2, 3, C, dtype=torch.float64))
    assert before.tolist() == [4, 2], "a lengths tensor read before a step must not change under the caller"
    assert cache.lengths.tolist() == [7, 5]
    assert torch.isfinite(full).all()


def test_dynamic_growth_doubles_and_does_not_change_results():
    mha = make_mha(2)
    x = torch.randn(2, 100, C, dtype=torch.float64)
    small, large = DynamicCache(1, initial_capacity=1), DynamicCache(1, initial_capacity=128)
    capacities = []
    outs_small, outs_large = [], []
    with torch.no_grad():
        for t in range(100):
            outs_small.append(mha(x[:, t:t + 1], cache=small[0]).output)
            outs_large.append(mha(x[:, t:t + 1], cache=large[0]).output)
            capacities.append(small[0].capacity)
    assert sorted(set(capacities)) == [1, 2, 4, 8, 16, 32, 64, 128], "capacity must double, not grow per step"
    assert large[0].capacity == 128
    assert max_err(torch.cat(outs_small, 1), torch.cat(outs_large, 1)) < TIGHT
    with torch.no_grad():
        full = mha(x).output
    assert max_err(torch.cat(outs_small, 1), full) < TIGHT


def test_static_cache_overflow_raises_naming_the_sizes():
    cache = StaticCache(1, 2, 5, 2, D, dtype=torch.float64)
    layer = cache[0]
    k = torch.randn(2, 2, 4, D, dtype=torch.float64)
    layer.update(k, k, chunk_lengths=torch.tensor([4, 3]))
    with pytest.raises(ValueError, match=r"sequence 0 holds 4 tokens and the chunk adds 2 real ones \(T=2\), "
                                         r"6 > max_length=5"):
        layer.update(k[:, :, :2], k[:, :, :2])
    assert layer.lengths.tolist() == [4, 3], "a refused chunk must leave the cache as it was"


def test_static_cache_padding_takes_no_room():
    # capacity 5: sequence 0 reaches exactly 5 real tokens while its chunk carries 2 padded ones past the end
    mha = make_mha(2)
    schedule = [(4, 1), (1, 3)]
    streams = streams_for(schedule, seed=4)
    cache = StaticCache(1, 2, 5, 2, D, dtype=torch.float64)
    outs = run_schedule(mha, cache[0], streams, schedule)
    assert cache.lengths.tolist() == [5, 4]
    for b, stream in enumerate(streams):
        with torch.no_grad():
            assert max_err(outs[b], mha(stream[None]).output[0]) < TIGHT


def test_static_cache_attends_over_its_whole_capacity_with_a_mask():
    layer = StaticCache(1, 1, 9, 1, D)[0]
    result = layer.update(torch.randn(1, 1, 2, D), torch.randn(1, 1, 2, D))
    assert result.k.shape == (1, 1, 9, D) and result.attn_mask.shape == (1, 1, 2, 9)
    assert result.attn_mask[0, 0].sum(dim=-1).tolist() == [1, 2]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_reset_starts_over(kind):
    mha = make_mha(1)
    x = torch.randn(2, 6, C, dtype=torch.float64)
    cache = make_cache(kind, 2, 6, 1)
    first = decode_in_chunks(mha, cache[0], x, 2)
    cache.reset()
    assert kind == "dynamic" or cache.lengths.tolist() == [0, 0]
    again = decode_in_chunks(mha, cache[0], x, 3)
    assert max_err(first, again) < TIGHT
    assert cache.lengths.tolist() == [6, 6]


def test_bytes_per_token():
    f32, bf16 = torch.float32, torch.bfloat16
    L = 3
    assert kv_bytes_per_token(L, 4, 8) == 2 * 4 * 8 * L * 4  # MHA: 2·H·D·L·size = 768
    assert kv_bytes_per_token(L, 2, 8) == 2 * 2 * 8 * L * 4  # GQA: 2·G·D·L·size
    assert kv_bytes_per_token(L, 1, 8) == 2 * 1 * 8 * L * 4  # MQA
    assert kv_bytes_per_token(1, 2, 8, 5, dtype=bf16) == 2 * (8 + 5) * 2  # Dv != D: G·(D + Dv)·size
    assert StaticCache(L, 2, 16, 4, 8).bytes_per_token() == 768
    assert StaticCache(1, 2, 16, 2, 8, 5, dtype=bf16).bytes_per_token() == 52
    dynamic = DynamicCache(L)
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        dynamic.bytes_per_token()
    for layer in dynamic:
        layer.update(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))
    assert dynamic.bytes_per_token() == 768 == kv_bytes_per_token(L, 4, 8, dtype=f32)
    with pytest.raises(ValueError, match="num_kv_heads must be positive"):
        kv_bytes_per_token(1, 0, 8)


def test_update_refuses_chunks_that_do_not_fit():
    static = StaticCache(1, 2, 8, 2, D)[0]
    with pytest.raises(ValueError, match=r"holds \(B, G, D, Dv\) = \(2, 2, 6, 6\), the chunk brings \(2, 4, 6, 6\)"):
        static.update(torch.randn(2, 4, 1, D), torch.randn(2, 4, 1, D))
    with pytest.raises(TypeError, match="holds torch.float32"):
        static.update(torch.randn(2, 2, 1, D, dtype=torch.float64), torch.randn(2, 2, 1, D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"chunk_lengths must lie in \[0, T=3\].*\[4, 1\]"):
        static.update(torch.randn(2, 2, 3, D), torch.randn(2, 2, 3, D), chunk_lengths=torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"chunk_lengths must be \(B,\) = \(2,\)"):
        static.update(torch.randn(2, 2, 3, D), torch.randn(2, 2, 3, D), chunk_lengths=torch.tensor([1]))
    with pytest.raises(TypeError, match="chunk_lengths must hold integers"):
        static.update(torch.randn(2, 2, 3, D), torch.randn(2, 2, 3, D), chunk_lengths=torch.tensor([1.0, 2.0]))
    dynamic = DynamicCache(1)[0]
    with pytest.raises(ValueError, match="does not know the batch size"):
        dynamic.lengths
    dynamic.update(torch.randn(2, 2, 1, D), torch.randn(2, 2, 1, D))
    with pytest.raises(ValueError, match=r"holds \(B, G, D, Dv\) = \(2, 2, 6, 6\), the chunk brings \(3, 2, 6, 6\)"):
        dynamic.update(torch.randn(3, 2, 1, D), torch.randn(3, 2, 1, D))
    with pytest.raises(ValueError, match="batch_size=2"):
        DynamicCache(1, batch_size=2)[0].update(torch.randn(3, 2, 1, D), torch.randn(3, 2, 1, D))


def test_module_refuses_what_makes_no_sense_with_a_cache():
    mha = make_mha(2)
    cache = DynamicCache(1)
    x = torch.randn(2, 3, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="self-attention"):
        mha(x, torch.randn(2, 5, C, dtype=torch.float64), cache=cache[0])
    with pytest.raises(ValueError, match=r"causal module \(MultiHeadAttention\(..., causal=True\)\)"):
        MultiHeadAttention(C, H).double()(x, cache=cache[0])
    with pytest.raises(TypeError, match=r"pass one layer's cache, cache\[i\]"):
        mha(x, cache=cache)
    with pytest.raises(ValueError, match="must pad on the right"):
        mha(x, cache=cache[0], key_mask=torch.tensor([[False, True, True], [True, True, True]]))
    with pytest.raises(ValueError, match=r"key_mask must be \(B, T\) = \(2, 3\), got \(2, 4\)"):
        mha(x, cache=cache[0], key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions= is only used by rope"):
        mha(x, positions=torch.arange(3))
    assert cache[0].capacity == 0, "a refused call must not write to the cache"


def test_attn_mask_with_a_cache_is_over_the_cached_keys():
    # an extra mask hiding cached key 0 from the second chunk equals the full forward with that mask
    mha = make_mha(2)
    x = torch.randn(1, 5, C, dtype=torch.float64)
    hide = torch.ones(5, 5, dtype=torch.bool)
    hide[3:, 0] = False
    with torch.no_grad():
        full = mha(x, attn_mask=hide).output
        cache = StaticCache(1, 1, 5, 2, D, dtype=torch.float64)
        head = mha(x[:, :3], cache=cache[0], attn_mask=hide[:3]).output
        tail = mha(x[:, 3:], cache=cache[0], attn_mask=hide[3:]).output
    assert max_err(torch.cat([head, tail], 1), full) < TIGHT


def test_weights_with_a_cache_are_over_the_cached_keys():
    mha = make_mha(2)
    x = torch.randn(2, 4, C, dtype=torch.float64)
    with torch.no_grad():
        full = mha(x, need_weights=True)
        cache = DynamicCache(1)
        mha(x[:, :3], cache=cache[0])
        last = mha(x[:, 3:], cache=cache[0], need_weights=True)
    assert last.weights.shape == (2, H, 1, 4)
    assert max_err(last.weights, full.weights[:, :, 3:]) < TIGHT
    assert max_err(last.output, full.output[:, 3:]) < TIGHT


COMPILE_BUDGET_S = 60.0  # on a 2-core CPU a first compile takes tens of seconds; beyond this, skip


def test_static_cache_decodes_under_torch_compile_without_recompiling():
    torch._dynamo.reset()
    mha = make_mha(2)
    x = torch.randn(2, 6, C, dtype=torch.float64)
    with torch.no_grad():
        full = mha(x).output
    cache = StaticCache(1, 2, 8, 2, D, dtype=torch.float64)

    def step(chunk):
        return mha(chunk, cache=cache[0]).output

    compiled = torch.compile(step, backend="aot_eager", dynamic=False)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            outs = [compiled(x[:, :3])]  # the prompt, then one token at a time
            if time.perf_counter() - start > COMPILE_BUDGET_S:
                pytest.skip(f"torch.compile took over {COMPILE_BUDGET_S:.0f} s on this CPU")
            outs.append(compiled(x[:, 3:4]))  # T = 1: the one expected recompile (a new chunk shape)
            with torch._dynamo.config.patch(error_on_recompile=True):
                outs += [compiled(x[:, t:t + 1]) for t in range(4, 6)]  # same shapes: no recompile
    finally:
        torch._dynamo.reset()
    assert max_err(torch.cat(outs, 1), full) < TIGHT
    assert cache.lengths.tolist() == [6, 6]
