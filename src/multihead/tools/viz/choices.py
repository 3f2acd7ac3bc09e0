"""Where each head looks from one token, and which heads disagree most.

The claim of the classic lecture example, made checkable: in "The artist
painted the portrait of a woman with a brush." some head links "brush" to
"painted" and another to "woman". For a chosen query token, `head_choices`
gives every head's strongest key, both over all tokens and over the words
alone: trained BERTs park most of many heads' weight on [CLS] or [SEP] (a
resting place when the head has nothing to add), so the strongest *word* is
what shows the head's perspective. `most_different_heads` names the pair of
heads whose weight rows for that token are furthest apart (Jensen-Shannon
divergence) among the heads that look at a word, not at a special token or
the token itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .stats import as_special, as_weights


@dataclass(frozen=True)
class HeadChoice:
    layer: int  # counted from 0
    head: int  # counted from 0
    top: int  # index of the token with the most weight, any token
    top_weight: float
    word: int  # index of the word (not special, not the query itself) with the most weight; -1 if none
    word_weight: float  # its weight (0.0 if none)

    @property
    def rests(self) -> bool:
        """True when the head's strongest key is not a word: a special token or the query itself."""
        return self.top != self.word


@dataclass(frozen=True)
class Disagreement:
    first: HeadChoice
    second: HeadChoice
    divergence: float  # Jensen-Shannon divergence of the two weight rows, in bits: 0 same, 1 disjoint


def find_token(tokens: Sequence[str], word: str) -> int:
    """Index of the first token equal to `word` (case and surrounding spaces ignored), or a clear error."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"token must be a non-empty word, got {word!r}")
    wanted = word.strip().lower()
    for i, token in enumerate(tokens):
        if token.strip().lower() == wanted:
            return i
    shown = " ".join(t.strip() for t in tokens)
    if len(shown) > 200:
        shown = shown[:197] + "..."
    raise ValueError(f"token {word!r} is not in the text; its tokens are: {shown}")


def _rows(weights, query: int) -> np.ndarray:
    w = as_weights(weights).astype(np.float64, copy=False)  # (L, H, T, T), checked
    if not 0 <= query < w.shape[-2]:
        raise ValueError(f"query index must be in [0, {w.shape[-2]}), got {query}")
    return w[:, :, query, :]  # (L, H, T, T) -> (L, H, T): every head's row for the query


def head_choices(weights, special: Sequence[bool], query: int) -> list[list[HeadChoice]]:
    """choices[l][h]: where head h of layer l looks most from token `query`."""
    rows = _rows(weights, query)  # (L, H, T)
    is_word = ~as_special(special, rows.shape[-1])
    is_word[query] = False
    word_rows = np.where(is_word, rows, -1.0)  # non-words can never win below
    choices = []
    for layer in range(rows.shape[0]):
        per_layer = []
        for head in range(rows.shape[1]):
            top = int(rows[layer, head].argmax())
            word = int(word_rows[layer, head].argmax()) if is_word.any() else -1
            per_layer.append(HeadChoice(layer, head, top, float(rows[layer, head, top]), word,
                                        float(rows[layer, head, word]) if word >= 0 else 0.0))
        choices.append(per_layer)
    return choices


def _js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def most_different_heads(weights, choices: list[list[HeadChoice]], query: int) -> Disagreement | None:
    """The two heads, among those whose strongest key is a word, with the most different rows.

    Heads that rest on a special token are left out: two resting heads differ
    only in noise. None when fewer than two heads look at words, or when every
    such head picks the same word.
    """
    rows = _rows(weights, query)  # (L, H, T)
    looking = [c for per_layer in choices for c in per_layer if not c.rests]
    best: Disagreement | None = None
    for i, a in enumerate(looking):
        for b in looking[i + 1:]:
            if a.word == b.word:
                continue
            d = _js_divergence(rows[a.layer, a.head], rows[b.layer, b.head])
            if best is None or d > best.divergence:
                best = Disagreement(a, b, d)
    return best


def heads_by_word(choices: list[list[HeadChoice]]) -> dict[int, list[HeadChoice]]:
    """Word index -> the heads whose strongest key is that word, most weight first."""
    groups: dict[int, list[HeadChoice]] = {}
    for choice in (c for per_layer in choices for c in per_layer if not c.rests):
        groups.setdefault(choice.word, []).append(choice)
    for members in groups.values():
        members.sort(key=lambda c: -c.word_weight)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))
