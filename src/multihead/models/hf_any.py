"""Any Hugging Face folder whose architecture transformers knows, its attention computed by multihead.

    model = multihead.models.hf_any.load_any("path/to/mistral")   # AutoModel + AutoTokenizer, offline
    view = model.attention("A dog ate the food because it was hungry")
    view.tokens, view.weights.shape                              # (L, H, T, T): layer, head, query, key

multihead's own BERT, GPT-2 and Llama (`multihead.models.load`) rebuild those
architectures on `multihead.MultiHeadAttention`: readable reference
implementations. Every other `model_type` loads here instead: transformers
builds the base model (`AutoModel`, no task head) with
attn_implementation="multihead" (`multihead.hf`), so each of its attention
calls runs through `multihead.attention`, and `output_attentions=True` gives
every head's weights. `HFTextModel` has the interface of
`multihead.models.TextModel` that the head view uses (`name`, `kind`,
`tokenize`, `attention`). An encoder-decoder model (T5, BART) shows its
encoder's self-attention over the text.

Checked at load, each failure one line (`CheckpointError`): a model_type
transformers does not know; no tokenizer transformers can load, or one not
backed by the `tokenizers` library (the words and special tokens of the
report need its encodings); a model whose attention layers do not call
transformers' AttentionInterface (BLOOM, DeBERTa, ...), which would ignore
multihead: a probe under `multihead.hf.options(heads=())` must come back with
zero heads in every layer, which only multihead's function returns; and a
model that multihead.hf refuses (DeepSeek-V3.2's sparse attention), which fails
in that probe with multihead.hf's own message.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .checkpoint_map import CheckpointError, read_config
from .text import TextAttention, TextTokenizer, Tokenized, check_text

__all__ = ["HFTextModel", "load_any"]

# Files one of which a folder with a tokenizer has: tokenizer.json / tokenizer_config.json, WordPiece or BPE
# vocabularies, SentencePiece models (tokenizer.model, spiece.model, sentencepiece.bpe.model).
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model")
PROBE_LENGTH = 2  # tokens of the probe that checks every attention layer runs on multihead
REFUSAL = "attn_implementation='multihead'"  # how multihead.hf's one-line refusals begin


def _one_line(error: BaseException, width: int = 300) -> str:
    """The first non-empty line of an error's message, cut to `width` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= width else text[: width - 3] + "..."


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports while loading: loading a base model from a task checkpoint is intended."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


@dataclass
class HFTextModel:
    """A transformers model run with attn_implementation="multihead", with its tokenizer; `attention(text)`."""

    name: str  # the checkpoint folder
    kind: str  # config.json's model_type ("mistral", "qwen2", ...)
    network: nn.Module  # the transformers base model (AutoModel), in eval mode
    tokenizer: TextTokenizer  # the folder's tokenizer (AutoTokenizer's tokenizers.Tokenizer)
    max_length: int  # the longest input the model takes (its max_position_embeddings; unbounded if it has none)

    @property
    def num_layers(self) -> int:
        return int(getattr(self.network.config, "num_hidden_layers", 0) or 0)

    @property
    def num_heads(self) -> int:
        return int(getattr(self.network.config, "num_attention_heads", 0) or 0)

    def tokenize(self, texts: Sequence[str], *, truncate: bool = False) -> Tokenized:
        try:
            return self.tokenizer(texts, max_length=self.max_length, truncate=truncate)
        except (TypeError, ValueError):  # our own checks: the texts, or a text longer than the model takes
            raise
        except Exception as error:  # tokenizers raises a bare Exception (an unknown token with no <unk>, ...)
            raise CheckpointError(f"the tokenizer of {self.name} cannot encode the text: "
                                  f"{_one_line(error)}") from error

    def describe(self) -> str:
        """One line: what the model is and how its attention runs."""
        config = self.network.config
        kv = getattr(config, "num_key_value_heads", None)
        shared = ""
        if isinstance(kv, int) and kv != self.num_heads:
            shared = f" ({kv} key/value head{'s' if kv != 1 else ''})"
        part = " encoder" if getattr(config, "is_encoder_decoder", False) else ""
        width = getattr(config, "hidden_size", "?")
        return (f"{self.name}: {self.kind} ({type(self.network).__name__}{part}) through transformers, "
                f"{self.num_layers} layers x {self.num_heads} heads{shared}, width {width}; "
                f"every attention call runs on multihead (attn_implementation='multihead')")

    def _attentions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """The model's per-layer weights (B, H, T, T) on these ids; any failure one CheckpointError line."""
        network = self.network
        if getattr(network.config, "is_encoder_decoder", False):
            network = network.get_encoder()  # the encoder's self-attention over the text
        try:
            with torch.no_grad():
                out = network(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        except Exception as error:  # transformers' errors are of every kind; the CLI must print one line
            message = _one_line(error)
            if not message.startswith(REFUSAL):  # multihead.hf's refusals already name the model and feature
                message = (f"{self.kind} ({type(network).__name__}) failed in transformers: "
                           f"{type(error).__name__}: {message}")
            raise CheckpointError(message) from error
        attentions = getattr(out, "attentions", None)
        if not attentions:
            raise CheckpointError(f"{self.kind} ({type(network).__name__}) returned no attention weights with "
                                  f"output_attentions=True")
        return tuple(attentions)

    def check_runs_on_multihead(self) -> None:
        """A short probe: every layer must have called multihead.hf (see the module docstring)."""
        import multihead.hf

        ids = torch.zeros(1, PROBE_LENGTH, dtype=torch.long)  # (1, T): token 0, as good as any for a probe
        with multihead.hf.options(layers=None, heads=(), rows=None):
            attentions = self._attentions(ids, torch.ones_like(ids))
        ignored = [i for i, a in enumerate(attentions) if isinstance(a, torch.Tensor) and a.shape[1:2] != (0,)]
        if ignored:
            raise CheckpointError(
                f"{self.kind} ({type(self.network).__name__}) computes attention in its own code, not through "
                f"transformers' AttentionInterface (layers {ignored}), so attn_implementation='multihead' never "
                f"runs in it; to look at transformers' own weights, pass "
                f"model(..., output_attentions=True).attentions to multihead.viz.head_view")

    @torch.no_grad()
    def attention(self, text: str) -> TextAttention:
        """Every layer's per-head weights (L, H, T, T) on one text, each attention call computed by multihead."""
        import multihead.hf

        batch = self.tokenize([check_text(text)])
        T = batch.input_ids.shape[1]
        with multihead.hf.options(layers=None, heads=None, rows=None):  # every weight, whatever encloses this
            attentions = self._attentions(batch.input_ids, batch.key_mask.long())
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in attentions]
        H = shapes[0][1] if shapes[0] is not None and len(shapes[0]) == 4 else 0
        odd = [(i, shape) for i, shape in enumerate(shapes) if H == 0 or shape != (1, H, T, T)]
        if odd:  # a layer with no weights (a hybrid model's recurrent layer), or of another shape
            raise CheckpointError(f"{self.kind} returned attention weights {odd[0][1]} for layer {odd[0][0]}; the "
                                  f"head view needs (1, H, {T}, {T}) in every layer for {T} tokens")
        weights = torch.stack([a[0] for a in attentions]).float()  # L x (1, H, T, T) -> (L, H, T, T)
        return TextAttention(batch.tokens[0], batch.special[0], weights)


