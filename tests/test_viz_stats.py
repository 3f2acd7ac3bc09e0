"""multihead.viz.stats: per-head statistics on hand-built weights whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from multihead.viz.stats import (
    HeadStats,
    guess_special,
    head_stats,
    stats_table,
    stats_text,
    strongest_targets,
)


def uniform(T: int) -> np.ndarray:
    return np.full((T, T), 1.0 / T)


def previous_head(T: int) -> np.ndarray:
    """Row i puts all its weight on i - 1; row 0, which has no previous token, on key 1."""
    p = np.zeros((T, T))
    p[np.arange(1, T), np.arange(T - 1)] = 1.0
    p[0, 1] = 1.0
    return p


def first_token_head(T: int) -> np.ndarray:
    p = np.zeros((T, T))
    p[:, 0] = 1.0
    return p


def stack(*heads_per_layer) -> np.ndarray:
    return np.stack([np.stack(layer) for layer in heads_per_layer])  # L lists of H (T, T) -> (L, H, T, T)


def loop_stats(w: np.ndarray, special: list[bool]):
    """The four formulas row by row in plain Python: the yardstick for the vectorised version."""
    L, H, T, _ = w.shape
    out = np.zeros((4, L, H))
    for l in range(L):
        for h in range(H):
            ent = dist = spec = prev = 0.0
            for i in range(T):
                for j in range(T):
                    p = float(w[l, h, i, j])
                    if p > 0:
                        ent -= p * math.log(p)
                    dist += p * abs(i - j)
                    spec += p if special[j] else 0.0
                if i >= 1:
                    prev += float(w[l, h, i, i - 1])
            out[:, l, h] = ent / T, dist / T, spec / T, prev / (T - 1)
    return out


# --------------------------------------------------------------------------- known answers


def test_uniform_rows():
    T = 7
    special = [True] + [False] * 5 + [True]
    s = head_stats(uniform(T)[None, None], special)
    assert s.entropy[0, 0] == pytest.approx(math.log(T))
    # mean over i of (1/T) sum_j |i - j|
    expected_distance = np.mean([np.mean(np.abs(i - np.arange(T))) for i in range(T)])
    assert s.mean_distance[0, 0] == pytest.approx(expected_distance)
    assert s.special_share[0, 0] == pytest.approx(2 / T)
    assert s.previous_share[0, 0] == pytest.approx(1 / T)


def test_previous_token_head():
    T = 9
    s = head_stats(previous_head(T)[None, None], [False] * T)
    assert s.previous_share[0, 0] == pytest.approx(1.0)
    assert s.mean_distance[0, 0] == pytest.approx(1.0)
    assert s.entropy[0, 0] == pytest.approx(0.0)  # one-hot rows: 0 ln 0 counts as 0, not NaN
    assert s.special_share[0, 0] == 0.0


def test_weight_on_cls():
    T = 6
    special = [True, False, False, False, False, True]  # [CLS] ... [SEP]
    s = head_stats(first_token_head(T)[None, None], special)
    assert s.special_share[0, 0] == pytest.approx(1.0)
    assert s.mean_distance[0, 0] == pytest.approx((T - 1) / 2)  # row i is i tokens from [CLS]
    assert s.previous_share[0, 0] == pytest.approx(1 / (T - 1))  # only row 1's previous token is [CLS]
    assert s.entropy[0, 0] == pytest.approx(0.0)


def test_half_and_half_rows_have_entropy_ln2():
    T = 4
    p = np.zeros((T, T))
    p[:, 0] = p[:, 3] = 0.5
    s = head_stats(p[None, None], [False] * T)
    assert s.entropy[0, 0] == pytest.approx(math.log(2))
    assert s.previous_share[0, 0] == pytest.approx((0 + 0 + 0.5) / 3)  # rows 1, 2, 3: only row 1 has i-1 = 0


def test_each_head_lands_in_its_own_slot():
    """(L, H) = (2, 3) with a different known head in each slot: catches swapped or flattened axes."""
    T = 5
    special = [True, False, False, False, True]
    w = stack([uniform(T), previous_head(T), first_token_head(T)],
              [first_token_head(T), uniform(T), previous_head(T)])
    s = head_stats(w, special)
    assert isinstance(s, HeadStats)
    assert (s.num_layers, s.num_heads) == (2, 3)
    for arr in (s.entropy, s.mean_distance, s.special_share, s.previous_share):
        assert arr.shape == (2, 3)
    np.testing.assert_allclose(s.entropy, [[math.log(T), 0, 0], [0, math.log(T), 0]], atol=1e-12)
    np.testing.assert_allclose(s.previous_share, [[1 / T, 1, 1 / (T - 1)], [1 / (T - 1), 1 / T, 1]], atol=1e-12)
    np.testing.assert_allclose(s.special_share[0], [2 / T, 1 / T, 1], atol=1e-12)  # previous head: row 1 -> [CLS]
    np.testing.assert_allclose(s.mean_distance[1, [0, 2]], [(T - 1) / 2, 1], atol=1e-12)


def test_random_weights_match_the_row_by_row_formulas():
    rng = np.random.default_rng(0)
    L, H, T = 2, 3, 11
    logits = rng.normal(size=(L, H, T, T)) * 2
    w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    w[0, 1, 3] = 0.0  # exact zeros inside a row
    w[0, 1, 3, 5] = 1.0
    special = [True] + [False] * (T - 2) + [True]
    s = head_stats(w, special)
    expected = loop_stats(w, special)
    for got, want in zip((s.entropy, s.mean_distance, s.special_share, s.previous_share), expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_torch_input_matches_numpy_and_keeps_float64():
    rng = np.random.default_rng(1)
    w = rng.random((2, 2, 6, 6))
    w /= w.sum(-1, keepdims=True)
    special = [True, False, False, False, False, True]
    from_numpy = head_stats(w, special)
    from_torch = head_stats(torch.from_numpy(w), torch.tensor(special))
    for a, b in zip((from_numpy.entropy, from_numpy.previous_share), (from_torch.entropy, from_torch.previous_share)):
        np.testing.assert_array_equal(a, b)
    # bfloat16 (no NumPy equivalent) is accepted and close.
    low = head_stats(torch.from_numpy(w).to(torch.bfloat16), special)
    np.testing.assert_allclose(low.entropy, from_numpy.entropy, atol=2e-2)


def test_single_token_has_no_previous_row():
    s = head_stats(np.ones((1, 2, 1, 1)), [True])
    assert np.isnan(s.previous_share).all()
    assert (s.entropy == 0).all() and (s.special_share == 1).all() and (s.mean_distance == 0).all()


# --------------------------------------------------------------------------- strongest_targets


def test_strongest_targets_per_layer_and_head():
    T = 5
    w = stack([uniform(T), previous_head(T), first_token_head(T)],
              [first_token_head(T), previous_head(T), uniform(T)])
    w = w.copy()
    w[1, 2, 3] = [0.1, 0.1, 0.1, 0.1, 0.6]
    got = strongest_targets(w, 3)
    assert got.shape == (2, 3) and np.issubdtype(got.dtype, np.integer)
    # uniform: tie -> lowest index 0; previous head from row 3: key 2; [CLS] head: 0; the edited row: 4.
    np.testing.assert_array_equal(got, [[0, 2, 0], [0, 2, 4]])
    np.testing.assert_array_equal(strongest_targets(w, 0), [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(strongest_targets(torch.from_numpy(w), np.int64(3)), got)


@pytest.mark.parametrize("bad, error, words", [
    (5, ValueError, "query_index must be in [0, 5), got 5"),
    (-1, ValueError, "query_index must be in [0, 5), got -1"),
    (1.0, TypeError, "query_index must be an int, got float"),
    (True, TypeError, "query_index must be an int, got bool"),
])
def test_strongest_targets_rejects_bad_query_index(bad, error, words):
    with pytest.raises(error) as info:
        strongest_targets(uniform(5)[None, None], bad)
    assert words in str(info.value)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("weights, special, error, words", [
    (np.ones((2, 3, 3)) / 3, [False] * 3, ValueError, "weights has 3 dims"),
    (np.ones((1, 2, 2, 3, 3)) / 3, [False] * 3, ValueError, "pick one sequence of the batch"),
    (np.ones((1, 1, 3, 4)) / 4, [False] * 3, ValueError, "must be square"),
    (np.ones((1, 1, 3, 3), dtype=np.int64), [False] * 3, TypeError, "floating array"),
    (torch.ones(1, 1, 3, 3, dtype=torch.long), [False] * 3, TypeError, "floating tensor"),
    ([[[[1.0]]]], [False], TypeError, "numpy.ndarray or torch.Tensor, got list"),
    (np.full((1, 1, 2, 2), np.nan), [False] * 2, ValueError, "NaN or inf"),
    (np.array([[[[1.5, -0.5], [0.5, 0.5]]]]), [False] * 2, ValueError, "negative"),
    (np.zeros((1, 0, 3, 3)), [False] * 3, ValueError, "empty"),
    (np.full((1, 1, 2, 2), 3.0), [False] * 2, ValueError, "values above 1 (max 3)"),
    (uniform(4)[None, None], [False] * 3, ValueError, "special has 3 entries but weights has T = 4"),
    (uniform(3)[None, None], [0, 1, 0], TypeError, "special must hold bools"),
    (uniform(3)[None, None], "abc", TypeError, "special must be a sequence of bools"),
    (uniform(3)[None, None], [[True] * 3], ValueError, "special must be 1-D"),
])
def test_head_stats_rejects_bad_input(weights, special, error, words):
    with pytest.raises(error) as info:
        head_stats(weights, special)
    assert words in str(info.value)


# --------------------------------------------------------------------------- helpers


def test_stats_table_rows_and_text():
    T = 4
    s = head_stats(stack([uniform(T), previous_head(T)], [first_token_head(T), uniform(T)]),
                   [True, False, False, True])
    one = stats_table(s, layer=1)
    assert one.row_count == 2 and "layer 1" in str(one.title)
    assert stats_table(s).row_count == 4  # every layer x head
    text = stats_text(s, layer=0)
    assert f"{math.log(T):.2f}" in text  # the uniform head's entropy, ln 4 = 1.39
    assert "100%" in text  # the previous-token head
    assert "\x1b[" not in text  # plain text, no colour codes
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        stats_table(s, layer=2)
    with pytest.raises(TypeError, match="stats must be a HeadStats"):
        stats_table({"entropy": 1})


def test_guess_special():
    tokens = ["[CLS]", "the", "[SEP]", "<|endoftext|>", "</s>", "<s>", "<pad>", "[", "<b>", "[cls]", " [PAD] "]
    assert guess_special(tokens) == [True, False, True, True, True, True, True, False, False, False, True]
    with pytest.raises(TypeError, match="single str"):
        guess_special("[CLS] the")
    with pytest.raises(TypeError, match=r"tokens\[1\] must be a str"):
        guess_special(["a", 3])
