"""Matplotlib pictures of the attention weights of one sequence.

`weights` is one sequence's stack of attention maps, (L, H, T, T): L layers,
H heads, and for each head a T x T matrix whose row t is what query token t
gives to every key token (each row of a softmax sums to 1). Rows are queries
and are drawn top to bottom, columns are keys and are drawn left to right, so
the picture reads like the matrix.

    grid_figure   every head of every layer at once: rows = layers, columns = heads
    layer_figure  the heads of one layer, large, with every token named
    save_png      write a figure to a PNG file

Long inputs stay cheap and honest: token names are thinned to what fits, and
when a heatmap has more positions than pixels each pixel shows the largest
weight of the block it covers, so a lone strong link is not averaged away.

The figures are built on `matplotlib.figure.Figure` with an Agg canvas, not
through pyplot: nothing global changes (the user's backend stays as it is) and
no display is needed, so this works the same on a server, in a test and in a
notebook (where a returned Figure shows itself).
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
import torch

try:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
except ImportError as exc:  # matplotlib is an optional dependency (the viz group)
    raise ImportError(
        "multihead.viz needs matplotlib, which is not installed: pip install 'multihead[viz]'"
    ) from exc

from ...core.checks import positive_int
from .attentions import is_layer_sequence, stack_attentions
from .stats import as_tokens

__all__ = ["grid_figure", "layer_figure", "save_png"]

CMAP = "Blues"  # white = no attention: the few strong links of a peaky head stand out on paper and screen

# Grid cells: wide enough that a 12-token map keeps its labels readable, narrow
# enough that 12 heads fit a screen; GRID_WIDTH is the width that the heads share.
GRID_WIDTH = 18.0  # inches for all the heads of a row
GRID_CELL_MIN, GRID_CELL_MAX = 1.25, 3.0  # inches per heatmap
GRID_GAP = 0.08  # inches between neighbouring heatmaps

# layer_figure panels grow with T so that every token keeps a readable label.
PANEL_MIN, PANEL_MAX = 3.0, 5.5  # inches per heatmap: 4 of the largest still fit a 30-inch-wide figure
PANEL_PER_TOKEN = 0.17  # inches: about a 9-point line per token
PANEL_COLUMNS = 4  # heads per row of a layer figure
PANEL_GAP = 0.3  # inches between a panel and its neighbour's token names
LAYER_MAX_LABELS = 64  # past this, labels at FONT_MIN would overlap even on the largest panel

# Tick labels are sized to the room that each one has along its axis.
FONT_MIN, FONT_MAX = 4.0, 9.0  # points
FONT_FILL = 0.8  # fraction of a tick's room that its text may fill
POINTS_PER_INCH = 72.0
LABEL_FONT, TITLE_FONT = 8.0, 10.0  # points: axis names and cell titles, panel titles

# Margins, in inches, for the text around the heatmaps.
MARGIN = 0.1  # at the figure's edges
TICK_ROOM = 0.08  # tick marks and their padding, beside the token names
AXIS_LABEL_ROOM = 0.22  # "query" / "key" beside the token names
CELL_TITLE_ROOM = 0.2  # "L0 H3" above each grid cell
PANEL_TITLE_ROOM = 0.3  # "head 3" above each panel
SUPTITLE_ROOM = 0.45  # the figure's title
COLORBAR_GAP, COLORBAR_WIDTH = 0.15, 0.15
COLORBAR_ROOM = 0.75  # the colour bar's tick values and its label
SPINE_WIDTH = 1.2  # points; the image covers its inner half

# Past one position per pixel a heatmap shows block maxima (see _heatmap).
# 72 dpi is the coarsest that a figure is expected to be saved at; finer ones
# (save_png's 110) then draw every block over a pixel or more.
POOL_DPI = 72.0


# --------------------------------------------------------------------------- checks


def _as_weights(weights) -> np.ndarray:
    """(L, H, T, T) float array from numpy or torch, or a TypeError/ValueError naming `weights`.

    A tuple or list of per-layer (1, H, T, T) tensors (transformers' `outputs.attentions`) is stacked first.
    """
    if is_layer_sequence(weights):
        weights = stack_attentions(weights, name="weights")  # L x (1, H, T, T) -> (L, H, T, T)
    if isinstance(weights, torch.Tensor):
        if weights.is_complex():
            raise TypeError(f"weights must be real, got {weights.dtype}")
        # bf16/fp16 have no numpy twin; float32 holds every value they can.
        array = weights.detach().to("cpu", torch.float32).numpy()
    elif isinstance(weights, np.ndarray):
        if not (np.issubdtype(weights.dtype, np.floating) or np.issubdtype(weights.dtype, np.integer)):
            raise TypeError(f"weights must be a real numeric array, got dtype {weights.dtype}")
        array = weights
    else:
        raise TypeError(
            f"weights must be a numpy.ndarray or torch.Tensor of shape (L, H, T, T), got {type(weights).__name__}"
        )
    if array.ndim != 4:
        raise ValueError(
            f"weights has {array.ndim} dims, (L, H, T, T) expected (one sequence: layers, heads, "
            f"queries, keys), got shape {tuple(array.shape)}"
        )
    L, H, T, S = array.shape
    if T != S:
        raise ValueError(
            f"weights must be square self-attention maps (L, H, T, T), got {T} queries x {S} keys "
            f"in shape {tuple(array.shape)}"
        )
    if L == 0 or H == 0 or T == 0:
        raise ValueError(f"weights is empty, shape {tuple(array.shape)}: nothing to draw")
    if np.isinf(array).any():
        # NaN is drawn as a blank cell; an infinity would wreck the shared colour scale.
        raise ValueError("weights contains inf; attention weights are finite (NaN is allowed and drawn blank)")
    if array.dtype in (np.float32, np.float64):
        return array  # no copy: 12 layers x 12 heads of 512 tokens is already 150 MB in float32
    return array.astype(np.float32)  # float16 and ints: what imshow and the colour scale take


def _index(name: str, value, size: int, what: str) -> int:
    """An index into `size` things, Python-style negatives allowed, returned as 0..size-1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not -size <= value < size:
        raise ValueError(f"{name} must be in [0, {size}) for {size} {what} (negatives count from the end), got {value}")
    return int(value) % size


def _cmap(cmap) -> str | Colormap:
    # Checked before any drawing, so that a typo fails with its name, not deep in imshow.
    if isinstance(cmap, Colormap):
        return cmap
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a colormap name or a matplotlib Colormap, got {type(cmap).__name__}")
    if cmap not in colormaps:
        raise ValueError(f"cmap must be a matplotlib colormap name such as 'Blues' or 'viridis', got {cmap!r}")
    return cmap


def _title(title) -> str:
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    return title


# --------------------------------------------------------------------------- layout
#
# The figures are laid out by hand, in inches, rather than by matplotlib's
# constrained or tight layout: those measure every tick of every axes on each
# draw, which made a 6 x 12 grid take seconds. Here only the outer axes carry
# ticks at all, and the margins come from measuring the longest label once.


def _tick_positions(T: int, max_labels: int, axis_inches: float) -> np.ndarray:
    """Every position when they fit, else every step-th one.

    At most max_labels are named, and no more than fit along the axis at
    FONT_MIN: past that, the names would overlap into a grey smear.
    """
    fits = int(axis_inches * POINTS_PER_INCH * FONT_FILL / FONT_MIN)
    step = math.ceil(T / max(1, min(max_labels, fits)))
    return np.arange(0, T, step)


def _font_size(axis_inches: float, n_labels: int) -> float:
    room = axis_inches * POINTS_PER_INCH / max(n_labels, 1)
    return float(min(FONT_MAX, max(FONT_MIN, FONT_FILL * room)))


def _colour_range(array: np.ndarray) -> tuple[float, float]:
    """0 .. the largest weight: one scale for every heatmap, so heads compare by eye.

    The top is the data's maximum rather than 1 so that long inputs, whose
    weights are all small, are not drawn almost white.
    """
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = min(0.0, float(finite.min())), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _new_figure() -> Figure:
    fig = Figure()
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: draw() and savefig() work without pyplot
    return fig


def _text_width(fig: Figure, labels: Sequence[str], fontsize: float) -> float:
    """Width in inches of the widest label, as Agg will draw it."""
    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=fontsize)
    widest = max(renderer.get_text_width_height_descent(s, prop, ismath=False)[0] for s in labels)
    return widest / fig.dpi


