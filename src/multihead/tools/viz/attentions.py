"""transformers' `outputs.attentions` as the head view's weights: one sequence's (L, H, T, T).

    out = model(**batch, output_attentions=True)
    weights = stack_attentions(out.attentions, batch_index=0)   # L x (B, H, T, T) -> (L, H, T, T)

transformers returns attention weights as a tuple with one tensor per layer,
each (B, H, T, S). The head view, the figures and the statistics draw one
sequence's self-attention, so every layer must have the same shape, at
least one head and T == S. Each way this can fail has its own message,
including the two shapes that `multihead.hf.options` makes on purpose: a
layer it was not asked for is (B, 0, t, S), and `rows=` keeps t < S query
rows.
"""

from __future__ import annotations

import operator
import sys

import numpy as np

__all__ = ["is_layer_sequence", "stack_attentions"]


def is_layer_sequence(weights) -> bool:
    """Whether `weights` is per-layer weights as transformers returns them: a tuple or list of tensors or arrays."""
    torch = sys.modules.get("torch")  # an object can be a torch.Tensor only once torch is imported
    kinds = (np.ndarray,) if torch is None else (np.ndarray, torch.Tensor)
    return isinstance(weights, (tuple, list)) and len(weights) > 0 and all(isinstance(x, kinds) for x in weights)


def floating_tensor(name: str, x, must: str):
    """x if it is a torch.Tensor of floats, None if it is no torch.Tensor; else TypeError "{name} must {must}"."""
    torch = sys.modules.get("torch")  # an object can be a torch.Tensor only once torch is imported
    if torch is None or not isinstance(x, torch.Tensor):
        return None
    if not x.is_floating_point():
        raise TypeError(f"{name} must {must}, got {x.dtype}")
    return x


def _dims(name: str, layer) -> tuple[int, ...]:
    """The shape of one layer's tensor or array, or a TypeError naming it."""
    if floating_tensor(name, layer, "hold floating attention weights") is not None:
        return tuple(layer.shape)
    if isinstance(layer, np.ndarray):
        if not np.issubdtype(layer.dtype, np.floating):
            raise TypeError(f"{name} must hold floating attention weights, got dtype {layer.dtype}")
        return layer.shape
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray (B, H, T, S), got {type(layer).__name__}")


def _check_layers(name: str, layers) -> tuple[int, int, int, int]:
    """(B, H, T, T) shared by every layer, or the error that says which layer breaks it and why."""
    if not isinstance(layers, (tuple, list)):
        raise TypeError(f"{name} must be a tuple or list of per-layer tensors (B, H, T, S), as transformers' "
                        f"outputs.attentions, got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"{name} is empty: no layer's weights; call the model with output_attentions=True")
    first = None
    for i, layer in enumerate(layers):
        shape = _dims(f"{name}[{i}]", layer)
        if len(shape) != 4:
            raise ValueError(f"{name}[{i}] has {len(shape)} dims, (B, H, T, S) expected, got {shape}")
        B, H, T, S = shape
        if H == 0:
            raise ValueError(f"{name}[{i}] has no heads, shape {shape}: multihead.hf.options(layers=...) makes "
                             f"weights only for the layers it names; pass those, e.g. "
                             f"[a for a in out.attentions if a.shape[1]]")
        if T != S:
            raise ValueError(f"{name}[{i}] has T = {T} query rows and S = {S} keys, shape {shape}; the head view "
                             f"draws self-attention of every token, (B, H, T, T): not cross-attention, and not "
                             f"some rows only (multihead.hf.options(rows=...))")
        if first is not None and shape != first:
            raise ValueError(f"{name}[{i}] has shape {shape} but {name}[0] has {first}; every layer must have "
                             f"the same (B, H, T, T)")
        first = first or shape
    return first


def _batch_row(name: str, batch_index, B: int) -> int:
    """The sequence to draw: batch_index checked against B; None only for a batch of one."""
    if batch_index is None:
        if B != 1:
            raise ValueError(f"{name} holds a batch of B = {B} sequences; pick one: "
                             f"multihead.viz.head_view({name}, tokens, batch_index=i)")
        return 0
    if isinstance(batch_index, bool):
        raise TypeError(f"batch_index must be an int, got bool {batch_index!r}")
    try:
        index = operator.index(batch_index)
    except TypeError:
        raise TypeError(f"batch_index must be an int, got {type(batch_index).__name__}") from None
    if not -B <= index < B:
        raise ValueError(f"batch_index must be in [{-B}, {B}) for {name} of batch size B = {B}, got {index}")
    return index % B


def _to_numpy(layer) -> np.ndarray:
    """One layer's (H, T, T) on the CPU: float32 and float64 kept, float16/bfloat16 as float32."""
    if isinstance(layer, np.ndarray):
        return layer if layer.dtype in (np.float32, np.float64) else layer.astype(np.float32)
    import torch

    t = layer.detach().cpu()
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()


def stack_attentions(attentions, *, batch_index: int | None = None, name: str = "attentions") -> np.ndarray:
    """One sequence's weights (L, H, T, T) from per-layer (B, H, T, T) tensors, as transformers returns them.

    attentions: a tuple or list of torch tensors or NumPy arrays, one per
    layer (`outputs.attentions`). batch_index: the sequence of the batch to
    take; None accepts only a batch of one. name: what error messages call
    the argument. The values are checked where they are drawn
    (`multihead.viz.stats.as_weights`).
    """
    B = _check_layers(name, attentions)[0]
    row = _batch_row(name, batch_index, B)
    return np.stack([_to_numpy(layer[row]) for layer in attentions])  # L x (H, T, T) -> (L, H, T, T)
