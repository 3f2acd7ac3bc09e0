"""MultiHeadAttention's and MultiHeadLatentAttention's argument checks: a wrong argument is an error naming it.

A test whose docstring starts "Once failed" failed before its fix, and says what was wrong.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from multihead import MultiHeadAttention, MultiHeadLatentAttention

C, H = 16, 4


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


def test_inputs_of_another_dtype_than_the_parameters_say_so():
    mha = MultiHeadAttention(16, 4)
    with pytest.raises(TypeError, match=r"query has dtype torch.float64 but the module's parameters are torch.float32"):
        mha(torch.randn(2, 3, 16, dtype=torch.float64))
    mla = MultiHeadLatentAttention(32, 4, head_dim=8, rope_dim=4, kv_latent_dim=12)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        mla(torch.randn(2, 3, 32, dtype=torch.float64))


def test_complex_module_error_names_the_dtype():
    """Once failed (module.py:301, AttentionCall built directly, make_call's dtype check skipped): a module
    converted to complex64 (nn.Module.to accepts complex dtypes) failed deep inside a backend with
    "NotImplementedError: softmax_lastdim_kernel_impl not implemented for 'ComplexFloat'" (or "max_values_cpu",
    or a flash-kernel message, depending on the backend), while the same call with need_weights=True still gave
    multihead's clear TypeError "q must be float16, bfloat16, float32 or float64, got torch.complex64". The
    error depended on need_weights and named no argument.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MultiHeadAttention(C, H).to(torch.complex64).eval()
    x = torch.randn(1, 2, C, dtype=torch.complex64)
    with torch.no_grad():
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            m(x, need_weights=True)
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            m(x)


def test_integer_input_error_does_not_suggest_an_impossible_cast():
    """Once failed (error clarity, _checks.py:64-66): an integer (e.g. token ids) or bool query gave "query has
    dtype torch.int64 but the module's parameters are torch.float32; cast the input or the module
    (module.to(torch.int64))" — but nn.Module.to(torch.int64) itself raises "nn.Module.to only accepts floating
    point or complex dtypes". The advice should only offer the module cast for floating dtypes.
    """
    m = MultiHeadAttention(C, H)
    with pytest.raises(TypeError, match="query") as error:
        m(torch.ones(1, 2, C, dtype=torch.long))
    assert "module.to(torch.int64)" not in str(error.value)


def test_key_width_error_says_key_defaulted_to_the_query():
    """Once failed (error clarity, module.py:257-258): with kdim != d_model and no key passed, the error read
    "key has width 16, kdim=8 expected, got (1, 2, 16)" — about a `key` the caller never passed. It should say
    that key defaulted to the query (and that cross-attention needs key=).
    """
    m = MultiHeadAttention(C, H, kdim=8, vdim=8)
    with pytest.raises(ValueError) as error:
        m(torch.randn(1, 2, C))
    message = str(error.value)
    assert "kdim" in message and ("query" in message or "default" in message)
