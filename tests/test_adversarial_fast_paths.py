"""Adversarial tests of the per-call fast paths (direct AttentionCall, call_linear, the sdpa fast path).

Two groups, from an adversarial pass over the first version of these paths:

- test_found_*: each reproduced a defect of that version, most of them of a
  q/k/v layout in one shared storage that has since been removed
  (linear_call.py says why); the docstring says what was wrong. They pass
  now and stay as regression tests.
- test_guard_*: things that were attacked and held up; kept so that they
  stay that way.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import multihead
from multihead import MultiHeadAttention

C, H = 16, 4


def qkv(m: MultiHeadAttention):
    return (m.q_proj, m.k_proj, m.v_proj)


def by_hand(m: MultiHeadAttention, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√d)V with the module's own (or the given) parameters, in float64; G == H, no mask."""
    if params is None:  # read off each layer (named_parameters would drop a tied one)
        params = {f"{name}.{kind}": getattr(getattr(m, name), kind)
                  for name in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")}
    p = params
    cfg = m.config
    B, T, _ = x.shape
    D = cfg.head_dim

    def lin(name, inp):
        b = p.get(f"{name}.bias")
        return F.linear(inp.double(), p[f"{name}.weight"].double(), None if b is None else b.double())

    q, k, v = (lin(n, x).view(B, T, cfg.num_heads, D).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
    out = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1) @ v
    return lin("out_proj", out.transpose(1, 2).reshape(B, T, cfg.num_heads * D))


def reachable_tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor an object holds, through dicts, sequences and instance attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        items = []
    found = []
    for item in items:
        found += reachable_tensors(item, seen)
    return found


class _Outputs(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).output


# =====================================================================================
# DEFECTS (each fails today)
# =====================================================================================


def test_found_module_can_be_pickled_and_torch_saved_whole():
    """WAS A DEFECT (module.py:149): __init__ registers a *lambda* as load_state_dict post hook, so the
    module can no longer be pickled: pickle.dumps(m), torch.save(m, f) (whole-module checkpoints,
    and every model containing a MultiHeadAttention), and multiprocessing 'spawn' all raise
    "AttributeError: Can't pickle local object 'MultiHeadAttention.__init__.<locals>.<lambda>'".
    A plain nn.Module (and compat.MultiheadAttention) pickles fine.
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 2, C)
    restored = pickle.loads(pickle.dumps(m))
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(restored(x).output, m(x).output)
        assert torch.equal(loaded(x).output, m(x).output)


def test_found_share_memory_keeps_every_parameter_shared():
    """WAS A DEFECT (module.py:154-157, the _apply override): Module.share_memory() runs through _apply,
    which then *re-lays out* q/k/v with torch.cat into a fresh, private storage. After
    m.share_memory() only out_proj is in shared memory; q/k/v are not, so Hogwild-style training
    (torch.multiprocessing workers updating a shared model) silently trains private copies of
    q/k/v in each worker.
    """
    control = nn.Linear(C, C).share_memory()
    assert all(p.is_shared() for p in control.parameters())  # what torch guarantees
    m = MultiHeadAttention(C, H).share_memory()
    not_shared = [name for name, p in m.named_parameters() if not p.is_shared()]
    assert not_shared == []


def test_found_load_state_dict_under_inference_mode_keeps_trainable_parameters():
    """WAS A DEFECT (module.py:149 post hook -> fused_linear.py:59 torch.cat): loading a checkpoint inside
    torch.inference_mode() (common in serving code) re-lays out q/k/v with a torch.cat executed in
    inference mode, so q/k/v become *inference tensors*. torch's own load_state_dict copies in place
    and leaves normal tensors. Later training then fails with "Inference tensors cannot be saved
    for backward" as soon as the attention input requires grad. (Same for a no-op m.to('cpu') /
    m.float() under inference mode, which plain torch leaves untouched.)
    """
    control = nn.Linear(C, C)
    with torch.inference_mode():
        control.load_state_dict(nn.Linear(C, C).state_dict())
    assert not any(p.is_inference() for p in control.parameters())  # what torch does

    m = MultiHeadAttention(C, H)
    state = {k: v.clone() for k, v in MultiHeadAttention(C, H).state_dict().items()}
    with torch.inference_mode():
        m.load_state_dict(state)
    assert [n for n, p in m.named_parameters() if p.is_inference()] == []
    x = torch.randn(1, 2, C, requires_grad=True)  # e.g. the output of an embedding / previous layer
    m(x).output.sum().backward()
    assert x.grad is not None


def test_found_vmap_model_ensembling_over_functional_call():
    """WAS A DEFECT (fused_linear.py:91-93 and :161, Stacked.get/_stacked call data_ptr()): torch.func's
    model-ensembling recipe (stack_module_state + vmap(functional_call), the official tutorial)
    raises "RuntimeError: Cannot access data pointer of Tensor that doesn't have storage", because
    the stacked path is tried on functorch's batched wrapper tensors. The same happens for
    torch.func.grad(..., argnums=<input>) over functional_call with plain parameter tensors.
    Before the change the layers were simply called.
    """
    torch.manual_seed(0)
    models = [MultiHeadAttention(C, H).eval() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(1, 2, C)

    def run(p, b, inp):
        return torch.func.functional_call(base, (p, b), (inp,)).output

    with torch.no_grad():
        out = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
        for i, model in enumerate(models):
            assert (out[i] - model(x).output).abs().max() < 1e-5


def test_found_forward_mode_ad_tangents_of_the_projections_are_not_dropped():
    """WAS A DEFECT (fused_linear.py:88-94 + :167 `first.detach().as_strided`): forward-mode AD through
    functional_call with dual parameters. Dual tensors do not `requires_grad`, so Stacked.get takes
    the stacked path even in grad mode; the duals made from the module's own (adjacent) storage
    pass the adjacency test, and the view is built with .detach(), which strips the tangents.
    The JVP of q w.r.t. W^Q comes out silently ZERO instead of x @ dW^Qᵀ.
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()

    class Project(nn.Module):  # the public project() stage, as a module for functional_call
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.project(x, x, x)[0]  # q (B, H, T, D)

    wrapper = Project(m)
    x = torch.randn(1, 2, C)  # 2 rows: the CPU stacks
    tangent_q = torch.randn(C, C)
    with fwAD.dual_level():
        duals = {}
        for name, p in wrapper.named_parameters():
            tangent = tangent_q if name == "inner.q_proj.weight" else torch.zeros_like(p)
            duals[name] = fwAD.make_dual(p.detach(), tangent)
        q = torch.func.functional_call(wrapper, duals, (x,))
        jvp = fwAD.unpack_dual(q).tangent
    expected = F.linear(x, tangent_q).view(1, 2, H, C // H).transpose(1, 2)
    assert jvp is not None
    assert (jvp - expected).abs().max() < 1e-5


def test_found_jit_trace_with_a_stacking_row_count():
    """WAS A DEFECT (fused_linear.py:81, no torch.jit.is_tracing() guard): torch.jit.trace of the module
    fails its own sanity check ("Tracing failed sanity checks! Graphs differed across invocations")
    for any input with 1-3 or >= 16 rows: the check re-runs the trace under no_grad, where the
    stacked path is taken (and on the first no_grad call the view is built, on the second it is
    reused), so the two traces record different graphs. The existing trace test only uses 10 rows,
    a count that never stacks on the CPU. Tracing in eval under no_grad fails the same way.
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(2, 8, C)  # 16 rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_Outputs(m), (x,))
    other = torch.randn(2, 8, C)
    with torch.no_grad():
        assert (traced(other) - m(other).output).abs().max() < 1e-6


def test_found_a_traced_module_does_not_bake_the_projection_weights_in():
    """WAS A DEFECT (same root as the previous one, fused_linear.py:81/:167; silent): a module that has
    already run once under no_grad (a warm-up/eval call) and is then traced under no_grad records
    the cached stacked view as `prim::Constant[value=<Tensor>]` — W^Q, W^K, W^V and their biases
    become constants of the graph instead of reads of the parameters. In-process the constant
    aliases the parameters, but after torch.jit.save / torch.jit.load the constant is a separate
    copy: load_state_dict on the loaded trace updates the parameters, the graph keeps computing
    with the OLD q/k/v weights (out_proj, read as a parameter, is updated) — silently wrong.
    (check_trace=False only to get past the sanity-check failure of the previous test.)
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(2, 8, C)  # 16 rows
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x)  # warm-up: the stacked view is built and cached
        traced = torch.jit.trace(_Outputs(m), (x,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    new = MultiHeadAttention(C, H).eval()
    loaded.load_state_dict({"inner." + k: v for k, v in new.state_dict().items()})
    with torch.no_grad():
        assert (loaded(x) - new(x).output).abs().max() < 1e-5


def test_found_complex_module_error_names_the_dtype():
    """WAS A DEFECT (module.py:301, AttentionCall built directly, make_call's dtype check skipped):
    a module converted to complex64 (nn.Module.to accepts complex dtypes) now fails deep inside a
    backend with "NotImplementedError: softmax_lastdim_kernel_impl not implemented for
    'ComplexFloat'" (or "max_values_cpu", or a flash-kernel message, depending on the backend),
    while the same call with need_weights=True still gives multihead's clear TypeError
    "q must be float16, bfloat16, float32 or float64, got torch.complex64". The error now depends
    on need_weights and names no argument.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MultiHeadAttention(C, H).to(torch.complex64).eval()
    x = torch.randn(1, 2, C, dtype=torch.complex64)
    with torch.no_grad():
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            m(x, need_weights=True)  # holds today
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            m(x)  # today: NotImplementedError from the backend


def test_found_in_place_transpose_of_a_weight_is_not_hidden_by_the_cached_view():
    """WAS A DEFECT (fused_linear.py:96-103, Stacked._still): the cached stacked view is validated only by
    parameter identity and data_ptr(). An in-place metadata change that keeps both — e.g.
    `q_proj.weight.t_()` (converting a Conv1D/(in, out) checkpoint in place) or
    `weight.data = weight.data.t()` — leaves the old view in use: the no-grad forward silently uses
    the untransposed W^Q, while grad mode (and 4-15 rows) use the new one.
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 2, C)
    with torch.no_grad():
        m(x)  # the stacked view is built and cached
        m.q_proj.weight.t_()  # same Parameter, same data_ptr, new strides
        out = m(x).output
    assert (out.double() - by_hand(m, x)).abs().max() < 1e-5


def test_found_conversion_does_not_keep_the_old_weights_alive():
    """WAS A DEFECT (module.py:154-157 + fused_linear.py:92): _apply re-lays out the weights but does not
    drop Stacked's cached view, which is a view of the *old* block. After one no-grad call,
    m.half() / m.to(other device) keeps the old float32 (or CPU) q/k/v block alive inside
    m._stacked until the next no-grad forward: memory is not released by the conversion (for a
    large model converted after a warm-up call, a full extra copy of every q/k/v projection).
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    with torch.no_grad():
        m(torch.randn(1, 2, C))
    m.half()
    stale = [(t.dtype, tuple(t.shape)) for t in reachable_tensors(m) if t.dtype != torch.float16]
    assert stale == []


def test_found_saving_one_projection_does_not_write_all_three():
    """WAS A DEFECT (fused_linear.py:59-61, every q/k/v parameter is a view of one block): torch.save
    writes a view's whole storage, so saving one projection — torch.save(m.q_proj.state_dict()),
    torch.save(m.k_proj.weight), a per-layer/adapter export — writes W^Q, W^K, W^V and all biases:
    3x the bytes of the same nn.Linear (out_proj, not laid out, is normal size). Loading it back
    gives a view into a 3x-sized storage too.
    """
    m = MultiHeadAttention(256, 4)
    sizes = {}
    for name, layer in (("q_proj", m.q_proj), ("out_proj", m.out_proj)):
        buffer = io.BytesIO()
        torch.save(layer.state_dict(), buffer)
        sizes[name] = len(buffer.getvalue())
    assert sizes["q_proj"] < 1.2 * sizes["out_proj"], sizes


def test_found_an_instance_forward_override_is_honoured():
    """WAS A DEFECT (fused_linear.py:143-146 `_plain`, used by call_linear and Stacked.get): a layer whose
    *instance* forward was replaced (`layer.forward = ...`, which is how accelerate's
    add_hook_to_module installs offloading/device hooks, and how many quantization and debugging
    tools patch layers) is treated as plain: F.linear is called with its parameters and the
    override is bypassed, in grad mode too (out_proj always goes through call_linear). nn.Linear
    itself honours it, and so did the module before the change.
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 2, C)
    original = m.out_proj.forward
    m.out_proj.forward = lambda inp: 0 * original(inp)
    assert m(x).output.abs().max() == 0


