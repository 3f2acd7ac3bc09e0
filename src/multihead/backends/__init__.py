"""The backend registry: name -> backend, the `auto` choice, and why.

Every backend has the reference's call signature

    forward(q, k, v, *, attn_mask, causal, scale, dropout_p) -> out (B, H, T, Dv)

and a `supports(...)` with the same arguments that returns None when it can
run the call, or a one-line reason why not. `auto` tries the registered
backends from the fastest (highest `priority`) down and takes the first that
supports the call, so the dispatch can always say which one ran and why the
others did not. Arguments reach a backend already checked and normalised by
`multihead.functional` (scale is a float, attn_mask bool or q's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


class Backend(Protocol):
    name: str  # what users pass as backend="..."
    priority: int  # auto tries higher first: the faster backend where both apply
    summary: str  # one line for listings

    def supports(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None,
        causal: bool, scale: float, dropout_p: float,
    ) -> str | None: ...

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None,
        causal: bool, scale: float, dropout_p: float,
    ) -> Tensor: ...


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under its name."""
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove a backend (a plugin's or a test's); unknown names raise."""
    get(name)
    del _REGISTRY[name]


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(
            f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}"
        )
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered backend names, the order auto tries them in."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


@dataclass(frozen=True)
class Dispatch:
    """Which backend runs a call, and for every backend why it was or was not picked."""

    chosen: str  # the backend that runs
    requested: str  # what the caller asked for: "auto" or a name
    reasons: dict[str, str | None]  # name -> None if it supports the call, else why not

    def __str__(self) -> str:
        lines = [f"backend={self.requested!r} -> {self.chosen}"]
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


def dispatch(requested: str, q: Tensor, k: Tensor, v: Tensor, **call) -> Dispatch:
    """Pick the backend for a call (arguments already normalised); raise if none can run it."""
    if requested != "auto":
        get(requested)  # unknown name -> ValueError listing the known ones
    reasons = {name: _REGISTRY[name].supports(q, k, v, **call) for name in names()}
    if requested != "auto":
        if reasons[requested] is not None:
            raise ValueError(
                f"backend={requested!r} cannot run this call: {reasons[requested]} "
                f"(backend='auto' picks one that can)"
            )
        return Dispatch(requested, requested, reasons)
    for name, reason in reasons.items():
        if reason is None:
            return Dispatch(name, "auto", reasons)
    raise ValueError("no backend supports this call:\n" + "\n".join(
        f"  {n}: {r}" for n, r in reasons.items()))


def _register_builtin() -> None:
    from .chunked import ChunkedBackend
    from .reference import ReferenceBackend
    from .sdpa import SdpaBackend
    from .triton import TritonBackend  # imports no triton until a call needs it

    register(ReferenceBackend())
    register(ChunkedBackend())
    register(SdpaBackend())
    register(TritonBackend())


_register_builtin()
