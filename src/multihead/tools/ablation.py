"""Which heads matter: remove one head at a time and measure what its absence changes.

    import multihead.models
    from multihead.tools.ablation import ablate_heads, importance_figure

    model = multihead.models.load("minilm")
    ablation = ablate_heads(model, ["A dog ate the food because it was hungry", "The dog was hungry"])
    ablation.shift()                    # (L, H, N): 1 - cos(embedding, embedding without head (l, h))
    ablation.similarity_change(0, 1)    # (L, H): cos of texts 0 and 1 without the head, minus with it
    importance_figure(ablation.shift().mean(axis=-1))   # the layer x head picture (matplotlib)

Removing a head is `head_mask` (`MultiHeadAttention.forward`, `Bert.forward`):
the head's output Z_i is set to 0 before W^O, every other head and layer is
left as it was, and the rest of the network runs on: the measure is
exact, not a gradient's first-order guess. One forward of the whole batch
with every head, then per removed head its own layer and those above it
(for MiniLM's 6 x 12, about 42 forward passes' worth). The embeddings are the
model's own (`SentenceEncoder.encode`: mean of the last hidden states over
real tokens, L2-normalised); with no head removed they equal `encode`'s.
`multihead heads TEXT --ablate` prints the table and writes the picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..core.checks import int_at_least, positive_int, positive_number
from ..models.bert import Bert
from ..models.text import SentenceEncoder, Tokenized, check_text

__all__ = ["HeadAblation", "Link", "ablate_heads", "importance_figure", "strongest_link", "top_heads"]


@dataclass(frozen=True)
class HeadAblation:
    """Sentence embeddings with every head, and with each single head removed."""

    texts: tuple[str, ...]  # the N texts, in order
    embeddings: Tensor  # (N, C) float32, unit length: every head kept (equal to model.encode(texts))
    ablated: Tensor  # (L, H, N, C) float32, unit length: head (l, h) removed, every other head kept

    @property
    def num_layers(self) -> int:  # L
        return int(self.ablated.shape[0])

    @property
    def num_heads(self) -> int:  # H
        return int(self.ablated.shape[1])

    def shift(self) -> np.ndarray:
        """(L, H, N) float64: 1 - cos(embedding, embedding without head (l, h)), per text; 0 = no change."""
        cos = (self.ablated.double() * self.embeddings.double()).sum(dim=-1)  # (L, H, N, C) -> (L, H, N)
        return (1.0 - cos).numpy()

    def similarity(self) -> np.ndarray:
        """(N, N) float64: the cosine similarity of every pair of texts, with every head."""
        e = self.embeddings.double()
        return (e @ e.T).numpy()  # (N, C) @ (C, N) -> (N, N)

    def similarity_change(self, i: int, j: int) -> np.ndarray:
        """(L, H) float64: cos(text i, text j) with head (l, h) removed, minus the cos with every head."""
        n = len(self.texts)
        for name, index in (("i", i), ("j", j)):
            if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
                raise IndexError(f"{name} must be an int index of the {n} texts, got {index!r}")
        a, b = self.ablated[:, :, i].double(), self.ablated[:, :, j].double()  # (L, H, C) each
        return (a * b).sum(dim=-1).numpy() - float(self.similarity()[i, j])  # (L, H, C) -> (L, H)


def _check_model(model) -> SentenceEncoder:
    if not isinstance(model, SentenceEncoder) or not isinstance(model.network, Bert):
        raise TypeError(f"model must be a sentence encoder (multihead.models.load('minilm') or a BERT folder), "
                        f"got {type(model).__name__}"
                        + (f" of kind {model.kind!r}" if isinstance(getattr(model, "kind", None), str) else ""))
    return model


def _pooled(hidden: Tensor, key_mask: Tensor) -> Tensor:
    """SentenceEncoder.encode's pooling: the mean over real tokens of (N, T, C), L2-normalised, (N, C) float32."""
    real = key_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T) -> (N, T, 1)
    mean = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1e-9)  # (N, T, C) -> (N, C)
    return nn.functional.normalize(mean, p=2.0, dim=-1).float()


def _layer_inputs(network: Bert, batch: Tokenized) -> tuple[list[Tensor], Tensor]:
    """Every layer's input (N, T, C) with every head kept, caught on the way, and the last hidden states."""
    inputs: list[Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for layer in network.layers]
    try:
        hidden = network(batch.input_ids, key_mask=batch.key_mask).hidden  # (N, T, C)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, hidden


def _without(network: Bert, batch: Tokenized, x: Tensor, layer: int, head: int) -> Tensor:
    """The embeddings (N, C) with one head removed, from that layer's input x: the layers below are as they were."""
    weight = network.token_embedding.weight
    mask = torch.ones(network.config.num_heads, dtype=weight.dtype, device=weight.device)  # (H,): kept ...
    mask[head] = 0  # ... but this one
    x = network.layers[layer](x, batch.key_mask, False, mask).hidden
    for later in network.layers[layer + 1:]:
        x = later(x, batch.key_mask, False).hidden
    return _pooled(x, batch.key_mask)


