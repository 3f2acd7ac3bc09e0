"""multihead.compat against torch.nn.MultiheadAttention itself.

The oracle is torch's module: the same weights (loaded through state_dict),
the same call. The golden value is torch's module in float64 fed the float32
inputs up-cast; the yardstick is torch's module in float32. docs/design.md's rule
then bounds compat's error: at most 2x (outputs, weights) or 3x (gradients)
torch's own float32 error, plus 1e-5 of the golden value's magnitude.
"""

from __future__ import annotations

import copy
import random
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import multihead as mh
from conftest import ABS_SLACK, GRAD_FACTOR, OUT_FACTOR, max_err
from multihead import compat
from multihead.compat import MultiheadAttention

NUM_RANDOM_CASES = 120
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------
# Random configurations
# ---------------------------------------------------------------------------

@dataclass
class Case:
    """One random configuration: constructor, inputs and call, all in torch's conventions."""

    seed: int
    ctor: dict
    training: bool
    batched: bool
    self_attention: bool
    B: int
    T: int
    S: int
    inputs: list[Tensor]  # float32 (query, key, value); one tensor for self-attention
    key_padding_mask: Tensor | None  # torch polarity: True = padding
    attn_mask: Tensor | None  # torch polarity: True = not allowed
    need_weights: bool
    average_attn_weights: bool
    is_causal: bool
    notes: list[str] = field(default_factory=list)

    @property
    def H(self) -> int:
        return self.ctor["num_heads"]

    @property
    def extra_keys(self) -> int:
        return int(self.ctor["add_bias_kv"]) + int(self.ctor["add_zero_attn"])

    def empty_rows(self) -> Tensor:
        """(B, H, T) bool: query rows that may attend no key under the masks."""
        blocked = torch.zeros(self.B, self.H, self.T, self.S, dtype=torch.bool)
        if self.key_padding_mask is not None:
            blocked = blocked | _blocked(self.key_padding_mask).reshape(self.B, 1, 1, self.S)  # (B, S) -> (B, 1, 1, S)
        if self.attn_mask is not None:
            am = _blocked(self.attn_mask)
            blocked = blocked | (am if am.dim() == 2 else am.reshape(self.B, self.H, self.T, self.S))  # (B*H, T, S) -> (B, H, T, S)
        if self.extra_keys:  # bias_k and the zero key are open to every query
            return torch.zeros(self.B, self.H, self.T, dtype=torch.bool)
        return blocked.all(dim=-1)

    def __repr__(self) -> str:  # shown by pytest on failure
        return (f"Case(seed={self.seed}, {self.ctor}, training={self.training}, batched={self.batched}, "
                f"self_attention={self.self_attention}, B={self.B}, T={self.T}, S={self.S}, "
                f"kpm={_kind(self.key_padding_mask)}, attn_mask={_kind(self.attn_mask)}, "
                f"need_weights={self.need_weights}, average={self.average_attn_weights}, "
                f"is_causal={self.is_causal}, notes={self.notes})")


def _kind(mask: Tensor | None) -> str:
    return "None" if mask is None else f"{str(mask.dtype).replace('torch.', '')}{tuple(mask.shape)}"


def _blocked(mask: Tensor) -> Tensor:
    """Where a torch-polarity mask forbids a key."""
    return mask if mask.dtype == torch.bool else mask == NEG_INF


def _unblock(mask: Tensor, index) -> None:
    if mask.dtype == torch.bool:
        mask[index] = False
    else:
        mask[index] = 0.0


def _random_mask(shape, is_bool: bool, gen: torch.Generator) -> Tensor:
    hit = torch.rand(shape, generator=gen) < 0.3
    if is_bool:
        return hit
    return (torch.randn(shape, generator=gen) * 0.5).masked_fill(hit, NEG_INF)


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    H = rng.choice([1, 2, 3, 4])
    C = H * rng.choice([1, 2, 3, 5, 8])
    kdim = vdim = None
    if rng.random() < 0.3:
        kdim, vdim = rng.randint(1, 9), rng.randint(1, 9)
    training = rng.random() < 0.5
    ctor = dict(
        embed_dim=C, num_heads=H,
        # dropout only in eval mode: it must then do nothing (torch's RNG stream is not ours)
        dropout=0.0 if training else rng.choice([0.0, 0.25]),
        bias=rng.random() < 0.75, add_bias_kv=rng.random() < 0.3, add_zero_attn=rng.random() < 0.3,
        kdim=kdim, vdim=vdim, batch_first=rng.random() < 0.5,
    )
    batched = rng.random() < 0.75
    B = rng.randint(1, 3) if batched else 1
    self_attention = kdim is None and rng.random() < 0.3
    T = rng.randint(1, 5)
    S = T if self_attention else rng.randint(1, 6)

    def layout(L: int, width: int) -> tuple[int, ...]:
        if not batched:
            return (L, width)
        return (B, L, width) if ctor["batch_first"] else (L, B, width)

    if self_attention:
        inputs = [torch.randn(layout(T, C), generator=gen)]
    else:
        inputs = [torch.randn(layout(T, C), generator=gen), torch.randn(layout(S, kdim or C), generator=gen),
                  torch.randn(layout(S, vdim or C), generator=gen)]

    kpm_kind = rng.choice([None, "bool", "float"])
    kpm = None
    if kpm_kind is not None:
        kpm = _random_mask((B, S), kpm_kind == "bool", gen)

    is_causal = rng.random() < 0.2
    attn_mask = None
    if is_causal:  # a correct hint: torch's top-left causal mask (what SDPA's is_causal applies)
        attn_mask = torch.ones(T, S, dtype=torch.bool).triu(diagonal=1)
        if rng.random() < 0.5:
            attn_mask = torch.zeros(T, S).masked_fill(attn_mask, NEG_INF)
    else:
        kind = rng.choice([None, "bool2", "float2", "bool3", "float3"])
        if kind is not None:
            shape = (T, S) if kind.endswith("2") else (B * H, T, S)
            attn_mask = _random_mask(shape, kind.startswith("bool"), gen)

    case = Case(seed, ctor, training, batched, self_attention, B, T, S, inputs, kpm, attn_mask,
                need_weights=rng.random() < 0.6, average_attn_weights=rng.random() < 0.5, is_causal=is_causal)

    # Most cases get at least one key per query row, so that torch's gradients are
    # defined on every path; the rest keep their empty rows and test that edge.
    if rng.random() < 0.25:
        case.notes.append("empty rows allowed")
    else:
        _open_empty_rows(case, rng)
    if not batched:
        case.key_padding_mask = None if kpm is None else kpm.reshape(S)  # (1, S) -> (S,)
        if attn_mask is not None and attn_mask.dim() == 3:
            case.attn_mask = attn_mask.reshape(H, T, S)  # (1*H, T, S) -> (H, T, S)
    if bool(case.empty_rows().any()):
        case.notes.append("has empty rows")
    return case


