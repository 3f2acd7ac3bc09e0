"""`multihead demo` end to end on MiniLM, and `multihead visualize` on a local GPT-2 folder and its errors.

The demo draws MiniLM's 6 x 12 heads (the costly pictures) once; --token and --layer are followed to the
files on the small GPT-2, and MiniLM's tokens are resolved in tests/test_cli_options.py."""

from __future__ import annotations

import json
import re

import pytest

from conftest import write_random_gpt2
from multihead.tools.cli import main

transformers = pytest.importorskip("transformers", reason="transformers builds the random GPT-2 checkpoint")
matplotlib_image = pytest.importorskip("matplotlib.image", reason="the pictures need matplotlib")

GPT2_TEXTS = ["the cat sat on the mat", "a dog ate the food because it was hungry", "all is well"]


def _png_ok(path) -> None:
    image = matplotlib_image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::97].tolist()}) > 20  # not blank


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """`multihead demo`, in this process (the console script and `python -m multihead` run in tests/test_cli.py)."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)  # off a terminal: plain text, 120 columns
    out = tmp_path / "pictures"
    assert main(["demo", "--out", str(out), "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    # 1. the walkthrough in short
    assert re.search(r"loop vs batched module: max \|difference\| = \S+ \(tolerance 1e-12\): agree", text)
    # 2. MiniLM checked against sentence-transformers
    found = re.search(r"against sentence-transformers:\n  max \|difference\| = (\S+) \(tolerance 1e-05\): agree", text)
    assert found and float(found.group(1)) <= 1e-5
    # 3. the 'brush' table: one row per head, one column per layer, and the heads that disagree
    assert "Where each head looks from 'brush'" in text
    rows = [line for line in text.splitlines() if re.match(r"\s*head \d+\s", line)]
    assert len(rows) == 12 and all(len(r.split()) == 2 + 2 * 6 for r in rows)
    assert re.search(r"Heads that disagree most about 'brush': layer \d head \d+ -> '[\w@]+'", text)
    # the files, said where they are
    for name in ("heads.png", "heads.html"):
        assert (out / name).is_file() and name in text
    _png_ok(out / "heads.png")
    html = (out / "heads.html").read_text()
    assert "brush" in html and "painted" in html
    assert str(out.resolve()) in text
    # 4. the comparison with torch, outputs equal
    diffs = re.findall(r"\d+x\s+(\d\.\de[+-]\d+)\s*$", text, flags=re.M)
    assert len(diffs) == 4 and all(float(d) < 1e-5 for d in diffs)
    assert "Traceback" not in captured.err


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random GPT-2 with a small byte-level BPE tokenizer trained here: nothing downloaded."""
    directory = tmp_path_factory.mktemp("gpt2")
    write_random_gpt2(directory, GPT2_TEXTS, n_positions=32)
    return directory


def _page_settings(path) -> dict:
    found = re.search(r'<script type="application/json" id="mh-data">(.*?)</script>', path.read_text(), re.S)
    assert found, "no data block in the page"
    data = json.loads(found.group(1))
    return {key: data[key] for key in ("start_layer", "start_focus")}


