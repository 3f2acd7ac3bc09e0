"""Context-parallel attention on several processes agrees with one process (gloo, spawn; world sizes 1-4).

One job per world size runs every case (tests/distributed_cases.py, `everything(N)`) and
returns the measured errors; the tests below assert them under the rule of docs/design.md:
against attention_ref in float64, at most 2x (output) or 3x (gradients) the error of the
naive reference in the same dtype, plus 1e-5. Every job has a timeout, so a rank that hangs
fails the test instead of the suite. What the ranks refuse is in
tests/test_distributed_refusals.py; the job runner in tests/test_run_local.py.

A test whose docstring starts "Once failed" failed before its fix, and says what was wrong.
"""

from __future__ import annotations

import pytest

import distributed_cases as cases
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR
from distributed_cases import mismatches


def _ids(N: int) -> list[tuple[int, str]]:
    return [(N, c.name) for c in cases.cases_for(N)]


@pytest.mark.parametrize("N,name", [p for N in (1, 2, 3) for p in _ids(N)]
                         + [pytest.param(*p, marks=pytest.mark.slow) for p in _ids(4)])
def test_attention_is_exact_under_the_rule(distributed_job, N, name):
    ranks = distributed_job(N)
    result = ranks[0]["attention"][name]
    for key, err in result["errors"].items():
        factor = OUT_FACTOR if key == "out" else GRAD_FACTOR
        assert err <= factor * result["yardstick"][key] + ABS_SLACK, (key, err, result["yardstick"][key])
    assert result["to_library"] <= OUT_FACTOR * result["yardstick"]["out"] + ABS_SLACK
    assert result["finite"]
    if result["empty_rows"] is not None:
        assert result["empty_rows"] == 0.0
    assert all(r["attention"][name]["errors"] == result["errors"] for r in ranks)  # every rank has the same whole


def test_ring_backward_in_a_world_of_one(distributed_job):
    """Once failed: the backward sent dk/dv to itself through gloo. World 1's ring cases, gradients included."""
    ring = {name: r for name, r in distributed_job(1)[0]["attention"].items() if name.startswith("ring")}
    assert ring and all(set(r["errors"]) == {"out", "dq", "dk", "dv"} and r["finite"] for r in ring.values())
    for name, r in ring.items():
        for key in ("dq", "dk", "dv"):
            assert r["errors"][key] <= GRAD_FACTOR * r["yardstick"][key] + ABS_SLACK, (name, key, r)


def test_the_ring_forward_without_grad_in_a_world_of_one(distributed_job):
    (r,) = distributed_job(1)
    assert r["ring forward"][0] == "ok" and r["ring forward"][1] < 1e-12, r["ring forward"]


EXACT = [f"{m}/{c}" for m in ("ring", "ulysses") for c in
         ("torch.float16", "torch.bfloat16", "scale=0", "scale=-2", "grad of v only", "strided", "transposed",
          "expanded", "holes", "T=1/zigzag", "T=1/contiguous", "T=3/zigzag", "T=3/contiguous")] + \
        ["ring/chunked", "ring/reference", "ulysses/sdpa"]


@pytest.mark.parametrize("name", EXACT)
def test_edge_cases_are_exact_under_the_rule(distributed_job, name):
    for ranks in distributed_job(2):
        assert ranks["exact"][name] is True, ranks["exact"][name]


@pytest.mark.parametrize("name", ["ring/chunked", "ring/reference", "ulysses/sdpa"])
def test_a_query_with_no_key_gives_zero_and_zero_gradient(distributed_job, name):
    for ranks in distributed_job(2):
        assert ranks["exact"][f"{name}/empty rows"] == ("ok", 0.0), ranks["exact"][f"{name}/empty rows"]


def test_the_ring_is_exact_when_ranks_differ_in_which_input_requires_grad(distributed_job):
    for ranks in distributed_job(2):
        found = ranks["gradients"]["ring/grad pattern differs"]
        assert found[0] == "ok" and found[1] < 1e-12, found


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_backward_twice_with_retain_graph_accumulates(distributed_job, method):
    for ranks in distributed_job(2):
        assert ranks["gradients"][f"{method}/backward twice"] == ("ok", 0.0), ranks["gradients"]


def test_second_order_gradients_are_right_or_refused(distributed_job):
    """Once failed: with create_graph=True the ring and ulysses returned first-order gradients detached from the
    graph, so a second-order term was silently dropped (one process with backend='reference' computes it)."""
    for ranks in distributed_job(2):
        found = ranks["gradients"]
        assert found["ulysses/second order"][0] == "ok" and found["ulysses/second order"][1] < 1e-10, found
        assert not mismatches(found["ring/second order"], "RuntimeError", "ring_attention has no second derivative")


def test_shard_and_gather_take_int_and_bool_tensors_and_negative_dims(distributed_job):
    for rank, ranks in enumerate(distributed_job(2)):
        found = ranks["layouts"]
        assert found["int roundtrip, dim=-1"] == ("ok", True)
        assert found["bool roundtrip, contiguous"] == ("ok", True)
        assert found["bool padding"] == ("ok", [[True, False]] if rank == 0 else [[True, True]])  # padding: False


