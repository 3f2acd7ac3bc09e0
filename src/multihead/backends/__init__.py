"""The backend registry: name -> backend, the `auto` choice, and why.

A backend is an object with a name, a priority, a one-line summary and two methods:

    supports(call, *, need_lse=False) -> None, or a one-line reason why it cannot
    forward(call, *, need_lse=False)  -> AttentionOutput(out (B, H, T, Dv), lse (B, H, T) or None)

`call` is a `multihead.core.call.AttentionCall`, checked once by the entry point
that made it. With need_lse a backend returns the logsumexp of every query
row (-inf for a row with no key), or says in `supports` that it cannot.
`auto` walks the registered backends from the fastest (highest `priority`)
down and takes the first that supports the call; `survey` asks every one of
them, so the dispatch can always say which backend ran and why the others
did not.

    auto order:  sdpa (20)  triton (17, CUDA, gives the lse)  cpu_flash (15, CPU, gives the lse)
                 chunked (10)  reference (0, always)

A backend may also have a third, optional method, the backward from a given
logsumexp (what ring attention needs for each block of keys):

    backward(call, grad_out, out, lse) -> Gradients(dq (B, H, T, D), dk (B, G, S, D), dv (B, G, S, Dv))

grad_out and out (B, H, T, Dv), lse (B, H, T) float32 (float64 for float64
inputs), -inf for a row with no key. `out` and `lse` may be those of a larger
attention, whose keys this call holds only a block of: with
P = exp(scale·q·kᵀ + mask - lse) (0 where masked or hidden by causal),
dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ out)), dQ = scale·dS K,
dK = scale·dSᵀ Q (summed over the query heads of a kv head), so the sum over
the blocks is the full gradient. A row with lse = -inf contributes exactly 0,
never NaN. Calls with dropout are not supported (the draw cannot be
replayed). Given the call's own out and lse, it reproduces autograd's
gradients. `dispatch(..., need_backward=True)` takes only a backend that has
the method and supports the call with need_lse=True.

    backward:    reference, chunked, cpu_flash, triton  (sdpa has none)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..core.call import AttentionCall, AttentionOutput


class Backend(Protocol):
    """What `register` takes: a name, a priority, a summary, `supports` and `forward`.

    Optional, and so not declared here (a Protocol member would be required):
    `backward(call, grad_out, out, lse) -> Gradients`, the gradients from a given
    out and logsumexp (see the module's docstring). `dispatch(..., need_backward=True)`
    refuses a backend without it.
    """

    name: str  # what users pass as backend="..."
    priority: int  # auto tries higher first: the faster backend where both apply
    summary: str  # one line for listings

    def supports(self, call: AttentionCall, *, need_lse: bool = False) -> str | None: ...

    def forward(self, call: AttentionCall, *, need_lse: bool = False) -> AttentionOutput: ...


_REGISTRY: dict[str, Backend] = {}
_ORDER: list[Backend] = []  # the registry by priority, highest first: what auto walks


def _reorder() -> None:
    _ORDER[:] = sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under its name."""
    for attribute in ("name", "priority", "summary", "supports", "forward"):
        if not hasattr(backend, attribute):
            raise TypeError(f"backend must have a {attribute!r} (see multihead.backends.Backend), "
                            f"got {type(backend).__name__}")
    _REGISTRY[backend.name] = backend
    _reorder()
    return backend


def unregister(name: str) -> None:
    """Remove a backend (a plugin's or a test's); unknown names raise."""
    get(name)
    del _REGISTRY[name]
    _reorder()


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str ('auto' or one of {names()}), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {names()}, got {name!r}")
    return _REGISTRY[name]


def check_name(name) -> str:
    """'auto' or a registered name, else TypeError/ValueError listing the known ones."""
    if name != "auto":
        get(name)
    return name


def names() -> list[str]:
    """Registered backend names, the order auto tries them in."""
    return [b.name for b in _ORDER]


@dataclass(frozen=True)
class Dispatch:
    """Which backend runs a call, and for every backend why it was or was not picked."""

    chosen: str  # the backend that runs
    requested: str  # what the caller asked for: "auto" or a name
    reasons: dict[str, str | None]  # name -> None if it supports the call, else why not
    need_lse: bool = False  # whether the call asked for the logsumexp too
    need_backward: bool = False  # whether the call asked for the backward from a given logsumexp

    def __str__(self) -> str:
        asked = (" (backward from the logsumexp)" if self.need_backward
                 else " (with the logsumexp)" if self.need_lse else "")
        lines = [f"backend={self.requested!r}{asked} -> {self.chosen}"]
        for name, reason in self.reasons.items():
            if name == self.chosen:
                verdict = "runs" if self.requested != "auto" else "runs: fastest that supports the call"
            elif reason is None:
                verdict = "supports the call, but " + (
                    "was not requested" if self.requested != "auto" else f"{self.chosen} comes first"
                )
            else:
                verdict = "cannot: " + reason
            lines.append(f"  {name:<10} {verdict}")
        return "\n".join(lines)


def _refused(requested: str, reason: str) -> ValueError:
    return ValueError(f"backend={requested!r} cannot run this call: {reason} (backend='auto' picks one that can)")


NO_BACKWARD = "has no backward from a given logsumexp"


def backward_reason(backend: Backend, call: AttentionCall) -> str | None:
    """Why a backend cannot give this call's gradients from a given logsumexp, or None."""
    if call.dropout_p > 0.0:
        return (f"dropout_p={call.dropout_p}: a backward from a given logsumexp takes no dropout "
                f"(it cannot replay the draw)")
    if call.attn_mask is not None and call.attn_mask.requires_grad:
        return "a float mask that requires grad: Gradients has no mask gradient"
    if not hasattr(backend, "backward"):
        return NO_BACKWARD
    return backend.supports(call, need_lse=True)  # it reads the lse the forward of this call would give


def _answer(backend: Backend, call: AttentionCall, need_lse: bool, need_backward: bool) -> str | None:
    """A backend's answer to a call: None, or why it cannot run it as asked."""
    return backward_reason(backend, call) if need_backward else backend.supports(call, need_lse=need_lse)


def dispatch(call: AttentionCall, requested: str = "auto", *, need_lse: bool = False,
             need_backward: bool = False) -> Backend:
    """The backend that runs a call: the requested one, or auto's first that supports it; else ValueError.

    need_backward: the backend must also have `backward` (the gradients from a given logsumexp).
    """
    if requested != "auto":
        backend = get(requested)
        reason = _answer(backend, call, need_lse, need_backward)
        if reason is not None:
            raise _refused(requested, reason)
        return backend
    for backend in _ORDER:
        if _answer(backend, call, need_lse, need_backward) is None:
            return backend
    # none supports it: survey raises, listing why
    return get(survey(call, "auto", need_lse=need_lse, need_backward=need_backward).chosen)


def survey(call: AttentionCall, requested: str = "auto", *, need_lse: bool = False,
            need_backward: bool = False) -> Dispatch:
    """Every backend's answer to a call, and the one that runs (what `multihead.which_backend` prints)."""
    check_name(requested)
    reasons = {b.name: _answer(b, call, need_lse, need_backward) for b in _ORDER}
    if requested != "auto":
        if reasons[requested] is not None:
            raise _refused(requested, reasons[requested])
        return Dispatch(requested, requested, reasons, need_lse, need_backward)
    chosen = next((name for name, reason in reasons.items() if reason is None), None)
    if chosen is None:
        raise ValueError("no backend supports this call:\n" + "\n".join(
            f"  {name}: {reason}" for name, reason in reasons.items()))
    return Dispatch(chosen, "auto", reasons, need_lse, need_backward)


def _register_builtin() -> None:
    from .chunked import ChunkedBackend
    from .cpu_flash import CpuFlashBackend
    from .reference import ReferenceBackend
    from .sdpa import SdpaBackend
    from .triton import TritonBackend  # imports no triton until a call needs it

    for backend in (ReferenceBackend(), ChunkedBackend(), CpuFlashBackend(), SdpaBackend(), TritonBackend()):
        register(backend)


_register_builtin()
