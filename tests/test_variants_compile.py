"""torch.compile(fullgraph=True) through `multihead.attention` with each variant of the attention family.

For each named variant (window, softcap, ALiBi, sinks, documents) and a
score_mod, on the CPU with backend "auto" and "chunked":

- the call compiles as one graph with no graph break (fullgraph=True, and a
  counting backend that saw exactly one frame);
- a second call with new tensor values of the same shapes (new q, k, v, new
  sinks, new slopes, new document ids, a new score_mod closure over a new
  table) compiles nothing new (`error_on_recompile`);
- both compiled calls match the float64 reference as closely as the eager
  float32 call does (the project's 2x/3x rule with eager as the yardstick);
- forward and backward compile for softcap, sinks and the masks (window,
  ALiBi, documents), gradients (the sinks' included) under the same rule.

A score_mod whose gradient is needed under torch.compile goes to the
reference backend, which compile's own autograd differentiates (the chunked
backward cannot see the tensors a score_mod captures under dynamo); naming
"chunked" there is refused in one line. Compiled with backend="aot_eager":
dynamo and AOTAutograd trace what inductor would get, in a second.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import multihead
from multihead.backends.reference import attention_ref
from multihead.core.call import make_call
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR, max_err

B, H, G, T, D = 2, 4, 2, 21, 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _values(seed: int, grad: bool = False) -> dict:
    """q, k, v and every variant's tensors: new values for each seed, the same shapes."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).float()

    cut = 4 + seed % 9  # where the second document starts: new ids per seed
    ids = torch.cat([torch.zeros(B, cut, dtype=torch.long), torch.ones(B, T - cut, dtype=torch.long)], dim=1)
    leaves = dict(q=randn(B, H, T, D), k=randn(B, G, T, D), v=randn(B, G, T, D), sinks=randn(H))
    for x in leaves.values():
        x.requires_grad_(grad)
    return dict(leaves, slopes=randn(H).abs(), documents=ids, table=randn(2 * T))


def _relative(table):
    """A score_mod closing over a (2T,) table: a relative-position bias, as FlexAttention's examples write it."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + T]
    return score_mod


VARIANTS = {  # name -> the variant keywords from `_values`
    "window": lambda x: dict(window=(5, 2)),
    "softcap": lambda x: dict(softcap=2.0),
    "alibi": lambda x: dict(alibi_slopes=x["slopes"]),
    "sinks": lambda x: dict(sinks=x["sinks"]),
    "documents": lambda x: dict(documents=x["documents"], causal=True),
    "score_mod": lambda x: dict(score_mod=_relative(x["table"])),
    "masks": lambda x: dict(window=(6, 0), alibi_slopes=x["slopes"], documents=x["documents"]),
}


def attend(backend: str, name: str, x: dict):
    """The call under test: multihead.attention with one variant, every tensor an argument of the compiled code."""
    return multihead.attention(x["q"], x["k"], x["v"], backend=backend, **VARIANTS[name](x))


def golden(name: str, x: dict, upcast: bool) -> torch.Tensor:
    """The reference formula on the same values: float64 (upcast) or the inputs' float32 (the yardstick)."""
    cast = (lambda t: t.double()) if upcast else (lambda t: t)
    y = {n: cast(t) if t.is_floating_point() else t for n, t in x.items()}
    call = make_call(y["q"], y["k"], y["v"], **VARIANTS[name](y))
    return attention_ref(call.q, call.k, call.v, causal=call.causal, upcast=upcast, variants=call.variants).out


