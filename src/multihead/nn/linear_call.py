"""Applying an nn.Linear without the module-call overhead, where that is all the call would do.

Calling a module costs a few microseconds of Python (hooks looked up,
`forward` found); at a decode step, where the whole attention layer takes
a few hundred, four projections make that a few percent. `call_linear`
applies `F.linear` straight to the layer's parameters when the call would
do exactly that, and calls the layer otherwise:

    y = call_linear(self.out_proj, x)   # == self.out_proj(x), always

It calls the layer for a subclass (LoRA, quantised layers), a layer with
hooks of its own or module hooks registered globally (activation capture),
and a layer whose `forward` was replaced on the instance (accelerate's
hooks). The parameters are read where the layer keeps them, so
`torch.func.functional_call`, parametrizations and pruning see the same
tensors as the layer's own call would.

Not done here: stacking W^Q, W^K, W^V into one GEMM. Measured on this
project's 2-core Xeon (torch 2.13, MKL), one (rows, 512) x (512, 1536)
product took 0.85-1.0x the time of three (512, 512) ones for 1-3 rows and
for 16-1024 rows, but 1.15-1.58x for 4-15 rows; and laying the three
weights out in one storage (to keep the state dict's three matrices) broke
jit.trace, forward-mode AD, share_memory, vmap ensembling and pickling
(BENCHMARKS.md). On a GPU one launch instead of three may pay; that is
to be measured there first.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module


def call_linear(linear: nn.Module, x: Tensor) -> Tensor:
    """linear(x): F.linear straight away when calling the layer would do only that."""
    if _plain(linear):
        parameters = linear._parameters  # a dict lookup; `linear.weight` goes through Module.__getattr__
        return F.linear(x, parameters["weight"], parameters["bias"])
    return linear(x)


def _plain(linear: nn.Module) -> bool:
    """An nn.Linear whose call is exactly F.linear: not a subclass, no hooks, its class's own forward."""
    return type(linear) is nn.Linear and not (
        linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks or linear._backward_pre_hooks
        or "forward" in linear.__dict__ or _module._global_forward_hooks or _module._global_forward_pre_hooks
        or _module._global_backward_hooks or _module._global_backward_pre_hooks)
