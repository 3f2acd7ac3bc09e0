"""Decode benchmark: generate() with and without the KV cache as the context grows, and against transformers.

    python benchmarks/decode.py                 # the full tables (a few minutes on 2 cores)
    python benchmarks/decode.py --quick         # tiny sizes, to check the script itself

Three tables, each printed and written to benchmarks/results/decode-<device>.json
with the device, the versions and the raw times:

1. Time per generated token of `multihead.generate` (greedy, B=1) with the
   KV cache and without it (every step recomputes the whole sequence), after
   prompts of 128 to 2048 tokens, for a small random GPT-2 (C=256, 4 layers,
   4 heads) and a small random Llama-style model (C=256, 4 layers, 8 query
   heads, 2 key/value heads). Each step is timed as `multihead.generate.stream`
   yields it: the first step is the prompt's forward (prefill), the median of
   the others (over all repeats) is the time per token. Runs with and without
   the cache take turns.
2. Greedy generate of our GPT-2 against transformers' `generate(do_sample=False)`
   on the same random GPT2LMHeadModel (its default attention), same prompt,
   same number of tokens, timed in turns (`multihead.timing.timeit_side_by_side`);
   the tokens are checked equal.
3. What one token costs in the cache at one model size (Llama-2-7B's attention:
   32 layers, 32 heads of 128, fp16) for MHA, GQA (8 groups), MQA, and MLA with
   DeepSeek-V2's d_c = 512, d_rope = 64 (`multihead.latent.cache_elements_per_token`).

On a shared CPU only ratios measured in the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

import multihead as mh
from multihead.cache import kv_bytes_per_token
from multihead.generate import generate, stream
from multihead.models.gpt2 import GPT2, GPT2Config, load_gpt2
from multihead.models.llama import Llama, LlamaConfig
from multihead.timing import device_name, timeit_side_by_side

RESULTS = Path(__file__).resolve().parent / "results"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def models(quick: bool, max_context: int):
    """Our two small random decoders (no weights loaded: speed does not depend on the values)."""
    if quick:
        gpt2 = GPT2Config(vocab_size=256, max_positions=max_context, d_model=32, num_layers=2, num_heads=4)
        llama = LlamaConfig(vocab_size=256, max_positions=max_context, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, d_mlp=64)
    else:
        gpt2 = GPT2Config(vocab_size=2048, max_positions=max_context, d_model=256, num_layers=4, num_heads=4)
        llama = LlamaConfig(vocab_size=2048, max_positions=max_context, d_model=256, num_layers=4, num_heads=8,
                            num_kv_heads=2, d_mlp=688)
    torch.manual_seed(0)
    return {"gpt2": GPT2(gpt2).eval(), "llama": Llama(llama).eval()}


def step_times(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of every later step) of one greedy stream."""
    stamps = [time.perf_counter()]
    for _ in stream(model, prompt, max_new_tokens=new_tokens, use_cache=use_cache):
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return steps[0], steps[1:]


def context_table(nets, contexts, new_tokens, repeats):
    rows = []
    for name, model in nets.items():
        vocab = model.config.vocab_size
        step_times(model, torch.randint(0, vocab, (1, contexts[0])), 3, True)  # warm-up
        for context in contexts:
            prompt = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(context))
            cached, uncached = [], []
            for _ in range(repeats):  # in turns, so a slow spell hits both
                cached.append(step_times(model, prompt, new_tokens, True))
                uncached.append(step_times(model, prompt, new_tokens, False))
            # the median over every step of every run: a slow spell of a shared CPU moves it little
            rows.append(dict(
                model=name, context=context, new_tokens=new_tokens,
                prefill_s=statistics.median(c[0] for c in cached),
                cached_s_per_token=statistics.median(t for c in cached for t in c[1]),
                uncached_s_per_token=statistics.median(t for u in uncached for t in u[1]),
            ))
    for name in nets:
        base = next(r for r in rows if r["model"] == name)["cached_s_per_token"]
        for r in rows:
            if r["model"] == name:
                r["cached_vs_first_context"] = r["cached_s_per_token"] / base
                r["speedup"] = r["uncached_s_per_token"] / r["cached_s_per_token"]
    return rows


def versus_transformers(quick: bool, prompt_len: int, new_tokens: int, repeats: int):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=256 if quick else 2048, n_positions=prompt_len + new_tokens, n_embd=32 if quick else 256,
        n_layer=2 if quick else 4, n_head=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=0.2,  # larger than GPT-2's 0.02: a varied continuation, so the token check means something
    )
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = load_gpt2(directory)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)

    def run_theirs():
        with torch.no_grad():
            return theirs.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                   pad_token_id=0)

    def run_ours():
        return generate(ours, prompt, max_new_tokens=new_tokens).tokens

    same = bool(torch.equal(run_ours(), run_theirs()))
    t = timeit_side_by_side({"multihead": run_ours, "transformers": run_theirs}, repeats)
    return dict(prompt=prompt_len, new_tokens=new_tokens, attn_implementation=theirs.config._attn_implementation,
                multihead_s=t["multihead"], transformers_s=t["transformers"],
                speedup=t["transformers"] / t["multihead"], same_tokens=same)


