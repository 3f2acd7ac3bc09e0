"""ContextParallel: how a module or a model runs with its sequence split across the ranks of a group.

    cp = ContextParallel(length=T, layout="zigzag", method="ring")      # group=None: the default group
    x_part = shard_sequence(x, dim=1, layout="zigzag")                   # (B, T, C) -> (B, part, C)
    y_part = mha(x_part, context_parallel=cp)                            # MultiHeadAttention
    logits_part = model(shard_sequence(ids, dim=1), context_parallel=cp) # GPT-2, Llama

Everything outside attention (projections, norms, MLPs) is per token and
runs on the part as it is. Attention runs through `ring_attention` or
`ulysses_attention`, and positions (RoPE's rotation, GPT-2's learned
positions) are the tokens' places in the global sequence, not in the part.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core.checks import flag
from .group import check_group, refusal_heard
from .layout import Cut, check_cut, make_sharding
from .ring import ring_attention
from .ulysses import ulysses_attention

METHODS = ("ring", "ulysses")


@dataclass(frozen=True)
class ContextParallel:
    """Run attention over a sequence split across a process group."""

    length: int  # the global sequence length T; the parts' padding beyond it is masked
    layout: str = "zigzag"  # how the parts were cut (shard_sequence's layout): "zigzag" or "contiguous"
    method: str = "ring"  # "ring" (k/v blocks round a ring) or "ulysses" (all-to-all over heads)
    group: object = None  # a torch.distributed ProcessGroup; None: the default group
    check: bool = False  # agree on every call, not only on a new signature (the same on every rank; see Limits)

    def __post_init__(self) -> None:
        make_sharding(self.layout, self.length, 1)  # checks layout and length
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        flag("check", self.check)

    def part(self) -> int:
        """Tokens in each rank's part."""
        return make_sharding(self.layout, self.length, check_group(self.group).world).part

    def positions(self, device=None) -> Tensor:
        """(part,) this rank's tokens' global positions; padding gets the last real position (it is masked)."""
        g = check_group(self.group)
        sharding = make_sharding(self.layout, self.length, g.world)
        return sharding.positions(g.rank, device).clamp(max=self.length - 1)  # (part,)

    def check_part(self, name: str, x: Tensor, dim: int = 1) -> None:
        """Refuse x when it records a cut (shard_sequence's) other than this one's layout, length and group.

        A module's own check, so a refusal goes through `refusals_heard`; a plain tensor passes."""
        g = check_group(self.group)
        cut = Cut(make_sharding(self.layout, self.length, g.world), dim % x.dim(), g.rank)
        check_cut(name, x, cut, "ContextParallel")

    def refusals_heard(self, what: str):
        """A context manager for a module's own checks: a TypeError/ValueError raised inside is told to every
        rank of the group first (they are waiting in the attention's agreement), so every rank raises.

        The others wait in that agreement on a signature's first call, or on every call with check=True;
        on a repeated signature they send blocks instead, and the ranks wait until the group's timeout."""
        return refusal_heard(what, check_group(self.group))

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, causal: bool = False,
                  scale: float | None = None, backend: str = "auto", window=None, softcap: float | None = None,
                  alibi_slopes: Tensor | None = None, sinks: Tensor | None = None, documents=None,
                  score_mod=None) -> Tensor:
        """q (B, H, part, D), k (B, G, part, D), v (B, G, part, Dv) -> (B, H, part, Dv), by `method`.

        window ... score_mod: the attention family over global positions (`ring_attention`'s)."""
        attend = ring_attention if self.method == "ring" else ulysses_attention
        return attend(q, k, v, key_mask=key_mask, causal=causal, scale=scale, window=window, softcap=softcap,
                      alibi_slopes=alibi_slopes, sinks=sinks, documents=documents, score_mod=score_mod,
                      layout=self.layout, length=self.length, backend=backend, group=self.group, check=self.check)
