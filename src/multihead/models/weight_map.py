"""Declarative weight maps: which checkpoint tensor fills which parameter of ours.

A model file states its map as data, one `Rule` per checkpoint key:

    Rule("encoder.layer.{i}.attention.self.query.weight", "layers.{i}.attention.q_proj.weight")
    Rule("h.{i}.attn.c_attn.weight", ("blocks.{i}.attention.q_proj.weight", ...), split_columns(3))

`{i}` stands for the layer index and is expanded for every layer. `load_state`
then applies the map strictly: a key the checkpoint lacks, a tensor whose shape
is not the one our parameter has, or a parameter of ours that no rule fills is
an error that names the key. Checkpoint keys no rule reads (a pooler, an MLM
head) are reported, not silently dropped. Checkpoint names live here and in the
model files' maps, never in the core.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the key."""


def identity(x: Tensor) -> tuple[Tensor, ...]:
    return (x,)


def transpose(x: Tensor) -> tuple[Tensor, ...]:
    """GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)."""
    return (x.t().contiguous(),)  # (in, out) -> (out, in)


def split_last(parts: int) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """Cut a fused tensor into `parts` equal pieces along its last dim (e.g. [q | k | v])."""

    def convert(x: Tensor) -> tuple[Tensor, ...]:
        if x.shape[-1] % parts != 0:
            raise CheckpointError(f"cannot split a tensor of shape {tuple(x.shape)} into {parts} equal parts")
        return tuple(p.contiguous() for p in x.chunk(parts, dim=-1))  # (..., parts·n) -> parts x (..., n)

    convert.__name__ = f"split_last({parts})"
    return convert


def transpose_then_split(parts: int) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """A fused Conv1D weight (in, parts·out) -> `parts` Linear weights (out, in)."""
    split = split_last(parts)

    def convert(x: Tensor) -> tuple[Tensor, ...]:
        return tuple(p.t().contiguous() for p in split(x))  # (in, parts·out) -> parts x (out, in)

    convert.__name__ = f"transpose_then_split({parts})"
    return convert


@dataclass(frozen=True)
class Rule:
    source: str  # checkpoint key; "{i}" stands for a layer index
    targets: str | tuple[str, ...]  # our parameter name(s) that the tensor fills
    convert: Callable[[Tensor], tuple[Tensor, ...]] = field(default=identity)  # one output per target

    def target_names(self) -> tuple[str, ...]:
        return (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

    def expand(self, num_layers: int) -> list[Rule]:
        """One rule per layer when the source names a layer, else this rule."""
        if "{i}" not in self.source:
            return [self]
        return [
            Rule(self.source.format(i=i), tuple(t.format(i=i) for t in self.target_names()), self.convert)
            for i in range(num_layers)
        ]


class LoadReport(NamedTuple):
    loaded: int  # how many of our parameters were filled
    ignored: tuple[str, ...]  # checkpoint keys skipped because an ignore pattern names them


def read_checkpoint(directory: str | Path) -> dict[str, Tensor]:
    """The tensors of a Hugging Face checkpoint folder: model.safetensors, else pytorch_model.bin."""
    directory = Path(directory)
    safetensors_file = directory / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    sharded = sorted(directory.glob("model-*.safetensors"))
    if sharded:
        from safetensors.torch import load_file

        tensors: dict[str, Tensor] = {}
        for shard in sharded:
            tensors.update(load_file(str(shard)))
        return tensors
    raise CheckpointError(
        f"{directory} holds no weights: expected model.safetensors or pytorch_model.bin"
    )


def read_config(directory: str | Path) -> dict:
    """A checkpoint folder's config.json, as a dict."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: it has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def _find(checkpoint: Mapping[str, Tensor], key: str, prefixes: Sequence[str]) -> str | None:
    for prefix in ("", *prefixes):
        if prefix + key in checkpoint:
            return prefix + key
    return None


def load_state(
    model: nn.Module,
    checkpoint: Mapping[str, Tensor],
    rules: Iterable[Rule],
    *,
    num_layers: int,
    prefixes: Sequence[str] = (),
    ignore: Sequence[str] = (),
) -> LoadReport:
    """Fill every parameter of `model` from `checkpoint` through `rules`, strictly.

    prefixes: tried in front of each source key when it is absent as is (a
        BertForMaskedLM checkpoint says "bert.embeddings...", a BertModel
        "embeddings...").
    ignore: regular expressions of checkpoint keys that are expected to be
        unused (position_ids buffers, a pooler); any other unread key is an error.
    """
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    plan: list[tuple[str, str, Tensor]] = []  # (checkpoint key, our name, tensor)
    read: set[str] = set()
    for rule in (r for base in rules for r in base.expand(num_layers)):
        key = _find(checkpoint, rule.source, prefixes)
        if key is None:
            raise CheckpointError(
                f"checkpoint is missing {rule.source!r} (it fills {', '.join(rule.target_names())})"
            )
        read.add(key)
        try:
            tensors = rule.convert(checkpoint[key])
        except (RuntimeError, ValueError) as error:  # e.g. a fused tensor that does not split: name the key
            raise CheckpointError(
                f"checkpoint key {key!r} of shape {tuple(checkpoint[key].shape)} does not convert "
                f"through {getattr(rule.convert, '__name__', rule.convert)!r}: {error}"
            ) from None
        names = rule.target_names()
        if len(tensors) != len(names):
            raise CheckpointError(f"{key!r}: {rule.convert.__name__} gave {len(tensors)} tensors for {len(names)} targets")
        for name, tensor in zip(names, tensors):
            if name not in params:
                raise KeyError(f"weight map names {name!r}, which is not a parameter of {type(model).__name__}")
            expected = tuple(params[name].shape)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"checkpoint key {key!r} has shape {tuple(checkpoint[key].shape)}, which gives "
                    f"{tuple(tensor.shape)} for {name}; expected {expected}"
                )
            plan.append((key, name, tensor))

    filled = {name for _, name, _ in plan}
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise KeyError(f"weight map leaves parameters of {type(model).__name__} unfilled: {unfilled}")
    patterns = [re.compile(p) for p in ignore]
    unread = sorted(k for k in checkpoint if k not in read)
    ignored = tuple(k for k in unread if any(p.search(k) for p in patterns))
    unexpected = [k for k in unread if k not in ignored]
    if unexpected:
        raise CheckpointError(
            f"checkpoint keys that {type(model).__name__} has no place for: {unexpected}; "
            f"is the checkpoint of another architecture?"
        )
    with torch.no_grad():
        for _, name, tensor in plan:
            params[name].copy_(tensor.to(params[name].dtype))
    return LoadReport(len(filled), ignored)
