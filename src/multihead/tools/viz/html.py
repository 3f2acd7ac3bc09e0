"""A standalone HTML head view: one file, inline CSS and JavaScript, no network access.

`head_view_html(tokens, weights)` returns the page for one sequence's
attention weights (L, H, T, T); `write_head_view(path, ...)` writes it.

On the page:

- a layer picker and one toggle per head (its colour), all heads on at first;
- the head view: tokens in two columns, queries on the left and keys on the
  right, a line from a query to each key it attends to, one colour per head,
  thicker and darker for more weight. With no token under the mouse every
  query's strongest links are drawn faintly; hovering a token draws only its
  own links (a query's keys, or a key's queries), clicking pins it;
- for the hovered or pinned token, one line per head naming the token that
  head looks at most;
- the selected layer's per-head statistics (`multihead.viz.stats`);
- the model view: a thumbnail heatmap of every layer x head; clicking one
  shows that head in the head view.

Long inputs (512 tokens and more) stay fast and the file stays small: only
the `max_edges_per_token` strongest links of each query row of each head are
embedded, their weights rounded to 3 decimals (the page says so), and the
thumbnails are max-pooled in Python to at most THUMB_MAX x THUMB_MAX cells.
Everything is embedded as JSON inside <script type="application/json">, with
"<", ">" and "&" escaped, so no token (`</script>`, `<|endoftext|>`, quotes)
can end the script early; tokens reach the page only through textContent.
"""

from __future__ import annotations

import base64
import html as _html
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from ...core.checks import positive_int
from .stats import as_special, as_tokens, as_weights, checked_index, guess_special, stats_of_checked

__all__ = ["check_page_path", "head_view_html", "write_head_view", "write_page"]

THUMB_MAX = 64  # thumbnail cells per side: 72 heads x 64 x 64 bytes is ~300 kB, and finer detail is invisible at ~50 px
WEIGHT_SCALE = 1000  # link weights are stored as round(w * 1000) in uint16: 3 decimals, 2 bytes each
MAX_TOKENS = 65535  # key indices are stored as uint16
_PLACEHOLDER = re.compile(r"__(TITLE|SUBTITLE|NOTE|CSS|JS|DATA)__")


def head_view_html(
    tokens: Sequence[str],
    weights,
    *,
    special: Sequence[bool] | None = None,
    title: str = "",
    max_edges_per_token: int = 8,
    model_name: str = "",
    layer: int = 0,
    focus: int | None = None,
) -> str:
    """The head view of one sequence as a self-contained HTML page (a str).

    tokens: T strings, as the model saw them. weights: (L, H, T, T) NumPy
    array or torch tensor for one sequence, rows are queries and columns keys.
    special: T bools, True for [CLS]/[SEP]/...; None guesses from the
    spelling (`multihead.viz.stats.guess_special`). title: the page's
    heading (default: from model_name). max_edges_per_token: how many of
    each query row's strongest links are embedded per head; the page says
    how many of T it shows. model_name: shown under the heading.
    layer: the layer shown when the page opens. focus: a query token index
    to open pinned (its links drawn, each head's choice listed), e.g. the
    token a demo is about; None opens with no token pinned.
    """
    return head_view_page(tokens, as_weights(weights), special=special, title=title,
                          max_edges_per_token=max_edges_per_token, model_name=model_name, layer=layer, focus=focus)


