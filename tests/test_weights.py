"""Weights and statistics on demand, for chosen heads and rows, equal to the reference's softmax.

The numerical rule is docs/design.md's for outputs: against the float64 reference,
at most 2x the error of the naive reference in the inputs' dtype, plus 1e-5,
applied to the weights and to each statistic computed from them.
"""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead.ops import weights as W
from conftest import ABS_SLACK, OUT_FACTOR, make_qkv, max_err
from multihead.backends.reference import attention_ref
from multihead.core.call import make_call


def mask_for(kind, B, H, T, S):
    gen = torch.Generator().manual_seed(11)
    if kind is None:
        return None
    if kind == "key_padding":  # the last sequence has no key at all
        return mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor([S, S // 2, 0][:B]), S))
    if kind == "bool_full":  # per head and query, with rows that see nothing
        mask = torch.rand(B, H, T, S, generator=gen) > 0.4
        mask[:, :, 3] = False
        return mask
    mask = torch.randn(1, H, T, S, generator=gen)  # float: biases, -inf entries and one -inf row
    mask[torch.rand(1, H, T, S, generator=gen) > 0.7] = float("-inf")
    mask[:, :, 5] = float("-inf")
    return mask


def assert_rule(got, golden, naive, what):
    err, naive_err = max_err(got, golden), max_err(naive, golden)
    assert err <= OUT_FACTOR * naive_err + ABS_SLACK, f"{what}: error {err:.3g} > 2 x naive {naive_err:.3g} + 1e-5"


def reference_probs(q, k, v, **call):
    """(golden float64, naive in q's dtype) softmax weights of attention_ref."""
    golden = attention_ref(q.double(), k.double(), v.double(), upcast=True, **call).probs
    naive = attention_ref(q, k, v, upcast=False, **call).probs
    return golden, naive


CASES = [  # (T, S, causal, mask kind)
    (17, 29, False, None), (29, 17, True, None), (1, 29, True, "key_padding"),
    (23, 31, True, "key_padding"), (23, 31, False, "bool_full"), (23, 31, True, "float"),
]


@pytest.mark.parametrize("T,S,causal,mask_kind", CASES)
def test_weights_of_chosen_heads_and_rows_are_the_reference_probs(T, S, causal, mask_kind):
    B, H, G = 3, 4, 2
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=T + S)
    call = dict(causal=causal, attn_mask=mask_for(mask_kind, B, H, T, S))
    golden, naive = reference_probs(q, k, v, **call)

    everything = mh.attention_weights(q, k, v, **call)
    assert everything.shape == (B, H, T, S) and everything.dtype == torch.float32
    assert_rule(everything, golden, naive, "all weights")

    heads, rows = [3, 0], list(range(T - 1, -1, -3))
    chosen = mh.attention_weights(q, k, v, heads=heads, rows=rows, **call)
    assert chosen.shape == (B, 2, len(rows), S)
    pick = (slice(None), heads)
    assert_rule(chosen, golden[pick][:, :, rows], naive[pick][:, :, rows], "chosen weights")
    # tiles of 7 keys give the same weights as one tile
    call_checked = make_call(q, k, v, **call)
    assert max_err(W.weights_of(call_checked, heads, rows, block_k=7), chosen) < 1e-6


@pytest.mark.parametrize("T,S,causal,mask_kind", CASES)
def test_stats_equal_the_ones_from_full_weights(T, S, causal, mask_kind):
    B, H, G, top_k = 3, 4, 2, 4
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=2 * T + S)
    call = dict(causal=causal, attn_mask=mask_for(mask_kind, B, H, T, S))
    golden, naive = reference_probs(q, k, v, **call)

    # small tiles: the running lse, the top-k and the sums merge across many of them
    stats = mh.attention_stats(q, k, v, top_k=top_k, block_q=5, block_k=7, **call)

    def entropy(p):
        return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)

    assert stats.entropy.shape == (B, H, T) and stats.column_sums.shape == (B, H, S)
    assert_rule(stats.entropy, entropy(golden), entropy(naive), "entropy")
    assert_rule(stats.column_sums, golden.sum(2), naive.sum(2), "column sums")

    top = golden.topk(min(top_k, S), dim=-1)
    assert stats.top_weights.shape == stats.top_indices.shape == (B, H, T, top_k)
    assert_rule(stats.top_weights, top.values, naive.topk(top_k, dim=-1).values, "top weights")
    # the keys it names carry the top weights (a near-tie may swap two keys, never change a value)
    has = stats.top_indices >= 0
    assert torch.equal(has, top.values > 0), "index -1 exactly where the row has fewer keys"
    named = golden.gather(-1, stats.top_indices.clamp_min(0)).masked_fill(~has, 0.0)
    assert_rule(named, top.values, naive.topk(top_k, dim=-1).values, "weights at the named keys")
    assert torch.all(stats.top_weights[~has] == 0)


