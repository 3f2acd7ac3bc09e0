"""The `triton` backend: multihead's own fused attention kernels.

    out, lse = triton_attention(q, k, v, causal=True, key_lengths=lengths)

q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) -> out (B, H, T, Dv), lse (B, H, T) float32.

- forward.py: online softmax over key tiles, exp2 with log2 e folded into
  the scale, the logsumexp saved;
- decode.py: split-KV ("flash-decoding") for T <= 16 queries against a long
  cache, a group's query heads packed into one tile, slices merged by their
  logsumexp; chosen by shape (`decode.applies`);
- backward.py: the probabilities recomputed from the logsumexp, dq, dk, dv,
  without atomics (deterministic); it follows either forward;
- keys.py: key lengths or a key-padding mask as (lo, hi, mask) on the device;
- variants.py: window, softcap, ALiBi, sinks and documents as the kernels' arguments
  and constexpr flags (a plain call compiles to the code it had without them);
- configs.py: the autotuners' tiles, checked for sm_90a;
- here: one torch.autograd.Function joining them, the public
  `triton_attention`, and the registry's `TritonBackend`, whose `backward`
  runs backward.py from a given out and logsumexp (a ring's block of keys).

No host sync anywhere on this path: `supports` decides from dtypes, shapes
and flags, and key lengths stay on the device, so a call never waits for the
GPU and a decode step can be captured in a CUDA graph.

What the kernels take: causal (bottom-right aligned, T != S allowed), key
masks (bool (B|1, 1, 1, S)) and per-sequence key lengths (a query sees keys
j < key_lengths[b]),
grouped-query attention (kv head h // R, never copied), head dims up to 256
(padded inside the kernel to a power of two), any T and S, fp16, bf16 and
fp32, and the attention variants window, softcap, ALiBi, sinks (with their
gradient) and documents, a context-parallel shard's global positions included.
A query row with no key (causal with T > S, key length 0) gives output 0,
gradient 0 and lse -inf (the sink, with sinks). What they do not take (a dense
mask, dropout, a score_mod, the gradient of ALiBi slopes) the backend refuses
with a reason, so `auto` moves on.

    causal, key_lengths = [4]:  T = 3, S = 6 (offset 3)
         keys 0 1 2 3 4 5
    q0        x x x x . .     <- query i sees j <= i + 3 and j < 4
    q1        x x x x . .
    q2        x x x x . .

triton is optional: nothing here imports it until a call needs it (`supports`
reads no kernel module), and without it `supports` says "triton is not
installed". Kernels run on CUDA tensors, and on CPU tensors only in triton's
interpreter (TRITON_INTERPRET=1, fp32: slow, for tests). `interpreting()` is
the one place multihead reads TRITON_INTERPRET. forward.py, backward.py and
decode.py are ordinary modules (`import multihead.backends.triton.backward`);
`kernel_modules()` imports them in the mode triton itself runs in (see there).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from ...core.call import AttentionCall, AttentionOutput, make_call
from ...core.call import Gradients, check_backward  # for TritonBackend.backward
from ...core.variants import sink_gradient
from . import keys, variants
from .keys import KeyRange

MAX_HEAD_DIM = 256  # q, k, v tiles of a wider head no longer fit on chip
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels compute in (no float64)


class TritonOutput(NamedTuple):
    out: Tensor  # (B, H, T, Dv)
    lse: Tensor  # (B, H, T) float32, natural log; -inf for rows with no key


# Read at import (find_spec imports nothing): filled lazily inside a first torch.compile'd call, the memo
# made dynamo guard on it and the second call recompile (tests/test_variants_compile.py).
_installed: bool | None = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    global _installed
    if _installed is None:
        _installed = importlib.util.find_spec("triton") is not None
    return _installed


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for triton's interpreter, read at every call and parsed as triton
    parses it. The one place multihead reads the variable."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


@contextlib.contextmanager
def _decorating(interpret: bool):
    """TRITON_INTERPRET set to `interpret` while triton.jit decorates the kernels, restored after."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _triton_interprets() -> bool | None:
    """Whether triton's own jit helpers (tl.max, tl.sum, ...) were made for its interpreter: decided by
    TRITON_INTERPRET when triton.language was first imported. None: not imported yet. Imports nothing."""
    language = sys.modules.get("triton.language")
    if language is None:
        return None
    interpreter = sys.modules.get("triton.runtime.interpreter")  # triton.jit imports it only to interpret
    return interpreter is not None and isinstance(language.max, interpreter.InterpretedFunction)


