"""One attention contract: the typed call, the registry as the one path, the logsumexp from every backend.

Also the layering rule: nothing outside backends/ imports a backend's private
name, and no backend imports the layers above it.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import multihead as mh
from multihead import backends
from multihead.core.call import AttentionCall, make_call
from conftest import ABS_SLACK, OUT_FACTOR, make_qkv, max_err
from multihead.backends.reference import attention_ref

SRC = Path(mh.__file__).parent
LSE_BACKENDS = ["reference", "chunked", "cpu_flash"]


def _assert_rule(got, golden, naive, what):
    err, naive_err = max_err(got, golden), max_err(naive, golden)
    assert err <= OUT_FACTOR * naive_err + ABS_SLACK, f"{what}: {err:.3g} > 2 x {naive_err:.3g} + 1e-5"


def _golden_lse(q, k, v, **call):
    """logsumexp of the masked float64 scores, computed here from scratch."""
    qd, kd = q.double(), mh.backends.reference.repeat_kv(k.double(), q.shape[1])
    scale = call.get("scale") or 1 / math.sqrt(q.shape[-1])
    scores = qd @ kd.transpose(-2, -1) * scale  # (B, H, T, S)
    T, S = q.shape[2], k.shape[2]
    if call.get("causal"):
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).tril(S - T).logical_not(), float("-inf"))
    mask = call.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.double()
    return torch.logsumexp(scores, dim=-1)


# ---- every backend gives out and lse through the registry


@pytest.mark.parametrize("backend", LSE_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "key_padding", "float_mask"])
def test_attention_with_lse_on_every_backend(backend, case):
    B, H, G, T, S = 2, 6, 3, 17, 23
    q, k, v = make_qkv(B, H, G, T, S, 16, seed=3)
    call = {}
    if case == "causal":
        call["causal"] = True
    if case == "key_padding":  # the second sequence sees no key at all: lse -inf, out 0
        call["attn_mask"] = mh.masks.key_mask_to_attn_mask(mh.masks.lengths_to_key_mask(torch.tensor([S, 0]), S))
    if case == "float_mask":
        call["attn_mask"] = torch.randn(1, H, T, S, generator=torch.Generator().manual_seed(1))
    result = mh.attention(q, k, v, backend=backend, **call, return_lse=True)
    assert isinstance(result, mh.AttentionOutput) and result.lse.shape == (B, H, T)
    assert result.lse.dtype == torch.float32
    golden_lse = _golden_lse(q, k, v, **call)
    finite = torch.isfinite(golden_lse)
    assert torch.equal(torch.isfinite(result.lse), finite)
    assert (result.lse[~finite] == float("-inf")).all()
    assert max_err(result.lse[finite], golden_lse[finite]) < 1e-5
    golden = attention_ref(q.double(), k.double(), v.double(), **call).out
    naive = attention_ref(q, k, v, upcast=False, **call).out
    _assert_rule(result.out, golden, naive, f"{backend} out")


def test_sdpa_says_it_gives_no_lse_and_auto_moves_on():
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
    report = mh.which_backend(q, k, v, return_lse=True)
    assert report.reasons["sdpa"] == "scaled_dot_product_attention returns no logsumexp"
    assert report.chosen == "cpu_flash" and "(with the logsumexp)" in str(report)
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this call: scaled_dot_product_attention "
                                         "returns no logsumexp"):
        mh.attention(q, k, v, backend="sdpa", return_lse=True)
    # without the lse, sdpa is the first choice
    assert mh.which_backend(q, k, v).chosen == "sdpa"


class _Counting:
    """A test backend that counts how often the registry asks it."""

    def __init__(self, name, priority, answer):
        self.name, self.priority, self.summary, self.answer, self.asked = name, priority, "test double", answer, 0

    def supports(self, call, *, need_lse=False):
        assert isinstance(call, AttentionCall)
        self.asked += 1
        return self.answer

    def forward(self, call, *, need_lse=False):
        return backends.get("reference").forward(call, need_lse=need_lse)


def test_dispatch_stops_at_the_first_backend_that_supports_the_call():
    first, second = _Counting("first", 200, None), _Counting("second", 100, None)
    backends.register(first)
    backends.register(second)
    try:
        q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
        mh.attention(q, k, v)
        assert (first.asked, second.asked) == (1, 0)  # the second is never asked
        report = mh.which_backend(q, k, v)  # explain asks every backend
        assert report.chosen == "first" and (first.asked, second.asked) == (2, 1)
        assert list(report.reasons)[:2] == ["first", "second"]
    finally:
        backends.unregister("first")
        backends.unregister("second")


def test_register_refuses_what_is_not_a_backend():
    with pytest.raises(TypeError, match="backend must have a 'priority'"):
        backends.register(type("Half", (), {"name": "half"})())
    assert "half" not in backends.names()


# ---- the module honours backend= with need_weights


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "cpu_flash"])
def test_need_weights_output_comes_from_the_named_backend(backend, monkeypatch):
    torch.manual_seed(0)
    mha = mh.MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, backend=backend).eval()
    x = torch.randn(2, 9, 32)
    ran = []
    chosen = backends.get(backend)
    real = type(chosen).forward
    monkeypatch.setattr(type(chosen), "forward",
                        lambda self, call, *, need_lse=False: ran.append((self.name, need_lse)) or
                        real(self, call, need_lse=need_lse))
    with torch.no_grad():
        got = mha(x, need_weights=True)
    assert ran == [(backend, False)]  # the weights need no logsumexp: any backend keeps its kernel
    eager = mh.MultiHeadAttention(32, 4, num_kv_heads=2, causal=True).eval()
    eager.load_state_dict(mha.state_dict())
    want = eager(x.requires_grad_(), need_weights=True)  # the eager path, weights with a gradient
    assert want.weights.requires_grad and not got.weights.requires_grad
    assert max_err(got.output, want.output) < 1e-5 and max_err(got.weights, want.weights) < 1e-5


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_need_weights_with_auto_takes_the_eager_pass(backend, monkeypatch):
    import multihead.ops.run as run_module

    mha = mh.MultiHeadAttention(32, 4, causal=True, backend=backend).eval()
    calls = []
    real = run_module.reference_call
    monkeypatch.setattr(run_module, "reference_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(run_module, "weights_of", lambda *a, **kw: pytest.fail("not the eager pass"))
    with torch.no_grad():
        out = mha(torch.randn(2, 5, 32), need_weights=True)
    assert calls == [1] and torch.allclose(out.weights.sum(-1), torch.ones(2, 4, 5))


def test_latent_attention_goes_through_the_registry(monkeypatch):
    mla = mh.MultiHeadLatentAttention(32, 4, head_dim=8, rope_dim=4, kv_latent_dim=12, backend="chunked").eval()
    ran = []
    chunked = backends.get("chunked")
    real = type(chunked).forward
    monkeypatch.setattr(type(chunked), "forward",
                        lambda self, call, *, need_lse=False: ran.append(need_lse) or real(self, call, need_lse=need_lse))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        plain = mla(x)
        weighted = mla(x, need_weights=True)
    assert ran == [False, False]
    assert max_err(plain.output, weighted.output) < 1e-6
    assert torch.allclose(weighted.weights.sum(-1), torch.ones(2, 4, 6))


# ---- the layering rule


def _is_module(dotted: str) -> bool:
    path = SRC.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path):
    """(module the import reads from, [names]) for every `from X import ...` of a source file.

    `from .. import masks` reads the module multihead.masks itself: it is reported as (multihead.masks, []).
    """
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # a module's package; __init__'s own
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            module = ".".join(base + ((node.module,) if node.module else ()))
        else:
            module = node.module or ""
        names = [alias.name for alias in node.names]
        submodules = [n for n in names if _is_module(f"{module}.{n}")]
        for name in submodules:
            yield f"{module}.{name}", []
        if len(submodules) < len(names):
            yield module, [n for n in names if n not in submodules]


def test_no_module_imports_a_private_name_of_another():
    offences = []
    for path in SRC.rglob("*.py"):
        own = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        for module, names in _imports(path):
            if not module.startswith("multihead") or module == own:
                continue
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                offences.append(f"{path.relative_to(SRC)} imports {private} from {module}")
    assert offences == []


# The layers, bottom up: a module may import from its own layer and the ones below (docs/design.md).
LAYERS = ("core", "backends", "ops", "nn", "integrations", "models", "tools")


def _layer(module: str) -> int | None:
    """The layer of a dotted module name under multihead (None for the package root)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_import_points_down_the_layers():
    offences, seen = [], 0
    for path in SRC.rglob("*.py"):
        own = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        if _layer(own) is None:
            continue  # the package root (__init__, __main__) re-exports
        for module, names in _imports(path):
            if not module.startswith("multihead"):
                continue
            seen += 1
            if module == "multihead" and names == ["__version__"]:
                continue  # the package's version, for the CLI's --version
            if _layer(module) is None or _layer(module) > _layer(own):
                offences.append(f"{path.relative_to(SRC)} imports {names or module} from {module}")
    assert seen > 100 and offences == []


