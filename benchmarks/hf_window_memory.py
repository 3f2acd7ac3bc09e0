"""A transformers sliding window on attn_implementation="multihead": as a window, against the dense mask it was.

    python benchmarks/hf_window_memory.py            # T = 8192, window 256 (several minutes on 2 cores)
    python benchmarks/hf_window_memory.py --quick    # T = 512, window 32: checks the script itself
    python benchmarks/hf_window_memory.py --padded   # B = 2, the second sequence left-padded by T / 4

One Mistral-style layer (C=256, 4 query / 2 key-value heads of 64, MLP 512, sliding_window=W, vocabulary
256), B=1, fp32, no padding, no cache; with --padded, B=2 and the second sequence's first T / 4 tokens are
padding (its attention_mask 0 there), which multihead takes as a (B, 1, 1, S) key mask beside the window.
Candidates:

- "multihead, window": what the hook does now: transformers' sliding-window mask reaches multihead as
  `causal=True, window=(W - 1, 0)` (`multihead.hf.mask.StructuredMask`), nothing T x S is made;
- "multihead, dense mask": the same model with the mask written out as the mask function wrote it before
  (transformers' sdpa_mask: a (B, 1, T, S) bool tensor), which multihead's backend then reads;
- "transformers sdpa": attn_implementation="sdpa", for scale.

Steps: "inference" (a forward without gradient) and "training" (forward, loss, backward). Three measures:

- peak MiB: the CPU allocator's peak during the step above what it held before (torch's memory profiler,
  benchmarks/cpu.py's `peak_extra_bytes`): every tensor torch allocates, the masks included;
- maxrss MiB: the same step alone in a fresh process (`--child`, after a warm-up step at T=64): its peak
  resident memory (the kernel's VmHWM, reset just before the step through /proc/self/clear_refs) above
  the resident memory just before it, allocator and all;
- mask MiB: the bytes of the mask transformers hands each attention call (a StructuredMask holds none)
  and of the mask multihead's backend is given (None with the window).

Time: median of a few repeats, the candidates taking turns; the largest logit difference against the
first candidate, over the real tokens' positions, shows that the three compute the same. Writes
benchmarks/results/hf-window-memory-<device>[-padded].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import multihead as mh
import multihead.hf  # noqa: F401  (registers "multihead")
from multihead.integrations.hf import attention as hook
from multihead.integrations.hf import mask as mask_function
from multihead.tools.timing import device_name, print_table, slug, timeit_side_by_side

from cpu import peak_extra_bytes  # benchmarks/cpu.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = ("multihead, window", "multihead, dense mask", "transformers sdpa")
STEPS = ("inference", "training")
MIB = 2 ** 20


def model_for(candidate: str, T: int, window: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                                        sliding_window=window, attention_dropout=0.0, pad_token_id=0)
    model = transformers.MistralForCausalLM(config)
    model.set_attn_implementation("sdpa" if candidate == "transformers sdpa" else "multihead")
    return model


@contextlib.contextmanager
def mask_written_out(candidate: str):
    """For "multihead, dense mask": the mask function finds no structure, so it writes the mask out."""
    if candidate != "multihead, dense mask":
        yield
        return
    real = mask_function.structure
    mask_function.structure = lambda *args, **kwargs: None
    try:
        yield
    finally:
        mask_function.structure = real


def batch_of(B: int, T: int, padded: bool) -> dict:
    """input_ids (B, T) and attention_mask (B, T): with padded, the last sequence's first T / 4 are padding."""
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
    real = torch.ones(B, T, dtype=torch.long)
    if padded:
        real[-1, :T // 4] = 0
        ids[-1, :T // 4] = 0  # pad_token_id
    return dict(input_ids=ids, attention_mask=real)


def step_fn(model, batch: dict, step: str):
    """One step: a forward without gradient (the logits at the real tokens), or forward + loss + backward."""
    real = batch["attention_mask"].bool()

    def inference():
        with torch.no_grad():
            return model(**batch, use_cache=False).logits[real]  # (B, T, V) -> (real tokens, V)

    def training():
        labels = batch["input_ids"].masked_fill(~real, -100)  # no loss at the padding
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    model.train(step == "training")
    return inference if step == "inference" else training


def _bytes(mask) -> int:
    if mask is None or isinstance(mask, mask_function.StructuredMask):
        return 0
    return mask.numel() * mask.element_size()


@contextlib.contextmanager
def recording_masks(seen: dict):
    """Record the bytes of the mask handed to the attention calls and of the one multihead's call carries."""
    impls = ("multihead", "sdpa")
    real_masks = {name: ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[name] for name in impls}
    real_translate = hook.translate

    def mask_of(name):
        def record(*args, **kwargs):
            made = real_masks[name](*args, **kwargs)
            seen["handed"] = max(seen.get("handed", 0), _bytes(made))
            return made
        return record

    def translate(*args, **kwargs):
        call = real_translate(*args, **kwargs)
        seen["backend"] = max(seen.get("backend", 0), _bytes(call.attn_mask))
        return call

    for name in impls:
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[name] = mask_of(name)
    hook.translate = translate
    try:
        yield seen
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.update(real_masks)
        hook.translate = real_translate


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Set the kernel's resident high-water mark (VmHWM) to the current RSS; False where Linux does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # 5: reset the peak RSS (proc(5), Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024  # kB
    # ru_maxrss (KiB on Linux) is the whole process's peak, and after fork + exec also the parent's at the fork
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(candidate: str, step: str, T: int, window: int, B: int) -> None:
    """`--child`: run one step in this fresh process and print its peak RSS above the RSS before it (JSON).

    A warm-up step at T=64 first, so that one-time set-up (kernels, thread pools) is not counted."""
    torch.set_num_threads(1)
    with mask_written_out(candidate):
        step_fn(model_for(candidate, 64, min(window, 16)), batch_of(B, 64, B > 1), step)()
    model = model_for(candidate, T, window)
    fn = step_fn(model, batch_of(B, T, B > 1), step)
    before = _rss_bytes()
    reset = _reset_peak_rss()
    with mask_written_out(candidate):
        fn()
    print(json.dumps(dict(maxrss_extra_bytes=max(_peak_rss_bytes(reset) - before, 0), high_water_mark=reset)))


def maxrss_in_a_fresh_process(candidate: str, step: str, T: int, window: int, B: int) -> int:
    done = subprocess.run([sys.executable, __file__, "--child", candidate, step, str(T), str(window), str(B)],
                          capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["maxrss_extra_bytes"]


def measure(step: str, T: int, window: int, repeats: int, B: int) -> list[dict]:
    """Every candidate's time, peak and mask bytes for one step; logits (or loss) compared with the first."""
    batch = batch_of(B, T, B > 1)
    fns, rows = {}, []
    for candidate in CANDIDATES:
        fn = step_fn(model_for(candidate, T, window), batch, step)
        fns[candidate] = (lambda fn=fn, candidate=candidate: _in(candidate, fn))
    results = {candidate: fns[candidate]() for candidate in CANDIDATES}
    times = timeit_side_by_side(fns, repeats)
    for candidate in CANDIDATES:
        seen: dict = {}
        with recording_masks(seen):
            peak = peak_extra_bytes(fns[candidate])
        rows.append(dict(step=step, B=B, T=T, window=window, candidate=candidate, seconds=times[candidate],
                         peak_extra_bytes=peak,
                         maxrss_extra_bytes=maxrss_in_a_fresh_process(candidate, step, T, window, B),
                         mask_handed_bytes=seen.get("handed", 0), mask_to_backend_bytes=seen.get("backend", 0),
                         max_diff=(results[candidate].double() - results[CANDIDATES[0]].double()).abs().max().item()))
    return rows


def _in(candidate: str, fn):
    with mask_written_out(candidate):
        return fn()


def _table(rows: list[dict]) -> list[list[str]]:
    first = {r["step"]: r for r in rows if r["candidate"] == CANDIDATES[0]}
    return [[r["step"], r["candidate"], f"{r['peak_extra_bytes'] / MIB:.1f}", f"{r['maxrss_extra_bytes'] / MIB:.1f}",
             f"{r['mask_handed_bytes'] / MIB:.1f}", f"{r['mask_to_backend_bytes'] / MIB:.1f}",
             f"{r['seconds']:.2f}", f"{r['seconds'] / first[r['step']]['seconds']:.2f}", f"{r['max_diff']:.1e}"]
            for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 512, window 32: check the script")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    parser.add_argument("--padded", action="store_true", help="B = 2, the second sequence left-padded by T / 4")
    parser.add_argument("--child", nargs=5, metavar=("CANDIDATE", "STEP", "T", "WINDOW", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], *(int(x) for x in args.child[2:]))
        return 0
    T, window, repeats = (512, 32, 2) if args.quick else (8192, 256, 3)
    B = 2 if args.padded else 1
    torch.set_num_threads(1)  # one core per process: the other is the fresh process's, or another job's
    rows = [row for step in STEPS for row in measure(step, T, window, repeats, B)]
    device = device_name()
    padding = ", the second left-padded by T / 4" if args.padded else ""
    print_table(f"Mistral-style layer, T={T}, sliding window {window}, B={B}{padding}, fp32 ({device})",
                ["step", "candidate", "peak MiB", "maxrss MiB", "mask handed MiB", "mask to backend MiB", "s",
                 "x window time", "max |diff|"], _table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hf-window-memory-{slug(device)}{'-padded' if args.padded else ''}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(
        device=device, threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(), multihead=mh.__version__,
        date=time.strftime("%Y-%m-%d"), rows=rows), indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
