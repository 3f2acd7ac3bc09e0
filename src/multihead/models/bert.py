"""A BERT-family encoder whose every attention layer is multihead.MultiHeadAttention.

    input_ids (B, T) -> word + position + segment embeddings -> LayerNorm
        -> num_layers x [ x = norm(x + attention(x)); x = norm(x + ffn(x)) ]   (post-norm)
        -> hidden (B, T, C)

Loads Hugging Face BERT checkpoints (BertModel, BertForMaskedLM, ...; MiniLM
and sentence-transformers models are BERTs) through `BERT_CHECKPOINT_MAP`. The
checkpoint names live in that map (and the decoders' maps), nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.checks import check_token_ids, flag, int_at_least, positive_int, positive_number
from ..nn.mha import MultiHeadAttention, head_masks_per_layer
from .checkpoint_map import CheckpointError, CheckpointMap, Rule, check_hf_config, load_model

_ACTIVATIONS = {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int  # rows of the word embedding
    max_positions: int  # learned absolute positions: the longest input
    type_vocab_size: int  # segment ids (sentence A / B)
    d_model: int  # C, the hidden width
    num_layers: int  # encoder layers
    num_heads: int  # H; the head dim is d_model / num_heads
    ffn_dim: int  # width of the feed-forward layer's hidden
    layer_norm_eps: float  # epsilon of every LayerNorm
    activation: str  # feed-forward non-linearity: "gelu" (erf), "gelu_new" (tanh) or "relu"
    pad_token_id: int  # the id that padding uses

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_positions", "type_vocab_size", "d_model", "num_layers", "num_heads",
                     "ffn_dim"):
            positive_int(name, getattr(self, name))
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        positive_number("layer_norm_eps", self.layer_norm_eps)
        if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if int_at_least("pad_token_id", self.pad_token_id, 0) >= self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        """From a Hugging Face config.json; settings this encoder does not implement are refused."""
        check_hf_config(config, "bert")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(f"position_embedding_type={position_type!r} is not supported (only 'absolute')")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise CheckpointError("BERT as a decoder / with cross-attention is not supported")
        activation = config.get("hidden_act", "gelu")
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise CheckpointError(f"hidden_act={activation!r} is not supported; one of {sorted(_ACTIVATIONS)}")
        try:
            return cls(
                vocab_size=config["vocab_size"],
                max_positions=config["max_position_embeddings"],
                type_vocab_size=config.get("type_vocab_size", 2),
                d_model=config["hidden_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"],
                ffn_dim=config["intermediate_size"],
                layer_norm_eps=config.get("layer_norm_eps", 1e-12),
                activation=activation,
                pad_token_id=0 if config.get("pad_token_id") is None else config["pad_token_id"],
            )
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks {missing.args[0]!r}, which a BERT config needs") from None


# Hugging Face BERT key -> our parameter. Per layer, "{i}" is the layer index.
BERT_RULES: tuple[Rule, ...] = (
    Rule("embeddings.word_embeddings.weight", "token_embedding.weight"),
    Rule("embeddings.position_embeddings.weight", "position_embedding.weight"),
    Rule("embeddings.token_type_embeddings.weight", "segment_embedding.weight"),
    Rule("embeddings.LayerNorm.weight", "embedding_norm.weight"),
    Rule("embeddings.LayerNorm.bias", "embedding_norm.bias"),
    *(
        Rule(f"encoder.layer.{{i}}.{theirs}.{kind}", f"layers.{{i}}.{ours}.{kind}")
        for theirs, ours in (
            ("attention.self.query", "attention.q_proj"),
            ("attention.self.key", "attention.k_proj"),
            ("attention.self.value", "attention.v_proj"),
            ("attention.output.dense", "attention.out_proj"),
            ("attention.output.LayerNorm", "attention_norm"),
            ("intermediate.dense", "ffn_up"),
            ("output.dense", "ffn_down"),
            ("output.LayerNorm", "ffn_norm"),
        )
        for kind in ("weight", "bias")
    ),
)
BERT_CHECKPOINT_MAP = CheckpointMap(
    BERT_RULES,
    prefixes=("bert.",),  # BertForMaskedLM & co. keep the encoder under "bert."; BertModel has no prefix
    ignore=(r"position_ids$", r"^(bert\.)?pooler\.", r"^cls\."),  # keys the encoder does not use
)


class EncoderOutput(NamedTuple):
    hidden: Tensor  # (B, T, C), the last layer's output
    attentions: tuple[Tensor, ...] | None  # per layer (B, H, T, T) when need_weights, else None


class LayerOutput(NamedTuple):
    hidden: Tensor  # (B, T, C)
    weights: Tensor | None  # (B, H, T, T) when need_weights


class BertLayer(nn.Module):
    """Post-norm encoder layer: x = norm(x + attention(x)); x = norm(x + ffn(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        C, eps = config.d_model, config.layer_norm_eps
        self.attention = MultiHeadAttention(C, config.num_heads)
        self.attention_norm = nn.LayerNorm(C, eps=eps)
        self.ffn_up = nn.Linear(C, config.ffn_dim)
        self.activation = _ACTIVATIONS[config.activation]
        self.ffn_down = nn.Linear(config.ffn_dim, C)
        self.ffn_norm = nn.LayerNorm(C, eps=eps)

    def forward(self, x: Tensor, key_mask: Tensor | None, need_weights: bool,
                head_mask: Tensor | None = None) -> LayerOutput:
        attended = self.attention(x, key_mask=key_mask, need_weights=need_weights, head_mask=head_mask)
        x = self.attention_norm(x + attended.output)
        x = self.ffn_norm(x + self.ffn_down(self.activation(self.ffn_up(x))))
        return LayerOutput(x, attended.weights)


class Bert(nn.Module):
    """The BERT encoder: token ids (B, T) -> hidden states (B, T, C), and per-head weights on request."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        self.config = config
        C = config.d_model
        self.token_embedding = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position_embedding = nn.Embedding(config.max_positions, C)
        self.segment_embedding = nn.Embedding(config.type_vocab_size, C)
        self.embedding_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(
        self,
        input_ids: Tensor,
        *,
        key_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        need_weights: bool = False,
        head_mask: Tensor | None = None,
    ) -> EncoderOutput:
        """input_ids (B, T) int; key_mask (B, T) bool, True = a real token; segment_ids (B, T) int.

        need_weights: also return every layer's per-head attention weights (B, H, T, T).
        head_mask: (H,) for every layer or (num_layers, H); 1 keeps a head, 0 sets
            its output to 0 before W^O (`MultiHeadAttention.forward`). Hugging
            Face's shapes; a mask of ones changes nothing, bit for bit.
        """
        B, T = check_token_ids(input_ids, self.config.vocab_size, self.config.max_positions)
        flag("need_weights", need_weights)
        layer_masks = head_masks_per_layer(head_mask, self.config.num_layers, self.config.num_heads,
                                           self.token_embedding.weight.device)
        segment_ids = _segments(segment_ids, input_ids, self.config.type_vocab_size)
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.token_embedding(input_ids) + self.position_embedding(positions) + self.segment_embedding(segment_ids)
        x = self.embedding_norm(x)  # (B, T, C)
        attentions = []
        for layer, layer_mask in zip(self.layers, layer_masks):
            x, weights = layer(x, key_mask, need_weights, layer_mask)
            attentions.append(weights)
        return EncoderOutput(x, tuple(attentions) if need_weights else None)


def _segments(segment_ids, input_ids: Tensor, type_vocab_size: int) -> Tensor:
    """segment_ids (B, T) of ids in [0, type_vocab_size), checked; zeros (all sentence A) when None."""
    if segment_ids is None:
        return torch.zeros_like(input_ids)
    if not isinstance(segment_ids, Tensor) or segment_ids.dtype not in (torch.int64, torch.int32):
        got = segment_ids.dtype if isinstance(segment_ids, Tensor) else type(segment_ids).__name__
        raise TypeError(f"segment_ids must be an int64 or int32 tensor (B, T), got {got}")
    if segment_ids.shape != input_ids.shape:
        raise ValueError(f"segment_ids must be (B, T) = {tuple(input_ids.shape)} like input_ids, "
                         f"got {tuple(segment_ids.shape)}")
    if bool(((segment_ids < 0) | (segment_ids >= type_vocab_size)).any()):
        raise ValueError(f"segment_ids must lie in [0, type_vocab_size={type_vocab_size}), "
                         f"got {segment_ids.min().item()}..{segment_ids.max().item()}")
    return segment_ids


def load_bert(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Bert:
    """A Bert with the parameters of a Hugging Face checkpoint folder, in eval mode.

    `model.load_report` says how many parameters were filled and which
    checkpoint keys went unused (an MLM head, say).
    """
    return load_model(directory, BertConfig, Bert, BERT_CHECKPOINT_MAP, dtype=dtype)
