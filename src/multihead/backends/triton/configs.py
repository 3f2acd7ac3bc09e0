"""The kernels' tiles on a GPU: which (BLOCK_M, BLOCK_N, warps, stages) each autotuner may try.

Every tile kept here compiles for sm_90a without spilling and within its
shared memory (227 KB; fp32 inputs need twice bf16's, and `tiles` drops what
no longer fits; a launch with the attention variants drops VARIANT_SPILLS
too): `benchmarks/triton_ptxas.py` compiles each one with ptxas and prints
registers, spills and shared memory, and tests/test_triton_compile.py runs it. Tiles are listed per padded head dim
(the power of two D and Dv are padded to, the larger of the two): wider
heads need smaller tiles to keep q, k, v and the accumulators on chip.

MULTIHEAD_TRITON_CONFIGS=few keeps the first tile of each list (a short GPU
check compiles little). Nothing here imports triton.

The autotuners' keys hold a power-of-two bucket of T and S (`length_bucket`),
so the tile timed for a decode step (T = 1) is not reused for a 16k prefill.
"""

from __future__ import annotations

import os

Tile = tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

# padded head dim -> tiles, the preferred first. Every one compiled for sm_90a (bf16, causal) with
# ptxas 13.4 (Triton 3.9) and 12.9 without a spill (benchmarks/triton_ptxas.py --candidates prints
# them and the ones dropped: forward 128x64/4w/3s at D=128 and every 64x64 tile at D=256 spill; at
# D=128 dk/dv spill in every tile of more than 16 rows except 32x64/8w/3s; at D=256 only 8-warp
# dk/dv tiles of 16-32 keys compile clean).
TILES: dict[str, dict[int, list[Tile]]] = {
    "forward": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)],
        256: [(64, 32, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
    },
    # dk/dv hold a key tile on chip and stream query blocks past it: BLOCK_M is the streamed side
    "dkdv": {
        64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3)],
        128: [(16, 128, 8, 3), (32, 64, 8, 3), (16, 128, 8, 2), (16, 64, 8, 3)],
        256: [(16, 32, 8, 2), (32, 32, 8, 1), (16, 32, 8, 1)],
    },
    # dq holds a query block and streams key tiles: BLOCK_N is the streamed side
    "dq": {
        64: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
        128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
        256: [(128, 32, 8, 2), (128, 32, 8, 3), (32, 32, 4, 2)],
    },
}
SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90

# The tiles that spill once the attention variants add their work per score (the window's and the documents'
# masks, ALiBi's bias, the softcap's tanh), dropped for those launches only: compiled for sm_90a (bf16, causal,
# ptxas 13.4) with documents alone and with every variant at once, int64 document ids, every tile of TILES
# (the decode tiles spill in neither). A plain launch keeps every tile of TILES (its code is unchanged);
# sinks alone add nothing per score.
VARIANT_SPILLS: dict[str, dict[int, list[Tile]]] = {
    "forward": {64: [(128, 64, 4, 3), (128, 128, 8, 3)], 128: [(128, 128, 8, 2), (128, 128, 8, 3)],
                256: [(64, 32, 4, 2)]},
    "dkdv": {64: [(64, 128, 8, 3)], 128: [(32, 64, 8, 3), (16, 128, 8, 2)]},
    "dq": {256: [(128, 32, 8, 2)]},
}

# The decode kernel's tile is fixed, not autotuned: a split-KV step must stay capturable in a
# CUDA graph, and its shape (few rows, a long key range) leaves one sensible choice per width.
# BLOCK_M is chosen from the packed rows (R * T); this is (BLOCK_N, warps, stages).
DECODE: dict[int, Tile] = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)}
DECODE_MAX_ROWS = 64  # packed query rows per program; more rows split into row blocks


def width(block_d: int) -> int:
    """The table a padded head dim reads: 64 (up to 64), 128, or 256."""
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def few() -> bool:
    """MULTIHEAD_TRITON_CONFIGS=few: one tile per kernel and width."""
    return os.environ.get("MULTIHEAD_TRITON_CONFIGS") == "few"


def shared_bytes(kernel: str, tile: Tile, block_d: int, block_dv: int, itemsize: int) -> int:
    """Shared memory a tile needs: the pipelined operand tiles plus the resident ones. Exact for most
    tiles Triton 3.9 builds for bf16 at sm_90, at most 2 KB under for the others (benchmarks/triton_ptxas.py
    prints both); it prunes fp32 tiles, which need twice the bytes."""
    bm, bn, _, stages = tile
    row = block_d + block_dv  # one key (or query) row of both operands
    streamed, resident = {"forward": (bn * row, bm * block_d), "dq": (bn * row, bm * row),
                          "dkdv": (bm * row, bn * row)}[kernel]
    return (max(stages, 2) * streamed + resident) * itemsize  # one stage still double-buffers at D = 256


def tiles(kernel: str, block_d: int, only_first: bool | None = None, itemsize: int = 2,
          block_dv: int | None = None, variants: bool = False) -> list[Tile]:
    """The tiles `kernel` ("forward", "dkdv", "dq") may try at padded head dims block_d (and block_dv,
    default block_d) for inputs of `itemsize` bytes: the table's, less those past sm_90's shared memory
    (fp32 doubles it) and, with variants that work on every score, less VARIANT_SPILLS; the first one
    alone with only_first (default: MULTIHEAD_TRITON_CONFIGS=few)."""
    block_dv = block_d if block_dv is None else block_dv
    table = TILES[kernel][width(max(block_d, block_dv))]
    spills = VARIANT_SPILLS[kernel].get(width(max(block_d, block_dv)), []) if variants else []
    kept = [t for t in table if shared_bytes(kernel, t, block_d, block_dv, itemsize) <= SHARED_LIMIT
            and t not in spills]
    kept = kept or table[-1:]  # the smallest: let the compiler say
    return kept[:1] if (few() if only_first is None else only_first) else kept


PER_SCORE_FLAGS = ("HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "HAS_ALIBI", "HAS_DOCS", "HAS_POS")  # work on every score


def has_variants(named_args: dict) -> bool:
    """Whether a launch's constexprs switch on a variant that works on every score (a pruner's question)."""
    return any(named_args.get(flag, False) for flag in PER_SCORE_FLAGS)


def all_tiles(kernel: str) -> list[Tile]:
    """Every tile of a kernel at any width (the autotuner's list; `tiles` picks per call)."""
    return list(dict.fromkeys(t for per_width in TILES[kernel].values() for t in per_width))


def length_bucket(n: int) -> int:
    """The autotune key's bucket for a length: the next power of two, at least 16 (so always divisible by 16)."""
    return max(16, 1 << max(0, n - 1).bit_length())


def decode_tile(block_d: int) -> Tile:
    """(BLOCK_N, warps, stages) of the decode kernel at padded head dim block_d."""
    return DECODE[width(block_d)]


__all__ = ["DECODE", "DECODE_MAX_ROWS", "PER_SCORE_FLAGS", "SHARED_LIMIT", "TILES", "VARIANT_SPILLS", "all_tiles",
           "decode_tile", "few", "has_variants", "length_bucket", "shared_bytes", "tiles", "width"]
