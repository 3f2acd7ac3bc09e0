"""multihead.hf: the "multihead" attention and mask functions in transformers, the options, what is refused.

The architectures themselves (every model against eager, generate, a
training step) are in tests/test_hf_architectures.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import types

from typing import NamedTuple

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

import multihead as mh
import multihead.hf as mhf
import hf_cases as H
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR, max_err
from multihead.core.call import make_call


def _module(model_type="llama", layer_idx=0, is_causal=True, groups=1):
    """What transformers passes as `module`: an attention layer with a config, a layer_idx and is_causal."""
    module = torch.nn.Module()
    module.config = types.SimpleNamespace(model_type=model_type, output_attentions=False)
    module.layer_idx, module.is_causal, module.num_key_value_groups = layer_idx, is_causal, groups
    return module.eval()


def _count_backends(monkeypatch) -> list:
    """Record (backend, need_lse) of every forward the registry runs."""
    ran = []
    for name in mh.backends.names():
        cls = type(mh.backends.get(name))
        real = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, call, *, need_lse=False, real=real:
                            ran.append((self.name, need_lse)) or real(self, call, need_lse=need_lse))
    return ran


def _llama():
    eager, ours = H.model_pair(H.BY_NAME["Llama"])
    return eager, ours, H.inputs(H.BY_NAME["Llama"], eager)


# ---- registration


def test_import_registers_attention_and_mask_in_a_fresh_process():
    code = ("import sys, multihead; assert 'transformers' not in sys.modules; multihead.hf; "
            "from transformers import AttentionInterface; "
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks; "
            "assert 'multihead' in AttentionInterface().valid_keys() and 'multihead' in masks; "
            "assert multihead.hf.register() == 'multihead' and multihead.hf.is_registered(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.stdout.strip() == "ok", done.stderr


def test_register_is_idempotent_and_restores_the_mapping():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("multihead", sdpa_attention_forward)  # someone overwrote it
    assert not mhf.is_registered()
    assert mhf.register() == mhf.register() == "multihead"
    assert AttentionInterface._global_mapping["multihead"] is mhf.multihead_attention
    assert AttentionMaskInterface._global_mapping["multihead"] is mhf.multihead_mask


def test_from_pretrained_takes_the_name(tmp_path):
    eager, _, batch = _llama()
    eager.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="multihead").eval()
    assert loaded.config._attn_implementation == "multihead"
    with torch.no_grad():
        got, want = loaded(**batch).logits, eager(**batch).logits
    rows = batch["attention_mask"].bool()
    assert max_err(got[rows], want[rows]) < 1e-5


def test_minilm_from_its_packaged_weights_with_attn_implementation():
    from multihead.models import minilm_directory

    model = transformers.BertModel.from_pretrained(str(minilm_directory()), attn_implementation="multihead").eval()
    assert model.config._attn_implementation == "multihead"
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = torch.tensor([[101, 1996, 3063, 4993, 1996, 6533, 102]])
    with torch.no_grad():
        got, want = model(ids), eager(ids, output_attentions=True)
    assert max_err(got.last_hidden_state, want.last_hidden_state) < 1e-5
    assert len(want.attentions) == 6 and got.attentions is None  # none asked for: none made


# ---- every call goes through multihead


def test_every_attention_call_goes_through_the_registry(monkeypatch):
    _, ours, batch = _llama()
    ran = _count_backends(monkeypatch)
    with torch.no_grad():
        out = ours(**batch)
    assert ran == [("sdpa", False)] * 2 and out.attentions is None  # 2 layers, no weights: the plain kernel
    ran.clear()
    with torch.no_grad(), mhf.options(heads=[1]):
        out = ours(**batch, output_attentions=True)
    assert ran == [("sdpa", False)] * 2  # weights of one head: the kernel keeps the output, the head apart
    assert [a.shape for a in out.attentions] == [(H.B, 1, H.T, H.T)] * 2
    ran.clear()
    with torch.no_grad(), mhf.options(backend="chunked"):
        ours(**batch)
    assert ran == [("chunked", False)] * 2


def test_which_backend_says_which_backend_runs_and_why():
    module = _module()
    q, k, v = (torch.randn(1, 4, 6, 8) for _ in range(3))
    report = mhf.which_backend(module, q, k, v, None, scaling=0.3)
    assert report.chosen == "sdpa" and "sdpa       runs" in str(report)
    with mhf.options(backend="reference"):
        assert mhf.which_backend(module, q, k, v, None).chosen == "reference"


# ---- what transformers' arguments mean


class Against(NamedTuple):
    err: float  # ours against float64
    bound: float  # the 2x rule: 2 x the float32 sdpa function's error + slack


def _against_sdpa(run, q, k, v, mask, **kwargs) -> Against:
    """run(...) against transformers' sdpa function: float64 as golden, float32 as yardstick."""
    module = kwargs.pop("module")
    as64 = (lambda x: x if x is None or x.dtype == torch.bool else x.double())  # noqa: E731
    kwargs64 = {key: as64(value) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    golden = sdpa_attention_forward(module, q.double(), k.double(), v.double(), as64(mask), **kwargs64)[0]
    naive = sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]
    got = run(module, q, k, v, mask, **kwargs)[0]
    assert got.shape == golden.shape
    return Against(max_err(got, golden), OUT_FACTOR * max_err(naive, golden) + ABS_SLACK)


