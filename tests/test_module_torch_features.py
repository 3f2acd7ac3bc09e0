"""MultiHeadAttention (and compat.MultiheadAttention) under torch's own module features.

Pickling and torch.save, share_memory, load_state_dict under inference_mode, meta
devices, dtype conversions, torch.func (functional_call, vmap ensembling, forward-mode
AD), jit.trace (and the refusal of jit.script and nested tensors), autocast, pruning and
parametrizations: each gives what it gives for a plain nn.Module.

Most of these come from an adversarial pass over a first version of the per-call fast
paths, which stacked W^Q, W^K, W^V in one shared storage (since removed; nn/linear_call.py
says why). A test whose docstring starts "Once failed" reproduced a defect of that
version and says what was wrong; "Held up" ones were attacked and held.
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

from multihead import MultiHeadAttention
from conftest import max_err

C, H = 16, 4


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


# ---- pickling, saving, shared memory, loading


def test_module_can_be_pickled_and_torch_saved_whole():
    """Once failed (module.py:149): __init__ registered a *lambda* as load_state_dict post hook, so the module
    could no longer be pickled: pickle.dumps(m), torch.save(m, f) (whole-module checkpoints, and every model
    containing a MultiHeadAttention), and multiprocessing 'spawn' all raised "AttributeError: Can't pickle local
    object 'MultiHeadAttention.__init__.<locals>.<lambda>'". A plain nn.Module (and compat.MultiheadAttention)
    pickles fine.
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


def test_share_memory_keeps_every_parameter_shared():
    """Once failed (module.py:154-157, the _apply override): Module.share_memory() runs through _apply, which
    then *re-laid out* q/k/v with torch.cat into a fresh, private storage. After m.share_memory() only out_proj
    was in shared memory; q/k/v were not, so Hogwild-style training (torch.multiprocessing workers updating a
    shared model) silently trained private copies of q/k/v in each worker.
    """
    control = nn.Linear(C, C).share_memory()
    assert all(p.is_shared() for p in control.parameters())  # what torch guarantees
    m = MultiHeadAttention(C, H).share_memory()
    not_shared = [name for name, p in m.named_parameters() if not p.is_shared()]
    assert not_shared == []


def test_load_state_dict_under_inference_mode_keeps_trainable_parameters():
    """Once failed (module.py:149 post hook -> fused_linear.py:59 torch.cat): loading a checkpoint inside
    torch.inference_mode() (common in serving code) re-laid out q/k/v with a torch.cat executed in inference
    mode, so q/k/v became *inference tensors*. torch's own load_state_dict copies in place and leaves normal
    tensors. Later training then failed with "Inference tensors cannot be saved for backward" as soon as the
    attention input required grad. (Same for a no-op m.to('cpu') / m.float() under inference mode, which plain
    torch leaves untouched.)
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


def test_saving_one_projection_does_not_write_all_three():
    """Once failed (fused_linear.py:59-61, every q/k/v parameter a view of one block): torch.save writes a view's
    whole storage, so saving one projection — torch.save(m.q_proj.state_dict()), torch.save(m.k_proj.weight), a
    per-layer/adapter export — wrote W^Q, W^K, W^V and all biases: 3x the bytes of the same nn.Linear (out_proj,
    not laid out, is normal size). Loading it back gave a view into a 3x-sized storage too.
    """
    m = MultiHeadAttention(256, 4)
    sizes = {}
    for name, layer in (("q_proj", m.q_proj), ("out_proj", m.out_proj)):
        buffer = io.BytesIO()
        torch.save(layer.state_dict(), buffer)
        sizes[name] = len(buffer.getvalue())
    assert sizes["q_proj"] < 1.2 * sizes["out_proj"], sizes


def test_meta_to_empty_load_and_assign():
    """Held up: meta construction + to_empty + load_state_dict, and meta + assign=True, give the source's outputs
    exactly."""
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


# ---- conversions and in-place changes of the weights


def test_conversion_does_not_keep_the_old_weights_alive():
    """Once failed (module.py:154-157 + fused_linear.py:92): _apply re-laid out the weights but did not drop
    Stacked's cached view, which was a view of the *old* block. After one no-grad call, m.half() / m.to(other
    device) kept the old float32 (or CPU) q/k/v block alive inside m._stacked until the next no-grad forward:
    memory was not released by the conversion (for a large model converted after a warm-up call, a full extra
    copy of every q/k/v projection).
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    with torch.no_grad():
        m(torch.randn(1, 2, C))
    m.half()
    stale = [(t.dtype, tuple(t.shape)) for t in reachable_tensors(m) if t.dtype != torch.float16]
    assert stale == []