def test_found_integer_input_error_does_not_suggest_an_impossible_cast():
    """WAS A DEFECT (error clarity, _checks.py:64-66): an integer (e.g. token ids) or bool query gives
    "query has dtype torch.int64 but the module's parameters are torch.float32; cast the input or
    the module (module.to(torch.int64))" — but nn.Module.to(torch.int64) itself raises
    "nn.Module.to only accepts floating point or complex dtypes". The advice should only offer the
    module cast for floating dtypes.
    """
    m = MultiHeadAttention(C, H)
    with pytest.raises(TypeError, match="query") as error:
        m(torch.ones(1, 2, C, dtype=torch.long))
    assert "module.to(torch.int64)" not in str(error.value)


def test_found_key_width_error_says_key_defaulted_to_the_query():
    """WAS A DEFECT (error clarity, module.py:257-258): with kdim != d_model and no key passed, the error
    reads "key has width 16, kdim=8 expected, got (1, 2, 16)" — about a `key` the caller never
    passed. It should say that key defaulted to the query (and that cross-attention needs key=).
    """
    m = MultiHeadAttention(C, H, kdim=8, vdim=8)
    with pytest.raises(ValueError) as error:
        m(torch.randn(1, 2, C))
    message = str(error.value)
    assert "kdim" in message and ("query" in message or "default" in message)


