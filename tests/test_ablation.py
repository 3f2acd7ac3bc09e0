"""head_mask (one head's output set to 0 before W^O) on the module and the models, and the ablation tool on it.

The two promises: a mask of ones changes nothing, bit for bit, and a zero removes exactly that head (the
module equals the same layer computed by hand from the other heads' matrices, and a model equals the same
model with that head's columns of W^O zeroed)."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

import multihead as mh
from multihead.models.bert import Bert, BertConfig
from multihead.models.gpt2 import GPT2, GPT2Config
from multihead.models.llama import Llama, LlamaConfig
from multihead.tools.ablation import ablate_heads, importance_figure, strongest_link, top_heads

TEXTS = ["A dog ate the food because it was hungry", "The dog was hungry, so it ate the food", "All is well"]


def module(**kwargs) -> mh.MultiHeadAttention:
    torch.manual_seed(0)
    return mh.MultiHeadAttention(24, 4, **kwargs).eval()


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return Bert(BertConfig(vocab_size=40, max_positions=16, type_vocab_size=2, d_model=24, num_layers=2,
                               num_heads=4, ffn_dim=32, layer_norm_eps=1e-12, activation="gelu",
                               pad_token_id=0)).eval()
    if kind == "gpt2":
        return GPT2(GPT2Config(vocab_size=40, max_positions=16, d_model=24, num_layers=2, num_heads=4)).eval()
    return Llama(LlamaConfig(vocab_size=40, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2,
                             d_mlp=32)).eval()


def result(model, ids, **kwargs) -> torch.Tensor:
    out = model(ids, **kwargs)
    return out.hidden if isinstance(model, Bert) else out.logits


# -- the module ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa", "cpu_flash"])
def test_a_mask_of_ones_changes_nothing_bit_for_bit(backend):
    mha = module(num_kv_heads=2, causal=True, backend=backend)
    x = torch.randn(2, 7, 24)
    plain = mha(x, need_weights=True)
    for ones in (torch.ones(4), torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.int64),
                 torch.ones(4, dtype=torch.float64)):
        masked = mha(x, need_weights=True, head_mask=ones)
        assert torch.equal(masked.output, plain.output) and torch.equal(masked.weights, plain.weights), ones.dtype


def by_hand(mha: mh.MultiHeadAttention, x: torch.Tensor, kept: list[int], causal: bool) -> torch.Tensor:
    """concat(Z_i for the kept heads) W^O + b^O from each head's own matrices (`head(i)`), in float64."""
    T = x.shape[1]
    out = mha.out_proj.bias.double().expand(x.shape[0], T, -1).clone()  # (B, T, C)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    for i in kept:
        h = mha.head(i)
        q, k, v = (x @ w.double() + b.double() for w, b in ((h.w_q, h.b_q), (h.w_k, h.b_k), (h.w_v, h.b_v)))
        scores = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -math.inf)  # (B, T, T)
        out += torch.softmax(scores, dim=-1) @ v @ h.w_o.double()  # (B, T, Dv) @ (Dv, C) -> (B, T, C)
    return out


@pytest.mark.parametrize("kv_heads, causal", [(4, False), (2, True)])
def test_one_head_zeroed_equals_the_module_computed_without_it_by_hand(kv_heads, causal):
    mha = module(num_kv_heads=kv_heads, causal=causal).double()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    for removed in range(4):
        mask = torch.ones(4).index_fill(0, torch.tensor(removed), 0.0)
        got = mha(x, head_mask=mask).output
        kept = [i for i in range(4) if i != removed]
        torch.testing.assert_close(got, by_hand(mha, x, kept, causal), rtol=0, atol=1e-12)
        assert (got - mha(x).output).abs().max() > 1e-3  # the head did contribute: removing it shows


