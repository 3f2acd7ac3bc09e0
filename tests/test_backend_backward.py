"""The optional backward from a given logsumexp, on every backend that has one (docs/design.md, the contract).

backward(call, dO, out, lse) recomputes P = exp(scale·q·kᵀ + mask - lse) and
applies flash-attention's backward. Given the call's own out and lse it must
equal autograd of attention_ref in float64 under the 3x rule; given the out
and lse merged from several blocks of keys (what ring attention does), the
blocks' gradients must add up to the full gradient. Triton runs in its
interpreter, fp32, at small sizes (as in tests/test_triton.py).
"""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead import backends, masks
from multihead.backends import triton as tb
from multihead.core.call import make_call
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR, make_qkv, max_err
from multihead.backends.reference import attention_ref
from multihead.core.call import Gradients

WITH_BACKWARD = [name for name in backends.names() if hasattr(backends.get(name), "backward")]


@pytest.fixture(params=WITH_BACKWARD)
def backend(request, monkeypatch):
    """Each backend with a backward; triton in its interpreter (set for this test only)."""
    if request.param == "triton":
        if not tb.triton_installed():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return backends.get(request.param)


def runnable(backend, call):
    """The call, or a skip saying why this backend does not take it (triton: dense masks, float64)."""
    reason = backend.supports(call, need_lse=True)
    if reason is not None:
        pytest.skip(f"{backend.name}: {reason}")
    return call


# ---- the golden gradients and the rule


