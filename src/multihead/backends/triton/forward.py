"""The forward kernel: online softmax over key tiles, the logsumexp saved.

One program owns BLOCK_M queries of one (batch, head) and walks the key
tiles they may see, keeping per query a running maximum m, a running sum
of exponentials l and an unnormalised output acc (see `backends.chunked`
for the same algorithm in torch). Scores are taken in base 2: the scale is
multiplied by log2(e) once, so every exponential is one exp2.

The tiles fall into two runs. The first run holds the tiles that every
query of the block sees whole (below the causal diagonal and the key
length): no mask is computed there. The second run holds the tiles the
diagonal or the key length cuts: those are masked element by element.

    causal, T = S, BLOCK_M = BLOCK_N = 4 (offset 0)
              keys 0..3   4..7   8..11
    rows 8..11    full    full   masked    <- one masked tile per block
    rows 0..3     masked   -      -        <- tiles right of the diagonal are skipped

Which keys a sequence attends comes as a `keys.KeyRange` on the device: keys
below lo are attended whole (unmasked tiles), keys from hi on are never read
(so unwritten cache slots past a sequence's length cannot inject NaN), keys
in [lo, hi) are masked one by one. Every pointer offset built from a row or
key index times a stride is int64: a strided view larger than 2^31 elements
is addressed correctly.

The attention variants (backends/triton/variants.py) are constexpr flags, so a
plain call compiles to the code it had without them. Softcap and ALiBi change
every tile's scores (`variant_scores`); a sink starts each row's running sums
(m = sink, l = 1: one term of the denominator that attends to nothing). A
window moves the runs' bounds (`key_runs`): the tiles no row's window reaches
are skipped, those every row sees whole run unmasked, and a third run of
masked tiles holds the window's left edge:

    window (left 4, right 0), BLOCK_M = BLOCK_N = 4, T = S (offset 0)
              keys 0..3   4..7   8..11
    rows 8..11    -      masked  masked   <- keys 4..7: left edge; 8..11: diagonal
    rows 4..7   masked   masked    -

Documents are masked element by element in every tile their rows reach (no
tile is skipped for them: which tiles hold a row's document is not known
without reading the ids).

Grouped-query attention reads kv head h // R for query head h: k and v are
never copied per head. Head dims that are not powers of two are padded to
the next one inside the kernel (masked loads, zeros in the padding), which
changes no dot product.

An ordinary module: triton.jit decorates its kernels compiled or for the
interpreter as TRITON_INTERPRET says when it is imported;
`multihead.backends.triton.kernel_modules()` imports it in the mode triton
runs in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, variants

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e)


@triton.jit
def kv_bounds(KeyLo, KeyHi, b, S, HAS_LENGTHS: tl.constexpr):
    """Sequence b's key range (kv_lo, kv_hi) of S keys, clamped: a length outside [0, S] never addresses outside
    k and v. Without lengths: (S, S), every key real (kv_lo is where a padding-prefix mask starts, keys.py)."""
    if HAS_LENGTHS:
        kv_hi = tl.minimum(tl.maximum(tl.load(KeyHi + b), 0), S)
        kv_lo = tl.minimum(tl.maximum(tl.load(KeyLo + b), 0), kv_hi)
    else:
        kv_hi = S
        kv_lo = S
    return kv_lo, kv_hi


# How triton.jit made this module's kernels (it reads TRITON_INTERPRET as it decorates): for the interpreter
# (CPU tensors; launched with the caller's tiles) or compiled (autotuned).
INTERPRET = not isinstance(kv_bounds, triton.JITFunction)


@triton.jit
def tanh(x):
    """tanh in fp32 to about an ulp, from exp2 (the interpreter has no libdevice): an odd Taylor polynomial
    below |x| = 0.3, where (1 - e) / (1 + e) would lose digits to cancellation, that quotient above."""
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2|x|): -2 log2 e
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    return tl.where(a < 0.3, small, tl.where(x < 0, -big, big))


@triton.jit
def variant_scores(dot, qk_scale2, qa, kp, slope2, cap_in, cap_out2,
                   SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Base-2 scores from a tile of q·k: (qk, tanh) with the softcap c · tanh(scale · q·k / c) and the ALiBi
    bias -slope · |i' - j|, in that order. qa (aligned query positions), kp (key positions) and slope2
    (slope · log2 e) broadcast to the tile; tanh is for the softcap's backward (the raw dot without it)."""
    if SOFTCAP:
        t = tanh(dot * cap_in)
        qk = t * cap_out2
    else:
        t = dot
        qk = dot * qk_scale2
    if HAS_ALIBI:
        qk = qk - slope2 * tl.abs(qa - kp).to(tl.float32)
    return qk, t


