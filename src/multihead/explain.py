"""The whiteboard: multi-head attention as a loop over heads, in NumPy float64.

This is the textbook computation, one head at a time, with every intermediate
kept so that a person can look at it:

    for each head i (of H):
        Q_i = X W_i^Q (+ b_i^Q)        (T, C)    @ (C, D)     -> (T, D)
        K_i = Y W_i^K (+ b_i^K)        (S, kdim) @ (kdim, D)  -> (S, D)
        V_i = Y W_i^V (+ b_i^V)        (S, vdim) @ (vdim, Dv) -> (S, Dv)
        scores = Q_i K_iᵀ              (T, S)
        scaled = scores / √D
        masked = scaled, with -inf where query t may not see key s
        weights = softmax(masked)      each row sums to 1 (a row with no key: 0)
        weights = dropout(weights)     optional: zero with prob p, keep * 1/(1-p)
        Z_i = weights V_i              (T, Dv)
    concat = [Z_1 | Z_2 | ... | Z_H]   (T, H·Dv)
    output = concat W^O (+ b^O)        (T, C_out)

Y is the key/value input; for self-attention it is X itself. With grouped-query
attention (G key/value heads, G < H) query head i reads key/value head
i // (H / G): several query heads ask their own questions of one shared set of
keys and values.

The batched `multihead.MultiHeadAttention` computes the same thing with all
heads stacked into one matrix; `check_against_module` runs both on the same
input and weights and reports how far apart they land.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._checks import probability

__all__ = [
    "AttentionWeights",
    "Check",
    "Explanation",
    "HeadTrace",
    "check_against_module",
    "explain",
    "explain_module",
    "split_columns",
    "weights_from_arrays",
    "weights_from_fused",
    "weights_from_module",
]

DEFAULT_TOL = 1e-12  # float64 loop vs batched: both round at ~1e-16; 1e-12 leaves room for sums of ~1e3 terms


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class AttentionWeights:
    """Every learned matrix of one attention layer, per head, in the X @ W orientation."""

    w_q: tuple[np.ndarray, ...]  # H matrices W_i^Q, each (C, D)
    w_k: tuple[np.ndarray, ...]  # G matrices W_g^K, each (kdim, D)
    w_v: tuple[np.ndarray, ...]  # G matrices W_g^V, each (vdim, Dv)
    w_o: np.ndarray  # W^O (H·Dv, C_out): rows i·Dv..(i+1)·Dv read head i's slot of the concatenation
    b_q: tuple[np.ndarray, ...] | None  # H biases (D,), or None
    b_k: tuple[np.ndarray, ...] | None  # G biases (D,), or None
    b_v: tuple[np.ndarray, ...] | None  # G biases (Dv,), or None
    b_o: np.ndarray | None  # (C_out,), or None

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
    """float64 NumPy copy of an array-like or a torch tensor (no torch import needed otherwise)."""
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
            f"got {type(mats).__name__}; use weights_from_fused for one stacked matrix"
        )
    if count is not None and len(mats) != count:
        raise ValueError(f"{name} has {len(mats)} matrices, {count} expected (one per head)")
    return list(mats)


def weights_from_arrays(
    w_q: Sequence, w_k: Sequence, w_v: Sequence, w_o, *,
    b_q: Sequence | None = None, b_k: Sequence | None = None, b_v: Sequence | None = None, b_o=None,
) -> AttentionWeights:
    """Per-head matrices as the seeds write them: w_q[i] = W_i^Q (C, D), etc.

    w_k and w_v hold one matrix per key/value head: H of them for plain
    multi-head attention, fewer (G, dividing H) for grouped-query attention.
    w_o is W^O (H·Dv, C_out). Biases are optional, each all-or-none.
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

    return AttentionWeights(
        q, k, v, o,
        biases("b_q", b_q, H, D, "(D,)"),
        biases("b_k", b_k, G, D, "(D,)"),
        biases("b_v", b_v, G, Dv, "(Dv,)"),
        None if b_o is None else _vector("b_o", b_o, o.shape[1], "(C_out,)"),
    )