@pytest.mark.parametrize("T, S", [(5, 5), (1, 9), (4, 9)])  # square, a decoding step, a prefill into a longer cache
def test_no_mask_means_what_sdpa_means_in_transformers(T, S):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=gen) for n in (T, S, S))
    result = _against_sdpa(mhf.multihead_attention, q, k, v, None, module=_module(), scaling=0.35)
    assert result.err <= result.bound, result


def test_grouped_query_keys_are_not_repeated(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 5, 8, generator=gen)  # 6 query heads
    k, v = (torch.randn(1, 2, 5, 8, generator=gen) for _ in range(2))  # 2 key/value heads
    calls = []
    real = make_call
    monkeypatch.setattr("multihead.hf.attention.make_call", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    result = _against_sdpa(mhf.multihead_attention, q, k, v, None, module=_module(groups=3))
    assert result.err <= result.bound, result
    assert calls == [(1, 2, 5, 8)]  # k reaches multihead with its 2 heads


def test_position_bias_is_added_with_the_mask():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6, generator=gen)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, 4:] = False
    masked = _against_sdpa(mhf.multihead_attention, q, k, v, mask, module=_module(is_causal=False), position_bias=bias)
    causal = _against_sdpa(mhf.multihead_attention, q, k, v, None, module=_module(is_causal=True), position_bias=bias)
    assert masked.err <= masked.bound, masked
    assert causal.err <= causal.bound, causal


def test_a_window_with_no_mask_is_the_mask_transformers_would_build():
    module = _module()
    q = k = v = torch.randn(1, 2, 7, 8)
    want = sdpa_mask(batch_size=1, q_length=7, kv_length=7, mask_function=sliding_window_causal_mask_function(3),
                     allow_is_causal_skip=False)
    square = mhf.translate(module, q, k, v, None, sliding_window=3)  # the alignments agree: a window, no mask
    assert square.attn_mask is None and square.causal is True and square.variants.window == (2, 0)
    got = mhf.multihead_attention(module, q, k, v, None, sliding_window=3)[0]
    assert max_err(got, mhf.multihead_attention(module, q, k, v, want)[0]) < 1e-6
    longer = mhf.translate(module, q[:, :, :3], k, v, None, sliding_window=3)  # T < S: top-left, written out
    assert longer.causal is False and torch.equal(longer.attn_mask[0, 0], want[0, 0, :3])
    assert mhf.translate(module, q, k, v, None, sliding_window=7).variants is None  # the window does not bite
    with pytest.raises(ValueError, match="bidirectional sliding window"):
        mhf.translate(_module(is_causal=False), q, k, v, None, sliding_window=3)


