"""The backward kernels: probabilities recomputed from the logsumexp, then dq, dk, dv.

FlashAttention-2's backward in three launches, none of them with atomics, so
the gradients are the same bit for bit from run to run:

1. `_bwd_preprocess`: per query, delta = rowsum(dO * O), the softmax
   backward's correction term (sum_j P_ij dP_ij), and the logsumexp in base 2
   (+inf for a row with no key, so that exp2(score - lse) is 0 there and
   never NaN).
2. `_bwd_dkdv_kernel`: one program per key tile of one kv head. It walks the
   R query heads of its group and, for each, the query blocks that see the
   tile: P = exp2(s - lse), dV += Pᵀ dO, dP = dO Vᵀ, dS = P (dP - delta),
   dK += dSᵀ Q. The group's heads add up inside the program, in a fixed order.
3. `_bwd_dq_kernel`: one program per query block of one head, walking key
   tiles as the forward does: dQ += dS K.

Both walks split their tiles as the forward does: the ones every row and key
of the pair sees whole need no mask; the ones the causal diagonal or the key
range (`keys.KeyRange`: lo, hi, a key-padding mask) cuts are masked element
by element, and keys from hi on are never read. Pointer offsets built from a
row or key index times a stride are int64, as in the forward.

The variants (variants.py) recompute the forward's scores with the same
pieces (`forward.variant_scores`, `variant_allowed`); a window skips the tiles
(dq) and the query blocks (dk/dv, `query_runs`) it rules out, as the forward
does. The softcap's backward is dS · (1 - tanh²(s / c)) on the raw scores.
Sinks need nothing here: the saved lse holds their term, so P = exp(s - lse)
is already each key's probability; their gradient is computed in torch from
the lse and delta (`multihead.core.variants.sink_gradient`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, variants
# a sequence's key bounds, the forward's key runs, and the variants' pieces (the same formula as the forward's)
from .forward import key_runs, key_side, kv_bounds, query_side, variant_allowed, variant_scores

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e)


@triton.jit
def _bwd_preprocess(
    Out, DO, Lse, Delta, Lse2,
    stride_ob, stride_oh, stride_ot,
    stride_db, stride_dh, stride_dt,
    H, T,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # heads and batch on grid axes 1 and 2: each may reach 65535
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = offs_m.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < T) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + (rows64[:, None] * stride_ot + offs_dv[None, :]), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                 + (rows64[:, None] * stride_dt + offs_dv[None, :]), mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)  # (BLOCK_M,)
    row = (b * H + h).to(tl.int64) * T + rows64
    lse = tl.load(Lse + row, mask=offs_m < T, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(Delta + row, delta, mask=offs_m < T)
    tl.store(Lse2 + row, lse2, mask=offs_m < T)


# How triton.jit made this module's kernels: for the interpreter, or compiled (see forward.py).
INTERPRET = not isinstance(_bwd_preprocess, triton.JITFunction)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, m0, cols, key_ok,
    offs_m, offs_d, offs_dv, stride_qt, stride_dt, T, offset, qk_scale2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    kp, k_doc, qdoc_base, QPos, pos_offset, slope2, win_left, win_right, cap_in, cap_out2,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr,
):
    rows = m0 + offs_m  # (BLOCK_M,)
    rows64 = rows.to(tl.int64)
    q = tl.load(q_base + (rows64[:, None] * stride_qt + offs_d[None, :]),
                mask=(rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, BLOCK_D)
    # rows past T load lse2 = +inf: their P is 0 without a mask
    lse2 = tl.load(lse_base + rows64, mask=rows < T, other=float("inf"))
    if SOFTCAP or HAS_ALIBI or HAS_LEFT or HAS_RIGHT or HAS_DOCS:
        qa, q_doc = query_side(rows, T, offset, qdoc_base, QPos, pos_offset, HAS_DOCS, HAS_POS)
        qk_t, tanh_t = variant_scores(tl.dot(k, tl.trans(q), input_precision=PRECISION), qk_scale2, qa[None, :],
                                      kp[:, None], slope2, cap_in, cap_out2, SOFTCAP, HAS_ALIBI)  # (BLOCK_N, BLOCK_M)
    else:
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2  # (BLOCK_N, BLOCK_M)
    p_t = tl.exp2(qk_t - lse2[None, :])
    if MASKED:
        allowed = key_ok[:, None]
        if CAUSAL:
            allowed = allowed & (cols[:, None] <= rows[None, :] + offset)
        if HAS_LEFT or HAS_RIGHT or HAS_DOCS:
            allowed = variant_allowed(allowed, qa[None, :], kp[:, None], q_doc[None, :], k_doc[:, None],
                                      win_left, win_right, HAS_LEFT, HAS_RIGHT, HAS_DOCS)
        p_t = tl.where(allowed, p_t, 0.0)
    do = tl.load(do_base + (rows64[:, None] * stride_dt + offs_dv[None, :]),
                 mask=(rows[:, None] < T) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BLOCK_M, BLOCK_DV)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    delta = tl.load(delta_base + rows64, mask=rows < T, other=0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:  # through c · tanh(s / c): d raw = dS · (1 - tanh²)
        ds_t = ds_t * (1.0 - tanh_t * tanh_t)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def query_runs(n0, T, kv_lo, kv_hi, offset, win_left, win_right,
               CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALL_MASKED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query blocks that see keys [n0, n0 + BLOCK_N), in three runs: (m_lo, m_full, m_whole, m_hi), blocks
    [m_lo, m_full) masked, [m_full, m_whole) seeing the tile whole (no mask), [m_whole, m_hi) masked; the
    others see none of it. Without a window's left side m_whole = m_hi (the last run is empty).

    The causal diagonal and a window's right side start the rows (row i sees key j from i' + right >= j),
    a window's left side ends them (i' - left <= j). ALL_MASKED (documents, global positions) masks all."""
    m_end = tl.cdiv(T, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # rows below (n0 - offset) see none of the tile; rows from (n0 + BLOCK_N - 1 - offset) on see it whole
        m_lo = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    if HAS_RIGHT:
        m_lo = tl.maximum(m_lo, (tl.maximum(n0 - offset - win_right, 0) // BLOCK_M) * BLOCK_M)
        m_full = tl.maximum(m_full, tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset - win_right, 0), BLOCK_M) * BLOCK_M)
    m_hi = m_end
    if HAS_LEFT:  # rows past (n0 + BLOCK_N - 1 - offset + left) see none of the tile
        m_hi = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - offset + win_left, 0), BLOCK_M) * BLOCK_M, m_end)
    m_lo = tl.minimum(m_lo, m_hi)
    m_full = tl.minimum(m_full, m_hi)
    m_full = tl.where(n0 + BLOCK_N > kv_lo, m_hi, m_full)  # the key range cuts this tile: mask it all
    if ALL_MASKED:
        m_full = m_hi
    m_lo = tl.where(n0 >= kv_hi, m_hi, m_lo)  # no key of the tile is attended: dk = dv = 0
    m_full = tl.maximum(m_full, m_lo)
    m_whole = m_hi
    if HAS_LEFT:  # rows up to (n0 - offset + left) see the tile whole from the left
        m_whole = tl.maximum(tl.minimum((tl.maximum(n0 - offset + win_left + 1, 0) // BLOCK_M) * BLOCK_M, m_hi),
                             m_full)
    return m_lo, m_full, m_whole, m_hi


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse2, Delta, DK, DV, KeyLo, KeyHi, KeyMask,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_dt,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs, stride_mb,
    H, G, T, S, R, qk_scale2, scale,
    T_BUCKET, S_BUCKET,  # read by the autotuner's key only: a tile per length bucket
    # the variants (variants.launch_args): read only where their flag is on
    QDoc, KDoc, stride_qdb, stride_kdb, Slopes, stride_ab, Sinks, QPos, KPos, pos_offset,
    win_left, win_right, cap_in, cap_out2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    kv_lo, kv_hi = kv_bounds(KeyLo, KeyHi, b, S, HAS_LENGTHS)  # sequence b's keys [kv_lo, kv_hi)
    key_ok = cols < kv_hi  # keys from the key length on are never read
    if HAS_KEYMASK:
        key_ok = key_ok & (tl.load(KeyMask + b.to(tl.int64) * stride_mb + cols64, mask=key_ok, other=0) != 0)
    k = tl.load(K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
                + (cols64[:, None] * stride_ks + offs_d[None, :]),
                mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
                + (cols64[:, None] * stride_vs + offs_dv[None, :]),
                mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BLOCK_N, BLOCK_DV)

    offset = S - T  # query i sees keys j <= i + offset
    if HAS_POS:  # a shard's global positions: the window bounds no block, every block is masked
        m_lo, m_full, m_whole, m_hi = query_runs(n0, T, kv_lo, kv_hi, offset, win_left, win_right, CAUSAL,
                                                 False, False, True, BLOCK_M, BLOCK_N)
    else:
        m_lo, m_full, m_whole, m_hi = query_runs(n0, T, kv_lo, kv_hi, offset, win_left, win_right, CAUSAL,
                                                 HAS_LEFT, HAS_RIGHT, HAS_DOCS, BLOCK_M, BLOCK_N)
    kp, k_doc = key_side(n0, tl.arange(0, BLOCK_N), kv_hi, KDoc + b.to(tl.int64) * stride_kdb, KPos,
                         HAS_DOCS, HAS_POS)
    qdoc_base = QDoc + b.to(tl.int64) * stride_qdb

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for r in range(0, R):  # the query heads that share this kv head, in order: deterministic
        h = g * R + r
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        row_base = (b * H + h).to(tl.int64) * T
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + b.to(tl.int64) * stride_ab + h) * 1.4426950408889634  # base 2
        for m0 in range(m_lo, m_full, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, Lse2 + row_base, Delta + row_base, m0, cols, key_ok,
                                offs_m, offs_d, offs_dv, stride_qt, stride_dt, T, offset, qk_scale2,
                                HEAD_DIM, HEAD_DIM_V, True, CAUSAL, PRECISION,
                                kp, k_doc, qdoc_base, QPos, pos_offset, slope2, win_left, win_right, cap_in,
                                cap_out2, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
        for m0 in range(m_full, m_whole, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, Lse2 + row_base, Delta + row_base, m0, cols, key_ok,
                                offs_m, offs_d, offs_dv, stride_qt, stride_dt, T, offset, qk_scale2,
                                HEAD_DIM, HEAD_DIM_V, False, CAUSAL, PRECISION,
                                kp, k_doc, qdoc_base, QPos, pos_offset, slope2, win_left, win_right, cap_in,
                                cap_out2, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
        if HAS_LEFT:
            for m0 in range(m_whole, m_hi, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, Lse2 + row_base, Delta + row_base, m0, cols,
                                    key_ok, offs_m, offs_d, offs_dv, stride_qt, stride_dt, T, offset, qk_scale2,
                                    HEAD_DIM, HEAD_DIM_V, True, CAUSAL, PRECISION,
                                    kp, k_doc, qdoc_base, QPos, pos_offset, slope2, win_left, win_right, cap_in,
                                    cap_out2, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    dk = dk * scale  # the scores were scale * q·k

    tl.store(DK + b.to(tl.int64) * stride_dkb + g.to(tl.int64) * stride_dkh
             + (cols64[:, None] * stride_dks + offs_d[None, :]), dk.to(DK.dtype.element_ty),
             mask=(cols[:, None] < S) & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b.to(tl.int64) * stride_dvb + g.to(tl.int64) * stride_dvh
             + (cols64[:, None] * stride_dvs + offs_dv[None, :]), dv.to(DV.dtype.element_ty),
             mask=(cols[:, None] < S) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n,
    offs_m, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr,
    qa, q_doc, kdoc_base, kpos_base, slope2, win_left, win_right, cap_in, cap_out2,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr,
):
    cols = start_n + offs_n
    cols64 = cols.to(tl.int64)
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    if MASKED:
        key_ok = cols < kv_hi
        if HAS_KEYMASK:
            key_ok = key_ok & (tl.load(mask_base + cols64, mask=key_ok, other=0) != 0)
        k_mask = key_ok[:, None] & d_ok
        v_mask = key_ok[:, None] & dv_ok
    else:
        k_mask = d_ok
        v_mask = dv_ok
    k = tl.load(k_base + (cols64[:, None] * stride_ks + offs_d[None, :]), mask=k_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_base + (cols64[:, None] * stride_vs + offs_dv[None, :]), mask=v_mask,
                other=0.0)  # (BLOCK_N, BLOCK_DV)
    if SOFTCAP or HAS_ALIBI or HAS_LEFT or HAS_RIGHT or HAS_DOCS:
        kp, k_doc = key_side(start_n, offs_n, kv_hi, kdoc_base, kpos_base, HAS_DOCS, HAS_POS)
        qk, tanh_s = variant_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale2, qa[:, None],
                                    kp[None, :], slope2, cap_in, cap_out2, SOFTCAP, HAS_ALIBI)  # (BLOCK_M, BLOCK_N)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2  # (BLOCK_M, BLOCK_N)
    p = tl.exp2(qk - lse2[:, None])
    if MASKED:
        allowed = key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= offs_m[:, None] + offset)
        if HAS_LEFT or HAS_RIGHT or HAS_DOCS:
            allowed = variant_allowed(allowed, qa[:, None], kp[None, :], q_doc[:, None], k_doc[None, :],
                                      win_left, win_right, HAS_LEFT, HAS_RIGHT, HAS_DOCS)
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:  # through c · tanh(s / c): d raw = dS · (1 - tanh²)
        ds = ds * (1.0 - tanh_s * tanh_s)
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse2, Delta, DQ, KeyLo, KeyHi, KeyMask,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_dt,
    stride_dqb, stride_dqh, stride_dqt, stride_mb,
    H, T, S, R, qk_scale2, scale,
    T_BUCKET, S_BUCKET,  # read by the autotuner's key only: a tile per length bucket
    # the variants (variants.launch_args): read only where their flag is on
    QDoc, KDoc, stride_qdb, stride_kdb, Slopes, stride_ab, Sinks, QPos, KPos, pos_offset,
    win_left, win_right, cap_in, cap_out2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # heads and batch on grid axes 1 and 2: each may reach 65535
    b = tl.program_id(2)
    g = h // R
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows64 = offs_m.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    row_mask = offs_m < T
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + (rows64[:, None] * stride_qt + offs_d[None, :]),
                mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                 + (rows64[:, None] * stride_dt + offs_dv[None, :]),
                 mask=row_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BLOCK_M, BLOCK_DV)
    row = (b * H + h).to(tl.int64) * T + rows64
    lse2 = tl.load(Lse2 + row, mask=row_mask, other=float("inf"))
    delta = tl.load(Delta + row, mask=row_mask, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    mask_base = KeyMask + b.to(tl.int64) * stride_mb

    kv_lo, kv_hi = kv_bounds(KeyLo, KeyHi, b, S, HAS_LENGTHS)  # sequence b's keys [kv_lo, kv_hi)
    offset = S - T
    if HAS_POS:  # a shard's global positions: the window bounds no tile, every tile is masked
        lo, whole, full, hi = key_runs(m0, T, kv_lo, kv_hi, offset, win_left, win_right, CAUSAL, False, False,
                                       True, BLOCK_M, BLOCK_N)
    else:
        lo, whole, full, hi = key_runs(m0, T, kv_lo, kv_hi, offset, win_left, win_right, CAUSAL, HAS_LEFT,
                                       HAS_RIGHT, HAS_DOCS, BLOCK_M, BLOCK_N)
    qa, q_doc = query_side(offs_m, T, offset, QDoc + b.to(tl.int64) * stride_qdb, QPos, pos_offset,
                           HAS_DOCS, HAS_POS)
    kdoc_base = KDoc + b.to(tl.int64) * stride_kdb
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + b.to(tl.int64) * stride_ab + h) * 1.4426950408889634  # base 2

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_LEFT:
        for start_n in range(lo, whole, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n,
                          offs_m, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
                          HEAD_DIM, HEAD_DIM_V, True, CAUSAL, HAS_KEYMASK, PRECISION,
                          qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                          HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    for start_n in range(whole, full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n,
                      offs_m, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
                      HEAD_DIM, HEAD_DIM_V, False, CAUSAL, HAS_KEYMASK, PRECISION,
                      qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                      HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    for start_n in range(full, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n,
                      offs_m, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
                      HEAD_DIM, HEAD_DIM_V, True, CAUSAL, HAS_KEYMASK, PRECISION,
                      qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                      HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    dq = dq * scale

    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + (rows64[:, None] * stride_dqt + offs_d[None, :]), dq.to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


def _itemsize(named_args) -> int:
    q = named_args.get("Q")
    return q.element_size() if hasattr(q, "element_size") else 2


def _tile(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _pruner(kernel: str):
    def prune(candidates, named_args, **kwargs):
        """The tiles `configs.tiles` keeps for this head dim (compiled for sm_90a without spills)."""
        named_args = {**named_args, **kwargs}  # constexprs come as keyword arguments
        wanted = configs.tiles(kernel, named_args["BLOCK_D"], itemsize=_itemsize(named_args),
                               block_dv=named_args["BLOCK_DV"], variants=configs.has_variants(named_args))
        return [c for c in candidates if _tile(c) in wanted] or candidates[:1]
    return prune


def _autotuned(kernel: str, fn):
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for bm, bn, w, s in configs.all_tiles(kernel)],
        key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner(kernel)},
    )(fn)


# What changes the best tile; T_BUCKET and S_BUCKET are powers of two (`configs.length_bucket`).
AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "HAS_LENGTHS", "HAS_KEYMASK", "PRECISION",
                "T_BUCKET", "S_BUCKET", *variants.FLAGS]
# The compiled launches (the interpreter launches the kernels with the caller's tiles). dk/dv hold a key tile
# on chip and stream query blocks past it, dq the other way round.
_dkdv_launch = _autotuned("dkdv", _bwd_dkdv_kernel)
_dq_launch = _autotuned("dq", _bwd_dq_kernel)

_PRE_BLOCK_M = 64


def padded_dim(d: int) -> int:
    """The power of two (at least 16, tl.dot's smallest) that a head dim is padded to."""
    return max(16, triton.next_power_of_2(d))


def kernel_args(grad_out, q, k, v, lse2, delta, dq, dk, dv, keys, causal: bool, scale: float, precision: str,
                kv=None):
    """((dkdv args, dq args), constexprs) without the tiles: what the launches pass, and what
    benchmarks/triton_ptxas.py compiles ahead of time. keys: a `keys.KeyRange` or None;
    kv: the call's `variants.KernelVariants` or None (a plain call)."""
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    lo, hi, mask = (delta, delta, None) if keys is None else keys
    key_args = (lo, hi, mask if mask is not None else delta)
    stride_mb = mask.stride(0) if mask is not None else 0
    common = (q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    buckets = (configs.length_bucket(T), configs.length_bucket(S))
    extra = variants.launch_args(kv, scale, delta)
    dkdv = (q, k, v, grad_out, lse2, delta, dk, dv, *key_args, *common,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), stride_mb,
            H, G, T, S, H // G, scale * LOG2E, scale, *buckets, *extra)
    dq_args = (q, k, v, grad_out, lse2, delta, dq, *key_args, *common,
               dq.stride(0), dq.stride(1), dq.stride(2), stride_mb, H, T, S, H // G, scale * LOG2E, scale, *buckets,
               *extra)
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(Dv), CAUSAL=causal,
                HAS_LENGTHS=keys is not None, HAS_KEYMASK=mask is not None, PRECISION=precision,
                **variants.flags(kv, sinks=False))  # the lse holds the sinks' term: sinks alone run the plain code
    return (dkdv, dq_args), meta


def attention_backward(grad_out, q, k, v, out, lse, keys, causal: bool, scale: float, precision: str,
                       block_m: int | None = None, block_n: int | None = None, kv=None):
    """dq, dk, dv for out = attention(q, k, v); all of them (B, ·, ·, ·) with contiguous last dims.

    lse (B, H, T) float32 is the forward's (with sinks, their terms included: no sink is needed here);
    keys the forward's `keys.KeyRange` or None; kv its `variants.KernelVariants` or None.
    block_m / block_n pick the tiles in the interpreter (on a GPU the autotuner does).
    """
    B, H, T, _ = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _bwd_preprocess[(triton.cdiv(T, _PRE_BLOCK_M), H, B)](
        out, grad_out, lse, delta, lse2,
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        H, T, HEAD_DIM_V=Dv, BLOCK_DV=padded_dim(Dv), BLOCK_M=_PRE_BLOCK_M,
    )
    (dkdv_args, dq_args), meta = kernel_args(grad_out, q, k, v, lse2, delta, dq, dk, dv, keys, causal, scale,
                                             precision, kv)
    if INTERPRET:
        bm, bn = block_m or 32, block_n or 32
        _bwd_dkdv_kernel[(triton.cdiv(S, bn), G, B)](*dkdv_args, **meta, BLOCK_M=bm, BLOCK_N=bn)
        _bwd_dq_kernel[(triton.cdiv(T, bm), H, B)](*dq_args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        _dkdv_launch[lambda META: (triton.cdiv(S, META["BLOCK_N"]), G, B)](*dkdv_args, **meta)
        _dq_launch[lambda META: (triton.cdiv(T, META["BLOCK_M"]), H, B)](*dq_args, **meta)
    return dq, dk, dv
