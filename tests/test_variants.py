"""The attention family (window, softcap, ALiBi, sinks, documents, score_mod) on every backend that takes it.

The oracle below is written from the definitions in docs/design.md, apart
from `multihead.core.variants`: float64, one (B, H, T, S) matrix, a softmax
whose denominator holds the sink. Every backend that accepts a variant
matches it under the 2x/3x rule (float32 against the library's own reference
run in float32); a backend that refuses says why in one line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead
from multihead.backends.chunked import ChunkedBackend, visited_tiles
from multihead.backends.reference import attention_ref
from multihead.core.call import make_call
from conftest import make_qkv, max_err

B, H, G, D = 2, 4, 2, 16


def oracle(q, k, v, *, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None, documents=None,
           score_mod=None):
    """(out, lse, weights) in float64, straight from the definitions."""
    q, k, v = q.double(), k.double(), v.double()
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, G, S, D) -> (B, H, S, D)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    i = torch.arange(T)[:, None] + (S - T)  # aligned query positions, (T, 1)
    j = torch.arange(S)[None, :]  # (1, S)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().reshape(-1, H)[:, :, None, None] * (i - j).abs()
    if score_mod is not None:
        s = score_mod(s, torch.arange(q.shape[0]).view(-1, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
                      torch.arange(T).view(1, 1, T, 1), torch.arange(S).view(1, 1, 1, S))
    keep = torch.ones(q.shape[0], 1, T, S, dtype=torch.bool)
    if causal:
        keep = keep & (j <= i)
    if window is not None:
        if window[0] is not None:
            keep = keep & (j >= i - window[0])
        if window[1] is not None:
            keep = keep & (j <= i + window[1])
    if documents is not None:
        q_ids, k_ids = documents if isinstance(documents, tuple) else (documents, documents)
        keep = keep & (q_ids[:, :, None] == k_ids[:, None, :])[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    sink = None if sinks is None else sinks.double().view(1, H, 1, 1)
    if sink is not None:
        top = torch.maximum(top, sink)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    e = torch.exp(s - top)
    denominator = e.sum(dim=-1, keepdim=True) + (0.0 if sink is None else torch.exp(sink - top))
    weights = torch.where(denominator > 0, e / denominator, torch.zeros_like(e))
    lse = (torch.log(denominator) + top).squeeze(-1)
    return weights @ v, lse, weights


def _documents(T: int) -> torch.Tensor:
    """Two packed rows: three documents, then two (sorted ids, as a packed batch has them)."""
    first = torch.tensor([0] * (T // 3) + [1] * (T // 3) + [2] * (T - 2 * (T // 3)))
    second = torch.tensor([5] * (T - T // 4) + [6] * (T // 4))
    return torch.stack([first, second])


_BIAS = torch.linspace(-0.5, 0.5, H, dtype=torch.float64)


def _relative(score, b, h, q_idx, kv_idx):
    """A score_mod that reads a captured per-head table: a relative-position bias."""
    return score + _BIAS.to(score.dtype)[h] * torch.log1p((q_idx - kv_idx).abs().to(score.dtype))


CASES = {
    "window": lambda T, S: dict(window=(5, 2)),
    "window_causal": lambda T, S: dict(window=(4, None), causal=True),
    "softcap": lambda T, S: dict(softcap=2.0),
    "alibi": lambda T, S: dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "alibi_per_batch": lambda T, S: dict(alibi_slopes=torch.rand(B, H, generator=torch.Generator().manual_seed(3))),
    "sinks": lambda T, S: dict(sinks=torch.tensor([0.0, 1.5, -1.0, 3.0])),
    "documents": lambda T, S: dict(documents=_documents(T) if T == S else (_documents(T), _documents(S))),
    "score_mod": lambda T, S: dict(score_mod=_relative),
    "all": lambda T, S: dict(window=(6, 0), softcap=3.0, alibi_slopes=torch.tensor([0.3, 0.2, 0.1, 0.05]),
                             sinks=torch.tensor([1.0, -1.0, 0.5, 2.0]), score_mod=_relative, causal=True,
                             documents=_documents(T) if T == S else (_documents(T), _documents(S))),
}
SHAPES = [(23, 23), (7, 23)]  # self-attention, and fewer queries than keys (a chunk after a cache)


@pytest.mark.parametrize("T,S", SHAPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_equals_the_definitions(case, T, S):
    q, k, v = make_qkv(B, H, G, T, S, D, dtype=torch.float64)
    variant = CASES[case](T, S)
    out, lse = multihead.attention(q, k, v, backend="reference", return_lse=True, **variant)
    want_out, want_lse, want_weights = oracle(q, k, v, **variant)
    assert max_err(out, want_out) < 1e-12
    assert max_err(lse, want_lse) < 1e-12
    assert max_err(multihead.attention_weights(q, k, v, **variant), want_weights) < 1e-12


def _backends():
    return {"chunked": ChunkedBackend(block_q=4, block_k=8), "sdpa": "sdpa", "cpu_flash": "cpu_flash"}


def _run(backend, q, k, v, variant):
    """out and lse (lse None where the backend gives none) of a backend on a call with these variants."""
    call = make_call(q, k, v, **variant)
    if isinstance(backend, ChunkedBackend):
        return backend.forward(call, need_lse=True)
    if backend == "sdpa":  # no lse there
        return multihead.attention(q, k, v, backend=backend, **variant), None
    return multihead.attention(q, k, v, backend=backend, return_lse=True, **variant)


def _float_variant(variant: dict, dtype: torch.dtype) -> tuple[dict, list[torch.Tensor]]:
    """The variant with its float tensors (sinks, slopes) as fresh leaves of `dtype` that require a gradient."""
    copy = dict(variant)
    leaves = []
    for name in ("sinks", "alibi_slopes"):
        if name in copy:
            copy[name] = copy[name].detach().to(dtype).requires_grad_(True)
            leaves.append(copy[name])
    return copy, leaves


@pytest.mark.parametrize("T,S", SHAPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", sorted(_backends()))
def test_backend_equals_the_oracle_or_says_why_not(backend, case, T, S):
    """float32 against the float64 oracle: output, lse, dq, dk, dv under the 2x/3x rule; the sinks' and
    slopes' gradients (sums over every score) in float64, where the formula alone decides."""
    q64, k64, v64 = make_qkv(B, H, G, T, S, D, dtype=torch.float64, requires_grad=True)
    variant = CASES[case](T, S)
    chosen = _backends()[backend]
    reason = (chosen if isinstance(chosen, ChunkedBackend) else multihead.backends.get(chosen)).supports(
        make_call(q64.float(), k64.float(), v64.float(), **variant))
    if reason is not None:
        assert reason and "\n" not in reason
        assert backend != "chunked", reason
        pytest.skip(f"{backend}: {reason}")
    gold_variant, gold_leaves = _float_variant(variant, torch.float64)
    golden = oracle(q64, k64, v64, **gold_variant)
    grad_out = torch.randn(golden[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    golden_grads = torch.autograd.grad(golden[0], [q64, k64, v64, *gold_leaves], grad_out)

    inputs = [x.detach().float().requires_grad_() for x in (q64, k64, v64)]
    naive_in = [x.detach().float().requires_grad_() for x in (q64, k64, v64)]
    out, lse = _run(chosen, *inputs, {n: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                                      for n, x in variant.items()})
    naive_call = make_call(*naive_in, **_float_variant(variant, torch.float32)[0])
    naive = attention_ref(*naive_in, causal=naive_call.causal, upcast=False, variants=naive_call.variants).out
    assert max_err(out, golden[0]) <= 2 * max_err(naive, golden[0]) + 1e-5
    if lse is not None:
        assert max_err(lse, golden[1]) <= 1e-5
    grads = torch.autograd.grad(out, inputs, grad_out.float())
    naive_grads = torch.autograd.grad(naive, naive_in, grad_out.float())
    for name, g, gg, ng in zip("qkv", grads, golden_grads, naive_grads):
        assert max_err(g, gg) <= 3 * max_err(ng, gg) + 1e-5, name

    run_variant, leaves = _float_variant(variant, torch.float64)
    inputs64 = [x.detach().requires_grad_() for x in (q64, k64, v64)]
    backend_object = chosen if isinstance(chosen, ChunkedBackend) else multihead.backends.get(chosen)
    reason = backend_object.supports(make_call(*inputs64, **run_variant))
    if leaves and reason is None:
        out64, _ = _run(chosen, *inputs64, run_variant)
        for g, gg in zip(torch.autograd.grad(out64, leaves, grad_out), golden_grads[3:]):
            assert max_err(g, gg) < 1e-10


def test_a_score_mod_passes_gradients_to_what_it_captures():
    """The chunked backward reaches a tensor the score_mod closes over, as autograd through the reference does."""
    q, k, v = make_qkv(B, H, G, 29, 29, D, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2 * 29, dtype=torch.float64, requires_grad=True)

    def relative_table(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + 28]

    grads = {}
    for name, backend in (("reference", "reference"), ("chunked", ChunkedBackend(block_q=8, block_k=8))):
        if name == "reference":
            out = multihead.attention(q, k, v, score_mod=relative_table, causal=True, backend="reference")
        else:
            out = backend.forward(make_call(q, k, v, score_mod=relative_table, causal=True)).out
        grads[name] = torch.autograd.grad(out.square().sum(), (q, k, v, table))
    for a, b in zip(grads["reference"], grads["chunked"]):
        assert max_err(a, b) < 1e-10
    assert grads["chunked"][3].abs().sum() > 0


def test_a_score_mod_closing_over_a_module_passes_gradients_to_its_parameters():
    """A score_mod made in a module's forward reads `self.bias` through the closure cell `self`: the chunked
    backward found only tensors in the cells, and the parameter got no gradient at all (None)."""
    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.linspace(-0.3, 0.3, H, dtype=torch.float64))

        def forward(self, q, k, v, backend):
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + self.bias[h] * (q_idx - kv_idx).to(score.dtype)
            return multihead.attention(q, k, v, score_mod=score_mod, causal=True, backend=backend)

    module = Biased()
    q, k, v = make_qkv(B, H, G, 13, 13, D, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "chunked"):
        (grads[backend],) = torch.autograd.grad(module(q, k, v, backend).square().sum(), module.bias,
                                                allow_unused=True)
    assert grads["chunked"] is not None and grads["reference"].abs().sum() > 0
    assert max_err(grads["chunked"], grads["reference"]) < 1e-10


@pytest.mark.parametrize("variant", [dict(window=(3, 1)), dict(causal=True), dict(window=(4, None), causal=True)])
def test_a_nan_or_inf_key_reaches_only_the_rows_that_see_it_on_the_chunked_backend(variant):
    """Outside a window or the causal band a key is written over with -inf (the chunked backend clears the tile
    there and adds a 0 / -inf bias, not a bool masked_fill): +inf, -inf or NaN in such a key must not reach a row
    that cannot see it, exactly as the reference's masked_fill keeps it out."""
    q, k, v = make_qkv(1, 2, 2, 19, 19, 8, dtype=torch.float64, seed=4)
    k = k.clone()
    k[:, 0, 9], k[:, 1, 9], k[:, 0, 14] = float("nan"), float("inf"), float("-inf")
    chunked = ChunkedBackend(block_q=4, block_k=8).forward(make_call(q, k, v, **variant)).out
    reference = multihead.attention(q, k, v, backend="reference", **variant)
    assert reference[:, :, :3].isfinite().all() and reference.isnan().any()  # rows 0-2 see none of keys 9, 14
    torch.testing.assert_close(chunked, reference, equal_nan=True, rtol=0, atol=1e-12)


def test_sinks_weights_sum_to_less_than_one_and_lse_holds_the_sink():
    q, k, v = make_qkv(1, H, H, 9, 9, D, dtype=torch.float64)
    sinks = torch.tensor([0.0, 2.0, -3.0, 10.0], dtype=torch.float64)
    weights = multihead.attention_weights(q, k, v, sinks=sinks, causal=True)
    assert (weights.sum(-1) < 1).all()
    plain_lse = multihead.attention(q, k, v, causal=True, return_lse=True).lse
    lse = multihead.attention(q, k, v, causal=True, sinks=sinks, return_lse=True).lse
    assert max_err(lse, torch.logaddexp(plain_lse, sinks.view(1, H, 1))) < 1e-12
    assert weights[0, 3].sum(-1).max() < 1e-2  # a sink of 10 takes nearly all of the weight


def test_a_row_with_no_key_but_a_sink_gives_zero():
    q, k, v = make_qkv(1, H, H, 6, 6, D, dtype=torch.float64)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 0, 0, 0]])
    out, lse = multihead.attention(q, k, v, documents=ids, sinks=torch.zeros(H, dtype=torch.float64),
                                   return_lse=True)
    assert out[:, :, 3:].abs().max() == 0
    assert (lse[:, :, 3:] == 0).all()  # log(exp(sink)) with sink 0


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu_flash"])
def test_a_row_with_no_key_and_a_sink_of_minus_inf_gives_zero(backend):
    """Once failed: a -inf sink (no sink, for that head) on a row with no key gave NaN in the output, the
    weights and every gradient (exp(-inf - -inf)); such a row is a row with no key: output 0, lse -inf."""
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, H, H, 4, 2, D, dtype=torch.float64))
    sinks = torch.tensor([float("-inf"), 0.5, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    out, lse = multihead.attention(q, k, v, window=(0, 0), sinks=sinks, backend=backend, return_lse=True)
    assert torch.equal(out[0, 0, :2], torch.zeros_like(out[0, 0, :2]))  # T=4 > S=2: rows 0, 1 see no key
    assert (lse[0, 0, :2] == float("-inf")).all() and torch.isfinite(lse[0, 1:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, sinks))
    weights = multihead.attention_weights(q, k, v, window=(0, 0), sinks=sinks)
    assert torch.equal(weights[0, 0, :2], torch.zeros_like(weights[0, 0, :2]))


@settings(max_examples=20, deadline=None)
@given(T=st.integers(2, 40), left=st.integers(0, 6), which=st.sampled_from(["window", "documents"]),
       seed=st.integers(0, 2**16))
def test_a_key_it_cannot_see_changes_nothing(T, left, which, seed):
    """Change every key and value a query may not see: its output stays the same (chunked and reference)."""
    q, k, v = make_qkv(1, 2, 2, T, T, 8, dtype=torch.float64, seed=seed)
    ids = (torch.arange(T) * 3 // T)[None]  # three documents
    variant = dict(window=(left, 0)) if which == "window" else dict(documents=ids)
    row = T - 1
    allowed = oracle(q, k, v, **variant)[2][0, 0, row] > 0  # (S,)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, ~allowed] += 5.0
    v2[:, :, ~allowed] -= 7.0
    for backend in ("reference", ChunkedBackend(block_q=4, block_k=4)):
        runs = []
        for keys, values in ((k, v), (k2, v2)):
            call = make_call(q, keys, values, **variant)
            runs.append(multihead.attention(q, keys, values, backend="reference", **variant)
                        if backend == "reference" else backend.forward(call).out)
        assert max_err(runs[0][..., row, :], runs[1][..., row, :]) < 1e-12


def test_tiles_the_window_and_documents_rule_out_are_skipped():
    x = torch.zeros(1, 1, 1024, 8)
    plain = visited_tiles(make_call(x, x, x), block_q=64, block_k=64)
    causal = visited_tiles(make_call(x, x, x, causal=True), block_q=64, block_k=64)
    window = visited_tiles(make_call(x, x, x, window=(64, 0)), block_q=64, block_k=64)
    documents = visited_tiles(make_call(x, x, x, documents=(torch.arange(1024) // 128)[None]), block_q=64, block_k=64)
    assert plain == 16 * 16
    assert causal == 16 * 17 // 2
    assert window == 16 + 15  # the diagonal tile and the one before it
    assert documents == 8 * 4  # eight documents of 2 x 2 tiles


@pytest.mark.parametrize("keywords, message", [
    (dict(window=5), r"window must be \(left, right\)"),
    (dict(window=(-1, 0)), r"window's left must be an int >= 0 \(at most 2\*\*62\) or None"),
    (dict(window=(0, 2 ** 63)), "window's right .* got 9223372036854775808"),  # once: wrong rows, or OverflowError
    (dict(window=(2, 1.5)), "window's right"),
    (dict(softcap=0.0), "softcap must be a finite number > 0"),
    (dict(softcap=float("inf")), "softcap must be a finite number > 0"),
    (dict(softcap="5"), "softcap must be a finite number > 0 or None, got str '5'"),
    (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must be \(H,\) = \(4,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.long)), "alibi_slopes must be floating"),
    (dict(sinks=torch.ones(2)), r"sinks must be \(H,\) = \(4,\)"),
    (dict(sinks=[0.0] * 4), "sinks must be a floating torch.Tensor"),
    (dict(documents=torch.zeros(2, 5)), "documents: the query ids must be an integer tensor"),
    (dict(documents=torch.zeros(2, 4, dtype=torch.long)), r"documents: the query ids must be \(B, T\)"),
    (dict(score_mod="bias"), "score_mod must be a callable"),
    (dict(score_mod=lambda score, b, h: score), r"score_mod must take five arguments .*\(score, b, h\)"),
    (dict(score_mod=lambda s, b, h, i, j, table: s), "score_mod must take five arguments .*'table'"),
    (dict(score_mod=lambda s, b, h, i, j: s > 0), "score_mod must return floating scores .* got torch.bool"),
    (dict(score_mod=lambda s, b, h, i, j: s.to(torch.complex64)), "floating scores .* got torch.complex64"),
])
def test_bad_variants_are_refused_naming_them(keywords, message):
    q, k, v = make_qkv(B, H, G, 5, 5, D)
    with pytest.raises((TypeError, ValueError), match=message):
        multihead.attention(q, k, v, **keywords)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cpu_flash"])
@pytest.mark.parametrize("q_dtype, slopes_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_alibi_slopes_of_another_dtype_than_q_on_the_fused_kernels(backend, q_dtype, slopes_dtype):
    """Once failed: the fused kernels' ALiBi bias took the slopes' dtype; a float32 bias with float64 q came
    back off by 2 from torch's op (T=16), a float64 bias with float32 q raised torch's own dtype error."""
    q, k, v = make_qkv(1, H, H, 16, 16, D, dtype=q_dtype)
    slopes = multihead.core.variants.alibi_slopes(H).to(slopes_dtype)
    want = multihead.attention(q, k, v, alibi_slopes=slopes, backend="reference")
    got = multihead.attention(q, k, v, alibi_slopes=slopes, backend=backend)  # no causal mask to cast it
    assert max_err(got, want) < (1e-12 if q_dtype == torch.float64 else 1e-5)


def test_numpy_scalars_are_taken_as_window_sides_and_softcap():
    q, k, v = make_qkv(1, H, H, 6, 6, D, dtype=torch.float64)
    got = multihead.attention(q, k, v, window=(np.int64(2), 0), softcap=np.float32(3.0))
    assert max_err(got, multihead.attention(q, k, v, window=(2, 0), softcap=3.0)) == 0


def test_one_documents_tensor_needs_as_many_queries_as_keys():
    q, k, v = make_qkv(B, H, G, 3, 5, D)
    with pytest.raises(ValueError, match=r"one \(B, T\) tensor needs T == S, got T=3, S=5"):
        multihead.attention(q, k, v, documents=torch.zeros(B, 3, dtype=torch.long))


def test_a_score_mod_that_changes_the_shape_is_refused():
    q, k, v = make_qkv(B, H, G, 5, 5, D)
    with pytest.raises(ValueError, match="score_mod must return a tensor of the score's shape"):
        multihead.attention(q, k, v, score_mod=lambda s, b, h, i, j: s.sum(-1), backend="reference")


def test_which_backend_says_why_the_fused_kernels_cannot():
    q, k, v = make_qkv(B, H, G, 5, 5, D)
    report = str(multihead.which_backend(q, k, v, softcap=30.0))
    assert "softcap is not a mask" in report
    assert "-> chunked" in report
    assert "-> sdpa" in str(multihead.which_backend(q, k, v, window=(2, 0)))


def test_a_softcap_that_is_not_a_number_is_a_type_error():
    q, k, v = make_qkv(B, H, G, 5, 5, D)
    with pytest.raises(TypeError, match="softcap must be a finite number > 0 or None, got str '5'"):
        multihead.attention(q, k, v, softcap="5")


def test_a_row_a_score_mod_rules_out_entirely_gives_zero_on_every_path():
    """A score_mod may mask (return -inf): a row it leaves with no key gives output 0 and weights 0, as any."""
    q, k, v = make_qkv(1, 2, 2, 3, 3, 4)

    def first_row_sees_nothing(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx == 0, torch.full_like(score, float("-inf")), score)

    for backend in ("reference", "chunked"):
        out = multihead.attention(q, k, v, score_mod=first_row_sees_nothing, backend=backend)
        assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])), backend
        assert torch.isfinite(out).all(), backend
    weights = multihead.attention_weights(q, k, v, score_mod=first_row_sees_nothing)
    assert torch.equal(weights[:, :, 0], torch.zeros_like(weights[:, :, 0]))
    assert torch.allclose(weights[:, :, 1:].sum(-1), torch.ones(1, 2, 2))
