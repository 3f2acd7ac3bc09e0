"""`multihead demo` end to end, and `multihead visualize` on MiniLM and on a local GPT-2 folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


def test_demo_end_to_end_in_a_real_process(tmp_path):
    out = tmp_path / "pictures"
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run([sys.executable, "-m", "multihead", "demo", "--out", str(out), "--repeats", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
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
    assert "Traceback" not in proc.stderr


def test_visualize_minilm(tmp_path, capsys):
    assert main(["visualize", "All is well, said the animal", "--token", "well", "--layer", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Where each head looks from 'well' (token 3)" in out
    assert "Per-head statistics, layer 2" in out
    assert (tmp_path / "layer2.png").is_file() and (tmp_path / "heads.html").is_file()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random GPT-2 with a small byte-level BPE tokenizer trained here: nothing downloaded."""
    directory = tmp_path_factory.mktemp("gpt2")
    write_random_gpt2(directory, GPT2_TEXTS, n_positions=32)
    return directory


def test_visualize_a_local_gpt2(gpt2_folder, tmp_path, capsys):
    assert main(["visualize", "the cat sat on the mat", "--model", str(gpt2_folder), "--token", "mat",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gpt2, 2 layers x 4 heads" in out
    assert "Where each head looks from 'mat'" in out
    _png_ok(tmp_path / "heads.png")
    html = (tmp_path / "heads.html").read_text()
    assert " sat" in html or "sat" in html


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


def test_visualize_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["visualize", "hello", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_visualize_gpt2_too_long(gpt2_folder, tmp_path, capsys):
    assert main(["visualize", "the cat sat on the mat " * 10, "--model", str(gpt2_folder),
                 "--out", str(tmp_path)]) == 2
    assert "more than the model's maximum of 32" in capsys.readouterr().err
