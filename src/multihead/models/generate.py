"""Autoregressive decoding for the decoders of `multihead.models` (GPT-2, Llama): greedy or sampled.

    out = generate(model, input_ids, key_mask=key_mask, max_new_tokens=20)             # greedy, KV cache
    out = generate(model, input_ids, max_new_tokens=20, do_sample=True, top_p=0.9, seed=1)
    for step in stream(model, input_ids, max_new_tokens=20):                           # token by token
        step.tokens                                                                    # (B,)

A model is anything with the decoders' contract: `forward(input_ids (B, T), *,
key_mask, cache) -> (logits (B, T, V), ...)`, `make_cache(batch_size,
max_length, static)` and `config.vocab_size`; `position_limit` (the longest
sequence it takes, None for RoPE models) bounds prompt + new tokens.

With the cache (use_cache=True, the default) the prompt runs once and each
step feeds only the new token; without it every step runs the whole sequence
again. Both feed the model the same tokens at the same positions and draw the
same random numbers, so they choose the same tokens (up to float rounding of
the logits deciding a near tie, which the tests do not meet).

Batches. Prompts of different lengths come right-padded, key_mask (B, T)
True for the real tokens: each sequence continues from its own last real
token, at its own positions, and never sees another's padding. The result is
one tensor (B, T + max_new_tokens), each row its prompt, then its new tokens,
then pad_token_id; `lengths` says where each row's real tokens end.

Sampling (do_sample=True): logits / temperature, then top_k (keep the k most
likely, ties kept), then top_p (keep the most likely tokens until their mass
reaches top_p), softmax in float32, and one uniform number per sequence per
step mapped through the cumulative distribution. The uniforms come from a
torch.Generator seeded with `seed` (the global RNG when seed is None), so one
seed gives the same tokens every time, with or without the cache.

Small temperatures. The logits are shifted so that the largest is 0 before
they are divided (softmax does not change), so every scaled score is <= 0
and none overflows: a temperature so small that logits / temperature would
pass float32's range (1e-40, say) leaves the most likely token with all the
mass, which is greedy decoding (argmax). Only logits that tie exactly at the
top share it, as they would at any temperature.

Eager and compiled. With the cache, the prompt runs once through the
model's checked `forward`; every later token goes through `decode_step`
(the same arithmetic without the per-step checks, which this loop has made
once: see `multihead.models.decoder`). compile=True compiles that step,
gpt-fast style: a static cache sized for the longest prompt +
max_new_tokens (rounded up to a power of two, so that calls of similar
lengths share one compiled step) and torch.compile(fullgraph=True), with
CUDA graphs (mode "reduce-overhead") on CUDA. The step is kept per model
and compile settings in a table that does not keep the model alive; the
prompt runs eagerly. The compiled step computes what the eager one does,
so it chooses the same tokens (up to float rounding deciding a near tie).
Which one is faster depends on the machine and the model:
benchmarks/decode.py measures both (on the project's 2-core CPU the eager
step is mostly Python and dispatch, which the compiled one removes).

Many shapes, few compiles. A serving loop meets every batch size, prompt
length, max_new_tokens and stop setting; none of them fails, and few of
them compile. The batch dimension is dynamic (one graph for every B >= 2;
torch gives B = 1 its own), every step is fed a mask (one graph with or
without stop tokens), and the cache lengths are powers of two, so a model
compiles one graph per (B = 1 or not, cache length, dtype, device): 4 for
a float32 model that decodes at most 128 tokens. (With CUDA graphs each
batch size still records a CUDA graph of its own: a recording, not a
compile.) At most CompileConfig.max_compiles graphs (8) are compiled per
model; a call whose shape would need one more, or that torch.compile
refuses (its own recompile limit), decodes eagerly, with the same tokens,
and the first such call warns once per model (RuntimeWarning); nothing
raises.

Text. `generate` works on token ids. To print new tokens, decode them with
the prompt (`TextTokenizer.continuation`): a SentencePiece tokenizer writes
a word's leading space only when the word is not the first token decoded.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.checks import flag
from ..core.checks import check_token_ids, int_at_least, positive_number
from .decoder import check_key_mask


class NewTokens(NamedTuple):
    """One decoding step, as `stream` yields it."""

    tokens: Tensor  # (B,) int64: each sequence's new token; pad_token_id where the sequence had already stopped
    real: Tensor  # (B,) bool: True where `tokens` holds a generated token (the sequence was still running)
    finished: Tensor  # (B,) bool: sequences that have produced a stop token, this step included


class GenerateOutput(NamedTuple):
    """What `generate` returns: every sequence as one padded row."""

    tokens: Tensor  # (B, T + max_new_tokens) int64: prompt's real tokens, new tokens, then pad_token_id
    lengths: Tensor  # (B,) int64: real tokens per row, prompt + generated (a stop token included)
    prompt_lengths: Tensor  # (B,) int64: real tokens of each prompt; new tokens start there
    finished: Tensor  # (B,) bool: the row ended on a stop token (else it ran max_new_tokens steps)

    def new_tokens(self, b: int) -> list[int]:
        """Row b's generated tokens, as a list (stop token included)."""
        return self.tokens[b, int(self.prompt_lengths[b]):int(self.lengths[b])].tolist()

    def sequences(self) -> list[list[int]]:
        """Every row's real tokens, prompt and generated, as lists of their own lengths."""
        return [self.tokens[b, :int(n)].tolist() for b, n in enumerate(self.lengths)]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass(frozen=True)
