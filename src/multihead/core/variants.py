"""The attention family: what turns q·kᵀ·scale into the scores a model's softmax sees.

One formula, in one order, on every backend (docs/design.md, "The attention family"):

    s = q kᵀ · scale
    s = softcap · tanh(s / softcap)                      softcap=c         (Gemma-2, Grok)
    s = s - slope_h · |i' - j|                            alibi_slopes      (flash-attn's convention)
    s = score_mod(s, b, h, q_idx, kv_idx)                 score_mod         (FlexAttention's signature)
    s = -inf where the window or the documents rule key j out for query i
    s = the call's attn_mask and causal, as ever
    p = exp(s - lse),  lse = log(sum_j exp(s_j) + exp(sink_h))    sinks  (gpt-oss)

i' = i + S - T is the query's position aligned bottom-right, as `causal`
aligns it. A window (left, right) lets query i see keys j with
i' - left <= j <= i' + right (None: no limit on that side), so causal is the
window (None, 0). Documents give each token an id; a query sees only keys of
its own document. A sink is one more logit per head in the softmax's
denominator that attends to nothing: the weights of the real keys then sum
to less than 1.

`Variants` holds them, checked once by `check_variants` (called from
`multihead.core.call.make_call`); a call without any has `variants=None`,
and nothing below pays for them. `modify` applies the first five lines to a
tile of scores, for any tile of query rows and keys: the reference backend
gives it the whole (T, S) matrix, the chunked backend and the weights on
demand one tile at a time, and a context-parallel shard its own global
positions (`Positions`).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import types
from typing import Callable, NamedTuple

import torch
from torch import Tensor

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]  # (score, b, h, q_idx, kv_idx) -> score


class Positions(NamedTuple):
    """Where a call's queries and keys sit in a longer sequence (a context-parallel shard's call).

    Without it (None), query i is at position i of T and key j at j of S. The
    window, ALiBi and score_mod's q_idx / kv_idx read these positions, so a
    shard computes exactly what its block of the whole attention would.
    """

    queries: Tensor  # (T,) int64 global query positions
    keys: Tensor  # (S,) int64 global key positions
    offset: int  # S_total - T_total: the bottom-right alignment of the whole attention


class Variants(NamedTuple):
    """The checked variants of one call; each None when not asked for."""

    window: tuple[int | None, int | None] | None  # (left, right) keys each side of i'; None = no limit
    softcap: float | None  # c of c · tanh(s / c), > 0
    alibi_slopes: Tensor | None  # (B|1, H) float32 at least: bias -slope · |i' - j|
    sinks: Tensor | None  # (H,) one extra logit per head in the softmax's denominator; may require grad
    q_documents: Tensor | None  # (B, T) int64 document id of each query
    kv_documents: Tensor | None  # (B, S) int64 document id of each key
    score_mod: ScoreMod | None  # (score, b, h, q_idx, kv_idx) -> score, broadcasting tensor ops
    positions: Positions | None = None  # global positions of a shard's call; None = 0..T-1, 0..S-1

    def masks_keys(self) -> bool:
        """Whether the window, the documents or a score_mod (returning -inf) may rule keys out, so that rows
        may be left with no key."""
        return self.window is not None or self.q_documents is not None or self.score_mod is not None

    def captured(self) -> tuple[Tensor, ...]:
        """The tensors a gradient may flow to besides q, k, v: sinks, ALiBi slopes, what score_mod captures."""
        found = [x for x in (self.sinks, self.alibi_slopes) if x is not None]
        return tuple(found) + captured_tensors(self.score_mod)


def captured_tensors(fn, depth: int = 0) -> tuple[Tensor, ...]:
    """The tensors a score_mod reads besides its arguments: closure cells, globals it names, defaults,
    partial arguments, a module's parameters and buffers, and those of the modules and functions it holds
    (`self` in a closure, a score_mod built from others), up to `_DEPTH` levels down. Gradients reach these
    (the chunked backend's backward).

    Under torch.compile none are looked for (empty): dynamo cannot read closure cells (reading one breaks
    its later call of the function, and a function made inside the compiled code hides them), and it
    differentiates what the traced score_mod reads itself, where the chunked backend does not run it
    (`ChunkedBackend.supports`)."""
    if fn is None or torch.compiler.is_compiling():
        return ()
    unique: dict[int, Tensor] = {}
    for value in _read_by(fn):
        if isinstance(value, Tensor):
            unique.setdefault(id(value), value)
        elif depth < _DEPTH and isinstance(value, (torch.nn.Module, *_FUNCTIONS)):
            for x in captured_tensors(value, depth + 1):
                unique.setdefault(id(x), x)
    return tuple(unique.values())


_DEPTH = 3  # how far down the functions and modules a score_mod holds are searched (and a recursion stops)
_FUNCTIONS = (types.FunctionType, types.MethodType, functools.partial)  # what is searched for tensors in turn


def _read_by(fn) -> list:
    """What fn holds, one level down: closure cells, defaults, the globals its code names, a partial's
    function and arguments, a module's parameters and buffers, a bound method's module."""
    values: list = []
    if isinstance(fn, torch.nn.Module):
        values += list(fn.parameters()) + list(fn.buffers())
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None:
        values += list(getattr(fn, "args", ())) + list(getattr(fn, "keywords", {}).values()) + [inner]
    code_owner = getattr(fn, "__func__", fn)  # a bound method's function
    values += [cell.cell_contents for cell in (getattr(code_owner, "__closure__", None) or ())
               if _cell_filled(cell)]
    values += list(getattr(code_owner, "__defaults__", None) or ())
    code, names = getattr(code_owner, "__code__", None), getattr(code_owner, "__globals__", {})
    if code is not None:
        values += [names[name] for name in code.co_names if name in names]
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        values.append(owner)
    return values


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell (a name assigned after the closure was made)
        return False
    return True


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's fixed slopes (H,) float32: the geometric sequence 2^(-8 i / n), i = 1..n, for the n = 2^k <= H
    heads, then every other term of the sequence for 2n for the rest (Press et al.'s recipe, as BLOOM builds it).
    """
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * i / n) for i in range(1, 2 * (num_heads - n), 2)]  # odd terms of the 2n sequence
    return torch.tensor(slopes, dtype=torch.float32)


