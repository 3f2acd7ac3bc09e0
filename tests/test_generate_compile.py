"""Compiled decoding: GPT-2 and Llama steps compile whole, once, and decode the eager tokens.

- One decode step with a StaticCache (the prompt's chunk and single tokens)
  traces with 0 graph breaks (`torch._dynamo.explain`), through the checked
  `forward` (each layer's call checked once) and the lean `decode_step`
  (no argument check at all, counted inside the compiled graph).
- Compiled (fullgraph=True, dynamic=False) it gives the eager outputs and,
  after the expected compiles, is replayed without recompiling as the cache
  fills (`error_on_recompile`).
- `generate(compile=...)` chooses the eager tokens; the compiled step is
  kept per model without keeping the model alive; bad values are refused.
- The "no key" rule (output 0, gradient 0) holds compiled, where nothing
  may read a tensor on the host.

The suite compiles with backend="aot_eager" or "eager" (fast on two cores);
one end-to-end test uses inductor. A compile slower than COMPILE_BUDGET_S
skips its test, saying so, as tests/test_cache.py does.
"""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

from conftest import max_err
from multihead import MultiHeadAttention
from multihead.generate import CompileConfig, generate, static_length, stream
from multihead.models.gpt2 import GPT2, GPT2Config
from multihead.models.llama import Llama, LlamaConfig

COMPILE_BUDGET_S = 60.0  # on a 2-core CPU a first compile takes tens of seconds; beyond this, skip
TIGHT = 1e-12  # float64: the same operations, eager or traced
V = 96  # vocabulary of the test models


def make_model(kind: str, dtype=torch.float32, seed: int = 0):
    """A small random decoder (C=64, 2 layers) with varied logits (std 0.2), so greedy tokens rarely tie."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2(GPT2Config(vocab_size=V, max_positions=128, d_model=64, num_layers=2, num_heads=4))
    else:
        model = Llama(LlamaConfig(vocab_size=V, max_positions=128, d_model=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, d_mlp=96))
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.2)
    return model.eval().to(dtype)


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


class Budget:
    """Skips the test when the compiles so far took longer than COMPILE_BUDGET_S."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def check(self) -> None:
        if time.perf_counter() - self.start > COMPILE_BUDGET_S:
            pytest.skip(f"torch.compile took over {COMPILE_BUDGET_S:.0f} s on this CPU")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def checked_step(model, chunk, cache):
    return model(chunk, cache=cache).logits  # (B, T, V)


def lean_step(model, chunk, cache):
    return model.decode_step(chunk, cache)  # (B, T, V)


# ---- item 2: one step compiles whole, once


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("step", [checked_step, lean_step], ids=["forward", "decode_step"])
def test_prefill_and_single_token_steps_trace_without_graph_breaks(kind, step, monkeypatch):
    from conftest import count_checks

    model = make_model(kind)
    L = model.config.num_layers
    cache = model.make_cache(batch_size=2, max_length=16, static=True)
    with torch.no_grad():
        if step is lean_step:  # decode_step continues a cache that the checked forward started
            model(ids(2, 5), cache=cache)
            chunks = [ids(2, 3, seed=1), ids(2, 1, seed=2)]
        else:
            chunks = [ids(2, 5), ids(2, 1, seed=2)]
        counts = count_checks(monkeypatch)
        for chunk in chunks:  # a prompt-sized chunk, then one token
            counts.update(dict.fromkeys(counts, 0))
            report = torch._dynamo.explain(step)(model, chunk, cache)
            assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
            assert report.graph_count == 1
            # dynamo replays the counters' side effects on each run of the graph: the traced checked forward
            # checks each layer's call once; the compiled decode step runs no check, only each module's step
            checked = 0 if step is lean_step else L
            assert counts == dict(inputs=checked, latent=0, make_call=0, check_mask=checked, plan=checked,
                                  update=L, decode=L - checked), counts
    assert cache.lengths.tolist() == ([9, 9] if step is lean_step else [6, 6])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("step", [checked_step, lean_step], ids=["forward", "decode_step"])