class CompileConfig:
    """How `generate(..., compile=...)` compiles the decoding step: torch.compile(fullgraph=True), B dynamic."""

    mode: str | None = None  # torch.compile's mode; None: "reduce-overhead" (CUDA graphs) on CUDA, else "default"
    backend: str = "inductor"  # torch.compile's backend; "aot_eager" and "eager" trace without generating code
    # compiled graphs per model (and mode, backend) at most; a call that would need one more decodes
    # eagerly (the same tokens), with one warning per model: a serving loop never fails on a new shape
    max_compiles: int = 8

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in COMPILE_MODES:
            raise ValueError(f"CompileConfig mode must be None or one of {COMPILE_MODES}, got {self.mode!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise TypeError(f"CompileConfig backend must be a torch.compile backend name (str), got {self.backend!r}")
        int_at_least("CompileConfig max_compiles", self.max_compiles, 1)

    def resolved_mode(self, device: torch.device) -> str:
        """The mode used on `device`: CUDA graphs on CUDA unless a mode was given."""
        if self.mode is not None:
            return self.mode
        return "reduce-overhead" if device.type == "cuda" else "default"


class _Settings(NamedTuple):
    do_sample: bool  # sample instead of argmax
    temperature: float  # logits are divided by it before sampling
    top_k: int | None  # keep only the k most likely tokens
    top_p: float | None  # keep the smallest most-likely set whose mass reaches top_p
    stop: Tensor | None  # (N,) stop token ids, or None


def generate(
    model: nn.Module, input_ids: Tensor, *, key_mask: Tensor | None = None, max_new_tokens: int,
    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    seed: int | None = None, stop_tokens: Iterable[int] = (), use_cache: bool = True,
    static_cache: bool = False, pad_token_id: int = 0, compile: bool | str | CompileConfig = False,
) -> GenerateOutput:
    """Continue every prompt of input_ids (B, T) by up to max_new_tokens tokens.

    input_ids: (B, T) int token ids, B >= 1 prompts of T >= 1 tokens (an
        empty batch is refused with a ValueError naming its shape).
    key_mask: (B, T) bool, True = a real token, right-padded (prompts of
        different lengths); None = every token is real.
    do_sample: False picks the most likely token (greedy); True samples with
        temperature, top_k and top_p (which greedy refuses: they would be ignored).
    temperature: a finite number > 0; one so small that logits / temperature
        would overflow float32 (1e-40) gives the greedy tokens (argmax), not
        NaN: the scores are shifted to a maximum of 0 before the division.
    seed: the sampling's torch.Generator's seed (same seed, same tokens).
    stop_tokens: ids that end a sequence when generated (kept in the output,
        then pad_token_id); the loop ends early when every sequence has stopped.
    use_cache: decode with a KV cache (the default) or recompute every step.
    static_cache: preallocate the cache to the longest prompt + max_new_tokens.
    pad_token_id: what fills the rows after their real tokens.
    compile: False (eager); True, a torch.compile mode ("default",
        "reduce-overhead", ...) or a CompileConfig(mode=, backend=,
        max_compiles=): decode with a static cache and a compiled step
        (fullgraph=True); True uses CUDA graphs on CUDA. Needs use_cache=True.
        Any shape works: one graph serves every batch size >= 2 and every
        stop setting, cache lengths round up to powers of two, and beyond
        max_compiles graphs per model (8) a call decodes eagerly, with the
        same tokens and one RuntimeWarning per model (see "Many shapes").
    """
    B, T = _batch_shape(input_ids)
    steps = stream(model, input_ids, key_mask=key_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                   use_cache=use_cache, static_cache=static_cache, pad_token_id=pad_token_id, compile=compile)
    device = input_ids.device
    real = _real_tokens(key_mask, input_ids)  # (B, T)
    prompt_lengths = real.sum(dim=1)  # (B, T) -> (B,)
    tokens = torch.full((B, T + max_new_tokens), pad_token_id, dtype=torch.int64, device=device)  # (B, T + n)
    tokens[:, :T] = torch.where(real, input_ids.long(), pad_token_id)  # the user's padding becomes pad_token_id
    lengths = prompt_lengths.clone()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    for step in steps:
        # a stopped row writes pad_token_id at its first padding slot, which already holds it
        tokens[rows, lengths] = step.tokens
        lengths = lengths + step.real
        finished = step.finished
    return GenerateOutput(tokens, lengths, prompt_lengths, finished)


def stream(
    model: nn.Module, input_ids: Tensor, *, key_mask: Tensor | None = None, max_new_tokens: int,
    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    seed: int | None = None, stop_tokens: Iterable[int] = (), use_cache: bool = True,
    static_cache: bool = False, pad_token_id: int = 0, compile: bool | str | CompileConfig = False,
) -> Iterator[NewTokens]:
    """`generate`, one step at a time: an iterator of NewTokens (B,), one per step, as soon as it is chosen.

    Same arguments as `generate`. The arguments are checked here, at the
    call, not at the first step. Ends after max_new_tokens steps, or when
    every sequence has produced a stop token.
    """
    vocab_size = _check_model(model, use_cache)
    _batch_shape(input_ids)
    check_token_ids(input_ids, vocab_size, None)
    real = _real_tokens(key_mask, input_ids)  # (B, T)
    for name, value in (("do_sample", do_sample), ("use_cache", use_cache), ("static_cache", static_cache)):
        flag(name, value)
    int_at_least("max_new_tokens", max_new_tokens, 0)
    settings = _check_settings(do_sample, temperature, top_k, top_p, stop_tokens, vocab_size, input_ids.device)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if int_at_least("pad_token_id", pad_token_id, 0) >= vocab_size:
        raise ValueError(f"pad_token_id must be an int in [0, vocab_size={vocab_size}), got {pad_token_id!r}")
    if static_cache and not use_cache:
        raise ValueError("static_cache=True needs use_cache=True")
    compiled = _check_compile(compile, use_cache)
    prompt_lengths = real.sum(dim=1)  # (B, T) -> (B,)
    longest = _check_lengths(model, prompt_lengths, max_new_tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    ids, padded = input_ids.long(), key_mask is not None
    if not use_cache:
        source = _Recomputed(model, ids, real, padded, longest, max_new_tokens, pad_token_id)
    else:
        cache = _make_cache(model, ids.shape[0], longest + max_new_tokens, static_cache, compiled)
        source = _Cached(model, cache, ids, real if padded else None, _step_function(model, compiled, cache, ids))
    return _decode(source, prompt_lengths, max_new_tokens, settings, generator, pad_token_id)


def _check_lengths(model, prompt_lengths: Tensor, max_new_tokens: int) -> int:
    """The longest prompt, once every prompt has a token and prompt + new tokens fit the model's positions."""
    if int(prompt_lengths.min()) == 0:
        b = int(torch.argmin(prompt_lengths))
        raise ValueError(f"key_mask marks no real token in row {b}: every prompt needs at least one token")
    longest = int(prompt_lengths.max())
    limit = getattr(model, "position_limit", None)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"input_ids' longest prompt has {longest} tokens and max_new_tokens={max_new_tokens}; "
                         f"together they exceed max_positions={limit}")
    return longest


@torch.no_grad()
def _decode(source, prompt_lengths: Tensor, max_new_tokens: int, settings: _Settings,
            generator: torch.Generator | None, pad_token_id: int) -> Iterator[NewTokens]:
    """The loop: choose every sequence's next token from its logits (B, V), feed it to `source`, until done."""
    if max_new_tokens == 0:
        return
    last = source.first(prompt_lengths)  # (B, V): each sequence's last real token predicts the next
    finished = torch.zeros(prompt_lengths.shape[0], dtype=torch.bool, device=prompt_lengths.device)
    for step in range(max_new_tokens):
        chosen = _choose(last, settings, generator)  # (B,)
        running = ~finished
        if settings.stop is not None:  # without stop tokens every sequence runs to the end
            chosen = torch.where(running, chosen, pad_token_id)
            finished = finished | (running & torch.isin(chosen, settings.stop))
        yield NewTokens(chosen, running, finished)
        if step == max_new_tokens - 1:
            return
        # only sequences still running go on; a stopped one is fed padding, which is neither cached nor seen
        feed_mask = None
        if settings.stop is not None:
            if bool(finished.all()):
                return
            feed_mask = ~finished  # (B,), every step: a compiled step keeps one graph
        last = source.next(chosen, feed_mask)  # (B, V)


def _last_logits(model, input_ids: Tensor, cache, key_mask: Tensor | None) -> Tensor:
    """The next-token logits (B, V) of a chunk input_ids (B, 1) appended to the cache: the step that compiles."""
    step = getattr(model, "decode_step", None)
    if step is None:  # a model with only the decoders' forward contract
        return model(input_ids, key_mask=key_mask, cache=cache)[0][:, -1]  # (B, 1, V) -> (B, V)
    return step(input_ids, cache, key_mask=key_mask)[:, -1]  # (B, 1, V) -> (B, V)


class _Cached:
    """Tokens through a KV cache: the prompt through the model's checked forward, then one step per token."""

    def __init__(self, model, cache, input_ids: Tensor, prompt_mask: Tensor | None, step: Callable) -> None:
        self.model, self.cache, self.input_ids, self.prompt_mask, self.step = model, cache, input_ids, prompt_mask, step

    def first(self, prompt_lengths: Tensor) -> Tensor:
        logits = self.model(self.input_ids, key_mask=self.prompt_mask, cache=self.cache)[0]  # (B, T, V)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, prompt_lengths - 1]  # (B, T, V) -> (B, V)

    def next(self, chosen: Tensor, feed_mask: Tensor | None) -> Tensor:
        return self.step(self.model, chosen[:, None], self.cache,
                         None if feed_mask is None else feed_mask[:, None])  # (B, 1) -> (B, V)


class _Recomputed:
    """Tokens without a cache: every step runs the whole sequence so far again."""

    def __init__(self, model, input_ids: Tensor, real: Tensor, padded: bool, longest: int, max_new_tokens: int,
                 pad_token_id: int) -> None:
        B, T = input_ids.shape
        self.model, self.prompt_width, self.longest, self.steps = model, T, longest, 0
        self.buffer = torch.full((B, T + max_new_tokens), pad_token_id, dtype=torch.int64,
                                 device=input_ids.device)  # (B, T + n)
        self.buffer[:, :T] = torch.where(real, input_ids, pad_token_id)
        self.prompt_mask = real if padded else None
        self.rows = torch.arange(B, device=input_ids.device)

    def first(self, prompt_lengths: Tensor) -> Tensor:
        self.lengths = prompt_lengths  # (B,) real tokens so far, per sequence
        logits = self.model(self.buffer[:, :self.prompt_width], key_mask=self.prompt_mask)[0]  # (B, T, V)
        return logits[self.rows, prompt_lengths - 1]  # (B, T, V) -> (B, V)

    def next(self, chosen: Tensor, feed_mask: Tensor | None) -> Tensor:
        self.buffer[self.rows, self.lengths] = chosen  # a stopped sequence's is pad_token_id, past its tokens
        self.lengths = self.lengths + (1 if feed_mask is None else feed_mask.long())
        self.steps += 1
        width = self.longest + self.steps  # every row's real tokens fit; shorter rows are padded
        mask = None
        if self.prompt_mask is not None or feed_mask is not None:
            mask = torch.arange(width, device=chosen.device)[None, :] < self.lengths[:, None]  # (B, width)
        logits = self.model(self.buffer[:, :width], key_mask=mask)[0]  # (B, width, V)
        return logits[self.rows, self.lengths - 1]  # (B, width, V) -> (B, V)


# model -> {(mode, backend, max_compiles): its _CompiledStep}; weak keys: a model that is gone takes its steps
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_compile(compile, use_cache: bool) -> CompileConfig | None:
    """generate's `compile` as a CompileConfig, or None for eager decoding."""
    if compile is False:
        return None
    if compile is True:
        config = CompileConfig()
    elif isinstance(compile, str) and compile in COMPILE_MODES:
        config = CompileConfig(mode=compile)
    elif isinstance(compile, CompileConfig):
        config = compile
    else:
        error = ValueError if isinstance(compile, str) else TypeError
        raise error(f"compile must be False, True, a torch.compile mode {COMPILE_MODES} or a "
                    f"multihead.generate.CompileConfig, got {type(compile).__name__} {compile!r}")
    if not use_cache:
        raise ValueError("compile needs use_cache=True: the compiled step decodes against a static KV cache")
    return config


def static_length(needed: int, limit: int | None) -> int:
    """The static cache length of a compiled decode: needed rounded up to a power of two (>= 64), within limit.

    Calls whose prompt + new tokens round to the same length share one
    compiled step; the extra slots are masked (they cost attention over at
    most twice the keys).
    """
    length = max(64, 1 << (needed - 1).bit_length())
    return length if limit is None else max(needed, min(length, limit))


def _make_cache(model, batch_size: int, needed: int, static_cache: bool, compiled: CompileConfig | None):
    if compiled is not None:
        cache = model.make_cache(batch_size=batch_size, max_length=static_length(
            needed, getattr(model, "position_limit", None)), static=True)
        if compiled.resolved_mode(next(model.parameters()).device) == "reduce-overhead":
            for layer in cache:  # CUDA graphs replay at fixed addresses: the cache is written in place there
                for storage in layer.storage():
                    torch._dynamo.mark_static_address(storage)
        return cache
    if static_cache:
        return model.make_cache(batch_size=batch_size, max_length=needed, static=True)
    return model.make_cache(batch_size=batch_size)


def _step_function(model, compiled: CompileConfig | None, cache, input_ids: Tensor) -> Callable:
    """One call's decoding step: `_last_logits`, or the model's compiled step (one graph per shape, reused)."""
    if compiled is None:
        return _last_logits
    device = input_ids.device
    mode = compiled.resolved_mode(device)
    steps = _COMPILED.setdefault(model, {})
    key = (mode, compiled.backend, compiled.max_compiles)
    if key not in steps:
        steps[key] = _CompiledStep(_compile(compiled, mode), compiled.max_compiles)
    B = input_ids.shape[0]
    # what takes a graph of its own: torch specialises a batch of 1; B >= 2 share one (dynamic B)
    shape = _Shape(B == 1, getattr(cache, "max_length", None), next(model.parameters()).dtype, device)
    return _CallStep(steps[key], shape, torch.ones(B, 1, dtype=torch.bool, device=device))  # (B, 1)


def _compile(config: CompileConfig, mode: str) -> Callable:
    """`_last_logits` under torch.compile(fullgraph=True): static shapes but the batch, which the calls mark."""
    options = {"mode": mode} if config.backend == "inductor" and mode != "default" else {}
    parameters = inspect.signature(torch.compile).parameters
    if "isolate_recompiles" in parameters:  # torch >= 2.13
        options["isolate_recompiles"] = True  # this model's compiles count against no other model's limit
    if "recompile_limit" in parameters:  # torch >= 2.13: dynamo's limit is ours (else its global one)
        options["recompile_limit"] = config.max_compiles
    step = torch.compile(_last_logits, fullgraph=True, dynamic=False, backend=config.backend, **options)
    return _with_step_marks(step) if mode == "reduce-overhead" else step


class _Shape(NamedTuple):
    """What a compiled step's graph is specialised to (every other size or setting it shares)."""

    single: bool  # B == 1 (torch specialises a size of 1); every B >= 2 shares one graph
    cache_length: int | None  # the static cache's max_length: prompt + new tokens rounded up (static_length)
    dtype: torch.dtype  # the model's
    device: torch.device


class _CompiledStep:
    """A model's compiled step, shared by every call: the shapes it has graphs for, and the eager fall-back."""

    def __init__(self, step: Callable, max_compiles: int) -> None:
        self.step, self.max_compiles = step, max_compiles
        self.shapes: set[_Shape] = set()  # shapes with a graph
        self.refused: set[_Shape] = set()  # shapes torch.compile refused (its own limit): eager from then on
        self.warned = False  # the fall-back's one warning was given

    def takes(self, shape: _Shape) -> bool:
        if shape in self.refused:
            return False
        return shape in self.shapes or len(self.shapes) < self.max_compiles

    def fall_back(self, shape: _Shape, refused: bool) -> None:
        """A call of `shape` decodes eagerly: say so once per model (a serving loop would repeat it every call)."""
        if refused:
            self.refused.add(shape)
        if self.warned:
            return
        self.warned = True
        why = (f"torch.compile refused one more graph (its recompile limit; TORCH_LOGS=recompiles says what changed)"
               if refused else f"its limit of {self.max_compiles} compiled shapes was reached (CompileConfig "
                               f"max_compiles)")
        warnings.warn(
            f"generate(compile=...): this model's decode step decodes eagerly, with the same tokens, for the shapes "
            f"it has no graph for: {why}; first one: batch {'1' if shape.single else '>= 2'}, cache length "
            f"{shape.cache_length}, {shape.dtype}. This warning is given once per model.", RuntimeWarning, stacklevel=6)


class _CallStep:
    """One call's decoding step: the model's compiled step, or the eager one where it has no room for the shape."""

    def __init__(self, compiled: _CompiledStep, shape: _Shape, all_real: Tensor) -> None:
        self.compiled, self.shape, self.all_real = compiled, shape, all_real
        self.eager: bool | None = None  # decided at the first step

    def __call__(self, model, input_ids: Tensor, cache, key_mask: Tensor | None) -> Tensor:
        # every step gets a mask (all True without stop tokens): one graph with or without them
        key_mask = self.all_real if key_mask is None else key_mask  # (B, 1)
        if self.eager is None:
            self.eager = not self.compiled.takes(self.shape)
            if self.eager:
                self.compiled.fall_back(self.shape, refused=False)
            elif not self.shape.single:  # read when a graph is traced: one for every B >= 2
                _mark_batch_dynamic(input_ids, key_mask, cache)
        if self.eager:
            return _last_logits(model, input_ids, cache, key_mask)  # (B, V)
        try:
            logits = self.compiled.step(model, input_ids, cache, key_mask)  # (B, V)
        except Exception as error:
            if not _recompile_limit_hit(error):
                raise
            # dynamo's own limit (one shared by every model before torch 2.13, or a change the shape above does
            # not see, such as requires_grad): refused before anything ran, so the cache is as it was
            self.eager = True
            self.compiled.fall_back(self.shape, refused=True)
            return _last_logits(model, input_ids, cache, key_mask)  # (B, V)
        self.compiled.shapes.add(self.shape)
        return logits


def _mark_batch_dynamic(input_ids: Tensor, key_mask: Tensor, cache) -> None:
    """Dim 0 (B) of every tensor the step reads marked dynamic: a graph traced now serves every B >= 2."""
    tensors = [input_ids, key_mask, cache.lengths]
    for layer in cache:
        tensors.extend(layer.storage())  # keys (B, G, L + 1, D), values (B, G, L + 1, Dv)
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)  # "maybe": torch may still specialise it, then recompiles


