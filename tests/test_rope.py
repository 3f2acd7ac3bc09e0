"""Rotary position embeddings: rotation, relative positions, HF Llama's convention, offsets after a cache."""

from __future__ import annotations

import pytest
import torch

from multihead import MultiHeadAttention
from multihead.backends.reference import attention_ref
from multihead.nn.cache import DynamicCache, StaticCache
from multihead.nn.rope import Rotary, RotaryEmbedding, apply_rotary, rotate_half
from conftest import max_err

C, H, D = 32, 4, 8  # model width, query heads, head dim
TIGHT = 1e-12  # float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def by_complex_numbers(x, positions, base=10000.0):
    """The rotation as complex products of half-split pairs: (x_i + j·x_{i+D/2})·e^{j·m·θ_i}, θ_i = base^(-2i/D)."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])  # (D/2,)
    z = torch.complex(x[..., :half], x[..., half:])  # (..., T, D/2)
    angles = positions[..., None].double() * theta  # (..., T, 1) * (D/2,) -> (..., T, D/2)
    turned = z * torch.polar(torch.ones_like(angles), angles)  # (..., T, D/2)
    return torch.cat([turned.real, turned.imag], dim=-1)  # (..., T, D)


def test_rotation_keeps_every_vector_length():
    rope = RotaryEmbedding(D)
    x = randn(2, 3, 7, D)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [40, 41, 1000, 7, 3, 9000, 2]])
    rotated = rope.rotate(x, positions)
    assert max_err(rotated.norm(dim=-1), x.norm(dim=-1)) < TIGHT
    assert max_err(rotated[:, :, 1:], x[:, :, 1:]) > 0.1, "a rotation that turns nothing keeps lengths too"


def test_scores_depend_only_on_the_position_difference():
    rope = RotaryEmbedding(D)
    q, k = randn(1, 1, 1, D, seed=1), randn(1, 1, 1, D, seed=2)

    def score(m, n):
        return (rope.rotate(q, torch.tensor([m])) * rope.rotate(k, torch.tensor([n]))).sum().item()

    for shift in (1, 17, 500):
        assert abs(score(5, 2) - score(5 + shift, 2 + shift)) < TIGHT
        assert abs(score(2, 9) - score(2 + shift, 9 + shift)) < TIGHT
    assert abs(score(5, 2) - score(5, 3)) > 1e-3, "another distance must give another score"


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_equals_the_complex_number_rotation_in_the_half_split_convention(base):
    rope = RotaryEmbedding(D, base=base)
    x = randn(2, 3, 5, D, seed=3)
    positions = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 300, 301]])
    expected = by_complex_numbers(x, positions[:, None], base)  # (B, 3, T, D)
    assert max_err(rope.rotate(x, positions), expected) < TIGHT
    # the interleaved convention (pairs (x0, x1), (x2, x3), ...) is another function: this is not it
    interleaved = x.view(2, 3, 5, D // 2, 2).transpose(-1, -2).reshape(2, 3, 5, D)  # (..., D/2, 2) -> (..., D)
    turned = by_complex_numbers(interleaved, positions[:, None], base)
    back = turned.view(2, 3, 5, 2, D // 2).transpose(-1, -2).reshape(2, 3, 5, D)  # half-split -> interleaved
    assert max_err(rope.rotate(x, positions), back) > 0.1


def test_matches_hugging_face_llama_bit_for_bit_in_float32():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=500000.0,
                         max_position_embeddings=4096)
    hf = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(16, base=500000.0)
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [3000, 3001, 3002, 3003, 3004, 3005]])
    hf_cos, hf_sin = hf(q, positions)  # (B, T, D)
    cos, sin = ours(positions)
    assert torch.equal(cos[:, 0], hf_cos) and torch.equal(sin[:, 0], hf_sin)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    assert torch.equal(apply_rotary(q, cos, sin), hf_q) and torch.equal(apply_rotary(k, cos, sin), hf_k)


def test_every_row_has_its_own_positions_and_shapes_broadcast_over_heads():
    rope = RotaryEmbedding(D)
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])
    cos, sin = rope(positions, dtype=torch.float64)
    assert isinstance(rope(positions), Rotary) and cos.shape == (2, 1, 3, D)
    for b in range(2):
        row_cos, row_sin = rope(positions[b], dtype=torch.float64)  # (T,) -> (1, 1, T, D)
        assert torch.equal(cos[b:b + 1], row_cos) and torch.equal(sin[b:b + 1], row_sin)
    assert max_err(cos[0], cos[1]) > 0.1
    assert rope(positions, dtype=torch.bfloat16).cos.dtype == torch.bfloat16
    x = torch.randn(2, H, 3, D, dtype=torch.bfloat16)
    assert rope.rotate(x, positions).dtype == torch.bfloat16
    # rotate_half is multiplication by j on every pair: applied twice it negates
    assert torch.equal(rotate_half(rotate_half(x)), -x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="base must be a finite number > 1"):
        RotaryEmbedding(8, base=1.0)
    rope = RotaryEmbedding(D)
    with pytest.raises(TypeError, match="positions must hold integers"):
        rope(torch.zeros(3))
    with pytest.raises(ValueError, match=r"positions has 3 dims, \(B, T\) or \(T,\) expected"):
        rope(torch.zeros(1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="this RotaryEmbedding has head_dim=8"):
        rope.rotate(torch.randn(1, 1, 2, 6), torch.arange(2))
    with pytest.raises(ValueError, match="rope rotates head_dim=8, the heads have head_dim=4"):
        MultiHeadAttention(16, 4, rope=rope)
    with pytest.raises(TypeError, match="rope must be a multihead.nn.rope.RotaryEmbedding"):
        MultiHeadAttention(32, 4, rope="llama")
    mha = MultiHeadAttention(C, H, causal=True, rope=rope)
    x = torch.randn(2, 3, C)
    with pytest.raises(ValueError, match=r"positions has 4 columns, one per query T=3"):
        mha(x, positions=torch.arange(4))
    with pytest.raises(ValueError, match="self-attention"):
        mha(x, torch.randn(2, 5, C))


def make_mha(G, seed=0):
    torch.manual_seed(seed)
    return MultiHeadAttention(C, H, num_kv_heads=G, causal=True, rope=RotaryEmbedding(D)).double().eval()


def test_module_rotates_q_and_k_after_the_projections():
    mha = make_mha(2)
    x = randn(2, 9, C, seed=4)
    positions = torch.tensor([list(range(9)), list(range(20, 29))])
    B, T = 2, 9
    q = mha.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)
    k = mha.k_proj(x).view(B, T, 2, D).transpose(1, 2)  # (B, T, C) -> (B, G, T, D)
    v = mha.v_proj(x).view(B, T, 2, D).transpose(1, 2)  # (B, T, C) -> (B, G, T, D)
    q, k = by_complex_numbers(q, positions[:, None]), by_complex_numbers(k, positions[:, None])
    heads = attention_ref(q, k, v, causal=True).out  # (B, H, T, D)
    expected = mha.out_proj(heads.transpose(1, 2).reshape(B, T, H * D))  # (B, H, T, D) -> (B, T, C)
    with torch.no_grad():
        assert max_err(mha(x, positions=positions).output, expected) < TIGHT
        # the default positions are 0..T-1, and shifting every position alike changes nothing (relative)
        assert max_err(mha(x).output, mha(x, positions=torch.arange(9)).output) < TIGHT
        assert max_err(mha(x, positions=positions).output[1], mha(x).output[1]) < TIGHT


def test_state_dict_is_the_same_with_or_without_rope():
    with_rope = make_mha(2)
    plain = MultiHeadAttention(C, H, num_kv_heads=2, causal=True).double()
    assert with_rope.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(with_rope.state_dict())
    x = randn(1, 5, C, seed=5)
    with torch.no_grad():
        assert max_err(with_rope(x).output, plain(x).output) > 1e-3, "rope must change the output"


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("G", [2, 1], ids=["GQA", "MQA"])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_cached_decode_with_rope_equals_the_full_forward(kind, G, chunk):
    mha = make_mha(G)
    x = randn(2, 15, C, seed=chunk)
    with torch.no_grad():
        full = mha(x).output
        cache = DynamicCache(1) if kind == "dynamic" else StaticCache(1, 2, 15, G, D, dtype=torch.float64)
        outs = [mha(x[:, s:s + chunk], cache=cache[0]).output for s in range(0, 15, chunk)]
    assert max_err(torch.cat(outs, 1), full) < TIGHT


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_rope_offsets_follow_each_sequences_own_length(kind):
    # prompts of 2 and 6 tokens in one batch, then 4 single-token steps: sequence 0's new tokens sit at
    # positions 2, 3, ... and sequence 1's at 6, 7, ...; each must equal its own full forward
    mha = make_mha(2)
    lengths, steps = [2, 6], 4
    streams = [randn(n + steps, C, seed=10 + b) for b, n in enumerate(lengths)]
    prompt = torch.zeros(2, 6, C, dtype=torch.float64)
    key_mask = torch.zeros(2, 6, dtype=torch.bool)
    for b, n in enumerate(lengths):
        prompt[b, :n], key_mask[b, :n] = streams[b][:n], True
    cache = DynamicCache(1) if kind == "dynamic" else StaticCache(1, 2, 10, 2, D, dtype=torch.float64)
    with torch.no_grad():
        first = mha(prompt, cache=cache[0], key_mask=key_mask).output
        outs = [[first[b, :n]] for b, n in enumerate(lengths)]
        for t in range(steps):
            assert cache[0].positions(1).flatten().tolist() == [2 + t, 6 + t]
            token = torch.stack([streams[b][n + t] for b, n in enumerate(lengths)])[:, None]  # (B, 1, C)
            out = mha(token, cache=cache[0]).output
            for b in range(2):
                outs[b].append(out[b])
        for b in range(2):
            alone = mha(streams[b][None]).output[0]
            assert max_err(torch.cat(outs[b]), alone) < TIGHT, f"sequence {b}"


def test_negative_positions_are_refused_by_the_module():
    mha = MultiHeadAttention(16, 2, causal=True, rope=RotaryEmbedding(8))
    with pytest.raises(ValueError, match=r"positions must be >= 0 \(absolute token positions\), got min -2"):
        mha(torch.randn(1, 3, 16), positions=torch.tensor([-2, -1, 0]))


def test_rotate_checks_its_positions_against_x():
    rope = RotaryEmbedding(4)
    x = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="positions has 1 columns, one per query T=5"):
        rope.rotate(x, torch.tensor([3]))
    with pytest.raises(ValueError, match="positions has 3 rows, B=1"):
        rope.rotate(x, torch.arange(5).expand(3, 5))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope.rotate(x, torch.arange(-1, 4))


@pytest.mark.parametrize("name, value", [("base", 500000.0), ("head_dim", 4)])
def test_the_config_the_frequencies_were_made_from_is_read_only(name, value):
    """Once failed (silent): `rope.base = 500000.0` after a first call was accepted and ignored: the memoised
    inverse frequencies of the old base were reused, and the output was bit-identical to the old base's.
    base and head_dim are now read-only: setting either raises and changes nothing, and a new
    RotaryEmbedding with the new base gives that base's rotation."""
    rope = RotaryEmbedding(D)
    x, positions = randn(1, 2, 5, D, seed=5), torch.arange(5)
    before = rope.rotate(x, positions)  # memoises the frequencies of base 10000
    with pytest.raises(AttributeError, match=rf"RotaryEmbedding.{name} is read-only .*Build a new RotaryEmbedding"):
        setattr(rope, name, value)
    assert (rope.base, rope.head_dim) == (10000.0, D)
    assert torch.equal(rope.rotate(x, positions), before)
    other = RotaryEmbedding(D, base=500000.0)
    assert max_err(other.rotate(x, positions), by_complex_numbers(x, positions, 500000.0)) < TIGHT
    assert max_err(other.rotate(x, positions), before) > 1e-3, "another base must give another rotation"