def _open_empty_rows(case: Case, rng: random.Random) -> None:
    """Unmask keys (never mask new ones) until every (b, h, t) row has a key to attend."""
    kpm, am = case.key_padding_mask, case.attn_mask
    if kpm is not None:
        for b in range(case.B):
            if bool(_blocked(kpm[b]).all()):
                _unblock(kpm, (b, rng.randrange(case.S)))
    for b, h, t in case.empty_rows().nonzero().tolist():
        if not bool(case.empty_rows()[b, h, t]):
            continue  # opened by an earlier fix of a shared 2-D mask
        if case.is_causal:  # keep the causal mask intact: key 0 is causal-visible to every row
            _unblock(kpm, (b, 0))
            continue
        open_keys = [j for j in range(case.S) if kpm is None or not bool(_blocked(kpm[b, j]))]
        j = rng.choice(open_keys)
        _unblock(am, (t, j) if am.dim() == 2 else (b * case.H + h, t, j))
    assert not bool(case.empty_rows().any())


# ---------------------------------------------------------------------------
# Running a module on a case
# ---------------------------------------------------------------------------

@dataclass
class Run:
    out: Tensor
    weights: Tensor | None
    leaves: list[Tensor]
    params: dict[str, Tensor]


def run_case(module: nn.Module, case: Case, dtype: torch.dtype, *, need_weights: bool,
             average: bool, grad: bool = True) -> Run:
    leaves = [x.detach().to(dtype).requires_grad_(grad) for x in case.inputs]
    q, k, v = (leaves * 3) if case.self_attention else leaves  # self-attention: query is key is value
    kpm, am = (m if m is None or m.dtype == torch.bool else m.to(dtype)  # float masks in the module's dtype
               for m in (case.key_padding_mask, case.attn_mask))
    with warnings.catch_warnings():
        # torch warns that mixing a bool and a float mask is deprecated; it is still its semantics
        warnings.simplefilter("ignore", UserWarning)
        with torch.set_grad_enabled(grad):
            out, weights = module(q, k, v, key_padding_mask=kpm, need_weights=need_weights, attn_mask=am,
                                  average_attn_weights=average, is_causal=case.is_causal)
    return Run(out, weights, leaves, dict(module.named_parameters()))


def gradients(run: Run, g_out: Tensor, g_w: Tensor | None) -> dict[str, Tensor | None]:
    loss = (run.out * g_out.to(run.out.dtype)).sum()
    if g_w is not None:
        loss = loss + (run.weights * g_w.to(run.weights.dtype)).sum()
    names = [f"input{i}" for i in range(len(run.leaves))] + list(run.params)
    grads = torch.autograd.grad(loss, run.leaves + list(run.params.values()), allow_unused=True)
    return dict(zip(names, grads))


def assert_close_by_rule(name: str, ours: Tensor, torch32: Tensor, golden: Tensor, factor: float) -> None:
    """docs/design.md's rule, with torch's float32 module as the same-dtype yardstick."""
    assert ours.shape == golden.shape, f"{name}: shape {tuple(ours.shape)} != torch's {tuple(golden.shape)}"
    assert ours.dtype == torch32.dtype
    err, torch_err = max_err(ours, golden), max_err(torch32, golden)
    scale = max(1.0, golden.abs().max().item()) if golden.numel() else 1.0
    bound = factor * torch_err + ABS_SLACK * scale
    assert err <= bound, f"{name}: error {err:.3g} > {factor} x torch's {torch_err:.3g} + {ABS_SLACK} x {scale:.3g}"


def build_modules(case: Case):
    """torch float32, torch float64 (golden) and compat float32 with torch's weights."""
    torch.manual_seed(case.seed)
    reference = nn.MultiheadAttention(**case.ctor)
    with torch.no_grad():  # torch zeroes the biases at init; random ones test them
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    ours = MultiheadAttention(**case.ctor)
    ours.load_state_dict(reference.state_dict())
    golden = copy.deepcopy(reference).double()
    for m in (reference, ours, golden):
        m.train(case.training)
    return reference, golden, ours


# ---------------------------------------------------------------------------
# The random sweep
# ---------------------------------------------------------------------------

