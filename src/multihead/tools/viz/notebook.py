"""The head view in a Jupyter notebook: `head_view(out.attentions, tokens)` shows it inline.

    import multihead.viz
    out = model(**batch, output_attentions=True)     # any transformers model, any attn_implementation
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    view = multihead.viz.head_view(out.attentions, tokens)   # the last expression of a cell: drawn inline
    view.save("heads.html")                                   # the same page as a file

`head_view` takes what bertviz's `head_view(attention, tokens)` takes
(transformers' tuple of per-layer (B, H, T, T) tensors and the tokens), or
one sequence's (L, H, T, T) array, and returns a `HeadView`. Its `html` is
the standalone page of `multihead.viz.html`: inline CSS, JavaScript and
data, nothing fetched from a CDN, so it draws offline (bertviz's page loads
require.js, d3 and jQuery from the network and stays blank without it).

In a notebook the page is shown inside an iframe whose `srcdoc` is that
page, byte for byte: a whole HTML document put straight into the notebook
would restyle it (the page sets `:root` and `body`) and two views would share
element ids. The iframe runs the page's script in a sandbox without the
notebook's origin (`sandbox="allow-scripts"`).
"""

from __future__ import annotations

import html as _html
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from ...core.checks import flag
from .attentions import stack_attentions
from .html import head_view_page, write_page
from .stats import as_weights

__all__ = ["HeadView", "head_view", "prettify"]

ROW_PX = 20  # the page draws one token per 20 px row (its CSS --row)
FRAME_PX = 260  # the page's heading, controls and margins above and below the token rows
MIN_HEIGHT, MAX_HEIGHT = 480, 900  # the iframe's height in a notebook; a longer page scrolls inside it


@dataclass(frozen=True)
class HeadView:
    """One sequence's head view: the standalone page, shown inline by Jupyter, written by `save`."""

    html: str  # the standalone page (multihead.viz.html.head_view_html): what save() writes, byte for byte
    height: int  # the iframe's height in a notebook, in CSS pixels

    def _repr_html_(self) -> str:
        """An iframe whose srcdoc is `html`: the page, inline and unchanged (see the module docstring)."""
        # Escaped for a double-quoted attribute; "\r" as a reference, which the parser's newline normalisation keeps.
        document = _html.escape(self.html, quote=True).replace("\r", "&#13;")
        return (f'<iframe class="multihead-head-view" title="multihead head view" sandbox="allow-scripts" '
                f'style="width: 100%; height: {self.height}px; border: 1px solid #e3e6eb; border-radius: 8px;" '
                f'srcdoc="{document}"></iframe>')

    def __repr__(self) -> str:  # the page is megabytes for long inputs: a terminal gets its size, not its text
        return f"HeadView(html=<{len(self.html):,} characters>, height={self.height})"

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the page to `path` (.html) as UTF-8, exactly `html`; returns the path."""
        return write_page(path, self.html)


def prettify(tokens: Sequence[str]) -> list[str]:
    """Tokens as read: byte-level "Ġ" and SentencePiece's "▁" (a leading space) become a space, as in bertviz."""
    return [t.replace("Ġ", " ").replace("▁", " ") if isinstance(t, str) else t for t in tokens]


def head_view(attentions, tokens: Sequence[str], *, batch_index: int | None = None, special=None,
              prettify_tokens: bool = True, title: str = "", model_name: str = "", layer: int = 0,
              focus: int | None = None, max_edges_per_token: int = 8, height: int | None = None) -> HeadView:
    """The head view of one sequence, ready to display in a notebook or to save.

    attentions: transformers' `outputs.attentions`, a tuple (or list) of
    per-layer (B, H, T, T) tensors, or one sequence's (L, H, T, T) tensor or
    array. tokens: the T tokens of that sequence
    (`tokenizer.convert_ids_to_tokens(ids)`). batch_index: the sequence of a
    batch to draw (None: the batch must hold one). special: T bools, True
    for [CLS]/[SEP]/...; None guesses from the spelling. prettify_tokens:
    show "Ġcat" and "▁cat" as " cat". height: the iframe's height in a
    notebook in pixels (None: from T). The other arguments are
    `multihead.viz.head_view_html`'s.
    """
    _check_height(height)
    flag("prettify_tokens", prettify_tokens)
    if isinstance(attentions, (tuple, list)):
        weights = stack_attentions(attentions, batch_index=batch_index)  # L x (B, H, T, T) -> (L, H, T, T)
    elif batch_index is not None:
        raise TypeError("batch_index picks a sequence of transformers' per-layer attentions (a tuple of "
                        f"(B, H, T, T) tensors); attentions is one sequence's {type(attentions).__name__}")
    else:
        weights = attentions  # (L, H, T, T)
    weights = as_weights(weights, name="attentions")  # the values checked here, so that errors name the argument
    shown = prettify(list(tokens)) if prettify_tokens and isinstance(tokens, (list, tuple)) else tokens
    page = head_view_page(shown, weights, special=special, title=title, model_name=model_name, layer=layer,
                          focus=focus, max_edges_per_token=max_edges_per_token)  # weights checked just above
    fit = min(MAX_HEIGHT, max(MIN_HEIGHT, FRAME_PX + ROW_PX * len(shown)))  # T token rows and the frame around
    return HeadView(page, fit if height is None else height)


def _check_height(height) -> None:
    """height: None (fit the tokens) or a positive int of pixels, else a TypeError/ValueError naming it."""
    if height is None:
        return
    if isinstance(height, bool) or not isinstance(height, int):
        raise TypeError(f"height must be an int (pixels) or None, got {type(height).__name__}")
    if height < 1:
        raise ValueError(f"height must be a positive int (pixels) or None, got {height}")