class _Layout:
    """Equal square cells on a grid, with margins and gaps in inches; sizes the figure."""

    def __init__(self, fig: Figure, nrows: int, ncols: int, cell: float, *, left: float, right: float,
                 top: float, bottom: float, hgap: float, vgap: float):
        self.nrows, self.ncols, self.cell = nrows, ncols, cell
        self.left, self.bottom, self.hgap, self.vgap = left, bottom, hgap, vgap
        self.width = left + ncols * cell + (ncols - 1) * hgap + right
        self.height = bottom + nrows * cell + (nrows - 1) * vgap + top
        fig.set_size_inches(self.width, self.height)

    def rect(self, x: float, y: float, w: float, h: float) -> list[float]:
        """Inches from the bottom-left corner -> figure fractions, as add_axes wants them."""
        return [x / self.width, y / self.height, w / self.width, h / self.height]

    def cell_rect(self, row: int, col: int) -> list[float]:
        x = self.left + col * (self.cell + self.hgap)
        y = self.bottom + (self.nrows - 1 - row) * (self.cell + self.vgap)  # row 0 on top
        return self.rect(x, y, self.cell, self.cell)

    def colorbar_rect(self, gap: float, width: float) -> list[float]:
        """A bar right of the cells, as tall as the cells (at most 4 of them, centred)."""
        span = self.nrows * self.cell + (self.nrows - 1) * self.vgap
        height = min(span, 4 * self.cell)
        y = self.bottom + (span - height) / 2
        x = self.left + self.ncols * self.cell + (self.ncols - 1) * self.hgap + gap
        return self.rect(x, y, width, height)