def autograd_grads(q, k, v, grad_out, *, upcast, **call):
    """dq, dk, dv of attention_ref by autograd, computed in the inputs' dtype (or up-cast)."""
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = attention_ref(*inputs, upcast=upcast, **call).out
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def assert_gradients_match(got, q, k, v, grad_out, **call):
    """got (Gradients) against attention_ref's in float64, at most 3x the naive one's error in q's dtype + 1e-5."""
    golden = autograd_grads(q.double(), k.double(), v.double(), grad_out.double(), upcast=True, **call)
    naive = autograd_grads(q, k, v, grad_out, upcast=False, **call)
    for name, g, gg, ng, x in zip(("dq", "dk", "dv"), got, golden, naive, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, (name, g.shape, g.dtype, x.shape, x.dtype)
        assert torch.isfinite(g).all(), f"{name} has a NaN or inf"
        err, naive_err = max_err(g, gg), max_err(ng, gg)
        assert err <= GRAD_FACTOR * naive_err + ABS_SLACK, (
            f"{name} error {err:.3g} > {GRAD_FACTOR} x naive {naive_err:.3g} + {ABS_SLACK}")


def allowed_pairs(call) -> torch.Tensor:
    """(B, H, T, S) bool: which query may see which key under the call's mask and causal flag."""
    shape = (call.batch, call.heads, call.q_len, call.kv_len)
    seen = torch.ones(shape, dtype=torch.bool)
    if call.attn_mask is not None:
        seen = seen & masks.allowed(call.attn_mask)
    if call.causal:
        seen = seen & masks.causal_mask(call.q_len, call.kv_len)
    return seen


def assert_unseen_are_zero(got, call):
    """A row that sees no key of the call, and a key no row sees, get a gradient of exactly 0."""
    seen = allowed_pairs(call)  # (B, H, T, S)
    empty_rows = ~seen.any(dim=-1)  # (B, H, T)
    B, H, T, S = seen.shape
    unseen_keys = ~seen.reshape(B, call.kv_heads, H // call.kv_heads, T, S).any(dim=3).any(dim=2)  # (B, G, S)
    assert (got.dq[empty_rows] == 0).all()
    assert (got.dk[unseen_keys] == 0).all()
    assert (got.dv[unseen_keys] == 0).all()


# ---- standalone: the call's own out and lse give autograd's gradients


def padding_mask(lengths, S):
    return masks.key_mask_to_attn_mask(masks.lengths_to_key_mask(torch.tensor(lengths), S))  # (B, 1, 1, S)


def float_mask(H, T, S, seed):
    """ALiBi-like biases with scattered -inf and one whole row of -inf: (1, H, T, S)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.randn(1, H, T, S, generator=gen)
    mask[torch.rand(1, H, T, S, generator=gen) > 0.7] = float("-inf")
    mask[:, :, 4] = float("-inf")
    return mask


# name: (B, H, G, T, S, D, Dv, call arguments)
STANDALONE = {
    "plain": (2, 4, 2, 17, 33, 16, 16, {}),
    "causal T<S": (2, 4, 2, 17, 33, 16, 16, {"causal": True}),
    "causal T>S": (2, 4, 2, 33, 17, 16, 16, {"causal": True}),  # the first 16 rows see no key
    "key padding": (2, 4, 2, 17, 33, 16, 16, {"attn_mask": padding_mask([20, 0], 33)}),  # sequence 1 sees nothing
    "key padding causal": (2, 4, 2, 17, 33, 16, 16, {"attn_mask": padding_mask([33, 9], 33), "causal": True}),
    "float mask": (2, 4, 2, 17, 33, 16, 16, {"attn_mask": float_mask(4, 17, 33, seed=1)}),
    "multi-query": (2, 4, 1, 17, 33, 16, 16, {"causal": True}),
    "multi-head": (1, 4, 4, 17, 33, 16, 16, {}),
    "Dv != D": (2, 4, 2, 17, 33, 16, 24, {"causal": True}),
    "scale": (1, 4, 2, 17, 33, 16, 16, {"scale": 0.7}),
}


def standalone(backend, case, dtype=torch.float32):
    """(call, dO, the backend's gradients from the call's own out and lse)."""
    B, H, G, T, S, D, Dv, kwargs = STANDALONE[case]
    q, k, v = make_qkv(B, H, G, T, S, D, Dv, dtype=dtype, seed=T + S + D + Dv + H + G)
    call = runnable(backend, make_call(q, k, v, **kwargs))
    with torch.no_grad():
        out, lse = backend.forward(call, need_lse=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    return call, grad_out, backend.backward(call, grad_out, out, lse)


# triton runs each case in its interpreter (slow): not the two whose kernel path another case takes as well,
# "plain" (non-causal, no mask: "scale" and "multi-head") and "causal T<S" ("Dv != D" and "multi-query")
TRITON_SAME_PATH = ("plain", "causal T<S")
STANDALONE_RUNS = [(name, case) for name in WITH_BACKWARD for case in STANDALONE
                   if not (name == "triton" and case in TRITON_SAME_PATH)]


@pytest.mark.parametrize("backend,case", STANDALONE_RUNS, indirect=["backend"])
def test_standalone_equals_autograd(backend, case):
    call, grad_out, got = standalone(backend, case)
    kwargs = STANDALONE[case][-1]
    assert_gradients_match(got, call.q, call.k, call.v, grad_out, **kwargs)
    assert_unseen_are_zero(got, call)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_standalone_other_dtypes(backend, dtype):
    """Gradients in each input's dtype, under the rule measured in that dtype."""
    call, grad_out, got = standalone(backend, "causal T>S", dtype)
    assert_gradients_match(got, call.q, call.k, call.v, grad_out, causal=True)


def test_a_strided_call(backend):
    """Inputs and gradients whose last dim is not contiguous read the same as dense ones."""
    q, k, v = make_qkv(1, 4, 2, 17, 33, 16, seed=3)
    q, k, v = (x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (q, k, v))  # same values, strided
    call = runnable(backend, make_call(q, k, v, causal=True))
    with torch.no_grad():
        out, lse = backend.forward(call, need_lse=True)
    grad_out = torch.randn(out.shape[:-1] + (out.shape[-1] * 2,), generator=torch.Generator().manual_seed(1))[..., ::2]
    got = backend.backward(call, grad_out, out, lse)
    assert_gradients_match(got, q, k, v, grad_out, causal=True)


# ---- the ring: blocks of keys, one merged (out, lse), gradients that add up


def merge(parts):
    """The blocks' (out_i, lse_i) merged by logsumexp into the whole attention's (out, lse)."""
    lses = torch.stack([part.lse.double() for part in parts])  # (n, B, H, T)
    lse = torch.logsumexp(lses, dim=0)  # (B, H, T), -inf for a row with no key in any block
    weights = torch.where(lse == float("-inf"), 0.0, (lses - lse).exp())  # (n, B, H, T)
    out = sum(w.unsqueeze(-1) * part.out.double() for w, part in zip(weights, parts))  # (B, H, T, Dv)
    return out.to(parts[0].out.dtype), lse.to(parts[0].lse.dtype)


def block_mask(attn_mask, causal, T, S, s0, s1):
    """The keys [s0, s1) of a call's masks, the causal part made explicit from positions."""
    causal_part = masks.causal_mask(T, S)[:, s0:s1] if causal else None  # (T, s)
    return masks.combine(None if attn_mask is None else attn_mask[..., s0:s1], causal_part)


def holes_mask(B, T, S, first_block_end, seed):
    """(B, 1, T, S) bool, True = may attend: random holes, row 3 sees no key, row 5 only keys < first_block_end."""
    mask = torch.rand(B, 1, T, S, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, :, 3] = False
    mask[:, :, 5, first_block_end:] = False
    return mask


# name: (B, H, G, T, S, D, key blocks, attn_mask, causal)
RING = {
    "causal with holes": (2, 4, 2, 17, 33, 16, [(0, 11), (11, 22), (22, 33)], holes_mask(2, 17, 33, 11, 2), True),
    "causal T>S": (2, 4, 2, 33, 17, 16, [(0, 9), (9, 17)], None, True),
    "float mask, multi-query": (2, 4, 1, 17, 33, 16, [(0, 16), (16, 33)], float_mask(4, 17, 33, seed=4), False),
    # sequence 1 has keys in the first block only, sequence 2 none at all
    "key padding": (3, 4, 2, 17, 33, 16, [(0, 11), (11, 22), (22, 33)], padding_mask([33, 9, 0], 33), False),
}


@pytest.mark.parametrize("case", list(RING))
def test_ring_blocks_add_up_to_the_full_gradient(backend, case):
    B, H, G, T, S, D, blocks, attn_mask, causal = RING[case]
    q, k, v = make_qkv(B, H, G, T, S, D, seed=S + len(blocks))
    calls = [runnable(backend, make_call(q, k[:, :, s0:s1], v[:, :, s0:s1],
                                         attn_mask=block_mask(attn_mask, causal, T, S, s0, s1)))
             for s0, s1 in blocks]
    with torch.no_grad():
        out, lse = merge([backend.forward(call, need_lse=True) for call in calls])
    golden_out = attention_ref(q.double(), k.double(), v.double(), attn_mask=attn_mask, causal=causal).out
    naive_out = attention_ref(q, k, v, attn_mask=attn_mask, causal=causal, upcast=False).out
    assert max_err(out, golden_out) <= OUT_FACTOR * max_err(naive_out, golden_out) + ABS_SLACK  # the merge is right

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    parts = [backend.backward(call, grad_out, out, lse) for call in calls]
    for part, call in zip(parts, calls):
        assert_unseen_are_zero(part, call)  # rows with keys only in other blocks get exactly 0 here
    got = Gradients(sum(part.dq for part in parts),
                       torch.cat([part.dk for part in parts], dim=2),  # (B, G, S, D)
                       torch.cat([part.dv for part in parts], dim=2))  # (B, G, S, Dv)
    assert_gradients_match(got, q, k, v, grad_out, attn_mask=attn_mask, causal=causal)
    assert_unseen_are_zero(got, make_call(q, k, v, attn_mask=attn_mask, causal=causal))


def test_a_row_with_no_key_anywhere_gives_zero_even_where_the_block_attends_it(backend):
    """lse = -inf says the row has no key at all: it contributes exactly 0, never NaN, whatever the block holds."""
    q, k, v = make_qkv(1, 4, 2, 17, 33, 16, seed=11)
    call = runnable(backend, make_call(q, k, v))
    with torch.no_grad():
        out, lse = backend.forward(call, need_lse=True)
    lse, out = lse.clone(), out.clone()
    lse[:, :, 2] = float("-inf")
    out[:, :, 2] = 0.0
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = backend.backward(call, grad_out, out, lse)
    assert all(torch.isfinite(g).all() for g in got)
    assert (got.dq[:, :, 2] == 0).all()
    # the other rows' gradients are those of the attention without row 2
    reference = backends.get("reference").backward(call, grad_out, out, lse)
    grad_out_without = grad_out.clone()
    grad_out_without[:, :, 2] = 0.0
    full = backends.get("reference").backward(call, grad_out_without, *backends.get("reference").forward(
        call, need_lse=True))
    for name, g, r, f in zip("qkv", got, reference, full):
        assert max_err(g, r) <= 1e-4, name
        assert max_err(r, f) <= 1e-5, name


# ---- checks of the arguments


def test_bad_arguments_are_named(backend):
    q, k, v = make_qkv(2, 4, 2, 5, 7, 16)
    call = runnable(backend, make_call(q, k, v))
    out = torch.zeros(2, 4, 5, 16)
    lse = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match=r"grad_out must be \(B, H, T, Dv\) = \(2, 4, 5, 16\).*got \(2, 4, 16, 5\)"):
        backend.backward(call, out.transpose(-1, -2), out, lse)
    with pytest.raises(ValueError, match=r"lse must be \(B, H, T\)"):
        backend.backward(call, out, out, lse[..., None])
    with pytest.raises(TypeError, match="lse must be float32.*got torch.float16"):
        backend.backward(call, out, out, lse.half())
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        backend.backward(call, out, None, lse)


# ---- the registry


def test_which_backends_have_a_backward():
    assert sorted(WITH_BACKWARD) == ["chunked", "cpu_flash", "reference", "triton"]
    assert not hasattr(backends.get("sdpa"), "backward")


def test_auto_picks_a_backend_with_a_backward():
    q, k, v = make_qkv(1, 4, 2, 5, 7, 16)
    call = make_call(q, k, v, causal=True)
    assert backends.dispatch(call).name == "sdpa"  # unchanged without need_backward
    assert backends.dispatch(call, need_backward=True).name == "cpu_flash"
    q, k, v = make_qkv(1, 4, 2, 5, 7, 16, Dv=8)
    assert backends.dispatch(make_call(q, k, v), need_backward=True).name == "chunked"  # cpu_flash needs D == Dv
    assert backends.dispatch(make_call(q, k, v), "reference", need_backward=True).name == "reference"


def test_sdpa_is_refused_by_name_and_explained():
    q, k, v = make_qkv(1, 4, 2, 5, 7, 16)
    call = make_call(q, k, v)
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this call: has no backward from a given logsumexp"):
        backends.dispatch(call, "sdpa", need_backward=True)
    with pytest.raises(ValueError, match="has no backward from a given logsumexp"):
        backends.survey(call, "sdpa", need_backward=True)
    report = backends.survey(call, need_backward=True)
    assert report.need_backward and report.chosen == "cpu_flash"
    assert report.reasons["sdpa"] == "has no backward from a given logsumexp"
    text = str(report)
    assert text.splitlines()[0] == "backend='auto' (backward from the logsumexp) -> cpu_flash"
    assert "sdpa       cannot: has no backward from a given logsumexp" in text
    assert "(backward from the logsumexp)" not in str(backends.survey(call, need_lse=True))


def test_dropout_is_refused_by_every_backend():
    q, k, v = make_qkv(1, 4, 2, 5, 7, 16)
    call = make_call(q, k, v, dropout_p=0.1)
    assert backends.dispatch(call).name == "sdpa"  # a forward with dropout is fine
    with pytest.raises(ValueError, match="no backend supports this call") as refused:
        backends.dispatch(call, need_backward=True)
    lines = str(refused.value).splitlines()[1:]
    assert len(lines) == len(backends.names()) and all("dropout" in line for line in lines)
    for name in backends.names():
        with pytest.raises(ValueError, match="dropout"):
            backends.dispatch(call, name, need_backward=True)


def test_the_backward_itself_refuses_dropout(backend):
    q, k, v = make_qkv(1, 4, 2, 5, 7, 16)
    call = make_call(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p=0.1: a backward from a given logsumexp takes no dropout"):
        backend.backward(call, torch.zeros(1, 4, 5, 16), torch.zeros(1, 4, 5, 16), torch.zeros(1, 4, 5))


def test_need_backward_asks_supports_for_the_lse():
    """A backend with a backward that cannot give the lse is passed over: its backward reads the lse's rule."""

    class NoLse:
        name, priority, summary = "no_lse", 100, "a test backend with no logsumexp"

        def supports(self, call, *, need_lse=False):
            return "gives no logsumexp" if need_lse else None

        def forward(self, call, *, need_lse=False):
            raise AssertionError("not called")

        def backward(self, call, grad_out, out, lse):
            raise AssertionError("not called")

    q, k, v = make_qkv(1, 4, 2, 5, 7, 16)
    call = make_call(q, k, v)
    backends.register(NoLse())
    try:
        assert backends.dispatch(call).name == "no_lse"
        assert backends.dispatch(call, need_backward=True).name == "cpu_flash"
        assert backends.survey(call, need_backward=True).reasons["no_lse"] == "gives no logsumexp"
    finally:
        backends.unregister("no_lse")


def test_a_float_mask_that_needs_its_gradient_is_refused_by_every_backward():
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
    bias = torch.zeros(1, 1, 5, 7, requires_grad=True)
    call = make_call(q, k, v, attn_mask=bias)
    with pytest.raises(ValueError, match="no mask gradient"):
        backends.dispatch(call, "reference", need_lse=True, need_backward=True)
    with pytest.raises(ValueError, match="no backend supports"):
        backends.dispatch(call, "auto", need_lse=True, need_backward=True)