def _known_model_type(directory: Path) -> str:
    """config.json's model_type, when transformers knows it; else one CheckpointError line."""
    from transformers import CONFIG_MAPPING, __version__

    model_type = read_config(directory).get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{directory}/config.json says model_type={model_type!r}, which neither multihead's "
                              f"own models (bert, gpt2, llama) nor transformers {__version__} know")
    return model_type


def _tokenizer(directory: Path) -> TextTokenizer:
    """The folder's tokenizer through AutoTokenizer, as the `tokenizers.Tokenizer` behind it."""
    from transformers import AutoTokenizer

    if not any(any(directory.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise CheckpointError(f"{directory} has no tokenizer: expected tokenizer.json (or tokenizer_config.json, "
                              f"vocab.txt, vocab.json + merges.txt, a SentencePiece *.model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # transformers raises ValueError, OSError, KeyError, ... by tokenizer class
        raise CheckpointError(f"transformers could not load the tokenizer of {directory}: "
                              f"{type(error).__name__}: {_one_line(error)}") from error
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"the tokenizer of {directory} ({type(tokenizer).__name__}) is not backed by the "
                              f"tokenizers library, which the head view needs for words and special tokens; "
                              f"save it as tokenizer.json")
    pad_id = tokenizer.pad_token_id
    return TextTokenizer(backend, pad_id if isinstance(pad_id, int) else 0)


def load_any(path: str | Path) -> HFTextModel:
    """A local Hugging Face folder of any architecture transformers knows, attention on multihead.

    Nothing is downloaded (`local_files_only`). Raises CheckpointError, one
    line each, for what the module docstring lists.
    """
    import multihead.hf  # registers attn_implementation="multihead"
    from transformers import AutoModel

    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir():  # else transformers would take it for a name on the Hub
        raise CheckpointError(f"{str(path)!r} is not a folder; give a local Hugging Face checkpoint folder")
    kind = _known_model_type(directory)
    with _quiet_transformers():
        tokenizer = _tokenizer(directory)
        try:
            network = AutoModel.from_pretrained(str(directory), attn_implementation=multihead.hf.NAME,
                                                local_files_only=True)
        except Exception as error:  # a missing weights file, an architecture AutoModel has no class for, ...
            raise CheckpointError(f"transformers could not load {directory} as a {kind} model: "
                                  f"{type(error).__name__}: {_one_line(error)}") from error
    limit = getattr(network.config, "max_position_embeddings", None)
    max_length = limit if isinstance(limit, int) and limit > 0 else sys.maxsize
    model = HFTextModel(str(directory), kind, network.eval(), tokenizer, max_length)
    model.check_runs_on_multihead()
    return model
