"""The parts of context parallelism that need no process group: layouts, the ring's block plan, the merge."""

from __future__ import annotations

import pytest
import torch

from conftest import ABS_SLACK, OUT_FACTOR, make_qkv, max_err
from multihead import attention
from multihead.backends.reference import attention_ref
from multihead.distributed import ContextParallel
from multihead.distributed.layout import assemble, make_sharding, pad, part_of
from multihead.distributed.ring import block_for, merge
from multihead.distributed.variants import ChunkRule, chunk_ranges
from multihead.backends import get as get_backend
from multihead.core.call import make_call
from multihead.core.variants import Positions


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length", [1, 7, 16, 23])
def test_parts_cover_the_sequence_once_in_ascending_order(layout, N, length):
    sharding = make_sharding(layout, length, N)
    positions = [sharding.positions(r).tolist() for r in range(N)]
    assert all(len(p) == sharding.part for p in positions)
    assert all(p == sorted(p) for p in positions)  # what lets a part run against itself with a causal mask
    assert sorted(sum(positions, [])) == list(range(sharding.padded))
    assert sharding.padded - length < sharding.pieces  # padding is less than one token per chunk
    x = torch.arange(length).view(1, length)
    parts = [part_of(pad(x, 1, sharding), 1, sharding, r) for r in range(N)]
    assert torch.equal(assemble(parts, 1, sharding), x)
    for r in range(N):
        real = (sharding.positions(r) < length).tolist()
        for start in range(sharding.part):
            for stop in range(start + 1, sharding.part + 1):
                assert sharding.padding_in(r, start, stop) == (not all(real[start:stop]))


def test_zigzag_gives_rank_r_chunks_r_and_2n_minus_1_minus_r():
    sharding = make_sharding("zigzag", 8, 2)  # chunks of 2
    assert sharding.positions(0).tolist() == [0, 1, 6, 7]
    assert sharding.positions(1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("causal", [True, False])
def test_block_plan_is_the_causal_rule_on_global_positions(layout, N, causal):
    """Every (rank, source) block: the rows and columns it computes, with its mask, are exactly the pairs
    (query, key) that the global rule allows; nothing allowed is left out, nothing hidden is computed."""
    sharding = make_sharding(layout, 3 * 2 * N, N)
    for rank in range(N):
        q_pos = sharding.positions(rank)
        for source in range(N):
            k_pos = sharding.positions(source)
            allowed = (k_pos[None, :] <= q_pos[:, None]) if causal else torch.ones(len(q_pos), len(k_pos), dtype=bool)
            block = block_for(sharding, rank, source, causal)
            planned = torch.zeros_like(allowed)
            if block is not None:
                rows, cols = block.rows, block.cols
                inside = torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.bool)
                if block.causal:
                    inside = torch.ones_like(inside).tril()
                planned[rows, cols] = inside
            assert torch.equal(planned, allowed), (rank, source)


def _planned(sharding, block) -> torch.Tensor:
    """(part, part) bool: the pairs a block computes (its rows x cols, lower triangle when causal)."""
    planned = torch.zeros(sharding.part, sharding.part, dtype=torch.bool)
    if block is not None:
        rows, cols = block.rows, block.cols
        inside = torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.bool)
        planned[rows, cols] = inside.tril() if block.causal else inside
    return planned


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("N", [2, 3, 4])
@pytest.mark.parametrize("causal,window,documents", [
    (True, (2, None), None), (False, (0, 3), None), (False, (1, 1), None), (True, (0, 0), None),
    (False, None, 5), (True, None, 3), (True, (4, None), 4)])
