"""Per-head statistics of one sequence's attention weights: numbers for what the pictures show.

Input is the attention weights of every layer of a model for ONE sequence,
real tokens only (no padding), shaped (L, H, T, T): L layers, H heads, and
for each head a T x T matrix whose row i (query i) is a probability
distribution over the keys j. Four numbers per head, each a mean over the
query rows, tell the usual kinds of head apart:

    entropy         -sum_j p_ij ln p_ij, in nats. 0: every query looks at one
                    key; ln T: every query spreads its weight evenly.
    mean_distance   sum_j p_ij |i - j|, in tokens. Small: a local head.
    special_share   the weight on special tokens ([CLS], [SEP], <|endoftext|>):
                    trained BERTs park a head's weight there when it has
                    nothing to add, so a high share marks a "resting" head.
    previous_share  p_{i,i-1} over rows i >= 1: 1 for a pure previous-token head.

`strongest_targets` names, for one query row, the key each head weights most.
"""

from __future__ import annotations

import io
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .attentions import floating_tensor, is_layer_sequence, stack_attentions

# Slack above 1 for rounding: a bfloat16 or float16 softmax can round a weight of
# 1 - eps up past 1 by one ulp (2**-7 for bfloat16 near 1).
WEIGHT_TOL = 1e-2

__all__ = ["HeadStats", "guess_special", "head_stats", "stats_table", "stats_text", "strongest_targets"]


@dataclass(frozen=True)
class HeadStats:
    """Four numbers per head of every layer, for one sequence; each array is (L, H)."""

    entropy: np.ndarray  # (L, H) mean over query rows of -sum_j p_ij ln p_ij, in nats
    mean_distance: np.ndarray  # (L, H) mean over query rows of sum_j p_ij |i - j|, in tokens
    special_share: np.ndarray  # (L, H) mean over query rows of the weight on special tokens ([CLS]/[SEP]/...)
    previous_share: np.ndarray  # (L, H) mean over rows i >= 1 of p_{i,i-1}; NaN when T == 1 (no such row)

    @property
    def num_layers(self) -> int:  # L
        return int(self.entropy.shape[0])

    @property
    def num_heads(self) -> int:  # H
        return int(self.entropy.shape[1])


# --------------------------------------------------------------------------- argument checks


def as_weights(weights, name: str = "weights") -> np.ndarray:
    """One sequence's weights as a float NumPy array (L, H, T, T), checked; torch tensors are copied to the CPU.

    float16/bfloat16 come back as float32 (NumPy has no bfloat16, and float16
    sums of 512 terms lose digits); float32 and float64 keep their dtype so
    that a 12 x 12 x 512 x 512 input is not doubled in memory up front.
    A tuple or list of per-layer (1, H, T, T) tensors (transformers'
    `outputs.attentions` of one sequence) is stacked first (`stack_attentions`).
    """
    if is_layer_sequence(weights):
        weights = stack_attentions(weights, name=name)  # L x (1, H, T, T) -> (L, H, T, T)
    tensor = floating_tensor(name, weights, "be a floating tensor of attention weights")
    if tensor is not None:
        t = tensor.detach().cpu()
        array = t.numpy() if t.dtype.itemsize >= 4 else t.float().numpy()  # NumPy has no bfloat16
    elif isinstance(weights, np.ndarray):
        if not np.issubdtype(weights.dtype, np.floating):
            raise TypeError(f"{name} must be a floating array of attention weights, got dtype {weights.dtype}")
        array = weights if weights.dtype in (np.float32, np.float64) else weights.astype(np.float32)
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(weights).__name__}")
    if array.ndim != 4:
        raise ValueError(
            f"{name} has {array.ndim} dims, (L, H, T, T) expected for one sequence, got {tuple(array.shape)}"
            + ("; pick one sequence of the batch first, e.g. weights[:, 0]" if array.ndim == 5 else "")
        )
    L, H, T, S = array.shape
    if T != S:
        raise ValueError(f"{name} must be square in its last two dims (L, H, T, T), got {tuple(array.shape)}")
    if L == 0 or H == 0 or T == 0:
        raise ValueError(f"{name} is empty, shape {tuple(array.shape)}: at least one layer, head and token needed")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf; attention weights of real tokens are finite")
    if (array < 0).any():
        raise ValueError(f"{name} contains negative values (min {float(array.min()):.3g}); "
                         "attention weights are probabilities")
    if (array > 1 + WEIGHT_TOL).any():
        raise ValueError(f"{name} contains values above 1 (max {float(array.max()):.3g}); attention weights "
                         "are probabilities: were scores passed instead of softmax(scores)?")
    return array


