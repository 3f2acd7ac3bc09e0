"""Declarative checkpoint maps: which checkpoint tensor fills which parameter of ours.

A model file states its map as data, one `Rule` per checkpoint key:

    Rule("encoder.layer.{i}.attention.self.query.weight", "layers.{i}.attention.q_proj.weight")
    Rule("h.{i}.attn.c_attn.weight", ("blocks.{i}.attention.q_proj.weight", ...), split_columns(3))

`{i}` stands for the layer index and is expanded for every layer. `load_state`
then applies the rules strictly: a key the checkpoint lacks, a tensor whose
shape is not the one our parameter has, or a parameter of ours that no rule
fills is an error that names the key. Checkpoint keys no rule reads (a pooler,
an MLM head) are reported, not silently dropped. A `CheckpointMap` is the rules
with the key prefixes to try and the keys expected to go unused; `load_model`
builds a model from a Hugging Face folder through one. Checkpoint names live
here and in the model files' maps, never in the core.

Every file of a folder that cannot be read (a truncated model.safetensors or
pytorch_model.bin, a config.json that is not a JSON object) raises one
`CheckpointError` line that names the file.
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
    """A checkpoint that does not fit the model, or a file of it that cannot be read: the message names it."""


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


class CheckpointMap(NamedTuple):
    """How one architecture's checkpoints fill its parameters."""

    rules: tuple[Rule, ...]  # which checkpoint tensor fills which parameter
    prefixes: tuple[str, ...] = ()  # tried in front of each source key absent as is ("bert.", "transformer.")
    ignore: tuple[str, ...] = ()  # regular expressions of checkpoint keys expected to go unused


class LoadReport(NamedTuple):
    loaded: int  # how many of our parameters were filled
    ignored: tuple[str, ...]  # checkpoint keys skipped because an ignore pattern names them


def _first_line(error: BaseException) -> str:
    """An error's message cut to one line: some libraries explain over a dozen."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, not an OSError
        raise CheckpointError(f"{path} cannot be read as safetensors (truncated or corrupt?): "
                              f"{_first_line(error)}") from None


def _read_torch_file(path: Path) -> dict[str, Tensor]:
    import pickle

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path} cannot be read by torch.load (truncated or corrupt?): "
                              f"{_first_line(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors (a state dict)")
    return state


def read_checkpoint(directory: str | Path) -> dict[str, Tensor]:
    """The tensors of a Hugging Face checkpoint folder: model.safetensors, else pytorch_model.bin, else shards."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        return _read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _read_torch_file(directory / "pytorch_model.bin")
    shards = sorted(directory.glob("model-*.safetensors"))
    if shards:
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(_read_safetensors(shard))
        return tensors
    raise CheckpointError(
        f"{directory} holds no weights: expected model.safetensors or pytorch_model.bin"
    )


def read_json_object(path: str | Path) -> dict:
    """A JSON file that holds an object, as a dict; anything else is one CheckpointError naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not valid JSON: it is not UTF-8 text") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object {{...}}, got a JSON {type(value).__name__}")
    return value


def check_hf_config(config, model_type: str) -> None:
    """A parsed config.json (a dict) of `model_type` (a config that names none is taken as one)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
    found = config.get("model_type", model_type)
    if found != model_type:
        raise CheckpointError(f"config.json says model_type={found!r}, {model_type!r} expected")


def read_config(directory: str | Path) -> dict:
    """A checkpoint folder's config.json, as a dict."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: it has no config.json")
    return read_json_object(path)


def _find(checkpoint: Mapping[str, Tensor], key: str, prefixes: Sequence[str]) -> str | None:
    for prefix in ("", *prefixes):
        if prefix + key in checkpoint:
            return prefix + key
    return None


def _convert(rule: Rule, key: str, tensor: Tensor) -> tuple[Tensor, ...]:
    """The rule's conversion of one checkpoint tensor, one output per target, or an error naming the key."""
    try:
        tensors = rule.convert(tensor)
    except (RuntimeError, ValueError) as error:  # e.g. a fused tensor that does not split: name the key
        raise CheckpointError(
            f"checkpoint key {key!r} of shape {tuple(tensor.shape)} does not convert "
            f"through {getattr(rule.convert, '__name__', rule.convert)!r}: {error}"
        ) from None
    if len(tensors) != len(rule.target_names()):
        raise CheckpointError(f"{key!r}: {rule.convert.__name__} gave {len(tensors)} tensors for "
                              f"{len(rule.target_names())} targets")
    return tensors


