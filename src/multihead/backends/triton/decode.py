"""Split-KV decoding ("flash-decoding"): a few queries per sequence against a long cache.

q (B, H, T, D) with T <= 16 (a decode step, a speculative chunk), k (B, G, S, D), v (B, G, S, Dv).

1. `_decode_split_kernel`, grid (splits, G * row_blocks, B): a program owns one kv head g, one
   slice of the keys [split * chunk, split * chunk + chunk), and the group's R query heads times
   T queries packed into the tile's rows (row i = r * T + t is query t of head g * R + r), so K
   and V are read once per group, not once per query head. It writes the slice's normalised
   partial output and logsumexp (base 2; -inf where the slice has no key the row sees).
2. `_decode_merge_kernel`, grid (T, H, B): lse = log2 sum_s 2^lse_s and
   out = sum_s 2^(lse_s - lse) o_s, the slices weighted by their share of the softmax.

    S = 10, chunk = 4, key lengths [10, 5]
              split 0     split 1     split 2
    b = 0    [0 1 2 3]   [4 5 6 7]   [8 9]
    b = 1    [0 1 2 3]   [4]         (no key: lse -inf, weight 0, nothing read)

The number of splits comes from the shapes and the device's SM count; each sequence's key range
(`keys.KeyRange`: lengths, a key-padding mask) stays on the device. Nothing syncs with the host,
so a decode step can be captured in a CUDA graph and replayed with new lengths. Causal is
bottom-right aligned as everywhere: query t sees keys j <= t + S - T. Offsets built from a row or
key index times a stride are int64.

The variants (variants.py) run in the split kernel as in the forward (a window bounds each slice's
tiles from the first and last query's reach); the sinks join at the merge as one more slice per row
whose lse is the sink and whose output is 0 (`slots`, written by the host), so the merge kernel is the
plain one.

Like forward.py, whose mode (compiled or interpreted) it shares, an ordinary module.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs, variants
# The online-softmax step over one key tile, a sequence's key bounds and the variants' query side. Here
# attend_tile's query positions are t, each row's query within its head (row r * T + t).
from .forward import attend_tile, kv_bounds, query_side

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e)
MAX_T = 16  # the decode path takes up to this many queries per sequence
MIN_S = 64  # and at least this many keys (fewer: the forward kernel's one tile is as good)
MAX_SPLITS = 128  # slices of the key range per (sequence, kv head, row block)
MIN_TILES_PER_SPLIT = 4  # a slice streams at least this many key tiles, or the merge costs more than it saves
INTERPRETER_SMS = 4  # the "device" the interpreter splits for: several slices even at tiny sizes


@triton.jit
def _decode_split_kernel(
    Q, K, V, PartO, PartLse, KeyLo, KeyHi, KeyMask,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_mb,
    H, T, S, R, row_blocks, chunk, num_splits, qk_scale2,
    # the variants (variants.launch_args): read only where their flag is on; the sinks join at the merge
    # (`slots`), so HAS_SINKS is always False here
    QDoc, KDoc, stride_qdb, stride_kdb, Slopes, stride_ab, Sinks, QPos, KPos, pos_offset,
    win_left, win_right, cap_in, cap_out2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    g = tl.program_id(1) // row_blocks  # the kv head
    rb = tl.program_id(1) % row_blocks  # which BLOCK_M of the group's R * T packed rows
    b = tl.program_id(2)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) packed: row = r * T + t
    row_ok = rows < R * T
    t = rows % T  # the query's position among the T
    h = g * R + rows // T  # its query head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = h.to(tl.int64) * stride_qh + t.to(tl.int64) * stride_qt  # (BLOCK_M,) int64
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (q_rows[:, None] + offs_d[None, :]),
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    mask_base = KeyMask + b.to(tl.int64) * stride_mb

    kv_lo, kv_hi = kv_bounds(KeyLo, KeyHi, b, S, HAS_LENGTHS)  # sequence b's keys [kv_lo, kv_hi)
    offset = S - T  # query t sees keys j <= t + offset
    if CAUSAL:
        hi = tl.minimum(kv_hi, T + offset)  # the last query (t = T - 1) sees up to key T - 1 + offset
        full = tl.minimum(kv_lo, offset + 1)  # the first (t = 0) sees every key up to offset
    else:
        hi = kv_hi
        full = kv_lo
    if HAS_RIGHT and not HAS_POS:  # the last query sees up to T - 1 + offset + right, the first whole to offset + right
        hi = tl.minimum(hi, T + offset + win_right)
        full = tl.minimum(full, offset + win_right + 1)
    start = split * chunk  # a multiple of BLOCK_N
    end = tl.maximum(tl.minimum(start + chunk, hi), start)
    if HAS_LEFT and not HAS_POS:  # the first query sees from offset - left, the last whole from T - 1 + offset - left
        lo = (tl.maximum(offset - win_left, 0) // BLOCK_N) * BLOCK_N
        whole = tl.cdiv(tl.maximum(T - 1 + offset - win_left, 0), BLOCK_N) * BLOCK_N
        masked_from = tl.minimum(tl.maximum(start, lo), end)
        start = tl.minimum(tl.maximum(whole, masked_from), end)  # the slice's tiles before it are masked
    full_end = tl.minimum(tl.maximum(full, start), end)
    full_end = start + ((full_end - start) // BLOCK_N) * BLOCK_N  # whole tiles every row sees
    if HAS_DOCS or HAS_POS:  # every tile masked
        full_end = start

    qa, q_doc = query_side(t, T, offset, QDoc + b.to(tl.int64) * stride_qdb, QPos, pos_offset, HAS_DOCS, HAS_POS)
    kdoc_base = KDoc + b.to(tl.int64) * stride_kdb
    slope2 = 0.0
    if HAS_ALIBI:  # (BLOCK_M, 1): each packed row's head
        slope2 = tl.load(Slopes + b.to(tl.int64) * stride_ab + h.to(tl.int64), mask=row_ok, other=0.0)
        slope2 = (slope2 * 1.4426950408889634)[:, None]  # base 2

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if HAS_LEFT and not HAS_POS:
        for start_n in range(masked_from, start, BLOCK_N):
            acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, t,
                                         offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
                                         HEAD_DIM, HEAD_DIM_V, True, CAUSAL, HAS_KEYMASK, PRECISION,
                                         qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                                         HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    for start_n in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, t,
                                     offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
                                     HEAD_DIM, HEAD_DIM_V, False, CAUSAL, HAS_KEYMASK, PRECISION,
                                     qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                                     HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, t,
                                     offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
                                     HEAD_DIM, HEAD_DIM_V, True, CAUSAL, HAS_KEYMASK, PRECISION,
                                     qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                                     HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)

    no_key = l_i == 0.0  # no key of this slice: output 0 and lse -inf, so the merge gives it weight 0
    l_safe = tl.where(no_key, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse2 = tl.where(no_key, float("-inf"), m_i + tl.log2(l_safe))  # base 2
    part = ((b * H + h).to(tl.int64) * T + t) * num_splits + split  # (BLOCK_M,) row of PartLse (B, H, T, splits)
    tl.store(PartO + (part[:, None] * HEAD_DIM_V + offs_dv[None, :]), acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(PartLse + part, lse2, mask=row_ok)


# How triton.jit made this module's kernels: for the interpreter, or compiled (see forward.py).
INTERPRET = not isinstance(_decode_split_kernel, triton.JITFunction)


@triton.jit
def _decode_merge_kernel(
    PartO, PartLse, Out, Lse,
    stride_ob, stride_oh, stride_ot,
    H, T, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    row = (b * H + h).to(tl.int64) * T + t
    offs_dv = tl.arange(0, BLOCK_DV)
    every = tl.arange(0, SPLITS)  # SPLITS: num_splits rounded up to a power of two
    lse_all = tl.load(PartLse + (row * num_splits + every), mask=every < num_splits, other=float("-inf"))
    m = tl.max(lse_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no slice saw a key: every weight is 0
    total = 0.0
    acc = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = offs_s < num_splits
        part = row * num_splits + offs_s  # (BLOCK_S,) int64
        w = tl.exp2(tl.load(PartLse + part, mask=ok, other=float("-inf")) - m_safe)  # (BLOCK_S,)
        o = tl.load(PartO + (part[:, None] * HEAD_DIM_V + offs_dv[None, :]),
                    mask=ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BLOCK_S, BLOCK_DV)
        total += tl.sum(w, 0)
        acc += tl.sum(w[:, None] * o, 0)
    no_key = total == 0.0
    out = acc / tl.where(no_key, 1.0, total)  # (BLOCK_DV,)
    lse = tl.where(no_key, float("-inf"), (m + tl.log2(tl.where(no_key, 1.0, total))) * 0.6931471805599453)
    o_row = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + t.to(tl.int64) * stride_ot
    tl.store(Out + (o_row + offs_dv), out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Lse + row, lse)


def padded_dim(d: int) -> int:
    """The power of two (at least 16, tl.dot's smallest) that a head dim is padded to."""
    return max(16, triton.next_power_of_2(d))


def applies(T: int, S: int) -> bool:
    """Whether a call of these lengths takes the decode path: decided from shapes alone."""
    return 0 < T <= MAX_T and S >= MIN_S


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count  # a host query, no sync


def split_count(programs: int, S: int, block_n: int, sms: int) -> int:
    """How many slices the key range is cut into: about two waves of programs over the SMs,
    each slice at least MIN_TILES_PER_SPLIT tiles, at most MAX_SPLITS."""
    tiles = triton.cdiv(S, block_n)
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(tiles, MIN_TILES_PER_SPLIT), MAX_SPLITS))