# ---- the checks, once, where the call is made


WINDOW_LIMIT = 2 ** 62  # a side's largest value: positions are int64, and i' ± side must not overflow


def check_window(window) -> tuple[int | None, int | None] | None:
    """(left, right), each an int in [0, WINDOW_LIMIT] or None (no limit); None for no window."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be (left, right), each an int >= 0 or None (no limit), got {window!r}")
    for side, value in zip(("left", "right"), window):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                  or not 0 <= value <= WINDOW_LIMIT):
            raise ValueError(f"window's {side} must be an int >= 0 (at most 2**62) or None (no limit), "
                             f"got {value!r} in window={tuple(window)!r}")
    return tuple(None if value is None else int(value) for value in window)


def check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a finite number > 0 or None, got {type(softcap).__name__} {softcap!r}")
    if not 0 < softcap < math.inf:
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    return float(softcap)


def check_alibi(slopes, B: int, H: int, device: torch.device) -> Tensor | None:
    """(H,) or (B, H) floating slopes on q's device -> (B|1, H), float32 at least."""
    if slopes is None:
        return None
    _floating_tensor("alibi_slopes", slopes, "(H,) or (B, H)", device)
    if slopes.dim() == 1 and slopes.shape[0] == H:
        slopes = slopes[None]  # (H,) -> (1, H)
    if slopes.dim() != 2 or tuple(slopes.shape) not in ((B, H), (1, H)):
        raise ValueError(f"alibi_slopes must be (H,) = ({H},) or (B, H) = ({B}, {H}), got {tuple(slopes.shape)}")
    return slopes.to(torch.promote_types(slopes.dtype, torch.float32))