def test_random_cases_cover_the_features():
    """The sweep below reaches every feature and combination it claims to (else it could pass vacuously)."""
    cases = [make_case(s) for s in range(NUM_RANDOM_CASES)]

    def count(pred) -> int:
        return sum(1 for c in cases if pred(c))

    for label, pred in {
        "kdim/vdim": lambda c: c.ctor["kdim"] is not None, "no bias": lambda c: not c.ctor["bias"],
        "add_bias_kv": lambda c: c.ctor["add_bias_kv"], "add_zero_attn": lambda c: c.ctor["add_zero_attn"],
        "batch_first": lambda c: c.ctor["batch_first"] and c.batched,
        "seq-first": lambda c: not c.ctor["batch_first"] and c.batched,
        "unbatched": lambda c: not c.batched, "self-attention": lambda c: c.self_attention,
        "training": lambda c: c.training, "eval with dropout": lambda c: c.ctor["dropout"] > 0,
        "kpm bool": lambda c: _kind(c.key_padding_mask).startswith("bool"),
        "kpm float": lambda c: _kind(c.key_padding_mask).startswith("float"),
        "attn_mask 2-D bool": lambda c: c.attn_mask is not None and c.attn_mask.dtype == torch.bool
        and c.attn_mask.dim() == 2 and not c.is_causal,
        "attn_mask 3-D bool": lambda c: c.attn_mask is not None and c.attn_mask.dtype == torch.bool
        and c.attn_mask.dim() == 3,
        "attn_mask 2-D float": lambda c: c.attn_mask is not None and c.attn_mask.is_floating_point()
        and c.attn_mask.dim() == 2,
        "attn_mask 3-D float": lambda c: c.attn_mask is not None and c.attn_mask.is_floating_point()
        and c.attn_mask.dim() == 3,
        "is_causal": lambda c: c.is_causal, "is_causal + extra keys": lambda c: c.is_causal and c.extra_keys > 0,
        "is_causal + kpm": lambda c: c.is_causal and c.key_padding_mask is not None,
        "need_weights averaged": lambda c: c.need_weights and c.average_attn_weights,
        "need_weights per head": lambda c: c.need_weights and not c.average_attn_weights,
        "no weights": lambda c: not c.need_weights,
        "empty rows": lambda c: bool(c.empty_rows().any()),
        "empty rows + need_weights": lambda c: bool(c.empty_rows().any()) and c.need_weights,
    }.items():
        assert count(pred) >= 2, f"only {count(pred)} random cases have {label}"


# multihead.attention_with_weights (functional.py, since commit c012943) softmaxes a row
# that a float mask fully masks (all -inf) into NaN and zeroes it afterwards: the forward
# is right, but the NaN goes through the softmax's backward and q, k and every parameter
# get NaN gradients, against docs/design.md's "output 0 and gradient 0". A bool mask hides it
# (masked_fill's backward zeroes those rows). Strict: once the core is fixed these cases
# XPASS and fail, and the marks must go.
@pytest.mark.parametrize("seed", range(NUM_RANDOM_CASES))
def test_matches_torch(seed):
    case = make_case(seed)
    reference, golden_module, ours = build_modules(case)
    empty = case.empty_rows()  # (B, H, T)
    has_empty = bool(empty.any())

    # Which of torch's paths is the oracle. torch's need_weights=True path gives NaN
    # on rows with no key, its SDPA path (need_weights=False) gives 0 as we do.
    # torch's SDPA path with is_causal and no key_padding_mask swaps attn_mask for its
    # own causal mask, which hides add_bias_kv / add_zero_attn's extra key; its
    # need_weights=True path applies attn_mask, as we always do.
    torch_nw = case.need_weights and not has_empty
    if case.is_causal and case.extra_keys and case.key_padding_mask is None:
        torch_nw = True
    weights_in_loss = case.need_weights and torch_nw

    mine = run_case(ours, case, torch.float32, need_weights=case.need_weights, average=case.average_attn_weights)
    ref32 = run_case(reference, case, torch.float32, need_weights=torch_nw, average=case.average_attn_weights)
    gold = run_case(golden_module, case, torch.float64, need_weights=torch_nw, average=case.average_attn_weights)

    assert_close_by_rule("output", mine.out, ref32.out, gold.out, OUT_FACTOR)
    assert torch.isfinite(mine.out).all()

    if not case.need_weights:
        assert mine.weights is None
    elif torch_nw:
        assert_close_by_rule("weights", mine.weights, ref32.weights, gold.weights, OUT_FACTOR)
    else:  # empty rows: torch's per-head weights, its NaN rows as our zeros, averaged here
        expected = []
        for module, dtype in ((reference, torch.float32), (golden_module, torch.float64)):
            w = run_case(module, case, dtype, need_weights=True, average=False, grad=False).weights
            w = w.reshape(case.B, case.H, case.T, -1)  # unbatched (H, T, S') -> (1, H, T, S')
            nan_rows = torch.isnan(w).all(dim=-1)  # (B, H, T)
            assert torch.equal(nan_rows, empty), "torch's NaN rows are not the rows the test thinks are empty"
            w = w.nan_to_num(0.0)
            w = w.mean(dim=1) if case.average_attn_weights else w  # (B, H, T, S') -> (B, T, S')
            expected.append(w if case.batched else w.squeeze(0))  # (1, ...) -> (...)
        assert_close_by_rule("weights", mine.weights, expected[0], expected[1], OUT_FACTOR)
        per_head = run_case(ours, case, torch.float32, need_weights=True, average=False, grad=False).weights
        per_head = per_head.reshape(case.B, case.H, case.T, -1)  # unbatched (H, T, S') -> (1, H, T, S')
        assert (per_head[empty] == 0).all()

    gen = torch.Generator().manual_seed(10_000 + seed)
    g_out = torch.randn(gold.out.shape, generator=gen, dtype=torch.float64)
    g_w = torch.randn(gold.weights.shape, generator=gen, dtype=torch.float64) if weights_in_loss else None
    got, want32, want = gradients(mine, g_out, g_w), gradients(ref32, g_out, g_w), gradients(gold, g_out, g_w)
    assert list(got) == list(want)
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        assert_close_by_rule(f"d {name}", got[name], want32[name], want[name], GRAD_FACTOR)


# ---------------------------------------------------------------------------
# State dicts, initialisation, the returned tuple
# ---------------------------------------------------------------------------

