"""The Llama-style decoder against transformers' LlamaForCausalLM (eager), built small and random.

Nothing is downloaded: the oracle is a seeded LlamaForCausalLM (4 query heads, 2 key/value
heads) saved to a temporary folder, which load_llama then reads like any checkpoint.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import max_err
from multihead import MultiHeadAttention
from multihead.nn.cache import DynamicCache, StaticCache
from multihead.generate import generate
from multihead.models import load
from multihead.models.checkpoint_map import CheckpointError
from multihead.models.gpt2 import DecoderOutput
from multihead.models.llama import Llama, LlamaConfig, load_llama

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V, C, L, H, G, F = 512, 64, 3, 4, 2, 96  # vocab, width, layers, query heads, kv heads, MLP width


def hf_config(**changes):
    settings = dict(
        vocab_size=V, hidden_size=C, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=G, max_position_embeddings=256, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no stop token: generate runs all steps
        initializer_range=0.2,  # larger than Llama's 0.02, so greedy decoding does not repeat one token
        attn_implementation="eager",
    )
    settings.update(changes)
    return transformers.LlamaConfig(**settings)


def build(tmp_path_factory, name, **changes):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(**changes)).eval()
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return model, directory, load_llama(directory)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers' model, its saved folder, ours loaded from that folder), built once."""
    return build(tmp_path_factory, "llama")


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_structure_every_attention_is_multihead(hf):
    _, _, ours = hf
    assert isinstance(ours, Llama) and not ours.training
    assert len(ours.blocks) == L
    for block in ours.blocks:
        attention = block.attention
        assert type(attention) is MultiHeadAttention
        assert attention.config.causal and attention.config.num_heads == H and attention.config.num_kv_heads == G
        assert attention.q_proj.bias is None and attention.rope is not None
        assert attention.k_proj.weight.shape == (G * C // H, C)
    assert ours.lm_head.weight is not ours.token_embedding.weight
    assert ours.config == LlamaConfig(vocab_size=V, max_positions=256, d_model=C, num_layers=L, num_heads=H,
                                      num_kv_heads=G, head_dim=C // H, d_mlp=F, rms_norm_eps=1e-6,
                                      rope_theta=10000.0)


def test_logits_and_attentions_match_transformers(hf):
    model, _, ours = hf
    x = ids(3, 29)
    with torch.no_grad():
        expected = model(x, output_attentions=True)
        out = ours(x, need_weights=True)
    assert isinstance(out, DecoderOutput)
    assert out.logits.shape == (3, 29, V)
    assert max_err(out.logits, expected.logits) < 1e-4
    assert len(out.attentions) == L
    for layer, (got, want) in enumerate(zip(out.attentions, expected.attentions)):
        assert got.shape == (3, H, 29, 29)
        assert max_err(got, want) < 1e-5, f"layer {layer}"
    assert ours(x).attentions is None


@pytest.mark.parametrize("static", [False, True])
def test_cached_chunks_equal_the_full_forward(hf, static):
    """Chunks of 1, 3 and 7 tokens against a cache give the full forward's logits (RoPE offset included)."""
    _, _, ours = hf
    x = ids(2, 23, seed=1)
    with torch.no_grad():
        full = ours(x).logits
        cache = ours.make_cache(batch_size=2, max_length=32 if static else None, static=static)
        assert isinstance(cache, StaticCache if static else DynamicCache)
        pieces, start = [], 0
        for size in (1, 3, 7, 1, 3, 7, 1):
            pieces.append(ours(x[:, start:start + size], cache=cache).logits)
            start += size
    assert start == 23 and cache.lengths.tolist() == [23, 23]
    assert max_err(torch.cat(pieces, dim=1), full) < 1e-4


def test_cached_weights_cover_the_cache(hf):
    model, _, ours = hf
    x = ids(1, 12, seed=2)
    with torch.no_grad():
        cache = ours.make_cache()
        ours(x[:, :9], cache=cache)
        step = ours(x[:, 9:], cache=cache, need_weights=True)
        expected = model(x, output_attentions=True).attentions
    for got, want in zip(step.attentions, expected):
        assert got.shape[:3] == (1, H, 3)
        assert max_err(got[..., :12], want[:, :, 9:]) < 1e-5


@pytest.mark.parametrize("B,T,seed", [(1, 1, 3), (2, 8, 4)])
def test_greedy_generate_matches_transformers(hf, B, T, seed):
    model, _, ours = hf
    prompt = ids(B, T, seed)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=12, pad_token_id=0)
    # transformers' tokens once; every way of decoding ours against them
    for use_cache, static_cache in ((True, False), (True, True), (False, False)):
        out = generate(ours, prompt, max_new_tokens=12, use_cache=use_cache, static_cache=static_cache)
        assert out.tokens.shape == (B, T + 12)
        assert torch.equal(out.tokens, expected), (use_cache, static_cache)
        assert out.lengths.tolist() == [T + 12] * B and not out.finished.any()
        assert len(set(out.tokens[0, T:].tolist())) > 3  # a real continuation, not one token repeated


def test_stop_token_as_transformers(hf):
    """With an eos token, transformers pads the finished sequence: so do we (and stop when all are done)."""
    model, _, ours = hf
    prompt = ids(2, 6, seed=5)
    free = generate(ours, prompt, max_new_tokens=10)
    eos = int(free.tokens[0, 6 + 4])  # sequence 0's fifth new token
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=10, eos_token_id=eos, pad_token_id=7)
    for use_cache in (True, False):
        out = generate(ours, prompt, max_new_tokens=10, stop_tokens=[eos], pad_token_id=7, use_cache=use_cache)
        width = expected.shape[1]
        assert torch.equal(out.tokens[:, :width], expected)
        assert bool(out.finished[0]) and out.lengths[0] == 6 + 5
        assert (out.tokens[0, 11:] == 7).all()