class Plan(NamedTuple):
    """One decode launch, decided from shapes."""

    block_m: int  # packed query rows per program (R * T rounded up to a power of two, at most 64)
    block_n: int  # keys per tile
    warps: int
    stages: int  # software pipelining depth of the K/V loads
    row_blocks: int  # programs per kv head along the packed rows
    chunk: int  # keys per slice, a multiple of block_n
    splits: int  # slices of the key range


def plan(q, k, v, block_n: int | None = None, num_splits: int | None = None) -> Plan:
    """The tiles and the split of the keys for q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv)."""
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rows = (H // G) * T  # the group's queries, packed into one tile's rows
    block_m = min(max(16, triton.next_power_of_2(rows)), configs.DECODE_MAX_ROWS)
    row_blocks = triton.cdiv(rows, block_m)
    default_n, warps, stages = configs.decode_tile(max(padded_dim(D), padded_dim(Dv)))
    block_n = block_n or default_n
    splits = num_splits or split_count(B * G * row_blocks, S, block_n, _sm_count(q.device))
    chunk = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n  # whole tiles per slice
    return Plan(block_m, block_n, warps, stages, row_blocks, chunk, triton.cdiv(S, chunk))


def slots(p: Plan, kv) -> int:
    """Partial results per query row: one per slice, and with sinks one more that holds the sink (lse = sink,
    output 0), written by the host, so that the merge adds the sink's term once, as one more slice."""
    return p.splits + (kv is not None and kv.sinks is not None)


def kernel_args(q, k, v, part_o, part_lse, keys, causal: bool, scale: float, precision: str, p: Plan, kv=None):
    """(args, constexprs) of `_decode_split_kernel`, as launched and as benchmarks/triton_ptxas.py compiles it;
    kv: the call's `variants.KernelVariants` or None (a plain call)."""
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[-1]
    lo, hi, mask = (part_lse, part_lse, None) if keys is None else keys
    args = (q, k, v, part_o, part_lse, lo, hi, mask if mask is not None else part_lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), mask.stride(0) if mask is not None else 0,
            H, T, S, H // k.shape[1], p.row_blocks, p.chunk, slots(p, kv), scale * LOG2E,
            *variants.launch_args(kv, scale, part_lse))
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(Dv), CAUSAL=causal,
                HAS_LENGTHS=keys is not None, HAS_KEYMASK=mask is not None, PRECISION=precision,
                BLOCK_M=p.block_m, BLOCK_N=p.block_n,
                **variants.flags(kv, sinks=False))  # the sinks join at the merge (`slots`)
    return args, meta


