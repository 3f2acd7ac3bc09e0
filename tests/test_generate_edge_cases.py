"""generate at its edges: vanishing temperatures, empty batches, wrong types, SentencePiece spaces in the CLI."""

from __future__ import annotations

import pytest
import torch

from multihead.tools.cli import main
from multihead.generate import _choose, _check_settings, generate, stream
from multihead.models.gpt2 import GPT2, GPT2Config
from multihead.models.llama import Llama, LlamaConfig
from multihead.models.text import TextTokenizer

V = 60


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, max_positions=32, d_model=16, num_layers=2, num_heads=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)  # larger logits than the 0.02 initialisation gives: the argmax is far ahead
    return model


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(1)
    return Llama(LlamaConfig(vocab_size=V, max_positions=32, d_model=16, num_layers=1, num_heads=2,
                             d_mlp=24)).eval()


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# in float32 (the sampler's dtype) 1e-40 is subnormal, 1e-45 the last subnormal, 1e-300 rounds to 0 (as 1e-60
# does); the sampler runs after the step, so the cache matters once each way
@pytest.mark.parametrize("temperature, use_cache", [(1e-40, True), (1e-45, False), (1e-300, True)])
def test_a_temperature_that_would_overflow_the_logits_decodes_greedily(gpt2, temperature, use_cache):
    prompt = ids(3, 4)
    greedy = generate(gpt2, prompt, max_new_tokens=8, use_cache=use_cache).tokens
    sampled = generate(gpt2, prompt, max_new_tokens=8, do_sample=True, temperature=temperature, seed=3,
                       use_cache=use_cache).tokens
    assert torch.equal(sampled, greedy)
    assert not (sampled[:, 4:] == V - 1).all()  # the defect: NaN probabilities picked the last id every step


def test_scaled_scores_stay_finite_with_top_k_and_top_p():
    logits = torch.tensor([[3.0, 1.0, 2.0, -5.0], [0.5, 0.25, 4.0, 4.0 - 1e-3]])  # (B, V)
    for top_k, top_p in ((None, None), (2, None), (None, 0.5), (3, 0.9)):
        settings = _check_settings(True, 1e-40, top_k, top_p, (), 4, logits.device)
        for seed in range(5):
            chosen = _choose(logits, settings, torch.Generator().manual_seed(seed))
            assert chosen.tolist() == [0, 2]
    moderate = _check_settings(True, 1.0, None, None, (), 4, logits.device)
    picks = {tuple(_choose(logits, moderate, torch.Generator().manual_seed(s)).tolist()) for s in range(40)}
    assert len(picks) > 1  # an ordinary temperature still samples


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_an_empty_batch_is_refused_with_its_shape(gpt2, llama, shape):
    empty = torch.zeros(shape, dtype=torch.int64)
    for model in (gpt2, llama):
        for call in (lambda: generate(model, empty, max_new_tokens=2), lambda: stream(model, empty, max_new_tokens=2)):
            with pytest.raises(ValueError, match=rf"input_ids must hold at least one prompt.*got \({shape[0]}, "
                                                 rf"{shape[1]}\)"):
                call()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(do_sample="no"), TypeError, "do_sample must be a bool"),
    (dict(do_sample=0, temperature=0.5), TypeError, "do_sample must be a bool"),
    (dict(max_new_tokens="3"), TypeError, "max_new_tokens must be an int, got str"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int, got float"),
    (dict(do_sample=True, temperature="0.5"), TypeError, "temperature must be a number, got str"),
    (dict(do_sample=True, temperature=True), TypeError, "temperature must be a number, got bool"),
    (dict(do_sample=True, top_k=2.0), TypeError, "top_k must be an int, got float"),
    (dict(do_sample=True, top_p="0.9"), TypeError, "top_p must be a number, got str"),
    (dict(do_sample=True, top_p=0.0), ValueError, "top_p must be a finite number > 0"),
    (dict(pad_token_id="0"), TypeError, "pad_token_id must be an int, got str"),
    (dict(stop_tokens=["1"]), TypeError, "stop_tokens must hold int token ids, got str"),
    (dict(stop_tokens=[True]), TypeError, "stop_tokens must hold int token ids, got bool"),
    (dict(stop_tokens=5), TypeError, "stop_tokens must be a sequence"),
    (dict(stop_tokens=None), TypeError, "stop_tokens must be a sequence"),
    (dict(use_cache="yes"), TypeError, "use_cache must be a bool"),
    (dict(static_cache=1), TypeError, "static_cache must be a bool"),
    (dict(do_sample=True, seed=1.5), TypeError, "seed must be an int or None"),
])
def test_wrong_types_are_type_errors_naming_the_argument(gpt2, kwargs, error, message):
    arguments = dict(max_new_tokens=2, **kwargs) if "max_new_tokens" not in kwargs else kwargs
    with pytest.raises(error, match=message):
        generate(gpt2, ids(1, 3), **arguments)


# --------------------------------------------------------------------------- SentencePiece spaces

WORDS = ["The", "cat", "sat", "on", "the", "mat", "ohiun", "dog", "ran", "far", "away", "and", "then", "slept"]


def metaspace_tokenizer():
    """A word-level tokenizer with SentencePiece's convention: '▁' marks a word that follows a space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{"▁" + w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


def test_continuation_keeps_the_space_before_the_first_new_word():
    tokenizer = TextTokenizer(metaspace_tokenizer(), pad_id=0)
    prompt = tokenizer.tokenizer.encode("The cat sat on").ids
    ohiun = tokenizer.tokenizer.token_to_id("▁ohiun")
    assert tokenizer.tokenizer.decode([ohiun]) == "ohiun"  # alone, the word loses its space
    assert tokenizer.continuation(prompt, [ohiun]) == " ohiun"
    assert tokenizer.continuation(prompt, [ohiun, ohiun + 1]) == " ohiun dog"
    assert tokenizer.continuation(prompt, []) == ""


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A random tiny Llama saved by transformers, with the Metaspace tokenizer: nothing downloaded."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("llama-metaspace")
    tokenizer = metaspace_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      initializer_range=0.5)
    torch.manual_seed(4)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory, tokenizer


def test_cli_generate_keeps_sentencepiece_spaces(llama_folder, capsys):
    from multihead.models import load

    directory, tokenizer = llama_folder
    prompt = "The cat sat on"
    assert main(["generate", prompt, "--model", str(directory), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    model = load(directory)
    prompt_ids = tokenizer.encode(prompt).ids
    new = generate(model.network, torch.tensor([prompt_ids]), max_new_tokens=6).new_tokens(0)
    assert tokenizer.id_to_token(new[0]).startswith("▁"), "the test needs a first new token that starts a word"
    # what Hugging Face prints: the whole sequence decoded, the prompt's text followed by the rest
    whole = tokenizer.decode(prompt_ids + new)
    assert whole.startswith(prompt + " ")
    assert out == whole + "\n"
