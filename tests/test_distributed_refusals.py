"""What the ranks of a context-parallel call agree on before any block moves: bad arguments, disagreements,
one rank's refusal (named on every rank, never a hang), and what the agreement costs.

The cases run inside the jobs of tests/distributed_cases.py (world 2 and 3, shared with
tests/test_distributed.py); those where one rank differs run on groups of their own there.
A test whose docstring starts "Once failed" failed before its fix, and says what was wrong.
"""

from __future__ import annotations

import pytest
import torch

from distributed_cases import ALONE_TIMEOUT, mismatches


def two(distributed_job, section: str) -> list[dict]:
    return [r[section] for r in distributed_job(2)]


# -- the same bad argument on every rank ----------------------------------------------------------------


ARGUMENT_ERRORS = {  # distributed_cases.BAD_ARGUMENTS's names -> the error every rank raises
    "layout='zig'": ("ValueError", "layout must be one of", "'zig'"),
    "length=8.0": ("TypeError", "length must be an int", "8.0"),
    "length=0": ("ValueError", "length must be >= 1", "0"),
    "length=True": ("TypeError", "length must be an int", "bool"),
    "group='default'": ("TypeError", "group must be a torch.distributed ProcessGroup", "str"),
    "backend='nope'": ("ValueError", "backend must be 'auto' or one of", "'nope'"),
    "backend=None": ("TypeError", "backend must be a str", "NoneType"),
    "scale=nan": ("ValueError", "scale must be a finite number", "nan"),
    "scale=inf": ("ValueError", "scale must be a finite number", "inf"),
    "causal=1": ("TypeError", "causal must be a bool", "int 1"),
    "check=1": ("TypeError", "check must be a bool", "int 1"),
    "key_mask int": ("TypeError", "key_mask must be a bool tensor", "torch.int64"),
    "key_mask (2, 5)": ("ValueError", "key_mask must be (B, part) = (2, 4)", "(2, 5)"),
    "length=100": ("ValueError", "length=100", "has 50 tokens, got q 4"),
    "k float32": ("TypeError", "k has dtype torch.float32 but q has torch.float64"),
    "window=(-1, 0)": ("ValueError", "window's left must be an int >= 0", "-1"),
    "sinks (3,)": ("ValueError", "sinks must be (H,) = (2,)", "(3,)"),
    "documents float": ("TypeError", "documents: the query ids must be an integer tensor", "torch.float32"),
}


@pytest.mark.parametrize("method", ["ring", "ulysses"])
@pytest.mark.parametrize("name", list(ARGUMENT_ERRORS))
def test_a_bad_argument_on_every_rank_is_named_on_every_rank(distributed_job, method, name):
    kind, *words = ARGUMENT_ERRORS[name]
    for ranks in two(distributed_job, "arguments"):
        assert not mismatches(ranks[f"{method}/{name}"], kind, *words)


def test_shard_and_gather_name_their_bad_arguments(distributed_job):
    for ranks in two(distributed_job, "arguments"):
        assert not mismatches(ranks["shard/dim"], "ValueError", "dim must be an int in [-3, 3)", "got 3")
        assert not mismatches(ranks["shard/layout"], "ValueError", "layout must be one of", "'zz'")
        assert not mismatches(ranks["gather/length"], "ValueError", "length=100", "has 50")


def test_the_ring_refuses_sdpa_which_has_no_logsumexp(distributed_job):
    for ranks in two(distributed_job, "arguments"):
        assert not mismatches(ranks["ring/sdpa"], "ValueError", "backend='sdpa'", "no logsumexp")


def test_module_refuses_what_context_parallel_cannot_do(distributed_job):
    for ranks in two(distributed_job, "modules"):
        assert not mismatches(ranks["dropout in training"], "ValueError", "dropout in training")
        assert not mismatches(ranks["need_weights"], "ValueError", "need_weights")
        assert not mismatches(ranks["attn_mask"], "ValueError", "attn_mask (use key_mask)")
        assert not mismatches(ranks["cross"], "ValueError", "key/value other than the query")
        assert not mismatches(ranks["not a ContextParallel"], "TypeError", "context_parallel must be", "str")
        assert not mismatches(ranks["method"], "ValueError", "method must be one of", "'tree'")


def test_need_weights_is_checked_as_a_bool_under_context_parallel(distributed_job):
    """Once failed: under context_parallel need_weights was not type-checked: 0 was accepted, while the plain
    call raises 'need_weights must be a bool'."""
    for ranks in two(distributed_job, "modules"):
        assert not mismatches(ranks["need_weights=0"], "TypeError", "need_weights must be a bool")


def test_gpt2_refuses_a_length_beyond_its_positions(distributed_job):
    for ranks in two(distributed_job, "models"):
        assert not mismatches(ranks["gpt2 beyond max_positions"], "ValueError", "length=9", "8 positions")


