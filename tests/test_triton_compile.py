"""The kernels compiled for sm_90a on this machine (no GPU needed): benchmarks/triton_ptxas.py.

triton.compile lowers each kernel to PTX for GPUTarget("cuda", 90, 64) and triton's bundled ptxas
assembles it: every kernel (forward, dk/dv, dq, the backward's preprocess, the split-KV decode and its
merge) must compile without a spill, within sm_90's shared memory, and with every tensor of pointer
offsets in int64 (read off its TTIR). Skips where this triton cannot compile for sm_90a.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_ptxas.py"

tp = load_script(SCRIPT, "triton_ptxas")
cannot = tp.can_compile()


def test_narrow_offsets_are_found_in_ttir():
    """The TTIR reader sees an int32 offset tensor (the bug of `offs_m * stride_qt`) and passes int64 ones."""
    bad = "%q_36 = tt.addptr %q_35, %q_34 : tensor<128x1x!tt.ptr<bf16>>, tensor<128x1xi32> loc(#loc144)"
    good = "%q_36 = tt.addptr %q_35, %q_34 : tensor<128x64x!tt.ptr<f32>>, tensor<128x64xi64> loc(#loc1)"
    scalar = "%q_base_13 = tt.addptr %Q, %q_base_12 : !tt.ptr<bf16>, i32 loc(#loc133)"
    assert tp.narrow_offsets("\n".join([bad, good, scalar])) == [bad]


def test_a_spill_or_a_narrow_offset_is_not_ok():
    row = tp.Row("forward", 128, "128x64 4w 3s", True, 255, 0, 0, 128.0, 128.0, 255, 0, True, 1.0, None)
    assert row.ok
    assert not row._replace(spill_stores=372).ok and not row._replace(spills_12=384).ok
    assert not row._replace(int64_offsets=False).ok and not row._replace(smem_kb=230.0).ok


@pytest.mark.skipif(cannot is not None, reason=f"cannot compile for sm_90a here: {cannot}")
def test_one_tile_of_every_kernel_compiles_clean_for_sm90a(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, env=dict(env, PYTHONPATH=str(ROOT / "src")))
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"forward", "dkdv", "dq", "decode", "merge", "preprocess"}
    for r in rows:
        assert r["ok"] and r["spill_stores"] == 0 and r["int64_offsets"] is True, r
        assert 0 < r["regs"] <= 255 and r["smem_kb"] * 1024 <= tp.SMEM_LIMIT, r
        if r["smem_est_kb"] is not None:  # what the autotuners prune fp32 tiles by: never far under
            assert r["smem_est_kb"] >= r["smem_kb"] - 2, r
    assert "| forward | 64 | 128x64 4w 3s | yes |" in done.stdout


def test_without_a_compiler_the_script_says_so(monkeypatch, capsys):
    monkeypatch.setattr(tp, "can_compile", lambda: "no nvidia backend")
    assert tp.main(["--quick"]) == tp.CANNOT_COMPILE
    assert "cannot compile for sm_90a here (no nvidia backend)" in capsys.readouterr().out