def _block_max(data: np.ndarray, k: int) -> np.ndarray:
    """Each k x k block of positions -> its largest weight; NaN only where a whole block is NaN."""
    T = data.shape[0]
    P = math.ceil(T / k)
    padded = np.full((P * k, P * k), np.nan)
    padded[:T, :T] = data
    # fmax, unlike max and nanmax, skips NaN without a warning for all-NaN blocks.
    return np.fmax.reduce(padded.reshape(P, k, P, k), axis=(1, 3))  # (P*k, P*k) -> (P, P)


def _heatmap(fig: Figure, rect, data: np.ndarray, cmap, vmin: float, vmax: float, inches: float):
    """One (T, T) map on a new axes at rect, inches wide; returns (axes, image)."""
    ax = fig.add_axes(rect)
    T = data.shape[0]
    k = math.ceil(T / (inches * POOL_DPI))
    if k > 1:
        # More positions than pixels: averaging them (antialiasing) or skipping
        # them (nearest) would both lose a lone strong link, such as the column
        # of a [CLS] token, so each pixel shows the largest weight it covers.
        pooled = _block_max(data, k)
        span = pooled.shape[0] * k - 0.5  # the padding past T is cropped by the limits below
        image = ax.imshow(pooled, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                          extent=(-0.5, span, span, -0.5))
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_ylim(T - 0.5, -0.5)
    else:
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_aspect("equal")
    # The frame goes under the image, so that its inner half does not hide the
    # first and last rows and columns when a position is a pixel or two wide.
    for spine in ax.spines.values():
        spine.set_zorder(-1)
        spine.set_linewidth(SPINE_WIDTH)
    # No ticks unless asked: building ticks nobody sees is most of the cost of a big grid.
    ax.set_xticks([])
    ax.set_yticks([])
    return ax, image


def _name_keys(ax, positions, labels, fontsize: float) -> None:
    # parse_math=False: a token such as "$" or "$5" is text, not a TeX formula.
    ax.set_xticks(positions, labels, rotation=90, fontsize=fontsize, parse_math=False)
    ax.tick_params(axis="x", length=2, pad=1)