def _recompile_limit_hit(error: Exception) -> bool:
    """Whether dynamo refused to compile one more graph for its recompile limit (raised before tracing)."""
    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")  # torch >= 2.6, and its name before
    return isinstance(error, tuple(getattr(torch._dynamo.exc, n) for n in names if hasattr(torch._dynamo.exc, n)))


def _with_step_marks(step: Callable) -> Callable:
    """A step replayed as a CUDA graph: each call starts a new step, and nothing stays in the graph's memory.

    The last step's logits are consumed (the next token is chosen) before
    the next call, which may overwrite them; the cache's new lengths are
    copied out, since the next call reads them.
    """
    def marked(model, input_ids: Tensor, cache, key_mask: Tensor | None) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        logits = step(model, input_ids, cache, key_mask)  # (B, V)
        cache.copy_lengths()
        return logits
    return marked


def _choose(logits: Tensor, settings: _Settings, generator: torch.Generator | None) -> Tensor:
    """The next token of every sequence from its logits (B, V): argmax, or a sample."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)  # (B, V) -> (B,)
    scores = _scaled(logits.float(), settings.temperature)  # (B, V)
    V = scores.shape[-1]
    if settings.top_k is not None and settings.top_k < V:
        kth = torch.topk(scores, settings.top_k, dim=-1).values[:, -1:]  # (B, V) -> (B, 1)
        scores = scores.masked_fill(scores < kth, -math.inf)
    if settings.top_p is not None and settings.top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): mass of the strictly more likely tokens
        drop = mass_before >= settings.top_p  # the most likely token always stays (mass_before = 0)
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
    probs = scores.softmax(dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    # one uniform per sequence, whatever is filtered: the same draws with or without the cache
    u = torch.rand(scores.shape[0], 1, generator=generator, device=scores.device, dtype=cdf.dtype)  # (B, 1)
    # right=True: the first token whose cumulative mass exceeds u·total, so never a token of probability 0
    chosen = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    return chosen.clamp(max=V - 1)[:, 0]  # (B, 1) -> (B,)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """(logits - max) / temperature (B, V): every score <= 0, so no temperature > 0 overflows to NaN.

    The maximum stays exactly 0 (0 / t, or 0 where t rounds to 0 in float32),
    so a vanishing temperature puts all the mass on the argmax: greedy.
    """
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # (B, V), max 0
    return torch.where(shifted == 0, shifted, shifted / temperature)  # (B, V)


def _check_model(model, use_cache: bool) -> int:
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model.config, "vocab_size"):
        raise TypeError(f"model must be a decoder of multihead.models (GPT2, Llama), got {type(model).__name__}")
    if use_cache and not callable(getattr(model, "make_cache", None)):
        raise TypeError(f"model {type(model).__name__} has no make_cache(); pass use_cache=False")
    return model.config.vocab_size


def _batch_shape(input_ids) -> tuple[int, int]:
    """(B, T) of a batch with at least one prompt of at least one token (an empty batch has nothing to continue)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor (B, T) of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has {input_ids.dim()} dims, (B, T) expected, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must hold at least one prompt of at least one token, (B, T) with B >= 1 "
                         f"and T >= 1, got {tuple(input_ids.shape)}")
    return B, T


