"""The `triton` backend: multihead's own fused attention kernels.

    out, lse = triton_attention(q, k, v, causal=True, key_lengths=lengths)

q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv), lse (B, H, T) float32.

- forward.py: online softmax over key tiles, exp2 with log2 e folded into
  the scale, the logsumexp saved;
- backward.py: the probabilities recomputed from the logsumexp, dq, dk, dv,
  without atomics (deterministic);
- here: one torch.autograd.Function joining them, the public
  `triton_attention`, and the registry's `TritonBackend`.

What the kernels take: causal (bottom-right aligned, T != S allowed), key
masks as per-sequence key lengths (a query sees keys j < key_lengths[b]),
grouped-query attention (kv head h // R, never copied), head dims up to 256
(padded inside the kernel to a power of two), any T and S, fp16, bf16 and
fp32. A query row with no key (causal with T > S, key length 0) gives
output 0, gradient 0 and lse -inf. What they do not take (a dense mask,
dropout) the backend refuses with a reason, so `auto` moves on.

    causal, key_lengths = [4]:  T = 3, S = 6 (offset 3)
         keys 0 1 2 3 4 5
    q0        x x x x . .     <- query i sees j <= i + 3 and j < 4
    q1        x x x x . .
    q2        x x x x . .

triton is optional: nothing here imports it until a call needs it, and
without it `supports` says "triton is not installed". Kernels run on CUDA
tensors, and on CPU tensors only in triton's interpreter (TRITON_INTERPRET=1,
fp32: slow, for tests). triton.jit picks compiled or interpreted when a
kernel is decorated, so the kernel modules are loaded once per mode.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from ...call import AttentionCall, AttentionOutput, make_call

MAX_HEAD_DIM = 256  # q, k, v tiles of a wider head no longer fit on chip
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonOutput(NamedTuple):
    out: Tensor  # (B, H, T, Dv)
    lse: Tensor  # (B, H, T) float32, natural log; -inf for rows with no key


_installed: bool | None = None


def triton_installed() -> bool:
    global _installed
    if _installed is None:
        _installed = importlib.util.find_spec("triton") is not None
    return _installed


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks for triton's interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_kernel_modules: dict[bool, tuple[ModuleType, ModuleType]] = {}
_load_lock = threading.Lock()


def _kernels(interpret: bool) -> tuple[ModuleType, ModuleType]:
    """(forward, backward) kernel modules, decorated compiled or interpreted.

    Each mode gets its own copy of the two files, loaded with TRITON_INTERPRET
    set to match while triton.jit decorates them, so that CPU tests under the
    interpreter and CUDA calls can share one process.
    """
    with _load_lock:
        if interpret not in _kernel_modules:
            saved = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
            try:
                loaded = []
                for stem in ("forward", "backward"):
                    name = f"{__name__}._{stem}_{'interpreted' if interpret else 'compiled'}"
                    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{stem}.py"))
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[name] = module
                    spec.loader.exec_module(module)
                    loaded.append(module)
            finally:
                if saved is None:
                    del os.environ["TRITON_INTERPRET"]
                else:
                    os.environ["TRITON_INTERPRET"] = saved
            _kernel_modules[interpret] = (loaded[0], loaded[1])
        return _kernel_modules[interpret]


def _interpreted(x: Tensor) -> bool:
    return x.device.type != "cuda" or interpreter_on()


def _precision(dtype: torch.dtype, interpret: bool) -> str:
    """tl.dot's input_precision: fp32 products stay IEEE unless torch itself allows TF32 matmuls."""
    if dtype == torch.float32 and (interpret or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _where_it_runs(x: Tensor) -> str | None:
    """None if triton can run on x's device, else why not."""
    if not triton_installed():
        return "triton is not installed (pip install triton)"
    if x.device.type == "cuda":
        if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) < (8, 0):
            return "bf16 tiles need an sm80+ GPU"
        return None
    if x.device.type == "cpu":
        if interpreter_on():
            return None
        return "q is on the CPU; triton runs there only in its interpreter (TRITON_INTERPRET=1, for tests)"
    return f"triton runs on CUDA tensors, q is on {x.device}"


def _kernel_limits(q: Tensor, v: Tensor) -> str | None:
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} not supported (fp16, bf16, fp32)"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "triton's interpreter has no bf16 arithmetic (use fp32 or fp16 on the CPU)"
    D, Dv = q.shape[-1], v.shape[-1]
    if max(D, Dv) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}, got D={D}, Dv={Dv}"
    return None


def key_lengths_from_mask(attn_mask: Tensor, B: int) -> tuple[Tensor | None, str | None]:
    """A key-padding mask as key lengths: (lengths (B,) int32 or None if nothing is masked, None),
    or (None, why it is not one).

    A key-padding mask is bool, (B|1, 1, 1, S), and True on a prefix of the keys
    (the first n real tokens, padding after), which is what
    `masks.key_mask_to_attn_mask(masks.lengths_to_key_mask(lengths, S))` builds.
    """
    if attn_mask.dtype != torch.bool:
        return None, ("a dense float mask is not supported; triton takes key-padding masks only "
                      "(bool (B, 1, 1, S), True on the first n keys)")
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        return None, (f"attn_mask of shape {tuple(attn_mask.shape)} is not a key-padding mask "
                      "(B, 1, 1, S); triton takes key lengths only")
    S = attn_mask.shape[-1]
    rows = attn_mask.reshape(attn_mask.shape[0], S)  # (b, 1, 1, S) -> (b, S)
    lengths = rows.sum(dim=-1)  # (b,)
    prefix = torch.arange(S, device=rows.device)[None, :] < lengths[:, None]  # (b, S)
    if not torch.equal(prefix, rows):
        return None, "attn_mask is not a prefix of the keys per sequence (padding before a real token)"
    if bool((lengths == S).all()):
        return None, None  # nothing masked
    return lengths.to(torch.int32).expand(B).contiguous(), None