CONFIGS = [
    dict(embed_dim=8, num_heads=2),
    dict(embed_dim=12, num_heads=3, bias=False),
    dict(embed_dim=8, num_heads=4, kdim=5, vdim=3),
    dict(embed_dim=6, num_heads=2, add_bias_kv=True, add_zero_attn=True, batch_first=True),
    dict(embed_dim=6, num_heads=1, kdim=6, vdim=4, bias=False, add_bias_kv=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_same_seed_same_initial_weights_as_torch(config):
    torch.manual_seed(7)
    theirs = nn.MultiheadAttention(**config).state_dict()
    torch.manual_seed(7)
    ours = MultiheadAttention(**config).state_dict()
    assert list(ours) == list(theirs)  # same names, same order
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_round_trips_both_ways(config):
    torch.manual_seed(0)
    theirs, ours = nn.MultiheadAttention(**config), MultiheadAttention(**config)
    assert set(theirs.state_dict()) != set() and list(theirs.state_dict()) == list(ours.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape))
    ours.load_state_dict(theirs.state_dict())  # strict: no missing, no unexpected key
    back = nn.MultiheadAttention(**config)
    back.load_state_dict(ours.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
        assert torch.equal(back.state_dict()[name], value), name
    C = config["embed_dim"]
    x = torch.randn(3, 2, C)  # (T, B, C), or (B, T, C) when batch_first
    k = torch.randn(3, 2, config.get("kdim") or C)
    v = torch.randn(3, 2, config.get("vdim") or C)
    out, w = ours(x, k, v)
    ref_out, ref_w = back(x, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_state_dict_with_wrong_layout_is_refused():
    fused = nn.MultiheadAttention(8, 2).state_dict()  # in_proj_weight
    separate = MultiheadAttention(8, 2, kdim=5)  # q/k/v_proj_weight
    with pytest.raises(RuntimeError, match="in_proj_weight"):
        separate.load_state_dict(fused)


def test_returns_torchs_pair():
    m = MultiheadAttention(8, 2)
    x = torch.randn(4, 2, 8)
    result = m(x, x, x)
    assert isinstance(result, tuple) and len(result) == 2
    out, weights = result
    assert out.shape == (4, 2, 8) and weights.shape == (2, 4, 4)
    assert result.attn_output is out and result.attn_output_weights is weights
    out, weights = m(x, x, x, need_weights=False)
    assert weights is None and out.shape == (4, 2, 8)


def test_attention_runs_on_multihead_not_on_torchs_mha(monkeypatch):
    """One compat call: its arguments checked once at its edge, one typed call dispatched to a backend."""
    import multihead.backends as backends
    import multihead.core.call as call_module

    def refuse(*args, **kwargs):
        raise AssertionError("compat must not call torch's multi_head_attention_forward")

    monkeypatch.setattr(torch.nn.functional, "multi_head_attention_forward", refuse)
    dispatched, rechecked = [], []
    real_dispatch, real_check = backends.dispatch, call_module._check_tensors

    def dispatch(call, *args, **kwargs):
        dispatched.append(call)
        return real_dispatch(call, *args, **kwargs)

    def check_tensors(*args):  # make_call's first step: compat builds its call without make_call
        rechecked.append(args)
        return real_check(*args)

    monkeypatch.setattr(backends, "dispatch", dispatch)
    monkeypatch.setattr(call_module, "_check_tensors", check_tensors)
    m = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    out, _ = m(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    assert len(dispatched) == 1 and rechecked == []
    call = dispatched[0]
    assert call.attn_mask.shape == (1, 1, 5, 5) and bool(call.attn_mask.all())  # torch's False = may attend
    assert call.scale == 1 / 2.0 and type(call.scale) is float and call.dropout_p == 0.0  # 1/sqrt(D), D = 4
    torch.testing.assert_close(out, m(x, x, x, need_weights=False)[0])
    with pytest.raises(AssertionError, match="must not call"):
        nn.MultiheadAttention(8, 2, batch_first=True)(x, x, x)  # the patch is live


# ---------------------------------------------------------------------------
# Semantics at the edges: empty rows, is_causal, torch's fast path, layers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bool", "float"])
def test_row_with_no_key_gives_zero_attention_and_zero_gradient(kind):
    torch.manual_seed(1)
    m = MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        m.out_proj.bias.copy_(torch.randn(8))
    ref = nn.MultiheadAttention(8, 2, batch_first=True)
    ref.load_state_dict(m.state_dict())
    q = torch.randn(2, 3, 8, requires_grad=True)
    kv = torch.randn(2, 4, 8, requires_grad=True)
    attn_mask = torch.zeros(3, 4, dtype=torch.bool)
    attn_mask[1] = True  # query 1 may attend nothing
    if kind == "float":
        attn_mask = torch.zeros(3, 4).masked_fill(attn_mask, NEG_INF)
    out, w = m(q, kv, kv, attn_mask=attn_mask, average_attn_weights=False)
    assert (w[:, :, 1] == 0).all() and torch.allclose(w[:, :, [0, 2]].sum(-1), torch.ones(2, 2, 2))
    assert torch.allclose(out[:, 1], m.out_proj.bias.expand(2, 8))  # every head gives 0, then W^O's bias
    # torch's need_weights=True path gives NaN there; its SDPA path gives our answer
    assert torch.isnan(ref(q, kv, kv, attn_mask=attn_mask)[0][:, 1]).all()
    ref_out = ref(q, kv, kv, attn_mask=attn_mask, need_weights=False)[0]
    torch.testing.assert_close(out, ref_out)
    (out * torch.randn_like(out)).sum().backward()
    assert (q.grad[:, 1] == 0).all() and q.grad[:, [0, 2]].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_is_causal_needs_attn_mask_as_in_torch():
    x = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        nn.MultiheadAttention(8, 2)(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="is_causal=True .* needs attn_mask.*got attn_mask=None"):
        MultiheadAttention(8, 2)(x, x, x, is_causal=True)


@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn"])
def test_is_causal_applies_the_mask_given(extra):
    """With an extra key, torch's SDPA path hides it behind its own causal mask; we apply attn_mask."""
    torch.manual_seed(2)
    ref = nn.MultiheadAttention(8, 2, batch_first=True, **{extra: True})
    m = MultiheadAttention(8, 2, batch_first=True, **{extra: True})
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)  # float, -inf above the diagonal
    out = m(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    masked_path = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=True)[0]
    torch.testing.assert_close(out, masked_path)
    torch.testing.assert_close(out, m(x, x, x, attn_mask=causal)[0])  # the hint changes nothing
    # the extra key matters, so a path that hid it (as torch's SDPA path does) would be caught
    plain = MultiheadAttention(8, 2, batch_first=True)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("bias_")})
    assert max_err(out, plain(x, x, x, attn_mask=causal, is_causal=True)[0]) > 1e-3


def test_matches_torchs_fast_inference_path():
    """In eval under no_grad, torch runs its fused native kernel; compat must agree with it too."""
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    m = MultiheadAttention(16, 4, batch_first=True).eval()
    m.load_state_dict(ref.state_dict())
    golden = copy.deepcopy(ref).double()
    x = torch.randn(3, 7, 16)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 1] = True
    for kwargs in (dict(), dict(key_padding_mask=kpm), dict(need_weights=False, key_padding_mask=kpm)):
        with torch.no_grad():
            out, w = m(x, x, x, **kwargs)
            fast_out, fast_w = ref(x, x, x, **kwargs)
        with torch.enable_grad():  # requires_grad parameters keep torch off the fast path: the golden slow path
            gold_out, gold_w = golden(x.double(), x.double(), x.double(), **kwargs)
        assert_close_by_rule("fast-path output", out, fast_out, gold_out.detach(), OUT_FACTOR)
        if w is not None:
            assert_close_by_rule("fast-path weights", w, fast_w, gold_w.detach(), OUT_FACTOR)