@triton.jit
def variant_allowed(allowed, qa, kp, q_doc, k_doc, win_left, win_right,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr):
    """`allowed` narrowed by the window (i' - left <= j <= i' + right) and the documents (same id)."""
    if HAS_LEFT:
        allowed = allowed & (kp >= qa - win_left)
    if HAS_RIGHT:
        allowed = allowed & (kp <= qa + win_right)
    if HAS_DOCS:
        allowed = allowed & (q_doc == k_doc)
    return allowed


@triton.jit
def key_side(start_n, offs_n, kv_hi, kdoc_base, kpos_base, HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr):
    """A key tile's positions (global with HAS_POS, else the indices) and document ids (HAS_DOCS, else the
    indices: unused). Keys from kv_hi on are never read."""
    cols = start_n + offs_n
    cols64 = cols.to(tl.int64)
    kp = cols
    if HAS_POS:
        kp = tl.load(kpos_base + cols64, mask=cols < kv_hi, other=0)
    k_doc = cols
    if HAS_DOCS:
        k_doc = tl.load(kdoc_base + cols64, mask=cols < kv_hi, other=-1)
    return kp, k_doc


@triton.jit
def query_side(rows, T, offset, qdoc_base, qpos_base, pos_offset,
               HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr):
    """Query rows' aligned positions i' (global with HAS_POS) and document ids (HAS_DOCS, else unused)."""
    rows64 = rows.to(tl.int64)
    qa = rows + offset
    if HAS_POS:
        qa = tl.load(qpos_base + rows64, mask=rows < T, other=0) + pos_offset
    q_doc = rows
    if HAS_DOCS:
        q_doc = tl.load(qdoc_base + rows64, mask=rows < T, other=0)
    return qa, q_doc


@triton.jit
def attend_tile(
    acc, l_i, m_i, q, k_base, v_base, mask_base, start_n,
    query_pos, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset, qk_scale2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr,
    qa, q_doc, kdoc_base, kpos_base, slope2, win_left, win_right, cap_in, cap_out2,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DOCS: tl.constexpr, HAS_POS: tl.constexpr,
):
    """One key tile of the online softmax; query_pos (BLOCK_M,) is each row's query position (decode.py too).

    The variants: qa (BLOCK_M,) each row's aligned position i' (global with HAS_POS), q_doc its document,
    slope2 its ALiBi slope · log2 e (a scalar or (BLOCK_M,) broadcast as [:, None] by the caller);
    the window and the documents are applied in masked tiles only (the caller's runs say which)."""
    cols = start_n + offs_n  # (BLOCK_N,) key positions of this tile
    cols64 = cols.to(tl.int64)  # row index times a stride: int64, or a view past 2^31 elements wraps
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    if MASKED:
        key_ok = cols < kv_hi  # keys from the key length on are never read (an unwritten cache slot may be NaN)
        if HAS_KEYMASK:
            key_ok = key_ok & (tl.load(mask_base + cols64, mask=key_ok, other=0) != 0)
        k_mask = key_ok[:, None] & d_ok
        v_mask = key_ok[:, None] & dv_ok
    else:
        k_mask = d_ok
        v_mask = dv_ok
    k = tl.load(k_base + (cols64[:, None] * stride_ks + offs_d[None, :]), mask=k_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    if SOFTCAP or HAS_ALIBI or HAS_LEFT or HAS_RIGHT or HAS_DOCS:
        kp, k_doc = key_side(start_n, offs_n, kv_hi, kdoc_base, kpos_base, HAS_DOCS, HAS_POS)
        qk, _ = variant_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale2, qa[:, None],
                               kp[None, :], slope2, cap_in, cap_out2, SOFTCAP, HAS_ALIBI)  # (BLOCK_M, BLOCK_N)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2  # (BLOCK_M, BLOCK_N), base-2 scores
    if MASKED:
        allowed = key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= query_pos[:, None] + offset)  # bottom-right aligned
        if HAS_LEFT or HAS_RIGHT or HAS_DOCS:
            allowed = variant_allowed(allowed, qa[:, None], kp[None, :], q_doc[:, None], k_doc[None, :],
                                      win_left, win_right, HAS_LEFT, HAS_RIGHT, HAS_DOCS)
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no key yet keeps m = -inf; exp2(-inf - 0) = 0 instead of NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
    alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old maximum
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + (cols64[:, None] * stride_vs + offs_dv[None, :]), mask=v_mask,
                other=0.0)  # (BLOCK_N, BLOCK_DV)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # accumulates in place
    return acc, l_i, m_new


