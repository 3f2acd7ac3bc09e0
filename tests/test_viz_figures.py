"""multihead.viz.figures: heatmaps of one sequence's (L, H, T, T) attention weights.

The pictures are checked through what they hold, not by eye: each heatmap's
image is the weights of its own (layer, head), rows = queries, the tick labels
are the tokens, and the PNG on disk is a real, non-blank image of the size the
figure promises.
"""

from __future__ import annotations

import importlib.abc
import math
import sys
import types

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from multihead.viz import figures
from multihead.viz.figures import grid_figure, layer_figure, save_png

TOKENS = "[CLS] the artist painted the portrait of a woman with a brush . [SEP]".split()
T = len(TOKENS)


def peaky(L: int, H: int, T: int, seed: int = 0) -> np.ndarray:
    """(L, H, T, T) softmax rows of random scores x 3: a few strong links per row, no symmetry."""
    scores = np.random.default_rng(seed).standard_normal((L, H, T, T)) * 3
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def suptitle(fig: Figure) -> str:
    # fig.texts rather than get_suptitle(), which needs matplotlib 3.8 (the viz extra allows 3.7).
    return " | ".join(t.get_text() for t in fig.texts)


def heatmaps(fig: Figure):
    """The heatmap axes, in drawing order; the colour bar's axes has no title."""
    return [ax for ax in fig.axes if ax.get_title()]


# --------------------------------------------------------------------------- grid_figure


def test_grid_has_one_titled_heatmap_per_layer_and_head_showing_its_own_weights():
    L, H = 3, 4
    w = peaky(L, H, T)
    fig = grid_figure(TOKENS, w, title="grid")
    axes = heatmaps(fig)
    assert len(axes) == L * H
    assert len(fig.axes) == L * H + 1  # and one colour bar
    for i, ax in enumerate(axes):
        l, h = divmod(i, H)
        assert ax.get_title() == f"L{l} H{h}"
        shown = np.asarray(ax.images[0].get_array())
        # Rows = queries: the transpose, or a neighbour's head, differs from this.
        np.testing.assert_array_equal(shown, w[l, h])
        assert not np.allclose(shown, w[l, h].T)
    assert suptitle(fig) == "grid"


def test_grid_names_tokens_on_the_outer_axes_only():
    L, H = 2, 3
    fig = grid_figure(TOKENS, peaky(L, H, T))
    axes = np.array(heatmaps(fig)).reshape(L, H)
    for l in range(L):
        for h in range(H):
            ax = axes[l, h]
            ys, xs = tick_texts(ax.get_yticklabels()), tick_texts(ax.get_xticklabels())
            assert ys == (TOKENS if h == 0 else [])
            assert xs == (TOKENS if l == L - 1 else [])
            if h == 0:
                np.testing.assert_array_equal(ax.get_yticks(), np.arange(T))
    assert axes[0, 0].get_ylabel() == "query"
    assert axes[-1, 0].get_xlabel() == "key"


def test_grid_shares_one_colour_scale_from_zero_to_the_largest_weight():
    w = peaky(2, 3, T)
    w[1, 2, 3, 4] = 1.0  # one head far peakier than the rest
    fig = grid_figure(TOKENS, w)
    for ax in heatmaps(fig):
        assert ax.images[0].get_clim() == (0.0, 1.0)


def test_grid_accepts_an_array_of_token_strings():
    fig = grid_figure(np.array(TOKENS), peaky(1, 1, T))
    assert tick_texts(heatmaps(fig)[0].get_xticklabels()) == TOKENS