def compile_twice(fn, first: dict, second: dict):
    """fn compiled whole (fullgraph=True), called on two sets of values; the second call must not recompile."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    out_first = compiled(first)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out_second = compiled(second)
    # 0 frames would mean dynamo skipped the code and ran it eagerly: nothing would have been checked
    assert counter.frame_count == 1 and counter.op_count > 0, (counter.frame_count, counter.op_count)
    return out_first, out_second


def assert_by_rule(what: str, got: torch.Tensor, eager: torch.Tensor, gold: torch.Tensor, factor: float) -> None:
    err, eager_err = max_err(got, gold), max_err(eager, gold)
    assert err <= factor * eager_err + ABS_SLACK, f"{what}: compiled {err:.3g} > {factor} x eager {eager_err:.3g}"


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "masks"])
@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_a_variant_compiles_whole_and_a_second_call_with_new_values_does_not_recompile(backend, name):
    first, second = _values(1), _values(2)
    assert not torch.equal(first["documents"], second["documents"]) and not torch.equal(first["sinks"], second["sinks"])
    with torch.no_grad():
        outs = compile_twice(lambda x: attend(backend, name, x), first, second)
        for x, out in zip((first, second), outs):
            eager = attend(backend, name, x)
            assert_by_rule(f"{backend} {name}", out, eager, golden(name, x, upcast=True), OUT_FACTOR)


@pytest.mark.parametrize("name", ["softcap", "sinks", "masks"])
def test_forward_and_backward_compile_on_the_chunked_backend_with_the_eager_gradients(name):
    first, second = _values(3, grad=True), _values(4, grad=True)
    leaves = ["q", "k", "v"] + (["sinks"] if name == "sinks" else [])
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(B, H, T, D, generator=gen)

    def with_grads(out, x):
        return (out,) + torch.autograd.grad(out, [x[n] for n in leaves], grad_out)

    outs = compile_twice(lambda x: attend("chunked", name, x), first, second)  # its backward is compiled too
    for x, out in zip((first, second), outs):
        compiled = with_grads(out, x)
        eager = with_grads(attend("chunked", name, x), x)
        gold_x = {n: t.detach().double().requires_grad_(True) if t.is_floating_point() else t for n, t in x.items()}
        gold_out = golden(name, gold_x, upcast=True)
        gold = (gold_out,) + torch.autograd.grad(gold_out, [gold_x[n] for n in leaves], grad_out.double())
        for what, c, e, g in zip(["out"] + leaves, compiled, eager, gold):
            assert c is not None and torch.isfinite(c).all(), f"{name}: d{what} missing or not finite"
            assert_by_rule(f"{name} {what}", c, e, g.detach(), OUT_FACTOR if what == "out" else GRAD_FACTOR)


def test_a_score_mod_needing_a_gradient_compiles_on_the_reference_and_its_table_gets_the_eager_gradient():
    """The score_mod and its table are made inside the compiled code (as a module's forward would make them):
    dynamo shows no closure there, so "auto" leaves the chunked backend (whose backward would need it) for the
    reference, which compile's autograd differentiates; the table's gradient is eager chunked's."""
    x = _values(6, grad=True)
    x["table"].requires_grad_(True)
    leaves = [x["q"], x["k"], x["v"], x["table"]]

    def fn(x):
        return multihead.attention(x["q"], x["k"], x["v"], score_mod=_relative(x["table"] * 1.0), causal=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x).square().sum(), leaves)
    eager_out = multihead.attention(x["q"], x["k"], x["v"], score_mod=_relative(x["table"]), causal=True,
                                    backend="chunked")
    want = torch.autograd.grad(eager_out.square().sum(), leaves)
    for name, g, w in zip(["q", "k", "v", "table"], got, want):
        assert max_err(g, w) < 1e-4 * max(1.0, w.abs().max().item()), name
    assert want[3].abs().sum() > 0

    def on_chunked(x):
        return multihead.attention(x["q"], x["k"], x["v"], score_mod=_relative(x["table"]), backend="chunked")

    torch._dynamo.reset()
    with pytest.raises(Exception, match="a score_mod with grad enabled under torch.compile"):
        torch.compile(on_chunked, fullgraph=True, backend="aot_eager")(x)


def test_only_the_score_mods_table_needing_a_gradient_under_compile_is_differentiated():
    """q, k, v need no gradient, the table does: the captured table is out of dynamo's sight, so the call must
    still count as needing a gradient (no in-place softmax under it), and the table gets eager's gradient."""
    x = _values(7)
    table = x["table"].detach().clone().requires_grad_(True)

    def fn(q, k, v, table):
        return multihead.attention(q, k, v, score_mod=_relative(table * 1.0), causal=True)

    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(
        x["q"], x["k"], x["v"], table).square().sum(), table)[0]
    want = torch.autograd.grad(fn(x["q"], x["k"], x["v"], table).square().sum(), table)[0]
    assert want.abs().sum() > 0
    assert max_err(got, want) < 1e-4 * max(1.0, want.abs().max().item())


def test_a_fresh_process_compiles_a_variant_once():
    """The first compiled call of a process used to fill the triton backend's "is triton installed" memo
    inside the trace; dynamo guarded on it, and the second call (new values) recompiled."""
    script = textwrap.dedent("""
        import torch, multihead
        torch.set_num_threads(1)
        f = torch.compile(lambda q, s: multihead.attention(q, q, q, softcap=s), fullgraph=True, backend="eager")
        f(torch.randn(1, 2, 5, 4), 3.0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            f(torch.randn(1, 2, 5, 4), 3.0)
        print("once")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "once", done.stderr[-2000:]