def test_a_float_mask_scales_each_head_and_its_gradient_is_the_heads_contribution():
    mha = module().double()
    x = torch.randn(1, 5, 24, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    y = mha(x, head_mask=mask).output
    y.sum().backward()
    zero = mha(x, head_mask=torch.zeros(4)).output  # W^O's bias alone
    for i in range(4):
        only = mha(x, head_mask=torch.eye(4)[i]).output  # head i alone, bias included
        assert math.isclose(mask.grad[i].item(), (only - zero).sum().item(), rel_tol=1e-9)
    half = torch.tensor([1.0, 0.5, 1.0, 1.0]) * (torch.arange(4) == 1)  # head 1 at half
    torch.testing.assert_close(mha(x, head_mask=half).output - zero,
                               0.5 * (mha(x, head_mask=torch.eye(4)[1]).output - zero))


@pytest.fixture
def one_rank(tmp_path):
    """A gloo group of this process alone: context parallelism's real path, world 1, without spawning."""
    import torch.distributed as dist

    from multihead.distributed import ContextParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield ContextParallel(length=6, layout="contiguous", method="ring")
    finally:
        dist.destroy_process_group()


def test_context_parallel_removes_the_same_head(one_rank):
    mha = module(causal=True)
    x = torch.randn(2, 6, 24)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(mha(x, context_parallel=one_rank, head_mask=mask).output,
                               mha(x, head_mask=mask).output, rtol=0, atol=1e-6)
    gpt2 = tiny("gpt2")
    ids = torch.randint(1, 40, (1, 6))
    two_gone = torch.ones(2, 4) - torch.eye(2, 4)  # head 0 of layer 0 and head 1 of layer 1
    torch.testing.assert_close(gpt2(ids, context_parallel=one_rank, head_mask=two_gone).logits,
                               gpt2(ids, head_mask=two_gone).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"head_mask must have shape \(H,\) = \(4,\), got \(3,\)"):
        mha(x, context_parallel=one_rank, head_mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"head_mask must have shape \(H,\) for every layer or \(L, H\)"):
        gpt2(ids, context_parallel=one_rank, head_mask=torch.ones(3))


@pytest.mark.parametrize("bad, error, words", [
    ([1, 0, 1, 1], TypeError, "head_mask must be a tensor (H,), 1 = keep a head and 0 = remove it, got list"),
    (torch.ones(5), ValueError, "head_mask must have shape (H,) = (4,), got (5,)"),
    (torch.ones(1, 4), ValueError, "head_mask must have shape (H,) = (4,), got (1, 4)"),
    (torch.ones(4, dtype=torch.complex64), TypeError, "head_mask must be a bool, integer or floating tensor"),
    (torch.ones(4, device="meta"), ValueError, "head_mask is on meta but the parameters are on cpu"),
])
def test_a_bad_head_mask_is_named_and_leaves_the_cache_as_it_was(bad, error, words):
    mha = module(causal=True)
    cache = mh.DynamicCache(num_layers=1)
    mha(torch.randn(1, 3, 24), cache=cache[0])
    with pytest.raises(error, match=f"^{re.escape(words)}"):
        mha(torch.randn(1, 2, 24), cache=cache[0], head_mask=bad)
    assert cache[0].lengths.tolist() == [3]


# -- the models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_models_take_a_head_mask_per_layer_and_for_every_layer(kind):
    model = tiny(kind)
    ids = torch.randint(1, 40, (2, 7))
    plain = result(model, ids)
    assert torch.equal(result(model, ids, head_mask=torch.ones(2, 4)), plain)  # (L, H) of ones: bit for bit
    assert torch.equal(result(model, ids, head_mask=torch.ones(4, dtype=torch.bool)), plain)  # (H,)
    mask = torch.ones(2, 4)
    mask[1, 2] = 0
    by_hand = copy.deepcopy(model)
    layers = by_hand.layers if kind == "bert" else by_hand.blocks
    D = 24 // 4
    with torch.no_grad():
        layers[1].attention.out_proj.weight[:, 2 * D:3 * D] = 0  # head 2 of layer 1 reaches nothing
    removed = result(model, ids, head_mask=mask)
    torch.testing.assert_close(removed, result(by_hand, ids), rtol=0, atol=1e-6)
    assert (removed - plain).abs().max() > 1e-4
    every = torch.tensor([1.0, 0.0, 1.0, 1.0])  # (H,): head 1 gone from both layers
    assert torch.equal(result(model, ids, head_mask=every), result(model, ids, head_mask=every.expand(2, 4)))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_model_names_a_misshapen_head_mask_before_any_layer_runs(kind):
    model = tiny(kind)
    ids = torch.randint(1, 40, (1, 5))
    with pytest.raises(ValueError, match=r"head_mask must have shape \(H,\) for every layer or \(L, H\) = "
                                         r"\(4,\) or \(2, 4\), got \(3, 4\)"):
        model(ids, head_mask=torch.ones(3, 4))
    if kind == "gpt2":  # with a cache: refused before any layer writes its chunk
        cache = model.make_cache()
        model(ids, cache=cache)
        with pytest.raises(TypeError, match="head_mask must be a tensor"):
            model(ids[:, :2], cache=cache, head_mask=[1, 1, 1, 1])
        assert [layer.lengths.tolist() for layer in cache] == [[5], [5]]


# -- the ablation tool on MiniLM ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    import multihead.models

    return multihead.models.load("minilm")


@pytest.fixture(scope="module")
def ablation(minilm):
    return ablate_heads(minilm, TEXTS)


def test_ablating_minilm_removes_exactly_one_head_each_time(minilm, ablation):
    assert ablation.ablated.shape == (6, 12, 3, 384)
    assert torch.equal(ablation.embeddings, minilm.encode(TEXTS))  # no head removed: encode's embeddings
    for layer, head in ((0, 3), (5, 10)):
        edited = copy.deepcopy(minilm)
        with torch.no_grad():
            edited.network.layers[layer].attention.out_proj.weight[:, 32 * head:32 * (head + 1)] = 0
        torch.testing.assert_close(ablation.ablated[layer, head], edited.encode(TEXTS), rtol=0, atol=1e-6)
    batch = minilm.tokenize(TEXTS)
    mask = torch.ones(6, 12)
    mask[2, 7] = 0
    hidden = minilm.network(batch.input_ids, key_mask=batch.key_mask, head_mask=mask).hidden  # (N, T, C)
    real = batch.key_mask.unsqueeze(-1).float()  # (N, T) -> (N, T, 1)
    pooled = torch.nn.functional.normalize((hidden * real).sum(1) / real.sum(1).clamp(min=1e-9), dim=-1)
    assert torch.equal(ablation.ablated[2, 7], pooled)  # only the layers from the head's up ran again: the same bits
    shift = ablation.shift()
    assert shift.shape == (6, 12, 3) and (shift > 0).all()  # every head moves every embedding a little
    change = ablation.similarity_change(0, 1)
    e = ablation.ablated[5, 10].double()
    assert math.isclose(change[5, 10], float(e[0] @ e[1]) - ablation.similarity()[0, 1], abs_tol=1e-12)
    assert ablation.similarity()[0, 1] > ablation.similarity()[0, 2]  # the paraphrase is nearer than "All is well"


def test_ablate_heads_refuses_what_it_cannot_measure(minilm):
    with pytest.raises(TypeError, match="model must be a sentence encoder"):
        ablate_heads(minilm.network, TEXTS)
    with pytest.raises(TypeError, match="texts must be a list of str"):
        ablate_heads(minilm, "All is well")
    with pytest.raises(ValueError, match="text is empty"):
        ablate_heads(minilm, ["All is well", " "])


def test_strongest_link_and_top_heads():
    w = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.1, 0.4], [0.0, 0.9, 0.1]])
    assert strongest_link(w, [False, False, False]) == (2, 1, pytest.approx(0.9))
    assert strongest_link(w, [False, True, False]) == (0, 2, pytest.approx(0.7))  # no link into a special token
    assert strongest_link(w[:1, :1], [False]) is None
    assert top_heads(np.array([[0.1, 0.5], [0.3, 0.2]]), 3) == [(0, 1), (1, 0), (1, 1)]


