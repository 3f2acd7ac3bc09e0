"""torch.compile(fullgraph=True) on the attention modules: no graph break, eager's numbers, no recompile.

For every path that promises a single graph (docs/design.md: no branch on a
tensor's value in a hot path) each case checks, under `torch.compile`:

- `torch._dynamo.explain` finds exactly one graph and 0 graph breaks (the
  reasons, with file:line, are printed when it does not);
- `torch.compile(fn, fullgraph=True)` runs it, and its output (and, in
  training, every gradient) is as close to the float64 module as the float32
  eager module is, under the project's rule (tests/conftest.py);
- a second call with new values of the same shapes compiles nothing new
  (`error_on_recompile`, and a frame counter), the first call compiling a
  fresh module (so RoPE's memo cannot make MLA recompile);
- a query row with no key gives exactly 0 (the modules are built without
  bias, so W^O keeps the zero) and, where a whole sequence has no key, its
  input gets exactly 0 gradient, without any value being read on the host
  (fullgraph=True would refuse an `.item()` or a `bool(tensor)`).

The graphs are compiled with backend="aot_eager" (dynamo and AOTAutograd
trace the same graph inductor would get, in a second rather than half a
minute on two cores); one representative case (training, with a sequence
that has no key) also runs under inductor, skipped past COMPILE_BUDGET_S as
in tests/test_cache.py. An eval case whose forward is a training case's
(same path, dropout 0) is not repeated: the training case checks it and its
gradients.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from multihead import MultiHeadAttention, compat
from multihead.nn.latent import MultiHeadLatentAttention, make_static_cache
from multihead.nn.rope import RotaryEmbedding
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR, max_err

COMPILE_BUDGET_S = 60.0  # on a 2-core CPU an inductor compile takes tens of seconds; beyond this, skip
C, H, T, S = 24, 4, 7, 5  # model width, heads (head dim 6), query length, key length for cross-attention
ALL = slice(None)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- inputs: every seed gives new values of the same shapes ---------------------------


def randn(*shape, seed: int, requires_grad: bool = False) -> Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    return x.requires_grad_(requires_grad)


def key_mask_with_an_empty_sequence(seed: int) -> Tensor:
    """(2, T) True = a real token: sequence 0 a random pattern (key 0 always real), sequence 1 none at all."""
    mask = torch.rand(2, T, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[0, 0] = True
    mask[1] = False
    return mask


def attn_mask_with_an_empty_row(seed: int, kind: str) -> Tensor:
    """(T, T) True / finite = may attend; query 2 may attend nothing."""
    allowed = torch.rand(T, T, generator=torch.Generator().manual_seed(seed)) > 0.4
    allowed[:, 0] = True
    allowed[2] = False
    if kind == "bool":
        return allowed
    bias = randn(T, T, seed=seed + 1)
    return bias.masked_fill(~allowed, float("-inf"))


# -- the cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # the float32 module, seeded, mode set
    inputs: Callable[[int, bool], tuple]  # (seed, requires_grad) -> the call's tensors, same shapes for every seed
    call: Callable[..., Tensor | tuple[Tensor, ...]]  # (module, *inputs) -> the output(s) compared
    empty: tuple | None  # index of the outputs where no key is attended: exactly 0 there
    grad_empty: bool = False  # training: the first input's grad is exactly 0 at `empty` (a sequence with no key)


def _mha(train: bool = False, **kwargs) -> Callable[[], nn.Module]:
    def build():
        torch.manual_seed(0)
        return MultiHeadAttention(C, H, bias=False, **kwargs).train(train)
    return build


def _compat(train: bool) -> nn.Module:
    torch.manual_seed(0)
    return compat.MultiheadAttention(C, H, bias=False, batch_first=True).train(train)


def _encoder_layer(train: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(C, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    layer.self_attn = compat.MultiheadAttention(C, H, batch_first=True)
    return layer.train(train)


def _mla(train: bool = False) -> nn.Module:
    torch.manual_seed(0)
    module = MultiHeadLatentAttention(C, H, head_dim=6, rope_dim=4, kv_latent_dim=10, q_latent_dim=12)
    with torch.no_grad():  # RMSNorm weights away from 1, so a skipped norm would show
        module.kv_norm.weight.uniform_(0.5, 1.5)
        module.q_norm.weight.uniform_(0.5, 1.5)
    return module.train(train)


def _x_and_key_mask(seed, grad):
    return randn(2, T, C, seed=seed, requires_grad=grad), key_mask_with_an_empty_sequence(seed)


def _x_and_padding(seed, grad):  # torch's polarity: True = padding
    return randn(2, T, C, seed=seed, requires_grad=grad), ~key_mask_with_an_empty_sequence(seed)


def _x_and_attn_mask(kind):
    return lambda seed, grad: (randn(2, T, C, seed=seed, requires_grad=grad), attn_mask_with_an_empty_row(seed, kind))


def _with_weights(module, x, key_mask):
    out = module(x, key_mask=key_mask, need_weights=True)
    return out.output, out.weights


def _weights_off_the_lse(module, x, key_mask):
    with torch.no_grad():  # nothing needs a gradient: the weights are read off the chunked backend's logsumexp
        return _with_weights(module, x, key_mask)


CASES = [
    Case("mha-key_mask-train", _mha(train=True), _x_and_key_mask, lambda m, x, km: m(x, key_mask=km).output,
         (1,), grad_empty=True),
    Case("mha-attn_mask-bool", _mha(), _x_and_attn_mask("bool"), lambda m, x, am: m(x, attn_mask=am).output,
         (ALL, 2)),
    Case("mha-attn_mask-float-train", _mha(train=True), _x_and_attn_mask("float"),
         lambda m, x, am: m(x, attn_mask=am).output, (ALL, 2)),
    Case("mha-causal", _mha(causal=True), lambda seed, grad: (randn(2, T, C, seed=seed, requires_grad=grad),),
         lambda m, x: m(x).output, None),
    # bottom-right aligned with T > S: queries 0 .. T-S-1 see no key
    Case("mha-causal-cross", _mha(causal=True),
         lambda seed, grad: (randn(2, T, C, seed=seed, requires_grad=grad), randn(2, S, C, seed=seed + 7)),
         lambda m, x, kv: m(x, kv, kv).output, (ALL, slice(0, T - S))),
    Case("mha-need_weights-train", _mha(train=True), _x_and_key_mask, _with_weights, (1,), grad_empty=True),
    Case("mha-need_weights-chunked-lse", _mha(backend="chunked"), _x_and_key_mask, _weights_off_the_lse, (1,)),
    Case("compat-key_padding_mask-train", lambda: _compat(True), _x_and_padding,
         lambda m, x, kpm: tuple(m(x, x, x, key_padding_mask=kpm)), (1,), grad_empty=True),
    Case("compat-in-TransformerEncoderLayer-train", lambda: _encoder_layer(True), _x_and_padding,
         lambda m, x, kpm: m(x, src_key_padding_mask=kpm), None),
    # eval with parameters that require grad: torch's fused layer kernel stays off, compat's forward runs
    Case("compat-in-TransformerEncoderLayer-eval", lambda: _encoder_layer(False), _x_and_padding,
         lambda m, x, kpm: m(x, src_key_padding_mask=kpm), None),
    Case("mla-plain-key_mask-train", lambda: _mla(True), _x_and_key_mask,
         lambda m, x, km: m(x, key_mask=km, absorb=False).output, (1,), grad_empty=True),
    Case("mla-absorbed-key_mask", _mla, _x_and_key_mask, lambda m, x, km: m(x, key_mask=km, absorb=True).output,
         (1,)),
    Case("mla-need_weights", _mla, _x_and_key_mask,
         lambda m, x, km: tuple(m(x, key_mask=km, need_weights=True, absorb=True)), (1,)),
]


# -- the checks -------------------------------------------------------------------------


def _as_tuple(out) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _double(x):
    return x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x


def _describe_breaks(explained) -> str:
    lines = []
    for brk in explained.break_reasons:
        where = "; ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in brk.user_stack[-3:])
        gist = brk.reason.strip().splitlines()[0] if brk.reason.strip() else "(no reason given)"
        lines.append(f"- {gist[:300]}\n  at {where}")
    return "\n".join(lines)


def assert_one_graph(fn, *args) -> None:
    """torch._dynamo.explain: one graph, no break (its reasons and file:line in the message when not)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, (
        f"{explained.graph_break_count} graph break(s):\n{_describe_breaks(explained)}")
    # 0 graphs would mean dynamo skipped the frame and ran it eagerly: nothing was checked
    assert explained.graph_count == 1, f"{explained.graph_count} graphs, 1 expected:\n{_describe_breaks(explained)}"


