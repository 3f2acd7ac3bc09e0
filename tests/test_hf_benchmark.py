"""benchmarks/hf.py and benchmarks/hf_architectures.py run and write what they say.

Tiny sizes: these check the scripts, not the speed; both run in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    """benchmarks/ importable, as it is for a script run from there (hf.py imports cpu.py beside it)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_hf_benchmark_quick_run_writes_its_tables(tmp_path, capsys, benchmarks_on_path):
    script = load_script(ROOT / "benchmarks" / "hf.py", "multihead_bench_hf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # under pytest -n 2 the other worker has the second core; speed is not checked
    try:
        assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "MiniLM: attn_implementation='multihead' against 'sdpa'" in out
    assert "What the weights cost" in out
    (result,) = tmp_path.glob("hf-*-quick.json")
    data = json.loads(result.read_text())
    assert data["torch"] and data["transformers"] and data["device"]
    assert [(r["B"], r["T"], r["padded"]) for r in data["minilm"]] == [(1, 16, False), (1, 32, False), (4, 32, True)]
    for r in data["minilm"]:
        assert min(r["sdpa_s"], r["multihead_s"], r["eager_weights_s"], r["multihead_weights_s"]) > 0
        assert r["max_weight_diff"] < 1e-5  # the weights timed are eager's
        assert abs(r["multihead_over_sdpa"] - r["multihead_s"] / r["sdpa_s"]) < 1e-12
    cost = data["weights_cost"]
    assert {(r["model"], r["T"]) for r in cost} == {(m, T) for m in ("MiniLM-sized BERT", "Llama-sized (2 layers)")
                                                     for T in (32, 64)}
    assert len({r["candidate"] for r in cost}) == 5
    for model in ("MiniLM-sized BERT", "Llama-sized (2 layers)"):
        rows = {r["candidate"]: r for r in cost if r["model"] == model and r["T"] == 64}
        eager = rows["eager, every weight"]["peak_extra_bytes"]
        # one head's last row of one layer holds far less than every layer's (B, H, T, S) weights
        assert rows["multihead, 1 head of the last layer, last query"]["peak_extra_bytes"] < eager
        assert rows["eager, every weight"]["vs_eager_time"] == 1.0


def test_architecture_table_is_written_from_the_comparisons(tmp_path, monkeypatch, benchmarks_on_path):
    import hf_architectures
    import hf_cases

    gpt2 = hf_cases.BY_NAME["GPT-2"]
    monkeypatch.setattr(hf_cases, "CASES", [gpt2])  # one architecture: the script, not the models
    page = tmp_path / "table.md"
    assert hf_architectures.main(["--out", str(page)]) == 0
    text = page.read_text()
    assert "| model | what is special | outputs | attentions, one pass | attentions, beside the kernel |" in text
    (line,) = [row for row in text.splitlines() if row.startswith("| GPT-2 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].startswith("logits: ") and cells[6:] == ["yes", "yes", "yes"]


def test_the_architecture_page_is_the_scripts_output_and_says_so(benchmarks_on_path):
    """docs/hf-architectures.md names the run that wrote it and says how to refresh it; its rows are the
    architectures the tests assert; and the transformers it names is one the project still supports.
    A newer installed transformers fails none of this: the tests re-check the rows on it (the page says so)."""
    import tomllib

    import hf_architectures
    import hf_cases
    from packaging.requirements import Requirement
    from packaging.version import Version

    page = (ROOT / "docs" / "hf-architectures.md").read_text()
    run = hf_architectures.written_with(page)
    intro = hf_architectures.INTRO.format(**run, new=hf_cases.NEW_TOKENS)
    assert page.startswith(intro), "the page's text is not the script's: run python benchmarks/hf_architectures.py"
    assert "run the script to refresh it" in intro and "on the transformers it installs" in intro
    rows = [line.split(" | ")[0].removeprefix("| ") for line in page[len(intro):].splitlines()]
    assert rows == [case.name for case in hf_cases.CASES], \
        "the page's rows are not tests/hf_cases.py's cases: run python benchmarks/hf_architectures.py"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (floor,) = [Requirement(r).specifier for r in extras["hf"] if Requirement(r).name == "transformers"]
    assert Version(run["transformers"]) in floor, \
        f"the page was written with transformers {run['transformers']}, which pyproject.toml no longer allows ({floor})"
    with pytest.raises(ValueError, match="names no run"):
        hf_architectures.written_with("# a page typed by hand\n")


@pytest.mark.parametrize("padded", [False, True], ids=["one-sequence", "padded"])
def test_window_memory_benchmark_measures_the_window_against_the_dense_mask(tmp_path, monkeypatch, capsys,
                                                                           benchmarks_on_path, padded):
    """--quick (T=512, window 32): the window reaches multihead with no T x S mask (padded: the padding as a
    (B, 1, 1, S) key mask), the dense path hands one of B x T x S bytes to multihead's backend, all three
    compute the same; the fresh-process measure is run once here (the script runs it for every row)."""
    script = load_script(ROOT / "benchmarks" / "hf_window_memory.py", "multihead_bench_hf_window_memory")
    fresh = []
    monkeypatch.setattr(script, "maxrss_in_a_fresh_process", lambda *args: fresh.append(args) or 1)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--quick", "--out", str(tmp_path)] + (["--padded"] if padded else [])) == 0
    finally:
        torch.set_num_threads(threads)
    B = 2 if padded else 1
    assert f"Mistral-style layer, T=512, sliding window 32, B={B}" in capsys.readouterr().out
    (result,) = tmp_path.glob(f"hf-window-memory-*{'-padded' if padded else ''}-quick.json")
    rows = {(r["step"], r["candidate"]): r for r in json.loads(result.read_text())["rows"]}
    assert set(rows) == {(s, c) for s in script.STEPS for c in script.CANDIDATES} and len(fresh) == 6
    for step in script.STEPS:
        window, dense, sdpa = (rows[step, c] for c in script.CANDIDATES)
        assert window["mask_handed_bytes"] == 0 and window["mask_to_backend_bytes"] == (B * 512 if padded else 0)
        assert dense["mask_handed_bytes"] == dense["mask_to_backend_bytes"] == sdpa["mask_handed_bytes"] == B * 512 * 512
        assert all(r["max_diff"] < 1e-4 and r["peak_extra_bytes"] > 0 and r["seconds"] > 0
                   for r in (window, dense, sdpa))
    script.child("multihead, window", "inference", 128, 16, B)  # the fresh process's own measure, in this one
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert measured["maxrss_extra_bytes"] >= 0 and isinstance(measured["high_water_mark"], bool)
