"""Linear layers that read one input, run as one matmul: the fused q, k, v projection.

Self-attention projects the same x three times, x @ W^Qᵀ, x @ W^Kᵀ, x @ W^Vᵀ.
Stacked, [W^Q; W^K; W^V] is one (H·D + G·D + G·Dv, C) matrix and one GEMM
computes all three: one read of x, one launch instead of three (torch's
in_proj_weight and GPT-2's c_attn hold it that way). multihead keeps the
three `nn.Linear` layers (their state dict, `head(i)` and every loader see
three matrices) and lays their weights out one after the other in one
storage, so the stacked matrix is a view of memory that already exists:

    lay_out_together([q_proj, k_proj, v_proj])   # once, and after .to()/.half()
    stacked = Stacked().get([q_proj, k_proj, v_proj], x)  # FusedLinear, or None
    y = F.linear(x, stacked.weight, stacked.bias).split(stacked.sizes, dim=-1)

`Stacked.get` gives None, and the caller runs the layers one by one, where
one GEMM is measured slower and wherever the stacked view would differ from
calling them. Measured on this project's 2-core Xeon (torch 2.13, MKL), a
(rows, 512) x (512, 1536) product against three (512, 512) ones: 0.85-1.0x
the time for 1-3 rows and for 16 to 1024 rows, but 1.15-1.57x for 4 to 15
rows (MKL's small-matrix kernel), so the CPU stacks outside that band. On a
GPU one launch instead of three is what a small call pays for. The view is
refused where it would differ from calling the layers: a layer that is not a
plain nn.Linear or has hooks (LoRA, activation capture), weights moved
apart (a parameter reassigned), autograd recording (the stacked view is
not the parameters autograd tracks), or torch.compile tracing (which reads
no data pointers and fuses on its own terms).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module


class FusedLinear(NamedTuple):
    weight: Tensor  # (sum of out_features, in_features): the layers' weights stacked, a view of their storage
    bias: Tensor | None  # (sum of out_features,) or None when no layer has a bias
    sizes: tuple[int, ...]  # each layer's out_features, to split the output


def lay_out_together(linears: Sequence[nn.Linear]) -> None:
    """Move the layers' weights (and biases) into one storage, in order; the Parameter objects stay the same.

    Does nothing when the layers cannot be stacked (different input widths,
    dtypes or devices, some with a bias and some without). Values are
    unchanged; an optimizer holding the parameters keeps working.
    """
    if not _stackable(linears):
        return
    with torch.no_grad():
        for name in ("weight", "bias"):
            parts = [getattr(linear, name) for linear in linears]
            if parts[0] is None:
                continue
            block = torch.cat([p.detach() for p in parts])  # (sum out, in) or (sum out,)
            for part, piece in zip(parts, block.split([p.shape[0] for p in parts])):
                part.data = piece  # a view into the block


class Stacked:
    """The stacked view of some layers, found once and reused until one of their parameters moves.

    `get(linears)` costs a few identity and pointer comparisons per call once
    the view is known; it gives None wherever one matmul would not be exactly
    the same as calling the layers (see the module docstring).
    """

    def __init__(self) -> None:
        self._params: tuple = ()  # the parameters the cached view was built from
        self._pointers: tuple = ()  # their data pointers then
        self._fused: FusedLinear | None = None

    def get(self, linears: Sequence[nn.Linear], x: Tensor) -> FusedLinear | None:
        """The stacked view for an input x, or None: call the layers one by one (`call_linear`)."""
        if not _stacking_pays(x) or torch.compiler.is_compiling() or _global_hooks():
            return None
        params = []
        for linear in linears:  # a plain loop: this runs on every call, at decode sizes where microseconds count
            if not _plain(linear):
                return None
            own = linear._parameters  # a dict lookup: `linear.weight` goes through Module.__getattr__ (0.6 us)
            params.append(own["weight"])
            if own["bias"] is not None:
                params.append(own["bias"])
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        if not self._still(params):
            self._fused = together(linears)
            self._params, self._pointers = tuple(params), tuple(p.data_ptr() for p in params)
        return self._fused

    def _still(self, params: list) -> bool:
        if len(params) != len(self._params):
            return False
        for p, known, pointer in zip(params, self._params, self._pointers):
            if p is not known or p.data_ptr() != pointer:
                return False
        return True


def call_linear(linear: nn.Module, x: Tensor) -> Tensor:
    """linear(x), as F.linear straight away where that is all the call would do (no module-call overhead)."""
    if _plain(linear) and not _global_hooks():
        own = linear._parameters
        return F.linear(x, own["weight"], own["bias"])
    return linear(x)


def together(linears: Sequence[nn.Linear]) -> FusedLinear | None:
    """The layers' stacked weight and bias, if their parameters lie one after the other in one storage."""
    if not _stackable(linears):
        return None
    weight = _stacked([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else _stacked([linear.bias for linear in linears])
    if weight is None or (linears[0].bias is not None and bias is None):
        return None
    return FusedLinear(weight, bias, tuple(linear.out_features for linear in linears))


def _stackable(linears: Sequence[nn.Linear]) -> bool:
    first = linears[0]
    has_bias = first.bias is not None
    return all(
        isinstance(linear, nn.Linear) and linear.in_features == first.in_features
        and linear.weight.dtype == first.weight.dtype and linear.weight.device == first.weight.device
        and (linear.bias is not None) == has_bias
        for linear in linears
    )


def _stacking_pays(x: Tensor) -> bool:
    """Whether one GEMM beats three for this input: everywhere measured, except the CPU with 4 to 15 rows."""
    if x.device.type != "cpu":
        return True
    rows = x.numel() // x.shape[-1]  # B·T
    return not 4 <= rows < 16  # MKL's small-matrix kernel: 1.15-1.6x slower stacked (module docstring)


def _plain(linear: nn.Module) -> bool:
    """An nn.Linear whose call is exactly F.linear: no subclass (LoRA), no hooks of its own."""
    return type(linear) is nn.Linear and not (
        linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks or linear._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether module hooks registered for every module are set (they would miss the layers' own calls)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _stacked(parts: list[Tensor]) -> Tensor | None:
    """The tensors as one, (sum of dim 0, *rest), if each starts where the one before ends in one storage."""
    first = parts[0]
    if not all(p.is_contiguous() for p in parts):
        return None
    step = first.element_size()
    position = first.data_ptr()
    for part in parts:
        if part.data_ptr() != position or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        position += part.numel() * step
    rows = sum(p.shape[0] for p in parts)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())  # (sum out, in) over the parts