class Kernels(NamedTuple):
    """The kernel modules, as `kernel_modules()` imports them."""

    forward: ModuleType  # forward.py: online softmax over key tiles
    backward: ModuleType  # backward.py: dq, dk, dv
    decode: ModuleType  # decode.py: split-KV for a few queries against a long cache

    @property
    def interpreted(self) -> bool:
        """Whether triton.jit made them for its interpreter (else they are compiled for the GPU)."""
        return self.forward.INTERPRET


_kernels: Kernels | None = None
_load_lock = threading.Lock()


def kernel_modules() -> Kernels:
    """forward.py, backward.py and decode.py, imported on first use in the mode triton runs in.

    triton.jit makes a kernel compiled or interpreted when it decorates it, from TRITON_INTERPRET at that
    moment, and triton.language's own helpers were made so at triton's first import: a kernel of the other
    mode cannot run in this process (the interpreter cannot call a compiled tl.max, nor the compiler an
    interpreted one). So the modules are imported with TRITON_INTERPRET set to triton's mode, whatever it
    says now (the tests set and unset it per test), and imported again if they were first imported directly
    under another value. What a call may run, it still reads at every call (`interpreting()`).
    """
    global _kernels
    if _kernels is None:
        with _load_lock:
            if _kernels is None:
                import triton.language  # noqa: F401  (a first import follows TRITON_INTERPRET now)

                interpret = bool(_triton_interprets())
                with _decorating(interpret):
                    _kernels = Kernels(*(_import(stem, interpret) for stem in Kernels._fields))
    return _kernels


def _import(stem: str, interpret: bool) -> ModuleType:
    module = importlib.import_module(f"{__name__}.{stem}")
    return module if module.INTERPRET == interpret else importlib.reload(module)


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
        if not interpreting():
            return "q is on the CPU; triton runs there only in its interpreter (TRITON_INTERPRET=1, for tests)"
        if _triton_interprets() is False:
            return ("q is on the CPU, but triton was first imported without TRITON_INTERPRET=1 in this process, "
                    "so its kernels run compiled only; set it before triton is imported")
        return None
    return f"triton runs on CUDA tensors, q is on {x.device}"


def _kernel_limits(q: Tensor, v: Tensor) -> str | None:
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} not supported (fp16, bf16, fp32)"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "triton's interpreter has no bf16 arithmetic (use fp32 or fp16 on the CPU)"
    D, Dv = q.shape[-1], v.shape[-1]
    if max(D, Dv) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}, got D={D}, Dv={Dv}"
    return None


