"""attn_implementation="multihead" for the attention family: Gemma-2's softcap, gpt-oss's sinks, sliding windows
and packed batches, each equal to eager in float64 (the same formula summed in another order).

The models are tests/hf_cases.py's (2 layers, hidden 32; Gemma-2 and gpt-oss with weights drawn wide enough
for the softcap and the sinks to matter). The mask function's StructuredMask (a window and documents that reach
multihead as such, never written out) is checked against transformers' own dense mask, arguments for arguments.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import masking_utils as mu

import hf_cases as H
import multihead.hf as mhf
from multihead.integrations.hf.mask import Structure, StructuredMask

# float64 eps is 2.2e-16: the same formula in another summation order differs by ~1e-15 here; a formula
# that misses the softcap, a sink, the window or a document boundary differs by more than 1e-3 (asserted below)
EQUAL = 1e-10
VARIANTS = ["Gemma-2", "gpt-oss"]


def _pair(name: str):
    eager, ours = H.model_pair(H.BY_NAME[name], dtype=torch.float64)
    return eager, ours


def _without_the_variant(model):
    """The same weights with Gemma-2's softcap or gpt-oss's sinks taken out (eager still)."""
    plain = copy.deepcopy(model)
    for layer in plain.model.layers:
        if hasattr(layer.self_attn, "sinks"):
            layer.self_attn.sinks.data.fill_(-1e4)  # exp(-1e4) = 0: no sink
        else:
            layer.self_attn.attn_logit_softcapping = None
    return plain


def _padded_or_not(name: str, padded: bool, model) -> dict:
    batch = H.inputs(H.BY_NAME[name], model)
    if not padded:
        batch = {"input_ids": batch["input_ids"].clamp(min=3), "attention_mask": torch.ones_like(batch["attention_mask"])}
    return batch


# ---- Gemma-2 (softcap) and gpt-oss (sinks)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", VARIANTS)
def test_outputs_and_every_weight_equal_eagers_in_float64(name, padded):
    eager, ours = _pair(name)
    batch = _padded_or_not(name, padded, eager)
    rows = batch["attention_mask"].bool()  # the real queries (a left-padding row sees no key)
    with torch.no_grad(), H.float64_softmax():
        want = eager(**batch, output_attentions=True)
        plain = _without_the_variant(eager)(**batch)
        got = ours(**batch, output_attentions=True)
        fast = ours(**batch)  # no weights: the backend's kernel
    assert max_err(plain.logits[rows], want.logits[rows]) > 1e-3  # the variant matters at these weights
    assert max_err(got.logits[rows], want.logits[rows]) < EQUAL
    assert max_err(fast.logits[rows], want.logits[rows]) < EQUAL
    assert len(got.attentions) == 2
    for layer, (w_got, w_want) in enumerate(zip(got.attentions, want.attentions)):
        cut = lambda w: w.transpose(1, 2)[rows]  # noqa: E731  (B, H, T, S) -> (n, H, S)
        assert max_err(cut(w_got), cut(w_want)) < EQUAL, layer
    if name == "gpt-oss":  # the real keys' weights: each row sums to less than 1, the sink takes the rest
        assert (got.attentions[1].sum(-1).transpose(1, 2)[rows] < 1 - 1e-3).all()


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", VARIANTS)
def test_the_variant_and_the_window_reach_multihead_as_such(name, padded):
    """A padded batch's sliding layer gets its padding as a key mask (B, 1, 1, S) beside the window; the full
    layer gets transformers' own mask, as before."""
    eager, ours = _pair(name)
    batch = _padded_or_not(name, padded, eager)
    report = mhf.report(ours, **batch)
    variant = "softcap 1.0" if name == "Gemma-2" else "sinks"
    B, T = batch["input_ids"].shape
    want = ([f"causal, bool mask ({B}, 1, 1, {T}), window (3, 0), {variant}", f"bool mask ({B}, 1, {T}, {T}), {variant}"]
            if padded else [f"causal, window (3, 0), {variant}", f"causal, {variant}"])
    assert [c.computes for c in report.calls] == want
    # sdpa refuses both; cpu_flash adds the sinks after its op (exactly), chunked computes the softcap
    assert {c.backend for c in report.calls} == ({"chunked"} if name == "Gemma-2" else {"cpu_flash"})


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_generate_gives_eagers_tokens_in_float64(name, cache, padded):
    eager, ours = _pair(name)
    batch = _padded_or_not(name, padded, eager)
    options = dict(max_new_tokens=H.NEW_TOKENS, do_sample=False)
    if cache == "static":
        options["cache_implementation"] = "static"
    with torch.no_grad(), H.float64_softmax():
        want = eager.generate(**batch, **options)
        got = ours.generate(**batch, **options)
    assert want.shape[1] == batch["input_ids"].shape[1] + H.NEW_TOKENS
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_training_step_gives_eagers_gradients_sinks_included(name):
    eager, ours = _pair(name)
    case = H.BY_NAME[name]
    batch = H.inputs(case, eager)
    grads = []
    for model in (eager, ours):
        model.train()
        with H.float64_softmax():
            H._loss(case, model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    want, got = grads
    assert set(got) == set(want) and len(want) > 10
    assert max(max_err(got[n], want[n]) for n in want) < EQUAL
    if name == "gpt-oss":
        sinks = [n for n in want if n.endswith("self_attn.sinks")]
        assert len(sinks) == 2 and all(want[n].abs().max() > 1e-3 for n in sinks)


# ---- packed batches (DataCollatorWithFlattening) and sliding windows

PACKED = ["Llama", "Mistral", "Qwen2"]
LENGTHS = (5, 9, 3)  # three sequences packed into one row of 17


def _packed(vocab: int = H.VOCAB):
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, vocab, (n,), generator=gen) for n in LENGTHS]
    flat = transformers.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s.tolist()} for s in sequences])
    assert flat["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]  # positions restart
    return sequences, {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"], "use_cache": False}


@pytest.mark.parametrize("name", PACKED)
def test_a_packed_batch_equals_its_sequences_run_one_by_one(name):
    eager, ours = _pair(name)
    sequences, packed = _packed()
    with torch.no_grad(), H.float64_softmax():
        want = eager(**packed, output_attentions=True)
        one_by_one = torch.cat([eager(input_ids=s[None]).logits[0] for s in sequences])  # (17, vocab)
        got = ours(**packed, output_attentions=True)
        fast = ours(**packed)
        across = eager(input_ids=packed["input_ids"]).logits[0]  # no position_ids: one sequence of 17
    assert max_err(across, one_by_one) > 1e-3  # the documents matter
    assert max_err(got.logits[0], one_by_one) < EQUAL and max_err(fast.logits[0], one_by_one) < EQUAL
    for w_got, w_want in zip(got.attentions, want.attentions):
        assert max_err(w_got, w_want) < EQUAL
    computes = [c.computes for c in mhf.report(ours, **packed).calls]
    assert all(c.startswith("causal, ") and "documents" in c and "mask" not in c for c in computes), computes
    windows = {"Llama": [], "Mistral": [0, 1], "Qwen2": [1]}[name]  # Mistral W=4 everywhere, Qwen2 W=5 on layer 1
    assert [i for i, c in enumerate(computes) if "window" in c] == windows


def test_a_packed_training_step_gives_eagers_gradients():
    eager, ours = _pair("Mistral")
    _, packed = _packed()
    grads = []
    for model in (eager, ours):
        model.train()
        with H.float64_softmax():
            model(**packed, labels=packed["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    want, got = grads
    assert set(got) == set(want) and max(max_err(got[n], want[n]) for n in want) < EQUAL


# ---- the mask function: a StructuredMask is transformers' dense mask, for the same arguments

SLIDING_3 = mu.sliding_window_causal_mask_function(3)
POSITIONS = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])  # three packed sequences: 3, 5 and 2 tokens


def _packed_function(inner):
    """What create_causal_mask composes for a packed batch (masking_utils, transformers 5)."""
    ids = mu.find_packed_sequence_indices(POSITIONS)
    return mu.and_masks(mu.remap_positions_for_packed_sequence(inner, POSITIONS), mu.packed_sequence_mask_function(ids))


STRUCTURED = {  # name -> (mask-function arguments, the Structure expected)
    "window": (dict(batch_size=2, q_length=7, kv_length=7, mask_function=SLIDING_3), (3, None)),
    "window, a sliding cache": (dict(batch_size=1, q_length=2, kv_length=5, q_offset=6, kv_offset=3,
                                     mask_function=mu.sliding_window_causal_mask_function(4)), (4, None)),
    "prefill after cached tokens": (dict(batch_size=1, q_length=3, kv_length=8, q_offset=5), (None, None)),
    "packed": (dict(batch_size=1, q_length=10, kv_length=10, mask_function=_packed_function(mu.causal_mask_function),
                    allow_is_causal_skip=False), (None, "ids")),
    "packed, window": (dict(batch_size=1, q_length=10, kv_length=10, mask_function=_packed_function(SLIDING_3),
                            allow_is_causal_skip=False), (3, "ids")),
    "window, padding mask of ones": (dict(batch_size=1, q_length=7, kv_length=7, mask_function=SLIDING_3,
                                          attention_mask=torch.ones(1, 7, dtype=torch.bool)), (3, None)),
    "window, left padding": (dict(batch_size=2, q_length=7, kv_length=7, mask_function=SLIDING_3,
                                  attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]).bool()), (3, None, "keys")),
    "window, left padding, a decoding step": (dict(batch_size=2, q_length=1, kv_length=8, q_offset=7,
                                                   mask_function=SLIDING_3,
                                                   attention_mask=torch.tensor([[0, 0, 0] + [1] * 5, [1] * 8]).bool()),
                                              (3, None, "keys")),
}


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_a_structured_mask_is_transformers_dense_mask(name):
    arguments, (window, ids, *keys) = STRUCTURED[name]
    mask = mhf.multihead_mask(**arguments)
    dense = mu.sdpa_mask(**{**arguments, "allow_is_causal_skip": False})
    assert isinstance(mask, StructuredMask) and mask.shape == dense.shape and mask.dtype == torch.bool
    assert mask.structure.window == window
    assert (mask.structure.documents is None) == (ids is None)
    assert (mask.structure.keys is None) == (not keys)
    assert torch.equal(mask.dense(), dense)
    # code that reads it as a tensor gets the dense values
    assert torch.equal(mask[:, :, 1:], dense[:, :, 1:]) and torch.equal(~mask, ~dense)
    assert int(mask.sum()) == int(dense.sum()) and torch.equal(mask & dense, dense)
    assert "StructuredMask" in repr(mask) and type(mask[:, :, 1:]) is torch.Tensor
    copied = copy.deepcopy(mask)
    assert isinstance(copied, StructuredMask) and torch.equal(copied.dense(), dense)


