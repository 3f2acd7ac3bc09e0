"""Compiled decoding: GPT-2 and Llama steps compile whole, once, and decode the eager tokens.

- One decode step with a StaticCache (the prompt's chunk and single tokens)
  traces with 0 graph breaks (`torch._dynamo.explain`, and fullgraph=True),
  through the checked `forward` (each layer's call checked once) and the
  lean `decode_step` (no argument check at all, counted inside the compiled
  graph).
- Compiled (fullgraph=True, dynamic=False) it gives the eager outputs and,
  after the expected compiles, is replayed without recompiling as the cache
  fills (`error_on_recompile`, a frame counter). One test per path: the
  trace, the counts and the compiled numbers share its model and compile.
- `generate(compile=...)` chooses the eager tokens; the compiled step is
  kept per model without keeping the model alive; bad values are refused.
- A serving loop's shapes (batch sizes 1..11, prompt lengths, max_new_tokens,
  padding, stop tokens, sampling) all decode the eager tokens with 4 graphs
  (one for B = 1, one for every B >= 2, per cache length), every step run by
  a graph; past CompileConfig.max_compiles, or when torch.compile refuses a
  graph, a call decodes eagerly with one warning per model.
- (The "no key" rule compiled, output 0 and gradient 0 with nothing read
  on the host, is tests/test_compile.py's.)

The suite compiles with backend="aot_eager" or "eager" (fast on two cores);
one end-to-end test uses inductor. A compile slower than COMPILE_BUDGET_S
skips its test, saying so, as tests/test_cache.py does.
"""

from __future__ import annotations

import gc
import inspect
import time
import warnings
import weakref

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import max_err
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