@pytest.mark.parametrize("train", [True, False])
def test_drop_in_for_transformer_encoder_layer_self_attn(train, monkeypatch):
    """Swap a TransformerEncoderLayer's self_attn for compat's. In training the layer calls
    compat's forward; in eval under no_grad torch runs its fused layer kernel on compat's
    parameters, with the masks merged by compat.merge_masks."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    swapped = copy.deepcopy(layer)
    swapped.self_attn = MultiheadAttention(16, 4, batch_first=True)
    swapped.self_attn.load_state_dict(layer.self_attn.state_dict())
    for mod in (layer, swapped):
        mod.train(train)
    forward_calls, fused_calls = [], []
    # counted by wrapping forward, not by a hook: hooks turn torch's fused path off
    compat_forward = swapped.self_attn.forward
    monkeypatch.setattr(swapped.self_attn, "forward",
                        lambda *a, **k: forward_calls.append(1) or compat_forward(*a, **k))
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                        lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    x = torch.randn(2, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6).bool()
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.set_grad_enabled(train):
        got = swapped(x, src_mask=causal, src_key_padding_mask=kpm, is_causal=True)
        assert (len(forward_calls), len(fused_calls)) == ((1, 0) if train else (0, 1))
        want = layer(x, src_mask=causal, src_key_padding_mask=kpm, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if train:
        got.sum().backward()
        assert swapped.self_attn.in_proj_weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------

def _dropout_setup(p=0.5):
    torch.manual_seed(5)
    m = MultiheadAttention(8, 2, dropout=p, batch_first=True).train()
    with torch.no_grad():
        m.in_proj_bias.normal_()
    x = torch.randn(2, 6, 8)
    return m, x


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_is_reproducible_with_the_seed(need_weights):
    m, x = _dropout_setup()

    def call(seed):
        torch.manual_seed(seed)
        return m(x, x, x, need_weights=need_weights)

    first, again, other = call(11), call(11), call(12)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    if need_weights:
        assert torch.equal(first[1], again[1]) and not torch.equal(first[1], other[1])
    eval_out = m.eval()(x, x, x, need_weights=need_weights)[0]
    assert max_err(first[0], eval_out) > 1e-3  # dropout acted in training ...
    torch.manual_seed(11)
    assert torch.equal(m(x, x, x, need_weights=need_weights)[0], eval_out)  # ... and not in eval


def test_dropout_returns_the_dropped_weights_the_output_was_made_with():
    p = 0.5
    m, x = _dropout_setup(p)
    probs = m.eval()(x, x, x, average_attn_weights=False)[1]  # (B, H, T, S) before dropout
    m.train()
    torch.manual_seed(13)
    out, w = m(x, x, x, average_attn_weights=False)
    dropped = w == 0
    assert 0.3 < dropped.float().mean().item() < 0.7
    torch.testing.assert_close(w[~dropped], probs[~dropped] / (1 - p))
    # the output is W^O (weights @ V): recompute it from the returned weights
    w_v, b_v = compat.split_in_proj(m.in_proj_weight, m.in_proj_bias)[2::3]
    v = (x @ w_v.T + b_v).reshape(2, 6, 2, 4).transpose(1, 2)  # (B, S, C) -> (B, H, S, D)
    merged = (w @ v).transpose(1, 2).reshape(2, 6, 8)  # (B, H, T, D) -> (B, T, C)
    torch.testing.assert_close(out, m.out_proj(merged))
    torch.manual_seed(13)
    averaged = m(x, x, x)[1]
    torch.testing.assert_close(averaged, w.mean(dim=1))


def test_dropout_changes_with_the_mode_not_the_flag():
    m, x = _dropout_setup(0.0)
    m.train()
    ref = nn.MultiheadAttention(8, 2, batch_first=True).train()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0])
    m.dropout = 1.5  # torch's dropout is a plain attribute; a bad value is caught at call time
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 1.5"):
        m(x, x, x)


# ---------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------

def test_split_and_fuse_in_proj_are_inverse():
    w, b = torch.randn(3 * 6, 6), torch.randn(3 * 6)
    parts = compat.split_in_proj(w, b)
    assert [t.shape for t in parts] == [(6, 6)] * 3 + [(6,)] * 3
    assert torch.equal(parts.q_weight, w[:6]) and torch.equal(parts.k_weight, w[6:12])
    assert torch.equal(parts.v_weight, w[12:]) and torch.equal(parts.v_bias, b[12:])
    fused = compat.fuse_in_proj(*parts)
    assert torch.equal(fused.weight, w) and torch.equal(fused.bias, b)
    no_bias = compat.split_in_proj(w)
    assert no_bias.q_bias is None and no_bias.k_bias is None and no_bias.v_bias is None
    assert compat.fuse_in_proj(*no_bias[:3]).bias is None


def test_split_in_proj_matches_torchs_own_projection():
    torch.manual_seed(6)
    ref = nn.MultiheadAttention(6, 2)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
    x, kv = torch.randn(5, 6), torch.randn(4, 6)
    parts = compat.split_in_proj(ref.in_proj_weight, ref.in_proj_bias)
    want = torch.nn.functional._in_projection_packed(x, kv, kv, ref.in_proj_weight, ref.in_proj_bias)
    got = [x @ parts.q_weight.T + parts.q_bias, kv @ parts.k_weight.T + parts.k_bias,
           kv @ parts.v_weight.T + parts.v_bias]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _random_torch_module(config):
    torch.manual_seed(8)
    ref = nn.MultiheadAttention(**config)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return ref


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_from_torch_answers_the_same_call_as_the_source(batch_first, masks, need_weights):
    """Once failed (silent): from_torch returned a batch-first multihead.MultiHeadAttention whatever the
    source's layout, so `from_torch(nn.MultiheadAttention(512, 8))(x)` with torch's default (T, B, C) input
    had the right shape and values off by up to 1.18 (B and T swapped), and torch's call
    (query, key, value, key_padding_mask, need_weights, attn_mask) was not accepted. The result now takes the
    source's call, argument for argument and positionally, and gives its numbers under the rule."""
    torch.manual_seed(11)
    ref = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    converted = compat.from_torch(ref)
    assert isinstance(converted, MultiheadAttention) and converted.batch_first == batch_first
    B, T, S = 2, 4, 6
    q, k, v = torch.randn(T, B, 8), torch.randn(S, B, 5), torch.randn(S, B, 3)  # torch's default (L, B, ·)
    if batch_first:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # (L, B, ·) -> (B, L, ·)
    padding = torch.tensor([[False] * S, [False] * 4 + [True] * 2]) if masks else None  # True = padding
    forbid = None
    if masks:
        forbid = torch.rand(T, S, generator=torch.Generator().manual_seed(0)) < 0.4  # True = not allowed
        forbid[:, 0] = False  # every row keeps a key: torch's weights path gives NaN for empty rows
    golden = copy.deepcopy(ref).double()
    args = (padding, need_weights, forbid, False)  # key_padding_mask, need_weights, attn_mask, average
    out, w = converted(q, k, v, *args)
    ref_out, ref_w = ref(q, k, v, *args)
    gold_out, gold_w = golden(q.double(), k.double(), v.double(), *args)
    assert_close_by_rule("output", out, ref_out, gold_out, OUT_FACTOR)
    if need_weights:
        assert_close_by_rule("weights", w, ref_w, gold_w, OUT_FACTOR)
    else:
        assert w is None and ref_w is None
    # the default call (need_weights=True, weights averaged over heads), as the user made it
    averaged = converted(q, k, v)[1]
    assert_close_by_rule("averaged weights", averaged, ref(q, k, v)[1], golden(q.double(), k.double(),
                                                                              v.double())[1], OUT_FACTOR)