def test_the_mask_function_is_sdpas_except_where_the_alignments_differ():
    padding = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)  # a static cache of 8, 3 tokens in
    prefill = dict(batch_size=1, q_length=3, kv_length=8, attention_mask=padding)
    assert sdpa_mask(**prefill) is None  # sdpa relies on its top-left is_causal here
    ours = mhf.multihead_mask(**prefill)
    assert torch.equal(ours, sdpa_mask(**prefill, allow_is_causal_skip=False))
    assert ours.dtype == torch.bool and ours[0, 0, 0].tolist() == [True] + [False] * 7
    assert mhf.multihead_mask(batch_size=2, q_length=5, kv_length=5) is None  # square, no padding: causal alone
    # a decoding step: after cached tokens of a dynamic cache (int offset) it sees every key, as sdpa's skip says;
    # the first token into a static cache (offset 0, or a tensor offset) gets its mask
    assert mhf.multihead_mask(batch_size=2, q_length=1, kv_length=5, q_offset=4) is None
    assert mhf.multihead_mask(batch_size=2, q_length=1, kv_length=5).shape == (2, 1, 1, 5)
    assert mhf.multihead_mask(batch_size=1, q_length=1, kv_length=5, q_offset=torch.tensor(4)).shape == (1, 1, 1, 5)
    padded = mhf.multihead_mask(batch_size=1, q_length=1, kv_length=5, q_offset=4,
                                attention_mask=torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool))
    assert padded[0, 0, 0].tolist() == [False, True, True, True, True]


def test_a_row_with_no_key_gives_output_and_weights_zero():
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., 0, :] = False  # query 0 sees nothing (a left-padding row)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with mhf.options(heads=[0, 1]):  # the logsumexp path
        out, weights = mhf.multihead_attention(_module(), q, k, v, mask, output_attentions=True)
    assert (out[:, 0] == 0).all() and (weights[:, :, 0] == 0).all()
    assert torch.allclose(weights[:, :, 1:].sum(-1), torch.ones(1, 2, 3))


# ---- refused, never computed wrongly


def test_sinks_that_are_not_one_per_head_are_refused_naming_the_model_and_the_feature():
    q = k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError) as error:  # Inkling-2's kind: one sink per query token
        mhf.multihead_attention(_module("inkling2", layer_idx=1), q, k, v, None, sinks=torch.zeros(1, 2, 3, 1))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("attn_implementation='multihead' cannot run inkling2 (Module, layer 1): it uses "
                              "attention sinks that are not one logit per query head (H,) = (2,)")
    assert "attn_implementation='eager'" in message


@pytest.mark.parametrize("name", sorted(mhf.UNSUPPORTED))
def test_every_keyword_that_changes_the_formula_is_refused(name):
    q = k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=f"cannot run gpt_oss \\(Module, layer 2\\): it uses .*\\({name}=tensor"):
        mhf.multihead_attention(_module("gpt_oss", layer_idx=2), q, k, v, None, **{name: torch.zeros(2)})
    mhf.multihead_attention(_module(), q, k, v, None, **{name: None})  # None: not used, runs


def test_a_mask_of_another_implementation_is_refused():
    q = k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="takes a tensor attention_mask .* got object"):
        mhf.multihead_attention(_module(), q, k, v, object())
    with pytest.raises(ValueError, match=r"key must be \(B, G, S, D\) as transformers passes it, got \(3, 8\)"):
        mhf.multihead_attention(_module(), q, torch.randn(3, 8), v, None)


# ---- the options


def _golden_attentions(eager, batch):
    golden = copy.deepcopy(eager).double()
    with torch.no_grad(), H.float64_softmax():
        want64 = golden(**batch, output_attentions=True).attentions
    with torch.no_grad():
        want32 = eager(**batch, output_attentions=True).attentions
    return want64, want32


def _assert_weights_rule(got, want64, want32):
    err, naive = max_err(got, want64), max_err(want32, want64)
    assert err <= OUT_FACTOR * naive + ABS_SLACK, (err, naive)


