"""The BERT encoder on MultiHeadAttention against sentence-transformers and transformers.

Exactness (issue "Real pre-trained models"): MiniLM embeddings equal
sentence-transformers' to 1e-5 on a padded batch of different lengths, and
every layer's weights equal transformers' eager attentions to 1e-5.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multihead import MultiHeadAttention
from multihead.models import CheckpointError, SentenceEncoder, load, load_bert, minilm_directory
from multihead.models.bert import BERT_CHECKPOINT_MAP, Bert, BertConfig
from multihead.models.checkpoint_map import Rule, load_state, read_checkpoint

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the oracle for embeddings")
transformers = pytest.importorskip("transformers", reason="transformers is the oracle for attentions")

SENTENCES = [
    "The artist painted the portrait of a woman with a brush.",
    "All is well",
    "A dog ate the food because it was hungry",
    "The animal didn't cross the street because it was too tired.",
    "Attention!",
]
EXACT = 1e-5


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return load("minilm")


@pytest.fixture(scope="module")
def hf_bert():
    return transformers.BertModel.from_pretrained(str(minilm_directory()), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm_directory()))


def test_minilm_is_what_the_issue_names(minilm):
    cfg = minilm.network.config
    assert (cfg.num_layers, cfg.num_heads, cfg.d_model) == (6, 12, 384)
    assert all(isinstance(layer.attention, MultiHeadAttention) for layer in minilm.network.layers)
    assert minilm.max_seq_length == 256 and minilm.max_length == 512
    assert minilm.network.load_report.loaded == 101  # 5 embedding + 6 x 16 layer tensors
    assert minilm.network.load_report.ignored == ("embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight")


def test_embeddings_equal_sentence_transformers(minilm):
    oracle = st.SentenceTransformer(str(minilm_directory()), device="cpu")
    expected = oracle.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    ours = minilm.encode(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    assert (ours - expected).abs().max().item() <= EXACT
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-6)
    # a text past max_seq_length (256) is truncated as sentence-transformers truncates it
    long_text = " ".join(["attention"] * 300)
    long_expected = oracle.encode([long_text], convert_to_tensor=True)
    assert (minilm.encode([long_text]) - long_expected).abs().max().item() <= EXACT


def test_encode_does_not_depend_on_batching(minilm):
    together = minilm.encode(SENTENCES)
    alone = torch.cat([minilm.encode([s]) for s in SENTENCES])
    assert (together - alone).abs().max().item() <= EXACT


def test_every_layer_weights_equal_transformers_eager(minilm, hf_bert, hf_tokenizer):
    batch = hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf_bert(**batch, output_attentions=True).attentions
        ours = minilm.network(batch["input_ids"], key_mask=batch["attention_mask"].bool(), need_weights=True)
    assert len(ours.attentions) == len(expected) == 6
    real = batch["attention_mask"].bool()  # (B, T)
    for layer, (theirs, mine) in enumerate(zip(expected, ours.attentions)):
        assert mine.shape == theirs.shape
        error = (mine - theirs).abs().amax(dim=(1, 3))[real].max().item()  # over real query rows
        assert error <= EXACT, f"layer {layer}: max |difference| {error:.2e}"
        # padding keys get no weight at all
        assert mine.masked_select(~real[:, None, None, :].expand_as(mine)).abs().max().item() == 0.0


def test_hidden_states_of_real_tokens_do_not_move_with_padding(minilm, hf_tokenizer):
    alone = minilm.tokenize([SENTENCES[1]])
    padded = minilm.tokenize([SENTENCES[1], SENTENCES[0]])
    with torch.no_grad():
        a = minilm.network(alone.input_ids, key_mask=alone.key_mask).hidden[0]
        b = minilm.network(padded.input_ids, key_mask=padded.key_mask).hidden[0, : a.shape[0]]
    assert (a - b).abs().max().item() <= EXACT


def test_attention_of_a_text(minilm, hf_tokenizer):
    view = minilm.attention(SENTENCES[0])
    expected_tokens = hf_tokenizer.convert_ids_to_tokens(hf_tokenizer(SENTENCES[0])["input_ids"])
    assert view.tokens == expected_tokens
    assert view.special == [t in ("[CLS]", "[SEP]") for t in expected_tokens]
    T = len(expected_tokens)
    assert view.weights.shape == (6, 12, T, T)
    assert torch.allclose(view.weights.sum(-1), torch.ones(6, 12, T), atol=1e-5)


def test_tokenizer_refuses_or_truncates_long_text(minilm, hf_tokenizer):
    long_text = " ".join(["brush"] * 600)
    with pytest.raises(ValueError, match="more than the model's maximum of 512"):
        minilm.attention(long_text)
    cut = minilm.tokenize([long_text], truncate=True)
    expected = hf_tokenizer([long_text], truncation=True, max_length=512)["input_ids"][0]
    assert cut.input_ids[0].tolist() == expected
    assert cut.tokens[0][-1] == "[SEP]"


def test_bad_text_input(minilm):
    with pytest.raises(TypeError, match="text must be a str"):
        minilm.attention(["a list"])
    with pytest.raises(ValueError, match="text is empty"):
        minilm.attention("   ")
    with pytest.raises(TypeError, match="list of str"):
        minilm.encode("one string")


def test_bad_token_ids(minilm):
    net = minilm.network
    with pytest.raises(ValueError, match=r"input_ids has 1 dims, \(B, T\) expected"):
        net(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="int64 or int32"):
        net(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size=30522\), got token id 40000"):
        net(torch.tensor([[101, 40000, 102]]))
    with pytest.raises(ValueError, match="T=513 tokens; expected 1 <= T <= max_positions=512"):
        net(torch.zeros(1, 513, dtype=torch.int64))


# --------------------------------------------------------------------------- checkpoint map


@pytest.fixture()
def minilm_copy(tmp_path):
    directory = tmp_path / "minilm"
    shutil.copytree(minilm_directory(), directory)
    return directory


def _rewrite(directory, edit):
    from safetensors.torch import save_file

    tensors = read_checkpoint(directory)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))


def test_missing_key_is_named(minilm_copy):
    _rewrite(minilm_copy, lambda t: t.pop("encoder.layer.3.attention.self.key.weight"))
    with pytest.raises(CheckpointError, match=r"missing 'encoder\.layer\.3\.attention\.self\.key\.weight'"):
        load(minilm_copy)


def test_misshapen_key_is_named(minilm_copy):
    def shrink(tensors):
        tensors["encoder.layer.5.intermediate.dense.weight"] = torch.zeros(1000, 384)

    _rewrite(minilm_copy, shrink)
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.5\.intermediate\.dense\.weight' has shape \(1000, 384\).*expected \(1536, 384\)"):
        load(minilm_copy)


def test_unexpected_keys_are_refused_not_dropped(minilm_copy):
    _rewrite(minilm_copy, lambda t: t.update({"encoder.layer.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"no place for: \['encoder\.layer\.0\.extra\.weight'\]"):
        load(minilm_copy)


def test_a_map_that_leaves_a_parameter_unfilled_is_refused():
    config = BertConfig(100, 16, 2, 8, 1, 2, 16, 1e-12, "gelu", 0)
    model = Bert(config)
    checkpoint = {k: v for k, v in _hf_names(model).items()}
    partial = [r for r in BERT_CHECKPOINT_MAP.rules if "ffn_norm" not in str(r.targets)]
    with pytest.raises(KeyError, match="unfilled.*ffn_norm"):
        load_state(model, checkpoint, partial, num_layers=1)
    with pytest.raises(KeyError, match="not a parameter"):
        load_state(model, checkpoint, [*BERT_CHECKPOINT_MAP.rules, Rule("embeddings.LayerNorm.bias", "nope.bias")],
                   num_layers=1)


def _hf_names(model: Bert) -> dict:
    """Our parameters under their Hugging Face names, by running the map backwards."""
    ours = dict(model.state_dict())
    out = {}
    for base in BERT_CHECKPOINT_MAP.rules:
        for rule in base.expand(model.config.num_layers):
            out[rule.source] = ours[rule.target_names()[0]].clone()
    return out


def test_masked_lm_checkpoint_with_prefix_loads(tmp_path):
    """A BertForMaskedLM folder ("bert." prefix, an MLM head) loads, and equals transformers."""
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, hidden_act="gelu")
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(config).eval()
    reference.save_pretrained(tmp_path)
    assert any(k.startswith("bert.") for k in read_checkpoint(tmp_path))
    ours = load_bert(tmp_path)
    assert any(k.startswith("cls.") for k in ours.load_report.ignored)  # the MLM head, known and skipped
    ids = torch.randint(0, 99, (3, 11))
    key_mask = torch.ones(3, 11, dtype=torch.bool)
    key_mask[1, 7:] = False
    with torch.no_grad():
        expected = reference.bert(ids, attention_mask=key_mask.long()).last_hidden_state
        got = ours(ids, key_mask=key_mask).hidden
    assert (got - expected)[key_mask].abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "roberta"}, "model_type='roberta', 'bert' expected"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key' is not supported"),
        ({"hidden_act": "swish"}, "hidden_act='swish' is not supported"),
        ({"is_decoder": True}, "decoder"),
    ],
)
def test_config_refusals(change, message):
    config = json.loads((minilm_directory() / "config.json").read_text())
    with pytest.raises(CheckpointError, match=message):
        BertConfig.from_hf({**config, **change})


def test_config_missing_field_is_named():
    config = json.loads((minilm_directory() / "config.json").read_text())
    del config["hidden_size"]
    with pytest.raises(CheckpointError, match="lacks 'hidden_size'"):
        BertConfig.from_hf(config)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="or a checkpoint folder, got 'no-such-model'"):
        load("no-such-model")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="model_type='t5'; multihead loads 'bert', 'gpt2' and 'llama'"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(tmp_path)