@pytest.mark.parametrize("N", [1, 2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_module_with_rope_matches_one_process(distributed_job, N):
    for name, result in distributed_job(N)[0]["module"].items():
        assert result["out"] <= 1e-10 and result["dx"] <= 1e-10, (name, result)
        assert max(result["params"].values()) <= 1e-10, (name, result["params"])


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_module_in_training_with_rope_gqa_and_padding_matches_one_process(distributed_job, method):
    for ranks in distributed_job(2):
        found = ranks["modules"][f"train {method}"]
        assert found[0] == "ok" and found[1] < 1e-10, found


def test_models_take_global_positions(distributed_job):
    for name, result in distributed_job(2)[0]["model"].items():
        assert result["logits"] <= 1e-10, (name, result)


@pytest.mark.parametrize("name", ["gpt2/ring", "gpt2/ulysses", "llama/ring", "llama/ulysses"])
def test_models_with_padding_and_odd_lengths_match_one_process(distributed_job, name):
    for ranks in distributed_job(2):
        assert ranks["models"][name][0] == "ok" and ranks["models"][name][1] < 1e-10, ranks["models"][name]


def test_every_chunk_but_one_padding_and_subgroups_on_three_ranks(distributed_job):
    ranks = [r["subgroups"] for r in distributed_job(3)]
    for r in ranks:
        for method in ("ring", "ulysses"):
            for layout in ("zigzag", "contiguous"):
                assert r[f"{method}/T=1/{layout}"] is True, r
    for r in ranks[:2]:
        assert r["group [0, 1]"][0] == "ok" and r["group [0, 1]"][1] < 1e-12, r
    for r in ranks[1:]:
        assert r["group [1, 2]"][0] == "ok" and r["group [1, 2]"][1] < 1e-12, r


# -- the attention family across ranks ----------------------------------------------------------------


def _variant_ids(N: int) -> list[tuple[int, str]]:
    return [(N, name) for name in cases.variant_names(N)]


@pytest.mark.parametrize("N,name", [p for N in (1, 2, 3) for p in _variant_ids(N)]
                         + [pytest.param(*p, marks=pytest.mark.slow) for p in _variant_ids(4)])
def test_every_variant_matches_one_process_under_the_rule(distributed_job, N, name):
    """window, softcap, ALiBi (H,), sinks, documents, a score_mod reading a captured table, and all of them (with
    learned (B, H) slopes and padding), on ring zigzag, ring contiguous and ulysses: the output, dq, dk, dv and
    the gradients of the slopes, the sinks and the table (each rank's share, summed over the ranks) against
    float64 attention on one process."""
    ranks = distributed_job(N)
    found = ranks[0]["variants"][name]
    assert found[0] == "ok", found
    result = found[1]
    expected = {"out", "dq", "dk", "dv"} | {f"d{n}" for n, present in (
        ("alibi_slopes", "all" in name), ("sinks", "sinks" in name or "all" in name),
        ("table", "score_mod" in name or "all" in name)) if present}
    assert set(result["errors"]) == expected, result["errors"]
    for key, err in result["errors"].items():
        factor = OUT_FACTOR if key == "out" else GRAD_FACTOR
        assert err <= factor * result["yardstick"][key] + ABS_SLACK, (key, err, result["yardstick"][key])
    assert result["finite"]
    assert all(r["variants"][name] == found for r in ranks)  # every rank has the same whole


@pytest.mark.parametrize("N", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_the_ring_skips_exactly_the_steps_that_rule_out_every_pair(distributed_job, N):
    """Each rank's (computed, skipped) forward steps equal the count read off the one-process mask (a step is
    dead when no real query of the rank may see any real key of the block), for causality, windows, documents
    and padding; the window and the documents do skip steps, and the output stays exact."""
    by_window_or_documents = 0
    for rank in distributed_job(N):
        for name, found in rank["skipped steps"].items():
            assert found["steps"] == found["expected"], (name, found)
            assert found["error"] < 1e-12, (name, found)
            if name != "contiguous/causal":
                by_window_or_documents += found["steps"][1]
    assert by_window_or_documents >= N, by_window_or_documents


@pytest.mark.parametrize("N", [2, 3])
def test_module_with_window_softcap_alibi_and_sinks_matches_one_process(distributed_job, N):
    """MultiHeadAttention(window, softcap, alibi, sinks) with RoPE and GQA under ContextParallel (ring and
    ulysses): output, input gradient and every parameter's gradient, the sinks' included, as on one process."""
    for name, found in distributed_job(N)[0]["module variants"].items():
        assert found[0] == "ok", (name, found)
        assert set(found[1]) >= {"out", "dx", "sinks"}, found[1]
        assert max(found[1].values()) <= 1e-10, (name, found[1])