def test_the_full_sequence_instead_of_the_part_is_named(distributed_job):
    """Once failed: with the full sequence where the part belongs, GPT-2 and a RoPE module raised a bare
    broadcasting RuntimeError naming no argument."""
    for ranks in two(distributed_job, "models"):
        assert not mismatches(ranks["gpt2 full sequence"], "ValueError", "input_ids")
    for ranks in two(distributed_job, "modules"):
        assert not mismatches(ranks["rope, full sequence"], "ValueError", "part")


def test_a_rank_outside_the_group_is_told_so(distributed_job):
    """Once failed: a rank outside a sub-group was told 'group must be a ProcessGroup ... got int' (new_group
    gives non-members -100), not that it is not a member."""
    r = distributed_job(3)[2]["subgroups"]
    assert not mismatches(r["not a member"], "ValueError", "not a member")


def test_without_a_process_group_the_error_says_how_to_make_one():
    from multihead.distributed import ring_attention

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


# -- ranks whose calls differ ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["length", "layout", "dtype", "key_mask", "scale", "backend", "B", "grad", "Dv",
                                   "variants"])
def test_ranks_that_disagree_all_raise_naming_the_field(distributed_job, field):
    for ranks in two(distributed_job, "disagree"):
        assert not mismatches(ranks[field], "ValueError", "must make the same call with the same arguments",
                              f"{field}: rank 0 ")


def test_a_disagreement_shows_the_values(distributed_job):
    """Once failed: a disagreement on a string, float or dtype printed opaque codes (layout: rank 0
    3565348844794, ...), not the values that came."""
    for ranks in two(distributed_job, "disagree"):
        assert not mismatches(ranks["layout"], "ValueError", "zigzag", "contiguous")
        assert not mismatches(ranks["scale"], "ValueError", "0.5")


def test_ranks_that_disagree_on_three_ranks_all_raise_naming_the_argument(distributed_job):
    for r in distributed_job(3):
        assert "causal: rank 0 True, rank 1 False, rank 2 False" in r["disagree"], r["disagree"]


def test_sdpa_on_one_rank_makes_every_rank_raise_naming_it(distributed_job):
    rank_0, rank_1 = (r["sdpa_on_rank_1"] for r in two(distributed_job, "disagree"))
    assert not mismatches(rank_1, "ValueError", "backend='sdpa'", "no logsumexp")
    assert not mismatches(rank_0, "RuntimeError", "rank 1 of the group refused the call", "no logsumexp")


def test_ulysses_when_ranks_differ_in_which_input_requires_grad(distributed_job):
    """Once failed: ulysses_attention agreed on one 'grad' flag, so ranks that differ in which of q, k, v require
    grad paired mismatched all_to_alls: silently wrong gradients."""
    for ranks in two(distributed_job, "gradients"):
        assert not mismatches(ranks["ulysses/grad pattern differs"], "ValueError",
                              "grad of q, k, v: rank 0 (True, False, False)")


def test_gather_with_different_layouts_raises_on_every_rank(distributed_job):
    """Once failed: gather_sequence did no agreement: ranks with different layouts each got a different 'full'
    tensor, silently."""
    for ranks in two(distributed_job, "layouts"):
        assert not mismatches(ranks["gather layouts differ"], "ValueError", "layout")


# -- parts that know how they were cut ------------------------------------------------------------------


CUTS = {  # distributed_cases.cuts()'s names -> what every rank's ValueError says (the part's record, the call's)
    "ring, called contiguous": ("q was cut by shard_sequence with layout='zigzag'",
                                "ring_attention was given layout='contiguous'"),
    "ulysses, called contiguous": ("q was cut by shard_sequence with layout='zigzag'",
                                   "ulysses_attention was given layout='contiguous'"),
    "ring, length not given": ("length=7", "was given length=8 (length not given: taken as part · N)"),
    "gather the ring's output as contiguous": ("part was cut by ring_attention with layout='zigzag'",
                                               "gather_sequence was given layout='contiguous'"),
    "gather a part as contiguous": ("part was cut by shard_sequence with layout='zigzag'",
                                    "gather_sequence was given layout='contiguous'"),
    "module": ("query was cut by shard_sequence with layout='contiguous'", "ContextParallel was given layout='zigzag'"),
    "model": ("input_ids was cut by shard_sequence with layout='contiguous'", "layout='zigzag'"),
}


@pytest.mark.parametrize("name", list(CUTS))
def test_a_part_used_with_another_layout_or_length_is_refused_on_every_rank(distributed_job, name):
    """Once failed: a part did not know how it was cut: zigzag parts run or gathered as contiguous (or a padded
    part's length left out) gave errors of 1.3-1.8 and no exception. T = 8 over 2 ranks: both layouts give
    parts of one size, so no shape check could tell."""
    for ranks in two(distributed_job, "cuts"):
        assert not mismatches(ranks[name], "ValueError", *CUTS[name])


