"""What the decoders (GPT-2, Llama) share: the base model, the pre-norm block, their output, the checks.

    input_ids (B, T) --embed--> x (B, T, C)       each model's own: learned positions (GPT-2) or none (RoPE)
    num_layers times, pre-norm residual blocks:
        x = x + attention(attention_norm(x))      causal MultiHeadAttention, with the layer's cache
        x = x + mlp(mlp_norm(x))
    logits = lm_head(final_norm(x))               (B, T, V)

`Decoder` holds the forward pass, `make_cache` and the argument checks; a
model file subclasses it with its config class, its blocks (a
`PreNormBlock` of its own norm and MLP, with the same four names, so the
checkpoint maps address `blocks.{i}.attention_norm` etc. for both) and its
`embed`: how token ids at given positions become x, and which positions
the attention layers get (RoPE's) if any.

A call is checked whole before any layer runs (token ids, key_mask,
need_weights, the cache and the positions the chunk would reach), so a
refused call leaves the cache exactly as it was.

`decode_step` is the same arithmetic for a decoding loop's later steps,
without the checks the loop has made once (`multihead.generate`): the
chunk's place in the cache (positions, slots, mask) is worked out once for
every layer, RoPE's angles once, each block runs its attention module's
unchecked step (`MultiHeadAttention.decode`: the module's own stages, no
argument checked again), and no tensor is read on the host, so the step
runs lean in eager mode and compiles to one graph (fullgraph=True).
Under torch.compile `forward` compiles whole too: the checks that read
tensor values (token ids in range, right padding, positions) are skipped
while compiling, as the cache's are.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.checks import flag, positive_int
from ..nn.cache import ChunkLayout, DynamicCache, KVCache, LayerCache, StaticCache, chunk_lengths_from_key_mask
from ..nn.family import check_cache_window
from ..nn.mha import head_masks_per_layer
from ..nn.rope import Rotary
from ..core.checks import check_token_ids


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    attentions: tuple[Tensor, ...] | None  # per layer (B, H, T, S) when need_weights, else None; S = T without a cache


class BlockOutput(NamedTuple):
    hidden: Tensor  # (B, T, C)
    weights: Tensor | None  # (B, H, T, T) when need_weights


class Embedded(NamedTuple):
    """What a decoder's `embed` gives the blocks."""

    x: Tensor  # (B, T, C): the chunk's tokens, ready for the first block
    rotary_positions: Tensor | None  # (T,) or (B, T) positions for RoPE attention; None: the attention takes none