def _plan(model: nn.Module, params: Mapping[str, Tensor], checkpoint: Mapping[str, Tensor],
          rules: Iterable[Rule], num_layers: int, prefixes: Sequence[str]) -> list[tuple[str, str, Tensor]]:
    """(checkpoint key, our name, tensor) for every rule, each checked against our parameter's shape."""
    plan = []
    for rule in (r for base in rules for r in base.expand(num_layers)):
        key = _find(checkpoint, rule.source, prefixes)
        if key is None:
            raise CheckpointError(
                f"checkpoint is missing {rule.source!r} (it fills {', '.join(rule.target_names())})"
            )
        for name, tensor in zip(rule.target_names(), _convert(rule, key, checkpoint[key])):
            if name not in params:
                raise KeyError(f"checkpoint map names {name!r}, which is not a parameter of {type(model).__name__}")
            expected = tuple(params[name].shape)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"checkpoint key {key!r} has shape {tuple(checkpoint[key].shape)}, which gives "
                    f"{tuple(tensor.shape)} for {name}; expected {expected}"
                )
            plan.append((key, name, tensor))
    return plan


def _unread_keys(model: nn.Module, checkpoint: Mapping[str, Tensor], read: set[str],
                 ignore: Sequence[str]) -> tuple[str, ...]:
    """The checkpoint keys no rule read that an ignore pattern names; any other unread key is an error."""
    patterns = [re.compile(p) for p in ignore]
    unread = sorted(k for k in checkpoint if k not in read)
    ignored = tuple(k for k in unread if any(p.search(k) for p in patterns))
    unexpected = [k for k in unread if k not in ignored]
    if unexpected:
        raise CheckpointError(
            f"checkpoint keys that {type(model).__name__} has no place for: {unexpected}; "
            f"is the checkpoint of another architecture?"
        )
    return ignored


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
    Every check runs before the first parameter is written: a refused
    checkpoint leaves the model as it was.
    """
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    plan = _plan(model, params, checkpoint, rules, num_layers, prefixes)
    filled = {name for _, name, _ in plan}
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise KeyError(f"checkpoint map leaves parameters of {type(model).__name__} unfilled: {unfilled}")
    ignored = _unread_keys(model, checkpoint, {key for key, _, _ in plan}, ignore)
    with torch.no_grad():
        for _, name, tensor in plan:
            params[name].copy_(tensor.to(params[name].dtype))
    return LoadReport(len(filled), ignored)


def load_model(directory: str | Path, config_class: type, model_class: type,
               checkpoint_map: CheckpointMap | Callable[[object], CheckpointMap], *,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """model_class(config_class.from_hf(config.json)) in `dtype`, filled strictly from the folder, in eval mode.

    checkpoint_map: a CheckpointMap, or a function of the config that gives
        one (a map that depends on the config's biases or tied embeddings).
    `model.load_report` says how many parameters were filled and which
    checkpoint keys went unused (an MLM head, say).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"directory must be a str or pathlib.Path, got {type(directory).__name__}")
    config = config_class.from_hf(read_config(directory))
    model = model_class(config).to(dtype)
    spec = checkpoint_map if isinstance(checkpoint_map, CheckpointMap) else checkpoint_map(config)
    model.load_report = load_state(model, read_checkpoint(directory), spec.rules, num_layers=config.num_layers,
                                   prefixes=spec.prefixes, ignore=spec.ignore)
    return model.eval()
