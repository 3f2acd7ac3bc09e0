"""The stacked q, k, v projection: one GEMM where it is exactly the three layers, never a silent difference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multihead import MultiHeadAttention
from multihead.fused_linear import Stacked, call_linear, lay_out_together, together

C, H = 16, 4


def layers(m: MultiHeadAttention):
    return (m.q_proj, m.k_proj, m.v_proj)


def by_hand(m: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The textbook forward with the three projections applied one by one, from the parameters themselves."""
    B, T, _ = x.shape
    D = C // H
    q, k, v = (F.linear(x, lin.weight, lin.bias).view(B, T, H, D).transpose(1, 2) for lin in layers(m))
    out = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1) @ v  # (B, H, T, D)
    return F.linear(out.transpose(1, 2).reshape(B, T, C), m.out_proj.weight, m.out_proj.bias)


def test_weights_lie_side_by_side_and_the_stacked_view_is_their_memory():
    m = MultiHeadAttention(C, H, num_kv_heads=2).eval()
    stacked = together(layers(m))
    assert stacked is not None and stacked.sizes == (C, C // 2, C // 2)
    assert stacked.weight.data_ptr() == m.q_proj.weight.data_ptr()
    assert torch.equal(stacked.weight, torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
    assert torch.equal(stacked.bias, torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
    assert list(m.state_dict()) == ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                                    "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias"]


@pytest.mark.parametrize("T", [1, 2, 5, 16, 33])  # the CPU stacks for 1-3 and >= 16 rows, not for 4-15
def test_the_module_equals_the_three_projections(T):
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).double().eval()
    x = torch.randn(1, T, C, dtype=torch.float64)
    with torch.no_grad():
        used = Stacked().get(layers(m), x) is not None
        assert used == (not 4 <= T < 16)
        assert (m(x).output - by_hand(m, x)).abs().max() < 1e-12


def test_conversion_lays_the_weights_out_again():
    m = MultiHeadAttention(C, H).eval()
    m.double()  # every parameter gets its own storage, then the module stacks them again
    assert together(layers(m)) is not None and m.q_proj.weight.dtype == torch.float64
    assert together((m.q_proj, m.k_proj, m.v_proj)).weight.data_ptr() == m.q_proj.weight.data_ptr()


def test_a_reassigned_parameter_is_used_not_the_old_memory():
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 1, C)
    with torch.no_grad():
        m(x)  # the stacked view is built and kept
        m.k_proj.weight = nn.Parameter(torch.randn(C, C))  # now lives elsewhere
        assert Stacked().get(layers(m), x) is None
        assert (m(x).output - by_hand(m, x)).abs().max() < 1e-5


def test_an_in_place_update_is_seen_through_the_view():
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H)
    optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(2, 1, C)
    m(x).output.square().sum().backward()  # grad mode: the three layers, gradients for each
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 for lin in layers(m))
    optimizer.step()
    m.eval()
    with torch.no_grad():
        assert together(layers(m)) is not None  # the step wrote in place: still side by side
        assert (m(x).output - by_hand(m, x)).abs().max() < 1e-5


def test_load_state_dict_with_assign_lays_out_again():
    torch.manual_seed(0)
    source, target = MultiHeadAttention(C, H).eval(), MultiHeadAttention(C, H).eval()
    target.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    x = torch.randn(1, 1, C)
    with torch.no_grad():
        assert together(layers(target)) is not None
        assert (target(x).output - source(x).output).abs().max() < 1e-6


def test_a_hooked_or_wrapped_layer_is_called_not_bypassed():
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H).eval()
    x = torch.randn(1, 1, C)
    calls = []
    handle = m.q_proj.register_forward_hook(lambda module, args, out: calls.append("q"))
    out_handle = m.out_proj.register_forward_hook(lambda module, args, out: calls.append("o"))
    with torch.no_grad():
        m(x)
    assert calls == ["q", "o"]
    handle.remove()
    out_handle.remove()

    class Doubled(nn.Linear):  # a subclass (LoRA-like) changes what the layer computes
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(C, C)
    doubled.load_state_dict(m.v_proj.state_dict())
    m.v_proj = doubled
    with torch.no_grad():
        expected = by_hand(m, x)  # uses v_proj.weight; the subclass doubles v, so the outputs differ
        assert (m(x).output - expected).abs().max() > 1e-3
        assert call_linear(doubled, x).sub(2 * F.linear(x, doubled.weight, doubled.bias)).abs().max() == 0


def test_layers_that_cannot_stack_are_left_alone():
    a, b = nn.Linear(8, 4), nn.Linear(6, 4)  # different input widths
    lay_out_together([a, b])
    assert together([a, b]) is None
    c, d = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)
    lay_out_together([c, d])
    assert together([c, d]) is None


def test_cross_attention_projects_separately():
    torch.manual_seed(0)
    m = MultiHeadAttention(C, H, kdim=8, vdim=12).eval()
    x, y, z = torch.randn(1, 3, C), torch.randn(1, 5, 8), torch.randn(1, 5, 12)
    with torch.no_grad():
        assert m(x, y, z).output.shape == (1, 3, C)


def test_state_dict_saves_and_loads_with_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    m = MultiHeadAttention(C, H).eval()
    path = tmp_path / "m.safetensors"
    safetensors.save_file(m.state_dict(), str(path))  # tensors that share one storage without overlapping
    loaded = safetensors.load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in m.state_dict().items())
