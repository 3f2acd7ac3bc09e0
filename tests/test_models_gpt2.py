"""GPT-2 on MultiHeadAttention against transformers' GPT2LMHeadModel (eager), built small and random.

Nothing is downloaded: the oracle is a seeded GPT2LMHeadModel saved to a temporary folder,
which load_gpt2 then reads like any Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import max_err
from multihead import MultiHeadAttention
from multihead.models.checkpoint_map import CheckpointError
from multihead.models.gpt2 import GPT2, DecoderOutput, GPT2Config, greedy, load_gpt2

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V, P, C, L, H = 1000, 128, 64, 3, 4  # vocab, positions, width, layers, heads of the test model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers' model, its saved folder, ours loaded from that folder), built once."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no stop token: generate runs all steps
        initializer_range=0.2,  # larger than GPT-2's 0.02, so greedy decoding does not repeat one token
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    return model, directory, load_gpt2(directory)


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def copy_with(directory, tmp_path, change):
    """A copy of the saved checkpoint whose tensors went through change(dict)."""
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    tensors = safetensors_torch.load_file(str(directory / "model.safetensors"))
    change(tensors)
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_structure_every_attention_is_multihead(hf):
    _, _, ours = hf
    assert isinstance(ours, GPT2) and not ours.training
    assert len(ours.blocks) == L
    for block in ours.blocks:
        assert type(block.attention) is MultiHeadAttention
        assert block.attention.config.causal and block.attention.config.num_heads == H
        assert block.attention.q_proj.bias is not None
    assert ours.lm_head.weight is ours.token_embedding.weight
    assert ours.config == GPT2Config(vocab_size=V, max_positions=P, d_model=C, num_layers=L, num_heads=H,
                                     d_mlp=4 * C, layer_norm_eps=1e-5, activation="gelu_tanh")


def test_logits_match_transformers(hf):
    model, _, ours = hf
    x = ids(3, 37)
    with torch.no_grad():
        expected = model(x).logits
        out = ours(x)
    assert isinstance(out, DecoderOutput) and out.attentions is None
    assert out.logits.shape == (3, 37, V)
    assert max_err(out.logits, expected) < 1e-4


def test_attention_weights_match_transformers_eager(hf):
    model, _, ours = hf
    x = ids(2, 19, seed=1)
    with torch.no_grad():
        expected = model(x, output_attentions=True).attentions
        out = ours(x, need_weights=True)
    assert len(out.attentions) == len(expected) == L
    for layer, (got, want) in enumerate(zip(out.attentions, expected)):
        assert got.shape == (2, H, 19, 19)
        assert max_err(got, want) < 1e-5, f"layer {layer}"
    assert max_err(out.logits, model(x).logits.detach()) < 1e-4


def test_greedy_matches_generate(hf):
    # a one-token prompt against transformers: tests/test_generate.py (generate, which shares the model's forward)
    model, _, ours = hf
    B, T = 2, 7
    prompt = ids(B, T, seed=3)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=12, pad_token_id=0)
    got = greedy(ours, prompt, 12)
    assert got.shape == (B, T + 12)
    assert torch.equal(got, expected)
    assert torch.equal(greedy(ours, prompt, 0), prompt)


def test_right_padding_leaves_real_tokens_alone(hf):
    model, _, ours = hf
    lengths = [5, 11]
    real = ids(2, 11, seed=4)

    def run(T, pad_seed):
        x = ids(2, T, seed=pad_seed)  # the padding holds arbitrary tokens
        key_mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
        x[key_mask] = real[key_mask[:, :11]]
        with torch.no_grad():
            return x, key_mask, ours(x, key_mask=key_mask, need_weights=True)

    x, key_mask, short = run(11, pad_seed=5)
    _, _, long = run(16, pad_seed=6)
    for b, n in enumerate(lengths):
        assert max_err(short.logits[b, :n], long.logits[b, :n]) < 1e-5
        alone = ours(real[b:b + 1, :n]).logits[0]
        assert max_err(short.logits[b, :n], alone) < 1e-5
    # no query, padded or real, attends to a padded key
    for weights in long.attentions:
        assert (weights[0, :, :, lengths[0]:] == 0).all()
    with torch.no_grad():
        expected = model(x, attention_mask=key_mask.long()).logits
    assert max_err(short.logits[key_mask], expected[key_mask]) < 1e-4


def test_float64_load(hf):
    model, directory, _ = hf
    ours = load_gpt2(directory, dtype=torch.float64)
    assert ours.token_embedding.weight.dtype == torch.float64
    x = ids(1, 9, seed=7)
    assert max_err(ours(x).logits, model(x).logits.detach()) < 1e-4


def test_legacy_pytorch_model_bin(hf, tmp_path):
    """An old-style GPT2Model pytorch_model.bin: no "transformer." prefix, with the mask buffers."""
    model, directory, ours = hf
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(L):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P, dtype=torch.bool)).view(1, 1, P, P)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    x = ids(2, 8, seed=8)
    assert torch.equal(load_gpt2(tmp_path)(x).logits, ours(x).logits)


def test_missing_key_is_named(hf, tmp_path):
    _, directory, _ = hf
    broken = copy_with(directory, tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.bias"):
        load_gpt2(broken)


@pytest.mark.parametrize("key,shape", [
    ("transformer.h.2.attn.c_proj.weight", (C, C - 1)),
    ("transformer.h.0.attn.c_attn.weight", (C, 3 * C - 1)),  # does not split into q, k, v
    ("transformer.wpe.weight", (P + 1, C)),
])
def test_misshapen_key_is_named(hf, tmp_path, key, shape):
    _, directory, _ = hf
    broken = copy_with(directory, tmp_path, lambda t: t.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_gpt2(broken)


def test_unexpected_key_is_named(hf, tmp_path):
    _, directory, _ = hf
    broken = copy_with(directory, tmp_path, lambda t: t.__setitem__("transformer.h.0.attn.q_attn.weight",
                                                                    torch.zeros(C, C)))
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.q_attn\.weight"):
        load_gpt2(broken)


def hf_config(**changes):
    config = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H).to_dict()
    config.update(changes)
    return config


def test_from_hf_reads_the_sizes():
    config = GPT2Config.from_hf(hf_config(n_inner=100, layer_norm_epsilon=1e-6, activation_function="gelu"))
    assert config == GPT2Config(vocab_size=V, max_positions=P, d_model=C, num_layers=L, num_heads=H,
                                d_mlp=100, layer_norm_eps=1e-6, activation="gelu")


@pytest.mark.parametrize("change,named", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(model_type="bert"), "model_type='bert', 'gpt2' expected"),
])
def test_from_hf_refuses_what_it_does_not_compute(change, named):
    with pytest.raises(ValueError, match=named):
        GPT2Config.from_hf(hf_config(**change))


def test_load_refuses_an_unsupported_config(hf, tmp_path):
    _, directory, _ = hf
    shutil.copy(directory / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        load_gpt2(tmp_path)


def test_bad_inputs(hf):
    _, _, ours = hf
    x = ids(2, 5)
    cases = [
        (TypeError, "int64", lambda: ours(x.float())),
        (TypeError, "torch.Tensor", lambda: ours([[1, 2]])),
        (ValueError, r"3 dims, \(B, T\)", lambda: ours(x[:, :, None])),
        (ValueError, "max_positions=128", lambda: ours(ids(1, P + 1))),
        (ValueError, "T=0", lambda: ours(x[:, :0])),
        (ValueError, "vocab_size=1000.*got token id 1000", lambda: ours(torch.tensor([[3, V]]))),
        (ValueError, "got token id -1", lambda: ours(torch.tensor([[-1, 3]]))),
        (TypeError, "key_mask must be a bool", lambda: ours(x, key_mask=torch.ones(2, 5))),
        (ValueError, r"\(2, 5\), got \(2, 4\)", lambda: ours(x, key_mask=torch.ones(2, 4, dtype=torch.bool))),
        (ValueError, r"pad on the right.*rows \[1\]",
         lambda: ours(x, key_mask=torch.tensor([[True] * 5, [False, True, True, True, True]]))),
        (ValueError, "exceed max_positions", lambda: greedy(ours, ids(1, P - 3), 4)),
        (ValueError, "max_new_tokens", lambda: greedy(ours, x, -1)),
        (TypeError, "must be a GPT2", lambda: greedy(torch.nn.Linear(2, 2), x, 1)),
        (TypeError, "floating torch.dtype", lambda: load_gpt2(".", dtype=torch.int64)),
        (ValueError, "divisible by num_heads", lambda: GPT2Config(d_model=10, num_heads=3)),
        (TypeError, "config must be a dict", lambda: GPT2Config.from_hf("config.json")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_gpt2(tmp_path)