def test_stats_of_chosen_heads_and_more_top_k_than_keys():
    q, k, v = make_qkv(2, 4, 1, 6, 5, 8, seed=3)
    stats = mh.attention_stats(q, k, v, top_k=7, heads=[2], causal=True)
    assert stats.heads.tolist() == [2] and stats.entropy.shape == (2, 1, 6)
    # query t sees t + 1 keys (S - T = -1 ... row 0 sees none): the rest of its 7 slots are -1
    seen = (stats.top_indices >= 0).sum(-1)
    assert seen[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    full = mh.attention_stats(q, k, v, top_k=7, causal=True)
    assert torch.equal(full.top_indices[:, 2:3], stats.top_indices)


def test_rows_with_no_key():
    """A row with no key: weights 0, entropy 0, no top key, lse -inf, nothing NaN."""
    q, k, v = make_qkv(2, 4, 2, 9, 5, 16, seed=0)  # causal, T > S: the first 4 queries see no key
    mask = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor([5, 0]), 5))
    call = dict(causal=True, attn_mask=mask)
    empty = torch.zeros(2, 4, 9, dtype=torch.bool)
    empty[:, :, :4] = True
    empty[1] = True
    for backend in ("chunked", "cpu_flash"):
        lse = mh.attention(q, k, v, backend=backend, return_lse=True, **call).lse
        assert torch.all(lse[empty] == float("-inf")) and torch.isfinite(lse[~empty]).all()
    w = mh.attention_weights(q, k, v, **call)
    assert torch.all(w[empty] == 0) and torch.isfinite(w).all()
    assert torch.allclose(w[~empty].sum(-1), torch.ones(()))  # each attended row sums to 1
    stats = mh.attention_stats(q, k, v, top_k=2, **call)
    assert torch.all(stats.entropy[empty] == 0) and torch.all(stats.top_indices[empty] == -1)
    assert torch.all(stats.entropy[~empty] >= 0) and torch.isfinite(stats.entropy).all()
    assert torch.all(stats.column_sums[1] == 0)


# ---- the output with its lse, from the fastest path that gives one


@pytest.mark.parametrize("case,backend", [
    ("plain", "cpu_flash"), ("causal_T_ne_S", "cpu_flash"), ("value_width", "chunked"),
    ("dropout", "chunked"), ("mask_with_grad", "reference"),
])
def test_attention_with_lse_paths(case, backend):
    B, H, G, T, S = 2, 4, 2, 13, 19
    q, k, v = make_qkv(B, H, G, T, S, 16, Dv=8 if case == "value_width" else 16, seed=1)
    call = dict(causal=case != "plain")
    if case == "dropout":
        call["dropout_p"] = 0.2
    if case == "mask_with_grad":
        call["attn_mask"] = torch.randn(1, H, T, S, requires_grad=True)
    assert mh.which_backend(q, k, v, return_lse=True, **call).chosen == backend
    result = mh.attention(q, k, v, **call, return_lse=True)
    ref_call = {key: value for key, value in call.items() if key != "dropout_p"}
    scores_ref = attention_ref(q.double(), k.double(), v.double(), **{
        key: (value.detach().double() if isinstance(value, torch.Tensor) else value) for key, value in ref_call.items()})
    # lse: the log of each row's softmax denominator, against the float64 masked scores
    golden_call = {key: (value.detach().double() if isinstance(value, torch.Tensor) else value)
                   for key, value in ref_call.items()}
    golden_lse = mh.attention(q.double(), k.double(), v.double(), backend="reference", return_lse=True,
                              **golden_call).lse
    assert result.lse.dtype == torch.float32 and max_err(result.lse, golden_lse) < 1e-5
    if case != "dropout":
        naive_out = attention_ref(q, k, v, upcast=False, **ref_call).out
        assert_rule(result.out, scores_ref.out, naive_out, "out")
    assert result.out.shape == (B, H, T, v.shape[-1])