def test_in_place_transpose_of_a_weight_is_seen_by_the_next_call():
    """Once failed (fused_linear.py:96-103, Stacked._still): the cached stacked view was validated only by
    parameter identity and data_ptr(). An in-place metadata change that keeps both — e.g. `q_proj.weight.t_()`
    (converting a Conv1D/(in, out) checkpoint in place) or `weight.data = weight.data.t()` — left the old view in
    use: the no-grad forward silently used the untransposed W^Q, while grad mode (and 4-15 rows) used the new one.
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 2, C)
    with torch.no_grad():
        m(x)
        m.q_proj.weight.t_()  # same Parameter, same data_ptr, new strides
        out = m(x).output
    assert (out.double() - by_hand(m, x)).abs().max() < 1e-5


def test_swap_on_conversion_and_tied_weights():
    """Held up: torch.__future__ swap-on-conversion and a k/v weight tied inside the module keep outputs right."""
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


def test_prune_and_parametrizations_are_honoured():
    """Held up: prune (a forward pre-hook) and parametrizations.weight_norm (a subclass) on q_proj are called,
    not bypassed, also after a conversion."""
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


# ---- grad modes, autocast and inputs given in several ways


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_grad_and_grad_mode_agree_bit_for_bit(dtype):
    """Held up: no_grad and grad mode give the same output bit for bit on the CPU, at every row count around the
    4-15 band where the stacked GEMM once changed, also for half precision and zero-length T."""
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 8, num_kv_heads=2).to(dtype).eval()
    for rows in [(1, 1), (1, 3), (1, 4), (3, 5), (1, 15), (1, 16), (4, 4), (2, 0)]:
        x = torch.randn(*rows, 64, dtype=dtype)
        with torch.no_grad():
            fast = m(x).output
        slow = m(x).output.detach()
        assert torch.equal(fast, slow), rows


def test_autocast_no_grad_equals_grad_mode():
    """Held up: under CPU autocast (bfloat16) no_grad and grad mode agree exactly."""
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4).eval()
    x = torch.randn(2, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = m(x).output
        slow = m(x).output.detach()
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, slow)


def test_key_given_as_the_query_object_or_a_copy():
    """Held up: m(x), m(x, x, x) (same object) and m(x, x.clone(), x.clone()) agree exactly; non-contiguous,
    strided and expanded inputs too."""
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


def test_frozen_parameters_with_input_gradients_and_inference_mode_calls():
    """Held up: frozen parameters + an input that requires grad give the same input gradient with and without a
    hook on q_proj; a module first called under inference_mode is usable outside it, and sees later in-place
    updates."""
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval().requires_grad_(False)
    x = torch.randn(1, 2, C)
    with torch.inference_mode():
        m(x)
    xs = x.clone().requires_grad_()
    grad_fast = torch.autograd.grad(m(xs).output.sum(), xs)[0]
    m.q_proj.register_forward_pre_hook(lambda mod, args: None)  # the layer's own call instead of F.linear
    grad_slow = torch.autograd.grad(m(xs).output.sum(), xs)[0]
    assert (grad_fast - grad_slow).abs().max() < 1e-6
    n = MultiHeadAttention(C, H).eval()
    with torch.inference_mode():
        n(x)
    with torch.no_grad():
        n.k_proj.weight.add_(1.0)
        assert (n(x).output.double() - by_hand(n, x)).abs().max() < 1e-5


# ---- torch.func


def test_functional_call_uses_the_substituted_weights():
    """Held up: torch.func.functional_call under no_grad uses substituted plain tensors, both separate ones and
    three adjacent views of one block."""
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 2, C)
    with torch.no_grad():
        m(x)
        separate = {k: torch.randn_like(v) for k, v in m.named_parameters()}
        out = torch.func.functional_call(m, separate, (x,)).output
        assert (out.double() - by_hand(m, x, separate)).abs().max() < 1e-5
        block = torch.randn(3 * C, C)
        adjacent = dict(separate)
        adjacent.update(zip(("q_proj.weight", "k_proj.weight", "v_proj.weight"), block.split(C)))
        out = torch.func.functional_call(m, adjacent, (x,)).output
        assert (out.double() - by_hand(m, x, adjacent)).abs().max() < 1e-5
        assert (m(x).output.double() - by_hand(m, x)).abs().max() < 1e-5  # and back to its own


def test_vmap_model_ensembling_over_functional_call():
    """Once failed (fused_linear.py:91-93 and :161, Stacked.get/_stacked called data_ptr()): torch.func's
    model-ensembling recipe (stack_module_state + vmap(functional_call), the official tutorial) raised
    "RuntimeError: Cannot access data pointer of Tensor that doesn't have storage", because the stacked path was
    tried on functorch's batched wrapper tensors. The same happened for torch.func.grad(..., argnums=<input>)
    over functional_call with plain parameter tensors.
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


