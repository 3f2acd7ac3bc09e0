"""The benchmark scripts run and write what they say (tiny sizes: this checks the scripts, not speed).

Each script's `main` runs in this process (conftest.load_script), with one torch thread: under
pytest -n 2 the other worker keeps the second core busy, and the numbers are not what is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cpu_benchmark_quick_run_writes_its_tables(tmp_path, capsys, one_thread):
    script = load_script(ROOT / "benchmarks" / "cpu.py", "multihead_bench_cpu")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "MultiHeadAttention vs torch.nn.MultiheadAttention" in capsys.readouterr().out
    (result,) = tmp_path.glob("cpu-*-quick.json")
    data = json.loads(result.read_text())
    assert data["torch"] and data["device"]
    assert {(r["T"], r["need_weights"]) for r in data["module"]} == {(64, False), (64, True), (128, False), (128, True)}
    assert {r["backend"] for r in data["backends"]} == {"sdpa", "cpu_flash", "chunked", "reference"}
    assert all(r["seconds"] > 0 and r["torch_sdpa_s"] > 0 for r in data["backends"])
    memory = {r["backend"]: r["peak_extra_bytes"] for r in data["memory"]}
    assert set(memory) == {"chunked", "reference", "sdpa"}


def test_gpu_check_plan_and_refusal_without_cuda(capsys):
    script = load_script(ROOT / "benchmarks" / "gpu_check.py", "multihead_bench_gpu_check")
    assert script.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "phases: ceilings" in out and "correctness: B,H,G,T,S,D,causal,mask" in out
    assert "speed: T=16384, B=1, H=16, D=128" in out and "decode: B,H,G,T,S,D = (1, 32, 8, 1, 32768, 128)" in out
    if not torch.cuda.is_available():
        assert script.main(["--budget", "5"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


@pytest.fixture
def fresh_dynamo():
    """The decoding script compiles (backend="eager"): what it leaves in dynamo's caches goes with it."""
    yield
    torch._dynamo.reset()


def test_decode_benchmark_quick_run_reports_eager_compiled_and_transformers_tokens_per_second(
        tmp_path, capsys, one_thread, fresh_dynamo):
    script = load_script(ROOT / "benchmarks" / "decode.py", "multihead_bench_decode")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "compiled tokens/s" in out and "transformers tokens/s" in out
    assert "the faster multihead path decodes at" in out
    (result,) = tmp_path.glob("decode-*-quick.json")
    data = json.loads(result.read_text())
    assert data["device"] and data["torch"] and data["transformers"]
    # the three tables: context growth, decoding speed, cache bytes
    growth = data["context"]
    assert {r["model"] for r in growth} == {"gpt2", "llama"}
    assert all(r["cached_s_per_token"] > 0 and r["uncached_s_per_token"] > 0 for r in growth)
    assert len({r["context"] for r in growth}) >= 2
    versus = data["versus_transformers"]
    assert versus["same_tokens"] is True and versus["multihead_s"] > 0 and versus["transformers_s"] > 0
    memory = {r["attention"]: r for r in data["cache_bytes"]}
    assert set(memory) == {"MHA", "GQA", "MQA", "MLA"}
    assert memory["MHA"]["elements_per_layer"] > memory["GQA"]["elements_per_layer"] > memory["MQA"]["elements_per_layer"]
    rows = data["decoding"]
    assert [r["model"] for r in rows] == ["gpt2", "llama"]
    for r in rows:
        assert r["same_tokens"] is True, r
        assert r["attn_implementation"] == "sdpa" and r["compile_backend"] == "eager"
        assert min(r["eager_s"], r["compiled_s"], r["transformers_s"]) > 0 and r["compile_s"] >= 0
        assert r["best_vs_transformers"] == max(r["eager_vs_transformers"], r["compiled_vs_transformers"])


def test_weights_benchmark_quick_run_writes_its_table(tmp_path, capsys):
    weights = load_script(ROOT / "benchmarks" / "weights.py", "weights_benchmark")
    assert weights.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "Weights on demand" in capsys.readouterr().out
    (result,) = tmp_path.glob("weights-*-quick.json")
    rows = json.loads(result.read_text())["rows"]
    assert {(r["asked"], r["candidate"]) for r in rows} >= {("one row", "weights apart"),
                                                             ("every weight", "one pass")}
    assert all(r["seconds"] > 0 and r["vs_plain"] > 0 for r in rows)


def test_variants_benchmark_quick_run_writes_its_three_tables(tmp_path, capsys, one_thread, fresh_dynamo):
    script = load_script(ROOT / "benchmarks" / "variants.py", "multihead_bench_variants")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Each variant through auto" in out and "a window of w keys" in out and "FlexAttention" in out
    (result,) = tmp_path.glob("variants-*-quick.json")
    data = json.loads(result.read_text())
    assert data["device"] and data["torch"] and data["threads"] == 1
    cost = data["cost"]
    variants = {"plain", "window", "softcap", "alibi", "sinks", "documents", "score_mod"}
    assert {(r["variant"], r["mode"]) for r in cost} == {(v, m) for v in variants
                                                          for m in ("forward", "forward+backward")}
    assert all(r["seconds"] > 0 for r in cost) and {r["vs_plain"] for r in cost if r["variant"] == "plain"} == {1.0}
    assert {r["backend"] for r in cost if r["variant"] in ("softcap", "score_mod")} == {"chunked"}
    assert {r["backend"] for r in cost if r["variant"] == "sinks"} == {"cpu_flash"}  # the sinks join its lse
    masks = [r for r in cost if r["variant"] in ("window", "alibi", "documents")]  # sdpa takes them at T = 64
    assert {r["backend"] for r in masks} == {"sdpa"} and all(r["chunked_vs_plain"] > 0 for r in masks)
    window = data["window"]
    assert [r["T"] for r in window] == [256, 512] and [r["full_tiles"] for r in window] == [1, 4]
    assert window[1]["window_tiles"] == 3  # T = 512 in 256 x 256 tiles: the window rules the top-right one out
    flex = data["flex"]
    assert {r["variant"] for r in flex} == {"softcap", "alibi", "window", "documents"}
    # the two sides compute the same attention: a script that compared different things would show it here
    assert all(r["max_abs_diff"] < 1e-4 and r["flex_s"] > 0 and r["flex_compile_s"] > 0 for r in flex)


def test_window_cache_benchmark_quick_run_writes_its_two_tables(tmp_path, capsys, one_thread):
    script = load_script(ROOT / "benchmarks" / "window_cache.py", "multihead_bench_window_cache")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "what each cache holds" in capsys.readouterr().out
    (result,) = tmp_path.glob("window-cache-*-quick.json")
    data = json.loads(result.read_text())
    measured = data["measured"]
    assert [r["tokens"] for r in measured] == [64, 128]
    assert measured[0]["window_bytes"] == measured[1]["window_bytes"] < measured[0]["dynamic_bytes"]
    assert measured[1]["dynamic_bytes"] == 2 * measured[0]["dynamic_bytes"]  # capacity doubled with the tokens
    assert all(r["max_abs_diff"] < 1e-5 and r["window_vs_dynamic_time"] > 0 for r in measured)
    # 2 layers, 2 kv heads of 16, bf16, window 64: 65 slots (64 kept, 1 scratch) of k, v and an int64 position
    window_bytes = 2 * 65 * (2 * (16 + 16) * 2 + 8)
    assert [r["window_bytes"] for r in data["model"]] == [window_bytes] * 2
    assert [r["every_token_bytes"] for r in data["model"]] == [2 * 2 * (16 + 16) * 2 * n for n in (128, 1024)]
