"""The `multihead` command: the explain walkthrough, subcommands, errors, the console script.

Most tests call `main` in this process; real processes only where the process itself is the point:
the console script, `python -m multihead`'s exit status, and the imports before a command runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from multihead.tools.cli import SENTENCE, main

DIFF = re.compile(r"loop vs batched module: max \|difference\| = ([0-9.]+e[+-]?\d+) \(tolerance 1e-12\): (\w+)")
TOKENS = SENTENCE.split()


def agreement(text: str) -> tuple[float, str]:
    found = DIFF.findall(text)
    assert len(found) == 1, f"expected one agreement line, found {found}"
    return float(found[0][0]), found[0][1]


def table_rows(text: str, title: str) -> list[list[str]]:
    """The data rows of the table printed under `title`: [row label, cell, cell, ...]."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 3:]:  # title, header, rule
        if not line.strip():
            break
        rows.append(line.split())
    return rows


class Explained(NamedTuple):
    code: int  # main's return value
    out: str  # what it printed
    rng_untouched: bool  # the global torch RNG gave the same numbers after the run as without it


@pytest.fixture(scope="module")
def explained() -> Explained:
    """`multihead explain` with its defaults, run once for the tests that read its output."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()) as out:  # make_console writes to sys.stdout as it is then
        code = main(["explain"])
    return Explained(code, out.getvalue(), torch.equal(torch.rand(3), expected))


def test_explain_walks_through_every_step(explained):
    assert explained.code == 0
    out = explained.out
    assert "11 tokens" in out and "d_in = 8, d_out = 4, heads h = 2, head size d_k = d_out / h = 2" in out
    steps = ["1. The input X (11 × 8)", "2. One big W_q (8 × 4), cut into 2 heads", "W_q1", "W_q2",
             "3.1 Head 1 of 2", "Q_1", "K_1", "V_1", "scores (head 1)", "scaled = scores / √2 (head 1)",
             "masked (head 1)", "weights = softmax(masked) (head 1)", "Z_1",
             "3.2 Head 2 of 2", "Q_2", "K_2", "V_2", "scores (head 2)", "scaled = scores / √2 (head 2)",
             "masked (head 2)", "weights = softmax(masked) (head 2)", "Z_2",
             "4. Why the heads can run in parallel",
             "5. Concatenate [Z_1 | Z_2]", "6. Multiply by W^O (4 × 8)", "output = concat W^O (11 × 8)",
             "7. The loop and the parallel form agree"]
    positions = [out.find(s) for s in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions) if p == -1]
    assert positions == sorted(positions), "steps printed out of order"
    diff, verdict = agreement(out)
    assert 0.0 <= diff < 1e-12 and verdict == "agree"
    for token in ("artist", "portrait", "woman", "brush"):
        assert token in out


def test_explain_tables_carry_the_causal_mask_and_softmax(explained):
    out = explained.out
    masked = table_rows(out, "masked (head 1)")
    assert [r[0] for r in masked] == TOKENS
    for t, row in enumerate(masked):
        cells = row[1:]
        assert len(cells) == 11
        assert cells[t + 1:] == ["-inf"] * (10 - t)  # the future is hidden
        assert "-inf" not in cells[:t + 1]
    weights = table_rows(out, "weights = softmax(masked) (head 1)")
    assert weights[0][1:] == ["1.00"] + ["0"] * 10  # the first token can only see itself
    for t, row in enumerate(weights):
        values = [float(c) for c in row[1:t + 2]]
        assert sum(values) == pytest.approx(1.0, abs=0.01 * (t + 1))  # rounded to 2 decimals
        assert row[t + 2:] == ["0"] * (10 - t)


def test_no_causal_has_no_mask(capsys):
    assert main(["explain", "--no-causal"]) == 0
    out = capsys.readouterr().out
    assert "-inf" not in out and "mask: none (not causal)" in out
    assert agreement(out)[1] == "agree"


def test_options_change_the_example(capsys):
    assert main(["explain", "--heads", "4", "--kv-heads", "2", "--d-out", "8", "--bias",
                 "--seed", "7", "--text", "All is well"]) == 0
    out = capsys.readouterr().out
    assert "3 tokens" in out and "key/value heads = 2 (grouped-query" in out and "projection biases: yes" in out
    assert "3.4 Head 4 of 4" in out and "W_q4" in out and "W_k2" in out and "W_k3" not in out
    assert "5. Concatenate [Z_1 | Z_2 | Z_3 | Z_4]" in out
    assert agreement(out)[1] == "agree"
    assert [r[0] for r in table_rows(out, "masked (head 1)")] == ["All", "is", "well"]


def test_seed_changes_the_numbers(explained, capsys):
    assert main(["explain", "--seed", "123"]) == 0  # the default seed, given: the same numbers
    assert capsys.readouterr().out == explained.out
    assert main(["explain", "--seed", "2"]) == 0
    assert capsys.readouterr().out != explained.out


def test_output_fits_a_fixed_width_off_a_terminal(explained):
    lines = explained.out.splitlines()
    assert max(len(line) for line in lines) <= 120
    header = next(line for line in lines if line.split()[:3] == ["The", "artist", "painted"])
    assert header.split() == TOKENS  # the 11 x 11 tables keep every column label whole


def test_explain_leaves_the_global_torch_rng_alone(explained):
    assert explained.rng_untouched


def test_ascii_only_console_still_renders(monkeypatch):
    """A console whose encoding cannot write the walkthrough's symbols (PYTHONIOENCODING=ascii) gets ASCII."""
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="ascii", errors="strict")  # a non-ASCII character would raise
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["explain"]) == 0
    stdout.flush()
    text = raw.getvalue().decode("ascii")
    assert "scaled = scores / sqrt2 (head 1)" in text
    assert agreement(text)[1] == "agree"


