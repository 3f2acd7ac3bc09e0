"""Hugging Face models through attn_implementation="multihead": speed, and what the weights cost.

    python benchmarks/hf.py            # the full tables (several minutes on 2 cores)
    python benchmarks/hf.py --quick    # tiny sizes, to check the script itself

Two tables, printed and written to benchmarks/results/hf-<device>.json with
the device, the versions and the raw numbers:

1. MiniLM (all-MiniLM-L6-v2, the packaged weights), B=1 at T in {128, 512},
   and B=8 sentences right-padded to T=128 (lengths 32 to 128):
   the forward through "multihead" against "sdpa" (no weights), and with
   output_attentions=True against "eager" (every layer's weights), with the
   largest difference between the two sets of weights.
2. The cost of the weights at T in {512, 2048} on two random models:
   MiniLM-sized (BERT, 6 layers, 12 heads of 32, C=384, max positions 2048)
   and Llama-sized (Llama-3.2-1B's layer: C=2048, 32 query / 8 key-value
   heads of 64, MLP 8192; 2 layers so that T=2048 fits): "sdpa" without
   weights; "eager" with every weight; "multihead" with every weight, from
   its one pass (the default, `weights_from="auto"`) and read off the
   kernel's logsumexp (`weights_from="kernel"`); and "multihead" with the
   weights of one head of the last layer for the last query only
   (`multihead.hf.options(layers=[L-1], heads=[0], rows=-1)`). Time and the
   forward's peak extra memory (the CPU allocator's peak during the call
   beyond what it held before, from torch's profiler; the weights returned
   are part of it).

Eval mode, fp32, no grad. Candidates of a row take turns (A B C A B C ...),
median of the repeats: on a shared CPU only the ratios of one run mean
anything.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import multihead as mh
import multihead.hf
from multihead.timing import device_name, timeit_side_by_side

from cpu import peak_extra_bytes, print_table, slug  # benchmarks/cpu.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"


def _with(model, impl: str):
    other = copy.deepcopy(model)
    other.set_attn_implementation(impl)
    return other


def minilm(quick: bool):
    """The packaged all-MiniLM-L6-v2 (eval); with --quick a 2-layer BERT of its width, random."""
    if quick:
        torch.manual_seed(0)
        return transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=128)).eval()
    from multihead.models import minilm_directory

    return transformers.BertModel.from_pretrained(str(minilm_directory())).eval()


def random_models(quick: bool) -> dict:
    """name -> random eval model, the sizes of the module docstring (tiny with --quick)."""
    torch.manual_seed(0)
    if quick:
        bert = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=128)
        llama = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=1000)
    else:
        bert = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                       intermediate_size=1536, max_position_embeddings=2048)
        llama = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=2, num_attention_heads=32,
                                         num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                                         vocab_size=1000, max_position_embeddings=4096)
    return {"MiniLM-sized BERT": transformers.BertModel(bert).eval(),
            "Llama-sized (2 layers)": transformers.LlamaModel(llama).eval()}


def _inputs(T: int, B: int = 1):
    """B sequences of T tokens; with B > 1 they are right-padded to lengths spread from T / 4 to T."""
    ids = torch.randint(1, 1000, (B, T), generator=torch.Generator().manual_seed(T))  # (B, T), in every vocabulary
    lengths = torch.linspace(T // 4, T, B).long() if B > 1 else torch.tensor([T])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    return dict(input_ids=ids * mask, attention_mask=mask)


def _run(model, batch, weights: bool, **options):
    def call():
        with multihead.hf.options(**options) if options else contextlib.nullcontext():
            return model(**batch, output_attentions=True) if weights else model(**batch)
    return call


def speed_rows(quick: bool) -> list[dict]:
    """Table 1: MiniLM through multihead against sdpa, and with weights against eager."""
    base = minilm(quick)
    models = {impl: _with(base, impl) for impl in ("sdpa", "eager", "multihead")}
    rows = []
    for B, T in ([(1, 16), (1, 32), (4, 32)] if quick else [(1, 128), (1, 512), (8, 128)]):
        batch = _inputs(T, B)
        fns = {"sdpa": _run(models["sdpa"], batch, False), "multihead": _run(models["multihead"], batch, False),
               "eager_weights": _run(models["eager"], batch, True),
               "multihead_weights": _run(models["multihead"], batch, True)}
        with torch.no_grad():
            t = timeit_side_by_side(fns, 3 if quick else 40)
            rows_real = batch["attention_mask"].bool()[:, None, :, None]  # compared where both are defined
            diff = max(((a - b) * rows_real).abs().max().item() for a, b in zip(
                fns["eager_weights"]().attentions, fns["multihead_weights"]().attentions))
        rows.append(dict(B=B, T=T, padded=B > 1, sdpa_s=t["sdpa"], multihead_s=t["multihead"],
                         eager_weights_s=t["eager_weights"],
                         multihead_weights_s=t["multihead_weights"], multihead_over_sdpa=t["multihead"] / t["sdpa"],
                         multihead_weights_over_eager=t["multihead_weights"] / t["eager_weights"],
                         max_weight_diff=diff))
    return rows


def _cost_candidates(model, batch) -> dict:
    last = model.config.num_hidden_layers - 1
    return {"sdpa (no weights)": _run(_with(model, "sdpa"), batch, False),
            "eager, every weight": _run(_with(model, "eager"), batch, True),
            "multihead, every weight (one pass)": _run(_with(model, "multihead"), batch, True),
            "multihead, every weight (kernel)": _run(_with(model, "multihead"), batch, True, weights_from="kernel"),
            "multihead, 1 head of the last layer, last query": _run(
                _with(model, "multihead"), batch, True, layers=[last], heads=[0], rows=-1)}


def cost_rows(quick: bool) -> list[dict]:
    """Table 2: time and peak memory of the weights, per model and length."""
    rows = []
    for name, model in random_models(quick).items():
        for T in ([32, 64] if quick else [512, 2048]):
            batch = _inputs(T)
            fns = _cost_candidates(model, batch)
            with torch.no_grad():
                times = timeit_side_by_side(fns, 2 if quick else 3)
                peaks = {label: peak_extra_bytes(fn) for label, fn in fns.items()}
            for label in fns:
                rows.append(dict(model=name, T=T, candidate=label, seconds=times[label],
                                 peak_extra_bytes=peaks[label],
                                 vs_eager_time=times[label] / times["eager, every weight"],
                                 vs_eager_memory=peaks[label] / max(peaks["eager, every weight"], 1)))
    return rows


def _print(speed, cost) -> None:
    print_table("MiniLM: attn_implementation='multihead' against 'sdpa' (no weights) and 'eager' (every weight)",
                ["B", "T", "sdpa ms", "multihead ms", "multihead / sdpa", "eager+w ms", "multihead+w ms",
                 "multihead+w / eager+w", "max |w diff|"],
                [[str(r["B"]) + (" padded" if r["padded"] else ""), str(r["T"]), f"{r['sdpa_s'] * 1e3:.1f}",
                  f"{r['multihead_s'] * 1e3:.1f}",
                  f"{r['multihead_over_sdpa']:.2f}", f"{r['eager_weights_s'] * 1e3:.1f}",
                  f"{r['multihead_weights_s'] * 1e3:.1f}", f"{r['multihead_weights_over_eager']:.2f}",
                  f"{r['max_weight_diff']:.1e}"] for r in speed])
    print_table("What the weights cost (time and peak extra memory of one forward; ratios to eager's)",
                ["model", "T", "candidate", "ms", "x eager time", "peak MiB", "x eager memory"],
                [[r["model"], str(r["T"]), r["candidate"], f"{r['seconds'] * 1e3:.0f}", f"{r['vs_eager_time']:.2f}",
                  f"{r['peak_extra_bytes'] / 2**20:.1f}", f"{r['vs_eager_memory']:.3f}"] for r in cost])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    speed, cost = speed_rows(args.quick), cost_rows(args.quick)
    _print(speed, cost)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hf-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(
        device=device, threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(), multihead=mh.__version__,
        date=time.strftime("%Y-%m-%d"), minilm=speed, weights_cost=cost), indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