def _contiguous_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_lengths, causal, scale, blocks):
        interpret = _interpreted(q)
        fwd, _ = _kernels(interpret)
        q, k, v = _contiguous_last(q), _contiguous_last(k), _contiguous_last(v)
        B, H, T, _ = q.shape
        S = k.shape[2]
        if T == 0 or S == 0 or B * H == 0:  # nothing to attend: output 0, lse -inf
            out = q.new_zeros((B, H, T, v.shape[-1]))
            lse = torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)
        else:
            with _on_device(q):
                out, lse = fwd.attention_forward(q, k, v, key_lengths, causal, scale,
                                                 _precision(q.dtype, interpret), *blocks)
        ctx.save_for_backward(q, k, v, out, lse, key_lengths)
        ctx.call = (causal, scale, blocks, interpret)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_lengths = ctx.saved_tensors
        causal, scale, blocks, interpret = ctx.call
        B, H, T, _ = q.shape
        S = k.shape[2]
        if grad_out is None or T == 0 or S == 0 or B * H == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None
        _, bwd = _kernels(interpret)
        with _on_device(q):
            dq, dk, dv = bwd.attention_backward(_contiguous_last(grad_out.to(q.dtype)), q, k, v, out, lse,
                                                key_lengths, causal, scale, _precision(q.dtype, interpret),
                                                *blocks)
        return dq, dk, dv, None, None, None, None


class _on_device:
    """Launch on q's GPU, not the current one (a no-op for CPU tensors)."""

    def __init__(self, x: Tensor):
        self.ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _check_key_lengths(key_lengths, B: int, S: int, device: torch.device) -> Tensor | None:
    if key_lengths is None:
        return None
    if not isinstance(key_lengths, Tensor):
        raise TypeError(f"key_lengths must be a torch.Tensor (B,) of ints or None, got {type(key_lengths).__name__}")
    if key_lengths.dtype.is_floating_point or key_lengths.dtype == torch.bool or key_lengths.dim() != 1:
        raise ValueError(f"key_lengths must be (B,) = ({B},) integers, got {tuple(key_lengths.shape)} "
                         f"{key_lengths.dtype}")
    if key_lengths.shape[0] != B:
        raise ValueError(f"key_lengths has {key_lengths.shape[0]} entries, expected one per sequence (B={B})")
    if key_lengths.device != device:
        raise ValueError(f"key_lengths is on {key_lengths.device} but q is on {device}")
    if B and (int(key_lengths.min()) < 0 or int(key_lengths.max()) > S):
        raise ValueError(f"key_lengths must be in [0, S={S}], got {key_lengths.tolist()}")
    return key_lengths.to(torch.int32).contiguous()


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_lengths: Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> TritonOutput:
    """The triton kernels, with the logsumexp: (out (B, H, T, Dv), lse (B, H, T) float32).

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv); H a multiple of G.
    causal: bottom-right aligned, query i sees keys j <= i + S - T.
    key_lengths: (B,) ints in [0, S]; sequence b attends only its first
        key_lengths[b] keys (a key-padding mask). None: all S.
    block_m, block_n: query rows and keys per tile in the interpreter (the GPU autotunes).

    Differentiable in q, k, v. lse[b, h, t] = log sum_j exp(score) over the keys the
    query sees (-inf when none), so the weights are exp(score - lse)
    (`multihead.weights`).
    """
    call = make_call(q, k, v, causal=causal, scale=scale)
    reason = _where_it_runs(q) or _kernel_limits(q, v)
    if reason is not None:
        raise ValueError(f"triton_attention cannot run this call: {reason}")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (isinstance(block, bool) or not isinstance(block, int)
                                  or block < 16 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 or None, got {block!r}")
    lengths = _check_key_lengths(key_lengths, q.shape[0], k.shape[2], q.device)
    return _apply(q, k, v, lengths, call.causal, call.scale, block_m, block_n)


def _apply(q, k, v, key_lengths, causal, scale, block_m=None, block_n=None) -> TritonOutput:
    out, lse = _TritonAttention.apply(q, k, v, key_lengths, causal, scale, (block_m, block_n))
    return TritonOutput(out, lse)


class TritonBackend:
    name = "triton"
    # Below sdpa (20): measured on an H200 (BENCHMARKS.md), SDPA's cuDNN kernel is faster forward and
    # backward at T 1k-16k, and SDPA decodes 10x faster; above cpu_flash (15) and chunked (10), so
    # calls that need the logsumexp on CUDA come here.
    priority = 17
    summary = "fused Triton kernels (forward + backward) on CUDA; key-padding masks, no dropout; gives the lse"

    def supports(self, call: AttentionCall, *, need_lse: bool = False) -> str | None:
        reason = _where_it_runs(call.q) or _kernel_limits(call.q, call.v)
        if reason is not None:
            return reason
        if call.dropout_p > 0.0:
            return "dropout is not implemented in the triton kernels"
        if call.attn_mask is not None:
            return key_lengths_from_mask(call.attn_mask, call.batch)[1]
        return None

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        lengths = None
        if call.attn_mask is not None:
            lengths, reason = key_lengths_from_mask(call.attn_mask, call.batch)
            if reason is not None:
                raise ValueError(f"backend 'triton' cannot run this call: {reason}")
        out, lse = _apply(call.q, call.k, call.v, lengths, call.causal, call.scale)
        return AttentionOutput(out, lse if need_lse else None)


__all__ = ["TritonBackend", "TritonOutput", "key_lengths_from_mask", "triton_attention", "triton_installed"]