def test_no_subcommand_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "usage: multihead" in captured.err and "explain" in captured.err and "demo" in captured.err


def test_help_returns_0(capsys):
    assert main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["explain", "--heads", "3"], "--d-out 4 is not divisible by --heads 3"),
    (["explain", "--kv-heads", "3"], "--kv-heads 3 must divide --heads 2"),
    (["explain", "--heads", "0"], "--heads must be positive, got 0"),
    (["explain", "--text", "   "], "--text has no tokens"),
])
def test_bad_options_give_one_clear_line(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"multihead explain: error: {message}")
    assert "Traceback" not in captured.err


def test_unknown_subcommand_and_bad_numbers_are_usage_errors(capsys):
    assert main(["bogus"]) == 2
    assert main(["explain", "--seed", "x"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "invalid int value: 'x'" in err


# --------------------------------------------------------------------------- real processes


def run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("FORCE_COLOR", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env)


def console_script() -> str | None:
    local = Path(sys.executable).parent / "multihead"
    return str(local) if local.exists() else shutil.which("multihead")


def test_the_console_script_runs_in_a_real_process():
    script = console_script()
    if script is None:
        pytest.skip("the multihead console script is not installed (pip install -e .)")
    # COLUMNS is what a narrow CI runner might set; off a terminal the width stays 120.
    proc = run([script, "explain"], COLUMNS="40")
    assert proc.returncode == 0, proc.stderr
    diff, verdict = agreement(proc.stdout)
    assert diff < 1e-12 and verdict == "agree"
    assert "\x1b[" not in proc.stdout  # no colour codes in a pipe
    assert max(len(line) for line in proc.stdout.splitlines()) <= 120
    assert any(line.split() == TOKENS for line in proc.stdout.splitlines())


def test_python_m_multihead_exits_2_with_one_line_and_no_traceback():
    proc = run([sys.executable, "-m", "multihead", "explain", "--heads", "3"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "multihead explain: error: --d-out 4 is not divisible by --heads 3 " \
                                  "(each head gets d_out / heads columns)"


def test_python_m_multihead_tools_cli_runs_main(monkeypatch, capsys):
    """`python -m multihead.tools.cli ...`: the module's __main__ block exits with main's status."""

    def run_as_main(*argv) -> int:
        monkeypatch.setattr(sys, "argv", ["cli.py", *argv])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": it runs a second time here
            with pytest.raises(SystemExit) as exited:
                runpy.run_module("multihead.tools.cli", run_name="__main__")
        return exited.value.code

    assert run_as_main("explain", "--kv-heads", "3") == 2
    assert capsys.readouterr().err.strip() == "multihead explain: error: --kv-heads 3 must divide --heads 2"
    assert run_as_main("--version") == 0 and capsys.readouterr().out.startswith("multihead ")


# The command line without its package's __init__: the `multihead` package object is made by hand (its
# __init__ imports torch for the library), so only what multihead.tools.cli itself imports is loaded.
NO_TORCH = textwrap.dedent("""
    import contextlib, importlib.util, io, json, sys, types
    spec = importlib.util.find_spec("multihead")
    package = types.ModuleType("multihead")
    package.__path__ = list(spec.submodule_search_locations)
    package.__version__ = "0.0.test"
    sys.modules["multihead"] = package
    from multihead.tools.cli import main
    answers = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        answers.append([code, out.getvalue(), err.getvalue()])
    heavy = sorted(m for m in ("torch", "numpy", "transformers", "matplotlib") if m in sys.modules)
    print(json.dumps({"answers": answers, "heavy": heavy}))
""")


def test_help_and_argument_errors_import_no_torch(tmp_path):
    """`multihead --help`, each subcommand's --help and bad arguments answer before torch or numpy is imported."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    argvs = [["--help"], ["--version"], *[[c, "--help"] for c in ("explain", "demo", "visualize", "generate")],
             ["bogus"], ["explain", "--seed", "x"], ["generate", "hello"], ["explain", "--heads", "3"],
             ["explain", "--text", " "], ["visualize", " "], ["visualize", "hi", "--token", " "],
             ["visualize", "hi", "--out", str(a_file)], ["demo", "--out", str(a_file)],
             ["generate", " ", "--model", "m"], ["generate", "hi", "--model", "m", "--top-k", "0"],
             ["tiny-model", "--help"], ["tiny-model", "--out", str(a_file)]]
    proc = run([sys.executable, "-c", NO_TORCH, json.dumps(argvs)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert found["heavy"] == [], f"the command line imported {found['heavy']} before running a command"
    answers = dict(zip(map(" ".join, argvs), found["answers"]))
    for argv in argvs[:6]:
        code, out, _ = answers[" ".join(argv)]
        assert code == 0 and (out.startswith("usage: multihead") or out == "multihead 0.0.test\n"), (argv, out)
    assert "explain" in answers["--help"][1] and "--kv-heads" in answers["explain --help"][1]
    assert "tiny-model" in answers["--help"][1] and answers["tiny-model --help"][0] == 0
    assert "OUT/gpt2 and OUT/llama" in answers["tiny-model --help"][1]
    for key, message in [("bogus", "invalid choice: 'bogus'"), ("explain --seed x", "invalid int value: 'x'"),
                         ("generate hello", "the following arguments are required: --model"),
                         ("explain --heads 3", "--d-out 4 is not divisible by --heads 3"),
                         ("explain --text  ", "--text has no tokens"), ("visualize  ", "TEXT is empty"),
                         ("visualize hi --token  ", "--token is empty"),
                         (f"visualize hi --out {a_file}", "is a file"), (f"demo --out {a_file}", "is a file"),
                         ("generate   --model m", "PROMPT is empty"),
                         ("generate hi --model m --top-k 0", "must be a positive integer, got 0"),
                         (f"tiny-model --out {a_file}", "is a file; give a folder for the models")]:
        code, out, err = answers[key]
        assert code == 2 and out == "" and message in err, (key, code, out, err)
        assert "Traceback" not in err
