"""Defects found by trying the library as a new user and as a reliability engineer would.

One test (or a few) per defect; each failed before its fix. They use only the
public API that existed when the defect was found, so they can be run against
older versions too.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import multihead as mh
from multihead import MultiHeadAttention, MultiHeadLatentAttention
from multihead.nn.cache import DynamicCache, StaticCache
from conftest import make_qkv, max_err
from multihead.backends.reference import attention_ref

BACKENDS = ["reference", "chunked", "sdpa"]


# ---- a refused call changes no cache


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


# ---- scale


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


# ---- inputs whose last dim is not contiguous


def test_weights_on_demand_with_a_strided_last_dim():
    q = torch.randn(1, 2, 5, 16)[..., ::2]  # (1, 2, 5, 8) with stride 2 in the last dim
    k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out, weights = mh.attention(q, k, v, backend="cpu_flash"), mh.attention_weights(q, k, v)
    want = attention_ref(q.double(), k.double(), v.double())
    assert max_err(out, want.out) < 1e-5 and max_err(weights, want.probs) < 1e-5
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 5))


# ---- huge finite biases


def test_weights_with_a_huge_finite_bias_on_every_key_equal_the_softmax():
    """Hugging Face masks with finfo.min: a row whose every key carries it must still sum to 1."""
    q, k, v = make_qkv(1, 2, 2, 4, 5, 8, seed=2)
    mask = torch.zeros(1, 1, 4, 5)
    mask[..., 0, :] = torch.finfo(torch.float32).min  # row 0: every key carries the bias
    mask[..., 1, 2:] = torch.finfo(torch.float32).min  # row 1: some keys do
    weights = mh.attention_weights(q, k, v, attn_mask=mask)
    eager = torch.softmax((q @ k.transpose(-2, -1)) / 8 ** 0.5 + mask, dim=-1)  # as transformers computes them
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 4))
    assert max_err(weights, eager) < 1e-5
    stats = mh.attention_stats(q, k, v, attn_mask=mask, top_k=5)
    entropy = -(eager * eager.clamp_min(1e-30).log()).sum(-1)
    assert max_err(stats.entropy, entropy) < 1e-5
    assert max_err(stats.column_sums, eager.sum(2)) < 1e-5


# ---- a finite float mask in half precision


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


def test_sdpa_refuses_a_float_mask_of_another_dtype_and_says_why():
    q, k, v = make_qkv(1, 2, 2, 3, 4, 8, dtype=torch.float16)
    report = mh.which_backend(q, k, v, attn_mask=torch.zeros(3, 4))
    assert "cast the mask to q's dtype" in report.reasons["sdpa"] and report.chosen == "chunked"
    assert mh.which_backend(q, k, v, attn_mask=torch.zeros(3, 4, dtype=torch.float16)).chosen == "sdpa"


# ---- TorchScript and nested tensors


class _Outputs(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).output


@pytest.mark.parametrize("G", [4, 2])
def test_jit_trace_of_the_module(G):
    mha = MultiHeadAttention(16, 4, num_kv_heads=G, causal=True).eval()
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_Outputs(mha), (x,))
    other = torch.randn(2, 5, 16)
    assert max_err(traced(other), mha(other).output) < 1e-6


def test_jit_trace_of_compat_under_no_grad():
    from multihead.compat import MultiheadAttention

    m = MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, (x, x, x))
        other = torch.randn(2, 5, 16)
        assert max_err(traced(other, other, other)[0], m(other, other, other)[0]) < 1e-6


def test_jit_script_is_refused_in_one_line():
    from multihead.compat import MultiheadAttention

    with pytest.raises(TypeError, match="MultiHeadAttention does not support torch.jit.script; use torch.compile"):
        torch.jit.script(MultiHeadAttention(8, 2))
    with pytest.raises(TypeError, match="compat.MultiheadAttention does not support torch.jit.script"):
        torch.jit.script(torch.nn.Sequential(MultiheadAttention(8, 2)))


def test_nested_tensors_are_refused_in_one_line():
    from multihead.compat import MultiheadAttention

    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    with pytest.raises(TypeError, match="query is a nested tensor; .* pass key_padding_mask"):
        MultiheadAttention(8, 2, batch_first=True)(nested, nested, nested)
    with pytest.raises(TypeError, match="query is a nested tensor"):
        MultiHeadAttention(8, 2)(nested)


# ---- loose validation


@pytest.mark.parametrize("kwargs,name", [
    (dict(causal="false"), "causal"), (dict(bias="no"), "bias"), (dict(causal=1), "causal"),
])
def test_constructor_flags_must_be_bools(kwargs, name):
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        MultiHeadAttention(8, 2, **kwargs)


def test_latent_flags_must_be_bools():
    with pytest.raises(TypeError, match="bias must be a bool"):
        MultiHeadLatentAttention(16, 2, head_dim=4, rope_dim=2, kv_latent_dim=4, bias="no")


def test_need_weights_must_be_a_bool():
    with pytest.raises(TypeError, match="need_weights must be a bool, got str 'yes'"):
        MultiHeadAttention(8, 2)(torch.randn(1, 3, 8), need_weights="yes")


def test_negative_rope_positions_are_refused():
    mha = MultiHeadAttention(16, 2, causal=True, rope=mh.RotaryEmbedding(8))
    with pytest.raises(ValueError, match=r"positions must be >= 0 \(absolute token positions\), got min -2"):
        mha(torch.randn(1, 3, 16), positions=torch.tensor([-2, -1, 0]))


def test_chunk_lengths_of_the_wrong_kind_say_so():
    cache = DynamicCache(1)
    with pytest.raises(TypeError, match=r"chunk_lengths must be a \(B,\) tensor or a list of ints"):
        cache[0].update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), ["a", "b"])
    assert cache[0]._k is None


# ---- found by an adversarial pass over the new contract


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


def test_module_inputs_of_another_dtype_or_batch_say_so():
    mha = MultiHeadAttention(16, 4)
    with pytest.raises(TypeError, match=r"query has dtype torch.float64 but the module's parameters are torch.float32"):
        mha(torch.randn(2, 3, 16, dtype=torch.float64))
    mla = MultiHeadLatentAttention(32, 4, head_dim=8, rope_dim=4, kv_latent_dim=12)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        mla(torch.randn(2, 3, 32, dtype=torch.float64))
    rotary = MultiHeadAttention(16, 2, causal=True, rope=mh.RotaryEmbedding(8))
    cache = DynamicCache(1)
    with torch.no_grad():
        rotary(torch.randn(2, 3, 16), cache=cache[0])
        with pytest.raises(ValueError, match="the cache holds 2 sequences, the query has B=3"):
            rotary(torch.randn(3, 1, 16), cache=cache[0])
    assert cache[0].lengths.tolist() == [3, 3]


def test_rotate_checks_its_positions_against_x():
    rope = mh.RotaryEmbedding(4)
    x = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="positions has 1 columns, one per query T=5"):
        rope.rotate(x, torch.tensor([3]))
    with pytest.raises(ValueError, match="positions has 3 rows, B=1"):
        rope.rotate(x, torch.arange(5).expand(3, 5))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope.rotate(x, torch.arange(-1, 4))


def test_small_argument_holes():
    q, k, v = make_qkv(1, 2, 2, 3, 5, 4)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        mh.which_backend(q, k, v, return_lse="no")
    q0, k0, v0 = torch.zeros(1, 1, 2, 0), torch.zeros(1, 1, 3, 0), torch.randn(1, 1, 3, 2)  # D = 0: every score 0
    assert torch.allclose(attention_ref(q0, k0, v0).out, v0.mean(dim=2, keepdim=True).expand(1, 1, 2, 2))
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"):
        mh.attention(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn))


def test_a_second_backward_through_chunked_says_it_cannot():
    q, k, v = make_qkv(1, 2, 2, 4, 5, 8, requires_grad=True)
    out = mh.attention(q, k, v, backend="chunked")
    with pytest.raises(RuntimeError, match="the chunked backend has no second derivative"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