@pytest.mark.parametrize("weights_from", ["kernel", "one_pass", "auto"])
def test_chosen_layers_heads_and_rows_equal_eagers(weights_from, monkeypatch):
    eager, ours, batch = _llama()
    want64, want32 = _golden_attentions(eager, batch)
    ran = _count_backends(monkeypatch)
    with torch.no_grad(), mhf.options(layers=[1], heads=[0, 3], rows=[-1, 4], weights_from=weights_from):
        got = ours(**batch, output_attentions=True).attentions
    assert [a.shape for a in got] == [(H.B, 0, 2, H.T), (H.B, 2, 2, H.T)]  # layer 0: empty, index kept
    pick = lambda w: w[:, [0, 3]][:, :, [-1, 4]]  # noqa: E731
    _assert_weights_rule(got[1], pick(want64[1]), pick(want32[1]))
    # layer 0 needs no weights: the plain kernel; layer 1 keeps the kernel for its output and computes the
    # chosen rows' weights apart, or takes the one pass (multihead's eager formula, which runs no backend)
    assert ran == {"kernel": [("sdpa", False)] * 2, "auto": [("sdpa", False)] * 2,
                   "one_pass": [("sdpa", False)]}[weights_from]


@pytest.mark.parametrize("weights_from", ["kernel", "one_pass"])
def test_every_weight_from_either_source_equals_eagers(weights_from):
    eager, ours, batch = _llama()
    want64, want32 = _golden_attentions(eager, batch)
    rows = batch["attention_mask"].bool()
    with torch.no_grad(), mhf.options(weights_from=weights_from):
        got = ours(**batch, output_attentions=True).attentions
    for layer in range(2):
        cut = lambda w: w.transpose(1, 2)[rows]  # noqa: E731  (B, H, T, S) -> (n, H, S): the real queries
        _assert_weights_rule(cut(got[layer]), cut(want64[layer]), cut(want32[layer]))


def test_options_are_checked_nest_and_restore():
    with pytest.raises(TypeError, match="heads must be an int, a sequence of ints, a slice or None, got str"):
        with mhf.options(heads="0"):
            pass
    with pytest.raises(ValueError, match="layers must hold layer indices >= 0"):
        with mhf.options(layers=[-1]):
            pass
    with pytest.raises(ValueError, match="weights_from must be one of"):
        with mhf.options(weights_from="eager"):
            pass
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        with mhf.options(backend="nope"):
            pass
    assert mhf.current() == mhf.Options()
    with mhf.options(heads=[1], backend="chunked"):
        with mhf.options(rows=slice(-2, None)) as inner:
            assert (inner.heads, inner.rows, inner.backend) == ((1,), slice(-2, None), "chunked")
        assert mhf.current().rows is None and mhf.current().heads == (1,)
    assert mhf.current() == mhf.Options()


def test_a_selection_that_does_not_fit_the_call_is_skipped_or_refused():
    q = k = v = torch.randn(1, 2, 3, 8)
    with mhf.options(rows=[5, -1, -4]):  # rows index each call's queries: those it does not have are skipped
        _, weights = mhf.multihead_attention(_module(), q, k, v, None, output_attentions=True)
    assert weights.shape == (1, 2, 1, 3)
    with mhf.options(rows=slice(None, None, -2)):
        _, weights = mhf.multihead_attention(_module(), q, k, v, None, output_attentions=True)
    _, every = mhf.multihead_attention(_module(), q, k, v, None, output_attentions=True)
    assert torch.equal(weights, every[:, :, [2, 0]])
    # heads are the model's: a head it does not have is refused (here at the call: this module built no mask)
    with mhf.options(heads=[5]), pytest.raises(ValueError, match=r"options\(heads=\(5,\)\) is out of range for "
                                                                  r"llama: it has 2 query heads"):
        mhf.multihead_attention(_module(), q, k, v, None, output_attentions=True)
    module = _module()
    module.layer_idx = None
    with mhf.options(layers=[0]), pytest.raises(ValueError, match="Module has layer_idx=None; select heads/rows"):
        mhf.multihead_attention(module, q, k, v, None, output_attentions=True)