def _contiguous_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class Launch(NamedTuple):
    """How a call runs, decided from shapes and arguments (never from a tensor's values)."""

    block_m: int | None = None  # query rows per tile in the interpreter (the GPU autotunes)
    block_n: int | None = None  # keys per tile in the interpreter; the decode path's tile anywhere
    decode: bool | None = None  # the split-KV decode path: None = by shape (`decode.applies`)
    num_splits: int | None = None  # decode: slices of the key range; None = from the shape and the SM count


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_range, causal, scale, options, kv, sinks):
        kernels = kernel_modules()
        interpret = kernels.interpreted
        q, k, v = _contiguous_last(q), _contiguous_last(k), _contiguous_last(v)
        B, H, T, _ = q.shape
        S = k.shape[2]
        precision = _precision(q.dtype, interpret)
        split_kv = kernels.decode.applies(T, S) if options.decode is None else options.decode  # from shapes
        if T == 0 or S == 0 or B * H == 0:  # nothing to attend: output 0, lse -inf (the sink's, with sinks)
            out = q.new_zeros((B, H, T, v.shape[-1]))
            lse = torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)
            if kv is not None and kv.sinks is not None:
                lse = kv.sinks[None, :, None].expand(B, H, T).contiguous()  # (H,) -> (B, H, T)
        elif split_kv:
            with _on_device(q):
                out, lse = kernels.decode.attention_decode(q, k, v, key_range, causal, scale, precision,
                                                           options.block_n, options.num_splits, kv)
        else:
            with _on_device(q):
                out, lse = kernels.forward.attention_forward(q, k, v, key_range, causal, scale, precision,
                                                             options.block_m, options.block_n, kv)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = (key_range, causal, scale, options, interpret, kv, sinks)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        key_range, causal, scale, options, interpret, kv, sinks = ctx.call
        B, H, T, _ = q.shape
        S = k.shape[2]
        grad_sinks = None
        if grad_out is not None and sinks is not None and ctx.needs_input_grad[8]:
            grad_sinks = sink_gradient(sinks, lse, grad_out, out)  # (H,), outside the kernels
        if grad_out is None or T == 0 or S == 0 or B * H == 0:
            return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None, None,
                    grad_sinks)
        with _on_device(q):
            dq, dk, dv = kernel_modules().backward.attention_backward(
                _contiguous_last(grad_out.to(q.dtype)), q, k, v, out, lse, key_range, causal, scale,
                _precision(q.dtype, interpret), options.block_m, options.block_n, kv)
        return dq, dk, dv, None, None, None, None, None, grad_sinks


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


def _check_key_lengths(key_lengths, B: int, device: torch.device) -> KeyRange | None:
    """key_lengths (B,) integers on q's device -> a KeyRange; checked from its type and shape only
    (its values stay on the device: the kernels clamp them to [0, S])."""
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
    return keys.from_lengths(key_lengths, B)


def _check_option(name: str, value, smallest: int, power_of_two: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest or (
            power_of_two and value & (value - 1)):
        kind = "a power of two" if power_of_two else "an int"
        raise ValueError(f"{name} must be {kind} >= {smallest} or None, got {value!r}")


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_lengths: Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    documents=None,
    block_m: int | None = None,
    block_n: int | None = None,
    decode: bool | None = None,
    num_splits: int | None = None,
) -> TritonOutput:
    """The triton kernels, with the logsumexp: (out (B, H, T, Dv), lse (B, H, T) float32).

    q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv); H a multiple of G.
    causal: bottom-right aligned, query i sees keys j <= i + S - T.
    key_lengths: (B,) ints; sequence b attends only its first key_lengths[b] keys (a
        key-padding mask, or a cache's fill level). None: all S. The values stay on the
        device (no host sync): a length below 0 or above S counts as 0 or S.
    window, softcap, alibi_slopes, sinks, documents: the attention variants, as
        `multihead.attention` takes them (`multihead.core.variants`); ALiBi slopes get no gradient.
    block_m, block_n: query rows and keys per tile in the interpreter (the GPU autotunes);
        block_n also sets the decode path's tile.
    decode: the split-KV path for a few queries (T <= 16) against a long cache; None
        picks it from the shapes. num_splits: its number of key slices (None: from the shapes).

    Differentiable in q, k, v (and sinks). lse[b, h, t] = log of the softmax's denominator:
    sum_j exp(score) over the keys the query sees, plus exp(sink_h) with sinks (-inf when
    there is no term), so the weights are exp(score - lse).
    """
    call = make_call(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                     alibi_slopes=alibi_slopes, sinks=sinks, documents=documents)
    reason = _where_it_runs(q) or _kernel_limits(q, v) or (
        None if call.variants is None else variants.refusal(call.variants, torch.is_grad_enabled()))
    if reason is not None:
        raise ValueError(f"triton_attention cannot run this call: {reason}")
    _check_option("block_m", block_m, 16, True)
    _check_option("block_n", block_n, 16, True)
    _check_option("num_splits", num_splits, 1, False)
    if decode is not None and not isinstance(decode, bool):
        raise TypeError(f"decode must be a bool or None, got {type(decode).__name__} {decode!r}")
    key_range = _check_key_lengths(key_lengths, q.shape[0], q.device)
    return _apply(q, k, v, key_range, call.causal, call.scale, Launch(block_m, block_n, decode, num_splits),
                  call.variants)