def _real_tokens(key_mask, input_ids: Tensor) -> Tensor:
    """(B, T) bool of the prompt's real tokens, from key_mask (checked: right padding) or all True."""
    if key_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    check_key_mask(key_mask, input_ids)
    return key_mask


def _check_settings(do_sample, temperature, top_k, top_p, stop_tokens, vocab_size: int, device) -> _Settings:
    temperature = positive_number("temperature", temperature)
    if top_k is not None:
        int_at_least("top_k", top_k, 1)
    if top_p is not None and (positive_number("top_p", top_p) > 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if not do_sample:
        given = [f"{name}={value!r}" for name, value, default in
                 (("temperature", temperature, 1.0), ("top_k", top_k, None), ("top_p", top_p, None))
                 if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to sampling; pass do_sample=True "
                             f"(greedy decoding would ignore them)")
    return _Settings(do_sample, temperature, top_k, None if top_p is None else float(top_p),
                     _stop_tensor(stop_tokens, vocab_size, device))


def _stop_tensor(stop_tokens, vocab_size: int, device) -> Tensor | None:
    """stop_tokens as a sorted (N,) int64 tensor of distinct ids, or None when there are none."""
    if isinstance(stop_tokens, (int, str, Tensor)) or not isinstance(stop_tokens, Iterable):
        raise TypeError(f"stop_tokens must be a sequence of token ids, e.g. (50256,), "
                        f"got {type(stop_tokens).__name__} {stop_tokens!r}")
    stop = list(stop_tokens)
    for token in stop:
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"stop_tokens must hold int token ids, got {type(token).__name__} {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"stop_tokens must be token ids in [0, vocab_size={vocab_size}), got {token!r}")
    return torch.tensor(sorted(set(stop)), dtype=torch.int64, device=device) if stop else None