# =====================================================================================
# REGRESSION GUARDS — attacked, held up; keep them passing
# =====================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [(1, 1), (1, 3), (1, 4), (3, 5), (1, 15), (1, 16), (4, 4), (2, 0)])
def test_guard_no_grad_and_grad_mode_agree_bit_for_bit(dtype, rows):
    """HELD UP: the stacked GEMM (no_grad) equals the three GEMMs (grad mode) bit for bit on the
    CPU, at every row count around the 4-15 band, also for half precision and zero-length T."""
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 8, num_kv_heads=2).to(dtype).eval()
    x = torch.randn(*rows, 64, dtype=dtype)
    with torch.no_grad():
        fast = m(x).output
    slow = m(x).output.detach()
    assert torch.equal(fast, slow)


def test_guard_functional_call_uses_the_substituted_weights():
    """HELD UP: torch.func.functional_call under no_grad uses substituted plain tensors, both
    separate ones and three adjacent views of one block (which the stacked path may fuse)."""
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 2, C)
    with torch.no_grad():
        m(x)  # cache the module's own stacked view first
        separate = {k: torch.randn_like(v) for k, v in m.named_parameters()}
        out = torch.func.functional_call(m, separate, (x,)).output
        assert (out.double() - by_hand(m, x, separate)).abs().max() < 1e-5
        block = torch.randn(3 * C, C)
        adjacent = dict(separate)
        adjacent.update(zip(("q_proj.weight", "k_proj.weight", "v_proj.weight"), block.split(C)))
        out = torch.func.functional_call(m, adjacent, (x,)).output
        assert (out.double() - by_hand(m, x, adjacent)).abs().max() < 1e-5
        assert (m(x).output.double() - by_hand(m, x)).abs().max() < 1e-5  # and back to its own


