"""Weights on demand: read off the logsumexp, equal to the reference's softmax.

The numerical rule is docs/design.md's for outputs: against the float64 reference,
at most 2x the error of the naive reference in the inputs' dtype, plus 1e-5,
applied to the weights and to each statistic computed from them.
"""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead import weights as W
from multihead.backends import triton as tb
from conftest import ABS_SLACK, OUT_FACTOR, make_qkv, max_err


def lse_from(source, q, k, v, **call):
    if source == "chunked":
        return mh.chunked_attention(q, k, v, block_q=8, block_k=16, **call).lse
    if source == "cpu_flash":
        assert mh.explain_dispatch(q, k, v, need_lse=True, **call).chosen == "cpu_flash"
        return mh.attention_with_lse(q, k, v, backend="cpu_flash", **call).lse
    raise AssertionError(source)


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
    golden = mh.attention_ref(q.double(), k.double(), v.double(), upcast=True, **call).probs
    naive = mh.attention_ref(q, k, v, upcast=False, **call).probs
    return golden, naive


CASES = [  # (T, S, causal, mask kind)
    (17, 29, False, None), (29, 17, True, None), (1, 29, True, "key_padding"),
    (23, 31, True, "key_padding"), (23, 31, False, "bool_full"), (23, 31, True, "float"),
]


@pytest.mark.parametrize("source", ["chunked", "cpu_flash"])
@pytest.mark.parametrize("T,S,causal,mask_kind", CASES)
def test_weights_of_chosen_heads_and_rows_are_the_reference_probs(source, T, S, causal, mask_kind):
    B, H, G = 3, 4, 2
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=T + S)
    call = dict(causal=causal, attn_mask=mask_for(mask_kind, B, H, T, S))
    lse = lse_from(source, q, k, v, **call)
    golden, naive = reference_probs(q, k, v, **call)

    everything = W.attention_weights(q, k, lse, **call)
    assert everything.shape == (B, H, T, S) and everything.dtype == torch.float32
    assert_rule(everything, golden, naive, "all weights")

    heads, rows = [3, 0], list(range(T - 1, -1, -3))
    chosen = W.attention_weights(q, k, lse, heads=heads, rows=rows, block_k=7, **call)
    assert chosen.shape == (B, 2, len(rows), S)
    pick = (slice(None), heads)
    assert_rule(chosen, golden[pick][:, :, rows], naive[pick][:, :, rows], "chosen weights")


@pytest.mark.parametrize("source", ["chunked", "cpu_flash"])
@pytest.mark.parametrize("T,S,causal,mask_kind", CASES)
def test_stats_equal_the_ones_from_full_weights(source, T, S, causal, mask_kind):
    B, H, G, top_k = 3, 4, 2, 4
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=2 * T + S)
    call = dict(causal=causal, attn_mask=mask_for(mask_kind, B, H, T, S))
    lse = lse_from(source, q, k, v, **call)
    golden, naive = reference_probs(q, k, v, **call)

    # small tiles: the running top-k and the sums merge across many of them
    stats = W.attention_stats(q, k, lse, top_k=top_k, block_q=5, block_k=7, **call)

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
    lse = mh.chunked_attention(q, k, v, causal=True).lse
    stats = W.attention_stats(q, k, lse, top_k=7, heads=[2], causal=True)
    assert stats.heads.tolist() == [2] and stats.entropy.shape == (2, 1, 6)
    # query t sees t + 1 keys (S - T = -1 ... row 0 sees none): the rest of its 7 slots are -1
    seen = (stats.top_indices >= 0).sum(-1)
    assert seen[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    full = W.attention_stats(q, k, lse, top_k=7, causal=True)
    assert torch.equal(full.top_indices[:, 2:3], stats.top_indices)


@pytest.mark.parametrize("source", ["chunked", "cpu_flash"])
def test_rows_with_no_key(source):
    """lse -inf: weights 0, entropy 0, no top key, nothing NaN."""
    q, k, v = make_qkv(2, 4, 2, 9, 5, 16, seed=0)  # causal, T > S: the first 4 queries see no key
    mask = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor([5, 0]), 5))
    call = dict(causal=True, attn_mask=mask)
    lse = lse_from(source, q, k, v, **call)
    empty = torch.zeros(2, 4, 9, dtype=torch.bool)
    empty[:, :, :4] = True
    empty[1] = True
    assert torch.all(lse[empty] == float("-inf")) and torch.isfinite(lse[~empty]).all()
    w = W.attention_weights(q, k, lse, **call)
    assert torch.all(w[empty] == 0) and torch.isfinite(w).all()
    assert torch.allclose(w[~empty].sum(-1), torch.ones(()))  # each attended row sums to 1
    stats = W.attention_stats(q, k, lse, top_k=2, **call)
    assert torch.all(stats.entropy[empty] == 0) and torch.all(stats.top_indices[empty] == -1)
    assert torch.all(stats.entropy[~empty] >= 0) and torch.isfinite(stats.entropy).all()
    assert torch.all(stats.column_sums[1] == 0)