def test_forward_mode_ad_tangents_of_the_projections_are_not_dropped():
    """Once failed (fused_linear.py:88-94 + :167 `first.detach().as_strided`): forward-mode AD through
    functional_call with dual parameters. Dual tensors do not `requires_grad`, so Stacked.get took the stacked
    path even in grad mode; the duals made from the module's own (adjacent) storage passed the adjacency test, and
    the view was built with .detach(), which strips the tangents. The JVP of q w.r.t. W^Q came out silently ZERO
    instead of x @ dW^Qᵀ.
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
    x = torch.randn(1, 2, C)
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


# ---- TorchScript and nested tensors


@pytest.mark.parametrize("G", [4, 2])
def test_jit_trace_of_the_module(G):
    mha = MultiHeadAttention(16, 4, num_kv_heads=G, causal=True).eval()
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_Outputs(mha), (x,))
    other = torch.randn(2, 5, 16)
    assert max_err(traced(other), mha(other).output) < 1e-6


def _traceable_modules():
    from multihead import MultiHeadLatentAttention, RotaryEmbedding

    yield "mha", MultiHeadAttention(C, H)
    yield "gqa-rope", MultiHeadAttention(C, H, num_kv_heads=2, causal=True, rope=RotaryEmbedding(C // H))
    for absorb in (False, True):
        yield f"latent-absorb={absorb}", MultiHeadLatentAttention(C, H, head_dim=4, rope_dim=4, kv_latent_dim=8,
                                                                  absorb=absorb)


@pytest.mark.parametrize("name", [name for name, _ in _traceable_modules()])
def test_jit_trace_of_the_module_itself(name):
    """Once failed: torch.jit.trace(MultiHeadAttention(...), x) raised torch's "Only tensors, lists, tuples of
    tensors, or dictionary of tensors can be output from traced functions": the result held weights=None (only a
    wrapper returning .output traced). MultiHeadLatentAttention failed the same way, and a module with rope
    failed trace's own check ("Graphs differed across invocations": the first trace computed the frequencies,
    the check read them from the memo). The traced module now returns the tuple (output, weights), an empty
    weights tensor standing for None, with the eager module's numbers; the eager module still returns None."""
    torch.manual_seed(0)
    m = dict(_traceable_modules())[name].eval()
    x, other = torch.randn(2, 5, C), torch.randn(2, 5, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, (x,))
    out, weights = traced(other)
    eager = m(other)
    assert max_err(out, eager.output) < 1e-6 and max_err(out, m(x).output) > 1e-2
    assert weights.numel() == 0 and eager.weights is None


