"""The whiteboard: multi-head attention as a loop over heads, in NumPy float64.

This is the textbook computation, one head at a time, with every intermediate
kept so that a person can look at it:

    for each head i (of H):
        Q_i = X W_i^Q (+ b_i^Q)        (T, C)    @ (C, D)     -> (T, D)
        K_i = Y W_i^K (+ b_i^K)        (S, kdim) @ (kdim, D)  -> (S, D)
        V_i = Y W_i^V (+ b_i^V)        (S, vdim) @ (vdim, Dv) -> (S, Dv)
        Q_i, K_i turned by RoPE        optional (Projections.rope_base): row m's pairs by m·θ_j
        scores = Q_i K_iᵀ              (T, S)
        scaled = scores / √D
        masked = scaled, with -inf where query t may not see key s
        weights = softmax(masked)      each row sums to 1 (a row with no key: 0)
        dropped = dropout(weights)     optional: zero with prob p, keep * 1/(1-p)
        Z_i = dropped V_i              (T, Dv)
    concat = [Z_1 | Z_2 | ... | Z_H]   (T, H·Dv)
    output = concat W^O (+ b^O)        (T, C_out)

Y is the key/value input; for self-attention it is X itself. With grouped-query
attention (G key/value heads, G < H) query head i reads key/value head
i // (H / G): several query heads ask their own questions of one shared set of
keys and values.

Words: the learned matrices W_i^Q, W_i^K, W_i^V and W^O are the layer's
*projections* (`Projections`); *weights* always means the softmax
probabilities, the attention weights of each head.

The batched `multihead.MultiHeadAttention` computes the same thing with all
heads stacked into one matrix; `check_against_module` runs both on the same
input and projections and reports how far apart they land.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..core.checks import probability

__all__ = [
    "Check",
    "Explanation",
    "HeadTrace",
    "Projections",
    "check_against_module",
    "explain",
    "explain_module",
    "projections_from_arrays",
    "projections_from_fused",
    "projections_from_module",
    "split_columns",
]

DEFAULT_TOL = 1e-12  # float64 loop vs batched: both round at ~1e-16; 1e-12 leaves room for sums of ~1e3 terms


# --------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class Projections:
    """Every learned matrix of one attention layer, per head, in the X @ W orientation.

    These are the projections W_i^Q, W_i^K, W_i^V and W^O, the layer's learned
    parameters; the attention weights are something else, the softmax
    probabilities that `explain` computes with them. rope_base, when
    set, turns Q_i and K_i by a rotary position embedding right after their
    projection, so it belongs to how queries and keys are made.
    """

    w_q: tuple[np.ndarray, ...]  # H matrices W_i^Q, each (C, D)
    w_k: tuple[np.ndarray, ...]  # G matrices W_g^K, each (kdim, D)
    w_v: tuple[np.ndarray, ...]  # G matrices W_g^V, each (vdim, Dv)
    w_o: np.ndarray  # W^O (H·Dv, C_out): rows i·Dv..(i+1)·Dv read head i's slot of the concatenation
    b_q: tuple[np.ndarray, ...] | None  # H biases (D,), or None
    b_k: tuple[np.ndarray, ...] | None  # G biases (D,), or None
    b_v: tuple[np.ndarray, ...] | None  # G biases (Dv,), or None
    b_o: np.ndarray | None  # (C_out,), or None
    # RoPE, as `multihead.nn.rope.RotaryEmbedding(D, base=rope_base)`: pair j = (j, j + D/2) of the
    # row at position m turns by m·θ_j, θ_j = rope_base^(-2j/D); None: no rotation.
    rope_base: float | None = None

    @property
    def num_heads(self) -> int:  # H
        return len(self.w_q)

    @property
    def num_kv_heads(self) -> int:  # G
        return len(self.w_k)

    @property
    def head_dim(self) -> int:  # D = d_k
        return self.w_q[0].shape[1]

    @property
    def v_head_dim(self) -> int:  # Dv = d_v
        return self.w_v[0].shape[1]

    @property
    def d_model(self) -> int:  # C, the width of the query input
        return self.w_q[0].shape[0]

    @property
    def kdim(self) -> int:
        return self.w_k[0].shape[0]

    @property
    def vdim(self) -> int:
        return self.w_v[0].shape[0]

    @property
    def d_out(self) -> int:  # width of the layer's output (C for MultiHeadAttention)
        return self.w_o.shape[1]

    def kv_index(self, i: int) -> int:
        """The key/value head that query head i reads: i // (H / G)."""
        return i // (self.num_heads // self.num_kv_heads)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # the record is a snapshot: an edit would silently desync it
    return a


