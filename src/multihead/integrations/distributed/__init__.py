"""Context parallelism: exact attention over a sequence split across processes, on torch.distributed.

    import torch.distributed as dist
    from multihead.distributed import shard_sequence, ring_attention, gather_sequence

    dist.init_process_group("gloo")                                 # or "nccl"; torchrun sets the rest
    q_part, k_part, v_part = (shard_sequence(x, dim=2, layout="zigzag") for x in (q, k, v))
    out_part = ring_attention(q_part, k_part, v_part, causal=True, layout="zigzag", length=T)
    out = gather_sequence(out_part, dim=2, layout="zigzag", length=T)   # (B, H, T, Dv) on every rank

- layout.py: how a sequence is cut into parts (zigzag, contiguous) and put back;
- ring.py: `ring_attention`, key/value blocks passed round the ring, merged by the logsumexp;
- ulysses.py: `ulysses_attention`, all-to-all from sequence parts to head groups and back;
- context.py: `ContextParallel`, the same for `MultiHeadAttention` and the models, with
  positions (RoPE, learned) taken from the global sequence;
- call.py and group.py: one check of every argument on every rank, and the ranks' agreement
  before anything is sent (a rank that refuses makes every rank raise, naming it), once per
  new signature of a group, or on every call with check=True; a part records how it was cut
  (layout.py), and a call given another layout or length refuses it;
- variants.py: the attention family (window, softcap, ALiBi, sinks, documents, score_mod) across
  ranks: global positions in each ring step, the sinks once per row at the merge, the ring steps
  a window or documents rule out skipped (`ring.ring_steps` counts them);
- local.py and shipping.py: `run_local`, a function on N processes of this machine in one gloo
  group (tests, notebooks, `python -`: a function the processes cannot import goes by its code).

When to use which (docs/distributed.md has the numbers): the ring works for any
number of heads, GQA included, and holds only T/N of the sequence per rank;
its k/v hops hide behind the compute once the parts are long enough. Ulysses
moves less data in fewer, larger messages but needs H and G divisible by N
and holds the whole sequence for H/N heads.
"""

from .context import ContextParallel
from .layout import LAYOUTS, Sharding, gather_sequence, shard_sequence
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["LAYOUTS", "ContextParallel", "Sharding", "gather_sequence", "ring_attention", "shard_sequence",
           "ulysses_attention"]