def test_weights_from_the_triton_kernels_lse(monkeypatch):
    if not tb.triton_installed():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    B, H, G, T, S = 2, 4, 2, 21, 37
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=8)
    lengths = torch.tensor([37, 10])
    mask = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(lengths, S))
    lse = tb.triton_attention(q, k, v, causal=True, key_lengths=lengths).lse
    golden, naive = reference_probs(q, k, v, causal=True, attn_mask=mask)
    assert_rule(W.attention_weights(q, k, lse, causal=True, attn_mask=mask), golden, naive, "weights")


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
    assert mh.explain_dispatch(q, k, v, need_lse=True, **call).chosen == backend
    result = mh.attention_with_lse(q, k, v, **call)
    ref_call = {key: value for key, value in call.items() if key != "dropout_p"}
    scores_ref = mh.attention_ref(q.double(), k.double(), v.double(), **{
        key: (value.detach().double() if isinstance(value, torch.Tensor) else value) for key, value in ref_call.items()})
    # lse: exp(score - lse) sums to 1 over the keys, i.e. the golden weights come back
    golden, naive = reference_probs(q, k, v, **{key: (value.detach() if isinstance(value, torch.Tensor) else value)
                                               for key, value in ref_call.items()})
    got = W.attention_weights(q, k, result.lse, **{key: (value.detach() if isinstance(value, torch.Tensor) else value)
                                                   for key, value in ref_call.items()})
    assert_rule(got, golden, naive, "weights")
    if case != "dropout":
        naive_out = mh.attention_ref(q, k, v, upcast=False, **ref_call).out
        assert_rule(result.out, scores_ref.out, naive_out, "out")
    assert result.out.shape == (B, H, T, v.shape[-1])


def test_attention_and_weights_is_attention_with_weights_without_the_eager_path():
    q, k, v = make_qkv(2, 4, 2, 11, 14, 16, seed=12, requires_grad=True)
    mask = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor([14, 6]), 14))
    got = W.attention_and_weights(q, k, v, attn_mask=mask, causal=True)
    want = mh.attention_with_weights(q, k, v, attn_mask=mask, causal=True)
    golden, naive = reference_probs(q.detach(), k.detach(), v.detach(), attn_mask=mask, causal=True)
    assert got.weights.shape == want.weights.shape and got.weights.dtype == q.dtype
    assert_rule(got.weights, golden, naive, "weights")
    qd, kd, vd = (x.detach() for x in (q, k, v))
    golden_out = mh.attention_ref(qd.double(), kd.double(), vd.double(), attn_mask=mask, causal=True).out
    naive_out = mh.attention_ref(qd, kd, vd, upcast=False, attn_mask=mask, causal=True).out
    assert_rule(got.out, golden_out, naive_out, "out")
    assert not got.weights.requires_grad
    # the output keeps its gradient
    dq = torch.autograd.grad(got.out.sum(), q)[0]
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
    one = W.attention_and_weights(q, k, v, attn_mask=mask, causal=True, heads=1, rows=slice(2, 5))
    assert one.weights.shape == (2, 1, 3, 14)
    assert_rule(one.weights, golden[:, 1:2, 2:5], naive[:, 1:2, 2:5], "one head, three rows")


def test_half_precision_weights():
    q, k, v = make_qkv(1, 4, 2, 33, 65, 32, dtype=torch.float16, seed=6)
    result = W.attention_and_weights(q, k, v, causal=True)
    assert result.weights.dtype == torch.float16
    w = W.attention_weights(q, k, result.lse, causal=True)
    golden, naive = reference_probs(q, k, v, causal=True)
    assert_rule(w, golden, naive, "fp16 weights")


def test_argument_errors():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8)
    lse = mh.chunked_attention(q, k, v).lse
    with pytest.raises(ValueError, match=r"lse must be \(B, H, T\) = \(2, 4, 5\), got \(2, 4\)"):
        W.attention_weights(q, k, lse[..., 0])
    with pytest.raises(ValueError, match=r"heads must be in \[0, 4\), got \[4\]"):
        W.attention_weights(q, k, lse, heads=4)
    with pytest.raises(TypeError, match="rows must hold ints"):
        W.attention_weights(q, k, lse, rows=[0.5])
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        W.attention_stats(q, k, lse, top_k=-1)
    with pytest.raises(ValueError, match="query heads H=4 must be a multiple"):
        W.attention_weights(q, k[:, :1].expand(2, 3, 7, 8), lse)


def test_module_need_weights_reads_the_weights_off_the_backends_lse(monkeypatch):
    """need_weights without a gradient: output from the module's backend, weights from its lse, equal to eager."""
    import multihead.attend as attend_module
    from multihead import MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True).eval()
    x = torch.randn(2, 9, 32, requires_grad=True)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 6:] = False
    eager = mha(x, key_mask=key_mask, need_weights=True)  # x requires grad: the eager path
    assert eager.weights.requires_grad
    calls = []
    real = attend_module.attention_and_weights
    monkeypatch.setattr(attend_module, "attention_and_weights",
                        lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    with torch.no_grad():
        mha(x, key_mask=key_mask, need_weights=True)  # auto: the eager pass, not the lse
        chunked = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, backend="chunked").eval()
        chunked.load_state_dict(mha.state_dict())
        on_demand = chunked(x, key_mask=key_mask, need_weights=True)
    assert calls == ["chunked"]
    assert (on_demand.output - eager.output).abs().max().item() < 1e-5
    assert (on_demand.weights - eager.weights).abs().max().item() < 1e-5
    assert on_demand.weights[1, :, :, 6:].abs().max().item() == 0.0  # padding keys get nothing