def _name_queries(ax, positions, labels, fontsize: float) -> None:
    ax.set_yticks(positions, labels, fontsize=fontsize, parse_math=False)
    ax.tick_params(axis="y", length=2, pad=1)


def _colorbar(fig: Figure, layout: _Layout, image) -> None:
    cax = fig.add_axes(layout.colorbar_rect(COLORBAR_GAP, COLORBAR_WIDTH))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("attention weight", fontsize=LABEL_FONT)
    bar.ax.tick_params(labelsize=LABEL_FONT)


# --------------------------------------------------------------------------- figures


def grid_figure(tokens: Sequence[str], weights, *, title: str = "", max_labels: int = 40,
                cmap: str | Colormap = CMAP) -> Figure:
    """Every head of every layer: a heatmap per (layer, head), rows = layers, columns = heads.

    tokens: the T tokens of the sequence, in order.
    weights: (L, H, T, T) numpy array or torch tensor, one sequence's attention
        weights; weights[l, h, t, s] is what query t gives to key s in head h of
        layer l.
    title: drawn above the grid.
    max_labels: at most this many tokens are named along each outer axis; for
        a longer input only every k-th token is named, k = ceil(T / max_labels),
        or larger when that many names would not fit beside a cell at a
        4-point font (about 21 for the 1.5-inch cells of 12 heads).
    cmap: a matplotlib colormap or its name.

    Each heatmap is titled "L<layer> H<head>" (0-based, as `weights` is indexed).
    Keys (columns) are named under the bottom row, queries (rows) left of the
    first column; all heatmaps share one colour scale, from 0 to the largest
    weight, shown by the colour bar on the right.
    """
    array = _as_weights(weights)
    L, H, T, _ = array.shape
    tokens = as_tokens(tokens, T)
    max_labels = positive_int("max_labels", max_labels)
    title = _title(title)
    cmap = _cmap(cmap)

    cell = min(GRID_CELL_MAX, max(GRID_CELL_MIN, GRID_WIDTH / H))
    positions = _tick_positions(T, max_labels, cell)
    labels = [tokens[i] for i in positions]
    fontsize = _font_size(cell, len(positions))
    fig = _new_figure()
    names = _text_width(fig, labels, fontsize) + TICK_ROOM
    layout = _Layout(
        fig, L, H, cell,
        left=MARGIN + AXIS_LABEL_ROOM + names,
        right=COLORBAR_GAP + COLORBAR_WIDTH + COLORBAR_ROOM,
        top=CELL_TITLE_ROOM + (SUPTITLE_ROOM if title else MARGIN),
        bottom=MARGIN + AXIS_LABEL_ROOM + names,
        hgap=GRID_GAP, vgap=GRID_GAP + CELL_TITLE_ROOM,
    )

    vmin, vmax = _colour_range(array)
    image = None
    for l in range(L):
        for h in range(H):
            ax, image = _heatmap(fig, layout.cell_rect(l, h), array[l, h], cmap, vmin, vmax, cell)
            ax.set_title(f"L{l} H{h}", fontsize=LABEL_FONT, pad=2)
            if h == 0:
                _name_queries(ax, positions, labels, fontsize)
            if l == L - 1:
                _name_keys(ax, positions, labels, fontsize)
    fig.axes[0].set_ylabel("query", fontsize=LABEL_FONT)
    fig.axes[(L - 1) * H].set_xlabel("key", fontsize=LABEL_FONT)
    _colorbar(fig, layout, image)
    if title:
        fig.suptitle(title, y=1 - MARGIN / layout.height, va="top")
    return fig


