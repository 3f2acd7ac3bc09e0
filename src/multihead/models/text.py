"""From text to a model and back: tokenizing a batch, per-head weights of a text, sentence embeddings.

A `TextModel` is a network (BERT encoder, GPT-2 or Llama decoder) with the tokenizer
of its checkpoint. `attention(text)` runs multihead's attention over the text
and returns every layer's per-head weights with the tokens they refer to;
`SentenceEncoder.encode(texts)` gives sentence-transformers' embedding
(mean of the last hidden states over real tokens, L2-normalised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.checks import flag, positive_int
from .checkpoint_map import CheckpointError, read_json_object


class Tokenized(NamedTuple):
    input_ids: Tensor  # (B, T) int64, padded on the right
    key_mask: Tensor  # (B, T) bool, True = a real token
    tokens: list[list[str]]  # per text, its real tokens as printable strings
    special: list[list[bool]]  # per text, True where a token is special ([CLS], [SEP], <|endoftext|>)
    words: list[list[str | None]]  # per text and token, the word of the text it is a piece of; None if special
    word_ids: list[list[int | None]]  # per text and token, which word (0, 1, ...) it is a piece of; None if special


class TextAttention(NamedTuple):
    tokens: list[str]  # the T tokens of the text, as the model saw them
    special: list[bool]  # (T,) True for special tokens
    weights: Tensor  # (L, H, T, T) float32: layer, head, query token, key token


class TextTokenizer:
    """A `tokenizers.Tokenizer` from a checkpoint folder, padding and truncating our way."""

    def __init__(self, tokenizer, pad_id: int) -> None:
        from tokenizers import decoders

        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        # byte-level BPE (GPT-2) writes a leading space as "Ġ": show tokens decoded
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)

    @classmethod
    def from_directory(cls, directory: str | Path, pad_id: int = 0) -> TextTokenizer:
        """The folder's tokenizer.json, else vocab.json + merges.txt (byte-level BPE), else vocab.txt (WordPiece)."""
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            return cls(_read_tokenizer_file(directory / "tokenizer.json"), pad_id)
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            from tokenizers import ByteLevelBPETokenizer

            bpe = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
            return cls(bpe._tokenizer, pad_id)
        if (directory / "vocab.txt").is_file():
            return cls(_wordpiece(directory), pad_id)
        raise CheckpointError(
            f"{directory} has no tokenizer: expected tokenizer.json, vocab.json + merges.txt, or vocab.txt"
        )

    def display(self, token: str) -> str:
        return self.tokenizer.decoder.decode([token]) if self._byte_level else token

    def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text that new_ids add after prompt_ids: decode(prompt + new) minus decode(prompt).

        Decoding new_ids alone would lose what depends on the prompt: a
        SentencePiece (Metaspace) decoder drops the space that "▁word" means
        when the token comes first, so "on" + "▁ohiun" would print "onohiun".
        """
        prompt_ids, new_ids = list(prompt_ids), list(new_ids)
        prefix = self.tokenizer.decode(prompt_ids)
        text = self.tokenizer.decode(prompt_ids + new_ids)
        if text.startswith(prefix):
            return text[len(prefix):]
        return self.tokenizer.decode(new_ids)  # a decoder that rewrites the prompt's end: the pieces alone

    def __call__(self, texts: Sequence[str], *, max_length: int, truncate: bool = False) -> Tokenized:
        """Token ids of a batch of texts, padded on the right to the longest.

        A text longer than max_length tokens raises, unless truncate=True cuts it.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str (wrap a single text in a list)")
        positive_int("max_length", max_length)
        flag("truncate", truncate)
        encodings = self.tokenizer.encode_batch(list(texts))
        too_long = [i for i, e in enumerate(encodings) if len(e.ids) > max_length]
        if too_long and not truncate:
            text, n = texts[too_long[0]], len(encodings[too_long[0]].ids)
            raise ValueError(f"the text {_short(text)!r} has {n} tokens, more than the model's maximum of {max_length}")
        if too_long:
            # the tokenizer's own truncation keeps the closing special token ([SEP])
            self.tokenizer.enable_truncation(max_length)
            try:
                for i in too_long:
                    encodings[i] = self.tokenizer.encode(texts[i])
            finally:
                self.tokenizer.no_truncation()
        ids = [list(encoding.ids) for encoding in encodings]
        tokens = [[self.display(self.tokenizer.id_to_token(i)) for i in row] for row in ids]
        special = [[bool(s) for s in encoding.special_tokens_mask] for encoding in encodings]
        words = [_words(encoding, text) for encoding, text in zip(encodings, texts)]
        word_ids = [list(encoding.word_ids) for encoding in encodings]
        T = max((len(r) for r in ids), default=0)
        input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.int64)  # (B, T)
        key_mask = torch.zeros(len(ids), T, dtype=torch.bool)  # (B, T)
        for b, row in enumerate(ids):
            input_ids[b, :len(row)] = torch.tensor(row, dtype=torch.int64)
            key_mask[b, :len(row)] = True
        return Tokenized(input_ids, key_mask, tokens, special, words, word_ids)


