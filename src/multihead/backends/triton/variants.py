"""The attention variants as the kernels take them: runtime arguments and constexpr flags.

A call's `core.variants.Variants` (window, softcap, ALiBi, sinks, documents, and a
context-parallel shard's global positions) becomes `KernelVariants`, tensors on the
device in the dtypes the kernels read, and `launch_args` turns it into the arguments
appended after each kernel's own and the constexpr flags that switch each variant's
code on:

    HAS_LEFT, HAS_RIGHT   window (left, right) around i' = i + S - T   keys outside are masked,
                                                                        tiles outside skipped
    SOFTCAP               s -> c · tanh(s / c)                          after the scale
    HAS_ALIBI             s -> s - slope_h · |i' - j|                   after the softcap
    HAS_SINKS             exp(sink_h) in the softmax's denominator     forward / merge only
    HAS_DOCS              q_doc[i] == kv_doc[j]                         masked in the kernel
    HAS_POS               i', j read from the shard's positions        window and ALiBi only

A plain call passes `launch_args(None, ...)`: every flag False, so the kernels compile to
the code they had before the variants existed (the extra arguments are never read).
Nothing here imports triton, and nothing reads a tensor's value on the host.

The backward needs no sink: the saved logsumexp already counts it, so P = exp(s - lse) is
the probability of each real key. The sinks' gradient, -sum over rows of
exp(sink_h - lse) · rowsum(dO ∘ out), is computed in torch (`multihead.core.variants.sink_gradient`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ...core.variants import Variants

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e)
WINDOW_CAP = 1 << 30  # a window side wider than any call's positions: one int32 argument, no overflow
FLAGS = ("HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "HAS_ALIBI", "HAS_SINKS", "HAS_DOCS", "HAS_POS")


class KernelVariants(NamedTuple):
    """A call's variants on the device, ready for the kernels; a field is None when not asked for."""

    left: int | None  # keys each query sees before i' (window); None: no limit
    right: int | None  # keys after i'; None: no limit
    softcap: float | None  # c of c · tanh(s / c)
    slopes: Tensor | None  # (B|1, H) float32 contiguous ALiBi slopes
    sinks: Tensor | None  # (H,) float32 contiguous sink logits (natural log)
    q_docs: Tensor | None  # (B, T) int64 contiguous document ids of the queries
    kv_docs: Tensor | None  # (B, S) int64 contiguous document ids of the keys
    q_pos: Tensor | None  # (T,) int64 global query positions (a shard's call), for the window and ALiBi
    k_pos: Tensor | None  # (S,) int64 global key positions
    pos_offset: int  # i' = q_pos + pos_offset with positions; unused without

    @property
    def masks_keys(self) -> bool:
        """Whether the window or the documents rule keys out (every tile they touch is masked)."""
        return self.left is not None or self.right is not None or self.q_docs is not None


def refusal(variants: Variants, grad_enabled: bool) -> str | None:
    """None if the kernels compute these variants, else why not (one line). Reads no tensor's value."""
    if variants.score_mod is not None:
        return ("a score_mod is an arbitrary Python callable, which cannot run inside a compiled kernel; "
                "the triton kernels take window, softcap, ALiBi, sinks and documents")
    slopes = variants.alibi_slopes
    if slopes is not None and slopes.requires_grad and grad_enabled:
        return "ALiBi slopes that require grad: their gradient is not in the triton kernels (chunked computes it)"
    return None


def prepare(variants: Variants | None) -> KernelVariants | None:
    """The checked variants as the kernels read them (score_mod refused before this); None for a plain call."""
    if variants is None:
        return None
    left, right = variants.window if variants.window is not None else (None, None)
    slopes = None
    if variants.alibi_slopes is not None:
        slopes = variants.alibi_slopes.detach().to(torch.float32).contiguous()  # (B|1, H)
    sinks = None if variants.sinks is None else variants.sinks.detach().to(torch.float32).contiguous()  # (H,)
    q_docs = kv_docs = None
    if variants.q_documents is not None:
        q_docs, kv_docs = variants.q_documents.contiguous(), variants.kv_documents.contiguous()  # (B, T), (B, S)
    q_pos = k_pos = None
    offset = 0
    positions = variants.positions
    if positions is not None and (variants.window is not None or slopes is not None):  # documents are local
        q_pos, k_pos, offset = positions.queries.contiguous(), positions.keys.contiguous(), int(positions.offset)
    return KernelVariants(left, right, variants.softcap, slopes, sinks, q_docs, kv_docs, q_pos, k_pos, offset)


def flags(kv: KernelVariants | None, sinks: bool = True) -> dict:
    """The constexpr flags of a launch: all False for a plain call. sinks=False for the kernels that never
    see a sink (the backward's, the decode's split), so that sinks alone launch their plain code."""
    if kv is None:
        return dict.fromkeys(FLAGS, False)
    return dict(HAS_LEFT=kv.left is not None, HAS_RIGHT=kv.right is not None, SOFTCAP=kv.softcap is not None,
                HAS_ALIBI=kv.slopes is not None, HAS_SINKS=sinks and kv.sinks is not None,
                HAS_DOCS=kv.q_docs is not None, HAS_POS=kv.q_pos is not None)


def launch_args(kv: KernelVariants | None, scale: float, dummy: Tensor) -> tuple:
    """The runtime arguments every kernel takes after its own, in this order:

    QDoc, KDoc, stride_qdb, stride_kdb, Slopes, stride_ab, Sinks, QPos, KPos, pos_offset,
    win_left, win_right, cap_in, cap_out2

    cap_in = scale / c multiplies q·k before the tanh, cap_out2 = c · log2 e after it (base-2
    scores). Absent tensors are `dummy` (never read: their flag is False).
    """
    if kv is None:
        return (dummy, dummy, 0, 0, dummy, 0, dummy, dummy, dummy, 0, 0, 0, 0.0, 0.0)
    q_docs = dummy if kv.q_docs is None else kv.q_docs
    kv_docs = dummy if kv.kv_docs is None else kv.kv_docs
    slopes = dummy if kv.slopes is None else kv.slopes
    stride_ab = 0 if kv.slopes is None or kv.slopes.shape[0] == 1 else kv.slopes.stride(0)
    cap_in, cap_out2 = (0.0, 0.0) if kv.softcap is None else (scale / kv.softcap, kv.softcap * LOG2E)
    return (q_docs, kv_docs, q_docs.stride(0) if kv.q_docs is not None else 0,
            kv_docs.stride(0) if kv.kv_docs is not None else 0, slopes, stride_ab,
            dummy if kv.sinks is None else kv.sinks, dummy if kv.q_pos is None else kv.q_pos,
            dummy if kv.k_pos is None else kv.k_pos, kv.pos_offset,
            _window_side(kv.left), _window_side(kv.right), cap_in, cap_out2)


def _window_side(keys: int | None) -> int:
    """A window side as an int32 kernel argument: past WINDOW_CAP keys every key is in reach anyway."""
    return 0 if keys is None else min(keys, WINDOW_CAP)


__all__ = ["FLAGS", "KernelVariants", "flags", "launch_args", "prepare", "refusal"]