@pytest.mark.parametrize("length", [24, 23])
def test_block_plan_with_a_window_and_documents_keeps_every_allowed_pair(layout, N, causal, window, documents,
                                                                          length):
    """With a window and documents (sorted ids, one document per `documents` tokens), every (rank, source)
    block computes every pair of real tokens the global rule allows, and a block is skipped (None) exactly
    when it allows none; pairs it computes beyond those are masked by the step's own mask."""
    sharding = make_sharding(layout, length, N)
    ids = None if documents is None else (torch.arange(sharding.padded) // documents).view(1, -1)  # (1, padded)
    parts = None if ids is None else torch.stack([part_of(ids, 1, sharding, r) for r in range(N)])  # (N, 1, part)
    for rank in range(N):
        q_pos = sharding.positions(rank)
        ranges = None if parts is None else chunk_ranges(parts, sharding, list(range(N)))
        rule = ChunkRule(causal, window, None if ranges is None else ranges[rank], ranges)
        for source in range(N):
            k_pos = sharding.positions(source)
            i, j = q_pos[:, None], k_pos[None, :]
            allowed = (i < length) & (j < length) & ((j <= i) if causal else True)
            if window is not None:
                allowed &= (j >= i - window[0]) & ((j <= i + window[1]) if window[1] is not None else True)
            if ids is not None:
                allowed &= ids[0, q_pos][:, None] == ids[0, k_pos][None, :]
            planned = _planned(sharding, block_for(sharding, rank, source, causal, rule))
            assert not bool((allowed & ~planned).any()), (rank, source)  # nothing allowed is left out
            assert (block_for(sharding, rank, source, causal, rule) is None) == (not bool(allowed.any()))


@pytest.mark.parametrize("backend", ["cpu_flash", "sdpa", "chunked", "reference"])
def test_a_ring_steps_call_at_global_positions_is_the_same_on_every_backend_that_takes_it(backend):
    """A ring step's call: 5 queries at global positions 10..14 against 7 keys at 4..10, with a window (3, 2),
    ALiBi and documents, against the formula written out at those positions (row 14 sees no key: 0).
    Once failed on cpu_flash and sdpa: ALiBi written as a mask measured |i - j| from the call's own rows and
    keys instead of the shard's positions, so a ring step with ALiBi on cpu_flash was wrong (error 0.8)."""
    q, k, v = make_qkv(2, 2, 1, 5, 7, 8, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    q_ids, kv_ids = torch.tensor([[0, 0, 1, 1, 1]] * 2), torch.tensor([[0, 0, 0, 0, 1, 1, 1]] * 2)
    call = make_call(q, k, v, window=(3, 2), alibi_slopes=slopes, documents=(q_ids, kv_ids))
    i, j = torch.arange(10, 15), torch.arange(4, 11)
    call = call._replace(variants=call.variants._replace(positions=Positions(i, j, 0)))
    distance = (i[:, None] - j[None, :]).abs()  # (5, 7) at the global positions
    allowed = (j[None, :] >= i[:, None] - 3) & (j[None, :] <= i[:, None] + 2)  # (5, 7)
    allowed = allowed & (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]  # (B, 1, 5, 7)
    scores = q @ k.transpose(-2, -1) / 8 ** 0.5 - slopes[None, :, None, None] * distance  # (B, H, 5, 7)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    expected = weights @ v  # (B, H, 5, Dv), k and v shared by both heads
    assert get_backend(backend).supports(call) is None
    got = get_backend(backend).forward(call).out
    assert max_err(got, expected) < 1e-12
    assert bool((got[:, :, 4] == 0).all())


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    def scores(layout, N):
        sharding = make_sharding(layout, 4 * N, N)
        per_rank = []
        for rank in range(N):
            total = 0
            for source in range(N):
                b = block_for(sharding, rank, source, True)
                if b is not None:
                    n = (b.rows.stop - b.rows.start) * (b.cols.stop - b.cols.start)
                    total += n // 2 if b.causal else n  # the diagonal block costs about half
            per_rank.append(total)
        return per_rank

    assert len(set(scores("zigzag", 4))) == 1
    assert len(set(scores("contiguous", 4))) == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_of_key_blocks_is_attention_over_all_keys(dtype):
    q, k, v = make_qkv(2, 4, 2, 9, 21, 8, 6, dtype=dtype)
    mask = torch.ones(2, 1, 9, 21, dtype=torch.bool)
    mask[0, :, :, :] = False  # sequence 0: no key at all
    mask[1, :, 3, 7:] = False  # row 3 of sequence 1: keys only in the first block
    acc = torch.promote_types(dtype, torch.float32)
    out = torch.zeros(2, 4, 9, 6, dtype=acc)
    lse = torch.full((2, 4, 9), float("-inf"), dtype=acc)
    for s0, s1 in ((0, 7), (7, 15), (15, 21)):
        part = attention(q, k[:, :, s0:s1], v[:, :, s0:s1], attn_mask=mask[..., s0:s1], return_lse=True)
        out, lse = merge(out, lse, part.out, part.lse)
    golden = attention_ref(q.double(), k.double(), v.double(), attn_mask=mask).out
    naive = attention_ref(q, k, v, attn_mask=mask, upcast=False).out
    assert max_err(out, golden) <= OUT_FACTOR * max_err(naive, golden) + ABS_SLACK
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == float("-inf")).all())
    assert bool(torch.isfinite(out).all())


def test_context_parallel_checks_its_fields():
    with pytest.raises(ValueError, match="layout must be one of"):
        ContextParallel(length=8, layout="striped")
    with pytest.raises(ValueError, match="method must be one of"):
        ContextParallel(length=8, method="tree")
    with pytest.raises(TypeError, match="length must be an int"):
        ContextParallel(length=8.0)
    with pytest.raises(ValueError, match="length must be >= 1"):
        ContextParallel(length=0)
    with pytest.raises(TypeError, match="check must be a bool"):
        ContextParallel(length=8, check="yes")