def check_sinks(sinks, H: int, device: torch.device) -> Tensor | None:
    if sinks is None:
        return None
    _floating_tensor("sinks", sinks, "(H,)", device)
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be (H,) = ({H},), one logit per query head, got {tuple(sinks.shape)}")
    return sinks


def check_documents(documents, B: int, T: int, S: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """One (B, T) tensor when T == S, or (queries (B, T), keys (B, S)): integer ids -> two int64 tensors."""
    if documents is None:
        return None, None
    if isinstance(documents, Tensor):
        if T != S:
            raise ValueError(f"documents: one (B, T) tensor needs T == S, got T={T}, S={S}; "
                             f"pass (query ids (B, T), key ids (B, S))")
        documents = (documents, documents)
    if not isinstance(documents, (tuple, list)) or len(documents) != 2:
        raise TypeError(f"documents must be a (B, T) integer tensor or a pair (query ids (B, T), key ids (B, S)), "
                        f"got {type(documents).__name__}")
    checked = []
    for name, ids, length in (("query", documents[0], T), ("key", documents[1], S)):
        if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
            raise TypeError(f"documents: the {name} ids must be an integer tensor, got {got}")
        if tuple(ids.shape) != (B, length):
            raise ValueError(f"documents: the {name} ids must be (B, {'T' if name == 'query' else 'S'}) = "
                             f"({B}, {length}), got {tuple(ids.shape)}")
        if ids.device != device:
            raise ValueError(f"documents are on {ids.device} but q is on {device}; move them to one device")
        checked.append(ids.long())
    return checked[0], checked[1]


def check_score_mod(score_mod) -> ScoreMod | None:
    """A callable that takes the five arguments (checked from its signature where Python can read one;
    not under torch.compile, where dynamo would trace the inspection)."""
    if score_mod is None:
        return None
    if not callable(score_mod):
        raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score, "
                        f"got {type(score_mod).__name__}")
    if not torch.compiler.is_compiling():
        try:
            signature = inspect.signature(score_mod)
        except (TypeError, ValueError):  # a builtin or an extension type: Python cannot tell, the call will
            return score_mod
        try:
            signature.bind(*range(5))
        except TypeError as error:
            raise TypeError(f"score_mod must take five arguments (score, b, h, q_idx, kv_idx), "
                            f"got {getattr(score_mod, '__name__', type(score_mod).__name__)}{signature}: "
                            f"{error}") from None
    return score_mod


def _floating_tensor(name: str, x, dims: str, device: torch.device) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a floating torch.Tensor {dims}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating {dims}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; move them to one device")


def check_variants(q: Tensor, S: int, *, window=None, softcap=None, alibi_slopes=None, sinks=None,
                   documents=None, score_mod=None) -> Variants | None:
    """The variants of a call checked against q (B, H, T, D) and S keys; None when none is asked for."""
    if (window is None and softcap is None and alibi_slopes is None and sinks is None and documents is None
            and score_mod is None):
        return None
    B, H, T = q.shape[0], q.shape[1], q.shape[2]
    q_docs, kv_docs = check_documents(documents, B, T, S, q.device)
    return Variants(check_window(window), check_softcap(softcap), check_alibi(alibi_slopes, B, H, q.device),
                    check_sinks(sinks, H, q.device), q_docs, kv_docs, check_score_mod(score_mod))


# ---- the formula, on any tile


class Tile(NamedTuple):
    """Which scores a tile holds: query rows and keys (local indices into the call), and the heads."""

    rows: Tensor  # (t,) int64 query indices in [0, T)
    keys: Tensor  # (s,) int64 key indices in [0, S)
    heads: Tensor | None  # (h,) int64 query heads of the tile's dim 1; None = all H in order