def _apply(q, k, v, key_range, causal, scale, options=Launch(), checked=None) -> TritonOutput:
    """The autograd Function on checked arguments; `checked`: the call's `Variants` or None."""
    sinks = None if checked is None else checked.sinks
    out, lse = _TritonAttention.apply(q, k, v, key_range, causal, scale, options, variants.prepare(checked), sinks)
    return TritonOutput(out, lse)


class TritonBackend:
    name = "triton"
    # Below sdpa (20): measured on an H200 (BENCHMARKS.md), SDPA's cuDNN kernel is faster forward and
    # backward at T 1k-16k, and SDPA decodes 10x faster; above cpu_flash (15) and chunked (10), so
    # calls that need the logsumexp on CUDA come here.
    priority = 17
    summary = ("fused Triton kernels (forward, backward, split-KV decode) on CUDA; key-padding masks, window, "
               "softcap, ALiBi, sinks, documents; no dropout, no score_mod; gives the lse")

    def supports(self, call: AttentionCall, *, need_lse: bool = False) -> str | None:
        """Decided from devices, dtypes, shapes and flags: no tensor's value is read (no host sync)."""
        reason = _where_it_runs(call.q) or _kernel_limits(call.q, call.v)
        if reason is not None:
            return reason
        if call.dropout_p > 0.0:
            return "dropout is not implemented in the triton kernels"
        if call.variants is not None:
            reason = variants.refusal(call.variants, torch.is_grad_enabled())
            if reason is not None:
                return reason
        if call.attn_mask is not None:
            return keys.refusal(call.attn_mask)
        return None

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput:
        out, lse = _apply(call.q, call.k, call.v, _key_range(call), call.causal, call.scale, Launch(), call.variants)
        return AttentionOutput(out, lse if need_lse else None)

    def backward(self, call: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor) -> Gradients:
        """backward.py's kernels from a given out and lse (B, H, T): the rows whose lse is -inf give 0.

        With variants the lse is the whole denominator's (sinks included); the sinks' gradient is the
        caller's (`multihead.core.variants.sink_gradient`), as for every backend's `backward`."""
        check_backward(call, grad_out, out, lse)
        key_range = _key_range(call)
        q, k, v = _contiguous_last(call.q), _contiguous_last(call.k), _contiguous_last(call.v)
        if call.q_len == 0 or call.kv_len == 0 or call.batch * call.heads == 0:
            return Gradients(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        kernels = kernel_modules()
        interpret = kernels.interpreted
        grad_out = _contiguous_last(grad_out.to(q.dtype))  # (B, H, T, Dv)
        out = _contiguous_last(out.to(q.dtype))  # (B, H, T, Dv)
        lse = lse.to(torch.float32).contiguous()  # (B, H, T): the kernels read it as one float32 row per head
        with torch.no_grad(), _on_device(q):
            dq, dk, dv = kernels.backward.attention_backward(
                grad_out, q, k, v, out, lse, key_range, call.causal, call.scale, _precision(q.dtype, interpret),
                kv=variants.prepare(call.variants))
        return Gradients(dq, dk, dv)


def _key_range(call: AttentionCall) -> KeyRange | None:
    """The call's key-padding mask as the kernels take it (on the device), or None without a mask."""
    if call.attn_mask is None:
        return None
    reason = keys.refusal(call.attn_mask)
    if reason is not None:
        raise ValueError(f"backend 'triton' cannot run this call: {reason}")
    return keys.from_mask(call.attn_mask, call.batch)  # on the device


__all__ = ["KeyRange", "Kernels", "Launch", "TritonBackend", "TritonOutput", "interpreting", "kernel_modules",
           "keys", "triton_attention", "triton_installed", "variants"]
