"""call_linear is the layer's own call, minus the module-call overhead: never a different result or a skipped hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multihead import MultiHeadAttention
from multihead.nn.linear_call import call_linear


def test_a_plain_layer_gives_exactly_its_own_call():
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 5), torch.randn(2, 3, 8)
    assert torch.equal(call_linear(layer, x), layer(x))
    unbiased = nn.Linear(8, 5, bias=False)
    assert torch.equal(call_linear(unbiased, x), unbiased(x))


def test_hooks_of_the_layer_and_global_hooks_still_run():
    layer, x = nn.Linear(4, 4), torch.randn(1, 4)
    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append("own"))
    call_linear(layer, x)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append("global"))
    try:
        call_linear(layer, x)
    finally:
        handle.remove()
    assert seen == ["own", "global"]


def test_a_subclass_runs_its_own_forward():
    class Scaled(nn.Linear):  # a LoRA-like layer: same parameters, different result
        def forward(self, x):
            return 3 * super().forward(x)

    layer, x = Scaled(4, 4), torch.randn(1, 4)
    assert torch.allclose(call_linear(layer, x), 3 * F.linear(x, layer.weight, layer.bias))


def test_every_projection_of_the_module_honours_a_hook():
    m = MultiHeadAttention(16, 4).eval()
    seen = []
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(m, name).register_forward_hook(lambda module, args, out, name=name: seen.append(name))
    with torch.no_grad():
        m(torch.randn(1, 3, 16))
    assert seen == ["q_proj", "k_proj", "v_proj", "out_proj"]


def test_an_instance_forward_override_is_honoured():
    """Once failed (fused_linear.py:143-146 `_plain`, used by call_linear and Stacked.get): a layer whose
    *instance* forward was replaced (`layer.forward = ...`, which is how accelerate's add_hook_to_module installs
    offloading/device hooks, and how many quantization and debugging tools patch layers) was treated as plain:
    F.linear was called with its parameters and the override bypassed, in grad mode too (out_proj always goes
    through call_linear). nn.Linear itself honours it, and so did the module before the change.
    """
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4).eval()
    x = torch.randn(1, 2, 16)
    original = m.out_proj.forward
    m.out_proj.forward = lambda inp: 0 * original(inp)
    assert m(x).output.abs().max() == 0
