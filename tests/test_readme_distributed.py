"""The README's context-parallel example, run as the README says: torchrun --nproc-per-node 2 on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    marker = "<!-- context-parallel example"
    start = text.index("```python", text.index(marker)) + len("```python")
    return text[start:text.index("```", start)]


def test_readme_example_runs_under_torchrun_and_matches_one_process(tmp_path):
    script = tmp_path / "cp.py"
    script.write_text(_example())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r"^(\d) (ring|module) vs one process: (\S+)$", done.stdout, flags=re.M)
    assert sorted((rank, what) for rank, what, _ in found) == [("0", "module"), ("0", "ring"), ("1", "module"),
                                                              ("1", "ring")], done.stdout
    assert all(float(err) < 1e-5 for _, _, err in found), found