@triton.jit
def key_runs(m0, T, kv_lo, kv_hi, offset, win_left, win_right,
             CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALL_MASKED: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles of query rows [m0, m0 + BLOCK_M) in three runs: (lo, whole, full, hi), tiles
    [lo, whole) masked, [whole, full) seen whole by every row (no mask), [full, hi) masked; the tiles
    before lo and from hi on are seen by no row and skipped. Without a window lo = whole = 0.

    The causal diagonal and a window's right side end the run (the block's last row sees up to key
    last' + right, its first row sees whole every tile that ends at or before first' + right); a window's
    left side starts it (the first row sees from first' - left, the last row whole from last' - left).
    ALL_MASKED (documents, global positions) masks every tile the bounds leave."""
    if CAUSAL:
        # the block's last real row sees up to key (last + offset); its first row sees whole
        # every tile that ends at or before key (m0 + offset)
        hi = tl.minimum(kv_hi, tl.minimum(m0 + BLOCK_M, T) + offset)
        full = tl.minimum(kv_lo, m0 + offset + 1)
    else:
        hi = kv_hi
        full = kv_lo
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.minimum(m0 + BLOCK_M, T) + offset + win_right)
        full = tl.minimum(full, m0 + offset + win_right + 1)
    hi = tl.maximum(hi, 0)
    full = (tl.maximum(full, 0) // BLOCK_N) * BLOCK_N
    lo = 0
    whole = 0
    if HAS_LEFT:
        lo = (tl.maximum(m0 + offset - win_left, 0) // BLOCK_N) * BLOCK_N
        whole = tl.cdiv(tl.maximum(tl.minimum(m0 + BLOCK_M, T) - 1 + offset - win_left, 0), BLOCK_N) * BLOCK_N
        whole = tl.maximum(tl.minimum(whole, hi), lo)
        full = tl.maximum(full, whole)
    if ALL_MASKED:
        full = whole
    return lo, whole, full, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KeyLo, KeyHi, KeyMask,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_ot, stride_mb,
    H, T, S, R, qk_scale2,
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
    g = h // R  # grouped-query: the kv head this query head reads
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows64 = offs_m.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    mask_base = KeyMask + b.to(tl.int64) * stride_mb
    q = tl.load(q_base + (rows64[:, None] * stride_qt + offs_d[None, :]),
                mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, BLOCK_D)

    kv_lo, kv_hi = kv_bounds(KeyLo, KeyHi, b, S, HAS_LENGTHS)  # sequence b's keys [kv_lo, kv_hi)
    offset = S - T  # query i sees keys j <= i + offset
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

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_SINKS:  # the sink starts the running sums: one term exp(sink) in the denominator, no value
        m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(Sinks + h) * 1.4426950408889634
        l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if HAS_LEFT:
        for start_n in range(lo, whole, BLOCK_N):
            acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n,
                                        offs_m, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset,
                                        qk_scale2, HEAD_DIM, HEAD_DIM_V, True, CAUSAL, HAS_KEYMASK, PRECISION,
                                        qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                                        HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    for start_n in range(whole, full, BLOCK_N):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n,
                                  offs_m, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset,
                                  qk_scale2, HEAD_DIM, HEAD_DIM_V, False, CAUSAL, HAS_KEYMASK, PRECISION,
                                  qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                                  HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n,
                                  offs_m, offs_n, offs_d, offs_dv, stride_ks, stride_vs, kv_hi, offset,
                                  qk_scale2, HEAD_DIM, HEAD_DIM_V, True, CAUSAL, HAS_KEYMASK, PRECISION,
                                  qa, q_doc, kdoc_base, KPos, slope2, win_left, win_right, cap_in, cap_out2,
                                  HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DOCS, HAS_POS)

    # A row with no key has l = 0: output 0, lse = -inf (with a sink: output 0, lse = sink). A NaN row keeps its NaN.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    acc = acc / l_safe[:, None]
    # lse in natural log: (m + log2 l) is in base 2, times ln 2
    lse = tl.where(no_key, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + (rows64[:, None] * stride_ot + offs_dv[None, :]), acc.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + ((b * H + h).to(tl.int64) * T + rows64), lse, mask=offs_m < T)


def _itemsize(named_args) -> int:
    q = named_args.get("Q")
    return q.element_size() if hasattr(q, "element_size") else 2


def _tile(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _prune(candidates, named_args, **kwargs):
    """The tiles `configs.tiles` keeps for this head dim and these variants (compiled for sm_90a without spills)."""
    named_args = {**named_args, **kwargs}  # constexprs come as keyword arguments
    wanted = configs.tiles("forward", named_args["BLOCK_D"], itemsize=_itemsize(named_args),
                           block_dv=named_args["BLOCK_DV"], variants=configs.has_variants(named_args))
    return [c for c in candidates if _tile(c) in wanted] or candidates[:1]


# The autotuner's key: what changes the best tile. T_BUCKET and S_BUCKET are powers of two
# (`configs.length_bucket`), so a decode call and a 16k prefill each get their own tile.
AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "HAS_LENGTHS", "HAS_KEYMASK", "PRECISION",
                "T_BUCKET", "S_BUCKET", *variants.FLAGS]

# The compiled launch; the interpreter launches _fwd_kernel with the caller's tiles.
_fwd_launch = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s in configs.all_tiles("forward")],
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(_fwd_kernel)


def padded_dim(d: int) -> int:
    """The power of two (at least 16, tl.dot's smallest) that a head dim is padded to."""
    return max(16, triton.next_power_of_2(d))


def kernel_args(q, k, v, out, lse, keys, causal: bool, scale: float, precision: str, kv=None):
    """(args, constexprs) of `_fwd_kernel` without the tile: what a launch passes, and what
    benchmarks/triton_ptxas.py compiles ahead of time. keys: a `keys.KeyRange` or None;
    kv: the call's `variants.KernelVariants` or None (a plain call)."""
    B, H, T, D = q.shape
    G, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    lo, hi, mask = (lse, lse, None) if keys is None else keys
    args = (
        q, k, v, out, lse, lo, hi, mask if mask is not None else lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), mask.stride(0) if mask is not None else 0,
        H, T, S, H // G, scale * LOG2E, configs.length_bucket(T), configs.length_bucket(S),
        *variants.launch_args(kv, scale, lse),
    )
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(Dv), CAUSAL=causal,
                HAS_LENGTHS=keys is not None, HAS_KEYMASK=mask is not None, PRECISION=precision,
                **variants.flags(kv))
    return args, meta


def attention_forward(q, k, v, keys, causal: bool, scale: float, precision: str,
                      block_m: int | None = None, block_n: int | None = None, kv=None):
    """Launch the kernel. q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv), last dims contiguous;
    keys a `keys.KeyRange` (lo, hi, mask) or None (every key); kv a `variants.KernelVariants` or None.
    -> out (B, H, T, Dv), lse (B, H, T) float32 (with sinks, their terms included).
    precision: tl.dot's input_precision ("ieee" keeps fp32 products exact, "tf32" is faster).

    block_m / block_n pick the tiles in the interpreter (on a GPU the autotuner does).
    """
    B, H, T, _ = q.shape
    out = torch.empty((B, H, T, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    args, meta = kernel_args(q, k, v, out, lse, keys, causal, scale, precision, kv)
    if INTERPRET:
        bm, bn = block_m or 32, block_n or 32
        _fwd_kernel[(triton.cdiv(T, bm), H, B)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]), H, B)  # noqa: E731
        _fwd_launch[grid](*args, **meta)
    return out, lse