def modify(scores: Tensor, variants: Variants, tile: Tile, T: int, S: int, *, in_place: bool = False) -> Tensor:
    """scores (B, h, t, s) after softcap, ALiBi, score_mod and the window/documents masks (-inf).

    The scores are already multiplied by the scale; a new tensor is returned
    (autograd can go back through it to the raw scores and what score_mod captures),
    or, with in_place, the scores' own buffer is worked in where it can be (the
    same numbers without a new (B, h, t, s) tensor per step; only where autograd
    does not record the scores).
    """
    q_pos, k_pos, offset = _global(variants.positions, tile, T, S)
    aligned = q_pos + offset  # (t,) i' = i + S - T
    if variants.softcap is not None:
        c = variants.softcap
        scores = scores.div_(c).tanh_().mul_(c) if in_place else torch.tanh(scores / c) * c
    if variants.alibi_slopes is not None:
        slopes = variants.alibi_slopes if tile.heads is None else variants.alibi_slopes[:, tile.heads]  # (B|1, h)
        slopes = slopes.to(scores.dtype)[:, :, None, None]  # (B|1, h, 1, 1) in the compute dtype
        distance = (aligned[:, None] - k_pos[None, :]).abs().to(scores.dtype)  # (t, s)
        if in_place:  # scores - slope · distance in one pass, no (B, h, t, s) bias
            scores = torch.addcmul(scores, slopes, distance, value=-1.0, out=scores)
        else:
            scores = scores - slopes * distance  # (B|1, h, 1, 1) * (t, s) -> (B, h, t, s)
    if variants.score_mod is not None:
        scores = _score_mod(scores, variants.score_mod, tile, q_pos, k_pos)
    allowed = allowed_keys(variants, tile, T, S)
    if allowed is not None:
        # not into what a score_mod returned: it may be a view of something else, or an expanded one
        fill = scores.masked_fill_ if in_place and variants.score_mod is None else scores.masked_fill
        scores = fill(allowed.logical_not(), float("-inf"))
    return scores


def allowed_keys(variants: Variants, tile: Tile, T: int, S: int) -> Tensor | None:
    """Where the window and the documents let a query see a key: (t, s) or (B, 1, t, s) bool; None = everywhere."""
    q_pos, k_pos, offset = _global(variants.positions, tile, T, S)
    allowed = None
    if variants.window is not None:
        allowed = window_allowed(variants.window, q_pos + offset, k_pos)  # (t, s), around i' = i + offset
    if variants.q_documents is not None:
        same = (variants.q_documents[:, tile.rows, None] == variants.kv_documents[:, None, tile.keys])  # (B, t, s)
        same = same[:, None]  # (B, t, s) -> (B, 1, t, s)
        allowed = same if allowed is None else same & allowed
    return allowed