def _matrix(name: str, a, shape: tuple[int | None, int | None], dims: str) -> np.ndarray:
    """a float64 copy of `a`, checked to be 2-D with the given sizes (None = any)."""
    arr = _to_numpy(name, a)
    if arr.ndim != 2:
        raise ValueError(f"{name} has {arr.ndim} dims, {dims} expected, got {arr.shape}")
    for axis, want in enumerate(shape):
        if want is not None and arr.shape[axis] != want:
            raise ValueError(f"{name} must be {dims} with {dims[1:-1].split(', ')[axis]}={want}, got {arr.shape}")
    return _frozen(arr)


def _vector(name: str, a, size: int, dims: str) -> np.ndarray:
    arr = _to_numpy(name, a)
    if arr.shape != (size,):
        raise ValueError(f"{name} must be {dims} = ({size},), got {arr.shape}")
    return _frozen(arr)


def _to_numpy(name: str, a) -> np.ndarray:
    """float64 NumPy copy of an array-like or a torch tensor (recognised by its methods, not its type)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch.Tensor
        a = a.detach().cpu().double().numpy()
    try:
        arr = np.array(a, dtype=np.float64)  # always a copy: later edits to `a` do not reach us
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array, got {type(a).__name__}") from exc
    return arr


def _per_head(name: str, mats, count: int | None) -> list:
    if isinstance(mats, np.ndarray) or not isinstance(mats, Sequence) or len(mats) == 0:
        raise TypeError(
            f"{name} must be a non-empty list of per-head matrices (one per head), "
            f"got {type(mats).__name__}; use projections_from_fused for one stacked matrix"
        )
    if count is not None and len(mats) != count:
        raise ValueError(f"{name} has {len(mats)} matrices, {count} expected (one per head)")
    return list(mats)


def _rope_base(rope_base, D: int) -> float | None:
    """None, or a finite base > 1 for a head dim D that is even (RoPE turns pairs of dims)."""
    if rope_base is None:
        return None
    is_number = isinstance(rope_base, (int, float)) and not isinstance(rope_base, bool)
    if not is_number or not math.isfinite(rope_base) or rope_base <= 1:
        raise ValueError(f"rope_base must be None or a finite number > 1 (10000.0 in Llama), got {rope_base!r}")
    if D % 2 != 0:
        raise ValueError(f"rope_base needs an even head dim D (RoPE turns pairs of dims), got D={D}")
    return float(rope_base)


def projections_from_arrays(
    w_q: Sequence, w_k: Sequence, w_v: Sequence, w_o, *,
    b_q: Sequence | None = None, b_k: Sequence | None = None, b_v: Sequence | None = None, b_o=None,
    rope_base: float | None = None,
) -> Projections:
    """Per-head matrices as the textbook writes them: w_q[i] = W_i^Q (C, D), etc.

    w_k and w_v hold one matrix per key/value head: H of them for plain
    multi-head attention, fewer (G, dividing H) for grouped-query attention.
    w_o is W^O (H·Dv, C_out). Biases are optional, each all-or-none.
    rope_base: turn Q_i and K_i by a rotary position embedding of this base
    (see `Projections.rope_base`); None for none.
    """
    w_q = _per_head("w_q", w_q, None)
    H = len(w_q)
    first = _matrix("w_q[0]", w_q[0], (None, None), "(C, D)")
    C, D = first.shape
    q = tuple(_matrix(f"w_q[{i}]", m, (C, D), "(C, D)") for i, m in enumerate(w_q))
    w_k = _per_head("w_k", w_k, None)
    G = len(w_k)
    if H % G != 0:
        raise ValueError(f"w_q has H={H} heads but w_k has G={G}; H must be a multiple of G")
    w_v = _per_head("w_v", w_v, G)
    kdim = _matrix("w_k[0]", w_k[0], (None, D), "(kdim, D)").shape[0]
    k = tuple(_matrix(f"w_k[{g}]", m, (kdim, D), "(kdim, D)") for g, m in enumerate(w_k))
    vdim, Dv = _matrix("w_v[0]", w_v[0], (None, None), "(vdim, Dv)").shape
    v = tuple(_matrix(f"w_v[{g}]", m, (vdim, Dv), "(vdim, Dv)") for g, m in enumerate(w_v))
    o = _matrix("w_o", w_o, (H * Dv, None), "(H·Dv, C_out)")

    def biases(name, bs, count, size, dims):
        if bs is None:
            return None
        bs = _per_head(name, bs, count)
        return tuple(_vector(f"{name}[{j}]", b, size, dims) for j, b in enumerate(bs))

    return Projections(
        q, k, v, o,
        biases("b_q", b_q, H, D, "(D,)"),
        biases("b_k", b_k, G, D, "(D,)"),
        biases("b_v", b_v, G, Dv, "(Dv,)"),
        None if b_o is None else _vector("b_o", b_o, o.shape[1], "(C_out,)"),
        _rope_base(rope_base, D),
    )


def split_columns(name: str, w, parts: int) -> list[np.ndarray]:
    """W (rows, parts·width) -> [W_1 | W_2 | ... ]: `parts` blocks of `width` columns each.

    This is the textbook's split of one big W_q (d_in, d_out) into W_q1, W_q2, ...:
    X W_q computed once and cut into column blocks equals X W_qi for every i.
    Works on a bias vector (parts·width,) too.
    """
    arr = _to_numpy(name, w)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} has {arr.ndim} dims, (rows, cols) or (cols,) expected, got {arr.shape}")
    cols = arr.shape[-1]
    if cols % parts != 0:
        raise ValueError(f"{name} has {cols} columns, not divisible into {parts} heads, got {arr.shape}")
    width = cols // parts
    return [arr[..., j * width:(j + 1) * width] for j in range(parts)]  # (rows, parts·w) -> parts x (rows, w)


def projections_from_fused(
    w_q, w_k, w_v, w_o, num_heads: int, *, num_kv_heads: int | None = None,
    b_q=None, b_k=None, b_v=None, b_o=None, rope_base: float | None = None,
) -> Projections:
    """One stacked matrix per role, split into heads by columns.

    w_q (C, H·D), w_k (kdim, G·D), w_v (vdim, G·Dv), w_o (H·Dv, C_out);
    biases (H·D,), (G·D,), (G·Dv,), (C_out,); rope_base as in `projections_from_arrays`.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    G = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(G, bool) or not isinstance(G, int) or G <= 0:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")

    def split(name, w, parts):
        return None if w is None else split_columns(name, w, parts)

    return projections_from_arrays(
        split("w_q", w_q, num_heads), split("w_k", w_k, G), split("w_v", w_v, G), w_o,
        b_q=split("b_q", b_q, num_heads), b_k=split("b_k", b_k, G), b_v=split("b_v", b_v, G), b_o=b_o,
        rope_base=rope_base,
    )


