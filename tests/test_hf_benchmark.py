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
