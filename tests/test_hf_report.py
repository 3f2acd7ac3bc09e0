"""multihead.hf.report: for a model and an input, each attention call's backend and why, as it runs."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_cases as H
import multihead as mh
import multihead.hf as mhf

WHERE = ["model.layers.0.self_attn (LlamaAttention)", "model.layers.1.self_attn (LlamaAttention)"]


def _llama():
    eager, ours = H.model_pair(H.BY_NAME["Llama"])
    return eager, ours, H.inputs(H.BY_NAME["Llama"], eager)


def _ran(monkeypatch) -> list[str]:
    """The name of every backend whose forward runs."""
    ran = []
    for name in mh.backends.names():
        cls = type(mh.backends.get(name))
        monkeypatch.setattr(cls, "forward", lambda self, call, *, need_lse=False, real=cls.forward:
                            ran.append(self.name) or real(self, call, need_lse=need_lse))
    return ran


def test_one_line_per_layer_with_the_backend_that_ran_and_why(monkeypatch):
    _, ours, batch = _llama()
    ran = _ran(monkeypatch)
    report = mhf.report(ours, **batch)
    assert isinstance(report, mhf.Report) and all(isinstance(c, mhf.CallReport) for c in report.calls)
    assert [c.where for c in report.calls] == WHERE and [c.layer for c in report.calls] == [0, 1]
    assert [c.backend for c in report.calls] == ran == ["sdpa", "sdpa"]
    assert {c.why for c in report.calls} == {"the fastest backend that supports the call"}
    assert report.calls[0].q == (H.B, 4, H.T, 8) and report.calls[0].kv == (H.B, 2, H.T, 8)
    dispatch = report.calls[0].dispatch
    assert dispatch.chosen == "sdpa" and set(dispatch.reasons) == set(mh.backends.names())
    lines = str(report).splitlines()
    assert lines[0] == "LlamaForCausalLM on attn_implementation='multihead': 2 attention calls"
    assert len(lines) == 3 and all(line.lstrip().startswith(where) for line, where in zip(lines[1:], WHERE))
    assert all(" sdpa " in line for line in lines[1:])


def test_why_names_the_backends_that_cannot(monkeypatch):
    _, ours, batch = _llama()
    sdpa = type(mh.backends.get("sdpa"))
    monkeypatch.setattr(sdpa, "supports", lambda self, call, *, need_lse=False: "refused by this test")
    ran = _ran(monkeypatch)
    report = mhf.report(ours, **batch)
    chosen = report.calls[0].backend
    assert [c.backend for c in report.calls] == ran == [chosen] * 2 and chosen != "sdpa"
    above = [name for name in mh.backends.names()][:mh.backends.names().index(chosen)]  # ranked before it
    refusals = [f"{name} cannot: {report.calls[0].dispatch.reasons[name]}" for name in above]
    assert refusals[0] == "sdpa cannot: refused by this test"
    assert report.calls[0].why == "; ".join(["the first that supports the call"] + refusals)
    assert f"{chosen:<10} the first that supports the call; sdpa cannot: refused by this test" in str(report)


def test_the_options_in_force_and_the_weights_plan_are_reported(monkeypatch):
    _, ours, batch = _llama()
    with mhf.options(backend="chunked", layers=[1], heads=[0]):
        pinned = mhf.report(ours, **batch, output_attentions=True)
    assert [c.backend for c in pinned.calls] == ["chunked"] * 2
    assert pinned.calls[0].why == "pinned by multihead.hf.options(backend='chunked')"
    assert [c.weights for c in pinned.calls] == ["skipped", "kernel"]
    every = mhf.report(ours, **batch, output_attentions=True)  # every weight: multihead's one pass
    assert [(c.backend, c.weights, c.dispatch) for c in every.calls] == [("one pass", "one_pass", None)] * 2
    assert "every weight asked for" in every.calls[0].why and "weights: from the one pass" in str(every)


def test_a_cache_in_the_inputs_is_left_as_it_was():
    _, ours, batch = _llama()
    cache = transformers.DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(**batch, cache=cache, use_cache=True)
    step = {"input_ids": batch["input_ids"][:, :1],
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones(H.B, 1, dtype=torch.long)], dim=1)}
    report = mhf.report(ours, **step, cache=cache, use_cache=True)
    assert [(c.q[2], c.kv[2]) for c in report.calls] == [(1, H.T + 1)] * 2  # the step saw the cached keys
    assert [cache.get_seq_length(layer) for layer in range(2)] == [H.T] * 2


def test_what_is_not_a_multihead_model_is_refused():
    eager, _, batch = _llama()
    with pytest.raises(TypeError, match="model must be a transformers model .* got str"):
        mhf.report("llama", **batch)
    with pytest.raises(ValueError, match="needs a model on attn_implementation='multihead', got 'eager'"):
        mhf.report(eager, **batch)