def as_special(special, T: int, name: str = "special") -> np.ndarray:
    """A length-T bool mask (True = special token such as [CLS]) as a NumPy bool array."""
    if isinstance(special, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of bools, one per token, got a {type(special).__name__}")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and isinstance(special, torch.Tensor):
        special = special.detach().cpu().numpy()
    mask = np.asarray(special)
    if mask.ndim != 1:
        raise ValueError(f"{name} must be 1-D, one bool per token, got shape {mask.shape}")
    if mask.size and mask.dtype != np.bool_:
        raise TypeError(f"{name} must hold bools (True = special token), got dtype {mask.dtype}")
    if mask.shape[0] != T:
        raise ValueError(f"{name} has {mask.shape[0]} entries but weights has T = {T} tokens")
    return mask.astype(bool, copy=False)


def as_tokens(tokens, T: int) -> list[str]:
    """One str per position, checked: a single str, a non-str entry or the wrong count is refused."""
    if isinstance(tokens, np.ndarray) and tokens.ndim == 1:
        tokens = tokens.tolist()  # an array of str is a sequence in all but name
    if not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a sequence of strings, got {type(tokens).__name__}")
    tokens = _strings(tokens)
    if len(tokens) != T:
        raise ValueError(f"tokens has {len(tokens)} entries but weights has T = {T} positions")
    return tokens


def _strings(tokens) -> list[str]:
    """tokens as a list, each a str; a single str (a sequence of characters) is refused."""
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of strings, one per position, got a single str")
    tokens = list(tokens)
    for i, tok in enumerate(tokens):
        if not isinstance(tok, str):
            raise TypeError(f"tokens[{i}] must be a str, got {type(tok).__name__} {tok!r}")
    return tokens


def checked_index(name: str, value, size: int) -> int:
    """An index into `size` things, 0..size-1 (no negatives), else TypeError/ValueError naming it."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not 0 <= index < size:
        raise ValueError(f"{name} must be in [0, {size}), got {index}")
    return index


# --------------------------------------------------------------------------- statistics


def head_stats(weights, special: Sequence[bool]) -> HeadStats:
    """Entropy, mean distance, share on special tokens and previous-token share of every head.

    weights: (L, H, T, T) NumPy array or torch tensor for one sequence, real
    tokens only, rows are queries. special: length-T bools, True for [CLS],
    [SEP] and the like. Rows are taken as given (not renormalised), so each
    number is exactly the formula in the field's comment.
    """
    w = as_weights(weights)
    return stats_of_checked(w, as_special(special, w.shape[2]))


def stats_of_checked(w: np.ndarray, is_special: np.ndarray) -> HeadStats:
    """`head_stats` of weights that `as_weights` has checked and a mask that `as_special` has: nothing checked again."""
    L, H, T, _ = w.shape
    distance = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]).astype(np.float64)  # (T, T): |i - j|
    entropy = np.empty((L, H))
    mean_distance = np.empty((L, H))
    special_share = np.empty((L, H))
    previous_share = np.full((L, H), np.nan)
    # One layer at a time in float64: a 12 x 12 x 512 x 512 input would need
    # ~300 MB per temporary if done at once.
    for layer in range(L):
        p = w[layer].astype(np.float64)  # (H, T, T)
        # 0 ln 0 = 0 (the limit); log of the zeros is masked out, not computed.
        plogp = np.zeros_like(p)
        np.log(p, out=plogp, where=p > 0)
        plogp *= p
        entropy[layer] = -plogp.sum(axis=-1).mean(axis=-1)  # (H, T, T) -> (H,)
        mean_distance[layer] = (p * distance).sum(axis=-1).mean(axis=-1)  # (H, T, T) -> (H,)
        special_share[layer] = p[:, :, is_special].sum(axis=-1).mean(axis=-1)  # (H, T, T) -> (H, T, n_special) -> (H,)
        if T > 1:
            rows = np.arange(1, T)
            previous_share[layer] = p[:, rows, rows - 1].mean(axis=-1)  # (H, T - 1) -> (H,)
    return HeadStats(entropy=entropy, mean_distance=mean_distance,
                     special_share=special_share, previous_share=previous_share)


def strongest_targets(weights, query_index: int) -> np.ndarray:
    """(L, H) int: the key index each head of each layer weights most from row `query_index`.

    Ties go to the lowest key index (np.argmax's rule).
    """
    w = as_weights(weights)
    q = checked_index("query_index", query_index, w.shape[2])
    return np.argmax(w[:, :, q, :], axis=-1).astype(np.int64)  # (L, H, T) -> (L, H)


# Special-token spellings of the usual tokenizers: BERT's [CLS]/[SEP]/[PAD]/...,
# GPT-2's <|endoftext|>, RoBERTa/T5's <s>, </s>, <pad>, <unk>, <mask>.
_SPECIAL = re.compile(r"^(\[[A-Z_]+\]|<\|[^|<>]*\|>|</?s>|<(pad|unk|mask|cls|sep|bos|eos)>)$")


def guess_special(tokens: Sequence[str]) -> list[bool]:
    """True for tokens spelled like a tokenizer's special token ([CLS], <|endoftext|>, </s>, ...).

    A fallback for when the tokenizer's own special-token mask is not at hand;
    prefer the tokenizer's mask where there is one.
    """
    return [bool(_SPECIAL.match(tok.strip())) for tok in _strings(tokens)]


# --------------------------------------------------------------------------- formatting


def stats_table(stats: HeadStats, layer: int | None = None):
    """A rich Table of `stats`: one row per head of `layer`, or of every layer when None."""
    from rich.table import Table

    if not isinstance(stats, HeadStats):
        raise TypeError(f"stats must be a HeadStats, got {type(stats).__name__}")
    layers = range(stats.num_layers) if layer is None else [checked_index("layer", layer, stats.num_layers)]
    title = "Per-head statistics" + ("" if layer is None else f", layer {layers[0]}")
    table = Table(title=title, caption="entropy in nats (0 = one key); distance in tokens; shares of the weight")
    if layer is None:
        table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("entropy", justify="right")
    table.add_column("mean distance", justify="right")
    table.add_column("on special", justify="right")
    table.add_column("on previous", justify="right")
    for l in layers:
        for h in range(stats.num_heads):
            cells = [
                f"{stats.entropy[l, h]:.2f}",
                f"{stats.mean_distance[l, h]:.1f}",
                _percent(stats.special_share[l, h]),
                _percent(stats.previous_share[l, h]),
            ]
            table.add_row(*([str(l)] if layer is None else []), str(h), *cells)
    return table


def stats_text(stats: HeadStats, layer: int | None = None, width: int = 100) -> str:
    """`stats_table` rendered as plain text (no colour codes), for logs and files."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, highlight=False, markup=False, emoji=False,
                      force_jupyter=False)  # in a notebook too: into the buffer, not the cell's output
    console.print(stats_table(stats, layer))
    return buffer.getvalue()


def _percent(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"
