"""Shared test helpers: random inputs and docs/design.md's numerical rule."""

from __future__ import annotations

import importlib
import importlib.util
import os


def _import_triton_language_for_the_interpreter() -> None:
    """Import triton.language once with TRITON_INTERPRET=1, before anything else imports triton.

    Triton's interpreter needs triton.language's own @jit helpers (tl.max,
    tl.sum, ...) to have been created in interpreter mode, which is decided at
    triton's first import. transformers and sentence-transformers import triton
    when other test modules load them, so without this the order in which
    pytest collects modules would decide whether tests/test_triton.py can run.
    Only on a machine without CUDA: there the interpreter is the only way to
    run the kernels. The variable is restored, so `auto` still refuses triton
    on the CPU outside the tests that ask for the interpreter.
    """
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") is not None:
        return
    import torch

    if torch.cuda.is_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton.language")
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_language_for_the_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: `make test` runs two workers on two cores, and a second thread that must wait for
# the other worker's core makes each small op hundreds of times slower (a hf benchmark test: 27 s with two
# threads each under load, 2 s with one). Tests that time threads set their own.
torch.set_num_threads(1)

from multihead.backends.chunked import ChunkedBackend
from multihead.backends.reference import attention_ref
from multihead.core.call import AttentionOutput, make_call

# docs/design.md (Testing), from flash-attention's tests: a backend's max-abs error
# against the float64 reference is at most OUT_FACTOR (output) or GRAD_FACTOR
# (gradients) times the error of the naive reference in the backend's dtype,
# plus ABS_SLACK.
OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
ABS_SLACK = 1e-5


def load_script(path, name: str):
    """A script under benchmarks/ imported as module `name` (and registered in sys.modules, so that
    what it defines pickles by name), for tests that call its functions."""
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_qkv(B, H, G, T, S, D, Dv=None, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, G, S, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, G, S, Dv, generator=gen, dtype=torch.float64).to(dtype)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v


def _grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(run, q, k, v, *, backward=True, **call):
    """run(q, k, v, **call) -> out, checked against attention_ref under the 2x/3x rule.

    The golden value is attention_ref in float64 on the same (up-cast) inputs;
    the yardstick is attention_ref in the inputs' own dtype without upcasting.
    Returns the measured errors for tests that want to look further.
    """
    inputs = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    golden_in = [x.detach().double().requires_grad_(backward) for x in (q, k, v)]
    naive_in = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]

    out = run(*inputs, **call)
    golden = attention_ref(*golden_in, upcast=True, **call).out
    naive = attention_ref(*naive_in, upcast=False, **call).out
    assert out.shape == golden.shape, (out.shape, golden.shape)
    assert out.dtype == q.dtype

    err, naive_err = max_err(out, golden), max_err(naive, golden)
    assert err <= OUT_FACTOR * naive_err + ABS_SLACK, (
        f"output error {err:.3g} > {OUT_FACTOR} x naive {naive_err:.3g} + {ABS_SLACK}")
    result = {"out": err, "out_naive": naive_err}
    if not backward:
        return result

    gen = torch.Generator().manual_seed(1234)
    grad_out = torch.randn(golden.shape, generator=gen, dtype=torch.float64).to(golden.device)
    grads = _grads(out, inputs, grad_out.to(q.dtype))
    golden_grads = _grads(golden, golden_in, grad_out)
    naive_grads = _grads(naive, naive_in, grad_out.to(q.dtype))
    for name, g, gg, ng in zip("qkv", grads, golden_grads, naive_grads):
        assert g is not None, f"no gradient for {name}"
        err, naive_err = max_err(g, gg), max_err(ng, gg)
        assert err <= GRAD_FACTOR * naive_err + ABS_SLACK, (
            f"d{name} error {err:.3g} > {GRAD_FACTOR} x naive {naive_err:.3g} + {ABS_SLACK}")
        result["d" + name] = err
    return result


@pytest.fixture
def qkv_factory():
    return make_qkv


def write_random_gpt2(directory, texts, *, n_positions: int, **config):
    """A random Hugging Face GPT-2 folder with a byte-level BPE tokenizer trained on `texts`: nothing downloaded.

    Returns the tokenizers.Tokenizer; config passes through to transformers.GPT2Config.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(list(texts) * 5, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    gpt2_config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=n_positions, n_embd=32,
                                          n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None, **config)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(gpt2_config).save_pretrained(directory)
    return tokenizer


@pytest.fixture
def triton_interpreter(request, monkeypatch):
    """Triton's CPU tests run under its interpreter; GPU tests (named test_gpu_*) compiled."""
    if request.node.name.startswith("test_gpu_"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def chunked(q, k, v, *, block_q: int = 64, block_k: int = 128, **call) -> AttentionOutput:
    """The chunked backend with chosen tile sizes: AttentionOutput(out, lse), through its own checked call."""
    return ChunkedBackend(block_q=block_q, block_k=block_k).forward(make_call(q, k, v, **call), need_lse=True)


def count_checks(monkeypatch) -> dict[str, int]:
    """Counters on the argument checks and the cache's entries; returns the live counts.

    inputs: the module's input check (`MultiHeadAttention._check_inputs`); latent: MLA's (`_check_call`);
    make_call, check_mask: every binding of multihead.core.call's in a loaded multihead module (a module
    that imported the name is counted too); plan: `LayerCache.plan` (the chunk checked against the
    cache); update: its one write; decode: the module's unchecked step. Under torch.compile the counts
    are side effects that dynamo replays on every run of a compiled graph: a traced check counts.
    """
    import sys

    import multihead.nn.compat  # noqa: F401  (the public modules load on first use: load them to patch them)
    import multihead.ops.functional  # noqa: F401
    import multihead.ops.weights  # noqa: F401
    from multihead.core import call as call_module
    from multihead.nn.cache import LayerCache
    from multihead.nn.latent import MultiHeadLatentAttention
    from multihead.nn.mha import MultiHeadAttention

    counts = dict.fromkeys(("inputs", "latent", "make_call", "check_mask", "plan", "update", "decode"), 0)

    def counted(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for owner, attribute, name in ((MultiHeadAttention, "_check_inputs", "inputs"),
                                   (MultiHeadLatentAttention, "_check_call", "latent"),
                                   (LayerCache, "plan", "plan"), (LayerCache, "update", "update"),
                                   (MultiHeadAttention, "decode", "decode")):
        monkeypatch.setattr(owner, attribute, counted(name, getattr(owner, attribute)))
    for name in ("make_call", "check_mask"):
        real = getattr(call_module, name)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("multihead") and vars(module).get(name) is real:
                monkeypatch.setattr(module, name, counted(name, real))
    return counts


@pytest.fixture(scope="session")
def distributed_job(tmp_path_factory):
    """job(N): every rank's results of tests/distributed_cases.py's world-size-N job, run once per session.

    Once across pytest-xdist's workers too: they share the folder above their own temporary folders."""
    import distributed_cases

    shared = tmp_path_factory.getbasetemp().parent
    return lambda N: distributed_cases.job(N, shared)