@pytest.fixture
def fresh_dynamo():
    """For the tests that compile: no earlier compile in the counts, none left behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def checked_step(model, chunk, cache):
    return model(chunk, cache=cache).logits  # (B, T, V)


def lean_step(model, chunk, cache):
    return model.decode_step(chunk, cache)  # (B, T, V)


# ---- item 2: one step compiles whole, once


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("step", [checked_step, lean_step], ids=["forward", "decode_step"])
def test_a_step_traces_whole_checks_once_equals_eager_and_does_not_recompile_as_the_cache_fills(
        kind, step, monkeypatch):
    """One path, one model, one compile: explain's graph breaks, the checks counted in the graph, eager's logits.

    The checked forward compiles the prompt's chunk and then single tokens (2 graphs); decode_step continues a
    cache that the eager checked forward started (1 graph). explain traces the chunk the compile does not
    see as its first shape (a single token for the forward, a 3-token chunk for decode_step); fullgraph=True
    refuses any break in the compiled ones.
    """
    from conftest import count_checks

    model = make_model(kind, torch.float64)
    L = model.config.num_layers
    checked = 0 if step is lean_step else L
    # dynamo replays the counters' side effects on each run of the graph: the traced checked forward
    # checks each layer's call once; the compiled decode step runs no check, only each module's step
    per_call = dict(inputs=checked, latent=0, make_call=0, check_mask=checked, plan=checked, update=L,
                    decode=L - checked)
    x = ids(2, 9, seed=3)
    eager_cache, explain_cache, cache = (model.make_cache(batch_size=2, max_length=12, static=True)
                                         for _ in range(3))
    with torch.no_grad():
        eager = [model(x[:, :4], cache=eager_cache).logits] + [
            step(model, x[:, t:t + 1], eager_cache) for t in range(4, 9)]
        model(x[:, :4], cache=explain_cache)
        counts = count_checks(monkeypatch)
        report = torch._dynamo.explain(step)(model, ids(2, 3 if step is lean_step else 1, seed=1), explain_cache)
        assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
        assert report.graph_count == 1
        assert counts == per_call, counts
        torch._dynamo.reset()

        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
        budget = Budget()
        outs = []
        for t, chunk in [(0, x[:, :4])] + [(t, x[:, t:t + 1]) for t in range(4, 9)]:
            counts.update(dict.fromkeys(counts, 0))
            if t == 0 and step is lean_step:  # decode_step continues a checked prefill
                outs.append(checked_step(model, chunk, cache))
                continue
            with torch._dynamo.config.patch(error_on_recompile=t > 4):  # same shapes after the one-token graph
                outs.append(compiled(model, chunk, cache))
            assert counts == per_call, (t, counts)
            budget.check()
    assert counter.frame_count == (1 if step is lean_step else 2)
    assert max_err(torch.cat(outs, 1), torch.cat(eager, 1)) < TIGHT
    assert cache.lengths.tolist() == [9, 9] and explain_cache.lengths.tolist() == [7 if step is lean_step else 5] * 2


# ---- generate(compile=...)


@pytest.mark.usefixtures("fresh_dynamo")
def test_generate_compiled_gives_the_eager_tokens_greedy_and_sampled_and_lets_the_model_go():
    """A padded batch with a stop token (the step gets a feed mask), greedy then sampled with a seed, on one
    compiled step: the eager tokens, no recompile; the compiled step does not keep the model alive."""
    model = make_model("llama")
    prompt = ids(3, 6, seed=4)
    key_mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] * 4 + [False] * 2])
    settings = dict(key_mask=key_mask, max_new_tokens=9, stop_tokens=(7,))
    config = CompileConfig(backend="aot_eager")
    eager = generate(model, prompt, **settings)
    budget = Budget()
    compiled = generate(model, prompt, compile=config, **settings)
    budget.check()
    assert torch.equal(compiled.tokens, eager.tokens)
    assert torch.equal(compiled.lengths, eager.lengths) and torch.equal(compiled.finished, eager.finished)
    assert len(set(eager.tokens[:, 6:].flatten().tolist())) > 3, "a varied continuation: the check means something"
    # other calls of the same batch size and cache length (prompt + new tokens round alike): no new compile
    sampling = dict(settings, do_sample=True, temperature=0.8, top_k=20, seed=11)
    sampled_eager = [s.tokens for s in stream(model, prompt, **sampling)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(model, prompt, compile=config, **dict(settings, max_new_tokens=12))
        sampled = [s.tokens for s in stream(model, prompt, compile=config, **sampling)]
    for b, n in enumerate(compiled.lengths.tolist()):  # the longer run begins with the shorter one
        assert again.tokens[b, :n].tolist() == compiled.tokens[b, :n].tolist()
    assert torch.equal(torch.stack(sampled), torch.stack(sampled_eager))
    assert not torch.equal(torch.stack(sampled_eager), eager.tokens[:, 6:6 + len(sampled_eager)].T), "it sampled"
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "the compiled step keeps the model alive"


# ---- any shape: a dynamic batch, bounded compiles, an eager fall-back with one warning


class GraphCounter:
    """A torch.compile backend by name (COUNTING): counts the graphs it compiles and the runs of them (as "eager")."""

    def __init__(self) -> None:
        self.compiles = self.runs = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)
        return run


COUNTING = "multihead_test_graph_counter"
GRAPHS = GraphCounter()
if COUNTING not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(lambda gm, example_inputs: GRAPHS(gm, example_inputs), name=COUNTING)


@pytest.fixture
def graphs(fresh_dynamo):
    GRAPHS.compiles = GRAPHS.runs = 0
    return GRAPHS


def compiled_and_eager(model, prompt, config, caught, **settings):
    """generate's tokens with `config` and eagerly; the steps a graph should have run; the warnings in `caught`."""
    with warnings.catch_warnings(record=True) as new:
        warnings.simplefilter("always")
        compiled = generate(model, prompt, compile=config, **settings)
    caught.extend(str(w.message) for w in new if issubclass(w.category, RuntimeWarning))
    eager = generate(model, prompt, **settings)
    steps = int((eager.lengths - eager.prompt_lengths).max()) - 1  # the prompt's forward chose the first token
    return compiled.tokens, eager.tokens, steps


# (B, T, max_new_tokens, stop_tokens, right-padded, sampled): 13 shapes, batch sizes 1..11, cache 64 or 128
SERVING = [(1, 5, 3, (), False, False), (2, 5, 3, (), False, False), (9, 5, 3, (), False, False),
           (3, 7, 6, (7,), True, False), (11, 2, 4, (), True, False), (1, 9, 5, (3, 7), False, False),
           (4, 60, 10, (), False, False), (6, 3, 3, (), False, True), (1, 62, 4, (), False, False),
           (5, 12, 8, (5,), True, True), (10, 60, 6, (), True, False), (7, 4, 12, (9,), False, False),
           (8, 6, 2, (), False, True)]


