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
    # Each rank's stdout in a file of its own (--redirects 1): on one shared pipe the ranks' lines interleave
    # when Python writes unbuffered (PYTHONUNBUFFERED=1: "10 module vs ..." from ranks 1 and 0).
    logs = tmp_path / "logs"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           "--redirects", "1", "--log-dir", str(logs), str(script)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = {path.parent.name: path.read_text() for path in logs.glob("**/attempt_0/*/stdout.log")}
    assert sorted(outputs) == ["0", "1"], outputs
    found = [(rank, *line) for rank, text in outputs.items()
             for line in re.findall(r"^(\d) (ring|module) vs one process: (\S+)$", text, flags=re.M)]
    assert sorted((rank, printed, what) for rank, printed, what, _ in found) == [
        ("0", "0", "module"), ("0", "0", "ring"), ("1", "1", "module"), ("1", "1", "ring")], outputs
    assert all(float(err) < 1e-5 for *_, err in found), found