def projections_from_module(module) -> Projections:
    """W_i^Q, W_i^K, W_i^V for every head, cut out by `module.head(i)`; W^O; the module's rotary embedding.

    The module's `rope` comes along as rope_base. Its `causal` is a setting of
    the call, not of the matrices: `explain_module` (and `check_against_module`)
    pass it on; a direct `explain(x, projections)` takes causal=... itself.
    """
    from ..nn.mha import MultiHeadAttention  # imported on use: the NumPy loop itself needs no torch layer

    if not isinstance(module, MultiHeadAttention):
        raise TypeError(f"module must be a multihead.MultiHeadAttention, got {type(module).__name__}")
    cfg = module.config
    H, G = cfg.num_heads, cfg.num_kv_heads
    R = H // G
    heads = [module.head(i) for i in range(H)]
    kv_heads = [heads[g * R] for g in range(G)]  # query head g·R is the first reader of kv head g
    for g, hp in enumerate(kv_heads):
        if hp.kv_index != g:  # head(i) and this loop must agree on i // (H / G)
            raise RuntimeError(f"module.head({g * R}).kv_index is {hp.kv_index}, expected {g}")
    out = module.out_proj
    return projections_from_arrays(
        [hp.w_q for hp in heads],
        [hp.w_k for hp in kv_heads],
        [hp.w_v for hp in kv_heads],
        out.weight.detach().T,  # (C, H·Dv) -> (H·Dv, C): W^O in the concat @ W^O orientation
        b_q=None if heads[0].b_q is None else [hp.b_q for hp in heads],
        b_k=None if kv_heads[0].b_k is None else [hp.b_k for hp in kv_heads],
        b_v=None if kv_heads[0].b_v is None else [hp.b_v for hp in kv_heads],
        b_o=None if out.bias is None else out.bias.detach(),
        rope_base=_module_rope_base(module),
    )