PADDED = torch.tensor([[0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("arguments", [
    dict(batch_size=1, q_length=7, kv_length=7, attention_mask=PADDED),  # padding alone: no window to spare
    dict(batch_size=1, q_length=7, kv_length=7, mask_function=SLIDING_3,
         attention_mask=torch.cat([PADDED, PADDED])),  # a padding mask of another batch: transformers decides
    dict(batch_size=1, q_length=1, kv_length=8, q_offset=torch.tensor(4), mask_function=SLIDING_3),  # static cache
    dict(batch_size=1, q_length=3, kv_length=8, mask_function=SLIDING_3),  # a static cache's prefill: empty slots
    dict(batch_size=1, q_length=7, kv_length=7,
         mask_function=mu.and_masks(SLIDING_3, lambda b, h, q, kv: kv != 2)),  # a mask function of the model's own
    dict(batch_size=1, q_length=7, kv_length=7, mask_function=mu.or_masks(SLIDING_3, mu.blockwise_overlay(
        torch.tensor([[0, 0, 1, 1, 1, -1, -1]])))),  # image tokens' blocks
    dict(batch_size=1, q_length=7, kv_length=7, mask_function=mu.sliding_window_bidirectional_mask_function(3)),
], ids=["padding", "padding-of-another-batch", "static-decode", "static-prefill", "model-function", "blockwise", "bidirectional"])
def test_any_other_mask_is_written_out_as_transformers_writes_it(arguments):
    arguments = {**arguments, "allow_is_causal_skip": False}  # as create_*_mask passes it for these
    mask = mhf.multihead_mask(**arguments)
    assert type(mask) is torch.Tensor
    assert torch.equal(mask, mu.sdpa_mask(**arguments))


def test_the_hook_passes_a_structured_mask_as_window_and_documents():
    module = _module()
    q = k = v = torch.randn(1, 2, 6, 8)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    call = mhf.translate(module, q, k, v, StructuredMask(Structure(4, ids), 1, 6, 6, "cpu"))
    assert call.attn_mask is None and call.causal is True
    assert call.variants.window == (3, 0) and torch.equal(call.variants.q_documents, ids)
    # with no mask, a causal square call with transformers' sliding_window gets the window, not a T x S mask
    windowed = mhf.translate(module, q, k, v, None, sliding_window=4)
    assert windowed.attn_mask is None and windowed.causal is True and windowed.variants.window == (3, 0)


def test_softcap_and_sinks_reach_the_call_and_other_sinks_are_refused():
    module = _module("gpt_oss", layer_idx=1)
    q = k = v = torch.randn(1, 2, 5, 8)
    sinks = torch.zeros(2, requires_grad=True)
    call = mhf.translate(module, q, k, v, None, softcap=30.0, s_aux=sinks)
    assert call.variants.softcap == 30.0 and call.variants.sinks is sinks
    assert mhf.translate(module, q, k, v, None, sinks=sinks).variants.sinks is sinks
    with pytest.raises(ValueError, match=r"cannot run gpt_oss \(Module, layer 1\): it uses attention sinks that are "
                                         r"not one logit per query head \(H,\) = \(2,\) \(sinks=tensor \(1, 2, 5, 1\)\)"):
        mhf.translate(module, q, k, v, None, sinks=torch.zeros(1, 2, 5, 1))  # per token (Inkling-2's)
    with pytest.raises(ValueError, match="both s_aux and sinks"):
        mhf.translate(module, q, k, v, None, s_aux=sinks, sinks=sinks)


def _module(model_type="llama", layer_idx=0):
    module = torch.nn.Module()
    module.config = type("Config", (), {"model_type": model_type, "output_attentions": False})()
    module.layer_idx, module.is_causal, module.num_key_value_groups = layer_idx, True, 1
    return module.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return H.max_err(a, b)