def test_generate_compiled_takes_a_serving_loops_shapes_with_a_bounded_number_of_graphs(graphs):
    """Every shape gives the eager tokens, without an exception or a warning, every decode step run by a graph,
    and 4 graphs in all: B = 1 or B >= 2 (dynamic), cache length 64 or 128; stop tokens share them.
    (Before: each batch size, cache length and stop setting compiled anew; the 9th raised FailOnRecompileLimitHit.)
    """
    model, config, caught, steps = make_model("llama"), CompileConfig(backend=COUNTING), [], 0
    assert len({case[:4] for case in SERVING}) >= 12 and sorted({case[0] for case in SERVING}) == list(range(1, 12))
    budget = Budget()
    for i, (B, T, n, stop, padded, sampled) in enumerate(SERVING):
        lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(i)) if padded else [T]
        key_mask = torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]  # (B, T), or (1, T): no padding
        settings = dict(key_mask=key_mask if padded else None, max_new_tokens=n, stop_tokens=stop)
        if sampled:
            settings.update(do_sample=True, temperature=0.9, seed=i)
        compiled, eager, call_steps = compiled_and_eager(model, ids(B, T, seed=i), config, caught, **settings)
        assert torch.equal(compiled, eager), (i, B, T, n)
        steps += call_steps
        budget.check()
    assert caught == []
    assert (graphs.compiles, graphs.runs) == (4, steps)


@pytest.mark.usefixtures("fresh_dynamo")
def test_generate_compiled_with_inductor_gives_the_eager_tokens():
    model = make_model("gpt2")
    prompt = ids(2, 5, seed=6)
    eager = generate(model, prompt, max_new_tokens=6)
    budget = Budget()
    compiled = generate(model, prompt, max_new_tokens=6, compile=True)
    budget.check()
    assert torch.equal(compiled.tokens, eager.tokens)


@pytest.mark.usefixtures("fresh_dynamo")
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


@pytest.mark.usefixtures("fresh_dynamo")
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


def test_beyond_max_compiles_a_call_decodes_eagerly_with_one_warning_per_model(graphs):
    """max_compiles=1: the first shape compiles; a batch of 1 and a longer cache decode eagerly (the eager tokens,
    one warning for both); another batch size of the first cache length runs the graph, without a warning."""
    model, config, caught = make_model("llama"), CompileConfig(backend=COUNTING, max_compiles=1), []
    steps = []
    for i, (B, T, n) in enumerate([(3, 5, 4), (1, 5, 4), (2, 62, 4), (1, 9, 3), (5, 4, 6)]):
        compiled, eager, call_steps = compiled_and_eager(model, ids(B, T, seed=i), config, caught, max_new_tokens=n)
        assert torch.equal(compiled, eager), (i, B, T, n)
        steps.append(call_steps)
    assert len(caught) == 1 and "limit of 1 compiled shapes" in caught[0] and "batch 1, cache length 64" in caught[0]
    assert (graphs.compiles, graphs.runs) == (1, steps[0] + steps[4])
    with pytest.raises(ValueError, match="CompileConfig max_compiles must be an int >= 1, got 0"):
        CompileConfig(max_compiles=0)


@pytest.mark.skipif("recompile_limit" not in inspect.signature(torch.compile).parameters,
                    reason="torch.compile(recompile_limit=) is torch >= 2.13's")
def test_a_graph_torch_compile_refuses_decodes_eagerly_with_one_warning(graphs):
    """A change the shapes do not see (requires_grad) needs a new graph past torch's limit: torch.compile refuses
    before anything ran; that call and the later ones of that shape decode eagerly, one warning in all."""
    model, config, caught = make_model("llama"), CompileConfig(backend=COUNTING, max_compiles=1), []
    prompt = ids(2, 5)
    first, eager, steps = compiled_and_eager(model, prompt, config, caught, max_new_tokens=5)
    model.requires_grad_(False)
    for _ in range(2):
        again, _, _ = compiled_and_eager(model, prompt, config, caught, max_new_tokens=5)
        assert torch.equal(again, eager)
    assert torch.equal(first, eager) and len(caught) == 1 and "torch.compile refused one more graph" in caught[0]
    assert (graphs.compiles, graphs.runs) == (1, steps)


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


# the other two pairs of (model, cache kind) take one paused step in
# tests/test_models_decoder.py::test_a_decode_step_checks_each_layer_at_most_once
@pytest.mark.parametrize("kind, static", [("gpt2", False), ("llama", True)])
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
