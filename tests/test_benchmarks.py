"""The benchmark script runs and writes what it says (tiny sizes: this checks the script, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_benchmark_quick_run_writes_its_tables(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "MultiHeadAttention vs torch.nn.MultiheadAttention" in done.stdout
    (result,) = tmp_path.glob("cpu-*-quick.json")
    data = json.loads(result.read_text())
    assert data["torch"] and data["device"]
    assert {(r["T"], r["need_weights"]) for r in data["module"]} == {(64, False), (64, True), (128, False), (128, True)}
    assert {r["backend"] for r in data["backends"]} == {"sdpa", "cpu_flash", "chunked", "reference"}
    assert all(r["seconds"] > 0 and r["torch_sdpa_s"] > 0 for r in data["backends"])
    memory = {r["backend"]: r["peak_extra_bytes"] for r in data["memory"]}
    assert set(memory) == {"chunked", "reference", "sdpa"}


def test_gpu_check_plan_and_refusal_without_cuda():
    import torch

    script = str(ROOT / "benchmarks" / "gpu_check.py")
    done = subprocess.run([sys.executable, script, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "phases: ceilings" in done.stdout and "correctness: B,H,G,T,S,D,causal,mask" in done.stdout
    assert "speed: T=16384, B=1, H=16, D=128" in done.stdout and "decode: B,H,G,T,S,D = (1, 32, 8, 1, 32768, 128)" in done.stdout
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, script, "--budget", "5"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "needs a CUDA device" in done.stderr


def test_decode_benchmark_quick_run_reports_eager_compiled_and_transformers_tokens_per_second(tmp_path):
    script = str(ROOT / "benchmarks" / "decode.py")
    done = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "compiled tokens/s" in done.stdout and "transformers tokens/s" in done.stdout
    assert "the faster multihead path decodes at" in done.stdout
    (result,) = tmp_path.glob("decode-*-quick.json")
    rows = json.loads(result.read_text())["decoding"]
    assert [r["model"] for r in rows] == ["gpt2", "llama"]
    for r in rows:
        assert r["same_tokens"] is True, r
        assert r["attn_implementation"] == "sdpa" and r["compile_backend"] == "eager"
        assert min(r["eager_s"], r["compiled_s"], r["transformers_s"]) > 0 and r["compile_s"] >= 0
        assert r["best_vs_transformers"] == max(r["eager_vs_transformers"], r["compiled_vs_transformers"])