def split_columns(name: str, w, parts: int) -> list[np.ndarray]:
    """W (rows, parts·width) -> [W_1 | W_2 | ... ]: `parts` blocks of `width` columns each.

    This is the seeds' split of one big W_q (d_in, d_out) into W_q1, W_q2, ...:
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


def weights_from_fused(
    w_q, w_k, w_v, w_o, num_heads: int, *, num_kv_heads: int | None = None,
    b_q=None, b_k=None, b_v=None, b_o=None,
) -> AttentionWeights:
    """One stacked matrix per role, split into heads by columns.

    w_q (C, H·D), w_k (kdim, G·D), w_v (vdim, G·Dv), w_o (H·Dv, C_out);
    biases (H·D,), (G·D,), (G·Dv,), (C_out,).
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    G = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(G, bool) or not isinstance(G, int) or G <= 0:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")

    def split(name, w, parts):
        return None if w is None else split_columns(name, w, parts)

    return weights_from_arrays(
        split("w_q", w_q, num_heads), split("w_k", w_k, G), split("w_v", w_v, G), w_o,
        b_q=split("b_q", b_q, num_heads), b_k=split("b_k", b_k, G), b_v=split("b_v", b_v, G), b_o=b_o,
    )


def weights_from_module(module) -> AttentionWeights:
    """The seeds' W_i^Q, W_i^K, W_i^V for every head, cut out by `module.head(i)`; plus W^O."""
    from .module import MultiHeadAttention  # torch is only needed on this path

    if not isinstance(module, MultiHeadAttention):
        raise TypeError(f"module must be a multihead.MultiHeadAttention, got {type(module).__name__}")
    cfg = module.config
    H, G = cfg.num_heads, cfg.num_kv_heads
    R = H // G
    heads = [module.head(i) for i in range(H)]
    kv_heads = [heads[g * R] for g in range(G)]  # query head g·R is the first reader of kv head g
    for g, hw in enumerate(kv_heads):
        if hw.kv_index != g:  # head(i) and this loop must agree on i // (H / G)
            raise RuntimeError(f"module.head({g * R}).kv_index is {hw.kv_index}, expected {g}")
    out = module.out_proj
    return weights_from_arrays(
        [hw.w_q for hw in heads],
        [hw.w_k for hw in kv_heads],
        [hw.w_v for hw in kv_heads],
        out.weight.detach().T,  # (C, H·Dv) -> (H·Dv, C): W^O in the concat @ W^O orientation
        b_q=None if heads[0].b_q is None else [hw.b_q for hw in heads],
        b_k=None if kv_heads[0].b_k is None else [hw.b_k for hw in kv_heads],
        b_v=None if kv_heads[0].b_v is None else [hw.b_v for hw in kv_heads],
        b_o=None if out.bias is None else out.bias.detach(),
    )


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class HeadTrace:
    """Everything head i computed, step by step."""

    index: int  # i, the query head
    kv_index: int  # the key/value head it read: i // (H / G)
    q: np.ndarray  # Q_i (T, D)
    k: np.ndarray  # K_i (S, D)
    v: np.ndarray  # V_i (S, Dv)
    scores: np.ndarray  # Q_i K_iᵀ (T, S)
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
    weights: AttentionWeights  # the matrices used
    causal: bool  # bottom-right aligned causal mask was applied
    key_mask: np.ndarray | None  # (S,) bool, True = a real token, or None
    dropout: float  # p; 0 means no dropout
    heads: tuple[HeadTrace, ...]  # H traces, in head order
    concat: np.ndarray  # [Z_1 | ... | Z_H] (T, H·Dv)
    output: np.ndarray  # concat W^O + b^O (T, C_out)

    @property
    def scale(self) -> float:
        """√D, what the scores are divided by."""
        return math.sqrt(self.weights.head_dim)


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
    query_pos = np.arange(T)[:, None]  # (T, 1)
    key_pos = np.arange(S)[None, :]  # (1, S)
    return key_pos <= query_pos + (S - T)  # (T, S)