def compile_twice(fn, first: tuple, second: tuple, backend: str = "aot_eager"):
    """fn compiled with fullgraph=True, called on two inputs of the same shapes; the second must not recompile."""
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    start = time.perf_counter()
    out_first = compiled(*first)
    seconds = time.perf_counter() - start
    with torch._dynamo.config.patch(error_on_recompile=True):
        out_second = compiled(*second)
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames for two calls of the same shapes"
    return out_first, out_second, seconds


def assert_by_rule(what: str, got: Tensor, eager: Tensor, golden: Tensor, factor: float) -> None:
    """The project's rule with the float32 eager module as the same-dtype yardstick."""
    assert got.shape == golden.shape and got.dtype == eager.dtype, (what, got.shape, golden.shape, got.dtype)
    err, eager_err = max_err(got, golden), max_err(eager, golden)
    assert err <= factor * eager_err + ABS_SLACK, (
        f"{what}: compiled error {err:.3g} > {factor} x eager's {eager_err:.3g} + {ABS_SLACK}")


def _grads(outs: tuple[Tensor, ...], wrt: list[Tensor], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    directions = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    return list(torch.autograd.grad(outs, wrt, directions, allow_unused=True, retain_graph=True))


def _trainable(module: nn.Module, inputs: tuple) -> list[Tensor]:
    return [x for x in inputs if x.requires_grad] + [p for p in module.parameters() if p.requires_grad]


def check_against_eager(case: Case, module: nn.Module, inputs: tuple, compiled_outs: tuple) -> None:
    """Compiled output (and gradients in training) vs float32 eager vs the float64 module, under the rule."""
    golden_module = copy.deepcopy(module).double()
    golden_inputs = tuple(_double(x) for x in inputs)
    eager_outs = _as_tuple(case.call(module, *inputs))
    golden_outs = _as_tuple(case.call(golden_module, *golden_inputs))
    assert len(compiled_outs) == len(eager_outs) == len(golden_outs)
    for i, (got, eager, gold) in enumerate(zip(compiled_outs, eager_outs, golden_outs)):
        assert_by_rule(f"{case.name} output {i}", got, eager, gold.detach(), OUT_FACTOR)
    if not module.training:
        return
    names = [f"input {i}" for i, x in enumerate(inputs) if x.requires_grad] + [
        n for n, p in module.named_parameters() if p.requires_grad]
    got = _grads(compiled_outs, _trainable(module, inputs), seed=3)
    eager = _grads(eager_outs, _trainable(module, inputs), seed=3)
    gold = _grads(golden_outs, _trainable(golden_module, golden_inputs), seed=3)
    for name, g, e, gg in zip(names, got, eager, gold):
        assert g is not None and e is not None, f"{case.name}: no gradient for {name}"
        assert torch.isfinite(g).all(), f"{case.name}: d {name} is not finite under compile"
        assert_by_rule(f"{case.name} d {name}", g, e, gg, GRAD_FACTOR)


def check_no_key_rows(case: Case, inputs: tuple, compiled_outs: tuple) -> None:
    """Rows with no key: exactly 0 in every output; with grad_empty, exactly 0 gradient into that input."""
    for i, out in enumerate(compiled_outs):
        assert out[case.empty].numel() > 0
        assert (out[case.empty] == 0).all(), f"{case.name} output {i}: a row with no key is not exactly 0"
        assert out.abs().sum() > 0  # the other rows are not zero: the check above is about the empty ones
    if case.grad_empty:
        (grad,) = torch.autograd.grad(compiled_outs, inputs[0], [torch.ones_like(o) for o in compiled_outs])
        assert (grad[case.empty] == 0).all(), f"{case.name}: a sequence with no key gets a gradient"
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiles_to_one_graph_matching_eager_without_recompiling(case: Case):
    module = case.build()
    train = module.training
    first, second = case.inputs(1, train), case.inputs(2, train)
    assert all(a.shape == b.shape for a, b in zip(first, second)) and not torch.equal(first[0], second[0])

    def fn(*args):
        return case.call(module, *args)

    out_first, out_second, _ = compile_twice(fn, first, second)  # first: the fresh module's first call
    assert_one_graph(fn, *first)
    for inputs, outs in ((first, out_first), (second, out_second)):
        outs = _as_tuple(outs)
        check_against_eager(case, module, inputs, outs)
        if case.empty is not None:
            check_no_key_rows(case, inputs, outs)


CASES_BY_NAME = {c.name: c for c in CASES}


def test_inductor_matches_eager_and_keeps_empty_rows_exact():
    """inductor generates its own kernels (it may rewrite the attention pattern): the same checks on its code."""
    case = CASES_BY_NAME["mha-key_mask-train"]
    module = case.build()
    first, second = case.inputs(1, module.training), case.inputs(2, module.training)
    out_first, out_second, seconds = compile_twice(lambda *a: case.call(module, *a), first, second, "inductor")
    if seconds > COMPILE_BUDGET_S:
        pytest.skip(f"inductor took {seconds:.0f} s > {COMPILE_BUDGET_S:.0f} s to compile on this CPU")
    for inputs, outs in ((first, out_first), (second, out_second)):
        outs = _as_tuple(outs)
        check_against_eager(case, module, inputs, outs)
        check_no_key_rows(case, inputs, outs)


def test_a_fresh_module_with_rope_does_not_recompile_on_its_second_call():
    # RotaryEmbedding memoises its frequencies eagerly; traced, it computes them in the graph (a memo
    # filled inside the first compiled call made dynamo guard on it, and the second call recompiled).
    # MLA's fresh modules are the mla-* cases above, whose first call is compiled.
    torch.manual_seed(0)
    module = MultiHeadAttention(C, H, bias=False, rope=RotaryEmbedding(C // H))

    def call(m, x, km):
        return m(x, key_mask=km).output

    out_first, out_second, _ = compile_twice(lambda *a: call(module, *a), _x_and_key_mask(1, False),
                                             _x_and_key_mask(2, False))
    torch.testing.assert_close(out_second, call(module, *_x_and_key_mask(2, False)))


def test_the_checks_catch_a_host_read_and_a_recompile():
    """The helpers above can fail: a branch on a value breaks the graph, a changed Python int recompiles."""
    def branch_on_a_value(x):
        if bool((x > 0).any()):  # reads a tensor's value on the host
            return x * 2
        return x - 1

    with pytest.raises(AssertionError, match="1 graph break"):
        assert_one_graph(branch_on_a_value, torch.randn(3))
    with pytest.raises(torch._dynamo.exc.RecompileError):
        compile_twice(lambda x, n: x * n, (torch.randn(3), 2), (torch.randn(3), 3))
    with pytest.raises(AssertionError, match="compiled error"):
        assert_by_rule("a wrong answer", torch.ones(2), torch.zeros(2) + 1e-7, torch.zeros(2, dtype=torch.float64),
                       OUT_FACTOR)


def test_mla_decodes_on_a_static_cache_in_one_graph_per_chunk_shape():
    """The absorbed path on a StaticCache: a prompt, then one token at a time, one graph per chunk shape."""
    module = _mla()
    x = randn(2, 6, C, seed=4)
    with torch.no_grad():
        full = module(x, absorb=True).output
        golden = copy.deepcopy(module).double()(x.double(), absorb=True).output

    def step_on(cache):
        return lambda chunk: module(chunk, cache=cache[0], absorb=True).output

    with torch.no_grad():
        assert_one_graph(step_on(make_static_cache(module.config, 1, 2, 8)), x[:, :3])  # (also makes the RoPE table)
        cache = make_static_cache(module.config, 1, 2, 8)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(step_on(cache), fullgraph=True, backend=counter, dynamic=False)
        outs = [compiled(x[:, :3]), compiled(x[:, 3:4])]  # the prompt, then T = 1: a new chunk shape
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs += [compiled(x[:, t:t + 1]) for t in (4, 5)]  # same shapes: no recompile
    assert counter.frame_count == 2
    assert cache.lengths.tolist() == [6, 6]
    assert_by_rule("MLA cached decode", torch.cat(outs, 1), full, golden, OUT_FACTOR)