@pytest.mark.parametrize("config", CONFIGS)
def test_from_torch_copies_the_whole_module(config):
    """Every constructor argument, the weights (copied, not shared), the dtype, the mode and requires_grad are
    the source's, and converting draws nothing from the global RNG."""
    ref = _random_torch_module(config).double().train(False)
    ref.out_proj.weight.requires_grad_(False)
    rng = torch.get_rng_state()
    converted = compat.from_torch(ref)
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(converted, MultiheadAttention) and not converted.training
    for name in ("embed_dim", "num_heads", "kdim", "vdim", "dropout", "batch_first", "add_zero_attn"):
        assert getattr(converted, name) == getattr(ref, name), name
    theirs, ours = ref.state_dict(), converted.state_dict()
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value) and ours[name].dtype == torch.float64, name
        assert ours[name].data_ptr() != value.data_ptr(), f"{name} shares the source's storage"
    assert [p.requires_grad for p in converted.parameters()] == [p.requires_grad for p in ref.parameters()]
    assert not converted.out_proj.weight.requires_grad
    # add_bias_kv / add_zero_attn included, torch's call gives torch's numbers (float64: no rounding to speak of)
    C = config["embed_dim"]
    widths = (C, config.get("kdim") or C, config.get("vdim") or C)
    q, k, v = (torch.randn(3, 2, width, dtype=torch.float64) for width in widths)  # (L, B, ·), or (B, L, ·)
    for got, want in zip(converted(q, k, v), ref(q, k, v)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # from a compat module too: the same module again
    again = compat.from_torch(converted)
    assert all(torch.equal(again.state_dict()[n], v) for n, v in theirs.items())


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.get("add_bias_kv")])
def test_to_multihead_gives_the_same_outputs(config):
    ref = _random_torch_module(config)
    converted = compat.to_multihead(ref)
    assert isinstance(converted, mh.MultiHeadAttention)
    C = config["embed_dim"]
    B, T, S = 2, 4, 5
    x = torch.randn(B, T, C)  # multihead is batch-first
    k, v = torch.randn(B, S, config.get("kdim") or C), torch.randn(B, S, config.get("vdim") or C)
    padding = torch.tensor([[False] * S, [False] * 3 + [True] * 2])  # torch: True = padding
    forbid = torch.rand(T, S, generator=torch.Generator().manual_seed(0)) < 0.3  # torch: True = not allowed
    forbid[:, 0] = False
    out, w = converted(x, k, v, key_mask=~padding, attn_mask=~forbid, need_weights=True)
    layout = (lambda t: t) if config.get("batch_first") else (lambda t: t.transpose(0, 1))  # (B,L,·) <-> (L,B,·)
    ref_out, ref_w = ref(layout(x), layout(k), layout(v), key_padding_mask=padding, attn_mask=forbid,
                         average_attn_weights=False)
    torch.testing.assert_close(out, layout(ref_out))
    torch.testing.assert_close(w, ref_w)
    # also from a compat module, which holds the same layout
    ours = MultiheadAttention(**config)
    ours.load_state_dict(ref.state_dict())
    for name, value in compat.to_multihead(ours).state_dict().items():
        assert torch.equal(value, converted.state_dict()[name]), name


