"""Pictures of attention: what every head of a model looks at.

Matplotlib figures of one sequence's attention weights (`grid_figure` for all
layers x heads at once, `layer_figure` for the heads of one layer, `save_png`
to write them), built without pyplot so that no global backend is chosen and
no display is needed.

Per-head statistics (`head_stats`: entropy, mean distance, share on special
tokens, previous-token share; `strongest_targets`), and a standalone HTML
head view (`head_view_html`, `write_head_view`): one file with inline
JavaScript that needs no network.
"""

from .choices import find_token, head_choices, most_different_heads
from .html import head_view_html, write_head_view
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
    "HeadStats", "guess_special", "head_stats", "stats_table", "stats_text", "strongest_targets",
]
