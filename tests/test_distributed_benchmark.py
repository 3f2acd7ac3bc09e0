"""The context-parallel benchmarks run and write what they say (tiny sizes: this checks the scripts, not speed).

benchmarks/distributed.py --quick runs in this process (its ranks are gloo
processes it spawns); benchmarks/distributed_torchrun.py cannot run without
GPUs, so its --help and its refusal are checked, and its `run` once on two
gloo processes of this CPU in place of NCCL ranks.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script
from multihead.distributed.local import run_local

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distributed.py"
TORCHRUN_SCRIPT = ROOT / "benchmarks" / "distributed_torchrun.py"
METHODS = ("ring-zigzag", "ring-contiguous", "ulysses")
MODES = ("forward", "forward+backward")


def _check_timings(rows: list[dict], worlds: tuple[int, ...], skipped: set) -> None:
    """One row per shape, mode, world and method (and the single process timed in each job), positive times."""
    found = {(r["shape"]["name"], r["mode"], r["world"], r["method"]): r for r in rows}
    expected = {(shape, mode, world, method) for shape in ("MHA", "GQA") for mode in MODES for world in worlds
                for method in ("single", *METHODS)}
    assert set(found) == expected
    for key, r in found.items():
        if (key[0], key[2], key[3]) in skipped:
            assert r["skipped"] and "N | G" in r["skipped"], r
            continue
        assert not r["skipped"], r
        assert r["seconds"] > 0 and r["single_s"] > 0 and r["speedup"] > 0, r
        assert len(r["per_rank_s"]) == key[2] and all(t > 0 for ts in r["per_rank_s"] for t in ts), r
        assert r["per_repeat_max_s"] == [max(column) for column in zip(*r["per_rank_s"])], r


def _check_bytes(rows: list[dict], worlds: tuple[int, ...], skipped: set) -> None:
    run = [r for r in rows if not r["skipped"]]
    assert {(r["shape"]["name"], r["world"], r["method"]) for r in run} == {
        (shape, world, method) for shape in ("MHA", "GQA") for world in worlds for method in METHODS} - skipped
    for r in run:
        for phase in ("forward", "backward"):
            counted = r[phase]
            assert counted["agree"] and counted["counted_bytes"] == counted["model_bytes"], r
            assert (counted["model_bytes"] > 0) == (r["world"] > 1), r  # a group of one sends nothing
            assert counted["counted_per_rank"] == [counted["model_bytes"]] * r["world"], r
        if r["method"].startswith("ring"):  # N-1 hops of k, v; the backward adds N hops of dk, dv
            expected = (r["world"] - 1, 2 * r["world"] - 1) if r["world"] > 1 else (0, 0)  # one rank: none
            assert (r["forward"]["p2p_calls"], r["backward"]["p2p_calls"]) == expected
        else:  # q, k, v, out; and their gradients
            assert (r["forward"]["all_to_all_calls"], r["backward"]["all_to_all_calls"]) == (4, 4)


@pytest.fixture
def distributed_script(tmp_path, monkeypatch):
    """benchmarks/distributed.py imported in this process under a name its gloo ranks can import too.

    run_local spawns the ranks, which find cpu_rank_main by its module's name on the sys.path they inherit:
    the script is linked into a folder put on that path."""
    folder = tmp_path / "importable"
    folder.mkdir()
    (folder / "multihead_bench_distributed_quick.py").symlink_to(SCRIPT)
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module("multihead_bench_distributed_quick")


def test_quick_run_times_every_method_and_world_counts_the_modelled_bytes_and_models_the_crossover(
        tmp_path, capsys, distributed_script):
    # worlds 1 (nothing to send) and 2; the quick GQA shape has G=1, so on 2 ranks Ulysses is skipped
    assert distributed_script.main(["--quick", "--worlds", "1,2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "single = multihead.attention on the whole sequence in one process with 1 thread" in out
    (result,) = tmp_path.glob("distributed-*-quick.json")
    data = json.loads(result.read_text())
    assert data["device"] and data["torch"] and data["multihead"] and data["worlds"] == [1, 2]
    assert all(threads == [1] * int(world) for world, threads in data["threads_seen"].items())
    skipped = {("GQA", 2, "ulysses")}  # G=1 does not divide by 2
    _check_timings(data["timings"], (1, 2), skipped)
    _check_bytes(data["bytes"], (1, 2), skipped)
    # more processes than cores is said beside the times (4 ranks on 2 cores, printed from these rows)
    distributed_script.timing_table([dict(r, world=4) for r in data["timings"]], "title", cores=2)
    assert "oversubscribed: 4 processes on 2 cores" in capsys.readouterr().out
    model = data["model"]
    assert {m["link"].split()[0] for m in model["machines"]} == {"NVLink", "InfiniBand"}
    assert all(m["efficiency"] == 0.5 and m["gpus"] == 8 for m in model["machines"])
    assert len(model["crossovers"]) == 4  # two links x two shapes
    for row in model["crossovers"]:
        values = [v for k, v in row.items() if k.endswith(("_P", "_T"))]
        assert len(values) == 12 and all(math.isfinite(v) and v > 0 for v in values), row
        assert row["ring_backward_overlapped_P"] > row["ring_forward_P"]  # 1.2x: dk, dv in fp32 beside k, v
        assert row["ring_forward_T"] == row["ring_forward_P"] * row["N"]
    for row in model["exposed"]:
        shares = [row[k] for k in ("ring_forward", "ring_backward_overlapped", "ring_backward_as_implemented",
                                   "ulysses_forward", "ulysses_backward")]
        assert all(math.isfinite(v) and v >= 0 for v in shares), row
        assert row["ring_backward_as_implemented"] >= row["ring_backward_overlapped"]  # plus the last hop home
    gqa, mha = (next(r for r in model["crossovers"] if r["link"].startswith("NVLink") and r["G"] == G)
                for G in (8, 32))
    assert math.isclose(mha["ring_forward_P"], 4 * gqa["ring_forward_P"])  # k, v blocks 4x larger, same FLOPs


def test_torchrun_script_help_and_its_refusal_without_cuda_or_torchrun(capsys, monkeypatch):
    script = load_script(TORCHRUN_SCRIPT, "distributed_torchrun_under_test")
    monkeypatch.setattr(sys, "argv", [str(TORCHRUN_SCRIPT)])  # argparse names the program after it
    with pytest.raises(SystemExit) as exited:
        script.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--seq" in out and "torchrun" in out
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert script.main(["--seq", "1024"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    if torch.cuda.is_available():
        assert "must be started by torchrun" in lines[0]
    else:
        assert "needs CUDA GPUs" in lines[0] and "benchmarks/distributed.py" in lines[0]


def _torchrun_run_on_gloo(out: str):
    """What each rank runs: the torchrun script's `run` on the CPU, gloo and fp32 standing in for NCCL and bf16."""
    torch.set_num_threads(1)
    script = load_script(TORCHRUN_SCRIPT, "distributed_torchrun_under_test")
    bench = script.load_cpu_benchmark()
    args = script.parse(bench, ["--seq", "64", "--repeats", "1", "--worlds", "2", "--out", out])
    path = script.run(args, bench, "cpu", torch.float32, bench.WallClock(), "cpu stand-in", {})
    return None if path is None else str(path)


def test_torchrun_script_run_on_two_gloo_processes(tmp_path):
    paths = run_local(_torchrun_run_on_gloo, 2, args=(str(tmp_path),), timeout=240.0)
    assert paths[1] is None and paths[0] is not None  # rank 0 writes
    data = json.loads(Path(paths[0]).read_text())
    assert data["device"] == "cpu stand-in x2" and data["backend"] == "gloo" and data["T"] == 64
    _check_timings(data["timings"], (2,), set())
    _check_bytes(data["bytes"], (2,), set())
    assert {r["shape"]["H"] for r in data["timings"]} == {32}  # the Llama-like shapes
