"""attention(): argument checks, dispatch and its explanation."""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead import backends
from multihead.backends.chunked import ChunkedBackend
from conftest import chunked, make_qkv, max_err
from multihead.backends.reference import attention_ref
from multihead.core.call import make_call
from multihead.ops.run import run


def qkv(**kw):
    return make_qkv(2, 4, 2, 5, 7, 8, **kw)


# ---- bad input: one clear error naming the argument, the expectation, what came


@pytest.mark.parametrize("which,bad,message", [
    ("q", torch.randn(4, 5, 8), r"q has 3 dims, \(B, H, T, D\) expected, got \(4, 5, 8\)"),
    ("k", torch.randn(2, 2, 7), r"k has 3 dims, \(B, G, S, D\) expected"),
    ("v", torch.randn(1, 2, 2, 7, 8), r"v has 5 dims"),
    ("k", torch.randn(3, 2, 7, 8), r"batch sizes differ"),
    ("v", torch.randn(2, 2, 6, 8), r"must agree on G and S"),
    ("k", torch.randn(2, 2, 7, 9), r"same head dim D"),
    ("k", torch.randn(2, 3, 7, 8), r"H=4 must be a multiple of key/value heads G=3"),
])
def test_bad_shapes(which, bad, message):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    if which == "k" and bad.shape[1] == 3:  # v must follow k's G to reach the GQA check
        args["v"] = torch.randn(2, 3, 7, 8)
    args[which] = bad
    with pytest.raises(ValueError, match=message):
        mh.attention(args["q"], args["k"], args["v"])


def test_bad_types_and_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        mh.attention(q.numpy(), k, v)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got torch.int64"):
        mh.attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="k has dtype torch.float64 but q has torch.float32"):
        mh.attention(q, k.double(), v)
    with pytest.raises(TypeError, match="v has dtype torch.float16"):
        mh.attention(q, k, v.half())


def test_device_mismatch():
    q, k, v = qkv()
    meta = k.to("meta")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        mh.attention(q, meta, v)
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        mh.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("mask,error,message", [
    (torch.ones(5, 7, dtype=torch.int64), TypeError, "attn_mask must be bool .* or floating .*, got torch.int64"),
    (torch.ones(5, 6, dtype=torch.bool), ValueError, r"does not broadcast to \(B, H, T, S\) = \(2, 4, 5, 7\)"),
    (torch.ones(2, 5, 7, dtype=torch.bool), ValueError, r"attn_mask has 3 dims, .* mask\[:, None\]"),
    (torch.ones(3, 1, 5, 7, dtype=torch.bool), ValueError, "does not broadcast"),
    (torch.ones(1, 1, 5, 1, dtype=torch.bool), ValueError, "last dim must be S=7"),
    ([[True]], TypeError, "attn_mask must be a torch.Tensor or None, got list"),
])
def test_bad_masks(mask, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        mh.attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_dropout(p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        mh.attention(q, k, v, dropout_p=p)


def test_bad_scale_and_causal():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        mh.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="causal must be a bool"):
        mh.attention(q, k, v, causal=1)


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['sdpa', 'triton', 'cpu_flash', 'chunked', 'reference'\], got 'flash'"):
        mh.attention(q, k, v, backend="flash")
    with pytest.raises(TypeError, match="backend must be a str"):
        mh.attention(q, k, v, backend=None)


def test_named_backend_that_cannot_run_the_call_says_why():
    q, k, v = qkv()
    learnable_bias = torch.zeros(5, 7, requires_grad=True)
    with pytest.raises(ValueError, match="backend='chunked' cannot run this call: a float mask that requires grad"):
        mh.attention(q, k, v, attn_mask=learnable_bias, backend="chunked")
    # auto moves on to one that can, and the gradient reaches the bias
    out = mh.attention(q, k, v, attn_mask=learnable_bias)
    out.sum().backward()
    assert learnable_bias.grad is not None and learnable_bias.grad.abs().sum() > 0


def test_the_chunked_backend_checks_its_block_sizes():
    with pytest.raises(ValueError, match="block_k must be positive, got 0"):
        ChunkedBackend(block_k=0)
    with pytest.raises(TypeError, match="block_q must be an int, got float 2.0"):
        ChunkedBackend(block_q=2.0)


# ---- dispatch


def test_auto_picks_the_fastest_supporting_backend_and_explains_the_rest():
    q, k, v = qkv()
    report = mh.which_backend(q, k, v, causal=True)
    assert report.chosen == "sdpa" and report.requested == "auto"
    assert list(report.reasons) == ["sdpa", "triton", "cpu_flash", "chunked", "reference"]
    assert report.reasons["triton"] is not None  # a CPU tensor: triton runs here only in its interpreter
    text = str(report)
    assert "sdpa       runs" in text and "chunked    supports the call, but sdpa comes first" in text

    report = mh.which_backend(q, k, v, backend="chunked")
    assert report.chosen == "chunked" and "was not requested" in str(report)


class _Picky:
    """A fake fast backend that refuses masked calls, to watch auto fall back."""

    name = "picky"
    priority = 100
    summary = "test double"

    def supports(self, call, *, need_lse=False):
        return "masks are not implemented" if call.attn_mask is not None else None

    def forward(self, call, *, need_lse=False):
        return backends.get("reference").forward(call, need_lse=need_lse)


def test_auto_skips_a_backend_that_refuses_and_says_why():
    backends.register(_Picky())
    try:
        q, k, v = qkv()
        assert mh.which_backend(q, k, v).chosen == "picky"
        report = mh.which_backend(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool))
        assert report.chosen == "sdpa"
        assert report.reasons["picky"] == "masks are not implemented"
        assert "picky      cannot: masks are not implemented" in str(report)
    finally:
        backends.unregister("picky")
    assert "picky" not in backends.names()