def test_float64_decodes_the_same_with_and_without_cache(hf):
    """Another dtype loads and decodes (cached == uncached there too)."""
    _, directory, _ = hf
    ours = load_llama(directory, dtype=torch.float64)
    prompt = ids(2, 5, seed=6)
    a = generate(ours, prompt, max_new_tokens=8)
    b = generate(ours, prompt, max_new_tokens=8, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)


def test_tied_embeddings_and_biases(tmp_path_factory):
    """tie_word_embeddings, attention_bias and mlp_bias load through their own rules."""
    model, _, ours = build(tmp_path_factory, "llama-variant", tie_word_embeddings=True, attention_bias=True,
                           mlp_bias=True, num_key_value_heads=1, head_dim=32)
    assert ours.lm_head.weight is ours.token_embedding.weight
    assert ours.blocks[0].attention.q_proj.bias is not None and ours.blocks[0].mlp.gate.bias is not None
    assert ours.config.num_kv_heads == 1 and ours.config.head_dim == 32  # MQA, head_dim != C / H
    x = ids(2, 11, seed=7)
    with torch.no_grad():
        assert max_err(ours(x).logits, model(x).logits) < 1e-4


def test_load_dispatches_on_model_type(hf):
    """models.load gives a TextModel for a Llama folder (a tokenizer is needed: one is written here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    _, directory, ours = hf
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["the cat sat on the mat"] * 3, trainers.BpeTrainer(vocab_size=60))
    tokenizer.save(str(directory / "tokenizer.json"))
    model = load(directory)
    assert model.kind == "llama" and isinstance(model.network, Llama)
    assert model.attention("the cat sat").weights.shape == (L, H, 3, 3)


def copy_with(directory, tmp_path, change):
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    tensors = safetensors_torch.load_file(str(directory / "model.safetensors"))
    change(tensors)
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_and_misshapen_keys_are_named(hf, tmp_path):
    _, directory, _ = hf
    broken = copy_with(directory, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj\.weight"):
        load_llama(broken)
    broken = copy_with(directory, tmp_path, lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight",
                                                                    torch.zeros(F, C + 1)))
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.up_proj\.weight"):
        load_llama(broken)
    broken = copy_with(directory, tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_llama(broken)


def test_old_checkpoint_with_rope_buffers_and_no_prefix(hf, tmp_path):
    """A bare LlamaModel state (no "model." prefix) with the rotary_emb.inv_freq buffers of older versions."""
    model, directory, ours = hf
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    for i in range(L):
        state[f"layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(C // H // 2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    x = ids(1, 6, seed=8)
    assert torch.equal(load_llama(tmp_path)(x).logits, ours(x).logits)


def test_from_hf_reads_old_style_rope_theta():
    config = hf_config(rope_theta=5e5).to_dict()
    config.pop("rope_parameters", None)
    config["rope_theta"] = 5e5
    assert LlamaConfig.from_hf(config).rope_theta == 5e5


@pytest.mark.parametrize("change,named", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "rope_type='llama3'"),
    (dict(model_type="mistral"), "model_type='mistral', 'llama' expected"),
])
def test_from_hf_refuses_what_it_does_not_compute(change, named):
    config = hf_config().to_dict()
    config.update(change)
    with pytest.raises(ValueError, match=named):
        LlamaConfig.from_hf(config)


def test_load_refuses_an_unsupported_config(hf, tmp_path):
    _, directory, _ = hf
    shutil.copy(directory / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_scaling"):
        load_llama(tmp_path)


def test_bad_inputs(hf):
    _, _, ours = hf
    x = ids(2, 5)
    cases = [
        (TypeError, "int64", lambda: ours(x.float())),
        (ValueError, r"3 dims, \(B, T\)", lambda: ours(x[:, :, None])),
        (ValueError, "vocab_size=512.*got token id 512", lambda: ours(torch.tensor([[3, V]]))),
        (TypeError, "key_mask must be a bool", lambda: ours(x, key_mask=torch.ones(2, 5))),
        (ValueError, "pad on the right",
         lambda: ours(x, key_mask=torch.tensor([[True] * 5, [False, True, True, True, True]]))),
        (TypeError, "cache must be a multihead.nn.cache.KVCache", lambda: ours(x, cache=ours.make_cache()[0])),
        (ValueError, "cache has 2 layers, the model has num_layers=3", lambda: ours(x, cache=DynamicCache(2))),
        (ValueError, "StaticCache overflow", lambda: ours(x, cache=ours.make_cache(2, max_length=4, static=True))),
        (ValueError, "static cache needs batch_size", lambda: ours.make_cache(static=True)),
        (ValueError, "max_length is for a static cache", lambda: ours.make_cache(max_length=8)),
        (ValueError, "multiple of num_kv_heads", lambda: LlamaConfig(num_heads=4, num_kv_heads=3)),
        (TypeError, "floating torch.dtype", lambda: load_llama(".", dtype=torch.int64)),
        (TypeError, "config must be a dict", lambda: LlamaConfig.from_hf("config.json")),
        (TypeError, "must be a LlamaConfig", lambda: Llama({"d_model": 4})),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