def test_compiled_step_equals_eager_and_does_not_recompile_as_the_cache_fills(kind, step):
    model = make_model(kind, torch.float64)
    x = ids(2, 9, seed=3)
    eager_cache = model.make_cache(batch_size=2, max_length=12, static=True)
    cache = model.make_cache(batch_size=2, max_length=12, static=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    budget = Budget()
    with torch.no_grad():
        eager = [model(x[:, :4], cache=eager_cache).logits] + [
            step(model, x[:, t:t + 1], eager_cache) for t in range(4, 9)]
        first = model if step is lean_step else compiled  # decode_step continues a checked prefill
        outs = [(checked_step if first is model else compiled)(model, x[:, :4], cache)]
        outs.append(compiled(model, x[:, 4:5], cache))  # the one-token graph: the expected compile
        budget.check()
        with torch._dynamo.config.patch(error_on_recompile=True):  # same shapes from here on
            outs += [compiled(model, x[:, t:t + 1], cache) for t in range(5, 9)]
    assert max_err(torch.cat(outs, 1), torch.cat(eager, 1)) < TIGHT
    assert cache.lengths.tolist() == [9, 9]


# ---- generate(compile=...)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_compiled_gives_the_eager_tokens_for_a_padded_batch(kind):
    model = make_model(kind)
    prompt = ids(3, 6, seed=4)
    key_mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] * 4 + [False] * 2])
    settings = dict(key_mask=key_mask, max_new_tokens=9, stop_tokens=(7,))
    eager = generate(model, prompt, **settings)
    budget = Budget()
    compiled = generate(model, prompt, compile=CompileConfig(backend="aot_eager"), **settings)
    budget.check()
    assert torch.equal(compiled.tokens, eager.tokens)
    assert torch.equal(compiled.lengths, eager.lengths) and torch.equal(compiled.finished, eager.finished)
    assert len(set(eager.tokens[:, 6:].flatten().tolist())) > 3, "a varied continuation: the check means something"
    # another call of the same batch size and cache length (prompt + new tokens round alike): no new compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(model, prompt, compile=CompileConfig(backend="aot_eager"),
                         **dict(settings, max_new_tokens=12))
    for b, n in enumerate(compiled.lengths.tolist()):  # the longer run begins with the shorter one
        assert again.tokens[b, :n].tolist() == compiled.tokens[b, :n].tolist()


def test_generate_compiled_samples_the_eager_tokens_with_a_seed():
    model = make_model("llama")
    prompt = ids(2, 5, seed=5)
    settings = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, seed=11)
    eager = [step.tokens for step in stream(model, prompt, **settings)]
    compiled = [step.tokens for step in stream(model, prompt, compile=CompileConfig(backend="eager"), **settings)]
    assert torch.equal(torch.stack(compiled), torch.stack(eager))


def test_generate_compiled_with_inductor_gives_the_eager_tokens():
    model = make_model("gpt2")
    prompt = ids(2, 5, seed=6)
    eager = generate(model, prompt, max_new_tokens=6)
    budget = Budget()
    compiled = generate(model, prompt, max_new_tokens=6, compile=True)
    budget.check()
    assert torch.equal(compiled.tokens, eager.tokens)