def test_the_importance_picture_writes_every_cell_and_marks_the_largest():
    values = np.array([[1e-3, 2e-3, 3e-4], [5e-2, 1e-4, 7e-3]])
    fig = importance_figure(values, title="t")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1.0", "2.0", "0.3", "50", "0.1", "7.0"]  # units of 1e-3
    assert "10⁻³" in fig.axes[1].get_ylabel()
    assert len(fig.axes[0].patches) == 3
    signed = importance_figure(-values)
    assert signed.axes[0].images[0].norm.vmin == -signed.axes[0].images[0].norm.vmax
    with pytest.raises(ValueError, match="finite"):
        importance_figure(np.array([[np.nan]]))


def test_the_heads_command_prints_the_table_and_writes_the_picture(minilm, tmp_path, capsys, monkeypatch):
    from multihead.models.text import TextModel
    from multihead.tools import cli

    monkeypatch.setattr(cli, "_load_model", lambda spec: minilm)  # loaded once, by the fixture
    assert cli.main(["heads", TEXTS[2], "--ablate", "--top", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    grid = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 13]
    assert [row[0] for row in grid] == [str(layer) for layer in range(6)]
    assert "The 3 heads that matter most" in out and "->" in out
    assert (tmp_path / "heads-importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["heads", TEXTS[2], "--layer", "0"]) == 0
    assert "Per-head statistics, layer 0" in capsys.readouterr().out
    assert cli.main(["heads", " ", "--ablate"]) == 2
    assert "TEXT is empty" in capsys.readouterr().err
    assert cli.main(["heads", TEXTS[2], "--ablate", "--layer", "1"]) == 2
    assert "--ablate removes every head of every layer" in capsys.readouterr().err
    decoder = TextModel("tiny", "gpt2", tiny("gpt2"), minilm.tokenizer, 16)
    monkeypatch.setattr(cli, "_load_model", lambda spec: decoder)
    assert cli.main(["heads", TEXTS[2], "--ablate", "--out", str(tmp_path)]) == 2
    assert "--ablate measures the sentence embedding, so it needs a sentence encoder" in capsys.readouterr().err