def window_allowed(window: tuple[int | None, int | None], query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """Where a window lets queries at absolute positions (..., t) see keys at positions (s,): (..., t, s) bool.

    For callers whose queries and keys sit at positions of their own per sequence (a KV cache's,
    `ChunkLayout.key_positions`), folded into the mask they already hold instead of aligned bottom-right.
    key_positions broadcasts against (..., t, s).
    """
    left, right = window
    delta = key_positions - query_positions[..., None]  # (..., t, s): j - p
    allowed = torch.ones_like(delta, dtype=torch.bool)
    if left is not None:
        allowed = allowed & (delta >= -left)
    if right is not None:
        allowed = allowed & (delta <= right)
    return allowed


def _global(positions: Positions | None, tile: Tile, T: int, S: int) -> tuple[Tensor, Tensor, int]:
    """The tile's query and key positions in the whole attention, and its bottom-right offset."""
    if positions is None:
        return tile.rows, tile.keys, S - T
    return positions.queries[tile.rows], positions.keys[tile.keys], positions.offset


def _score_mod(scores: Tensor, score_mod: ScoreMod, tile: Tile, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """score_mod with FlexAttention's broadcasting indices: b (B,1,1,1), h (1,h,1,1), q_idx (1,1,t,1), kv_idx (1,1,1,s)."""
    B, h = scores.shape[0], scores.shape[1]
    device = scores.device
    b = torch.arange(B, device=device).view(B, 1, 1, 1)  # (B, 1, 1, 1)
    heads = torch.arange(h, device=device) if tile.heads is None else tile.heads
    modified = score_mod(scores, b, heads.view(1, h, 1, 1), q_pos.view(1, 1, -1, 1), k_pos.view(1, 1, 1, -1))
    if not isinstance(modified, Tensor) or modified.shape != scores.shape:
        got = tuple(modified.shape) if isinstance(modified, Tensor) else type(modified).__name__
        raise ValueError(f"score_mod must return a tensor of the score's shape {tuple(scores.shape)}, got {got}")
    if not modified.dtype.is_floating_point:  # a bool or int result would be taken as scores of 0 and 1
        raise TypeError(f"score_mod must return floating scores (a mask is -inf where a key is ruled out), "
                        f"got {modified.dtype}")
    return modified.to(scores.dtype)


def with_sinks(lse: Tensor, sinks: Tensor | None, heads: Tensor | None = None) -> Tensor:
    """The logsumexp of the real keys (B, h, t) with each head's sink term added: log(exp(lse) + exp(sink_h))."""
    if sinks is None:
        return lse
    sink = (sinks if heads is None else sinks[heads]).to(lse.dtype)  # (h,)
    return torch.logaddexp(lse, sink[None, :, None])  # (B, h, t)


def sink_in(out: Tensor, lse: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each head's sink joins every row's denominator once, after the keys: (out', lse').

    out (B, H, T, Dv) and lse (B, H, T) are the real keys'; lse' = log(exp(lse) + exp(sink_h)) and
    out' = out · exp(lse - lse'), out's dtype kept. A row with no key gets the sink alone, and output 0;
    so does a row with no key and a sink of -inf (lse' = -inf: the factor is 0, not exp(-inf + inf)).
    """
    if sinks is None:
        return out, lse
    total = with_sinks(lse, sinks.detach())  # (B, H, T)
    empty = total == float("-inf")  # (B, H, T): no key and a sink of -inf
    factor = torch.where(empty, torch.zeros_like(total), torch.exp(lse - total))  # (B, H, T)
    scaled = out.to(total.dtype) * factor.unsqueeze(-1)  # (B, H, T) -> (B, H, T, 1)
    return scaled.to(out.dtype), total


def sink_gradient(sinks: Tensor, lse: Tensor, grad_out: Tensor, out: Tensor) -> Tensor:
    """d loss / d sink_h = -sum over rows of exp(sink_h - lse) · rowsum(dO ∘ out): (H,) in sinks' dtype.

    lse (B, H, T) is the full denominator's (sink included) and out the output it gave; a row whose lse is
    -inf (a sink of -inf and no key) adds 0.
    """
    acc = lse.dtype
    delta = (grad_out.to(acc) * out.to(acc)).sum(dim=-1)  # (B, H, T, Dv) -> (B, H, T)
    sink = sinks.detach().to(acc)[None, :, None]  # (H,) -> (1, H, 1)
    p_sink = torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.exp(sink - lse))  # (B, H, T)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)  # (H,)


def full_tile(T: int, S: int, device: torch.device) -> Tile:
    """The tile of every query and key, in order: what the reference formula computes at once."""
    return Tile(torch.arange(T, device=device), torch.arange(S, device=device), None)


__all__ = ["Positions", "ScoreMod", "Tile", "Variants", "alibi_slopes", "allowed_keys", "captured_tensors", "check_variants",
           "full_tile", "modify", "sink_gradient", "sink_in", "window_allowed", "with_sinks"]
