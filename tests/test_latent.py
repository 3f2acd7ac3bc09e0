"""Multi-head latent attention: the reference expanded to plain MHA, absorbed == plain, cached decoding, sizes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multihead import MultiHeadAttentionOutput
from multihead.backends.reference import attention_ref
from multihead.nn.cache import DynamicCache, DynamicLayerCache, StaticCache, kv_bytes_per_token
from multihead.nn.latent import (
    MultiHeadLatentAttention,
    cache_comparison,
    cache_comparison_table,
    cache_elements_per_token,
    make_latent_config,
    make_static_cache,
)
from conftest import max_err

# Odd, unequal sizes so that a swapped dim or a wrong split cannot pass by accident.
C, H, D, DR, DV, DC, DQ = 24, 3, 5, 4, 6, 7, 9  # model width, heads, nope dim, rope dim, v dim, d_c, d_c'
TIGHT = 1e-12  # float64: every path does the same sums in other groupings
DOC = Path(__file__).resolve().parents[1] / "docs" / "latent.md"


def make_mla(seed: int = 0, *, q_latent_dim=DQ, latent_norm=True, bias=False, **kwargs) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(C, H, head_dim=D, rope_dim=DR, kv_latent_dim=DC, v_head_dim=DV,
                                 q_latent_dim=q_latent_dim, latent_norm=latent_norm, bias=bias,
                                 rope_base=50.0, **kwargs).double().eval()
    with torch.no_grad():  # norms away from their identity init, so skipping one would show
        for norm in (m.kv_norm, m.q_norm):
            if norm is not None:
                norm.weight.copy_(1 + torch.rand(norm.weight.shape, dtype=torch.float64))
    return m


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- an independent expansion of MLA into plain multi-head attention --------------------

def rms(x, norm, eps):
    if norm is None:
        return x
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def rotate(x, positions, base):
    """Half-split RoPE as complex multiplication: pair (x_i, x_{i+d/2}) times e^{j·m·base^(-2i/d)}."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angle = positions.to(torch.float64)[..., None] * theta  # (T, d/2)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def expand_to_mha(m: MultiHeadLatentAttention, x, positions=None):
    """Per-head q = [q^C; q^R], k = [k^C; k^R repeated to every head], v, from the module's weights."""
    cfg = m.config
    B, T, _ = x.shape
    pos = torch.arange(T) if positions is None else positions
    lin = lambda layer, inp: F.linear(inp, layer.weight, layer.bias)  # noqa: E731
    c_kv = rms(lin(m.kv_down, x), m.kv_norm, cfg.norm_eps)  # (B, T, d_c)
    k_nope = lin(m.k_up, c_kv).view(B, T, H, D)
    v = lin(m.v_up, c_kv).view(B, T, H, DV)
    k_rot = rotate(lin(m.k_rope, x), pos, cfg.rope_base)  # (B, T, DR): one for all heads
    if cfg.q_latent_dim is None:
        q_nope, q_rot = lin(m.q_proj, x), lin(m.q_rope, x)
    else:
        c_q = rms(lin(m.q_down, x), m.q_norm, cfg.norm_eps)
        q_nope, q_rot = lin(m.q_up, c_q), lin(m.q_rope, c_q)
    q_rot = rotate(q_rot.view(B, T, H, DR).transpose(1, 2), pos, cfg.rope_base)  # (B, H, T, DR)
    q = torch.cat((q_nope.view(B, T, H, D).transpose(1, 2), q_rot), -1)
    k = torch.cat((k_nope.transpose(1, 2), k_rot[:, None].expand(B, H, T, DR)), -1)
    return q, k, v.transpose(1, 2)


def reference_forward(m, x, key_mask=None, positions=None):
    q, k, v = expand_to_mha(m, x, positions)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    ref = attention_ref(q, k, v, attn_mask=attn_mask, causal=True, scale=1 / math.sqrt(D + DR))
    B, T, _ = x.shape
    out = ref.out.transpose(1, 2).reshape(B, T, H * DV)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias), ref.probs


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_latent_dim", [None, DQ])
@pytest.mark.parametrize("latent_norm,bias", [(True, False), (False, True)])
def test_matches_reference_expanded_to_mha(absorb, q_latent_dim, latent_norm, bias):
    m = make_mla(q_latent_dim=q_latent_dim, latent_norm=latent_norm, bias=bias)
    x = randn(2, 13, C)
    got = m(x, absorb=absorb)
    assert isinstance(got, MultiHeadAttentionOutput) and got.weights is None
    want, _ = reference_forward(m, x)
    assert got.output.shape == (2, 13, C)
    assert max_err(got.output, want) < TIGHT