@torch.no_grad()
def ablate_heads(model, texts: Sequence[str]) -> HeadAblation:
    """The texts' embeddings with every head, and with each head of each layer removed in turn.

    model: a `SentenceEncoder` (`multihead.models.load("minilm")`, a BERT
    folder). texts: one or more non-empty texts, run as one padded batch
    (truncated to the model's max_seq_length, as `encode` does). The layers
    below a removed head compute what they computed with every head, so each
    removal reruns only its own layer and the ones above (the same numbers,
    bit for bit, as `network(..., head_mask=)` with that one zero).
    """
    model = _check_model(model)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of str (wrap a single text in a list), got {type(texts).__name__}")
    texts = tuple(check_text(t) for t in texts)
    if not texts:
        raise ValueError("texts is empty; give at least one text")
    network = model.network
    L, H = network.config.num_layers, network.config.num_heads
    batch = model.tokenizer(list(texts), max_length=model.max_seq_length, truncate=True)
    inputs, hidden = _layer_inputs(network, batch)
    embeddings = _pooled(hidden, batch.key_mask)  # (N, C)
    ablated = embeddings.new_empty(L, H, *embeddings.shape)  # (L, H, N, C)
    for layer in range(L):
        for head in range(H):
            ablated[layer, head] = _without(network, batch, inputs[layer], layer, head)
    return HeadAblation(texts, embeddings, ablated)


class Link(NamedTuple):
    """The strongest link of one head between two different words (special tokens left out)."""

    query: int  # token index the link is from
    key: int  # token index the link goes to
    weight: float  # the softmax weight of that link


def strongest_link(weights, special: Sequence[bool]) -> Link | None:
    """The (query, key) of largest weight in one head's (T, T) weights, with query != key and neither special.

    None when the text has fewer than two ordinary tokens.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"weights must be one head's (T, T) attention weights, got {tuple(w.shape)}")
    if len(special) != w.shape[0]:
        raise ValueError(f"special must have one bool per token, {w.shape[0]}, got {len(special)}")
    ordinary = ~torch.tensor([bool(s) for s in special])  # (T,)
    allowed = ordinary[:, None] & ordinary[None, :] & ~torch.eye(w.shape[0], dtype=torch.bool)  # (T, T)
    if not bool(allowed.any()):
        return None
    flat = int(torch.argmax(torch.where(allowed, w, -1.0)))  # (T, T) -> one index, row-major
    query, key = divmod(flat, w.shape[1])
    return Link(query, key, float(w[query, key]))


def top_heads(importance, count: int) -> list[tuple[int, int]]:
    """The (layer, head) of the `count` largest values of an (L, H) array, largest first."""
    values = np.asarray(importance, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"importance must be (L, H), got shape {values.shape}")
    positive_int("count", count)
    order = np.argsort(-values, axis=None, kind="stable")[:count]  # (L·H,) flat indices, largest first
    return [(int(i) // values.shape[1], int(i) % values.shape[1]) for i in order]


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _cell_text(shown: float) -> str:
    """A cell's number (already in the picture's unit), short enough for a 0.6-inch cell; never "-0.0"."""
    text = f"{shown:.0f}" if abs(shown) >= 10 else f"{shown:.1f}"
    return "0" if float(text) == 0 else text


def importance_figure(importance, *, title: str = "Which heads matter", label: str = "1 - cos",
                      scale: float | None = None, mark: int = 3):
    """The layer x head picture of an (L, H) array: one cell per head, its value written in it.

    Values of one sign are drawn from white (0) to dark on a square-root
    scale, so that the small values of the early layers still show when one
    layer dominates; values of both signs on a linear blue-red scale centred
    on 0. scale: the unit of the cells' numbers
    and of the colour bar (None: the power of ten that leaves at most two
    digits). mark: the `mark` cells of largest magnitude get a black outline.
    Returns a matplotlib Figure, built without pyplot (a notebook shows it,
    `multihead.viz.save_png` writes it).
    """
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values = np.asarray(importance, dtype=np.float64)
    if values.ndim != 2 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"importance must be a finite (L, H) array, got shape {values.shape}")
    if not isinstance(title, str) or not isinstance(label, str):
        raise TypeError("title and label must be str")
    int_at_least("mark", mark, 0)
    L, H = values.shape
    largest = float(np.abs(values).max())
    if scale is None:
        scale = 10.0 ** (np.floor(np.log10(largest)) - 1) if largest > 0 else 1.0
    positive_number("scale", scale)
    shown = values / scale  # (L, H) in the picture's unit
    vmax = max(float(np.abs(shown).max()), 1e-12)
    signed = bool((values < 0).any())
    fig = Figure(figsize=(1.6 + 0.62 * H, 1.4 + 0.5 * L), layout="constrained")
    ax = fig.add_subplot()
    norm = Normalize(-vmax, vmax) if signed else PowerNorm(0.5, 0.0, vmax)
    image = ax.imshow(shown, cmap="RdBu_r" if signed else "Purples", norm=norm, aspect="auto")
    for layer in range(L):
        for head in range(H):
            dark = abs(norm(shown[layer, head]) - (0.5 if signed else 0.0)) > (0.3 if signed else 0.6)  # white text
            ax.text(head, layer, _cell_text(shown[layer, head]), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    for layer, head in top_heads(np.abs(values), min(mark, values.size)) if mark else []:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(H), [str(h) for h in range(H)])
    ax.set_yticks(range(L), [str(layer) for layer in range(L)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=11)
    exponent = int(round(np.log10(scale)))
    unit = "" if scale == 1 else (f", × 10{str(exponent).translate(_SUPERSCRIPT)}" if scale == 10.0 ** exponent
                                  else f", × {scale:g}")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label(label + unit, fontsize=10)
    return fig
