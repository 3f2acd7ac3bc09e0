"""A Llama-style decoder whose every attention layer is multihead.MultiHeadAttention.

    input_ids (B, T) --token_embedding--> x (B, T, C)           no position embedding: RoPE rotates q and k
    num_layers times, pre-norm residual blocks:
        x = x + attention(attention_norm(x))     causal, RoPE, G key/value heads (GQA), no biases
        x = x + mlp(mlp_norm(x))                 SwiGLU: down(silu(gate(x)) * up(x))
    logits = lm_head(final_norm(x))              (B, T, V); RMSNorm everywhere

`load_llama(directory)` builds the model from a Hugging Face Llama folder
(config.json + safetensors) through the checkpoint map of `llama_checkpoint_map`.
The forward pass, `make_cache` and the checks are `decoder.Decoder`'s; this
file holds what is Llama's own: the config, RMSNorm, SwiGLU, the block, the
embedding (token ids alone: positions go to RoPE) and the checkpoint map.
Positions come from the rotary embedding (`multihead.nn.rope`, Hugging Face's
half-split convention), so a KV cache only has to say where each sequence
stands (`cache.lengths`). `LlamaConfig.from_hf` refuses what this model does
not compute (rope scaling of any kind, activations other than SiLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import flag, positive_int
from ..nn.mha import MultiHeadAttention
from ..nn.rope import RotaryEmbedding
from ..core.checks import positive_number
from .checkpoint_map import check_hf_config
from .checkpoint_map import CheckpointMap, Rule, load_model
from .decoder import Decoder, DecoderOutput, Embedded, PreNormBlock  # noqa: F401  DecoderOutput: re-exported


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
        positive_number("rms_norm_eps", self.rms_norm_eps)
        if positive_number("rope_theta", self.rope_theta) <= 1:
            raise ValueError(f"rope_theta must be a finite number > 1, got {self.rope_theta!r}")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            flag(name, getattr(self, name))

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        """From a Hugging Face Llama config.json; refuses the variants this model does not compute."""
        check_hf_config(config, "llama")
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
            rope_theta=rope_theta,
            attention_bias=config.get("attention_bias", False),
            mlp_bias=config.get("mlp_bias", False),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
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


class Llama(Decoder):
    """Llama-style language model: input_ids (B, T) -> DecoderOutput(logits (B, T, V), attentions).

    No position limit: RoPE computes any position, and max_positions (what
    the model was trained on) is only the default length of a static cache.
    """

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        rope = RotaryEmbedding(config.head_dim, base=config.rope_theta)  # no parameters: one shared by every layer
        self.add_layers((LlamaBlock(config, rope) for _ in range(config.num_layers)),
                        RMSNorm(config.d_model, config.rms_norm_eps),
                        tie_word_embeddings=config.tie_word_embeddings)

    def embed(self, input_ids: Tensor, positions: Tensor, key_mask: Tensor | None) -> Embedded:
        """The token embedding alone; the positions go to every attention layer, which rotates q and k."""
        return Embedded(self.token_embedding(input_ids), positions)  # (B, T) -> (B, T, C)

    def kv_heads_and_dim(self) -> tuple[int, int]:
        return self.config.num_kv_heads, self.config.head_dim


# Hugging Face Llama -> ours: nn.Linear on both sides, so no conversions. The body sits under
# "model." in LlamaForCausalLM checkpoints (GPT-2's "transformer."), lm_head at the top level.
LLAMA_RULES: tuple[Rule, ...] = (
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
LLAMA_ATTENTION_BIAS_RULES: tuple[Rule, ...] = tuple(
    Rule(f"layers.{{i}}.self_attn.{theirs}.bias", f"blocks.{{i}}.attention.{ours}.bias")
    for theirs, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj"))
)
LLAMA_MLP_BIAS_RULES: tuple[Rule, ...] = tuple(
    Rule(f"layers.{{i}}.mlp.{name}_proj.bias", f"blocks.{{i}}.mlp.{name}.bias") for name in ("gate", "up", "down")
)
LLAMA_LM_HEAD_RULE = Rule("lm_head.weight", "lm_head.weight")  # untied checkpoints only
LLAMA_IGNORED = (
    r"(^|\.)rotary_emb\.inv_freq$",  # older checkpoints saved RoPE's frequencies; we compute them
)
LLAMA_TIED_IGNORED = (r"^lm_head\.weight$",)  # the tied copy of embed_tokens.weight, when a checkpoint keeps it


def llama_checkpoint_map(config: LlamaConfig) -> CheckpointMap:
    """The map for a checkpoint of this config: biases and lm_head only where the config has them."""
    rules = LLAMA_RULES
    if config.attention_bias:
        rules += LLAMA_ATTENTION_BIAS_RULES
    if config.mlp_bias:
        rules += LLAMA_MLP_BIAS_RULES
    if not config.tie_word_embeddings:
        rules += (LLAMA_LM_HEAD_RULE,)
    ignore = LLAMA_IGNORED + (LLAMA_TIED_IGNORED if config.tie_word_embeddings else ())
    # the body sits under "model." in LlamaForCausalLM checkpoints; a bare LlamaModel has no prefix
    return CheckpointMap(rules, prefixes=("model.",), ignore=ignore)


def load_llama(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Llama:
    """A Llama with the parameters of a Hugging Face Llama folder, loaded strictly, in eval mode."""
    return load_model(directory, LlamaConfig, Llama, llama_checkpoint_map, dtype=dtype)
