"""`multihead visualize --model PATH` on folders of any architecture that transformers knows.

The rule the help states: bert, gpt2 and llama folders run on multihead's own
modules, any other model_type in transformers with attn_implementation=
"multihead" (multihead.models.hf_any). Each folder here is a tiny random model
saved with save_pretrained and a tokenizer written here (nothing downloaded).

What the head view embeds is checked against transformers' eager attention
under the project's rule (tests/hf_cases.py): golden = eager in float64,
yardstick = eager in float32, and the page's weights may be at most 2x the
yardstick's error + 1e-5 away from golden, plus half a unit of the page's
rounding (3 decimals). The unrounded weights of the transformers route meet
the rule itself, with no rounding slack.
"""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import write_random_gpt2
from multihead.tools.cli import main

transformers = pytest.importorskip("transformers", reason="the folders are built and checked with transformers")
pytest.importorskip("matplotlib", reason="visualize draws PNGs too")

import hf_cases as H  # noqa: E402  (needs transformers)
from multihead.models.hf_any import load_any  # noqa: E402
from multihead.viz.notebook import prettify  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog ate the food because it was hungry", "all is well"]
TEXT = "the cat sat on the mat"
INIT = 0.4  # initializer_range: weights large enough that heads differ and attention is far from uniform
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s", "well"]


def _bpe(directory, specials=("<s>", "</s>")):
    """A byte-level BPE tokenizer trained on TEXTS, saved as tokenizer.json alone; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials))
    tokenizer.train_from_iterator(TEXTS * 5, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def _decoder(config_cls, model_cls, directory, *, tokenizer=True, **config):
    """A tiny random decoder folder: 2 layers, 4 heads, width 32, with a BPE tokenizer.json unless told not."""
    vocab = _bpe(directory) if tokenizer else 300
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, initializer_range=INIT, **config)
    model_cls(cfg).save_pretrained(directory)
    if not tokenizer:
        (directory / "tokenizer.json").unlink(missing_ok=True)
    return directory


def _distilbert(directory):
    """A tiny random DistilBERT (an encoder) with a WordPiece vocab.txt: [CLS] and [SEP] are special tokens."""
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=len(WORDS), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64, initializer_range=INIT, dropout=0.0,
                                        attention_dropout=0.0)
    transformers.DistilBertModel(cfg).save_pretrained(directory)
    return directory


def _gpt2(directory):
    write_random_gpt2(directory, TEXTS, n_positions=64, initializer_range=INIT)
    return directory


FOLDERS = {
    # name -> (builder, the route the rule takes)
    "gpt2": (_gpt2, "multihead's own GPT-2"),
    "mistral": (lambda d: _decoder(transformers.MistralConfig, transformers.MistralForCausalLM, d,
                                   num_key_value_heads=2, sliding_window=4), "transformers"),
    "gpt_neox": (lambda d: _decoder(transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, d),
                 "transformers"),
    "distilbert": (_distilbert, "transformers"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, (build, _) in FOLDERS.items():
        made[name] = build(tmp_path_factory.mktemp(name))
    return made


def _page(path) -> dict:
    found = re.search(r'<script type="application/json" id="mh-data">(.*?)</script>', path.read_text(), re.S)
    assert found, "no data block in the page"
    return json.loads(found.group(1))


def _dense(data: dict) -> np.ndarray:
    """The page's links back as (L, H, T, T) weights: every link is there when k == T."""
    L, H, T, k = data["L"], data["H"], data["T"], data["k"]
    assert k == T, "the text must be short enough that the page embeds every link"
    keys = np.frombuffer(base64.b64decode(data["edges"]["keys"]), "<u2").reshape(L, H, T, k)  # (L*H*T*k,) -> ...
    values = np.frombuffer(base64.b64decode(data["edges"]["weights"]), "<u2").reshape(L, H, T, k)  # the same
    dense = np.zeros((L, H, T, T))
    np.put_along_axis(dense, keys.astype(np.int64), values / data["edges"]["scale"], axis=-1)  # (L, H, T, k) -> T
    return dense


def _eager(directory, ids: torch.Tensor, dtype) -> np.ndarray:
    """transformers' eager attention weights (L, H, T, T) of the folder's model on `ids`, in `dtype`."""
    model = transformers.AutoModel.from_pretrained(str(directory), attn_implementation="eager").to(dtype).eval()
    with torch.no_grad(), H.float64_softmax():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).double().numpy()  # L x (1, H, T, T) -> (L, H, T, T)


def _golden_and_naive(directory, ids):
    return _eager(directory, ids, torch.float64), _eager(directory, ids, torch.float32)


# --------------------------------------------------------------------------- the head view equals eager


@pytest.mark.parametrize("name", list(FOLDERS))
def test_visualize_writes_eagers_weights(name, folders, tmp_path, capsys):
    directory = folders[name]
    assert main(["visualize", TEXT, "--model", str(directory), "--out", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at 120 columns
    if FOLDERS[name][1] == "transformers":
        assert f"{name} (" in out and "through transformers" in out and "attn_implementation='multihead'" in out
    else:
        assert "gpt2, 2 layers x 4 heads" in out and "every attention layer is multihead.MultiHeadAttention" in out
    data = _page(tmp_path / "heads.html")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])  # (1, T)
    assert data["tokens"] == prettify(tokenizer.convert_ids_to_tokens(ids[0].tolist()))  # the CLI ran these ids
    page = _dense(data)
    golden, naive = _golden_and_naive(directory, ids)
    assert page.shape == golden.shape == (2, 4, ids.shape[1], ids.shape[1])
    err, yardstick = np.abs(page - golden).max(), np.abs(naive - golden).max()
    rounding = 0.5 / data["edges"]["scale"]
    assert err <= H.OUT_FACTOR * yardstick + H.ABS_SLACK + rounding, f"{name}: {err:.3g} vs eager {yardstick:.3g}"
    assert np.abs(golden[:, 0] - golden[:, 1]).max() > 0.2, "heads too alike for the comparison to tell them apart"
    if name == "distilbert":
        assert data["special"] == [True] + [False] * (ids.shape[1] - 2) + [True]  # [CLS] ... [SEP]