def test_query_compression_switches_the_projections():
    plain_q = make_mla(q_latent_dim=None)
    assert plain_q.q_proj is not None and plain_q.q_down is None and plain_q.q_norm is None
    assert plain_q.q_rope.in_features == C
    compressed = make_mla(q_latent_dim=DQ)
    assert compressed.q_proj is None and compressed.q_down.out_features == DQ
    assert compressed.q_up.in_features == DQ and compressed.q_rope.in_features == DQ
    assert isinstance(compressed.q_norm, torch.nn.RMSNorm)
    # the query path really goes through c_Q: changing W_DQ changes the output
    x = randn(1, 6, C)
    before = compressed(x).output
    with torch.no_grad():
        compressed.q_down.weight.mul_(1.5).add_(0.1)
    assert max_err(compressed(x).output, before) > 1e-3


@pytest.mark.parametrize("absorb", [False, True])
def test_weights_and_key_mask_match_reference(absorb):
    m = make_mla()
    x = randn(2, 9, C)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, 6:] = False
    key_mask[1, 2] = False  # any pattern without a cache
    got = m(x, key_mask=key_mask, need_weights=True, absorb=absorb)
    want, probs = reference_forward(m, x, key_mask=key_mask)
    assert got.weights.shape == (2, H, 9, 9)
    assert max_err(got.output, want) < TIGHT
    assert max_err(got.weights, probs) < TIGHT
    assert got.weights[1, :, 3:, 2].abs().max() == 0  # the masked key gets weight 0


def test_absorbed_gradients_equal_plain():
    m = make_mla(bias=True)
    x = randn(2, 8, C)
    grads = []
    for absorb in (False, True):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        (m(xi, absorb=absorb).output * randn(2, 8, C, seed=5)).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert a.abs().max() > 0  # every parameter takes part
        assert max_err(a, b) < 1e-10


def test_absorbed_path_attends_the_latent_as_one_shared_head(monkeypatch):
    # What reaches the attention call: absorbed = one key/value "head" (G = 1) over [c_KV; k^R] and
    # c_KV; plain = H heads of width D + d_rope and Dv. The module's `absorb` picks when forward's is None.
    import multihead.nn.latent as latent_module
    seen = []
    real = latent_module.run
    monkeypatch.setattr(latent_module, "run", lambda call, *a, **kw: seen.append(
        (tuple(call.q.shape), tuple(call.k.shape), tuple(call.v.shape), call.scale)) or real(call, *a, **kw))
    x = randn(2, 5, C)
    m = make_mla(absorb=True)
    m(x)
    m(x, absorb=False)
    m.absorb = False
    m(x)
    scale = 1 / math.sqrt(D + DR)
    assert seen == [((2, H, 5, DC + DR), (2, 1, 5, DC + DR), (2, 1, 5, DC), scale),
                    ((2, H, 5, D + DR), (2, H, 5, D + DR), (2, H, 5, DV), scale),
                    ((2, H, 5, D + DR), (2, H, 5, D + DR), (2, H, 5, DV), scale)]


def test_rope_sees_relative_positions_only():
    # Shifting every position by a constant leaves all scores, hence the output, unchanged;
    # RoPE applied to only one side, or with different angles on q^R and k^R, would break this.
    m = make_mla()
    x = randn(1, 7, C)
    base = m(x).output
    shifted = m(x, positions=torch.arange(7) + 11).output
    assert max_err(base, shifted) < 1e-10
    # ... and positions matter at all: a permuted position order does change it
    assert max_err(base, m(x, positions=torch.tensor([0, 3, 1, 2, 6, 5, 4])).output) > 1e-4


# -- the cache -----------------------------------------------------------------------