def test_grid_accepts_torch_tensors_of_any_float_dtype():
    w = torch.from_numpy(peaky(2, 2, T)).to(torch.bfloat16).requires_grad_()
    fig = grid_figure(TOKENS, w)
    expected = w.detach().float().numpy()
    for i, ax in enumerate(heatmaps(fig)):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected[i // 2, i % 2])


def test_grid_thins_labels_of_a_long_input_to_max_labels():
    n = 100
    tokens = [f"t{i}" for i in range(n)]
    fig = grid_figure(tokens, peaky(1, 2, n), max_labels=10)
    first = heatmaps(fig)[0]
    np.testing.assert_array_equal(first.get_yticks(), np.arange(0, n, 10))
    assert tick_texts(first.get_yticklabels()) == tokens[::10]
    assert tick_texts(first.get_xticklabels()) == tokens[::10]


def test_grid_names_no_more_tokens_than_fit_beside_a_cell():
    # 60 names in a 1.5-inch cell would overlap at any legible size.
    n = 60
    tokens = [f"t{i}" for i in range(n)]
    fig = grid_figure(tokens, peaky(1, 12, n), max_labels=40)
    names = tick_texts(heatmaps(fig)[0].get_yticklabels())
    fits = int(1.5 * 72 * figures.FONT_FILL / figures.FONT_MIN)
    step = math.ceil(n / fits)
    assert names == tokens[::step]
    assert len(names) <= fits < 40


def test_a_long_input_is_drawn_as_block_maxima_so_a_lone_column_survives():
    n = 600  # more positions than a 1.5-inch cell has pixels
    w = np.full((1, 12, n, n), 0.1 / n)
    w[0, 0, :, 0] = 0.9  # every query on the first token, as heads do with [CLS]
    w[0, 0, 7, 599] = 0.5  # one link in the last, partial block
    w[0, 1, 123, 456] = 0.7  # a single strong link
    fig = grid_figure([f"t{i}" for i in range(n)], w)
    axes = heatmaps(fig)
    k = math.ceil(n / (1.5 * figures.POOL_DPI))
    assert k > 1
    P = math.ceil(n / k)
    for h in (0, 1):
        img = axes[h].images[0]
        shown = np.asarray(img.get_array())
        assert shown.shape == (P, P)
        padded = np.full((P * k, P * k), np.nan)
        padded[:n, :n] = w[0, h]
        np.testing.assert_allclose(shown, np.nanmax(padded.reshape(P, k, P, k), axis=(1, 3)))
        # Token coordinates stay those of the positions, so ticks still point at tokens.
        assert axes[h].get_xlim() == (-0.5, n - 0.5)
        assert axes[h].get_ylim() == (n - 0.5, -0.5)
    np.testing.assert_allclose(np.asarray(axes[0].images[0].get_array())[:, 0], 0.9)
    assert np.asarray(axes[0].images[0].get_array())[7 // k, 599 // k] == 0.5
    assert np.asarray(axes[1].images[0].get_array())[123 // k, 456 // k] == 0.7


def test_tokens_are_text_not_tex():
    # "$x^$" is broken mathtext: drawing it as a formula would raise.
    tokens = ["$x^$", "$5", "a_b", "$"]
    fig = grid_figure(tokens, peaky(1, 1, 4))
    fig.canvas.draw()
    assert tick_texts(heatmaps(fig)[0].get_xticklabels()) == tokens


def test_nan_weights_are_drawn_and_left_out_of_the_colour_scale():
    w = peaky(1, 2, T)
    w[0, 0, 0] = np.nan  # a query that attends to nothing
    fig = grid_figure(TOKENS, w)
    fig.canvas.draw()
    assert heatmaps(fig)[0].images[0].get_clim() == (0.0, float(np.nanmax(w)))


# --------------------------------------------------------------------------- layer_figure


def test_layer_figure_draws_the_chosen_heads_of_one_layer_with_every_token_named():
    w = peaky(3, 5, T)
    fig = layer_figure(TOKENS, w, 1, heads=[4, 0, 2])
    axes = heatmaps(fig)
    assert [ax.get_title() for ax in axes] == ["head 4", "head 0", "head 2"]
    for ax, h in zip(axes, [4, 0, 2]):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), w[1, h])
        assert tick_texts(ax.get_yticklabels()) == TOKENS
        assert tick_texts(ax.get_xticklabels()) == TOKENS
        assert ax.get_ylabel() == "query" and ax.get_xlabel() == "key"
    assert suptitle(fig) == "layer 1"


def test_layer_figure_defaults_to_every_head_and_counts_layers_from_the_end():
    w = peaky(3, 6, T)
    fig = layer_figure(TOKENS, w, -1, title="last layer")
    axes = heatmaps(fig)
    assert [ax.get_title() for ax in axes] == [f"head {h}" for h in range(6)]
    for h, ax in enumerate(axes):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), w[2, h])
    assert suptitle(fig) == "last layer"


def test_layer_figure_thins_labels_past_max_labels():
    n = 90
    tokens = [f"t{i}" for i in range(n)]
    fig = layer_figure(tokens, peaky(1, 1, n), 0, max_labels=30)
    assert tick_texts(heatmaps(fig)[0].get_xticklabels()) == tokens[::3]


# --------------------------------------------------------------------------- save_png


def test_save_png_writes_a_non_blank_png_of_the_figures_size(tmp_path):
    fig = grid_figure(TOKENS, peaky(2, 3, T), title="peaky")
    width, height = fig.get_size_inches()
    out = save_png(fig, tmp_path / "new" / "dir" / "grid.png", dpi=80)
    assert out == tmp_path / "new" / "dir" / "grid.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(out)
    # Agg truncates size x dpi to whole pixels.
    assert pixels.shape[:2] == (int(height * 80), int(width * 80))
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 50  # a blank or single-colour image would have a handful