@pytest.mark.parametrize("name", ["mistral", "distilbert"])
def test_the_transformers_route_meets_the_rule_unrounded(name, folders):
    model = load_any(folders[name])
    view = model.attention(TEXT)
    ids = model.tokenize([TEXT]).input_ids
    expected = transformers.AutoTokenizer.from_pretrained(str(folders[name]))(TEXT)["input_ids"]
    assert ids[0].tolist() == expected  # AutoTokenizer's tokenizer, post-processor included
    golden, naive = _golden_and_naive(folders[name], ids)
    err = np.abs(view.weights.double().numpy() - golden).max()
    yardstick = np.abs(naive - golden).max()
    assert H.rule_holds(err, yardstick, H.OUT_FACTOR), f"{name}: {err:.3g} vs eager {yardstick:.3g}"


def test_the_weights_are_all_multiheads_even_inside_an_options_block(folders):
    """visualize asks for every weight; an enclosing multihead.hf.options(heads=...) must not cut the view."""
    import multihead.hf

    model = load_any(folders["mistral"])
    with multihead.hf.options(heads=[0], rows=-1):
        view = model.attention(TEXT)
    T = len(view.tokens)
    assert view.weights.shape == (2, 4, T, T)
    torch.testing.assert_close(view.weights.sum(-1), torch.ones(2, 4, T))


def test_token_and_layer_options_work_on_the_transformers_route(folders, tmp_path, capsys):
    assert main(["visualize", TEXT, "--model", str(folders["mistral"]), "--token", "mat", "--layer", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Where each head looks from 'mat'" in out and "Per-head statistics, layer 1" in out
    assert (tmp_path / "layer1.png").is_file() and _page(tmp_path / "heads.html")["start_layer"] == 1


def test_help_states_the_rule(capsys):
    assert main(["visualize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "bert, gpt2 and llama on multihead's own modules" in text
    assert "any other model_type through transformers" in text


# --------------------------------------------------------------------------- bad folders: one line, exit 2


def _sparse(directory, folders):
    """DeepSeek-V3.2: sparse attention over the keys its indexer selects (indices=), which multihead refuses."""
    return _decoder(transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM, directory,
                    num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, first_k_dense_replace=2, q_lora_rank=16, kv_lora_rank=16,
                    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=16,
                    index_topk=4, n_group=1, topk_group=1)


def _bloom(directory, folders):
    _bpe(directory)
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4)
    transformers.BloomModel(config).save_pretrained(directory)
    return directory


def _unknown(directory, folders):
    (directory / "config.json").write_text('{"model_type": "frobnicator"}')
    return directory


def _no_tokenizer(directory, folders):
    return _decoder(transformers.MistralConfig, transformers.MistralForCausalLM, directory, tokenizer=False)


def _no_weights(directory, folders):
    shutil.copytree(folders["mistral"], directory, dirs_exist_ok=True)
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    return directory


def _mistral(directory, folders):
    return folders["mistral"]


@pytest.mark.parametrize("build, text, extra, message", [
    (_no_tokenizer, TEXT, [], r"has no tokenizer: expected tokenizer\.json"),
    (_unknown, TEXT, [], r"model_type='frobnicator', which neither multihead's own models \(bert, gpt2, llama\) "
                         r"nor transformers \S+ know"),
    (_sparse, TEXT, [], r"cannot run deepseek_v32 \(DeepseekV32Attention, layer 0\): it uses sparse attention"),
    (_bloom, TEXT, [], r"bloom \(BloomModel\) computes attention in its own code, not through transformers' "
                       r"AttentionInterface \(layers \[0, 1\]\)"),
    (_no_weights, TEXT, [], r"transformers could not load .* as a mistral model: OSError: "),
    (_mistral, TEXT + " and" * 70, [], "more than the model's maximum of 64"),
    (_mistral, TEXT, ["--token", "dog"], "token 'dog' is not in the text"),
    (_mistral, TEXT, ["--layer", "2"], r"layer must be in \[0, 2\) for this model, got 2"),
    (lambda directory, folders: "", TEXT, [], r"--model is empty; give 'minilm' or a local Hugging Face"),
], ids=["no-tokenizer", "unknown-architecture", "sparse-attention", "no-attention-interface", "no-weights",
        "too-long", "token-not-in-text", "layer-out-of-range", "empty-model"])
def test_bad_folders_and_input_give_one_line(build, text, extra, message, folders, tmp_path, capfd):
    (tmp_path / "model").mkdir()
    directory = build(tmp_path / "model", folders)
    capfd.readouterr()  # what building the folder printed
    assert main(["visualize", text, "--model", str(directory), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("multihead visualize: error: ") and re.search(message, err[0]), err[0]
    assert not (tmp_path / "out" / "heads.html").exists()