def layer_figure(tokens: Sequence[str], weights, layer: int, *, heads: Sequence[int] | None = None,
                 title: str = "", max_labels: int = LAYER_MAX_LABELS, cmap: str | Colormap = CMAP) -> Figure:
    """The heads of one layer, one large heatmap each, every token named on both axes.

    tokens: the T tokens of the sequence, in order.
    weights: (L, H, T, T) numpy array or torch tensor (see `grid_figure`).
    layer: which layer, 0-based (negative counts from the end).
    heads: which heads, in the order given; None draws all of them.
    title: drawn above the heatmaps; when empty, "layer <layer>".
    max_labels: past this many tokens only every ceil(T / max_labels)-th is
        named, because the names would overlap at any readable size.
    cmap: a matplotlib colormap or its name.

    Rows are queries, columns keys; each heatmap is titled "head <h>". The
    heads drawn share one colour scale, from 0 to their largest weight.
    """
    array = _as_weights(weights)
    L, H, T, _ = array.shape
    tokens = as_tokens(tokens, T)
    layer = _index("layer", layer, L, "layers")
    chosen = _chosen_heads(heads, H)
    max_labels = positive_int("max_labels", max_labels)
    title = _title(title) or f"layer {layer}"
    cmap = _cmap(cmap)

    maps = array[layer, chosen]  # (L, H, T, T) -> (n_heads, T, T)
    panel = min(PANEL_MAX, max(PANEL_MIN, PANEL_PER_TOKEN * min(T, max_labels)))
    positions = _tick_positions(T, max_labels, panel)
    labels = [tokens[i] for i in positions]
    fontsize = _font_size(panel, len(positions))
    fig = _new_figure()
    layout = _panel_layout(fig, len(chosen), panel, _text_width(fig, labels, fontsize))

    vmin, vmax = _colour_range(maps)
    image = None
    for i, h in enumerate(chosen):
        rect = layout.cell_rect(i // layout.ncols, i % layout.ncols)
        ax, image = _heatmap(fig, rect, maps[i], cmap, vmin, vmax, panel)
        ax.set_title(f"head {h}", fontsize=TITLE_FONT, pad=3)
        _name_queries(ax, positions, labels, fontsize)
        _name_keys(ax, positions, labels, fontsize)
        ax.set_xlabel("key", fontsize=LABEL_FONT)
        ax.set_ylabel("query", fontsize=LABEL_FONT)
    _colorbar(fig, layout, image)
    fig.suptitle(title, y=1 - MARGIN / layout.height, va="top")
    return fig


def _chosen_heads(heads, H: int) -> list[int]:
    """layer_figure's `heads`, checked: every head (None) or the given ones, as indices 0..H-1 in order."""
    if heads is None:
        return list(range(H))
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise TypeError(f"heads must be a sequence of ints or None, got {type(heads).__name__}")
    if len(heads) == 0:
        raise ValueError("heads is empty: name at least one head, or pass None for all")
    return [_index(f"heads[{i}]", h, H, "heads") for i, h in enumerate(heads)]


def _panel_layout(fig: Figure, n: int, panel: float, label_width: float) -> _Layout:
    """n panels, PANEL_COLUMNS to a row, each with room for its own token names.

    Every panel names its tokens on both axes, so the room for the names
    (label_width inches, the widest one) sits beside and under each panel,
    not only at the figure's edges.
    """
    ncols = min(n, PANEL_COLUMNS)
    names = label_width + TICK_ROOM + AXIS_LABEL_ROOM
    return _Layout(
        fig, math.ceil(n / ncols), ncols, panel,
        left=MARGIN + names,
        right=COLORBAR_GAP + COLORBAR_WIDTH + COLORBAR_ROOM,
        top=PANEL_TITLE_ROOM + SUPTITLE_ROOM,
        bottom=MARGIN + names,
        hgap=PANEL_GAP + names, vgap=PANEL_GAP + names + PANEL_TITLE_ROOM,
    )


def save_png(fig: Figure, path: str | os.PathLike, *, dpi: int = 110) -> pathlib.Path:
    """Write `fig` to `path` as a PNG (parent folders created), close it, return the path.

    The image is fig's size times dpi, pixel for pixel (no cropping), so a
    caller knows the size in advance. Closing matters only for a figure that
    pyplot manages; one from this module holds no global state and goes with
    its last reference.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib.figure.Figure, got {type(fig).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    dpi = positive_int("dpi", dpi)
    out = pathlib.Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    if "matplotlib.pyplot" in sys.modules:
        # Only pyplot keeps figures alive globally; importing it here would pick a backend.
        sys.modules["matplotlib.pyplot"].close(fig)
    return out