class PreNormBlock(nn.Module):
    """x = x + attention(attention_norm(x)); x = x + mlp(mlp_norm(x))."""

    def __init__(self, attention_norm: nn.Module, attention: nn.Module, mlp_norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attention_norm = attention_norm
        self.attention = attention
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(self, x: Tensor, key_mask: Tensor | None, need_weights: bool, cache=None,
                positions: Tensor | None = None, context_parallel=None, head_mask: Tensor | None = None) -> BlockOutput:
        rotary = {} if positions is None else {"positions": positions}  # only rotary attention takes positions
        if context_parallel is not None:
            rotary["context_parallel"] = context_parallel
        attended = self.attention(self.attention_norm(x), key_mask=key_mask, need_weights=need_weights,
                                  cache=cache, head_mask=head_mask, **rotary)
        x = x + attended.output
        x = x + self.mlp(self.mlp_norm(x))
        return BlockOutput(x, attended.weights)

    def decode(self, x: Tensor, layer: LayerCache, layout: ChunkLayout, rotation: Rotary | None) -> Tensor:
        """forward(x, cache=layer) for a chunk x (B, T, C) whose place in the cache is `layout`, unchecked.

        The attention module's own unchecked step (`MultiHeadAttention.decode`):
        the same stages as its forward, without re-checking per layer what the
        decoding loop checked once.
        """
        x = x + self.attention.decode(self.attention_norm(x), layer, layout, rotation)  # (B, T, C)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """A causal language model: input_ids (B, T) -> DecoderOutput(logits (B, T, V), attentions).

    Subclasses set `config_class`, call `__init__(config)` (which makes
    token_embedding), add what they need, then `add_layers(blocks,
    final_norm, tie_word_embeddings=...)`, and define `embed`,
    `kv_heads_and_dim` and, when positions run out, `position_limit`.
    """

    config_class: type = object  # the config dataclass the subclass takes
    position_limit: int | None = None  # the longest sequence it takes; None: any (RoPE)

    def __init__(self, config) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)

    def add_layers(self, blocks: Iterable[nn.Module], final_norm: nn.Module, *, tie_word_embeddings: bool) -> None:
        """The blocks, the final norm and lm_head (tied to token_embedding or not); then the initialisation."""
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.lm_head = nn.Linear(self.config.d_model, self.config.vocab_size, bias=False)
        if tie_word_embeddings:  # logits score x against every token's embedding
            self.lm_head.weight = self.token_embedding.weight
        self.apply(init_parameters)

    def embed(self, input_ids: Tensor, positions: Tensor, key_mask: Tensor | None) -> Embedded:
        """x (B, T, C) for token ids at `positions` ((T,), or (B, T) with a cache), and RoPE's positions."""
        raise NotImplementedError

    def kv_heads_and_dim(self) -> tuple[int, int]:
        """(G, D): key/value heads per layer and their width, what a cache stores."""
        raise NotImplementedError

    def forward(
        self, input_ids: Tensor, *, key_mask: Tensor | None = None, cache: KVCache | None = None,
        need_weights: bool = False, context_parallel=None, head_mask: Tensor | None = None,
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
        context_parallel: a `multihead.distributed.ContextParallel`: input_ids and
            key_mask are this rank's part of the sequence (`shard_sequence(ids,
            dim=1)`), the tokens take their global positions, attention runs
            across the group, and the logits are this rank's part. No cache or
            weights.
        head_mask: (H,) for every layer or (num_layers, H); 1 keeps a head, 0 sets
            its output to 0 before W^O (`MultiHeadAttention.forward`). Hugging
            Face's shapes; a mask of ones changes nothing, bit for bit.
        Every argument is checked before the first layer runs: a refused call
        leaves the cache as it was.
        """
        positions = self._check_call(input_ids, key_mask, cache, need_weights, context_parallel)
        layer_masks = self._head_masks(head_mask, context_parallel)
        x, rotary_positions = self.embed(input_ids, positions, key_mask)  # (B, T) -> (B, T, C)
        attentions = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, key_mask, need_weights, None if cache is None else cache[i], rotary_positions,
                               context_parallel, layer_masks[i])
            attentions.append(weights)
        logits = self.lm_head(self.final_norm(x))  # (B, T, C) -> (B, T, V)
        return DecoderOutput(logits, tuple(attentions) if need_weights else None)

    def decode_step(self, input_ids: Tensor, cache: KVCache, key_mask: Tensor | None = None) -> Tensor:
        """logits (B, T, V) of a chunk input_ids (B, T) appended to `cache`: forward's arithmetic, unchecked.

        For a decoding loop that ran its first chunk through `forward` (which
        checked the cache, the batch and the positions) and guarantees what
        forward would check again every step: token ids in [0, vocab_size),
        key_mask (B, T) bool and right-padded (or None), every real token
        inside the model's positions and the cache's room. Nothing reads a
        tensor's value: no host sync, no graph break under torch.compile.
        """
        chunk_lengths = None if key_mask is None else key_mask.sum(dim=1)  # (B, T) -> (B,)
        layout = cache.layout(input_ids.shape[1], chunk_lengths)  # once for every layer
        x, rotary_positions = self.embed(input_ids, layout.positions, key_mask)  # (B, T) -> (B, T, C)
        rope, rotation = None, None
        for block, layer in zip(self.blocks, cache):
            if rotary_positions is not None and block.attention.rope is not rope:  # layers share one: angles once
                rope = block.attention.rope
                rotation = rope(rotary_positions, dtype=x.dtype)  # cos, sin (B, 1, T, D)
            x = block.decode(x, layer, layout, rotation)
        return self.lm_head(self.final_norm(x))  # (B, T, C) -> (B, T, V)

    def _head_masks(self, head_mask, context_parallel) -> list:
        """head_mask checked once, as one (H,) mask or None per layer; under context_parallel a refusal is
        told to every rank (they wait in the attention's agreement), as the other checks' are."""
        device = self.token_embedding.weight.device
        if context_parallel is None or head_mask is None:
            return head_masks_per_layer(head_mask, self.config.num_layers, self.config.num_heads, device)
        with context_parallel.refusals_heard(type(self).__name__):
            return head_masks_per_layer(head_mask, self.config.num_layers, self.config.num_heads, device)

    def _check_call(self, input_ids, key_mask, cache, need_weights, context_parallel=None) -> Tensor:
        """Every check of a forward call; the chunk's positions: (T,) without a cache, (B, T) with one."""
        if context_parallel is not None:
            return self._check_context_parallel(input_ids, key_mask, cache, need_weights, context_parallel)
        limit = self.position_limit
        if torch.compiler.is_compiling():  # check_token_ids reads the ids' values: a graph break per call
            B, T = input_ids.shape
        else:
            B, T = check_token_ids(input_ids, self.config.vocab_size, sys.maxsize if limit is None else limit)
        if key_mask is not None:
            check_key_mask(key_mask, input_ids)
        flag("need_weights", need_weights)
        if cache is None:
            return torch.arange(T, device=input_ids.device)  # (T,)
        check_cache(cache, self.config.num_layers)
        positions = cache.positions(T, batch_size=B, device=input_ids.device).to(input_ids.device)  # (B, T)
        if positions.shape[0] != B:
            raise ValueError(f"input_ids has batch size B={B}, the cache holds {positions.shape[0]} sequences; "
                             f"reset() it or make a new one for another batch")
        if limit is not None:
            check_cached_positions(positions, key_mask, limit)
        if not cache.uniform:
            self._check_mixed_caches(cache, B, T, key_mask)
        return positions

    def _check_mixed_caches(self, cache: KVCache, B: int, T: int, key_mask: Tensor | None) -> None:
        """Every layer's cache takes the chunk (shapes, room, its layer's window) before any layer writes.

        A KVCache may mix kinds (a window cache for a windowed layer, a full one
        for the rest): then a later layer may refuse what the first accepted,
        after the first had written. Layers of one kind accept alike, and the
        first layer's own check comes before anything is written.
        """
        G, D = self.kv_heads_and_dim()
        weight = next(self.parameters())
        chunk = weight.new_zeros(()).expand(B, G, T, D)  # () -> (B, G, T, D): a layer's k and v, no memory
        chunk_lengths = None if key_mask is None else chunk_lengths_from_key_mask(key_mask, B, T, weight.device)
        for block, layer in zip(self.blocks, cache):
            check_cache_window(layer, block.attention.config.window)
            layer.plan(chunk, chunk, chunk_lengths)  # checks only: nothing written

    def _check_context_parallel(self, input_ids, key_mask, cache, need_weights, cp) -> Tensor:
        """The checks of a context-parallel forward; the part's global positions (part,)."""
        from ..integrations.distributed import ContextParallel  # torch.distributed only for those who use it

        if not isinstance(cp, ContextParallel):
            raise TypeError(f"context_parallel must be a multihead.distributed.ContextParallel or None, "
                            f"got {type(cp).__name__}")
        with cp.refusals_heard(type(self).__name__):  # a refusal here is heard by the ranks already attending
            if cache is not None or flag("need_weights", need_weights):
                raise ValueError("context_parallel runs a whole sequence split across ranks: no cache, "
                                 "no need_weights")
            limit = self.position_limit
            if limit is not None and cp.length > limit:
                raise ValueError(f"context_parallel length={cp.length} is beyond the model's {limit} positions")
            _, T = check_token_ids(input_ids, self.config.vocab_size, sys.maxsize)
            if T != cp.part():
                raise ValueError(f"input_ids has {T} tokens; under context_parallel it must be this rank's part, "
                                 f"{cp.part()} tokens of length={cp.length} (cut it with "
                                 f"shard_sequence(ids, dim=1, layout={cp.layout!r}))")
            cp.check_part("input_ids", input_ids)  # cut with another layout or length: refused, not wrong
            if key_mask is not None:
                check_key_mask(key_mask, input_ids)  # a right-padded mask stays right-padded in every part
        return cp.positions(input_ids.device)  # (part,)

    def make_cache(self, batch_size: int | None = None, max_length: int | None = None,
                   static: bool = False) -> KVCache:
        """A KV cache for this model (G key/value heads per layer), on its parameters' device and dtype.

        Dynamic (grows) by default; static=True preallocates batch_size x
        max_length tokens per layer (max_length defaults to max_positions).
        """
        flag("static", static)
        if batch_size is not None:
            positive_int("batch_size", batch_size)
        weight = next(self.parameters())
        if not static:
            if max_length is not None:
                raise ValueError("max_length is for a static cache (static=True); a dynamic cache grows")
            return DynamicCache(self.config.num_layers, batch_size=batch_size, device=weight.device)
        if batch_size is None:
            raise ValueError("a static cache needs batch_size (it is preallocated), got None")
        max_length = self.config.max_positions if max_length is None else positive_int("max_length", max_length)
        num_kv_heads, head_dim = self.kv_heads_and_dim()
        return StaticCache(self.config.num_layers, batch_size, max_length, num_kv_heads, head_dim,
                           dtype=weight.dtype, device=weight.device)


def check_cache(cache, num_layers: int) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a multihead.nn.cache.KVCache (model.make_cache()), got {type(cache).__name__}")
    if cache.num_layers != num_layers:
        raise ValueError(f"cache has {cache.num_layers} layers, the model has num_layers={num_layers}")


def check_cached_positions(positions: Tensor, key_mask: Tensor | None, max_positions: int) -> None:
    """Real tokens of a cached chunk must fall inside the learned positions."""
    if torch.compiler.is_compiling():
        return
    real = positions.shape[1] if key_mask is None else key_mask.sum(dim=1)  # (B, T) -> (B,)
    last = positions[:, 0] + real - 1  # (B,): position of each sequence's last real token in the chunk
    if bool((last >= max_positions).any()):
        b = int(torch.argmax(last))
        raise ValueError(f"sequence {b} would reach position {int(last[b])} with this chunk; the model has "
                         f"max_positions={max_positions} learned positions (0..{max_positions - 1})")


def check_key_mask(key_mask, input_ids: Tensor) -> None:
    if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
        got = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
        raise TypeError(f"key_mask must be a bool tensor (B, T), True = a real token, got {got}")
    if key_mask.shape != input_ids.shape:
        raise ValueError(f"key_mask must have input_ids' shape (B, T) = {tuple(input_ids.shape)}, "
                         f"got {tuple(key_mask.shape)}")
    if key_mask.device != input_ids.device:
        raise ValueError(f"key_mask is on {key_mask.device} but input_ids is on {input_ids.device}")
    if torch.compiler.is_compiling():  # the padding check reads the mask: a graph break, skipped as the cache's
        return
    if (key_mask[:, 1:] & ~key_mask[:, :-1]).any():  # a real token after padding
        rows = (key_mask[:, 1:] & ~key_mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"key_mask must pad on the right (True for the real tokens, then False), "
            f"got a real token after padding in rows {rows}"
        )


def init_parameters(module: nn.Module) -> None:
    """GPT-2's and Llama's initialisation (normal, std 0.02; zero biases), for a model trained rather than loaded."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
