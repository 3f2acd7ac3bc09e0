"""The one mask convention: True = may attend; causal aligned bottom-right."""

from __future__ import annotations

import pytest
import torch

from multihead import masks


def test_causal_square_is_the_lower_triangle():
    assert torch.equal(masks.causal_mask(4, 4), torch.ones(4, 4).tril().bool())


def test_causal_short_queries_see_the_whole_prefix():
    # T = 3 queries at the end of S = 5 keys (the docstring's left drawing)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(masks.causal_mask(3, 5), expected)
    assert masks.causal_mask(1, 9).all()  # decoding one token sees the whole cache


def test_causal_long_queries_start_with_empty_rows():
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(masks.causal_mask(5, 3), expected)


def test_sliding_window():
    m = masks.sliding_window_mask(5, 5, window=2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0],
                             [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert torch.equal(masks.sliding_window_mask(4, 4, window=4), masks.causal_mask(4, 4))
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        masks.sliding_window_mask(3, 3, window=0)


def test_lengths_and_key_masks():
    key_mask = masks.lengths_to_key_mask(torch.tensor([3, 0, 5]), 5)
    assert key_mask.tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] * 5]
    assert masks.key_mask_to_attn_mask(key_mask).shape == (3, 1, 1, 5)
    with pytest.raises(TypeError, match="key_mask must be bool"):
        masks.key_mask_to_attn_mask(key_mask.float())
    with pytest.raises(ValueError, match=r"key_mask has 1 dims, \(B, S\) expected"):
        masks.key_mask_to_attn_mask(key_mask[0])


def test_additive_and_combine():
    allowed = torch.tensor([[True, False]])
    assert masks.to_additive(allowed, torch.float32).tolist() == [[0.0, float("-inf")]]
    both = masks.combine(allowed, torch.tensor([[False, False]]), torch.float32)
    assert both.dtype == torch.bool and not both.any()
    mixed = masks.combine(allowed, torch.tensor([[0.5, 0.5]]), torch.float32)
    assert mixed.tolist() == [[0.5, float("-inf")]]
    assert masks.allowed(mixed).tolist() == [[True, False]]
    assert masks.combine(None, allowed, torch.float32) is allowed
