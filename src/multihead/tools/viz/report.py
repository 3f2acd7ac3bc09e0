"""What `multihead demo` and `multihead visualize` print and write for one text.

    report = text_report(model, text, token="brush", layer=None, out_dir="multihead-demo")
    print_report(console, report)

runs the model's own MultiHeadAttention layers on the text, keeps every
layer's per-head weights, and writes heads.png (every layer x head),
layer<L>.png (the heads of one layer, full labels) and heads.html (the
interactive head view). The printout says, for the chosen token, which token
each head of each layer looks at most, names the heads that disagree most,
and gives the chosen layer's per-head statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .choices import Disagreement, HeadChoice, find_token, head_choices, heads_by_word, most_different_heads
from .stats import checked_index


@dataclass(frozen=True)
class TextReport:
    model_name: str  # what the model is, for titles
    tokens: list[str]  # the T tokens of the text
    special: list[bool]  # (T,) special tokens
    weights: object  # (L, H, T, T) float tensor: every layer's per-head weights
    query: int  # index of the chosen token
    layer: int  # the layer shown on its own (layer<L>.png, the statistics)
    choices: list[list[HeadChoice]]  # [layer][head]: where each head looks from the chosen token
    disagreement: Disagreement | None  # the two heads whose rows differ most
    files: dict[str, Path]  # "png", "layer_png", "html" -> written file


def _default_query(tokens: list[str], special: list[bool]) -> int:
    """The last token that is a word (not special, not punctuation)."""
    for i in range(len(tokens) - 1, -1, -1):
        if not special[i] and any(ch.isalnum() for ch in tokens[i]):
            return i
    return len(tokens) - 1


def text_report(model, text: str, *, token: int | str | None, layer: int | None, out_dir: str | Path,
                progress=None) -> TextReport:
    """Run `model` (a multihead.models.TextModel) on `text` and write the pictures into out_dir.

    token: the query token to report on: its index among the text's tokens,
        a token string (its first occurrence), or None for the last word.
    progress: optional callable(str) told about each slow step as it starts.
    """
    from .figures import grid_figure, layer_figure, save_png
    from .html import write_head_view

    say = progress or (lambda _: None)
    say("running the model's MultiHeadAttention layers")
    view = model.attention(text)
    L = view.weights.shape[0]
    if token is None:
        query = _default_query(view.tokens, view.special)
    elif isinstance(token, str):
        query = find_token(view.tokens, token)
    else:
        query = checked_index("token", token, len(view.tokens))
    if layer is not None and not -L <= layer < L:
        raise ValueError(f"layer must be in [0, {L}) for this model, got {layer}")
    choices = head_choices(view.weights, view.special, query)
    disagreement = most_different_heads(view.weights, choices, query)
    if layer is None:
        layer = disagreement.first.layer if disagreement is not None else 0
    layer %= L

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    title = f"{model.name}: {' '.join(t.strip() for t in view.tokens)}"
    if len(title) > 110:
        title = title[:107] + "..."
    say("drawing heads.png (every layer x head)")
    files["png"] = save_png(grid_figure(view.tokens, view.weights, title=title), out / "heads.png")
    say(f"drawing layer{layer}.png")
    files["layer_png"] = save_png(layer_figure(view.tokens, view.weights, layer, title=f"layer {layer} of {title}"),
                                  out / f"layer{layer}.png")
    say("writing heads.html")
    files["html"] = write_head_view(out / "heads.html", view.tokens, view.weights, special=view.special,
                                    title=text if len(text) <= 200 else text[:197] + "...", model_name=model.name,
                                    layer=layer, focus=query)
    return TextReport(model.name, view.tokens, view.special, view.weights, query, layer, choices,
                      disagreement, files)


def _namer(tokens: list[str]):
    """Token i's printed name: the word, with its position when the word occurs more than once ('a@10')."""
    words = [t.strip() for t in tokens]

    def name(i: int) -> str:
        return words[i] if words.count(words[i]) == 1 else f"{words[i]}@{i}"

    return name


def _describe(choice: HeadChoice, name) -> str:
    return f"layer {choice.layer} head {choice.head} -> {name(choice.word)!r} ({choice.word_weight:.2f})"


def _legend(styled: bool) -> str:
    """The key to the table; bold and dim are named only where the console renders styles (a terminal, or
    FORCE_COLOR), since in a pipe or a file they are not there to see."""
    rests = ("most of its weight rests on a special token ([CLS]/[SEP]) or on the token itself, and the word "
             "shown is its strongest word")
    if styled:
        return f"bold: the head's strongest key is this word; dim, in parentheses: {rests}."
    return f"In parentheses: {rests}; otherwise the word shown is the head's strongest key."


def print_report(console, report: TextReport) -> None:
    """The chosen token's table of head choices, the heads that disagree, the layer's statistics."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .stats import head_stats, stats_table

    tokens, q = report.tokens, report.query
    word = tokens[q].strip()
    name = _namer(tokens)
    L, H = len(report.choices), len(report.choices[0])
    console.print(Text(f"Where each head looks from {word!r} (token {q}): its strongest word and that word's weight",
                       style="bold"))
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    # one row per head, one column per layer: twelve heads fit down a terminal, not across it
    table.add_column("", justify="right", style="bold")
    for layer in range(L):
        table.add_column(f"layer {layer}", justify="left", no_wrap=True)
    for h in range(H):
        cells = []
        for layer in range(L):
            c = report.choices[layer][h]
            if c.word < 0:
                cells.append(Text("-", style="dim"))
            else:
                shown = f"{name(c.word)} {c.word_weight:.2f}"
                # the parentheses say it where styles do not show (a pipe, a log file, TERM=dumb)
                cells.append(Text(f"({shown})", style="dim") if c.rests else Text(shown, style="bold"))
        table.add_row(f"head {h}", *cells)
    console.print(table)
    console.print(Text(_legend(styled=console.color_system is not None), style="dim"))

    groups = heads_by_word(report.choices)
    if groups:
        console.print(f"Heads whose strongest key from {word!r} is a word, grouped by that word:")
        for index, members in groups.items():
            names = ", ".join(f"L{c.layer}H{c.head} ({c.word_weight:.2f})" for c in members[:6])
            more = f" and {len(members) - 6} more" if len(members) > 6 else ""
            console.print(f"  {word!r} -> {name(index)!r}: {names}{more}")
    d = report.disagreement
    if d is not None:
        console.print(Text(
            f"Heads that disagree most about {word!r}: {_describe(d.first, name)} vs "
            f"{_describe(d.second, name)} (Jensen-Shannon divergence {d.divergence:.2f} bits of at most 1)",
            style="bold"))
    else:
        console.print(f"No two heads pick different words for {word!r}.")

    stats = head_stats(report.weights, report.special)
    console.print(stats_table(stats, layer=report.layer))
