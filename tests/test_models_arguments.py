"""The public arguments of BERT, the text layer and `models.load`: a wrong type is a TypeError naming it."""

from __future__ import annotations

import pytest
import torch

from multihead.models import load
from multihead.models.bert import Bert, BertConfig, load_bert
from multihead.models.text import SentenceEncoder, TextTokenizer

CONFIG = dict(vocab_size=30, max_positions=16, type_vocab_size=2, d_model=8, num_layers=1, num_heads=2, ffn_dim=12,
              layer_norm_eps=1e-12, activation="gelu", pad_token_id=0)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return Bert(BertConfig(**CONFIG)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "the", "cat", "sat"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return TextTokenizer(inner, pad_id=0)


def ids(B, T):
    return torch.randint(1, 30, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("change, error, message", [
    (dict(num_layers="1"), TypeError, "num_layers must be an int, got str"),
    (dict(d_model=8.0), TypeError, "d_model must be an int, got float"),
    (dict(num_heads=3), ValueError, "d_model=8 must be divisible by num_heads=3"),
    (dict(layer_norm_eps="1e-12"), TypeError, "layer_norm_eps must be a number"),
    (dict(activation="swish"), ValueError, "activation must be one of"),
    (dict(pad_token_id=30), ValueError, r"pad_token_id must be in \[0, vocab_size=30\)"),
    (dict(pad_token_id=None), TypeError, "pad_token_id must be an int"),
])
def test_bert_config_checks_its_fields(change, error, message):
    with pytest.raises(error, match=message):
        BertConfig(**{**CONFIG, **change})


def test_bert_config_from_hf_refuses_a_fractional_size():
    hf = dict(vocab_size=30, max_position_embeddings=16, hidden_size=8.5, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=12)
    with pytest.raises(TypeError, match="d_model must be an int, got float 8.5"):
        BertConfig.from_hf(hf)  # int() used to cut 8.5 to 8 silently
    with pytest.raises(TypeError, match="config must be a dict"):
        BertConfig.from_hf("config.json")


def test_bert_forward_checks_its_arguments(bert):
    x = ids(2, 5)
    assert bert(x, segment_ids=torch.ones(2, 5, dtype=torch.int64)).hidden.shape == (2, 5, 8)
    cases = [
        (TypeError, "need_weights must be a bool", lambda: bert(x, need_weights="yes")),
        (TypeError, "segment_ids must be an int64 or int32 tensor", lambda: bert(x, segment_ids=[[0] * 5] * 2)),
        (TypeError, "segment_ids must be an int64 or int32 tensor", lambda: bert(x, segment_ids=torch.zeros(2, 5))),
        (ValueError, r"segment_ids must be \(B, T\) = \(2, 5\)",
         lambda: bert(x, segment_ids=torch.zeros(2, 4, dtype=torch.int64))),
        (ValueError, r"segment_ids must lie in \[0, type_vocab_size=2\)",
         lambda: bert(x, segment_ids=torch.full((2, 5), 2))),
        (TypeError, "config must be a BertConfig", lambda: Bert(CONFIG)),
        (TypeError, "floating torch.dtype", lambda: load_bert(".", dtype=torch.int64)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_the_tokenizer_and_encoder_check_their_arguments(bert, tokenizer):
    encoder = SentenceEncoder("tiny", "bert", bert, tokenizer, 16, max_seq_length=16)
    assert encoder.encode(["the cat", "sat"], batch_size=1).shape == (2, 8)
    cases = [
        (TypeError, "max_length must be an int", lambda: tokenizer(["the cat"], max_length="8")),
        (ValueError, "max_length must be positive", lambda: tokenizer(["the cat"], max_length=0)),
        (TypeError, "truncate must be a bool", lambda: tokenizer(["the cat"], max_length=8, truncate="no")),
        (ValueError, "batch_size must be positive", lambda: encoder.encode(["the cat"], batch_size=0)),
        (TypeError, "batch_size must be an int", lambda: encoder.encode(["the cat"], batch_size=2.0)),
        (TypeError, "name_or_path must be a str or pathlib.Path, got int", lambda: load(3)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_tokenized_names_the_word_of_every_piece(tokenizer):
    batch = tokenizer(["the cat sat", "cat"], max_length=8)
    assert batch.words == [["the", "cat", "sat"], ["cat"]]
    assert batch.word_ids == [[0, 1, 2], [0]]
