"""Reading a checkpoint folder: every broken file is one CheckpointError line naming it; BERT's vocab.txt alone loads.

Nothing is downloaded: the folders are written here (a random GPT-2 or BERT by transformers,
a WordPiece vocabulary by hand).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multihead.tools.cli import main
from multihead.models import CheckpointError, load
from multihead.models.checkpoint_map import read_checkpoint, read_config
from multihead.models.gpt2 import load_gpt2
from multihead.models.text import TextTokenizer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random GPT-2 saved by transformers, both as model.safetensors and as pytorch_model.bin."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    directory = tmp_path_factory.mktemp("gpt2-files")
    model.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "weights.bin")
    return directory


def folder_with(tmp_path, source, name, data: bytes):
    """tmp_path holding source's config.json and `name` with the given bytes."""
    shutil.copy(source / "config.json", tmp_path / "config.json")
    (tmp_path / name).write_bytes(data)
    return tmp_path


def assert_one_line_error(call, *named) -> str:
    with pytest.raises(CheckpointError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for part in named:
        assert str(part) in message, message
    return message


def test_a_truncated_safetensors_file_is_named(gpt2_folder, tmp_path):
    data = (gpt2_folder / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 5):
        broken = folder_with(tmp_path, gpt2_folder, "model.safetensors", data[:cut])
        message = assert_one_line_error(lambda: load_gpt2(broken), broken / "model.safetensors")
        assert "cannot be read as safetensors" in message


def test_a_truncated_pytorch_model_bin_is_named(gpt2_folder, tmp_path):
    data = (gpt2_folder / "weights.bin").read_bytes()
    for cut in (len(data) // 2, 10, 0):  # 0 bytes: torch.load raises EOFError
        broken = folder_with(tmp_path, gpt2_folder, "pytorch_model.bin", data[:cut])
        message = assert_one_line_error(lambda: read_checkpoint(broken), broken / "pytorch_model.bin")
        assert "cannot be read by torch.load" in message


def test_a_pytorch_model_bin_that_is_not_a_state_dict_is_named(gpt2_folder, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    shutil.copy(gpt2_folder / "config.json", tmp_path / "config.json")
    assert_one_line_error(lambda: load_gpt2(tmp_path), tmp_path / "pytorch_model.bin", "not a dict of tensors")


@pytest.mark.parametrize("text, says", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object {...}, got a JSON list"),
    ('"gpt2"', "got a JSON str"),
    ("null", "got a JSON NoneType"),
])
def test_a_config_that_is_not_a_json_object_is_named(tmp_path, text, says):
    (tmp_path / "config.json").write_text(text)
    assert_one_line_error(lambda: read_config(tmp_path), tmp_path / "config.json", says)
    assert_one_line_error(lambda: load(tmp_path), tmp_path / "config.json", says)


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(lambda: load(tmp_path), tmp_path / "config.json", "not UTF-8")


def test_a_broken_tokenizer_json_is_named(gpt2_folder, tmp_path):
    shutil.copy(gpt2_folder / "config.json", tmp_path / "config.json")
    shutil.copy(gpt2_folder / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert_one_line_error(lambda: load(tmp_path), tmp_path / "tokenizer.json")


def test_the_cli_reports_a_truncated_checkpoint_in_one_line(gpt2_folder, tmp_path, capsys):
    data = (gpt2_folder / "model.safetensors").read_bytes()
    broken = folder_with(tmp_path, gpt2_folder, "model.safetensors", data[:100])
    assert main(["generate", "hello", "--model", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("multihead generate: error: "), err
    assert str(broken / "model.safetensors") in err[0]


# --------------------------------------------------------------------------- BERT's vocab.txt

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "'", "the", "cat", "sat", "on", "mat",
         "han", "##ni", "##bel", "a", "dog", "ate", "food", "because", "it", "was", "hungry", "cafe", "##s",
         "The", "Cat", "中", "un", "##known", "is", "well", "all"]
SENTENCES = ["The cat sat on the mat.", "Hannibel ate the food, because it was hungry!", "ALL is WELL",
             "Café cats' unknown 中文 words", "a dog", ""]


def write_vocab(directory, lower_case: bool | None) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if lower_case is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower_case}))


@pytest.mark.parametrize("lower_case", [None, True, False])
def test_vocab_txt_tokenizes_as_transformers_bert_tokenizer(tmp_path, lower_case):
    write_vocab(tmp_path, lower_case)
    ours = TextTokenizer.from_directory(tmp_path, pad_id=0)
    theirs = transformers.BertTokenizer(str(tmp_path / "vocab.txt"),
                                        do_lower_case=True if lower_case is None else lower_case)
    batch = ours(SENTENCES, max_length=64)
    for b, sentence in enumerate(SENTENCES):
        expected = theirs(sentence)["input_ids"]
        assert batch.input_ids[b, :len(expected)].tolist() == expected, sentence
        assert int(batch.key_mask[b].sum()) == len(expected)
        assert batch.tokens[b] == theirs.convert_ids_to_tokens(expected)
        assert batch.special[b][0] and batch.special[b][-1]  # [CLS] ... [SEP]
    if lower_case is False:  # cased: "The" is its own token, "ALL" is unknown
        assert batch.tokens[0][1] == "The" and batch.tokens[2][1] == "[UNK]"


def test_a_bert_folder_with_only_vocab_txt_loads(tmp_path):
    write_vocab(tmp_path, None)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=20, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    model = load(tmp_path)
    theirs = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    assert model.tokenize(["Hannibel sat"]).input_ids[0].tolist() == theirs("Hannibel sat")["input_ids"]
    view = model.attention("Hannibel sat")
    assert view.tokens == ["[CLS]", "han", "##ni", "##bel", "sat", "[SEP]"] and view.weights.shape == (1, 2, 6, 6)


def test_a_bad_tokenizer_config_or_vocab_is_named(tmp_path):
    write_vocab(tmp_path, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": "yes"}))
    assert_one_line_error(lambda: TextTokenizer.from_directory(tmp_path), tmp_path / "tokenizer_config.json",
                   "do_lower_case='yes'")
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "vocab.txt").write_text("only\nwords\n")  # no [CLS] / [SEP]
    assert_one_line_error(lambda: TextTokenizer.from_directory(tmp_path), tmp_path / "vocab.txt")