def test_torch_export_of_the_module_keeps_its_result():
    """What the jit.script refusal recommends first: torch.export gives the eager numbers and the typed result."""
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H, causal=True).eval()
    x, other = torch.randn(2, 5, C), torch.randn(2, 5, C)
    result = torch.export.export(m, (x,)).module()(other)
    assert type(result).__name__ == "MultiHeadAttentionOutput" and result.weights is None
    assert max_err(result.output, m(other).output) < 1e-6 and max_err(result.output, m(x).output) > 1e-2


def test_jit_trace_of_compat_without_weights():
    """compat with need_weights=False traces too (torch's own module does not: the same None), weights empty."""
    from multihead.compat import MultiheadAttention

    class NoWeights(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, x, x, need_weights=False)

    torch.manual_seed(0)
    m = NoWeights(MultiheadAttention(C, H).eval())
    x, other = torch.randn(5, 2, C), torch.randn(5, 2, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, (x,))
    out, weights = traced(other)
    assert max_err(out, m(other)[0]) < 1e-6 and weights.numel() == 0 and m(other)[1] is None


def test_jit_trace_with_a_row_count_that_once_stacked():
    """Once failed (fused_linear.py:81, no torch.jit.is_tracing() guard): torch.jit.trace of the module failed its
    own sanity check ("Tracing failed sanity checks! Graphs differed across invocations") for any input with 1-3
    or >= 16 rows: the check re-runs the trace under no_grad, where the stacked path was taken (and on the first
    no_grad call the view was built, on the second it was reused), so the two traces recorded different graphs.
    The trace test above uses 10 rows, a count that never stacked on the CPU. Tracing in eval under no_grad
    failed the same way.
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


def test_a_traced_module_does_not_bake_the_projection_weights_in():
    """Once failed (same root as the previous one, fused_linear.py:81/:167; silent): a module that had already run
    once under no_grad (a warm-up/eval call) and was then traced under no_grad recorded the cached stacked view as
    `prim::Constant[value=<Tensor>]` — W^Q, W^K, W^V and their biases became constants of the graph instead of
    reads of the parameters. In-process the constant aliased the parameters, but after torch.jit.save /
    torch.jit.load the constant was a separate copy: load_state_dict on the loaded trace updated the parameters,
    the graph kept computing with the OLD q/k/v weights (out_proj, read as a parameter, was updated) — silently
    wrong. (check_trace=False only to get past the sanity-check failure of the previous test.)
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(2, 8, C)  # 16 rows
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x)  # warm-up
        traced = torch.jit.trace(_Outputs(m), (x,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    new = MultiHeadAttention(C, H).eval()
    loaded.load_state_dict({"inner." + k: v for k, v in new.state_dict().items()})
    with torch.no_grad():
        assert (loaded(x) - new(x).output).abs().max() < 1e-5


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
    from multihead import MultiHeadLatentAttention
    from multihead.compat import MultiheadAttention

    with pytest.raises(TypeError, match="MultiHeadAttention does not support torch.jit.script; use torch.compile"):
        torch.jit.script(MultiHeadAttention(8, 2))
    with pytest.raises(TypeError, match=r"MultiHeadLatentAttention does not support torch.jit.script; .*torch.jit.trace"):
        torch.jit.script(MultiHeadLatentAttention(8, 2, head_dim=4, rope_dim=2, kv_latent_dim=4))
    with pytest.raises(TypeError, match="compat.MultiheadAttention does not support torch.jit.script"):
        torch.jit.script(torch.nn.Sequential(MultiheadAttention(8, 2)))


def test_nested_tensors_are_refused_in_one_line():
    from multihead.compat import MultiheadAttention

    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    with pytest.raises(TypeError, match="query is a nested tensor; .* pass key_padding_mask"):
        MultiheadAttention(8, 2, batch_first=True)(nested, nested, nested)
    with pytest.raises(TypeError, match="query is a nested tensor"):
        MultiHeadAttention(8, 2)(nested)
