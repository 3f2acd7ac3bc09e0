"""Context-parallel attention on several processes (gloo, spawn; world sizes 1, 2, 3 and 4 on this CPU).

One job per world size runs every case (tests/distributed_cases.py) and
returns the measured errors; the tests below assert them under the rule of
docs/design.md: against attention_ref in float64, at most 2x (output) or 3x
(gradients) the error of the naive reference in the same dtype, plus 1e-5.
Every job has a timeout, so a rank that hangs fails the test instead of the
suite.
"""

from __future__ import annotations

import time

import pytest
import torch

import distributed_cases as cases
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR
from distributed_cases import Case
from multihead.distributed.local import RankFailed, run_local

TIMEOUT = 240.0  # seconds for one world size's whole job (4 processes on 2 cores take about a minute)


def _cases(N: int) -> list[Case]:
    T = {1: 7, 2: 19, 3: 23, 4: 29}[N]  # not divisible by N (nor 2N): the last part carries padding
    H, G = 2 * N, N  # divisible by N for ulysses; GQA with two query heads per kv head
    found = []
    for method in ("ring", "ulysses"):
        for layout in ("zigzag", "contiguous"):
            for causal in (True, False):
                name = f"{method}-{layout}-{'causal' if causal else 'full'}-padded-f64"
                found.append(Case(name, method, layout, causal, T, H, G, 8, 12, "padding", "float64"))
        found.append(Case(f"{method}-zigzag-causal-f32", method, "zigzag", True, T, H, G, 16, 16, "none", "float32"))
        found.append(Case(f"{method}-contiguous-empty-f32", method, "contiguous", False, T, H, G, 8, 8, "empty",
                          "float32"))
    found.append(Case("ring-zigzag-causal-mqa-f64", "ring", "zigzag", True, T, 3, 1, 8, 4, "none", "float64"))
    found.append(Case("ring-zigzag-causal-divisible-f32", "ring", "zigzag", True, 8 * N, H, G, 8, 8, "padding",
                      "float32"))
    return found


MODULE_CASES = {1: [("ring", "zigzag"), ("ulysses", "contiguous")], 2: [("ring", "zigzag"), ("ulysses", "contiguous")], 3: [("ring", "contiguous"), ("ulysses", "zigzag")],
                4: [("ring", "zigzag")]}


def everything(N: int) -> dict:
    """What one rank of a world-size-N job runs (top level, so spawned processes can import it)."""
    import torch.distributed as dist

    results = {"toll": cases.collectives_counted() if N == 2 else None}  # first: before any other agreement
    results["attention"] = cases.attention_cases(_cases(N))
    results["module"] = {f"{m}-{layout}": cases.module_case(m, layout, 4 * N + 3) for m, layout in MODULE_CASES[N]}
    if N == 2:
        results["model"] = {name: cases.model_case(name, 13) for name in ("gpt2", "llama")}
    if N >= 3:
        results["refused"] = {m: cases.one_rank_refuses(m) for m in ("ring", "ulysses")}
        results["disagree"] = cases.ranks_disagree()
    results["rank"] = dist.get_rank()
    return results


_JOBS: dict[int, list] = {}


def job(N: int) -> list:
    """Every rank's results of the world-size-N job, run once per session."""
    if N not in _JOBS:
        _JOBS[N] = run_local(everything, N, (N,), timeout=TIMEOUT)
    return _JOBS[N]


WORLDS = [1, 2, 3, pytest.param(4, marks=pytest.mark.slow)]  # 1: a group of one, nothing sent


def _ids(N: int) -> list[tuple[int, str]]:
    return [(N, c.name) for c in _cases(N)]


@pytest.mark.parametrize("N,name", [p for N in (1, 2, 3) for p in _ids(N)]
                         + [pytest.param(*p, marks=pytest.mark.slow) for p in _ids(4)])
def test_attention_is_exact_under_the_rule(N, name):
    ranks = job(N)
    result = ranks[0]["attention"][name]
    for key, err in result["errors"].items():
        factor = OUT_FACTOR if key == "out" else GRAD_FACTOR
        assert err <= factor * result["yardstick"][key] + ABS_SLACK, (key, err, result["yardstick"][key])
    assert result["to_library"] <= OUT_FACTOR * result["yardstick"]["out"] + ABS_SLACK
    assert result["finite"]
    if result["empty_rows"] is not None:
        assert result["empty_rows"] == 0.0
    assert all(r["attention"][name]["errors"] == result["errors"] for r in ranks)  # every rank has the same whole


@pytest.mark.parametrize("N", WORLDS)
def test_module_with_rope_matches_one_process(N):
    for name, result in job(N)[0]["module"].items():
        assert result["out"] <= 1e-10 and result["dx"] <= 1e-10, (name, result)
        assert max(result["params"].values()) <= 1e-10, (name, result["params"])


def test_models_take_global_positions():
    for name, result in job(2)[0]["model"].items():
        assert result["logits"] <= 1e-10, (name, result)


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_a_rank_that_refuses_makes_every_rank_raise_naming_it(method):
    messages = [r["refused"][method] for r in job(3)]
    assert "q and k must hold this rank's part" in messages[1]  # rank 1's own error
    for rank in (0, 2):
        assert "rank 1 of the group refused the call" in messages[rank], messages[rank]
        assert "q and k must hold this rank's part" in messages[rank]  # quoted


def test_ranks_that_disagree_all_raise_naming_the_argument():
    for r in job(3):
        assert "causal: rank 0 True, rank 1 False, rank 2 False" in r["disagree"], r["disagree"]


AGREE = {"all_gather": 1, "tolist": 1}  # the agreement: one all_gather of a small row, one host read
RING, ULYSSES = {"batch_isend_irecv": 1}, {"all_to_all_single": 4}  # N = 2: one hop; q, k, v and out


def test_ranks_agree_once_per_signature_and_then_send_only_their_blocks():
    expected = {"ring, first": AGREE | RING, "ring, again": RING, "ring, check=True": AGREE | RING,
                "ring, causal flipped": AGREE | RING, "ring, flipped again": RING,
                "ulysses, first": AGREE | ULYSSES, "ulysses, again": ULYSSES,
                "ring, first again": AGREE | RING}  # the group remembers only the signature it agreed on last
    for r in job(2):
        assert {name: r["toll"][name] for name in expected} == expected, r["toll"]
        assert r["toll"]["same output"] is True


def test_a_rank_that_raises_fails_the_job_within_bounded_time():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 fails on purpose") as failure:
        run_local(cases.raise_on_rank, 2, (1,), timeout=60)
    assert time.monotonic() - start < 60
    text = str(failure.value)
    assert "rank 0 failed" in text or "ranks [0] did not finish" in text  # the other rank: raised, or killed


def test_without_a_process_group_the_error_says_how_to_make_one():
    from multihead.distributed import ring_attention

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
