"""multihead.hf.options against a model's cache and shape: valid at every step, refused before any state changes.

rows index each call's own queries, so a row that a decoding step does not
have is skipped there; layers and heads are the model's, so a selection it
does not have is refused in the mask function, before the first layer
writes its cache (`multihead.hf.options`, module docstring).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_cases as H
import multihead.hf as mhf
from conftest import max_err

PROMPT = 6


def _llama_and_prompt():
    eager, ours = H.model_pair(H.BY_NAME["Llama"])
    ids = torch.randint(3, H.VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    return eager, ours, ids


def _lengths(cache) -> list[int]:
    return [cache.get_seq_length(layer) for layer in range(len(cache.layers))]


def test_a_row_a_decoding_step_does_not_have_is_skipped_and_the_cache_stays_whole():
    eager, ours, ids = _llama_and_prompt()
    cache = transformers.DynamicCache(config=ours.config)
    step = torch.randint(3, H.VOCAB, (2, 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), mhf.options(rows=3):
        prefill = ours(ids, cache=cache, use_cache=True, output_attentions=True)
        decoded = ours(step, cache=cache, use_cache=True, output_attentions=True)
    assert _lengths(cache) == [PROMPT + 1] * 2  # every layer took the step: none refused half-way
    assert [a.shape for a in decoded.attentions] == [(2, 4, 0, PROMPT + 1)] * 2  # the step has no row 3
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
        whole = eager(torch.cat([ids, step], dim=1)).logits[:, -1]
    for got, every in zip(prefill.attentions, want):
        assert got.shape == (2, 4, 1, PROMPT) and max_err(got, every[:, :, 3:4]) < 1e-6
    assert max_err(decoded.logits[:, -1], whole) < 1e-5  # and the step itself is right


def test_generate_with_a_row_selection_runs_every_step():
    eager, ours, ids = _llama_and_prompt()
    settings = dict(max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = eager.generate(ids, **settings)
        with mhf.options(rows=[3, -1]):
            got = ours.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    rows = [step[0].shape[2] for step in got.attentions]
    assert rows == [2, 1, 1]  # the prefill has rows 3 and -1; each step only its own (-1)


@pytest.mark.parametrize("selection, message", [
    (dict(layers=[5]), r"options\(layers=\[5\]\) names layers that llama does not have: it has 2 attention layers "
                       r"\(layer_idx 0 to 1\), got \[5\]"),
    (dict(layers=[1, 2, 7]), r"it has 2 attention layers \(layer_idx 0 to 1\), got \[2, 7\]"),
    (dict(heads=[4]), r"options\(heads=\(4,\)\) is out of range for llama: it has 4 query heads"),
], ids=["layer-5", "layers-1-2-7", "head-4"])
@pytest.mark.parametrize("weights", [True, False], ids=["weights", "no-weights"])
def test_a_selection_the_model_does_not_have_is_refused_before_any_cache_is_written(selection, message, weights):
    _, ours, ids = _llama_and_prompt()
    cache = transformers.DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(ids, cache=cache, use_cache=True)
        with mhf.options(**selection), pytest.raises(ValueError, match=message):
            ours(ids[:, :1], cache=cache, use_cache=True, output_attentions=weights)
    assert _lengths(cache) == [PROMPT] * 2


def test_negative_steps_select_as_python_slices_do():
    eager, ours, ids = _llama_and_prompt()
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
        with mhf.options(heads=slice(None, None, -1), rows=slice(None, None, -2)):
            got = ours(ids, output_attentions=True).attentions
    for layer in range(2):
        assert got[layer].shape == (2, 4, 3, PROMPT)
        assert max_err(got[layer], want[layer].flip(1)[:, :, [5, 3, 1]]) < 1e-6