def test_zero_length_goes_to_a_backend_that_handles_it():
    q, k, v = make_qkv(1, 2, 2, 3, 0, 4)
    report = mh.which_backend(q, k, v)
    assert report.chosen == "chunked"
    assert "zero-length" in report.reasons["sdpa"]


def test_backends_agree_on_a_typical_call():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.3
    able = [name for name, reason in mh.which_backend(q, k, v, attn_mask=mask, causal=True).reasons.items()
            if reason is None]
    assert {"sdpa", "chunked", "reference"} <= set(able)
    outs = [mh.attention(q, k, v, attn_mask=mask, causal=True, backend=b) for b in able]
    for out in outs[1:]:
        assert torch.allclose(out, outs[0], atol=1e-6)


# ---- attention with weights: the eager path that returns (B, H, T, S)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_the_eager_pass_with_weights_equals_the_reference(grad, dtype, masked):
    q, k, v = make_qkv(2, 6, 2, 11, 13, 8, dtype=dtype, seed=4, requires_grad=grad)
    mask = None
    if masked:  # a float mask with -inf entries and one fully blocked row: weights 0, output 0
        keep = torch.rand(2, 1, 11, 13, generator=torch.Generator().manual_seed(0)) > 0.5
        keep[1, 0, 3] = False
        mask = torch.zeros(2, 1, 11, 13).masked_fill(~keep, float("-inf"))
    with torch.set_grad_enabled(grad):
        out, _, weights = run(make_call(q, k, v, attn_mask=mask, causal=True), need_weights=True)
    ref_out, ref_probs = attention_ref(q.double(), k.double(), v.double(), attn_mask=mask, causal=True)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert weights.dtype == dtype and weights.shape == (2, 6, 11, 13)
    assert max_err(weights, ref_probs) < tol and max_err(out, ref_out) < tol
    assert not torch.isnan(weights).any()
    if grad:
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref_grads = torch.autograd.grad(
            attention_ref(*ref_in, attn_mask=mask, causal=True).out.sum(), ref_in)
        for g, r in zip(grads, ref_grads):
            assert torch.isfinite(g).all() and max_err(g, r) < 10 * tol


def test_sdpa_refuses_a_float_mask_of_another_dtype_and_says_why():
    q, k, v = make_qkv(1, 2, 2, 3, 4, 8, dtype=torch.float16)
    report = mh.which_backend(q, k, v, attn_mask=torch.zeros(3, 4))
    assert "cast the mask to q's dtype" in report.reasons["sdpa"] and report.chosen == "chunked"
    assert mh.which_backend(q, k, v, attn_mask=torch.zeros(3, 4, dtype=torch.float16)).chosen == "sdpa"


def test_which_backend_checks_return_lse_and_float8_inputs_are_refused():
    q, k, v = make_qkv(1, 2, 2, 3, 5, 4)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        mh.which_backend(q, k, v, return_lse="no")
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"):
        mh.attention(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn))


@pytest.mark.parametrize("call, error, words", [
    (lambda q: mh.attention([[1.0]], q, q), TypeError, "q must be a torch.Tensor"),
    (lambda q: mh.attention(q.long(), q, q), TypeError, "q must be float16"),
    (lambda q: mh.attention(q, q, q.int()), TypeError, "v must be float16"),
    (lambda q: mh.attention(q, q.double(), q), TypeError, "k has dtype torch.float64 but q has"),
    (lambda q: mh.attention(q, q, q.to("meta")), ValueError, "v is on meta but q is on cpu"),
    (lambda q: mh.attention(q[0], q, q), ValueError, "q has 3 dims"),
    (lambda q: mh.attention(q, q[None], q.int()), ValueError, "k has 5 dims"),
    (lambda q: mh.attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.long)), TypeError,
     "attn_mask must be bool"),
    (lambda q: mh.attention(q, q, q, scale=float("nan")), ValueError, "scale must be a finite number"),
    (lambda q: mh.attention(q, q, q, scale=1e39), ValueError, "overflows the compute dtype"),
])
def test_argument_errors_name_the_argument_what_was_expected_and_what_came(call, error, words):
    """make_call's one-expression fast check still falls through to errors that name the argument, what was
    expected and what came (held up under an adversarial pass over the per-call fast paths)."""
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(error, match=words):
        call(q)