def _safe_softmax(masked: np.ndarray) -> np.ndarray:
    """Row softmax; a row that is all -inf (no key to see) gives zeros instead of NaN."""
    if masked.shape[-1] == 0:
        return np.zeros_like(masked)
    row_max = masked.max(axis=-1, keepdims=True)  # (T, 1)
    row_max = np.where(np.isneginf(row_max), 0.0, row_max)  # exp(-inf - 0) = 0, no inf - inf
    e = np.exp(masked - row_max)  # largest entry of a row becomes exp(0) = 1: no overflow
    total = e.sum(axis=-1, keepdims=True)  # (T, 1)
    return e / np.where(total > 0, total, 1.0)


def explain(
    x, weights: AttentionWeights, *, key=None, value=None, causal: bool = False,
    key_mask=None, dropout: float = 0.0, rng: np.random.Generator | int | None = None,
) -> Explanation:
    """Run multi-head attention one head at a time on one sequence, keeping every step.

    x: (T, C) queries' input. key: (S, kdim), defaults to x. value: (S, vdim), defaults to key.
    causal: bottom-right aligned (query t sees keys s <= t + S - T).
    key_mask: (S,) bool, True = a real token; False keys are seen by no query.
    dropout: probability p of zeroing an attention weight; kept ones are scaled
        by 1 / (1 - p). rng (a numpy Generator or a seed) draws the keep masks,
        head by head.
    """
    if not isinstance(weights, AttentionWeights):
        raise TypeError(
            f"weights must be an AttentionWeights (see weights_from_module / weights_from_arrays), "
            f"got {type(weights).__name__}"
        )
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    probability("dropout", dropout)
    if key is None and value is not None:
        raise ValueError("value was given without key; pass key too (value alone is ambiguous)")
    X = _input("x", x, weights.d_model, "C")
    if key is None:  # self-attention: the keys and values are read from x itself
        if weights.kdim != weights.d_model or weights.vdim != weights.d_model:
            raise ValueError(
                f"key defaults to x, but kdim={weights.kdim}, vdim={weights.vdim} differ from "
                f"C={weights.d_model}; pass key (and value)"
            )
        Y_k = Y_v = X
    else:
        Y_k = _input("key", key, weights.kdim, "kdim")
        if value is None:
            if weights.vdim != weights.kdim:
                raise ValueError(f"value defaults to key, but vdim={weights.vdim} != kdim={weights.kdim}; pass value")
            Y_v = Y_k
        else:
            Y_v = _input("value", value, weights.vdim, "vdim")
    if Y_v.shape[0] != Y_k.shape[0]:
        raise ValueError(f"key (S, kdim) and value (S, vdim) must have the same S, got {Y_k.shape} and {Y_v.shape}")
    T, S = X.shape[0], Y_k.shape[0]
    mask = _key_mask(key_mask, S)
    generator = np.random.default_rng(rng) if dropout > 0.0 else None

    allowed = np.ones((T, S), dtype=bool)  # (T, S)
    if causal:
        allowed &= _causal(T, S)
    if mask is not None:
        allowed &= mask[None, :]  # (S,) -> (1, S): a padding key is hidden from every query
    _frozen(allowed)

    w = weights
    d_k = w.head_dim
    traces = []
    for i in range(w.num_heads):
        g = w.kv_index(i)
        Q = X @ w.w_q[i]  # (T, C) @ (C, D) -> (T, D)
        K = Y_k @ w.w_k[g]  # (S, kdim) @ (kdim, D) -> (S, D)
        V = Y_v @ w.w_v[g]  # (S, vdim) @ (vdim, Dv) -> (S, Dv)
        if w.b_q is not None:
            Q = Q + w.b_q[i]
        if w.b_k is not None:
            K = K + w.b_k[g]
        if w.b_v is not None:
            V = V + w.b_v[g]
        scores = Q @ K.T  # (T, D) @ (D, S) -> (T, S)
        scaled = scores / math.sqrt(d_k)
        masked = np.where(allowed, scaled, -np.inf)
        probs = _safe_softmax(masked)  # (T, S)
        if generator is not None:
            keep = generator.random((T, S)) >= dropout  # (T, S)
            dropped = probs * keep / (1.0 - dropout)
        else:
            keep, dropped = None, probs
        Z = dropped @ V  # (T, S) @ (S, Dv) -> (T, Dv)
        traces.append(HeadTrace(
            i, g, _frozen(Q), _frozen(K), _frozen(V), _frozen(scores), _frozen(scaled), allowed,
            _frozen(masked), _frozen(probs), None if keep is None else _frozen(keep), _frozen(dropped),
            _frozen(Z),
        ))

    concat = np.concatenate([t.z for t in traces], axis=1)  # H x (T, Dv) -> (T, H·Dv)
    output = concat @ w.w_o  # (T, H·Dv) @ (H·Dv, C_out) -> (T, C_out)
    if w.b_o is not None:
        output = output + w.b_o
    return Explanation(
        X, Y_k, Y_v, w, bool(causal), mask, float(dropout), tuple(traces), _frozen(concat), _frozen(output),
    )


