"""GPT-2: a decoder-only transformer whose every attention layer is multihead.MultiHeadAttention.

    input_ids (B, T) --token_embedding + position_embedding--> x (B, T, C)
    num_layers times, pre-norm residual blocks:
        x = x + attention(attention_norm(x))     causal, bottom-right aligned, with biases
        x = x + mlp(mlp_norm(x))                 C -> 4·C -> GELU (tanh approximation) -> C
    logits = lm_head(final_norm(x))              (B, T, V); lm_head shares token_embedding's matrix

`load_gpt2(directory)` builds the model from a Hugging Face GPT-2 folder
(config.json + model.safetensors or pytorch_model.bin) through GPT2_CHECKPOINT_MAP.
The forward pass, `make_cache` and the checks are `decoder.Decoder`'s; this
file holds what is GPT-2's own: the config, the block, the learned position
embedding (each token's row comes from its position) and the checkpoint map.
Decoding: `forward(..., cache=model.make_cache())` runs a chunk against a KV
cache (each sequence's positions come from the cache's lengths, so the learned
position embedding is right for every row); `multihead.generate` does the
loop. `greedy` is the simplest decoder, recomputing the whole prefix each step.
The model has no dropout: it is meant for running pre-trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from ..nn.mha import MultiHeadAttention
from ..core.checks import check_token_ids, int_at_least, positive_number
from .checkpoint_map import check_hf_config
from .checkpoint_map import (
    CheckpointMap,
    Rule,
    load_model,
    split_last,
    transpose,
    transpose_then_split,
)
from .decoder import Decoder, DecoderOutput, Embedded, PreNormBlock  # noqa: F401  DecoderOutput: re-exported

ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}  # our name -> F.gelu's `approximate`


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # V: rows of the token embedding and width of the logits
    max_positions: int = 1024  # rows of the learned position embedding: the longest input
    d_model: int = 768  # C: width of the residual stream
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # H: attention heads per block; head_dim = C / H
    d_mlp: int | None = None  # hidden width of the MLP; None means 4·C, as in every released GPT-2
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's, HF's gelu_new) or "gelu" (exact erf)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_positions", "d_model", "num_layers", "num_heads"):
            positive_int(name, getattr(self, name))
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)  # frozen: fill the default once, here
        positive_int("d_mlp", self.d_mlp)
        if not isinstance(self.activation, str):
            raise TypeError(f"activation must be a str, one of {sorted(ACTIVATIONS)}, got "
                            f"{type(self.activation).__name__} {self.activation!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        positive_number("layer_norm_eps", self.layer_norm_eps)

    @classmethod
    def from_hf(cls, config: dict) -> GPT2Config:
        """From a Hugging Face GPT-2 config.json; refuses the variants this model does not compute."""
        check_hf_config(config, "gpt2")
        for key, supported in _HF_FIXED.items():
            if key in config and config[key] != supported:
                raise ValueError(
                    f"GPT-2 config sets {key}={config[key]!r}; only {key}={supported!r} is supported"
                )
        missing = [key for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if key not in config]
        if missing:
            raise ValueError(f"GPT-2 config lacks {', '.join(missing)}")
        hf_activation = config.get("activation_function", "gelu_new")
        if hf_activation not in _HF_ACTIVATIONS:
            raise ValueError(
                f"GPT-2 config sets activation_function={hf_activation!r}; "
                f"supported: {', '.join(sorted(_HF_ACTIVATIONS))}"
            )
        return cls(
            vocab_size=config["vocab_size"],
            max_positions=config["n_positions"],
            d_model=config["n_embd"],
            num_layers=config["n_layer"],
            num_heads=config["n_head"],
            d_mlp=config.get("n_inner"),
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            activation=_HF_ACTIVATIONS[hf_activation],
        )


# config.json settings that change what the network computes, and the only value we compute.
_HF_FIXED = {
    "scale_attn_weights": True,  # scores scaled by 1/√D
    "scale_attn_by_inverse_layer_idx": False,  # an extra 1/(layer + 1) on the scores
    "reorder_and_upcast_attn": False,  # a different order of operations in the scores
    "add_cross_attention": False,  # encoder-decoder blocks
    "tie_word_embeddings": True,  # lm_head is token_embedding
}
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_mlp)
        self.down = nn.Linear(config.d_mlp, config.d_model)
        self.approximate = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.gelu(self.up(x), approximate=self.approximate)  # (B, T, C) -> (B, T, 4·C)
        return self.down(hidden)  # (B, T, 4·C) -> (B, T, C)


class Block(PreNormBlock):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__(
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps),
            MultiHeadAttention(config.d_model, config.num_heads, causal=True, bias=True),
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps),
            MLP(config),
        )


class GPT2(Decoder):
    """GPT-2 language model: input_ids (B, T) -> DecoderOutput(logits (B, T, V), attentions)."""

    config_class = GPT2Config

    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.add_layers((Block(config) for _ in range(config.num_layers)),
                        nn.LayerNorm(config.d_model, eps=config.layer_norm_eps), tie_word_embeddings=True)

    @property
    def position_limit(self) -> int:
        """The longest sequence the model takes: its learned positions (what `multihead.generate` checks)."""
        return self.config.max_positions

    def embed(self, input_ids: Tensor, positions: Tensor, key_mask: Tensor | None) -> Embedded:
        """Token embedding + the learned embedding of each token's position (from the cache's lengths)."""
        if key_mask is not None:  # a padded token past the last position gets the last row: never used
            positions = positions.clamp(max=self.config.max_positions - 1)  # (T,) or (B, T)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T) -> (B, T, C)
        return Embedded(x, None)

    def kv_heads_and_dim(self) -> tuple[int, int]:
        return self.config.num_heads, self.config.d_model // self.config.num_heads


# Hugging Face GPT-2 -> ours. Conv1D stores (in, out), hence the transposes; c_attn
# holds [q | k | v] side by side along its output.
GPT2_RULES: tuple[Rule, ...] = (
    Rule("wte.weight", "token_embedding.weight"),
    Rule("wpe.weight", "position_embedding.weight"),
    Rule("h.{i}.ln_1.weight", "blocks.{i}.attention_norm.weight"),
    Rule("h.{i}.ln_1.bias", "blocks.{i}.attention_norm.bias"),
    Rule(
        "h.{i}.attn.c_attn.weight",
        ("blocks.{i}.attention.q_proj.weight", "blocks.{i}.attention.k_proj.weight",
         "blocks.{i}.attention.v_proj.weight"),
        transpose_then_split(3),
    ),
    Rule(
        "h.{i}.attn.c_attn.bias",
        ("blocks.{i}.attention.q_proj.bias", "blocks.{i}.attention.k_proj.bias",
         "blocks.{i}.attention.v_proj.bias"),
        split_last(3),
    ),
    Rule("h.{i}.attn.c_proj.weight", "blocks.{i}.attention.out_proj.weight", transpose),
    Rule("h.{i}.attn.c_proj.bias", "blocks.{i}.attention.out_proj.bias"),
    Rule("h.{i}.ln_2.weight", "blocks.{i}.mlp_norm.weight"),
    Rule("h.{i}.ln_2.bias", "blocks.{i}.mlp_norm.bias"),
    Rule("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.up.weight", transpose),
    Rule("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.up.bias"),
    Rule("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.down.weight", transpose),
    Rule("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.down.bias"),
    Rule("ln_f.weight", "final_norm.weight"),
    Rule("ln_f.bias", "final_norm.bias"),
)
GPT2_CHECKPOINT_MAP = CheckpointMap(
    GPT2_RULES,
    prefixes=("transformer.",),  # GPT2LMHeadModel checkpoints; GPT2Model ones have none
    ignore=(
        r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",  # older checkpoints saved the causal-mask buffers
        r"^lm_head\.weight$",  # the tied copy of wte.weight, when a checkpoint keeps it
    ),
)


def load_gpt2(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> GPT2:
    """A GPT2 with the parameters of a Hugging Face GPT-2 folder, loaded strictly, in eval mode."""
    return load_model(directory, GPT2Config, GPT2, GPT2_CHECKPOINT_MAP, dtype=dtype)


@torch.no_grad()
def greedy(model: GPT2, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """input_ids (B, T) -> (B, T + max_new_tokens): the most likely next token, appended, each step.

    Every step recomputes the whole prefix: the plainest decoder, kept as a reference.
    `multihead.generate.generate` decodes with a KV cache, in batches, and samples.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"model must be a GPT2, got {type(model).__name__}")
    int_at_least("max_new_tokens", max_new_tokens, 0)
    _, T = check_token_ids(input_ids, model.config.vocab_size, model.config.max_positions)
    if T + max_new_tokens > model.config.max_positions:
        raise ValueError(
            f"input_ids has T={T} tokens and max_new_tokens={max_new_tokens}; together they exceed "
            f"max_positions={model.config.max_positions}"
        )
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids).logits[:, -1]  # (B, T, V) -> (B, V): the last position predicts the next token
        next_id = logits.argmax(dim=-1, keepdim=True)  # (B, V) -> (B, 1)
        ids = torch.cat([ids, next_id], dim=1)  # (B, T) -> (B, T + 1)
    return ids