def _words(encoding, text: str) -> list[str | None]:
    """Per token, the whole word of `text` it is a piece of ("Hannibel" for han, ##ni and ##bel); None if special."""
    spans: dict[int, tuple[int, int]] = {}
    for word, (start, end) in zip(encoding.word_ids, encoding.offsets):
        if word is not None:
            first, last = spans.get(word, (start, end))
            spans[word] = (min(first, start), max(last, end))
    return [None if w is None else text[spans[w][0]:spans[w][1]].strip() for w in encoding.word_ids]


def _read_tokenizer_file(path: Path):
    """A tokenizers.Tokenizer from tokenizer.json, or one CheckpointError line naming the file."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception with serde's message
        raise CheckpointError(f"{path} is not a tokenizers tokenizer.json: {str(error).strip()[:200]}") from None


def _wordpiece(directory: Path):
    """BERT's WordPiece from vocab.txt, lower-casing as tokenizer_config.json says (True when it is silent)."""
    from tokenizers import BertWordPieceTokenizer

    settings_file = directory / "tokenizer_config.json"
    settings = read_json_object(settings_file) if settings_file.is_file() else {}
    lowercase = settings.get("do_lower_case", True)
    strip_accents = settings.get("strip_accents")  # None: strip them when lower-casing, as BertTokenizer does
    chinese = settings.get("tokenize_chinese_chars", True)
    for name, value, allowed in (("do_lower_case", lowercase, (bool,)), ("strip_accents", strip_accents,
                                 (bool, type(None))), ("tokenize_chinese_chars", chinese, (bool,))):
        if not isinstance(value, allowed):
            raise CheckpointError(f"{settings_file} sets {name}={value!r}; expected true or false")
    try:
        wordpiece = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=lowercase,
                                           strip_accents=strip_accents, handle_chinese_chars=chinese)
    except Exception as error:  # a vocab without [CLS] / [SEP], or not a vocabulary at all
        raise CheckpointError(f"{directory / 'vocab.txt'} is not a BERT vocabulary: {error}") from None
    return wordpiece._tokenizer


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class TextModel:
    """A network with its tokenizer; `attention(text)` gives every head's weights on that text."""

    name: str  # "minilm" or the checkpoint folder
    kind: str  # "bert", "gpt2" or "llama"
    network: nn.Module  # forward(input_ids, *, key_mask, need_weights) -> (..., attentions)
    tokenizer: TextTokenizer
    max_length: int  # the longest input the network takes (its learned positions)

    @property
    def num_layers(self) -> int:
        return self.network.config.num_layers

    @property
    def num_heads(self) -> int:
        return self.network.config.num_heads

    def tokenize(self, texts: Sequence[str], *, truncate: bool = False) -> Tokenized:
        return self.tokenizer(texts, max_length=self.max_length, truncate=truncate)

    @torch.no_grad()
    def attention(self, text: str) -> TextAttention:
        """Every layer's per-head attention weights on one text, computed by multihead."""
        batch = self.tokenize([check_text(text)])
        result = self.network(batch.input_ids, key_mask=batch.key_mask, need_weights=True)
        weights = torch.stack([w[0] for w in result.attentions]).float()  # L x (H, T, T) -> (L, H, T, T)
        return TextAttention(batch.tokens[0], batch.special[0], weights)


@dataclass
class SentenceEncoder(TextModel):
    """A BERT with sentence-transformers' pooling: `encode(texts)` gives unit-length embeddings."""

    max_seq_length: int = 512  # sentence-transformers truncates longer texts to this many tokens

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> Tensor:
        """Sentence embeddings (N, C): mean of the last hidden states over real tokens, L2-normalised.

        Texts longer than max_seq_length tokens are truncated to it, as
        sentence-transformers does: the embedding is defined on that prefix.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str; wrap a single text in a list")
        positive_int("batch_size", batch_size)
        embeddings = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], max_length=self.max_seq_length, truncate=True)
            hidden = self.network(batch.input_ids, key_mask=batch.key_mask).hidden  # (B, T, C)
            real = batch.key_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T) -> (B, T, 1)
            mean = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1e-9)  # (B, T, C) -> (B, C)
            embeddings.append(nn.functional.normalize(mean, p=2.0, dim=-1))
        if not embeddings:
            return torch.zeros(0, self.network.config.d_model)
        return torch.cat(embeddings)  # (N, C)


def read_sentence_transformers_settings(directory: Path) -> tuple[int | None, str | None]:
    """(max_seq_length, pooling) from a sentence-transformers folder, None where it says nothing."""
    max_seq_length = pooling = None
    settings = directory / "sentence_bert_config.json"
    if settings.is_file():
        max_seq_length = read_json_object(settings).get("max_seq_length")
        if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                           or max_seq_length < 1):
            raise CheckpointError(f"{settings} sets max_seq_length={max_seq_length!r}; expected a positive int")
    pooling_file = directory / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        modes = read_json_object(pooling_file)
        pooling = next((k[len("pooling_mode_"):] for k, on in modes.items() if k.startswith("pooling_mode_") and on), None)
    return max_seq_length, pooling


def check_text(text) -> str:
    """One non-empty text to look at, else TypeError/ValueError saying so."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty; give at least one word")
    return text