def explain_module(module, x, *, key=None, value=None, key_mask=None,
                   dropout: float = 0.0, rng: np.random.Generator | int | None = None) -> Explanation:
    """`explain` with a MultiHeadAttention's weights and its causal setting."""
    return explain(
        x, weights_from_module(module), key=key, value=value, causal=module.config.causal,
        key_mask=key_mask, dropout=dropout, rng=rng,
    )


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Check:
    """The loop over heads against the batched module, same input, same weights, float64."""

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


def check_against_module(module, x, *, key=None, value=None, key_mask=None,
                         tol: float = DEFAULT_TOL) -> Check:
    """Run the loop and the batched module (a float64 copy, eval mode) on x; compare.

    Besides the output, the check compares the concatenation [Z_1|...|Z_H]
    with what the module feeds into W^O (caught with a hook), so a loop that
    put the heads in another order would fail even if W^O's rows were
    permuted to match, and the per-head softmax weights.
    """
    import torch

    from .module import MultiHeadAttention

    if not isinstance(module, MultiHeadAttention):
        raise TypeError(f"module must be a multihead.MultiHeadAttention, got {type(module).__name__}")
    explanation = explain_module(module, x, key=key, value=value, key_mask=key_mask)
    twin = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()  # leaves the caller's module alone

    def tensor(a: np.ndarray | None):
        return None if a is None else torch.from_numpy(np.array(a))[None]  # (len, width) -> (1, len, width)

    merged: list = []
    hook = twin.out_proj.register_forward_pre_hook(lambda mod, args: merged.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            q_in = tensor(explanation.x)
            k_in = None if key is None else tensor(explanation.key)
            v_in = None if value is None else tensor(explanation.value)
            km = tensor(explanation.key_mask)  # (S,) -> (1, S)
            out = twin(q_in, k_in, v_in, key_mask=km).output  # (1, T, C)
            merged_heads = merged[-1]  # (1, T, H·Dv)
            probs = twin(q_in, k_in, v_in, key_mask=km, need_weights=True).weights  # (1, H, T, S)
    finally:
        hook.remove()

    module_output = out[0].numpy()  # (1, T, C) -> (T, C)
    module_concat = merged_heads[0].numpy()  # (1, T, H·Dv) -> (T, H·Dv)
    module_probs = probs[0].numpy()  # (1, H, T, S) -> (H, T, S)
    loop_probs = np.stack([t.weights for t in explanation.heads])  # H x (T, S) -> (H, T, S)
    return Check(
        output_diff=_max_abs(explanation.output, module_output),
        concat_diff=_max_abs(explanation.concat, module_concat),
        weights_diff=_max_abs(loop_probs, module_probs),
        tol=float(tol),
        explanation=explanation,
        module_output=_frozen(module_output.copy()),
    )
