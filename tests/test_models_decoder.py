"""The one decoder base under GPT-2 and Llama: shared forward / make_cache, and refused calls that change nothing."""

from __future__ import annotations

import pytest
import torch

from multihead.nn.cache import DynamicCache, StaticCache
from multihead.models.decoder import Decoder, DecoderOutput
from multihead.models.gpt2 import GPT2, GPT2Config
from multihead.models.llama import Llama, LlamaConfig

V, P = 50, 12  # vocab and GPT-2's learned positions


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=V, max_positions=P, d_model=16, num_layers=2, num_heads=4)).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, max_positions=P, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                         d_mlp=24)
    return Llama(config).eval()


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def snapshot(cache):
    """Every layer's lengths and stored keys/values, copied."""
    return [(layer._lengths.clone(), layer._k.clone(), layer._v.clone()) for layer in cache]


def assert_unchanged(cache, before):
    for (lengths, k, v), layer in zip(before, cache):
        assert torch.equal(layer._lengths, lengths)
        assert torch.equal(layer._k, k) and torch.equal(layer._v, v)


def test_gpt2_and_llama_share_one_forward_and_make_cache():
    for model_class in (GPT2, Llama):
        assert issubclass(model_class, Decoder)
        assert model_class.forward is Decoder.forward
        assert model_class.make_cache is Decoder.make_cache
        assert "forward" not in vars(model_class) and "make_cache" not in vars(model_class)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_the_base_runs_each_model_with_its_own_embedding(which, gpt2, llama):
    model = {"gpt2": gpt2, "llama": llama}[which]
    x = ids(2, 7)
    with torch.no_grad():
        full = model(x, need_weights=True)
        cache = model.make_cache()
        first = model(x[:, :4], cache=cache)
        rest = model(x[:, 4:], cache=cache, need_weights=True)
    assert isinstance(full, DecoderOutput) and full.logits.shape == (2, 7, V)
    assert len(full.attentions) == 2 and full.attentions[0].shape == (2, 4, 7, 7)
    # the positions of the second chunk come from the cache: learned rows 4..6 (GPT-2), RoPE offsets (Llama)
    assert torch.allclose(torch.cat([first.logits, rest.logits], dim=1), full.logits, atol=1e-5)
    assert rest.attentions[0].shape == (2, 4, 3, 7)


def test_gpt2_past_max_positions_with_a_cache_leaves_the_cache_as_it_was(gpt2):
    with torch.no_grad():
        cache = gpt2.make_cache()
        gpt2(ids(2, P - 2), cache=cache)
        before = snapshot(cache)
        with pytest.raises(ValueError, match=rf"would reach position {P}.*max_positions={P}"):
            gpt2(ids(2, 3, seed=1), cache=cache)
    assert cache.lengths.tolist() == [P - 2, P - 2]
    assert_unchanged(cache, before)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_every_refused_call_leaves_the_cache_as_it_was(which, gpt2, llama):
    model = {"gpt2": gpt2, "llama": llama}[which]
    with torch.no_grad():
        cache = model.make_cache(batch_size=2, max_length=8, static=True)
        model(ids(2, 5), cache=cache)
        before = snapshot(cache)
        refused = [
            (ValueError, "got token id 50", lambda: model(torch.tensor([[1, 2], [3, V]]), cache=cache)),
            (ValueError, "pad on the right", lambda: model(ids(2, 2), key_mask=torch.tensor([[True, True],
                                                                                            [False, True]]),
                                                          cache=cache)),
            (TypeError, "need_weights must be a bool", lambda: model(ids(2, 2), cache=cache, need_weights="yes")),
            (ValueError, "batch size B=3, the cache holds 2", lambda: model(ids(3, 2), cache=cache)),
            (ValueError, "StaticCache overflow", lambda: model(ids(2, 4), cache=cache)),
        ]
        for error, message, call in refused:
            with pytest.raises(error, match=message):
                call()
            assert_unchanged(cache, before)