def _module_rope_base(module) -> float | None:
    """The base of module.rope, or None; a rotary embedding this file cannot redo is refused, not ignored."""
    from ..nn.rope import RotaryEmbedding

    rope = module.rope
    if rope is None:
        return None
    if type(rope) is not RotaryEmbedding:
        raise TypeError(
            f"module.rope is a {type(rope).__name__}; explain redoes multihead.nn.rope.RotaryEmbedding itself "
            f"(θ_j = base^(-2j/D), half-split pairs) and cannot tell what a subclass changes"
        )
    return rope.base


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class HeadTrace:
    """Everything head i computed, step by step."""

    index: int  # i, the query head
    kv_index: int  # the key/value head it read: i // (H / G)
    q: np.ndarray  # Q_i = X W_i^Q (+ b) (T, D)
    k: np.ndarray  # K_i = Y W_g^K (+ b) (S, D)
    v: np.ndarray  # V_i = Y W_g^V (+ b) (S, Dv)
    q_rotated: np.ndarray  # Q_i turned by RoPE, row m by the angles m·θ_j (T, D); `q` itself without RoPE
    k_rotated: np.ndarray  # K_i turned likewise (S, D); `k` itself without RoPE
    scores: np.ndarray  # q_rotated k_rotatedᵀ (T, S)
    scaled: np.ndarray  # scores / √D (T, S)
    allowed: np.ndarray  # (T, S) bool, True where query t may attend to key s
    masked: np.ndarray  # scaled with -inf where not allowed (T, S)
    weights: np.ndarray  # softmax(masked) (T, S): attended rows sum to 1, rows with no key are 0
    keep: np.ndarray | None  # (T, S) bool dropout keep mask, None without dropout
    dropped: np.ndarray  # weights after dropout, keep * weights / (1 - p); `weights` itself when p = 0
    z: np.ndarray  # Z_i = dropped V_i (T, Dv)