def attention_decode(q, k, v, keys, causal: bool, scale: float, precision: str,
                     block_n: int | None = None, num_splits: int | None = None, kv=None):
    """Split-KV attention for T <= 16: q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv), last dims
    contiguous, S > 0; keys a `keys.KeyRange` or None; kv a `variants.KernelVariants` or None.
    -> out (B, H, T, Dv), lse (B, H, T) float32 (with sinks, their terms included).

    block_n, num_splits: override the tile's keys and the number of slices (tests, tuning).
    """
    B, H, T, _ = q.shape
    G, Dv = k.shape[1], v.shape[-1]
    p = plan(q, k, v, block_n, num_splits)
    splits = slots(p, kv)
    part_o = torch.empty((B, H, T, splits, Dv), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, H, T, splits), dtype=torch.float32, device=q.device)
    if splits > p.splits:  # the sinks' slot: lse = sink (base 2), output 0
        part_lse[..., p.splits] = (kv.sinks * LOG2E)[:, None]  # (H,) -> (H, 1) -> (B, H, T)
        part_o[..., p.splits, :] = 0.0
    out = torch.empty((B, H, T, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    args, meta = kernel_args(q, k, v, part_o, part_lse, keys, causal, scale, precision, p, kv)
    _decode_split_kernel[(p.splits, G * p.row_blocks, B)](*args, **meta, num_warps=p.warps, num_stages=p.stages)
    _decode_merge_kernel[(T, H, B)](
        part_o, part_lse, out, lse, out.stride(0), out.stride(1), out.stride(2), H, T, splits,
        HEAD_DIM_V=Dv, BLOCK_DV=padded_dim(Dv), SPLITS=triton.next_power_of_2(splits), BLOCK_S=16, num_warps=4,
    )
    return out, lse