def test_the_cuda_graph_mode_copies_the_lengths_out_of_the_step_and_gives_the_eager_tokens():
    """mode="reduce-overhead" (CUDA graphs on CUDA) wraps the step; traced here without code generation."""
    model = make_model("llama")
    prompt, key_mask = ids(2, 5, seed=7), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    eager = generate(model, prompt, key_mask=key_mask, max_new_tokens=7)
    compiled = generate(model, prompt, key_mask=key_mask, max_new_tokens=7,
                        compile=CompileConfig(mode="reduce-overhead", backend="eager"))
    assert torch.equal(compiled.tokens, eager.tokens)
    cache = model.make_cache(batch_size=2, max_length=8, static=True)
    with torch.no_grad():
        model(prompt, cache=cache)
        model.decode_step(ids(2, 1), cache)  # one layout for every layer: one lengths tensor
    shared = cache.lengths
    assert all(layer.lengths is shared for layer in cache)
    cache.copy_lengths()
    assert cache.lengths is not shared and all(layer.lengths is cache.lengths for layer in cache)
    assert cache.lengths.tolist() == shared.tolist() == [6, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_generate_compiled_with_cuda_graphs_gives_the_eager_tokens():
    from torch._dynamo.utils import counters

    model = make_model("gpt2").cuda()
    prompt = ids(3, 6, seed=4).cuda()
    key_mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] * 4 + [False] * 2], device="cuda")
    settings = dict(key_mask=key_mask, max_new_tokens=12, stop_tokens=(7,))
    eager = generate(model, prompt, **settings)
    counters.clear()
    compiled = generate(model, prompt, compile=True, **settings)  # mode "reduce-overhead" on CUDA
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(model, prompt, compile=True, **settings)
    assert torch.equal(compiled.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    assert counters["inductor"]["cudagraph_skips"] == 0, "the step must replay as a CUDA graph"


def test_the_compiled_step_does_not_keep_the_model_alive():
    model = make_model("gpt2")
    generate(model, ids(1, 3), max_new_tokens=3, compile=CompileConfig(backend="eager"))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_static_length_rounds_up_to_a_power_of_two_within_the_positions():
    assert [static_length(n, None) for n in (1, 64, 65, 100, 129)] == [64, 64, 128, 128, 256]
    assert static_length(100, 110) == 110 and static_length(110, 110) == 110 and static_length(30, 40) == 40


@pytest.mark.parametrize("value, error, message", [
    ("fast", ValueError, r"compile must be False, True, a torch.compile mode \('default', 'reduce-overhead'.*"
                         r"got str 'fast'"),
    (1, TypeError, r"compile must be False, True, .* or a multihead.generate.CompileConfig, got int 1"),
    (None, TypeError, r"compile must be .*got NoneType None"),
])
def test_bad_compile_values_are_refused_naming_the_argument(value, error, message):
    with pytest.raises(error, match=message):
        generate(make_model("gpt2"), ids(1, 3), max_new_tokens=2, compile=value)


def test_compile_needs_the_cache_and_a_known_mode():
    with pytest.raises(ValueError, match="compile needs use_cache=True"):
        generate(make_model("gpt2"), ids(1, 3), max_new_tokens=2, compile=True, use_cache=False)
    with pytest.raises(ValueError, match=r"CompileConfig mode must be None or one of .*got 'fast'"):
        CompileConfig(mode="fast")
    with pytest.raises(TypeError, match="CompileConfig backend must be a torch.compile backend name"):
        CompileConfig(backend=None)


# ---- the lean step is the checked forward's arithmetic


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("static", [False, True])
def test_decode_step_equals_the_checked_forward_with_padding(kind, static):
    model = make_model(kind, torch.float64)
    caches = [model.make_cache(batch_size=2, max_length=20, static=True) if static
              else model.make_cache(batch_size=2) for _ in range(2)]
    prompt_mask = torch.tensor([[True] * 5 + [False] * 4, [True] * 9])
    with torch.no_grad():
        for cache in caches:
            model(ids(2, 9), key_mask=prompt_mask, cache=cache)
        for t in range(4):
            chunk, feed = ids(2, 1, seed=10 + t), torch.tensor([[True], [t % 2 == 0]])  # row 1 pauses
            checked = model(chunk, key_mask=feed, cache=caches[0]).logits
            lean = model.decode_step(chunk, caches[1], key_mask=feed)
            assert max_err(lean[feed[:, 0]], checked[feed[:, 0]]) < TIGHT
            chunk = ids(2, 2, seed=20 + t)
            assert max_err(model.decode_step(chunk, caches[1]), model(chunk, cache=caches[0]).logits) < TIGHT
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [17, 19]


# ---- the "no key" rule, compiled


def test_a_row_with_no_key_gives_zero_output_and_gradient_when_compiled():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    key_mask = torch.tensor([[True] * 5, [False] * 5])  # sequence 1 has no key at all

    def attend(x):
        return mha(x, key_mask=key_mask).output

    report = torch._dynamo.explain(attend)(x)
    assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
    out = torch.compile(attend, backend="aot_eager", fullgraph=True, dynamic=False)(x)
    bias = mha.out_proj.bias.detach()
    assert torch.equal(out[1], bias.expand(5, 16)), "no key: the attention is 0, only W^O's bias remains"
    out.sum().backward()
    assert torch.equal(x.grad[1], torch.zeros(5, 16, dtype=torch.float64))
    assert max_err(out[0], attend(x)[0]) < TIGHT
