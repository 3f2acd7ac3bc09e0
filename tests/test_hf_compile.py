"""A transformers model on attn_implementation="multihead" under torch.compile: whole graphs, eager's numbers.

Dynamo cannot trace a ContextVar, so the hook reads its options from a
plain global under compile (`multihead.hf.options`, module docstring); the
tests count the graphs a fullgraph compile makes (a graph break would fail
it) with a counting backend that runs each graph eagerly, so they stay fast.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_cases as H
import multihead.hf as mhf
from conftest import max_err

GRAPHS: list[int] = []  # nodes of every graph dynamo hands to `_counted`


def _counted(graph: torch.fx.GraphModule, example_inputs) -> callable:
    """A torch.compile backend that counts the graphs and runs them as traced."""
    GRAPHS.append(len(graph.graph.nodes))
    return graph.forward


def _compiled(model):
    torch._dynamo.reset()
    GRAPHS.clear()
    return torch.compile(model, fullgraph=True, backend=_counted)


MODELS = [pytest.param(H.BY_NAME[name], id=name) for name in ("Llama", "Qwen2")]


@pytest.mark.parametrize("case", MODELS)
def test_the_whole_model_compiles_as_one_graph_and_equals_eager(case):
    eager, ours = H.model_pair(case)
    batch = H.inputs(case, eager)
    rows = batch["attention_mask"].bool()
    compiled = _compiled(ours)
    with torch.no_grad():
        got, plain, want = compiled(**batch).logits, ours(**batch).logits, eager(**batch).logits
    assert len(GRAPHS) == 1 and GRAPHS[0] > 50  # one graph: every layer's attention inside it, no break
    assert torch.equal(got, plain)
    assert max_err(got[rows], want[rows]) < 1e-5


@pytest.mark.parametrize("case", MODELS)
def test_compiled_static_cache_generation_gives_eagers_tokens(case):
    eager, ours = H.model_pair(case)
    batch = H.inputs(case, eager)
    compile_config = transformers.CompileConfig(fullgraph=True, backend=_counted, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    settings = dict(max_new_tokens=H.NEW_TOKENS, do_sample=False, cache_implementation="static")
    GRAPHS.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        want = eager.generate(**batch, **settings)
        got = ours.generate(**batch, **settings, compile_config=compile_config)
    # the decoding steps ran compiled: Llama's in one graph, Qwen2's in two (its sliding layers' cache fills up
    # at the window, a guard transformers' own sdpa compiles twice for as well)
    assert len(GRAPHS) == {"Llama": 1, "Qwen2": 2}[case.name]
    assert torch.equal(got, want)


def test_options_follow_the_block_around_a_compiled_call():
    eager, ours = H.model_pair(H.BY_NAME["Llama"])
    batch = H.inputs(H.BY_NAME["Llama"], eager)
    with torch.no_grad():
        every = ours(**batch, output_attentions=True).attentions  # also lets transformers install its output hooks
        compiled = _compiled(ours)
        with mhf.options(layers=[1], heads=[2, 0], rows=-1):
            chosen = compiled(**batch, output_attentions=True).attentions
            again = compiled(**batch, output_attentions=True).attentions
        assert len(GRAPHS) == 1  # the same options: the same graph
        outside = compiled(**batch, output_attentions=True).attentions
    assert len(GRAPHS) == 2  # the defaults again: the guard on the options compiled once more
    assert [a.shape for a in chosen] == [(H.B, 0, 1, H.T), (H.B, 2, 1, H.T)]
    assert torch.equal(chosen[1], again[1])
    assert max_err(chosen[1], every[1][:, [2, 0], -1:]) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(outside, every))


def test_options_entered_inside_a_compiled_function_are_refused_by_name():
    def inside(x):
        with mhf.options(heads=[0]):
            return x + 1

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"multihead.hf.options\(\) cannot be entered inside a compiled function"):
        torch.compile(inside, fullgraph=True, backend="eager")(torch.ones(2))