def test_ranks_that_cut_with_different_layouts_all_raise_naming_the_rank(distributed_job):
    """Once failed: rank 0 cutting zigzag and rank 1 contiguous, both calling the ring with layout='zigzag', gave
    an error of 1.04 and no exception."""
    rank_0, rank_1 = two(distributed_job, "cuts")
    expected = ("q was cut by shard_sequence with layout='contiguous'", "ring_attention was given layout='zigzag'")
    assert not mismatches(rank_1["rank 1 cut contiguous"], "ValueError", *expected)
    assert not mismatches(rank_0["rank 1 cut contiguous"], "RuntimeError", "rank 1 of the group refused", *expected)


def test_plain_parts_passed_the_layout_they_were_cut_with_still_work(distributed_job):
    for ranks in two(distributed_job, "cuts"):
        found = ranks["plain parts as told"]
        assert found[0] == "ok" and found[1] < 1e-12, found


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_a_rank_that_refuses_makes_every_rank_raise_naming_it(distributed_job, method):
    messages = [r["refused"][method] for r in distributed_job(3)]
    assert "q and k must hold this rank's part" in messages[1]  # rank 1's own error
    for rank in (0, 2):
        assert "rank 1 of the group refused the call" in messages[rank], messages[rank]
        assert "q and k must hold this rank's part" in messages[rank]  # quoted


def _one_rank_differs(distributed_job, name: str) -> list:
    """Each rank's (kind, message) of the case, checked to have come well before its group's timeout."""
    found = [r["one rank differs"][name] for r in distributed_job(2)]
    assert all(seconds < ALONE_TIMEOUT / 2 for _, seconds in found), found  # raised, not waited out
    return [result for result, _ in found]


def test_a_module_refusal_on_one_rank_is_named_on_every_rank(distributed_job):
    """Once failed: MultiHeadAttention's context-parallel checks ran before the agreement: the refusing rank
    raised alone, the others waited in the next collective and then got a gloo connection error naming nobody."""
    rank_0, rank_1 = _one_rank_differs(distributed_job, "rank 1 asks for weights")
    assert not mismatches(rank_1, "ValueError", "need_weights")
    assert not mismatches(rank_0, "RuntimeError", "rank 1", "need_weights")


def test_a_gather_refusal_on_one_rank_is_named_on_every_rank(distributed_job):
    """Once failed: gather_sequence checked the part's length on each rank alone: the refusing rank raised, the
    others blocked in all_gather, then got a gloo error."""
    rank_0, rank_1 = _one_rank_differs(distributed_job, "rank 1 gathers another length")
    assert not mismatches(rank_1, "ValueError", "length=3")
    assert not mismatches(rank_0, "RuntimeError", "rank 1 of the group refused the call", "length=3")


def test_ranks_with_different_methods_raise_instead_of_deadlocking(distributed_job):
    """Once failed: the method was not agreed: a ring on one rank and ulysses on the other deadlocked."""
    results = _one_rank_differs(distributed_job, "ranks call different methods")
    for result in results:
        assert not mismatches(result, "ValueError", "call: rank 0 'ring_attention', rank 1 'ulysses_attention'")


# -- what the agreement costs, and its limit ------------------------------------------------------------


AGREE = {"all_gather": 1, "tolist": 1}  # the agreement: one all_gather of a small row, one host read
RING, ULYSSES = {"batch_isend_irecv": 1}, {"all_to_all_single": 4}  # N = 2: one hop; q, k, v and out


def test_ranks_agree_once_per_signature_and_then_send_only_their_blocks(distributed_job):
    expected = {"ring, first": AGREE | RING, "ring, again": RING, "ring, check=True": AGREE | RING,
                "ring, causal flipped": AGREE | RING, "ring, flipped again": RING,
                "ulysses, first": AGREE | ULYSSES, "ulysses, again": ULYSSES,
                "ring, first again": AGREE | RING}  # the group remembers only the signature it agreed on last
    for r in distributed_job(2):
        assert {name: r["toll"][name] for name in expected} == expected, r["toll"]
        assert r["toll"]["same output"] is True


def test_a_rank_that_changes_its_call_while_the_others_repeat_is_found_at_the_timeout(distributed_job):
    """The limit of agreeing once per signature (docs/distributed.md): a rank that changes its call while the
    others repeat the agreed one is found at the group's timeout, with a message that points to check=True."""
    for agreed, checked, unchecked in (r["changes its call"] for r in distributed_job(2)):
        assert agreed[0] == "ok", agreed
        assert not mismatches(checked, "ValueError", "causal: rank 0 True, rank 1 False")
        assert not mismatches(unchecked, "RuntimeError", "a transfer between the ranks failed", "check=True")