@pytest.mark.parametrize("kv_dims", [(None, None), (5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_to_torch_gives_the_same_outputs_and_round_trips(kv_dims, bias):
    torch.manual_seed(9)
    kdim, vdim = kv_dims
    module = mh.MultiHeadAttention(12, 3, kdim=kdim, vdim=vdim, bias=bias)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    converted = compat.to_torch(module)
    assert isinstance(converted, nn.MultiheadAttention) and converted.batch_first
    assert converted._qkv_same_embed_dim == (kdim is None)
    x, k, v = torch.randn(2, 4, 12), torch.randn(2, 6, kdim or 12), torch.randn(2, 6, vdim or 12)
    key_mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])  # multihead: True = a real token
    out, w = module(x, k, v, key_mask=key_mask, need_weights=True)
    ref_out, ref_w = converted(x, k, v, key_padding_mask=~key_mask, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    back = compat.to_multihead(converted)
    for name, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    ours = MultiheadAttention(12, 3, kdim=kdim, vdim=vdim, bias=bias, batch_first=True)
    ours.load_state_dict(converted.state_dict())
    torch.testing.assert_close(ours(x, k, v, key_padding_mask=~key_mask)[0], out)
    seq_first = compat.to_torch(module, batch_first=False)
    torch.testing.assert_close(seq_first(x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))[0],
                               module(x, k, v)[0].transpose(0, 1))


# ---------------------------------------------------------------------------
# Hypothesis: torch's padding polarity reaches the attention the right way round
# ---------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 6), S=st.integers(2, 7), batch_first=st.booleans(),
       need_weights=st.booleans())
def test_changing_a_padded_key_changes_nothing(seed, T, S, batch_first, need_weights):
    torch.manual_seed(seed)
    m = MultiheadAttention(6, 3, kdim=4, vdim=5, batch_first=batch_first)
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))  # (B, L, ·) -> layout
    q, k, v = torch.randn(2, T, 6), torch.randn(2, S, 4), torch.randn(2, S, 5)
    padding = torch.zeros(2, S, dtype=torch.bool)
    padding[1, -1] = True  # the last key of sequence 1 is padding
    out = m(layout(q), layout(k), layout(v), key_padding_mask=padding, need_weights=need_weights)[0]
    k2, v2 = k.clone(), v.clone()
    k2[1, -1], v2[1, -1] = 100.0, -100.0
    out2 = m(layout(q), layout(k2), layout(v2), key_padding_mask=padding, need_weights=need_weights)[0]
    torch.testing.assert_close(out, out2)
    k2[0, -1] = 100.0  # the same key of sequence 0 is real: it must matter
    out3 = m(layout(q), layout(k2), layout(v2), key_padding_mask=padding, need_weights=need_weights)[0]
    assert max_err(layout(out3)[0], layout(out)[0]) > 1e-4


# ---------------------------------------------------------------------------
# Bad input: every path names the argument, what was expected, what came
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(embed_dim=0, num_heads=2), ValueError, "embed_dim must be positive, got 0"),
    (dict(embed_dim=8, num_heads=-1), ValueError, "num_heads must be positive, got -1"),
    (dict(embed_dim=8.0, num_heads=2), TypeError, "embed_dim must be an int, got float"),
    (dict(embed_dim=8, num_heads=True), TypeError, "num_heads must be an int, got bool"),
    (dict(embed_dim=10, num_heads=4), ValueError, "embed_dim=10 must be divisible by num_heads=4"),
    (dict(embed_dim=8, num_heads=2, kdim=0), ValueError, "kdim must be positive, got 0"),
    (dict(embed_dim=8, num_heads=2, vdim="4"), TypeError, "vdim must be an int, got str"),
    (dict(embed_dim=8, num_heads=2, dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\), got 1.0"),
    (dict(embed_dim=8, num_heads=2, dropout=-0.1), ValueError, r"dropout must be a float in \[0, 1\), got -0.1"),
    (dict(embed_dim=8, num_heads=2, batch_first=1), TypeError, "batch_first must be a bool, got int"),
    (dict(embed_dim=8, num_heads=2, add_bias_kv="yes"), TypeError, "add_bias_kv must be a bool, got str"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiheadAttention(**kwargs)


def _bad_calls():
    x = torch.randn(4, 2, 8)  # (T, B, C)
    kv = torch.randn(5, 2, 8)  # (S, B, C)
    yield "query not a tensor", dict(query=x.tolist()), TypeError, "query must be a torch.Tensor, got list"
    yield "4-D query", dict(query=x[None]), ValueError, r"query has 4 dims, .* expected, got \(1, 4, 2, 8\)"
    yield "2-D key for 3-D query", dict(key=kv[:, 0]), ValueError, r"key has 2 dims, 3 expected .*got \(5, 8\)"
    yield "query width", dict(query=x[..., :6]), ValueError, r"query has width 6, embed_dim=8 expected, got \(4, 2, 6\)"
    yield "key width", dict(key=kv[..., :7]), ValueError, r"key has width 7, kdim=8 expected"
    yield "value width", dict(value=kv[..., :7]), ValueError, r"value has width 7, vdim=8 expected, got \(5, 2, 7\)"
    yield "query device", dict(query=x.to("meta")), ValueError, "query is on meta but the module's parameters are on cpu"
    yield "kpm device", dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta")), ValueError, \
        "key_padding_mask is on meta but the inputs are on cpu"
    yield "attn_mask device", dict(attn_mask=torch.zeros(4, 5, device="meta")), ValueError, \
        "attn_mask is on meta but the inputs are on cpu"
    yield "S differs", dict(value=kv[:4]), ValueError, r"key and value must have the same length S .*\(4, 2, 8\)"
    yield "B differs", dict(key=kv[:, :1], value=kv[:, :1]), ValueError, r"same batch size B \(dim 1.*\(5, 1, 8\)"
    yield "dtype", dict(query=x.double()), TypeError, "query has dtype torch.float64 but the module's parameters are torch.float32"
    yield "kpm dtype", dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.int64)), TypeError, \
        r"key_padding_mask must be bool \(True = not allowed.*got torch.int64"
    yield "kpm shape", dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, \
        r"key_padding_mask must be \(B, S\) = \(2, 5\), got \(2, 4\)"
    yield "kpm not a tensor", dict(key_padding_mask=[[True] * 5] * 2), TypeError, "key_padding_mask must be a torch.Tensor or None, got list"
    yield "attn_mask dtype", dict(attn_mask=torch.zeros(4, 5, dtype=torch.int32)), TypeError, "attn_mask must be bool .*got torch.int32"
    yield "attn_mask 2-D shape", dict(attn_mask=torch.zeros(5, 4, dtype=torch.bool)), ValueError, \
        r"attn_mask must be \(T, S\) = \(4, 5\) or \(B\*num_heads, T, S\) = \(4, 4, 5\), got \(5, 4\)"
    yield "attn_mask 3-D shape", dict(attn_mask=torch.zeros(2, 4, 5)), ValueError, r"= \(4, 4, 5\), got \(2, 4, 5\)"
    yield "attn_mask 4-D", dict(attn_mask=torch.zeros(2, 2, 4, 5)), ValueError, r"got \(2, 2, 4, 5\)"
    yield "need_weights", dict(need_weights=None), TypeError, "need_weights must be a bool, got NoneType"
    yield "average flag", dict(average_attn_weights=1), TypeError, "average_attn_weights must be a bool, got int"
    yield "is_causal type", dict(is_causal="yes", attn_mask=torch.zeros(4, 5)), TypeError, "is_causal must be a bool, got str"


