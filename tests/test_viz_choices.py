"""Where each head looks from one token, and which heads disagree most."""

from __future__ import annotations

import numpy as np
import pytest
import torch

scipy_distance = pytest.importorskip("scipy.spatial.distance")
jensenshannon = scipy_distance.jensenshannon

from multihead.viz.choices import find_token, head_choices, heads_by_word, most_different_heads

TOKENS = ["[CLS]", "the", "artist", "painted", "a", "brush", "[SEP]"]
SPECIAL = [t.startswith("[") for t in TOKENS]
BRUSH = 5


def _weights(rows: dict[tuple[int, int], list[float]], L: int = 2, H: int = 3) -> np.ndarray:
    """(L, H, T, T) uniform weights, with the given rows for the query 'brush'."""
    T = len(TOKENS)
    w = np.full((L, H, T, T), 1.0 / T)
    for (layer, head), row in rows.items():
        w[layer, head, BRUSH] = np.asarray(row) / np.sum(row)
    return w


ROWS = {
    (0, 0): [0, 0, 1, 8, 0, 1, 0],  # -> painted
    (0, 1): [9, 0, 0, 0, 0, 0, 1],  # rests on [CLS]; strongest word 'the'? all words 0 -> first word
    (1, 2): [0, 0, 1, 0, 6, 3, 0],  # -> a
    (1, 0): [0, 0, 7, 2, 0, 1, 0],  # -> artist
    (1, 1): [0, 0, 0, 9, 0, 1, 0],  # -> painted, like (0, 0)
    (0, 2): [0, 0, 0, 1, 0, 9, 0],  # rests on itself, strongest word 'painted'
}


def test_find_token():
    assert find_token(TOKENS, "brush") == BRUSH
    assert find_token(TOKENS, " Brush ") == BRUSH
    assert find_token([" The", " brush"], "brush") == 1  # byte-level tokens carry their space
    with pytest.raises(ValueError, match="token 'pen' is not in the text; its tokens are: \\[CLS\\] the artist"):
        find_token(TOKENS, "pen")
    with pytest.raises(ValueError, match="non-empty word"):
        find_token(TOKENS, " ")


def test_head_choices_pick_the_strongest_word_and_flag_resting_heads():
    w = _weights(ROWS)
    choices = head_choices(w, SPECIAL, BRUSH)
    assert len(choices) == 2 and len(choices[0]) == 3
    c = choices[0][0]
    assert (c.top, c.word, c.rests) == (3, 3, False)
    assert c.word_weight == pytest.approx(0.8)
    resting = choices[0][1]
    assert resting.top == 0 and resting.rests  # [CLS] holds 0.9
    self_resting = choices[0][2]
    assert (self_resting.top, self_resting.word, self_resting.rests) == (BRUSH, 3, True)
    assert choices[1][0].word == 2 and choices[1][2].word == 4
    # torch input works the same
    again = head_choices(torch.from_numpy(w), SPECIAL, BRUSH)
    assert again == choices


def test_grouping_and_the_most_different_pair():
    w = _weights(ROWS)
    choices = head_choices(w, SPECIAL, BRUSH)
    groups = heads_by_word(choices)
    assert list(groups)[0] == 3  # 'painted' is chosen by two heads, the most
    assert [(c.layer, c.head) for c in groups[3]] == [(1, 1), (0, 0)]  # most weight first
    assert all(not c.rests for members in groups.values() for c in members)
    d = most_different_heads(w, choices, BRUSH)
    assert d is not None and d.first.word != d.second.word
    # brute force over the heads that look at words
    looking = [(0, 0), (1, 0), (1, 1), (1, 2)]

    def js(p, q):  # an independent oracle: scipy's distance is the square root of the divergence
        return jensenshannon(p, q, base=2) ** 2

    best = max(((a, b) for i, a in enumerate(looking) for b in looking[i + 1:]
                if choices[a[0]][a[1]].word != choices[b[0]][b[1]].word),
               key=lambda ab: js(w[ab[0]][BRUSH], w[ab[1]][BRUSH]))
    assert {(d.first.layer, d.first.head), (d.second.layer, d.second.head)} == set(best)
    assert d.divergence == pytest.approx(js(w[best[0]][BRUSH], w[best[1]][BRUSH]))
    assert 0.0 < d.divergence <= 1.0


def test_no_disagreement_when_all_heads_agree():
    rows = {(0, h): [0, 0, 0, 5, 0, 1, 0] for h in range(3)}
    w = _weights(rows, L=1)
    assert most_different_heads(w, head_choices(w, SPECIAL, BRUSH), BRUSH) is None


def test_bad_input():
    w = _weights(ROWS)
    with pytest.raises(ValueError, match=r"weights has 3 dims, \(L, H, T, T\) expected"):
        head_choices(w[0], SPECIAL, BRUSH)
    with pytest.raises(ValueError, match=r"query index must be in \[0, 7\)"):
        head_choices(w, SPECIAL, 7)
    with pytest.raises(ValueError, match="special has 3 entries but weights has T = 7 tokens"):
        head_choices(w, SPECIAL[:3], BRUSH)