def cache_bytes_table():
    """Per-token cache cost at Llama-2-7B's attention size, fp16; MLA at DeepSeek-V2's latent size."""
    from multihead.latent import cache_elements_per_token

    layers, heads, head_dim, groups, d_c, d_rope, dtype = 32, 32, 128, 8, 512, 64, torch.float16
    rows = []
    for name, kv_heads in (("MHA", heads), ("GQA", groups), ("MQA", 1)):
        total = kv_bytes_per_token(layers, kv_heads, head_dim, dtype=dtype)
        rows.append(dict(attention=name, kv_heads=kv_heads, elements_per_layer=2 * kv_heads * head_dim,
                         bytes_per_token=total))
    mla = cache_elements_per_token("mla", kv_latent_dim=d_c, rope_dim=d_rope)
    rows.append(dict(attention="MLA", kv_heads=None, elements_per_layer=mla,
                     bytes_per_token=layers * mla * dtype.itemsize))
    for r in rows:
        r["vs_mha"] = r["bytes_per_token"] / rows[0]["bytes_per_token"]
    settings = dict(layers=layers, heads=heads, head_dim=head_dim, gqa_groups=groups, d_c=d_c, d_rope=d_rope,
                    dtype=str(dtype))
    return settings, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)
    import transformers

    contexts = [16, 48] if args.quick else [128, 512, 1024, 2048]
    new_tokens = 4 if args.quick else 16
    repeats = 1 if args.quick else 3
    device = device_name()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"transformers {transformers.__version__}")

    nets = models(args.quick, max(contexts) + 256)
    growth = context_table(nets, contexts, new_tokens, repeats)
    for name, model in nets.items():
        c = model.config
        kv = getattr(c, "num_kv_heads", c.num_heads)
        print_table(f"{name} (C={c.d_model}, {c.num_layers} layers, H={c.num_heads}, G={kv}, fp32, B=1): "
                    f"greedy generate, {new_tokens} new tokens after the context",
                    ["context", "prefill ms", "cached ms/token", "cached tokens/s", "x at first context",
                     "uncached ms/token", "uncached tokens/s", "cache speed-up"],
                    [[str(r["context"]), f"{r['prefill_s'] * 1e3:.1f}", f"{r['cached_s_per_token'] * 1e3:.2f}",
                      f"{1 / r['cached_s_per_token']:.0f}", f"{r['cached_vs_first_context']:.2f}",
                      f"{r['uncached_s_per_token'] * 1e3:.1f}", f"{1 / r['uncached_s_per_token']:.1f}",
                      f"{r['speedup']:.1f}x"] for r in growth if r["model"] == name])

    for name in nets:
        rows = [r for r in growth if r["model"] == name]
        print(f"{name}: with the cache, a token at context {rows[-1]['context']} takes "
              f"{rows[-1]['cached_vs_first_context']:.2f}x the time of one at {rows[0]['context']} (target <= 2x)")

    versus = versus_transformers(args.quick, 16 if args.quick else 64, 8 if args.quick else 64,
                                 2 if args.quick else 7)
    print_table(f"Greedy generate on the same random GPT-2 ({versus['prompt']}-token prompt, "
                f"{versus['new_tokens']} new tokens, B=1): multihead vs transformers "
                f"(attn_implementation={versus['attn_implementation']!r})",
                ["multihead ms", "transformers ms", "multihead tokens/s", "transformers tokens/s",
                 "transformers / multihead", "same tokens"],
                [[f"{versus['multihead_s'] * 1e3:.1f}", f"{versus['transformers_s'] * 1e3:.1f}",
                  f"{versus['new_tokens'] / versus['multihead_s']:.0f}",
                  f"{versus['new_tokens'] / versus['transformers_s']:.0f}", f"{versus['speedup']:.2f}x",
                  str(versus["same_tokens"])]])

    settings, memory = cache_bytes_table()
    print_table(f"Cache per token, {settings['layers']} layers, {settings['heads']} heads of {settings['head_dim']}, "
                f"fp16 (MLA: d_c={settings['d_c']}, d_rope={settings['d_rope']})",
                ["attention", "elements per layer", "KiB per token", "vs MHA"],
                [[r["attention"] + ("" if r["attention"] != "GQA" else f" ({r['kv_heads']} groups)"),
                  f"{r['elements_per_layer']:,}", f"{r['bytes_per_token'] / 1024:.1f}", f"{r['vs_mha']:.2%}"]
                 for r in memory])

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(
        device=device, threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(), multihead=mh.__version__,
        date=time.strftime("%Y-%m-%d"), context=growth, versus_transformers=versus,
        cache_bytes_settings=settings, cache_bytes=memory,
    ), indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
