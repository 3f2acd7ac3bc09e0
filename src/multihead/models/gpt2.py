"""GPT-2: a decoder-only transformer whose every attention layer is multihead.MultiHeadAttention.

    input_ids (B, T) --token_embedding + position_embedding--> x (B, T, C)
    num_layers times, pre-norm residual blocks:
        x = x + attention(attention_norm(x))     causal, bottom-right aligned, with biases
        x = x + mlp(mlp_norm(x))                 C -> 4·C -> GELU (tanh approximation) -> C
    logits = lm_head(final_norm(x))              (B, T, V); lm_head shares token_embedding's matrix

`load_gpt2(directory)` builds the model from a Hugging Face GPT-2 folder
(config.json + model.safetensors or pytorch_model.bin) through GPT2_WEIGHT_MAP.
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

from .._checks import positive_int
from ..cache import KVCache
from ..module import MultiHeadAttention
from ._checks import check_token_ids
from .decoder import DecoderOutput, PreNormBlock, check_cache, check_key_mask, init_weights, make_decoder_cache
from .weight_map import (
    Rule,
    load_state,
    read_checkpoint,
    read_config,
    split_last,
    transpose,
    transpose_then_split,
)

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
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

    @classmethod
    def from_hf(cls, config: dict) -> GPT2Config:
        """From a Hugging Face GPT-2 config.json; refuses the variants this model does not compute."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        if config.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config is for model_type {config['model_type']!r}, expected 'gpt2'")
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


class GPT2(nn.Module):
    """GPT-2 language model: input_ids (B, T) -> DecoderOutput(logits (B, T, V), attentions)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied: logits score x against every token's embedding
        self.apply(init_weights)

    def forward(
        self, input_ids: Tensor, *, key_mask: Tensor | None = None, cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> DecoderOutput:
        """input_ids (B, T) int64 token ids at positions 0..T-1 (or after the cache's tokens).

        key_mask: (B, T) bool, True = a real token; padding goes on the right,
            so every real token keeps its position. Padded positions' logits
            are meaningless; real tokens' logits do not depend on the padding.
        cache: a KVCache of num_layers layers (`make_cache()`): the chunk's
            tokens sit at positions cache.lengths[b] + 0..T-1 of their
            sequence, attend to everything cached, and are appended (only the
            real ones, as key_mask says).
        need_weights: also return every layer's attention weights (B, H, T, S),
            S = T without a cache, the cache's key slots with one.
        """
        B, T = check_token_ids(input_ids, self.config.vocab_size, self.config.max_positions)
        if key_mask is not None:
            check_key_mask(key_mask, input_ids)
        if cache is None:
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        else:
            check_cache(cache, self.config.num_layers)
            positions = cache.positions(T, batch_size=B, device=input_ids.device).to(input_ids.device)  # (B, T)
            _check_cached_positions(positions, key_mask, self.config.max_positions)
            if key_mask is not None:  # a padded token past the last position gets the last row: never used
                positions = positions.clamp(max=self.config.max_positions - 1)  # (B, T)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T) -> (B, T, C)
        attentions = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, key_mask, need_weights, None if cache is None else cache[i])
            attentions.append(weights)
        logits = self.lm_head(self.final_norm(x))  # (B, T, C) -> (B, T, V)
        return DecoderOutput(logits, tuple(attentions) if need_weights else None)

    @property
    def position_limit(self) -> int:
        """The longest sequence the model takes: its learned positions (what `multihead.generate` checks)."""
        return self.config.max_positions

    def make_cache(self, batch_size: int | None = None, max_length: int | None = None,
                   static: bool = False) -> KVCache:
        """A KV cache for this model, on its parameters' device and dtype.

        Dynamic (grows) by default; static=True preallocates batch_size x
        max_length tokens per layer (max_length defaults to max_positions).
        """
        return make_decoder_cache(self, num_kv_heads=self.config.num_heads,
                                  head_dim=self.config.d_model // self.config.num_heads,
                                  batch_size=batch_size, max_length=max_length, static=static,
                                  default_max_length=self.config.max_positions)


def _check_cached_positions(positions: Tensor, key_mask: Tensor | None, max_positions: int) -> None:
    """Real tokens of a cached chunk must fall inside the learned positions."""
    if torch.compiler.is_compiling():
        return
    real = positions.shape[1] if key_mask is None else key_mask.sum(dim=1)  # (B, T) -> (B,)
    last = positions[:, 0] + real - 1  # (B,): position of each sequence's last real token in the chunk
    if bool((last >= max_positions).any()):
        b = int(torch.argmax(last))
        raise ValueError(f"sequence {b} would reach position {int(last[b])} with this chunk; the model has "
                         f"max_positions={max_positions} learned positions (0..{max_positions - 1})")


# Hugging Face GPT-2 -> ours. Conv1D stores (in, out), hence the transposes; c_attn
# holds [q | k | v] side by side along its output.
GPT2_WEIGHT_MAP: tuple[Rule, ...] = (
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
GPT2_PREFIXES = ("transformer.",)  # GPT2LMHeadModel checkpoints; GPT2Model ones have none
GPT2_IGNORED = (
    r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",  # older checkpoints saved the causal-mask buffers
    r"^lm_head\.weight$",  # the tied copy of wte.weight, when a checkpoint keeps it
)


def load_gpt2(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> GPT2:
    """A GPT2 with the weights of a Hugging Face GPT-2 folder, loaded strictly, in eval mode."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    config = GPT2Config.from_hf(read_config(directory))
    model = GPT2(config).to(dtype)
    model.load_report = load_state(
        model, read_checkpoint(directory), GPT2_WEIGHT_MAP,
        num_layers=config.num_layers, prefixes=GPT2_PREFIXES, ignore=GPT2_IGNORED,
    )
    return model.eval()


@torch.no_grad()
def greedy(model: GPT2, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """input_ids (B, T) -> (B, T + max_new_tokens): the most likely next token, appended, each step.

    Every step recomputes the whole prefix: the plainest decoder, kept as a reference.
    `multihead.generate.generate` decodes with a KV cache, in batches, and samples.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"model must be a GPT2, got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
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
