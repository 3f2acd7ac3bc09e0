"""A Llama-style decoder whose every attention layer is multihead.MultiHeadAttention.

    input_ids (B, T) --token_embedding--> x (B, T, C)           no position embedding: RoPE rotates q and k
    num_layers times, pre-norm residual blocks:
        x = x + attention(attention_norm(x))     causal, RoPE, G key/value heads (GQA), no biases
        x = x + mlp(mlp_norm(x))                 SwiGLU: down(silu(gate(x)) * up(x))
    logits = lm_head(final_norm(x))              (B, T, V); RMSNorm everywhere

`load_llama(directory)` builds the model from a Hugging Face Llama folder
(config.json + safetensors) through the weight map of `llama_weight_map`.
Positions come from the rotary embedding (`multihead.rope`, Hugging Face's
half-split convention), so a KV cache only has to say where each sequence
stands (`cache.lengths`). `LlamaConfig.from_hf` refuses what this model does
not compute (rope scaling of any kind, activations other than SiLU).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import positive_int
from ..cache import KVCache
from ..module import MultiHeadAttention
from ..rope import RotaryEmbedding
from ._checks import check_token_ids
from .decoder import DecoderOutput, PreNormBlock, check_cache, check_key_mask, init_weights, make_decoder_cache
from .weight_map import Rule, load_state, read_checkpoint, read_config


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000  # V: rows of the token embedding and width of the logits
    max_positions: int = 2048  # max_position_embeddings: the trained context; default static-cache length
    d_model: int = 4096  # C: width of the residual stream
    num_layers: int = 32  # transformer blocks
    num_heads: int = 32  # H: query heads per block
    num_kv_heads: int | None = None  # G: key/value heads (GQA); None means num_heads (plain MHA)
    head_dim: int | None = None  # D: width of each head; None means C / H
    d_mlp: int = 11008  # hidden width of the SwiGLU MLP (intermediate_size)
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope_theta: float = 10000.0  # RoPE base: θ_i = rope_theta^(-2i/D)
    attention_bias: bool = False  # biases on q, k, v and output projections
    mlp_bias: bool = False  # biases on gate, up and down projections
    tie_word_embeddings: bool = False  # lm_head shares token_embedding's matrix

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_positions", "d_model", "num_layers", "num_heads", "d_mlp"):
            positive_int(name, getattr(self, name))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)  # frozen: fill the default once, here
        positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.num_heads != 0:
                raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads} "
                                 f"when head_dim is not given")
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        positive_int("head_dim", self.head_dim)
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) \
                or not math.isfinite(self.rope_theta) or self.rope_theta <= 1:
            raise ValueError(f"rope_theta must be a finite number > 1, got {self.rope_theta!r}")

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        """From a Hugging Face Llama config.json; refuses the variants this model does not compute."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        if config.get("model_type", "llama") != "llama":
            raise ValueError(f"config is for model_type {config['model_type']!r}, expected 'llama'")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in config]
        if missing:
            raise ValueError(f"Llama config lacks {', '.join(missing)}")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama config sets hidden_act={config['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if config.get("rope_scaling") is not None:
            raise ValueError(f"Llama config sets rope_scaling={config['rope_scaling']!r}; only plain RoPE "
                             f"(rope_scaling=None) is supported")
        rope_theta = config.get("rope_theta", 10000.0)
        parameters = config.get("rope_parameters")  # transformers >= 5 keeps theta and the type here
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ValueError(f"Llama config's rope_parameters must be a dict, got {parameters!r}")
            rope_type = parameters.get("rope_type", parameters.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"Llama config sets rope_parameters rope_type={rope_type!r}; only 'default' "
                                 f"(plain RoPE, no scaling) is supported")
            unknown = sorted(set(parameters) - {"rope_type", "type", "rope_theta"})
            if unknown:
                raise ValueError(f"Llama config's rope_parameters has {unknown}, which plain RoPE does not use")
            rope_theta = parameters.get("rope_theta", rope_theta)
        return cls(
            vocab_size=config["vocab_size"],
            max_positions=config.get("max_position_embeddings", 2048),
            d_model=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            d_mlp=config["intermediate_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 and cast back before the weight (as Llama)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, C)
        return self.weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_mlp, bias=config.mlp_bias)
        self.up = nn.Linear(config.d_model, config.d_mlp, bias=config.mlp_bias)
        self.down = nn.Linear(config.d_mlp, config.d_model, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.silu(self.gate(x)) * self.up(x)  # (B, T, C) -> (B, T, d_mlp)
        return self.down(hidden)  # (B, T, d_mlp) -> (B, T, C)


class LlamaBlock(PreNormBlock):
    def __init__(self, config: LlamaConfig, rope: RotaryEmbedding) -> None:
        super().__init__(
            RMSNorm(config.d_model, config.rms_norm_eps),
            MultiHeadAttention(
                config.d_model, config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                causal=True, bias=config.attention_bias, rope=rope,
            ),
            RMSNorm(config.d_model, config.rms_norm_eps),
            SwiGLU(config),
        )


class Llama(nn.Module):
    """Llama-style language model: input_ids (B, T) -> DecoderOutput(logits (B, T, V), attentions)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        rope = RotaryEmbedding(config.head_dim, base=config.rope_theta)  # no weights: one shared by every layer
        self.blocks = nn.ModuleList(LlamaBlock(config, rope) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.apply(init_weights)

    def forward(
        self, input_ids: Tensor, *, key_mask: Tensor | None = None, cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> DecoderOutput:
        """input_ids (B, T) int64 token ids at positions 0..T-1 (or after the cache's tokens).

        key_mask: (B, T) bool, True = a real token, padding on the right.
        cache: a KVCache of num_layers layers (`make_cache()`): the chunk's
            tokens sit at positions cache.lengths[b] + 0..T-1 (RoPE's offset),
            attend to everything cached, and the real ones are appended.
        need_weights: also return every layer's attention weights (B, H, T, S).
        """
        # RoPE has no table to run out of: max_position_embeddings is what the model was trained on, not a limit
        B, T = check_token_ids(input_ids, self.config.vocab_size, sys.maxsize)
        if key_mask is not None:
            check_key_mask(key_mask, input_ids)
        if cache is None:
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        else:
            check_cache(cache, self.config.num_layers)
            positions = cache.positions(T, batch_size=B, device=input_ids.device).to(input_ids.device)  # (B, T)
        x = self.token_embedding(input_ids)  # (B, T) -> (B, T, C)
        attentions = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, key_mask, need_weights, None if cache is None else cache[i], positions)
            attentions.append(weights)
        logits = self.lm_head(self.final_norm(x))  # (B, T, C) -> (B, T, V)
        return DecoderOutput(logits, tuple(attentions) if need_weights else None)

    position_limit = None  # RoPE computes any position: no length limit for `multihead.generate` to check

    def make_cache(self, batch_size: int | None = None, max_length: int | None = None,
                   static: bool = False) -> KVCache:
        """A KV cache for this model (G key/value heads per layer), on its parameters' device and dtype.

        Dynamic (grows) by default; static=True preallocates batch_size x
        max_length tokens per layer (max_length defaults to max_positions).
        """
        return make_decoder_cache(self, num_kv_heads=self.config.num_kv_heads, head_dim=self.config.head_dim,
                                  batch_size=batch_size, max_length=max_length, static=static,
                                  default_max_length=self.config.max_positions)


# Hugging Face Llama -> ours: nn.Linear on both sides, so no conversions. The body sits under
# "model." in LlamaForCausalLM checkpoints (GPT-2's "transformer."), lm_head at the top level.
LLAMA_WEIGHT_MAP: tuple[Rule, ...] = (
    Rule("embed_tokens.weight", "token_embedding.weight"),
    Rule("layers.{i}.input_layernorm.weight", "blocks.{i}.attention_norm.weight"),
    Rule("layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attention.q_proj.weight"),
    Rule("layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attention.k_proj.weight"),
    Rule("layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attention.v_proj.weight"),
    Rule("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attention.out_proj.weight"),
    Rule("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    Rule("layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate.weight"),
    Rule("layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up.weight"),
    Rule("layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight"),
    Rule("norm.weight", "final_norm.weight"),
)
LLAMA_ATTENTION_BIAS_MAP: tuple[Rule, ...] = tuple(
    Rule(f"layers.{{i}}.self_attn.{theirs}.bias", f"blocks.{{i}}.attention.{ours}.bias")
    for theirs, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj"))
)
LLAMA_MLP_BIAS_MAP: tuple[Rule, ...] = tuple(
    Rule(f"layers.{{i}}.mlp.{name}_proj.bias", f"blocks.{{i}}.mlp.{name}.bias") for name in ("gate", "up", "down")
)
LLAMA_LM_HEAD_RULE = Rule("lm_head.weight", "lm_head.weight")  # untied checkpoints only
LLAMA_PREFIXES = ("model.",)  # LlamaForCausalLM; a bare LlamaModel has none
LLAMA_IGNORED = (
    r"(^|\.)rotary_emb\.inv_freq$",  # older checkpoints saved RoPE's frequencies; we compute them
)
LLAMA_TIED_IGNORED = (r"^lm_head\.weight$",)  # the tied copy of embed_tokens.weight, when a checkpoint keeps it


def llama_weight_map(config: LlamaConfig) -> tuple[Rule, ...]:
    """The rules for a checkpoint of this config: biases and lm_head only where the config has them."""
    rules = LLAMA_WEIGHT_MAP
    if config.attention_bias:
        rules += LLAMA_ATTENTION_BIAS_MAP
    if config.mlp_bias:
        rules += LLAMA_MLP_BIAS_MAP
    if not config.tie_word_embeddings:
        rules += (LLAMA_LM_HEAD_RULE,)
    return rules


def load_llama(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Llama:
    """A Llama with the weights of a Hugging Face Llama folder, loaded strictly, in eval mode."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    config = LlamaConfig.from_hf(read_config(directory))
    model = Llama(config).to(dtype)
    ignore = LLAMA_IGNORED + (LLAMA_TIED_IGNORED if config.tie_word_embeddings else ())
    model.load_report = load_state(
        model, read_checkpoint(directory), llama_weight_map(config),
        num_layers=config.num_layers, prefixes=LLAMA_PREFIXES, ignore=ignore,
    )
    return model.eval()