def test_weights_need_no_lse_and_carry_no_gradient():
    q, k, v = make_qkv(2, 4, 2, 11, 14, 16, seed=12, requires_grad=True)
    mask = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor([14, 6]), 14))
    got = mh.attention_weights(q, k, v, attn_mask=mask, causal=True, heads=1, rows=slice(2, 5))
    golden, naive = reference_probs(q.detach(), k.detach(), v.detach(), attn_mask=mask, causal=True)
    assert got.shape == (2, 1, 3, 14) and got.dtype == q.dtype and not got.requires_grad
    assert_rule(got, golden[:, 1:2, 2:5], naive[:, 1:2, 2:5], "one head, three rows")
    # any slice, a negative step included, and negative positions from the end
    backwards = mh.attention_weights(q, k, v, attn_mask=mask, causal=True, heads=slice(None, None, -1), rows=[-1])
    assert torch.equal(backwards, mh.attention_weights(q, k, v, attn_mask=mask, causal=True, heads=[3, 2, 1, 0],
                                                       rows=[10]))


def test_half_precision_weights():
    q, k, v = make_qkv(1, 4, 2, 33, 65, 32, dtype=torch.float16, seed=6)
    w = mh.attention_weights(q, k, v, causal=True)
    assert w.dtype == torch.float16
    golden, naive = reference_probs(q, k, v, causal=True)
    assert_rule(w, golden, naive, "fp16 weights")


def test_argument_errors():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8)
    with pytest.raises(ValueError, match=r"heads must be in \[0, 4\) \(or negative from the end\), got \[4\]"):
        mh.attention_weights(q, k, v, heads=4)
    with pytest.raises(TypeError, match="rows must hold ints"):
        mh.attention_weights(q, k, v, rows=[0.5])
    with pytest.raises(TypeError, match="heads must be a 1-d integer tensor"):
        mh.attention_weights(q, k, v, heads=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        mh.attention_stats(q, k, v, top_k=-1)
    with pytest.raises(ValueError, match="query heads H=4 must be a multiple"):
        mh.attention_weights(q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8))


def test_module_need_weights_keeps_a_named_backends_kernel(monkeypatch):
    """need_weights without a gradient: the output from the module's backend, the weights apart, equal to eager."""
    import multihead.ops.run as run_module
    from multihead import MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True).eval()
    x = torch.randn(2, 9, 32, requires_grad=True)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 6:] = False
    eager = mha(x, key_mask=key_mask, need_weights=True)  # x requires grad: the eager path
    assert eager.weights.requires_grad
    calls = []
    real = run_module.weights_of
    monkeypatch.setattr(run_module, "weights_of", lambda call: calls.append(call.q.shape) or real(call))
    with torch.no_grad():
        mha(x, key_mask=key_mask, need_weights=True)  # auto: the eager pass, no separate weights
        chunked = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, backend="chunked").eval()
        chunked.load_state_dict(mha.state_dict())
        on_demand = chunked(x, key_mask=key_mask, need_weights=True)
    assert calls == [(2, 4, 9, 8)]
    assert (on_demand.output - eager.output).abs().max().item() < 1e-5
    assert (on_demand.weights - eager.weights).abs().max().item() < 1e-5
    assert on_demand.weights[1, :, :, 6:].abs().max().item() == 0.0  # padding keys get nothing


def test_weights_on_demand_with_a_strided_last_dim():
    q = torch.randn(1, 2, 5, 16)[..., ::2]  # (1, 2, 5, 8) with stride 2 in the last dim
    k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out, weights = mh.attention(q, k, v, backend="cpu_flash"), mh.attention_weights(q, k, v)
    want = attention_ref(q.double(), k.double(), v.double())
    assert max_err(out, want.out) < 1e-5 and max_err(weights, want.probs) < 1e-5
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 5))


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