def test_guard_key_given_as_the_query_object_or_a_copy():
    """HELD UP: m(x), m(x, x, x) (same object: stacked) and m(x, x.clone(), x.clone()) (three GEMMs)
    agree exactly; non-contiguous, strided and expanded inputs too."""
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4).eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        ref = m(x).output
        assert torch.equal(m(x, x, x).output, ref)
        assert torch.equal(m(x, x.clone(), x.clone()).output, ref)
        for odd in (torch.randn(8, 2, 64).transpose(0, 1), torch.randn(2, 8, 128)[..., ::2],
                    torch.randn(1, 1, 64).expand(2, 8, 64)):
            assert torch.equal(m(odd).output, m(odd.contiguous()).output)


def test_guard_prune_and_parametrizations_are_honoured():
    """HELD UP: prune (a forward pre-hook) and parametrizations.weight_norm (a subclass) on q_proj
    are called, not bypassed, also after a conversion re-lays the others out."""
    import torch.nn.utils.prune as prune
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    x = torch.randn(1, 2, C, dtype=torch.float64)
    m = MultiHeadAttention(C, H).eval()
    prune.l1_unstructured(m.q_proj, "weight", 0.5)
    m.double()
    with torch.no_grad():
        params = dict(m.named_parameters())
        params["q_proj.weight"] = m.q_proj.weight_orig * m.q_proj.weight_mask
        assert (m(x).output - by_hand(m, x, params)).abs().max() < 1e-12

    n = MultiHeadAttention(C, H).double().eval()
    weight_norm(n.q_proj)
    with torch.no_grad():
        n.q_proj.parametrizations.weight.original0.mul_(3)
        params = {k: v for k, v in n.named_parameters() if "parametrizations" not in k}
        params["q_proj.weight"] = n.q_proj.weight
        assert (n(x).output - by_hand(n, x, params)).abs().max() < 1e-12