@pytest.mark.parametrize("label, change, error, match", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_bad_forward_arguments(label, change, error, match):
    m = MultiheadAttention(8, 2)
    x, kv = torch.randn(4, 2, 8), torch.randn(5, 2, 8)
    call = dict(query=x, key=kv, value=kv) | change
    with pytest.raises(error, match=match):
        m(**call)


def test_bad_unbatched_masks():
    m = MultiheadAttention(8, 2)
    x, kv = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(S,\) for unbatched input = \(5,\), got \(1, 5\)"):
        m(x, kv, kv, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(num_heads, T, S\) = \(2, 4, 5\), got \(1, 4, 5\)"):
        m(x, kv, kv, attn_mask=torch.zeros(1, 4, 5, dtype=torch.bool))
    # and the right shapes work, per head and per key
    out, w = m(x, kv, kv, key_padding_mask=torch.zeros(5, dtype=torch.bool),
               attn_mask=torch.zeros(2, 4, 5, dtype=torch.bool), average_attn_weights=False)
    assert out.shape == (4, 8) and w.shape == (2, 4, 5)


def _without_out_bias(module: nn.MultiheadAttention) -> nn.MultiheadAttention:
    module.out_proj.bias = None  # a hand-edited module that torch's bias flag cannot make
    return module


def _with_dropout(module: nn.MultiheadAttention, p) -> nn.MultiheadAttention:
    module.dropout = p  # a plain attribute in torch: reassigned, never checked
    return module


@pytest.mark.parametrize("call, error, match", [
    (lambda: compat.split_in_proj(torch.randn(18, 5)), ValueError, r"in_proj_weight must be \(3C, C\) = \(15, 5\), got \(18, 5\)"),
    (lambda: compat.split_in_proj(torch.randn(18)), ValueError, r"in_proj_weight has 1 dims, \(3C, C\) expected, got \(18,\)"),
    (lambda: compat.split_in_proj("w"), TypeError, "in_proj_weight must be a torch.Tensor"),
    (lambda: compat.split_in_proj(torch.randn(18, 6), torch.randn(17)), ValueError,
     r"in_proj_bias must be \(3C,\) = \(18,\) to match in_proj_weight, got \(17,\)"),
    (lambda: compat.fuse_in_proj(torch.randn(6, 6), torch.randn(6, 5), torch.randn(6, 6)), ValueError,
     r"k_weight must be \(C, C\) = \(6, 6\) .*got \(6, 5\)"),
    (lambda: compat.fuse_in_proj(*[torch.randn(6, 6)] * 3, torch.randn(6)), ValueError,
     "all given or all None, got only q_bias"),
    (lambda: compat.fuse_in_proj(*[torch.randn(6, 6)] * 3, *[torch.randn(6)] * 2, torch.randn(5)), ValueError,
     r"v_bias must be \(C,\) = \(6,\), got \(5,\)"),
    (lambda: compat.from_torch(nn.Linear(4, 4)), TypeError, "module must be a torch.nn.MultiheadAttention .*got Linear"),
    (lambda: compat.to_multihead(nn.Linear(4, 4)), TypeError, "module must be a torch.nn.MultiheadAttention"),
    (lambda: compat.to_multihead(nn.MultiheadAttention(8, 2, add_bias_kv=True)), ValueError,
     "add_bias_kv=True .*use multihead.compat.from_torch"),
    (lambda: compat.to_multihead(MultiheadAttention(8, 2, add_zero_attn=True)), ValueError, "add_zero_attn=True"),
    (lambda: compat.from_torch(_without_out_bias(nn.MultiheadAttention(8, 2))), ValueError,
     "both in_proj_bias and out_proj.bias or neither .*got in_proj_bias=set, out_proj.bias=None"),
    (lambda: compat.to_multihead(_without_out_bias(nn.MultiheadAttention(8, 2))), ValueError,
     "both in_proj_bias and out_proj.bias or neither"),
    (lambda: compat.from_torch(_with_dropout(nn.MultiheadAttention(8, 2), 1.5)), ValueError, "dropout"),
    (lambda: compat.to_torch(nn.MultiheadAttention(8, 2)), TypeError,
     "module must be a multihead.MultiHeadAttention, got MultiheadAttention"),
    (lambda: compat.to_torch(mh.MultiHeadAttention(8, 4, num_kv_heads=2)), ValueError,
     "num_kv_heads=2 < num_heads=4"),
    (lambda: compat.to_torch(mh.MultiHeadAttention(8, 2, head_dim=3)), ValueError,
     "head_dim=3, v_head_dim=3; torch.nn.MultiheadAttention needs both equal to d_model / num_heads = 8 / 2"),
    (lambda: compat.to_torch(mh.MultiHeadAttention(8, 2, v_head_dim=2)), ValueError, "v_head_dim=2"),
    (lambda: compat.to_torch(mh.MultiHeadAttention(8, 2, causal=True)), ValueError, "causal=True"),
    (lambda: compat.to_torch(mh.MultiHeadAttention(8, 2), batch_first=None), TypeError, "batch_first must be a bool"),
])
def test_bad_converter_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