@dataclass(frozen=True)
class Explanation:
    """The whole walkthrough: inputs, one trace per head, the concatenation and the output."""

    x: np.ndarray  # X (T, C), the queries' input
    key: np.ndarray  # Y (S, kdim), the keys' input (X for self-attention)
    value: np.ndarray  # (S, vdim), the values' input (X for self-attention)
    projections: Projections  # the matrices used (and the RoPE base, if any)
    causal: bool  # bottom-right aligned causal mask was applied
    key_mask: np.ndarray | None  # (S,) bool, True = a real token, or None
    dropout: float  # p; 0 means no dropout
    rope_angles: np.ndarray | None  # (T, D/2) m·θ_j: the angle of pair j at position m; None without RoPE
    heads: tuple[HeadTrace, ...]  # H traces, in head order
    concat: np.ndarray  # [Z_1 | ... | Z_H] (T, H·Dv)
    output: np.ndarray  # concat W^O + b^O (T, C_out)

    @property
    def scale(self) -> float:
        """√D, what the scores are divided by."""
        return math.sqrt(self.projections.head_dim)


def _input(name: str, a, width: int, width_name: str) -> np.ndarray:
    arr = _to_numpy(name, a)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} has {arr.ndim} dims, (tokens, {width_name}={width}) expected, got {arr.shape}"
            + ("; pass one sequence, e.g. x[0]" if arr.ndim == 3 else "")
        )
    if arr.shape[1] != width:
        raise ValueError(f"{name} has width {arr.shape[1]}, {width_name}={width} expected, got {arr.shape}")
    return _frozen(arr)


def _key_mask(key_mask, S: int) -> np.ndarray | None:
    if key_mask is None:
        return None
    if hasattr(key_mask, "detach") and hasattr(key_mask, "cpu"):
        key_mask = key_mask.detach().cpu().numpy()
    arr = np.array(key_mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"key_mask must be bool (S,), True = a real token, got dtype {arr.dtype}")
    if arr.shape != (S,):
        raise ValueError(f"key_mask must be (S,) = ({S},), True = a real token, got {arr.shape}")
    return _frozen(arr)


def _causal(T: int, S: int) -> np.ndarray:
    """Bottom-right aligned, as in `multihead.masks`: query t sees keys s <= t + (S - T)."""
    query_pos = np.arange(T)[:, None]  # (T,) -> (T, 1)
    key_pos = np.arange(S)[None, :]  # (S,) -> (1, S)
    return key_pos <= query_pos + (S - T)  # (T, 1) vs (1, S) -> (T, S)


def _safe_softmax(masked: np.ndarray) -> np.ndarray:
    """Row softmax; a row that is all -inf (no key to see) gives zeros instead of NaN."""
    if masked.shape[-1] == 0:
        return np.zeros_like(masked)
    row_max = masked.max(axis=-1, keepdims=True)  # (T, S) -> (T, 1)
    row_max = np.where(np.isneginf(row_max), 0.0, row_max)  # exp(-inf - 0) = 0, no inf - inf
    e = np.exp(masked - row_max)  # largest entry of a row becomes exp(0) = 1: no overflow
    total = e.sum(axis=-1, keepdims=True)  # (T, S) -> (T, 1)
    return e / np.where(total > 0, total, 1.0)


def _rope_angles(T: int, D: int, base: float) -> np.ndarray:
    """m·θ_j for the positions m = 0..T-1 and the pairs j < D/2, θ_j = base^(-2j/D), in float64."""
    theta = 1.0 / base ** (np.arange(0, D, 2) / D)  # (D/2,)
    return np.arange(T)[:, None] * theta[None, :]  # (T, 1) * (1, D/2) -> (T, D/2)