def test_visualize_a_local_gpt2(gpt2_folder, tmp_path, capsys):
    """--token (a word the tokenizer cuts into pieces) and --layer, from the command line to the files."""
    text = "the dog sat on the mattress"  # the tokens the, dog, sat, on, the, mat, t, r, e, s, s
    assert main(["visualize", text, "--model", str(gpt2_folder), "--token", "mattress", "--layer", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gpt2, 2 layers x 4 heads" in out
    # the note on the pieces, on one line, then the report about the first piece
    assert "'mattress' is the tokens mat t r e s s; the table is about its first piece, 'mat'\n" in out
    assert "Where each head looks from 'mat' (token 5)" in out and "Per-head statistics, layer 1" in out
    _png_ok(tmp_path / "heads.png")
    assert (tmp_path / "layer1.png").is_file() and not (tmp_path / "layer0.png").exists()
    assert _page_settings(tmp_path / "heads.html") == {"start_layer": 1, "start_focus": 5}  # the page opens on it
    assert " sat" in (tmp_path / "heads.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["visualize", "hello", "--model", "/no/such/folder"], "or a checkpoint folder, got '/no/such/folder'"),
    (["visualize", "The artist painted", "--token", "brush"], "token 'brush' is not in the text"),
    (["visualize", "word " * 600], "more than the model's maximum of 512"),
    (["visualize", "All is well", "--layer", "6"], r"layer must be in \[0, 6\) for this model, got 6"),
    (["visualize", "   "], "TEXT is empty"),
])
def test_visualize_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("multihead visualize: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "heads.html").exists()


def test_visualize_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["visualize", "hello", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_visualize_gpt2_too_long(gpt2_folder, tmp_path, capsys):
    assert main(["visualize", "the cat sat on the mat " * 10, "--model", str(gpt2_folder),
                 "--out", str(tmp_path)]) == 2
    assert "more than the model's maximum of 32" in capsys.readouterr().err


# --------------------------------------------------------------------------- what a new user met (issue 19, item 12)


@pytest.mark.parametrize("styled", [False, True], ids=["piped", "terminal"])
def test_visualize_default_token_and_legend(gpt2_folder, tmp_path, capsys, monkeypatch, styled):
    """No --token: a note says the table is about the last word's last piece (the help says so too); the
    legend names bold and dim only where they are rendered, and parentheses mark the heads that rest."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    if styled:
        monkeypatch.setenv("FORCE_COLOR", "1")  # rich renders styles as on a terminal, into the pipe
    assert main(["visualize", "the dog sat on the mattress", "--model", str(gpt2_folder), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert ("'mattress' is the tokens mat t r e s s; with no --token the table is about its last piece, "
            "'s@10' (--token mattress picks its first)\n") in plain
    assert "Where each head looks from 's' (token 10)" in plain
    legend = " ".join(plain[plain.index("head 3 "):plain.index("Heads ")].split("\n", 1)[1].split())
    if styled:
        assert "\x1b[1m" in out and "\x1b[2m" in out  # bold and dim are there to see
        assert legend.startswith("bold: the head's strongest key is this word; dim, in parentheses: most of its")
    else:
        assert "\x1b[" not in out
        assert "bold" not in legend and "dim" not in legend, legend
        assert legend.startswith("In parentheses: most of its weight rests on a special token")
    cells = re.findall(r"(\(?)[\w@]+ (\d\.\d\d)(\)?)", plain[plain.index("head 0 "):plain.index("head 3 ")])
    assert {(a, b) for a, _, b in cells} == {("(", ")"), ("", "")}, cells  # both kinds of cell, each one marked


def test_visualize_help_names_the_default_token(capsys):
    assert main(["visualize", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: the last word)" not in help_text
    assert ("default: the text's last token that is part of a word, so the last piece of the last word when the "
            "tokenizer cuts it; a note says so") in help_text


def _greedy(directory, prompt: str, n: int) -> list[int]:
    from multihead.models import load
    from multihead.models.generate import generate

    model = load(directory)
    ids = model.tokenize([prompt]).input_ids
    return generate(model.network, ids, max_new_tokens=n).new_tokens(0)


@pytest.mark.parametrize("stop_at", [0, "first new"], ids=["first-token", "later-token"])
def test_generate_says_why_it_stopped(gpt2_folder, tmp_path, capsys, stop_at):
    """The folder's eos_token_id is the model's first (or a later) greedy token: stdout holds the prompt and
    what came before the end token, stderr one line saying it stopped there and why."""
    import shutil

    from tokenizers import Tokenizer

    folder = tmp_path / "gpt2"
    shutil.copytree(gpt2_folder, folder)
    prompt = "a dog ate the"  # greedy: one token 5 times, then another
    greedy = _greedy(folder, prompt, 8)
    # the end token: the first new one, or the first that differs from every token before it
    k = 0 if stop_at == 0 else next(i for i in range(1, 8) if greedy[i] not in greedy[:i])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": greedy[k]}))
    assert main(["generate", prompt, "--model", str(folder), "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert captured.out == prompt + tokenizer.decode(greedy[:k]) + "\n"
    what = f"the end token {tokenizer.id_to_token(greedy[k])!r} (eos_token_id {greedy[k]} in config.json)"
    expected = (f"multihead generate: nothing written: the model's first new token is {what}" if k == 0 else
                f"multihead generate: stopped at {what} after {k} new tokens (of at most 8)")
    assert captured.err.splitlines() == [expected]


def test_generate_says_nothing_when_it_runs_its_course(gpt2_folder, capsys):
    assert main(["generate", "all is", "--model", str(gpt2_folder), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("all is") and captured.err == ""