def make_cache(kind, m, B, max_length):
    if kind == "dynamic":
        return DynamicCache(1, initial_capacity=1)  # grows many times on the way
    return make_static_cache(m.config, 1, B, max_length, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_cached_decode_equals_full_forward_on_both_paths(kind, chunk):
    m = make_mla()
    x = randn(2, 17, C)
    with torch.no_grad():
        full = m(x, absorb=False).output
        outs = {}
        for absorb in (False, True):
            cache = make_cache(kind, m, 2, 20)
            steps = [m(x[:, s:s + chunk], cache=cache[0], absorb=absorb).output for s in range(0, 17, chunk)]
            outs[absorb] = torch.cat(steps, dim=1)
            assert cache.lengths.tolist() == [17, 17]
    assert max_err(outs[False], full) < TIGHT
    assert max_err(outs[True], full) < TIGHT
    assert max_err(outs[True], outs[False]) < TIGHT


class RecordingCache(DynamicLayerCache):
    def __init__(self):
        super().__init__()
        self.seen = []

    def update(self, k, v, chunk_lengths=None, *, layout=None):  # the one write
        self.seen.append((k.clone(), v.clone()))
        return super().update(k, v, chunk_lengths, layout=layout)


def test_cache_holds_only_the_latent_and_the_rotary_key():
    m = make_mla()
    x = randn(2, 5, C)
    cache = RecordingCache()
    with torch.no_grad():
        m(x[:, :3], cache=cache)
        m(x[:, 3:], cache=cache)
    (k0, v0), (k1, v1) = cache.seen
    assert k0.shape == (2, 1, 3, DC) and v0.shape == (2, 1, 3, DR)
    assert k1.shape == (2, 1, 2, DC) and v1.shape == (2, 1, 2, DR)
    # "k" is c_KV after its RMSNorm; "v" is W_KR h rotated to the token's absolute position
    c_kv = rms(F.linear(x, m.kv_down.weight), m.kv_norm, m.config.norm_eps)
    k_rot = rotate(F.linear(x, m.k_rope.weight), torch.arange(5), m.config.rope_base)
    assert max_err(torch.cat((k0, k1), 2)[:, 0], c_kv) < TIGHT
    assert max_err(torch.cat((v0, v1), 2)[:, 0], k_rot) < TIGHT
    assert cache.bytes_per_token() == m.bytes_per_token() == (DC + DR) * 8


def run_schedule(m, layer_cache, streams, schedule, absorb, garbage_seed):
    """Feed each sequence counts[b] real tokens per step, right-padded with garbage; outputs at real tokens."""
    B = len(streams)
    taken = [0] * B
    outs = [[] for _ in range(B)]
    gen = torch.Generator().manual_seed(garbage_seed)
    for counts in schedule:
        T = max(counts) + 1
        x = 100 * torch.randn(B, T, C, generator=gen, dtype=torch.float64)
        key_mask = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(counts):
            x[b, :n] = streams[b][taken[b]:taken[b] + n]
            key_mask[b, :n] = True
        with torch.no_grad():
            out = m(x, cache=layer_cache, key_mask=key_mask, absorb=absorb).output
        assert torch.isfinite(out).all()
        for b, n in enumerate(counts):
            outs[b].append(out[b, :n])
            taken[b] += n
    assert taken == [s.shape[0] for s in streams]
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("absorb", [False, True])
def test_batch_of_different_lengths_with_cache(kind, absorb):
    m = make_mla()
    lengths = (5, 9, 2)
    streams = [randn(n, C, seed=10 + i) for i, n in enumerate(lengths)]
    # a prompt of its own length each, then one token at a time (a finished one adds nothing)
    schedule = [(3, 6, 1), (1, 1, 1), (1, 1, 0), (0, 1, 0)]
    alone = [m(s[None]).output[0] for s in streams]  # each sequence by itself, no padding, no cache
    results = []
    for garbage_seed in (0, 1):
        cache = make_cache(kind, m, 3, 10)
        got = run_schedule(m, cache[0], streams, schedule, absorb, garbage_seed)
        assert cache.lengths.tolist() == list(lengths)
        for b in range(3):
            assert max_err(got[b], alone[b]) < TIGHT, f"sequence {b}"
        results.append(got)
    for a, b in zip(*results):  # the padding changed, the real tokens' outputs did not move at all
        assert torch.equal(a, b) or max_err(a, b) < TIGHT


@pytest.mark.parametrize("absorb", [False, True])
def test_right_padding_without_cache(absorb):
    m = make_mla()
    lengths = (4, 8)
    streams = [randn(n, C, seed=20 + i) for i, n in enumerate(lengths)]
    alone = [m(s[None]).output[0] for s in streams]
    key_mask = torch.arange(8)[None] < torch.tensor(lengths)[:, None]  # (B, T)
    for garbage_seed in (0, 1):
        x = 50 * randn(2, 8, C, seed=100 + garbage_seed)
        for b, s in enumerate(streams):
            x[b, :len(s)] = s
        out = m(x, key_mask=key_mask, absorb=absorb).output
        for b, n in enumerate(lengths):
            assert max_err(out[b, :n], alone[b]) < TIGHT


def test_static_cache_overflow_and_wrong_widths():
    m = make_mla()
    cache = make_static_cache(m.config, 1, 1, 4, dtype=torch.float64)
    with torch.no_grad():
        m(randn(1, 3, C), cache=cache[0])
        with pytest.raises(ValueError, match="overflow"):
            m(randn(1, 2, C), cache=cache[0])
    wrong = StaticCache(1, 1, 4, 1, DC + 1, DR, dtype=torch.float64)  # not this config's d_c
    with pytest.raises(ValueError, match="holds"):
        m(randn(1, 2, C), cache=wrong[0])


# -- sizes ---------------------------------------------------------------------------

def test_bytes_per_token():
    m = make_mla()
    assert m.cache_elements_per_token() == DC + DR == 11
    assert m.bytes_per_token() == 11 * 8  # float64 parameters
    assert m.bytes_per_token(torch.bfloat16) == 11 * 2
    assert m.float().bytes_per_token() == 11 * 4
    assert m.bytes_per_token(torch.float16) == kv_bytes_per_token(1, 1, DC, DR, torch.float16)
    static = make_static_cache(m.config, 3, 2, 8, dtype=torch.bfloat16)
    assert static.bytes_per_token() == 3 * m.bytes_per_token(torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        m.bytes_per_token("float32")


def test_cache_elements_per_token_formulas():
    assert cache_elements_per_token("mha", num_heads=4, head_dim=6) == 48
    assert cache_elements_per_token("gqa", num_kv_heads=2, head_dim=6) == 24
    assert cache_elements_per_token("mqa", head_dim=6) == 12
    assert cache_elements_per_token("mla", kv_latent_dim=7, rope_dim=4) == 11
    # MHA's count equals what a real MultiHeadAttention cache stores
    assert cache_elements_per_token("gqa", num_kv_heads=2, head_dim=6) * 4 == kv_bytes_per_token(1, 2, 6)
    with pytest.raises(ValueError, match="kind"):
        cache_elements_per_token("mlx", head_dim=6)
    with pytest.raises(ValueError, match="num_kv_heads is missing"):
        cache_elements_per_token("gqa", head_dim=6)
    with pytest.raises(ValueError, match="rope_dim must be positive"):
        cache_elements_per_token("mla", kv_latent_dim=7, rope_dim=0)


def test_paper_comparison_numbers():
    # DeepSeek-V2, Table 1 at n_h = d_h = 128, d_c = 4·d_h = 512, d_h^R = d_h / 2 = 64
    rows = {r.name: r for r in cache_comparison(128, 128, 8, 512, 64)}
    assert rows["MHA"].elements == 32768
    assert rows["GQA (8 groups)"].elements == 2048
    assert rows["MQA"].elements == 256
    assert rows["MLA"].elements == 576
    assert rows["MLA"].gqa_groups == 2.25  # the paper: "equivalent to GQA with only 2.25 groups"


def test_doc_table_is_the_functions_output():
    doc = DOC.read_text(encoding="utf-8")
    table = cache_comparison_table(128, 128, 8, 512, 64, num_layers=60)
    assert table in doc, "docs/latent.md's table is not cache_comparison_table()'s output; regenerate it"
    numbers = {r.name: f"{r.elements:,}" for r in cache_comparison(128, 128, 8, 512, 64)}
    for name, count in numbers.items():
        assert re.search(rf"^\| {re.escape(name)} \|[^\n]*\| {count} \|", doc, re.M), (name, count)
    assert "576" in doc and "32,768" in doc


# -- errors --------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    m = make_mla()
    x = randn(2, 4, C)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m(x.numpy())
    with pytest.raises(ValueError, match=r"x has 2 dims, \(B, T, d_model=24\) expected, got \(4, 24\)"):
        m(x[0])
    with pytest.raises(ValueError, match="x has width 23, d_model=24 expected"):
        m(x[..., :23])
    with pytest.raises(TypeError, match="key_mask must be a bool tensor"):
        m(x, key_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"key_mask must be \(B, T\) = \(2, 4\), got \(2, 5\)"):
        m(x, key_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"pass one layer's cache, cache\[i\]"):
        m(x, cache=DynamicCache(1))
    left_padded = torch.tensor([[False, True, True, True], [True, True, True, True]])
    with pytest.raises(ValueError, match="pad on the right"):
        m(x, cache=DynamicCache(1)[0], key_mask=left_padded)
    with pytest.raises(ValueError, match="positions has 3 columns"):
        m(x, positions=torch.arange(3))
    with pytest.raises(TypeError, match="positions must hold integers"):
        m(x, positions=torch.arange(4.0))
    with pytest.raises(TypeError, match="absorb must be a bool"):
        m(x, absorb="yes")


def test_bad_config_raises():
    kw = dict(head_dim=D, rope_dim=DR, kv_latent_dim=DC)
    with pytest.raises(ValueError, match="rope_dim must be even"):
        MultiHeadLatentAttention(C, H, head_dim=D, rope_dim=5, kv_latent_dim=DC)
    with pytest.raises(ValueError, match="num_heads must be positive"):
        MultiHeadLatentAttention(C, 0, **kw)
    with pytest.raises(ValueError, match="q_latent_dim must be positive"):
        MultiHeadLatentAttention(C, H, q_latent_dim=0, **kw)
    with pytest.raises(TypeError, match="kv_latent_dim must be an int"):
        MultiHeadLatentAttention(C, H, head_dim=D, rope_dim=DR, kv_latent_dim=7.0)
    with pytest.raises(ValueError, match="rope_base must be a finite number > 1"):
        MultiHeadLatentAttention(C, H, rope_base=1.0, **kw)
    with pytest.raises(ValueError, match="no-such-backend"):
        MultiHeadLatentAttention(C, H, backend="no-such-backend", **kw)
    with pytest.raises(TypeError, match="absorb must be a bool"):
        MultiHeadLatentAttention(C, H, absorb=1, **kw)
    with pytest.raises(TypeError, match="config must be a MultiHeadLatentAttentionConfig"):
        make_static_cache({"kv_latent_dim": 7}, 1, 1, 4)
    cfg = make_latent_config(C, H, **kw)
    assert cfg.v_head_dim == D and cfg.q_latent_dim is None and cfg.latent_norm and not cfg.bias
    with pytest.raises(Exception):  # frozen
        cfg.num_heads = 2


@pytest.mark.parametrize("absorb", [False, True], ids=["plain", "absorbed"])
@pytest.mark.parametrize("cached", [False, True], ids=["no cache", "cache"])
def test_a_latent_call_checks_its_arguments_once(absorb, cached, monkeypatch):
    # MLA builds its call from its own tensors of a checked input: one check of the arguments, no make_call
    import multihead.nn.latent as latent_module
    from conftest import count_checks

    assert "make_call" not in vars(latent_module)
    m = make_mla(absorb=absorb)
    x = randn(2, 5, C)
    key_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    cache = DynamicCache(1) if cached else None
    counts = count_checks(monkeypatch)
    with torch.no_grad():
        out = m(x, key_mask=key_mask, cache=None if cache is None else cache[0], need_weights=True)
    assert counts == dict(inputs=0, latent=1, make_call=0, check_mask=0, plan=int(cached), update=int(cached),
                          decode=0), counts
    assert torch.isfinite(out.output).all() and out.weights.shape == (2, H, 5, 5)