def _rotate(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """RoPE, half-split as in `multihead.nn.rope`: pair j = (x_j, x_{j+D/2}) of row m turns by angles[m, j]."""
    half = x.shape[1] // 2
    first, second = x[:, :half], x[:, half:]  # (T, D) -> 2 x (T, D/2)
    cos, sin = np.cos(angles), np.sin(angles)  # (T, D/2) each
    # (a + j·b) · e^{jφ} = (a cos φ - b sin φ) + j·(b cos φ + a sin φ)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=1)  # -> (T, D)


def _check_call(projections, causal, dropout, key, value) -> None:
    """The settings of an `explain` call, checked before anything is computed."""
    if not isinstance(projections, Projections):
        raise TypeError(
            f"projections must be a Projections (see projections_from_module / projections_from_arrays), "
            f"got {type(projections).__name__}"
        )
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    probability("dropout", dropout)
    if key is None and value is not None:
        raise ValueError("value was given without key; pass key too (value alone is ambiguous)")
    if projections.rope_base is not None and key is not None:
        raise ValueError(
            f"projections turn Q and K by RoPE (rope_base={projections.rope_base}), which puts queries and keys "
            f"at the positions 0..T-1 of one sequence: self-attention only, leave key and value None"
        )


def _inputs(proj: Projections, x, key, value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X (T, C) and the keys' and values' inputs (S, kdim), (S, vdim); key defaults to x, value to key."""
    X = _input("x", x, proj.d_model, "C")
    if key is None:  # self-attention: the keys and values are read from x itself
        if proj.kdim != proj.d_model or proj.vdim != proj.d_model:
            raise ValueError(
                f"key defaults to x, but kdim={proj.kdim}, vdim={proj.vdim} differ from "
                f"C={proj.d_model}; pass key (and value)"
            )
        return X, X, X
    Y_k = _input("key", key, proj.kdim, "kdim")
    if value is None:
        if proj.vdim != proj.kdim:
            raise ValueError(f"value defaults to key, but vdim={proj.vdim} != kdim={proj.kdim}; pass value")
        Y_v = Y_k
    else:
        Y_v = _input("value", value, proj.vdim, "vdim")
    if Y_v.shape[0] != Y_k.shape[0]:
        raise ValueError(f"key (S, kdim) and value (S, vdim) must have the same S, got {Y_k.shape} and {Y_v.shape}")
    return X, Y_k, Y_v


def _allowed(T: int, S: int, causal: bool, key_mask: np.ndarray | None) -> np.ndarray:
    """(T, S) bool, True where query t may attend to key s: the causal mask and the key mask together."""
    allowed = np.ones((T, S), dtype=bool)  # (T, S)
    if causal:
        allowed &= _causal(T, S)
    if key_mask is not None:
        allowed &= key_mask[None, :]  # (S,) -> (1, S): a padding key is hidden from every query
    return _frozen(allowed)


def _project(proj: Projections, i: int, X, Y_k, Y_v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q_i, K_i, V_i: the inputs times query head i's and its key/value head's matrices, plus the biases."""
    g = proj.kv_index(i)
    Q = X @ proj.w_q[i]  # (T, C) @ (C, D) -> (T, D)
    K = Y_k @ proj.w_k[g]  # (S, kdim) @ (kdim, D) -> (S, D)
    V = Y_v @ proj.w_v[g]  # (S, vdim) @ (vdim, Dv) -> (S, Dv)
    if proj.b_q is not None:
        Q = Q + proj.b_q[i]
    if proj.b_k is not None:
        K = K + proj.b_k[g]
    if proj.b_v is not None:
        V = V + proj.b_v[g]
    return Q, K, V


def _dropout(probs: np.ndarray, p: float, generator: np.random.Generator | None):
    """(keep, dropped): each weight kept with probability 1 - p, kept ones scaled by 1 / (1 - p).

    Without a generator (p = 0) nothing is dropped: (None, probs).
    """
    if generator is None:
        return None, probs
    keep = generator.random(probs.shape) >= p  # (T, S)
    return keep, probs * keep / (1.0 - p)


def _head_trace(proj: Projections, i: int, X, Y_k, Y_v, angles, allowed, dropout: float, generator) -> HeadTrace:
    """Head i, step by step: project, turn (RoPE), score, scale, mask, softmax, dropout, weigh the values."""
    Q, K, V = _project(proj, i, X, Y_k, Y_v)
    Q_rot, K_rot = (Q, K) if angles is None else (_rotate(Q, angles), _rotate(K, angles))
    scores = Q_rot @ K_rot.T  # (T, D) @ (D, S) -> (T, S)
    scaled = scores / math.sqrt(proj.head_dim)
    masked = np.where(allowed, scaled, -np.inf)
    probs = _safe_softmax(masked)  # (T, S)
    keep, dropped = _dropout(probs, dropout, generator)
    Z = dropped @ V  # (T, S) @ (S, Dv) -> (T, Dv)
    return HeadTrace(
        index=i, kv_index=proj.kv_index(i), q=_frozen(Q), k=_frozen(K), v=_frozen(V),
        q_rotated=_frozen(Q_rot), k_rotated=_frozen(K_rot), scores=_frozen(scores), scaled=_frozen(scaled),
        allowed=allowed, masked=_frozen(masked), weights=_frozen(probs),
        keep=None if keep is None else _frozen(keep), dropped=_frozen(dropped), z=_frozen(Z),
    )


def _merge(proj: Projections, heads: tuple[HeadTrace, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The concatenation [Z_1 | ... | Z_H] and the output concat W^O + b^O."""
    concat = np.concatenate([h.z for h in heads], axis=1)  # H x (T, Dv) -> (T, H·Dv)
    output = concat @ proj.w_o  # (T, H·Dv) @ (H·Dv, C_out) -> (T, C_out)
    if proj.b_o is not None:
        output = output + proj.b_o
    return _frozen(concat), _frozen(output)


def explain(
    x, projections: Projections, *, key=None, value=None, causal: bool = False,
    key_mask=None, dropout: float = 0.0, rng: np.random.Generator | int | None = None,
) -> Explanation:
    """Run multi-head attention one head at a time on one sequence, keeping every step.

    x: (T, C) queries' input. projections: the layer's matrices (`projections_from_module`,
    `projections_from_arrays`, `projections_from_fused`); with their rope_base set,
    Q_i and K_i are turned by RoPE at the positions 0..T-1 (self-attention only).
    key: (S, kdim), defaults to x. value: (S, vdim), defaults to key.
    causal: bottom-right aligned (query t sees keys s <= t + S - T).
    key_mask: (S,) bool, True = a real token; False keys are seen by no query.
    dropout: probability p of zeroing an attention weight; kept ones are scaled
        by 1 / (1 - p). rng (a numpy Generator or a random seed) draws the keep
        masks, head by head.
    """
    _check_call(projections, causal, dropout, key, value)
    proj = projections
    X, Y_k, Y_v = _inputs(proj, x, key, value)
    T, S = X.shape[0], Y_k.shape[0]
    key_mask = _key_mask(key_mask, S)
    allowed = _allowed(T, S, bool(causal), key_mask)
    angles = None if proj.rope_base is None else _frozen(_rope_angles(T, proj.head_dim, proj.rope_base))
    generator = np.random.default_rng(rng) if dropout > 0.0 else None
    heads = tuple(
        _head_trace(proj, i, X, Y_k, Y_v, angles, allowed, dropout, generator) for i in range(proj.num_heads)
    )
    concat, output = _merge(proj, heads)
    return Explanation(
        x=X, key=Y_k, value=Y_v, projections=proj, causal=bool(causal), key_mask=key_mask, dropout=float(dropout),
        rope_angles=angles, heads=heads, concat=concat, output=output,
    )


def explain_module(module, x, *, key=None, value=None, key_mask=None,
                   dropout: float = 0.0, rng: np.random.Generator | int | None = None) -> Explanation:
    """`explain` with a MultiHeadAttention's projections, its rotary embedding and its causal setting."""
    return explain(
        x, projections_from_module(module), key=key, value=value, causal=module.config.causal,
        key_mask=key_mask, dropout=dropout, rng=rng,
    )


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Check:
    """The loop over heads against the batched module, same input, same projections, float64."""

    output_diff: float  # max |loop output - module output|
    concat_diff: float  # max |loop [Z_1|...|Z_H] - the module's merged heads (W^O's input)|
    weights_diff: float  # max |loop softmax weights - module's per-head weights|
    tol: float  # the tolerance `passed` uses
    explanation: Explanation  # the loop's full record
    module_output: np.ndarray  # the batched module's output (T, C)

    @property
    def max_abs_diff(self) -> float:
        return max(self.output_diff, self.concat_diff, self.weights_diff)

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff <= self.tol)  # NaN compares False: fails

    def __str__(self) -> str:
        verdict = "agree" if self.passed else "DISAGREE"
        return (f"loop vs batched module: max |difference| = {self.max_abs_diff:.3e} "
                f"(tolerance {self.tol:.0e}): {verdict}")


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|; NaN on either side gives NaN, which no tolerance passes."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: loop {a.shape} vs module {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _run_batched(module, explanation: Explanation, key_given: bool, value_given: bool):
    """A float64 eval copy of the module on the explanation's inputs: (output, merged heads, weights).

    The merged heads (T, H·Dv) are what the module feeds into W^O, caught with a hook.
    """
    import torch

    twin = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()  # leaves the caller's module alone

    def tensor(a: np.ndarray | None):
        return None if a is None else torch.from_numpy(np.array(a))[None]  # (len, width) -> (1, len, width)

    merged: list = []
    hook = twin.out_proj.register_forward_pre_hook(lambda mod, args: merged.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            q_in = tensor(explanation.x)
            k_in = tensor(explanation.key) if key_given else None
            v_in = tensor(explanation.value) if value_given else None
            km = tensor(explanation.key_mask)  # (S,) -> (1, S)
            out = twin(q_in, k_in, v_in, key_mask=km).output  # (1, T, C)
            merged_heads = merged[-1]  # (1, T, H·Dv)
            probs = twin(q_in, k_in, v_in, key_mask=km, need_weights=True).weights  # (1, H, T, S)
    finally:
        hook.remove()
    return (
        out[0].numpy(),  # (1, T, C) -> (T, C)
        merged_heads[0].numpy(),  # (1, T, H·Dv) -> (T, H·Dv)
        probs[0].numpy(),  # (1, H, T, S) -> (H, T, S)
    )


def check_against_module(module, x, *, key=None, value=None, key_mask=None,
                         tol: float = DEFAULT_TOL) -> Check:
    """Run the loop and the batched module (a float64 copy, eval mode) on x; compare.

    Besides the output, the check compares the concatenation [Z_1|...|Z_H]
    with what the module feeds into W^O (caught with a hook), so a loop that
    put the heads in another order would fail even if W^O's rows were
    permuted to match, and the per-head softmax weights. The loop uses the
    module's causal setting and rotary embedding, as the module does.
    """
    from ..nn.mha import MultiHeadAttention

    if not isinstance(module, MultiHeadAttention):
        raise TypeError(f"module must be a multihead.MultiHeadAttention, got {type(module).__name__}")
    explanation = explain_module(module, x, key=key, value=value, key_mask=key_mask)
    module_output, module_concat, module_probs = _run_batched(module, explanation, key is not None, value is not None)
    loop_probs = np.stack([t.weights for t in explanation.heads])  # H x (T, S) -> (H, T, S)
    return Check(
        output_diff=_max_abs(explanation.output, module_output),
        concat_diff=_max_abs(explanation.concat, module_concat),
        weights_diff=_max_abs(loop_probs, module_probs),
        tol=float(tol),
        explanation=explanation,
        module_output=_frozen(module_output.copy()),
    )
