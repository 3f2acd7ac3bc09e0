"""Pictures of attention: what every head of a model looks at.

Matplotlib figures of one sequence's attention weights (`grid_figure` for all
layers x heads at once, `layer_figure` for the heads of one layer, `save_png`
to write them), built without pyplot so that no global backend is chosen and
no display is needed.

The head view of any model's weights: `head_view(out.attentions, tokens)`
takes transformers' `outputs.attentions` (a tuple of per-layer (B, H, T, T)
tensors) as bertviz's `head_view` does, and returns a `HeadView` that a
Jupyter notebook draws inline and `save` writes as the standalone page;
`stack_attentions` gives one sequence's (L, H, T, T) from that tuple, which
every function here also takes directly for a batch of one.

Per-head statistics (`head_stats`: entropy, mean distance, share on special
tokens, previous-token share; `strongest_targets`), and a standalone HTML
head view (`head_view_html`, `write_head_view`): one file with inline
JavaScript that needs no network.
"""

from .attentions import stack_attentions
from .choices import find_token, head_choices, most_different_heads
from .html import head_view_html, write_head_view
from .notebook import HeadView, head_view
from .stats import HeadStats, guess_special, head_stats, stats_table, stats_text, strongest_targets

_FIGURES = ("grid_figure", "layer_figure", "save_png")


def __getattr__(name: str):
    # The figures need matplotlib (the `viz` extra); the statistics and the HTML
    # view do not, so matplotlib is imported only when a figure is asked for.
    if name in _FIGURES:
        from . import figures

        return getattr(figures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "grid_figure", "layer_figure", "save_png",
    "find_token", "head_choices", "most_different_heads",
    "head_view_html", "write_head_view",
    "HeadView", "head_view", "stack_attentions",
    "HeadStats", "guess_special", "head_stats", "stats_table", "stats_text", "strongest_targets",
]
