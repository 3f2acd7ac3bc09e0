"""A BERT-family encoder whose every attention layer is multihead.MultiHeadAttention.

    input_ids (B, T) -> word + position + segment embeddings -> LayerNorm
        -> num_layers x [ x = norm(x + attention(x)); x = norm(x + ffn(x)) ]   (post-norm)
        -> hidden (B, T, C)

Loads Hugging Face BERT checkpoints (BertModel, BertForMaskedLM, ...; MiniLM
and sentence-transformers models are BERTs) through `BERT_WEIGHT_MAP`. The
only checkpoint names in the project live in that map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..module import MultiHeadAttention
from ._checks import check_token_ids
from .weight_map import CheckpointError, Rule, load_state, read_checkpoint, read_config

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

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        """From a Hugging Face config.json; settings this encoder does not implement are refused."""
        if config.get("model_type", "bert") != "bert":
            raise CheckpointError(f"config.json says model_type={config.get('model_type')!r}, 'bert' expected")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(f"position_embedding_type={position_type!r} is not supported (only 'absolute')")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise CheckpointError("BERT as a decoder / with cross-attention is not supported")
        activation = config.get("hidden_act", "gelu")
        if activation not in _ACTIVATIONS:
            raise CheckpointError(f"hidden_act={activation!r} is not supported; one of {sorted(_ACTIVATIONS)}")
        try:
            return cls(
                vocab_size=int(config["vocab_size"]),
                max_positions=int(config["max_position_embeddings"]),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                d_model=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                ffn_dim=int(config["intermediate_size"]),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                activation=activation,
                pad_token_id=int(config.get("pad_token_id") or 0),
            )
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks {missing.args[0]!r}, which a BERT config needs") from None


# Hugging Face BERT key -> our parameter. Per layer, "{i}" is the layer index.
BERT_WEIGHT_MAP: tuple[Rule, ...] = (
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
# Keys a BERT checkpoint may hold that the encoder does not use.
BERT_IGNORED = (r"position_ids$", r"^(bert\.)?pooler\.", r"^cls\.")


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

    def forward(self, x: Tensor, key_mask: Tensor | None, need_weights: bool) -> LayerOutput:
        attended = self.attention(x, key_mask=key_mask, need_weights=need_weights)
        x = self.attention_norm(x + attended.output)
        x = self.ffn_norm(x + self.ffn_down(self.activation(self.ffn_up(x))))
        return LayerOutput(x, attended.weights)


class Bert(nn.Module):
    """The BERT encoder: token ids (B, T) -> hidden states (B, T, C), and per-head weights on request."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
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
    ) -> EncoderOutput:
        """input_ids (B, T) int; key_mask (B, T) bool, True = a real token; segment_ids (B, T) int.

        need_weights: also return every layer's per-head attention weights (B, H, T, T).
        """
        B, T = check_token_ids(input_ids, self.config.vocab_size, self.config.max_positions)
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        elif tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids must be (B, T) = {(B, T)} like input_ids, got {tuple(segment_ids.shape)}")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.token_embedding(input_ids) + self.position_embedding(positions) + self.segment_embedding(segment_ids)
        x = self.embedding_norm(x)  # (B, T, C)
        attentions = []
        for layer in self.layers:
            x, weights = layer(x, key_mask, need_weights)
            attentions.append(weights)
        return EncoderOutput(x, tuple(attentions) if need_weights else None)


def load_bert(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Bert:
    """A Bert with the weights of a Hugging Face checkpoint folder, in eval mode.

    `model.load_report` says how many parameters were filled and which
    checkpoint keys went unused (an MLM head, say).
    """
    config = BertConfig.from_hf(read_config(directory))
    model = Bert(config).to(dtype)
    model.load_report = load_state(
        model, read_checkpoint(directory), BERT_WEIGHT_MAP,
        num_layers=config.num_layers, prefixes=("bert.",), ignore=BERT_IGNORED,
    )
    return model.eval()
