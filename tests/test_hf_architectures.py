"""attn_implementation="multihead" against "eager" on every architecture of tests/hf_cases.py.

For each model: the last hidden state or logits and every attention weight
under the 2x rule, greedy generate giving the same tokens with
transformers' DynamicCache and StaticCache, and one training step whose
parameter gradients meet the 3x rule (hf_cases explains the golden value
and which rows are compared). benchmarks/hf_architectures.py writes the
same comparisons as the table in docs/hf-architectures.md.
"""

from __future__ import annotations

import pytest

import hf_cases as H

CASES = [pytest.param(case, id=key) for key, case in H.BY_NAME.items()]
GENERATING = [pytest.param(case, id=key) for key, case in H.BY_NAME.items() if case.kind != "encoder"]


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_attentions_equal_eagers(case):
    compared = H.compare_forward(case)
    assert len(compared) >= 2 and any("attentions" in name for name in compared)
    for name, (err, naive) in compared.items():
        assert H.rule_holds(err, naive, H.OUT_FACTOR), f"{case.name} {name}: {err:.3g} vs eager float32 {naive:.3g}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("case", GENERATING)
def test_greedy_generate_gives_eagers_tokens(case, cache):
    assert H.generate_identical(case, cache), f"{case.name}: tokens differ with the {cache} cache"


@pytest.mark.parametrize("case", CASES)
def test_a_training_step_gives_eagers_gradients(case):
    err, naive = H.compare_training(case)
    assert H.rule_holds(err, naive, H.GRAD_FACTOR), f"{case.name}: gradient error {err:.3g} vs {naive:.3g}"
