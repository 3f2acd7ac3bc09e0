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