def test_layer_png_is_not_blank(tmp_path):
    out = save_png(layer_figure(TOKENS, peaky(2, 3, T), 0), tmp_path / "layer.png")
    pixels = mpimg.imread(out)[..., :3]
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # The darkest blues of the strongest links are on the picture, not only white.
    assert pixels.min() < 0.2


class _NoPyplot(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "matplotlib.pyplot":
            raise ImportError("matplotlib.pyplot is blocked by the test")
        return None


def test_figures_need_no_pyplot_and_save_png_closes_pyplots_figures(tmp_path, monkeypatch):
    # Nothing of multihead holds pyplot from its import (it is loaded only if something else loaded it) ...
    loaded = sys.modules.get("matplotlib.pyplot")
    holders = [name for name, module in list(sys.modules.items()) if name.startswith("multihead") and loaded
               and any(value is loaded for value in vars(module).values())]
    assert holders == [], f"{holders} hold matplotlib.pyplot"
    # ... and drawing and saving work with pyplot impossible to import.
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    monkeypatch.delattr(matplotlib, "pyplot", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPyplot(), *sys.meta_path])
    w = np.full((1, 2, 3, 3), 1 / 3)
    save_png(grid_figure(list("abc"), w), tmp_path / "a.png")
    save_png(layer_figure(list("abc"), w, 0), tmp_path / "b.png")
    assert "matplotlib.pyplot" not in sys.modules
    # Where pyplot is loaded, the figure saved is closed there (pyplot keeps its figures alive otherwise).
    closed = []
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", types.SimpleNamespace(close=closed.append))
    fig = Figure()
    save_png(fig, tmp_path / "c.png")
    assert closed == [fig] and (tmp_path / "c.png").is_file()


# --------------------------------------------------------------------------- bad input


W = peaky(2, 3, T)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: grid_figure(TOKENS, W[0]), ValueError, "weights has 3 dims"),
        (lambda: grid_figure(TOKENS, W[..., :-1]), ValueError, "square"),
        (lambda: grid_figure(TOKENS, W[:, :, :0, :0]), ValueError, "empty"),
        (lambda: grid_figure(TOKENS, W.tolist()), TypeError, "weights must be a numpy.ndarray or torch.Tensor"),
        (lambda: grid_figure(TOKENS, W.astype(complex)), TypeError, "real numeric"),
        (lambda: grid_figure(TOKENS, np.where(W > 0.5, np.inf, W)), ValueError, "inf"),
        (lambda: grid_figure(TOKENS[:-1], W), ValueError, f"tokens has {T - 1} entries but weights has T = {T}"),
        (lambda: grid_figure(" ".join(TOKENS), W), TypeError, "single str"),
        (lambda: grid_figure(TOKENS[:-1] + [7], W), TypeError, f"tokens[{T - 1}] must be a str"),
        (lambda: grid_figure(TOKENS, W, max_labels=0), ValueError, "max_labels must be positive"),
        (lambda: grid_figure(TOKENS, W, title=3), TypeError, "title must be a str"),
        (lambda: grid_figure(TOKENS, W, cmap="Bluez"), ValueError, "cmap must be a matplotlib colormap name"),
        (lambda: layer_figure(TOKENS, W, 2), ValueError,
         "layer must be in [0, 2) for 2 layers (negatives count from the end), got 2"),
        (lambda: layer_figure(TOKENS, W, -3), ValueError, "layer must be in [0, 2)"),
        (lambda: layer_figure(TOKENS, W, True), TypeError, "layer must be an int"),
        (lambda: layer_figure(TOKENS, W, 0, heads=[0, 3]), ValueError,
         "heads[1] must be in [0, 3) for 3 heads (negatives count from the end), got 3"),
        (lambda: layer_figure(TOKENS, W, 0, heads=[]), ValueError, "heads is empty"),
        (lambda: layer_figure(TOKENS, W, 0, heads=1), TypeError, "heads must be a sequence of ints or None"),
        (lambda: layer_figure(TOKENS, W, 0, heads=[1.0]), TypeError, "heads[0] must be an int"),
    ],
)
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_save_png_rejects_what_it_cannot_write(tmp_path):
    fig = grid_figure(TOKENS, W)
    with pytest.raises(TypeError, match="fig must be a matplotlib.figure.Figure"):
        save_png("not a figure", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"path must end in \.png"):
        save_png(fig, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="dpi must be positive"):
        save_png(fig, tmp_path / "x.png", dpi=0)
    assert not list(tmp_path.iterdir())
