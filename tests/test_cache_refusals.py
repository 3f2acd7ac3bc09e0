"""A refused call changes no cache: the lengths and every stored key/value are as before, and a retry appends once.

For DynamicCache and StaticCache, under MultiHeadAttention and MultiHeadLatentAttention,
whether the call is refused by the argument checks or by the backend after the write
would have happened. Each test failed before its fix.
"""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead import MultiHeadAttention, MultiHeadLatentAttention
from multihead.nn.cache import DynamicCache, StaticCache


def _snapshot(layer):
    """Everything a layer cache holds: lengths and the stored keys/values (None before the first chunk)."""
    lengths = None if layer._lengths is None else layer._lengths.clone()
    k = None if layer._k is None else layer._k.clone()
    v = None if layer._v is None else layer._v.clone()
    return lengths, k, v


def _same(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


BAD_MASKS = {
    "wrong_shape": torch.ones(1, 1, 2, 99, dtype=torch.bool),
    "three_dims": torch.ones(2, 2, 5, dtype=torch.bool),
    "int_mask": torch.ones(2, 5, dtype=torch.int64),
}


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("bad", sorted(BAD_MASKS))
def test_a_refused_call_leaves_the_cache_as_it_was(kind, bad):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, causal=True).eval()
    cache = DynamicCache(1) if kind == "dynamic" else StaticCache(1, 2, 16, 2, 4)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        mha(x[:, :3], cache=cache[0])
        before = _snapshot(cache[0])
        with pytest.raises((TypeError, ValueError)):
            mha(x[:, 3:], cache=cache[0], attn_mask=BAD_MASKS[bad])
        assert _same(_snapshot(cache[0]), before)
        # the retry appends the chunk once: the outputs equal a run without the refused call
        retried = mha(x[:, 3:], cache=cache[0]).output
        fresh = DynamicCache(1) if kind == "dynamic" else StaticCache(1, 2, 16, 2, 4)
        mha(x[:, :3], cache=fresh[0])
        assert torch.equal(retried, mha(x[:, 3:], cache=fresh[0]).output)


def test_a_fresh_dynamic_cache_whose_first_update_is_refused_stays_fresh():
    mha = MultiHeadAttention(16, 4, causal=True).eval()
    cache = DynamicCache(1)
    with torch.no_grad(), pytest.raises(ValueError):
        mha(torch.randn(2, 5, 16), cache=cache[0], attn_mask=BAD_MASKS["wrong_shape"])
    layer = cache[0]
    assert layer._k is None and layer._lengths is None and layer.capacity == 0
    assert cache.batch_size is None
    with torch.no_grad():
        mha(torch.randn(3, 2, 16), cache=cache[0])  # another batch size is still welcome
    assert cache.batch_size == 3
    with pytest.raises(ValueError, match="chunk_lengths must lie in"):
        DynamicCache(1)[0].update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), torch.tensor([1, 9]))


def test_chunk_lengths_of_the_wrong_kind_say_so():
    cache = DynamicCache(1)
    with pytest.raises(TypeError, match=r"chunk_lengths must be a \(B,\) tensor or a list of ints"):
        cache[0].update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), ["a", "b"])
    assert cache[0]._k is None


def test_a_query_of_another_batch_size_than_the_cache_is_refused_and_changes_nothing():
    rotary = MultiHeadAttention(16, 2, causal=True, rope=mh.RotaryEmbedding(8))
    cache = DynamicCache(1)
    with torch.no_grad():
        rotary(torch.randn(2, 3, 16), cache=cache[0])
        with pytest.raises(ValueError, match="the cache holds 2 sequences, the query has B=3"):
            rotary(torch.randn(3, 1, 16), cache=cache[0])
    assert cache[0].lengths.tolist() == [3, 3]


def test_a_refused_latent_call_leaves_its_cache_as_it_was():
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(32, 4, head_dim=8, rope_dim=4, kv_latent_dim=12).eval()
    cache = DynamicCache(1)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        mla(x[:, :3], cache=cache[0])
        before = _snapshot(cache[0])
        with pytest.raises(TypeError):
            mla(x[:, 3:], cache=cache[0], need_weights="yes")
        with pytest.raises(ValueError):
            mla(x[:, 3:], cache=cache[0], positions=torch.tensor([[-1, 0], [0, 1]]))
        assert _same(_snapshot(cache[0]), before)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_call_the_backend_refuses_after_the_write_leaves_the_cache_as_it_was(kind):
    """cpu_flash takes no dropout: a training call is refused, and the cache it would have written is untouched."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, causal=True, dropout=0.5, backend="cpu_flash").eval()
    cache = DynamicCache(1) if kind == "dynamic" else StaticCache(1, 1, 8, 4, 4)
    with torch.no_grad():
        mha(torch.randn(1, 2, 16), cache=cache[0])
        before = _snapshot(cache[0])
        mha.train()
        with pytest.raises(ValueError, match="backend='cpu_flash' cannot run this call"):
            mha(torch.full((1, 1, 16), float("nan")), cache=cache[0])
    assert _same(_snapshot(cache[0]), before)  # lengths and every slot, the overwritten ones included


def test_a_latent_call_the_backend_refuses_leaves_its_cache_as_it_was():
    mla = MultiHeadLatentAttention(32, 4, head_dim=8, rope_dim=4, kv_latent_dim=12, backend="cpu_flash",
                                   absorb=True).eval()  # absorbed: D != Dv, which cpu_flash refuses
    cache = DynamicCache(1)
    with torch.no_grad(), pytest.raises(ValueError, match="needs D == Dv"):
        mla(torch.randn(2, 3, 32), cache=cache[0])
    assert cache[0]._k is None and cache[0]._lengths is None