def test_guard_meta_to_empty_load_and_assign():
    """HELD UP: meta construction + to_empty + load_state_dict, and meta + assign=True, give the
    source's outputs exactly and stack again."""
    torch.manual_seed(0)
    source = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 2, C)
    with torch.device("meta"):
        a = MultiHeadAttention(C, H)
    a.to_empty(device="cpu")
    a.load_state_dict(source.state_dict())
    b = MultiHeadAttention(C, H, device="meta")
    b.load_state_dict(source.state_dict(), assign=True)
    with torch.no_grad():
        for target in (a.eval(), b.eval()):
            assert torch.equal(target(x).output, source(x).output)


def test_guard_frozen_parameters_with_input_gradients_and_inference_mode_cache():
    """HELD UP: frozen parameters + an input that requires grad take the stacked path and give the
    same input gradient as the three GEMMs; a view first built under inference_mode is reusable
    outside it, and sees later in-place updates."""
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval().requires_grad_(False)
    x = torch.randn(1, 2, C)
    with torch.inference_mode():
        m(x)
    xs = x.clone().requires_grad_()
    grad_fast = torch.autograd.grad(m(xs).output.sum(), xs)[0]
    m.q_proj.register_forward_pre_hook(lambda mod, args: None)  # forces the three-GEMM path
    grad_slow = torch.autograd.grad(m(xs).output.sum(), xs)[0]
    assert (grad_fast - grad_slow).abs().max() < 1e-6  # one GEMM's backward vs three: rounding only
    n = MultiHeadAttention(C, H).eval()
    with torch.inference_mode():
        n(x)
    with torch.no_grad():
        n.k_proj.weight.add_(1.0)
        assert (n(x).output.double() - by_hand(n, x)).abs().max() < 1e-5


def test_guard_autocast_stacked_equals_unstacked():
    """HELD UP: under CPU autocast (bfloat16) the stacked and unstacked paths agree exactly."""
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4).eval()
    x = torch.randn(2, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = m(x).output
        slow = m(x).output.detach()
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, slow)


def test_guard_swap_on_conversion_and_tied_weights():
    """HELD UP: torch.__future__ swap-on-conversion and a k/v weight tied inside the module keep
    outputs right (the tie just falls back to three GEMMs)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, C, dtype=torch.float64)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m = MultiHeadAttention(C, H)
        m(x.float()).output.sum().backward()
        with torch.no_grad():
            m(x.float())
        m.double().eval()
        with torch.no_grad():
            assert (m(x).output - by_hand(m, x)).abs().max() < 1e-12
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    t = MultiHeadAttention(C, H).eval()
    t.v_proj.weight = t.k_proj.weight
    t.double()
    with torch.no_grad():
        assert (t(x).output - by_hand(t, x)).abs().max() < 1e-12


@pytest.mark.parametrize("call, error, words", [
    (lambda q: multihead.attention([[1.0]], q, q), TypeError, "q must be a torch.Tensor"),
    (lambda q: multihead.attention(q.long(), q, q), TypeError, "q must be float16"),
    (lambda q: multihead.attention(q, q, q.int()), TypeError, "v must be float16"),
    (lambda q: multihead.attention(q, q.double(), q), TypeError, "k has dtype torch.float64 but q has"),
    (lambda q: multihead.attention(q, q, q.to("meta")), ValueError, "v is on meta but q is on cpu"),
    (lambda q: multihead.attention(q[0], q, q), ValueError, "q has 3 dims"),
    (lambda q: multihead.attention(q, q[None], q.int()), ValueError, "k has 5 dims"),
    (lambda q: multihead.attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.long)), TypeError,
     "attn_mask must be bool"),
    (lambda q: multihead.attention(q, q, q, scale=float("nan")), ValueError, "scale must be a finite number"),
    (lambda q: multihead.attention(q, q, q, scale=1e39), ValueError, "overflows the compute dtype"),
])
def test_guard_attention_argument_errors_name_the_argument(call, error, words):
    """HELD UP: make_call's one-expression fast check still falls through to errors that name the
    argument, what was expected and what came."""
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(error, match=words):
        call(q)