def head_view_page(tokens: Sequence[str], w: np.ndarray, *, special: Sequence[bool] | None, title: str,
                   max_edges_per_token: int, model_name: str, layer: int, focus: int | None) -> str:
    """`head_view_html` of weights (L, H, T, T) that `as_weights` has checked; the other arguments are checked here."""
    L, H, T, _ = w.shape
    toks = as_tokens(tokens, T)
    if T > MAX_TOKENS:
        raise ValueError(f"weights has T = {T} tokens; the head view stores key indices as uint16, "
                         f"at most {MAX_TOKENS} expected")
    is_special = np.asarray(guess_special(toks), dtype=bool) if special is None else as_special(special, T)
    k = min(positive_int("max_edges_per_token", max_edges_per_token), T)
    for name, value in (("title", title), ("model_name", model_name)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")

    data = page_data(toks, w, is_special, k)
    data["model_name"] = model_name
    data["start_layer"] = checked_index("layer", layer, L)
    data["start_focus"] = -1 if focus is None else checked_index("focus", focus, T)
    page_title = title or (f"{model_name}: attention heads" if model_name else "Attention heads")
    return _fill_template(data, page_title, _subtitle(model_name, L, H, T), _links_note(k, T))


def _links_note(k: int, T: int) -> str:
    """What the page says about the links it embeds: how many per token, and how rounded."""
    if k < T:
        return (f"Showing the {k} strongest links per token of {T} (per head); "
                f"weights rounded to {1 / WEIGHT_SCALE:g}.")
    return f"Showing all {T} link{'s' if T != 1 else ''} per token; weights rounded to {1 / WEIGHT_SCALE:g}."


def _subtitle(model_name: str, L: int, H: int, T: int) -> str:
    """The line under the heading, e.g. "bert · 12 tokens · 6 layers × 12 heads" (no name when it is empty)."""
    return " · ".join(part for part in (
        model_name,
        f"{T} token{'s' if T != 1 else ''}",
        f"{L} layer{'s' if L != 1 else ''} × {H} head{'s' if H != 1 else ''}",
    ) if part)


def _fill_template(data: dict, title: str, subtitle: str, note: str) -> str:
    """The page: the texts escaped, the data as script-safe JSON, the CSS and JavaScript inline."""
    values = {
        "__TITLE__": _html.escape(title),
        "__SUBTITLE__": _html.escape(subtitle),
        "__NOTE__": _html.escape(note),
        "__CSS__": _CSS,
        "__JS__": _JS,
        "__DATA__": script_json(data),
    }
    # One pass over the template: a placeholder spelled inside a title or a
    # token is text of a value, never replaced again.
    return _PLACEHOLDER.sub(lambda m: values[m.group(0)], _TEMPLATE)


def write_head_view(path: str | os.PathLike, tokens: Sequence[str], weights, **kwargs) -> pathlib.Path:
    """Write `head_view_html(tokens, weights, **kwargs)` to `path` (.html) as UTF-8; returns the path."""
    out = check_page_path(path)  # before the page is made: a bad path fails at once
    return _write(out, head_view_html(tokens, weights, **kwargs))


def check_page_path(path) -> pathlib.Path:
    """`path` as a pathlib.Path ending in .html or .htm, or a TypeError/ValueError naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = pathlib.Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"path must end in .html, got {str(out)!r}")
    return out


def write_page(path: str | os.PathLike, page: str) -> pathlib.Path:
    """Write a page to `path` (.html) as UTF-8 bytes, newlines untranslated on every platform; returns the path."""
    return _write(check_page_path(path), page)


def _write(out: pathlib.Path, page: str) -> pathlib.Path:
    out.write_bytes(page.encode("utf-8"))
    return out


# --------------------------------------------------------------------------- data


def page_data(tokens: list[str], w: np.ndarray, special: np.ndarray, k: int) -> dict:
    """What the page's script reads: tokens, the k strongest links per row, thumbnails and statistics.

    Binary blocks are base64 of little-endian arrays: 2 bytes per link index
    and per weight instead of several characters of JSON numbers, which keeps
    the page of a long input within a few MB.
    """
    L, H, T, _ = w.shape
    keys = np.empty((L, H, T, k), dtype="<u2")
    weights = np.empty((L, H, T, k), dtype="<u2")
    pool = max(1, math.ceil(T / THUMB_MAX))  # rows/columns per thumbnail cell
    n = math.ceil(T / pool)  # thumbnail cells per side, <= THUMB_MAX
    thumbs = np.empty((L, H, n, n), dtype=np.uint8)
    for layer in range(L):
        p = w[layer]  # (H, T, T)
        order = top_keys(p, k)  # (H, T, T) -> (H, T, k)
        keys[layer] = order
        top = np.clip(np.take_along_axis(p, order, axis=-1), 0.0, 1.0)  # (H, T, k); >1 only by rounding
        weights[layer] = np.rint(top * WEIGHT_SCALE)
        padded = np.zeros((H, n * pool, n * pool), dtype=p.dtype)
        padded[:, :T, :T] = p
        # Max-pool, not mean: a single sharp link must survive the downsampling.
        pooled = padded.reshape(H, n, pool, n, pool).max(axis=(2, 4))  # (H, nP, nP) -> (H, n, n)
        # Square root: on one absolute scale for all heads, weights of a few
        # percent (a diffuse head over 512 keys) would otherwise vanish.
        thumbs[layer] = np.rint(255 * np.sqrt(np.clip(pooled, 0.0, 1.0)))

    stats = stats_of_checked(w, special)
    return {
        "version": 1,
        "L": L,
        "H": H,
        "T": T,
        "k": k,
        "tokens": tokens,
        "special": [bool(s) for s in special],
        # keys/weights: (L, H, T, k) uint16, row-major; weight = value / scale; strongest link first.
        "edges": {"keys": _b64(keys), "weights": _b64(weights), "scale": WEIGHT_SCALE},
        # data: (L, H, n, n) uint8 = round(255 * sqrt(max weight in the cell)); cell = pool x pool tokens.
        "thumbs": {"size": n, "pool": pool, "data": _b64(thumbs)},
        "stats": {
            "entropy": _rounded(stats.entropy),
            "mean_distance": _rounded(stats.mean_distance),
            "special_share": _rounded(stats.special_share),
            "previous_share": _rounded(stats.previous_share),
        },
        "max_entropy": math.log(T),
    }


def top_keys(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row of p (..., T), largest first, ties to the lowest index.

    The order is a stable sort of -p, so link 0 of a row is np.argmax's (and
    `strongest_targets`') answer; argpartition does the work in O(T) per row,
    and the rare rows whose k-th value is tied fall back to the full sort
    because argpartition picks among equal values arbitrarily.
    """
    neg = -p
    if k >= p.shape[-1]:
        return np.argsort(neg, axis=-1, kind="stable")
    part = np.argpartition(neg, k - 1, axis=-1)[..., :k]  # (..., T) -> (..., k), unordered
    vals = np.take_along_axis(neg, part, axis=-1)
    top = np.take_along_axis(part, np.lexsort((part, vals), axis=-1), axis=-1)  # by value, then index
    tied = (neg <= vals.max(axis=-1, keepdims=True)).sum(axis=-1) > k  # (..., T) -> (...)
    if tied.any():
        top[tied] = np.argsort(neg[tied], axis=-1, kind="stable")[:, :k]  # (n_tied, T) -> (n_tied, k)
    return top


def script_json(data) -> str:
    """JSON that is safe inside <script>: "<", ">" and "&" as \\u escapes, so "</script>" cannot occur."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _rounded(array: np.ndarray) -> list:
    """(L, H) floats to nested lists with 4 decimals; NaN (no such row) becomes null."""
    return [[None if math.isnan(x) else round(float(x), 4) for x in row] for row in array]


# --------------------------------------------------------------------------- page

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="multihead">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<div id="mh-root" data-ready="0" data-layer="0" data-heads="" data-hover="" data-pinned="" data-links="0">
<header class="top">
  <h1>__TITLE__</h1>
  <p class="sub">__SUBTITLE__</p>
  <p class="explain">Each line links a token to a token it attends to; thicker = more weight.
  Queries are on the left, the keys they attend to on the right, one colour per head.
  Hover a token to see only its links, click it to keep them (Esc to let go).</p>
</header>
<nav id="mh-controls" class="controls">
  <label class="layer">Layer <select id="mh-layer" aria-label="layer"></select></label>
  <div class="heads-wrap"><span class="lbl">Heads</span>
    <div id="mh-heads" class="heads" role="group" aria-label="heads"></div>
    <button type="button" id="mh-all" class="small">all</button>
    <button type="button" id="mh-none" class="small">none</button>
  </div>
  <span id="mh-note" class="note">__NOTE__</span>
  <a class="jump" href="#mh-model">model view &darr;</a>
</nav>
<main class="layout">
  <section class="card headview" id="mh-headview">
    <div class="colnames"><span>query</span><span>attends to</span><span>key</span></div>
    <div id="mh-view" class="view">
      <div id="mh-left" class="tokens left"></div>
      <div id="mh-band" class="band"><canvas id="mh-canvas"></canvas><svg id="mh-links"></svg></div>
      <div id="mh-right" class="tokens right"></div>
    </div>
  </section>
  <aside id="mh-side" class="side">
    <section class="card">
      <h2 id="mh-focus-title">Where each head looks</h2>
      <div id="mh-focus" class="focus"></div>
    </section>
    <section class="card">
      <h2>Head statistics <span class="muted">layer <span id="mh-stats-layer"></span></span></h2>
      <table id="mh-stats" class="stats"></table>
      <p class="caption"><b>entropy</b>: spread of a row's weight, 0 = one key, ln T = uniform (bar: share of ln T);
      <b>distance</b>: weighted |query &minus; key| in tokens; <b>special</b>: weight on [CLS]/[SEP]-like tokens;
      <b>previous</b>: weight on the token just before. Means over all query rows, from the full weights.</p>
    </section>
  </aside>
</main>
<section id="mh-model" class="card model">
  <h2>Model view <span class="muted">every layer &times; head</span></h2>
  <p class="explain">One square per head: query rows top to bottom, key columns left to right,
  darker = more weight (square-root scale, the same for every head). Click a square to show that head above.</p>
  <div id="mh-grid" class="grid"></div>
</section>
<footer>Drawn by multihead &middot; one self-contained file, no network access.</footer>
</div>
<script type="application/json" id="mh-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = r"""
:root {
  --bg: #f5f6f8; --card: #fff; --ink: #1d2330; --muted: #6b7280; --line: #e3e6eb;
  --accent: #2563eb; --row: 20px; --band: 260px; --tokw: 150px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--ink); background: var(--bg);
}
* { box-sizing: border-box; }
body { margin: 0; font-size: 14px; line-height: 1.4; }
#mh-root { max-width: 1280px; margin: 0 auto; padding: 0 20px 40px; }
header.top { padding: 22px 0 10px; }
h1 { font-size: 22px; margin: 0 0 2px; font-weight: 650; letter-spacing: -0.01em; }
h2 { font-size: 14px; margin: 0 0 10px; font-weight: 650; }
.sub { margin: 0 0 8px; color: var(--muted); }
.explain { margin: 0; color: #374151; max-width: 900px; }
.muted { color: var(--muted); font-weight: 400; }
.controls { position: sticky; top: 0; z-index: 5; display: flex; flex-wrap: wrap; align-items: center;
  gap: 10px 18px; padding: 10px 14px; margin: 10px 0 14px; background: rgba(255,255,255,0.96);
  border: 1px solid var(--line); border-radius: 10px; box-shadow: 0 1px 3px rgba(0,0,0,0.05); }
.controls select { font: inherit; padding: 3px 6px; border-radius: 6px; border: 1px solid #cfd4dc; background: #fff; }
.heads-wrap { display: flex; align-items: center; gap: 6px; flex-wrap: wrap; }
.lbl { color: var(--muted); }
.heads { display: flex; flex-wrap: wrap; gap: 4px; }
.head-btn { font: inherit; font-size: 12px; display: inline-flex; align-items: center; gap: 4px; cursor: pointer;
  padding: 2px 7px 2px 4px; border-radius: 999px; border: 1px solid #d5d9e0; background: #fff; color: var(--ink); }
.head-btn .sw { width: 12px; height: 12px; border-radius: 50%; display: inline-block; }
.head-btn.off { color: #9ca3af; background: #f3f4f6; }
.head-btn.off .sw { opacity: 0.2; }
button.small { font: inherit; font-size: 12px; padding: 2px 8px; border-radius: 6px; border: 1px solid #d5d9e0;
  background: #fff; cursor: pointer; color: var(--muted); }
button:hover { border-color: #9aa3b2; }
.note { color: var(--muted); font-size: 12.5px; }
.jump { margin-left: auto; color: var(--accent); text-decoration: none; font-size: 13px; }
.layout { display: grid; grid-template-columns: minmax(0, 1fr) minmax(320px, 440px); gap: 14px; align-items: start; }
@media (max-width: 980px) { .layout { grid-template-columns: 1fr; } }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
  box-shadow: 0 1px 3px rgba(0,0,0,0.04); }
.side { position: sticky; top: 70px; display: flex; flex-direction: column; gap: 14px;
  max-height: calc(100vh - 80px); overflow: auto; }
.headview { overflow-x: auto; }
.colnames { display: grid; grid-template-columns: var(--tokw) var(--band) var(--tokw); color: var(--muted);
  font-size: 11.5px; text-transform: uppercase; letter-spacing: 0.06em; margin-bottom: 6px; }
.colnames span:nth-child(1) { text-align: right; padding-right: 8px; }
.colnames span:nth-child(2) { text-align: center; }
.colnames span:nth-child(3) { padding-left: 8px; }
.view { display: grid; grid-template-columns: var(--tokw) var(--band) var(--tokw); position: relative; }
.tokens { display: flex; flex-direction: column; }
.tok { height: var(--row); line-height: var(--row); white-space: pre; overflow: hidden; text-overflow: ellipsis;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: 12.5px;
  padding: 0 8px; cursor: pointer; border-radius: 4px; position: relative; }
.tokens.left .tok { text-align: right; padding-left: 24px; }
.tokens.left .tok::before { content: attr(data-i); position: absolute; left: 2px; color: #c0c5ce; font-size: 9.5px; }
.tok:hover { background: #eef2ff; }
.tok.special { color: #8a8f99; font-style: italic; }
.tok.focus { background: #1d2330; color: #fff; }
.tok.focus::before { color: #9ca3af; }
.band { position: relative; height: 100%; }
.band canvas, .band svg { position: absolute; left: 0; top: 0; }
.band svg { pointer-events: none; overflow: visible; }
.band canvas { transition: opacity 0.12s; }
.view.focused .band canvas { opacity: 0.12; }
.focus .who { margin: 0 0 8px; height: 2.8em; overflow: hidden; }
.focus .who code { display: inline-block; max-width: 14em; overflow: hidden; text-overflow: ellipsis; vertical-align: bottom; }
.focus .who code, .frow code { background: #f3f4f6; padding: 0 4px; border-radius: 4px; white-space: pre; }
.frow { display: grid; grid-template-columns: 72px 1fr 74px; align-items: center; gap: 6px; font-size: 13px;
  height: 21px; }
.frow.off { opacity: 0.35; }
.frow .hn { display: flex; align-items: center; gap: 5px; color: var(--muted); }
.frow .tgt { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar { height: 6px; border-radius: 3px; background: #eceff3; position: relative; overflow: hidden; }
.bar i { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 3px; }
.wval { display: grid; grid-template-columns: 30px 1fr; gap: 4px; align-items: center; font-variant-numeric: tabular-nums; font-size: 12px; }
.sw { width: 11px; height: 11px; border-radius: 50%; display: inline-block; flex: none; }
table.stats { border-collapse: collapse; width: 100%; font-size: 12.5px; font-variant-numeric: tabular-nums; }
table.stats th { text-align: right; font-weight: 600; color: var(--muted); padding: 3px 6px; border-bottom: 1px solid var(--line); }
table.stats th:first-child, table.stats td:first-child { text-align: left; }
table.stats td { text-align: right; padding: 3px 6px; border-bottom: 1px solid #f1f3f6; }
table.stats tr.off td { opacity: 0.35; }
table.stats tbody tr { cursor: pointer; }
table.stats tbody tr:hover td { background: #f8fafc; }
td .cell { display: flex; align-items: center; justify-content: flex-end; gap: 6px; }
td .cell .bar { width: 38px; }
.caption { color: var(--muted); font-size: 11.5px; margin: 8px 0 0; }
.model { margin-top: 14px; }
.model .explain { margin-bottom: 10px; font-size: 13px; }
.grid { display: grid; gap: 4px; align-items: center; justify-content: start; overflow-x: auto; }
.grid .gl { font-size: 11.5px; color: var(--muted); text-align: right; padding-right: 6px; white-space: nowrap; }
.grid .gl.cur { color: var(--ink); font-weight: 650; }
.grid .gh { font-size: 11px; text-align: center; display: flex; align-items: center; justify-content: center; gap: 3px; color: var(--muted); }
.grid canvas { image-rendering: pixelated; border: 1px solid #e5e7eb; border-radius: 3px; cursor: pointer; display: block; }
.grid canvas:hover { border-color: #6b7280; }
.grid canvas.sel { outline: 2px solid var(--c); outline-offset: 1px; }
footer { color: #9ca3af; font-size: 12px; margin-top: 18px; text-align: center; }
"""

_JS = r"""
(function () {
  "use strict";
  var root = document.getElementById("mh-root"), controls = document.getElementById("mh-controls");
  var D = JSON.parse(document.getElementById("mh-data").textContent);
  var L = D.L, H = D.H, T = D.T, K = D.k, SCALE = D.edges.scale;
  var ROW = 20, TOKW = 150, BAND = 260;  // px: token row height, token column width, link band width (set to fit)

  function bytes(b64) {
    var bin = atob(b64), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function u16(b64) {  // little-endian, whatever the machine's byte order
    var b = bytes(b64), out = new Uint16Array(b.length >> 1);
    for (var i = 0; i < out.length; i++) out[i] = b[2 * i] | (b[2 * i + 1] << 8);
    return out;
  }
  var KEYS = u16(D.edges.keys), WTS = u16(D.edges.weights);  // (L, H, T, K), strongest first
  var THUMB = bytes(D.thumbs.data), N = D.thumbs.size;       // (L, H, N, N)
  function at(l, h, i, e) { return ((l * H + h) * T + i) * K + e; }

  // One colour per head: a fixed palette for up to 12 heads, evenly spread hues beyond.
  var PALETTE = [[31,119,180],[255,127,14],[44,160,44],[214,39,40],[148,103,189],[140,86,75],
                 [227,119,194],[23,190,207],[188,189,34],[57,59,121],[99,121,57],[123,65,115]];
  function hsl(h, s, l) {
    var a = s * Math.min(l, 1 - l);
    function f(n) { var k = (n + h / 30) % 12; return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)))); }
    return [f(0), f(8), f(4)];
  }
  var COLOURS = [];
  for (var h0 = 0; h0 < H; h0++) COLOURS.push(H <= PALETTE.length ? PALETTE[h0] : hsl((h0 * 360) / H, 0.65, 0.45));
  function rgb(c, a) { return a === undefined ? "rgb(" + c.join(",") + ")" : "rgba(" + c.join(",") + "," + a + ")"; }

  function shown(tok) {  // invisible characters made visible; the text still goes in via textContent
    if (tok === "") return "\u2205";
    return tok.replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5").replace(/\r/g, "\u240d");
  }
  function fmt(x, d) { return x === null || x === undefined ? "\u2013" : x.toFixed(d); }
  function pct(x) { return x === null || x === undefined ? "\u2013" : Math.round(100 * x) + "%"; }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function bar(frac, colour) {
    var b = el("span", "bar"), i = el("i");
    i.style.width = (100 * Math.max(0, Math.min(1, frac))).toFixed(1) + "%";
    i.style.background = colour;
    b.appendChild(i);
    return b;
  }

  var state = { layer: D.start_layer, active: [], hover: -1, hoverSide: "q", pinned: D.start_focus, pinnedSide: "q" };
  for (var h1 = 0; h1 < H; h1++) state.active.push(true);

  // ------------------------------------------------------------------ controls
  var layerSel = document.getElementById("mh-layer");
  for (var l0 = 0; l0 < L; l0++) {
    var o = el("option", "", "Layer " + l0);
    o.value = String(l0);
    layerSel.appendChild(o);
  }
  layerSel.addEventListener("change", function () { setLayer(parseInt(layerSel.value, 10)); });

  var headBox = document.getElementById("mh-heads"), headBtns = [];
  for (var h2 = 0; h2 < H; h2++) {
    var btn = el("button", "head-btn");
    btn.type = "button";
    btn.dataset.head = String(h2);
    btn.title = "head " + h2 + ": click to hide or show, double-click to show only this head";
    var sw = el("span", "sw");
    sw.style.background = rgb(COLOURS[h2]);
    btn.appendChild(sw);
    btn.appendChild(document.createTextNode(String(h2)));
    btn.addEventListener("click", function (ev) { toggleHead(parseInt(ev.currentTarget.dataset.head, 10)); });
    btn.addEventListener("dblclick", function (ev) { soloHead(parseInt(ev.currentTarget.dataset.head, 10)); });
    headBox.appendChild(btn);
    headBtns.push(btn);
  }
  document.getElementById("mh-all").addEventListener("click", function () { setActive(function () { return true; }); });
  document.getElementById("mh-none").addEventListener("click", function () { setActive(function () { return false; }); });

  function toggleHead(h) { state.active[h] = !state.active[h]; refresh(); }
  function soloHead(h) { setActive(function (g) { return g === h; }); }
  function setActive(f) { for (var h = 0; h < H; h++) state.active[h] = f(h); refresh(); }
  function setLayer(l) { state.layer = l; layerSel.value = String(l); refresh(); }

  // ------------------------------------------------------------------ token columns
  var left = document.getElementById("mh-left"), right = document.getElementById("mh-right");
  var view = document.getElementById("mh-view");
  var leftToks = [], rightToks = [];
  function tokenDiv(i, side) {
    var d = el("div", "tok" + (D.special[i] ? " special" : ""), shown(D.tokens[i]));
    d.dataset.i = String(i);
    d.dataset.side = side;
    d.title = "token " + i + ": " + D.tokens[i];
    return d;
  }
  var fragL = document.createDocumentFragment(), fragR = document.createDocumentFragment();
  for (var i0 = 0; i0 < T; i0++) {
    var a = tokenDiv(i0, "q"), b = tokenDiv(i0, "k");
    leftToks.push(a); rightToks.push(b);
    fragL.appendChild(a); fragR.appendChild(b);
  }
  left.appendChild(fragL); right.appendChild(fragR);

  function onOver(ev) {
    var t = ev.target.closest ? ev.target.closest(".tok") : null;
    if (!t) return;
    var i = parseInt(t.dataset.i, 10);
    if (i === state.hover && t.dataset.side === state.hoverSide) return;
    state.hover = i; state.hoverSide = t.dataset.side;
    drawFocus();
  }
  function onClick(ev) {
    var t = ev.target.closest ? ev.target.closest(".tok") : null;
    if (!t) return;
    var i = parseInt(t.dataset.i, 10);
    if (state.pinned === i && state.pinnedSide === t.dataset.side) { state.pinned = -1; }
    else { state.pinned = i; state.pinnedSide = t.dataset.side; }
    drawFocus();
  }
  left.addEventListener("mouseover", onOver); right.addEventListener("mouseover", onOver);
  left.addEventListener("click", onClick); right.addEventListener("click", onClick);
  view.addEventListener("mouseleave", function () { state.hover = -1; drawFocus(); });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape") { state.pinned = -1; state.hover = -1; drawFocus(); }
  });

  // ------------------------------------------------------------------ links: canvas (all, faint) + svg (focus)
  // The canvas covers only the window plus a margin and is redrawn as the page
  // scrolls: a 512-token band is ~10,000 px tall, and rasterising every faint
  // line over all of it took seconds in a software-rendering browser.
  var canvas = document.getElementById("mh-canvas"), svg = document.getElementById("mh-links");
  var band = document.getElementById("mh-band"), headview = document.getElementById("mh-headview");
  var HEIGHT = T * ROW, MARGIN = 200, CH = 0, DPR = 1, canvasTop = -1;
  root.style.setProperty("--row", ROW + "px");
  root.style.setProperty("--tokw", TOKW + "px");
  function y(i) { return i * ROW + ROW / 2; }

  function layoutBand() {
    // The band takes the card's spare width: longer runs make crossing lines easier to follow.
    BAND = Math.max(200, Math.min(520, headview.clientWidth - 34 - 2 * TOKW));
    root.style.setProperty("--band", BAND + "px");
    CH = Math.min(HEIGHT, Math.ceil(window.innerHeight) + 2 * MARGIN);
    DPR = window.devicePixelRatio || 1;
    canvas.width = Math.round(BAND * DPR); canvas.height = Math.round(CH * DPR);
    canvas.style.width = BAND + "px"; canvas.style.height = CH + "px";
    svg.setAttribute("width", BAND); svg.setAttribute("height", HEIGHT);
    svg.setAttribute("viewBox", "0 0 " + BAND + " " + HEIGHT);
  }

  var BUCKETS = 10;  // one path per (head, weight bucket): thousands of lines in a few strokes per head
  function drawAll() {
    var r = band.getBoundingClientRect();
    var top = Math.max(0, Math.min(HEIGHT - CH, Math.floor(-r.top - MARGIN)));
    var bottom = top + CH;
    canvasTop = top;
    canvas.style.top = top + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(DPR, 0, 0, DPR, 0, -top * DPR);
    ctx.clearRect(0, top, BAND, CH);
    var l = state.layer, drawn = 0;
    for (var h = 0; h < H; h++) {
      if (!state.active[h]) continue;
      var paths = [];
      for (var b = 0; b < BUCKETS; b++) paths.push([]);
      for (var i = 0; i < T; i++) {
        var yi = y(i);
        for (var e = 0; e < K; e++) {
          var idx = at(l, h, i, e), w = WTS[idx] / SCALE;
          if (w <= 0) break;  // sorted: the rest round to 0 too
          var yj = y(KEYS[idx]);
          if ((yi < top && yj < top) || (yi > bottom && yj > bottom)) continue;  // off the canvas
          paths[Math.min(BUCKETS - 1, Math.floor(w * BUCKETS))].push(yi, yj);
        }
      }
      ctx.strokeStyle = rgb(COLOURS[h]);
      for (var b2 = 0; b2 < BUCKETS; b2++) {
        var p = paths[b2];
        if (!p.length) continue;
        var mid = (b2 + 0.5) / BUCKETS;
        ctx.globalAlpha = 0.05 + 0.5 * mid;
        ctx.lineWidth = 0.6 + 1.8 * mid;
        ctx.beginPath();
        for (var n = 0; n < p.length; n += 2) { ctx.moveTo(0, p[n]); ctx.lineTo(BAND, p[n + 1]); }
        ctx.stroke();
        drawn += p.length / 2;
      }
    }
    ctx.globalAlpha = 1;
    root.dataset.faint = String(drawn);
  }

  var scrollPending = false;
  window.addEventListener("scroll", function () {
    if (scrollPending || CH >= HEIGHT) return;
    scrollPending = true;
    requestAnimationFrame(function () {
      scrollPending = false;
      var r = band.getBoundingClientRect();
      var vt = Math.max(0, -r.top), vb = Math.min(HEIGHT, window.innerHeight - r.top);
      if (vt < canvasTop || vb > canvasTop + CH) drawAll();
    });
  }, { passive: true });

  var SVGNS = "http://www.w3.org/2000/svg";
  function focusToken() { return state.hover >= 0 ? [state.hover, state.hoverSide] : [state.pinned, state.pinnedSide]; }
  function drawFocus() {
    var f = focusToken(), i = f[0], side = f[1], l = state.layer;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    for (var t = 0; t < T; t++) {
      leftToks[t].classList.remove("focus"); rightToks[t].classList.remove("focus");
      leftToks[t].style.background = ""; rightToks[t].style.background = "";
    }
    var links = 0;
    if (i >= 0) {
      var best = {};  // other column's token -> [weight, head] of its strongest link, to tint it
      var lines = [];
      for (var h = 0; h < H; h++) {
        if (!state.active[h]) continue;
        if (side === "q") {
          for (var e = 0; e < K; e++) {
            var idx = at(l, h, i, e), w = WTS[idx] / SCALE;
            if (w <= 0) break;
            lines.push([i, KEYS[idx], w, h]);
          }
        } else {
          for (var q = 0; q < T; q++) {
            for (var e2 = 0; e2 < K; e2++) {
              var idx2 = at(l, h, q, e2);
              if (KEYS[idx2] === i && WTS[idx2] > 0) { lines.push([q, i, WTS[idx2] / SCALE, h]); break; }
            }
          }
        }
      }
      lines.sort(function (u, v) { return u[2] - v[2]; });  // strongest drawn last, on top
      for (var n = 0; n < lines.length; n++) {
        var s = lines[n], ln = document.createElementNS(SVGNS, "line");
        ln.setAttribute("x1", 0); ln.setAttribute("y1", y(s[0]));
        ln.setAttribute("x2", BAND); ln.setAttribute("y2", y(s[1]));
        ln.setAttribute("stroke", rgb(COLOURS[s[3]]));
        ln.setAttribute("stroke-width", (1 + 5 * s[2]).toFixed(2));
        ln.setAttribute("stroke-opacity", (0.3 + 0.7 * s[2]).toFixed(2));
        ln.setAttribute("stroke-linecap", "round");
        ln.setAttribute("class", "link");
        ln.setAttribute("data-head", s[3]);
        ln.setAttribute("data-weight", s[2]);
        svg.appendChild(ln);
        var other = side === "q" ? s[1] : s[0];
        if (!best[other] || best[other][0] < s[2]) best[other] = [s[2], s[3]];
      }
      links = lines.length;
      (side === "q" ? leftToks : rightToks)[i].classList.add("focus");
      var others = side === "q" ? rightToks : leftToks;
      for (var key in best) {
        others[+key].style.background = rgb(COLOURS[best[key][1]], (0.1 + 0.35 * best[key][0]).toFixed(2));
      }
      view.classList.add("focused");
    } else {
      view.classList.remove("focused");
    }
    root.dataset.hover = state.hover >= 0 ? String(state.hover) : "";
    root.dataset.pinned = state.pinned >= 0 ? String(state.pinned) : "";
    root.dataset.links = String(links);
    drawFocusPanel(i, side);
  }

  // ------------------------------------------------------------------ side panel
  var focusBox = document.getElementById("mh-focus"), focusTitle = document.getElementById("mh-focus-title");
  // The panel keeps one height whatever the focus (H rows, a two-line intro):
  // if it grew on hover, everything below would shift under the mouse.
  function drawFocusPanel(i, side) {
    var l = state.layer;
    focusBox.textContent = "";
    var who = el("p", "who");
    if (i < 0) {
      focusTitle.textContent = "Where each head looks";
      who.appendChild(document.createTextNode("Hover or click a token to see the token each head of layer " + l +
        " looks at most from it."));
    } else if (side === "q") {
      focusTitle.textContent = "Where each head looks from token " + i;
      who.appendChild(document.createTextNode("Lines: the keys that "));
      who.appendChild(el("code", "", shown(D.tokens[i])));
      who.appendChild(document.createTextNode(" attends to. Its strongest key per head:"));
    } else {
      focusTitle.textContent = "Where each head looks from token " + i;
      who.appendChild(document.createTextNode("Lines: the queries that attend to "));
      who.appendChild(el("code", "", shown(D.tokens[i])));
      who.appendChild(document.createTextNode(" (among each query's " + K + " strongest links). " +
        "Its own strongest key per head:"));
    }
    focusBox.appendChild(who);
    for (var h = 0; h < H; h++) {
      var row = el("div", "frow" + (state.active[h] ? "" : " off"));
      row.dataset.head = String(h);
      var hn = el("span", "hn"), sw = el("span", "sw");
      sw.style.background = rgb(COLOURS[h]);
      hn.appendChild(sw); hn.appendChild(document.createTextNode("head " + h));
      var tgt = el("span", "tgt"), wv = el("span", "wval");
      if (i >= 0) {
        var idx = at(l, h, i, 0), j = KEYS[idx], w = WTS[idx] / SCALE;
        tgt.appendChild(document.createTextNode("\u2192 "));
        tgt.appendChild(el("code", "", shown(D.tokens[j])));
        tgt.appendChild(el("span", "muted", " #" + j + (j === i ? " (itself)" : "")));
        tgt.title = "head " + h + " of layer " + l + " gives token " + j + " the most weight";
        wv.appendChild(el("span", "", w.toFixed(2)));
        wv.appendChild(bar(w, rgb(COLOURS[h])));
      } else {
        tgt.appendChild(el("span", "muted", "\u2192 \u2013"));
        wv.appendChild(el("span", "", ""));
        wv.appendChild(bar(0, "transparent"));
      }
      row.appendChild(hn); row.appendChild(tgt); row.appendChild(wv);
      focusBox.appendChild(row);
    }
  }

  var statsTable = document.getElementById("mh-stats");
  function drawStats() {
    var l = state.layer, S = D.stats;
    document.getElementById("mh-stats-layer").textContent = String(l);
    statsTable.textContent = "";
    var thead = el("thead"), tr = el("tr");
    [["head", ""], ["entropy", "mean over queries of -\u03a3 p ln p, in nats"],
     ["distance", "mean over queries of \u03a3 p |i - j|, in tokens"],
     ["special", "mean weight on special tokens"], ["previous", "mean weight on the previous token"]]
      .forEach(function (c) { var th = el("th", "", c[0]); if (c[1]) th.title = c[1]; tr.appendChild(th); });
    thead.appendChild(tr); statsTable.appendChild(thead);
    var tbody = el("tbody");
    for (var h = 0; h < H; h++) {
      var r = el("tr", state.active[h] ? "" : "off"), c = rgb(COLOURS[h]);
      r.dataset.head = String(h);
      r.title = "click to hide or show head " + h;
      var td0 = el("td"), sw = el("span", "sw");
      sw.style.background = c;
      td0.appendChild(sw); td0.appendChild(document.createTextNode(" " + h));
      r.appendChild(td0);
      var ent = S.entropy[l][h], cells = [
        [fmt(ent, 2), D.max_entropy > 0 ? ent / D.max_entropy : 0],
        [fmt(S.mean_distance[l][h], 1), T > 1 ? S.mean_distance[l][h] / (T - 1) : 0],
        [pct(S.special_share[l][h]), S.special_share[l][h] || 0],
        [pct(S.previous_share[l][h]), S.previous_share[l][h] || 0]];
      cells.forEach(function (v) {
        var td = el("td"), cell = el("span", "cell");
        cell.appendChild(el("span", "", v[0]));
        cell.appendChild(bar(v[1], c));
        td.appendChild(cell);
        r.appendChild(td);
      });
      r.addEventListener("click", function (ev) { toggleHead(parseInt(ev.currentTarget.dataset.head, 10)); });
      tbody.appendChild(r);
    }
    statsTable.appendChild(tbody);
  }

  // ------------------------------------------------------------------ model view
  var grid = document.getElementById("mh-grid"), thumbs = [], rowLabels = [];
  var PX = Math.max(26, Math.min(60, Math.floor(760 / H)));
  grid.style.gridTemplateColumns = "auto repeat(" + H + ", " + (PX + 2) + "px)";
  grid.appendChild(el("span", "gl", ""));
  for (var h3 = 0; h3 < H; h3++) {
    var gh = el("span", "gh"), s3 = el("span", "sw");
    s3.style.background = rgb(COLOURS[h3]);
    gh.appendChild(s3); gh.appendChild(document.createTextNode(String(h3)));
    grid.appendChild(gh);
  }
  for (var l1 = 0; l1 < L; l1++) {
    var lab = el("span", "gl", "layer " + l1);
    rowLabels.push(lab);
    grid.appendChild(lab);
    thumbs.push([]);
    for (var h4 = 0; h4 < H; h4++) {
      var cv = el("canvas");
      cv.width = N; cv.height = N;
      cv.style.width = PX + "px"; cv.style.height = PX + "px";
      cv.style.setProperty("--c", rgb(COLOURS[h4]));
      cv.dataset.layer = String(l1); cv.dataset.head = String(h4);
      cv.title = "layer " + l1 + ", head " + h4 + ": click to show it in the head view";
      var ctx = cv.getContext("2d"), img = ctx.createImageData(N, N), col = COLOURS[h4];
      var base = (l1 * H + h4) * N * N;
      for (var p = 0; p < N * N; p++) {
        var a2 = THUMB[base + p] / 255;  // white blended towards the head's colour
        img.data[4 * p] = Math.round(255 + (col[0] - 255) * a2);
        img.data[4 * p + 1] = Math.round(255 + (col[1] - 255) * a2);
        img.data[4 * p + 2] = Math.round(255 + (col[2] - 255) * a2);
        img.data[4 * p + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      cv.addEventListener("click", function (ev) {
        var t = ev.currentTarget, hv = document.getElementById("mh-headview");
        state.layer = parseInt(t.dataset.layer, 10);
        layerSel.value = String(state.layer);
        soloHead(parseInt(t.dataset.head, 10));
        var under = controls.offsetHeight + 12;  // the sticky controls would hide the top of the view
        if (hv.getBoundingClientRect().top < under) {
          window.scrollTo({ top: window.scrollY + hv.getBoundingClientRect().top - under, behavior: "smooth" });
        }
      });
      thumbs[l1].push(cv);
      grid.appendChild(cv);
    }
  }

  // ------------------------------------------------------------------ refresh
  function refresh() {
    var l = state.layer;
    for (var h = 0; h < H; h++) {
      headBtns[h].classList.toggle("off", !state.active[h]);
      headBtns[h].setAttribute("aria-pressed", state.active[h] ? "true" : "false");
    }
    for (var l2 = 0; l2 < L; l2++) {
      rowLabels[l2].classList.toggle("cur", l2 === l);
      for (var h2 = 0; h2 < H; h2++) thumbs[l2][h2].classList.toggle("sel", l2 === l && state.active[h2]);
    }
    root.dataset.layer = String(l);
    root.dataset.heads = state.active.map(function (on, h) { return on ? h : -1; })
      .filter(function (h) { return h >= 0; }).join(",");
    drawAll();
    drawStats();
    drawFocus();
  }

  var side = document.getElementById("mh-side");
  function placeSide() {
    side.style.top = (controls.offsetHeight + 12) + "px";
    side.style.maxHeight = "calc(100vh - " + (controls.offsetHeight + 24) + "px)";
  }
  var resizePending = false;
  window.addEventListener("resize", function () {
    if (resizePending) return;
    resizePending = true;
    requestAnimationFrame(function () { resizePending = false; placeSide(); layoutBand(); drawAll(); drawFocus(); });
  });
  placeSide();
  layoutBand();
  layerSel.value = String(state.layer);
  refresh();
  drawFocus();
  root.dataset.ready = "1";
})();
"""