def test_the_root_holds_only_the_package_and_the_layer_folders():
    files = sorted(p.name for p in SRC.glob("*.py"))
    folders = sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert files == ["__init__.py", "__main__.py"] and folders == sorted(LAYERS)


def test_the_import_walk_reads_real_imports():
    """The walks above must find the imports that exist (so they cannot pass by reading nothing)."""
    found = list(_imports(SRC / "backends" / "triton" / "__init__.py"))
    assert any(module == "multihead.core.call" and "AttentionCall" in names for module, names in found)
    assert ("multihead.backends", []) in list(_imports(SRC / "ops" / "functional.py"))
    assert ("multihead.core.masks", []) in list(_imports(SRC / "backends" / "reference.py"))
    assert _layer("multihead.tools.viz.html") == 6 and _layer("multihead.core.call") == 0


# ---- the typed call


def test_make_call_builds_one_typed_call():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8)
    call = make_call(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), causal=True)
    assert (call.batch, call.heads, call.kv_heads, call.q_len, call.kv_len) == (2, 4, 2, 5, 7)
    assert call.attn_mask.shape == (1, 1, 5, 7) and call.scale == 1 / math.sqrt(8)
    with pytest.raises(Exception):
        call.causal = False  # frozen


def test_short_names_are_the_layer_modules_themselves():
    """`import multihead.hf`, `from multihead.generate import generate`, `multihead.viz`: one module, two names,
    imported on first use; the optional extras stay unloaded until then."""
    import importlib
    import subprocess
    import sys

    code = ("import sys, multihead; assert 'multihead.viz' not in sys.modules; "
            "assert 'multihead.tools.viz' not in sys.modules; "
            "multihead.viz; multihead.models; multihead.compat; multihead.explain; multihead.generate; "
            "import multihead.hf.options as o; from multihead.generate import generate; "
            "from multihead.distributed.local import run_local; "
            "assert o is sys.modules['multihead.integrations.hf.options'] and o.__spec__.name == o.__name__; "
            "assert multihead.viz is sys.modules['multihead.tools.viz']; "
            "assert generate.__module__ == 'multihead.models.generate'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    assert mh.compat is importlib.import_module("multihead.compat") is importlib.import_module("multihead.nn.compat")
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        mh.nothing
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("multihead.nothing")


def test_the_public_api_is_small_and_each_name_is_there():
    assert len(mh.__all__) <= 16 and len(set(mh.__all__)) == len(mh.__all__)
    for name in mh.__all__:
        assert getattr(mh, name) is not None
    for gone in ("attention_with_lse", "attention_with_weights", "attention_and_weights", "chunked_attention",
                 "attention_ref", "explain_dispatch", "make_call"):
        assert not hasattr(mh, gone), gone


def test_return_lse_gives_a_typed_pair_and_checks_its_flag():
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
    plain = mh.attention(q, k, v, causal=True)
    both = mh.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(plain, torch.Tensor) and isinstance(both, mh.AttentionOutput)
    assert torch.equal(both.out, mh.attention(q, k, v, causal=True, backend=mh.which_backend(
        q, k, v, causal=True, return_lse=True).chosen))
    with pytest.raises(TypeError, match="return_lse must be a bool, got str 'yes'"):
        mh.attention(q, k, v, return_lse="yes")


def test_no_function_is_longer_than_sixty_lines():
    """Functions short enough to read at once; the Triton kernels and the CLI's walkthrough printing excepted."""
    exempt = {("cli.py", "_walkthrough")}
    long = []
    for path in SRC.rglob("*.py"):
        if "triton" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and (path.name, node.name) not in exempt:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