def test_a_refused_first_call_leaves_a_dynamic_cache_empty(gpt2):
    cache = gpt2.make_cache(batch_size=2)
    with torch.no_grad(), pytest.raises(TypeError, match="need_weights must be a bool"):
        gpt2(ids(2, 3), cache=cache, need_weights=1)
    assert cache.lengths.tolist() == [0, 0] and all(layer._k is None for layer in cache)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_make_cache_checks_its_arguments(which, gpt2, llama):
    model = {"gpt2": gpt2, "llama": llama}[which]
    assert isinstance(model.make_cache(), DynamicCache)
    static = model.make_cache(batch_size=3, static=True)
    assert isinstance(static, StaticCache) and static.max_length == P and static.batch_size == 3
    cases = [
        (TypeError, "static must be a bool", lambda: model.make_cache(batch_size=2, static="yes")),
        (TypeError, "batch_size must be an int", lambda: model.make_cache(batch_size="2")),
        (ValueError, "batch_size must be positive", lambda: model.make_cache(batch_size=0)),
        (TypeError, "max_length must be an int", lambda: model.make_cache(batch_size=2, max_length=8.0, static=True)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_position_limit_is_gpt2s_learned_positions_and_none_for_rope(gpt2, llama):
    assert gpt2.position_limit == P
    assert llama.position_limit is None
    with torch.no_grad():
        assert llama(ids(1, P + 5)).logits.shape == (1, P + 5, V)  # RoPE runs past max_positions
    with pytest.raises(ValueError, match=f"max_positions={P}"):
        gpt2(ids(1, P + 1))


@pytest.mark.parametrize("make, error, message", [
    (lambda: LlamaConfig(attention_bias="no"), TypeError, "attention_bias must be a bool"),
    (lambda: LlamaConfig(tie_word_embeddings=1), TypeError, "tie_word_embeddings must be a bool"),
    (lambda: LlamaConfig(rms_norm_eps="1e-6"), TypeError, "rms_norm_eps must be a number"),
    (lambda: LlamaConfig(rope_theta="1e4"), TypeError, "rope_theta must be a number"),
    (lambda: LlamaConfig(rope_theta=0.5), ValueError, "rope_theta must be a finite number > 1"),
    (lambda: LlamaConfig.from_hf({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 8, "mlp_bias": "false"}),
     TypeError, "mlp_bias must be a bool"),
    (lambda: GPT2Config(layer_norm_eps="1e-5"), TypeError, "layer_norm_eps must be a number"),
    (lambda: GPT2Config(activation=["gelu"]), TypeError, "activation must be a str"),
    (lambda: GPT2Config(num_layers=2.0), TypeError, "num_layers must be an int"),
    (lambda: GPT2({"vocab_size": 8}), TypeError, "config must be a GPT2Config, got dict"),
])
def test_configs_refuse_wrong_types(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_greedy_refuses_a_string_count(gpt2):
    from multihead.models.gpt2 import greedy

    with pytest.raises(TypeError, match="max_new_tokens must be an int, got str"):
        greedy(gpt2, ids(1, 3), "2")


@pytest.mark.parametrize("which", ["gpt2", "llama"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_decode_step_checks_each_layer_at_most_once(which, static, gpt2, llama, monkeypatch):
    """The checked forward checks each layer's call once (the module's input check and the cache's plan, no
    make_call); decode_step checks nothing per layer: each block enters its module's own unchecked step."""
    from conftest import count_checks

    model = {"gpt2": gpt2, "llama": llama}[which]
    L = model.config.num_layers
    cache = model.make_cache(batch_size=2, max_length=10, static=True) if static else model.make_cache(batch_size=2)
    twin = model.make_cache(batch_size=2, max_length=10, static=True) if static else model.make_cache(batch_size=2)
    counts = count_checks(monkeypatch)
    with torch.no_grad():
        model(ids(2, 5), key_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]), cache=cache)
        assert counts == dict(inputs=L, latent=0, make_call=0, check_mask=L, plan=L, update=L, decode=0), counts
        model(ids(2, 5), key_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]), cache=twin)
        counts.update(dict.fromkeys(counts, 0))
        feed = torch.tensor([[True], [False]])  # row 1 pauses: padding, neither cached nor seen
        lean = model.decode_step(ids(2, 1, seed=1), cache, key_mask=feed)
        assert counts == dict(inputs=0, latent=0, make_call=0, check_mask=0, plan=0, update=L, decode=L), counts
        checked = model(ids(2, 1, seed=1), key_mask=feed, cache=twin).logits
    assert torch.allclose(lean[0], checked[0], atol=1e-6)
    assert cache.lengths.tolist() == twin.lengths.tolist() == [6, 3]