def test_weights_when_a_model_does_not_pass_output_attentions_down(monkeypatch):
    """GPT-2 pops output_attentions before its attention layers: the hook reads what transformers collects."""
    case = H.BY_NAME["GPT-2"]
    eager, ours = H.model_pair(case)
    batch = H.inputs(case, eager)
    ran = _count_backends(monkeypatch)
    with torch.no_grad():
        assert ours(**batch).attentions is None
        assert ran == [("sdpa", False)] * 2
        got = ours(**batch, output_attentions=True).attentions
    assert len(got) == 2 and got[0].shape == (H.B, 4, H.T, H.T)


# ---- training


def test_training_weights_are_in_the_graph_and_their_gradients_equal_eagers():
    eager, ours, batch = _llama()
    golden = copy.deepcopy(eager).double()
    grads = []
    for model in (golden, eager, ours):
        model.train()
        with H.float64_softmax():
            weights = model(**batch, output_attentions=True).attentions
        assert weights[0].requires_grad
        probe = torch.randn(weights[1].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        rows = batch["attention_mask"].bool()[:, None, :, None]  # compare what the real queries attend
        (weights[1] * probe.to(weights[1].dtype) * rows).sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    err, naive = max_err(grads[2], grads[0]), max_err(grads[1], grads[0])
    assert err <= GRAD_FACTOR * naive + ABS_SLACK, (err, naive)


def test_dropout_reaches_multihead_in_training_only(monkeypatch):
    case = H.BY_NAME["GPT-2"]
    model = case.make()
    model.config.attn_pdrop = 0.25
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.25
    model.set_attn_implementation("multihead")
    seen = []
    real = mh.ops.run.run
    monkeypatch.setattr("multihead.hf.attention.run", lambda call, *a, **kw: seen.append(call.dropout_p) or
                        real(call, *a, **kw))
    ids = torch.randint(1, H.VOCAB, (1, 6))
    model.train()
    model(ids)
    model.eval()
    model(ids)
    assert seen == [0.25, 0.25, 0.0, 0.0]


def test_the_readme_example_runs_as_written(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index('## Hugging Face models: attn_implementation="multihead"'):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    assert len(code.splitlines()) == 6
    sizes = {**H._DECODER, "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 8}
    config = transformers.LlamaConfig(**sizes, num_key_value_heads=2)  # 4 layers, 8 heads: the example picks layer 3, head 5
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    batch = {"input_ids": torch.randint(1, H.VOCAB, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    scope = {"path": str(tmp_path), "batch": batch}
    with torch.no_grad():
        exec(code, scope)
    assert [a.shape for a in scope["out"].attentions] == [(2, 0, 1, 7)] * 3 + [(2, 2, 1, 7)]
    assert scope["model"].config._attn_implementation == "multihead"
    assert len(str(scope["multihead"].hf.report(scope["model"], **batch)).splitlines()) == 1 + 4  # a line a layer


def test_falcon_returns_the_weights_it_is_asked_for():
    """Falcon's attention takes output_attentions by name and keeps it: the hook reads what the layer received."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=H.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       attention_dropout=0.0, hidden_dropout=0.0)
    eager = transformers.FalconForCausalLM(config).eval()
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation("multihead")
    ids = torch.randint(3, H.VOCAB, (2, 7))
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
        got = ours(ids, output_attentions=True).attentions
        assert ours(ids).attentions is None and ours(ids, output_attentions=False).attentions is None
        with mhf.options(heads=[3], rows=-1):
            chosen = ours(ids, output_attentions=True).attentions
    assert len(got) == 2 and all(w is not None for w in got)
    for layer in range(2):
        assert got[layer].shape == (2, 4, 7, 7) and max_err(got[layer], want[layer]) < 1e-6
        assert max_err(chosen[layer], want[layer][:, 3:, -1:]) < 1e-6
