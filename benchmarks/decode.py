"""Decode benchmark: generate() with and without the KV cache as the context grows, and against transformers.

    python benchmarks/decode.py                 # the full tables (a few minutes on 2 cores)
    python benchmarks/decode.py --quick         # tiny sizes, to check the script itself
    python benchmarks/decode.py --profile       # also: where an eager decoding step spends its time
    python benchmarks/decode.py --device cuda --tables speed   # table 2 on a GPU: CUDA graphs

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
2. Tokens per second of greedy `multihead.generate`, eager and compiled
   (`compile=True`: a static cache and the decoding step compiled once with
   fullgraph=True; the compile time is reported apart), against
   transformers' `generate(do_sample=False)` with attn_implementation="sdpa",
   on the same random GPT-2 and Llama (transformers' models, saved and
   loaded into ours), same prompt (64 tokens), 64 new tokens, B=1, timed in
   turns (`multihead.timing.timeit_side_by_side`); the tokens are checked
   equal. Tokens/s = new tokens / generate's whole time (prompt included,
   on both sides). --quick compiles with backend="eager" (no code
   generation) unless --compile-backend says otherwise; with --device cuda
   the compiled step replays as a CUDA graph (mode "reduce-overhead"). The
   compile time is the first compiled call's less a later one's; inductor's
   on-disk cache shortens it in later processes.
3. What one token costs in the cache at one model size (Llama-2-7B's attention:
   32 layers, 32 heads of 128, fp16) for MHA, GQA (8 groups), MQA, and MLA with
   DeepSeek-V2's d_c = 512, d_rope = 64 (`multihead.nn.latent.cache_elements_per_token`).

On a shared CPU only ratios measured in the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import multihead as mh
from multihead.nn.cache import kv_bytes_per_token
from multihead.generate import CompileConfig, generate, stream
from multihead.models.gpt2 import GPT2, GPT2Config, load_gpt2
from multihead.models.llama import Llama, LlamaConfig, load_llama
from multihead.timing import device_name, print_table, slug, timeit_side_by_side

RESULTS = Path(__file__).resolve().parent / "results"




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


def matching_models(name: str, quick: bool, positions: int):
    """(transformers' model with sdpa attention, ours loaded from its saved folder): the same random weights."""
    import transformers

    transformers.logging.set_verbosity_error()
    common = dict(vocab_size=256 if quick else 2048, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  initializer_range=0.2,  # not the usual 0.02: a varied continuation, so the check means something
                  attn_implementation="sdpa")
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_positions=positions, n_embd=32 if quick else 256,
                                         n_layer=2 if quick else 4, n_head=4, **common)
        theirs, load = transformers.GPT2LMHeadModel(config).eval(), load_gpt2
    else:
        config = transformers.LlamaConfig(hidden_size=32 if quick else 256, intermediate_size=64 if quick else 688,
                                          num_hidden_layers=2 if quick else 4, num_attention_heads=4 if quick else 8,
                                          num_key_value_heads=2, max_position_embeddings=positions, **common)
        theirs, load = transformers.LlamaForCausalLM(config).eval(), load_llama
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = load(directory)
    return theirs, ours


def decoding_speed(name: str, quick: bool, prompt_len: int, new_tokens: int, repeats: int, backend: str,
                   device: str = "cpu"):
    """One row of table 2: eager, compiled and transformers' generate on one model, in turns."""
    theirs, ours = matching_models(name, quick, prompt_len + new_tokens)
    theirs, ours = theirs.to(device), ours.to(device)
    prompt = torch.randint(0, theirs.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    mask = torch.ones_like(prompt)
    config = CompileConfig(backend=backend)

    def run_theirs():
        with torch.no_grad():
            return theirs.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                   pad_token_id=0)

    def run_eager():
        return generate(ours, prompt, max_new_tokens=new_tokens).tokens

    def run_compiled():
        return generate(ours, prompt, max_new_tokens=new_tokens, compile=config).tokens

    def synced(fn):  # on CUDA a run ends when the GPU is done
        return fn if device == "cpu" else lambda: (fn(), torch.cuda.synchronize())

    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = run_compiled()  # the compile, and one run
    if device != "cpu":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    eager = run_eager()
    same = bool(torch.equal(eager, run_theirs()) and torch.equal(compiled, eager))
    t = timeit_side_by_side({"eager": synced(run_eager), "compiled": synced(run_compiled),
                             "transformers": synced(run_theirs)}, repeats)
    return dict(model=name, prompt=prompt_len, new_tokens=new_tokens, compile_backend=backend,
                compile_mode=config.resolved_mode(torch.device(device)),
                attn_implementation=theirs.config._attn_implementation, eager_s=t["eager"],
                compiled_s=t["compiled"], transformers_s=t["transformers"],
                compile_s=max(first_s - t["compiled"], 0.0), same_tokens=same,
                eager_vs_transformers=t["transformers"] / t["eager"],
                compiled_vs_transformers=t["transformers"] / t["compiled"],
                best_vs_transformers=t["transformers"] / min(t["eager"], t["compiled"]))


def profile_eager_step(model, prompt_len: int, steps: int) -> str:
    """torch.profiler's table of `steps` eager decoding steps (decode_step after a prefill), by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    cache = model.make_cache(batch_size=1, max_length=prompt_len + 2 * steps, static=True)
    with torch.no_grad():
        token = model(prompt, cache=cache).logits[:, -1].argmax(-1)[:, None]  # (1, 1)
        for _ in range(steps):  # warm-up
            token = model.decode_step(token, cache)[:, -1].argmax(-1)[:, None]
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                token = model.decode_step(token, cache)[:, -1].argmax(-1)[:, None]
        wall = time.perf_counter() - start
    ops = prof.key_averages()
    aten = sum(e.self_cpu_time_total for e in ops if e.key.startswith("aten::")) / 1e6
    summary = (f"{steps} steps in {wall * 1e3:.1f} ms under the profiler: aten ops' own time "
               f"{aten * 1e3:.1f} ms ({aten / wall:.0%}); the rest is Python and dispatch")
    return summary + "\n" + ops.table(sort_by="self_cpu_time_total", row_limit=15)


def cache_bytes_table():
    """Per-token cache cost at Llama-2-7B's attention size, fp16; MLA at DeepSeek-V2's latent size."""
    from multihead.nn.latent import cache_elements_per_token

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


TABLES = ("context", "speed", "cache")


def print_context(nets, growth, new_tokens: int) -> None:
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
                      f"{r['speedup']:.1f}x"] for r in growth if r["model"] == name], right=True)
    for name in nets:
        rows = [r for r in growth if r["model"] == name]
        print(f"{name}: with the cache, a token at context {rows[-1]['context']} takes "
              f"{rows[-1]['cached_vs_first_context']:.2f}x the time of one at {rows[0]['context']} (target <= 2x)")


def speed_table(args, backend: str) -> tuple[list[dict], dict]:
    """Table 2, printed: its rows, and the GPT-2 row in the fields of the earlier table (for the JSON's readers)."""
    prompt_len, generated = (16, 8) if args.quick else (64, 64)
    speed = [decoding_speed(name, args.quick, prompt_len, generated, 2 if args.quick else 7, backend, args.device)
             for name in ("gpt2", "llama")]
    print_table(f"Greedy generate, {prompt_len}-token prompt, {generated} new tokens, B=1, fp32, {args.device}: "
                f"tokens/s (prompt included) of multihead eager, compiled (backend={backend!r}, mode "
                f"{speed[0]['compile_mode']!r}) and transformers (attn_implementation='sdpa'), same random models",
                ["model", "eager tokens/s", "compiled tokens/s", "transformers tokens/s", "eager / transformers",
                 "compiled / transformers", "compile s", "same tokens"],
                [[r["model"], f"{r['new_tokens'] / r['eager_s']:.0f}", f"{r['new_tokens'] / r['compiled_s']:.0f}",
                  f"{r['new_tokens'] / r['transformers_s']:.0f}", f"{r['eager_vs_transformers']:.2f}x",
                  f"{r['compiled_vs_transformers']:.2f}x", f"{r['compile_s']:.1f}", str(r["same_tokens"])]
                 for r in speed], right=True)
    for r in speed:
        print(f"{r['model']}: the faster multihead path decodes at {r['best_vs_transformers']:.2f}x "
              f"transformers' tokens/s (target >= 1.5x)")
    gpt2 = speed[0]
    versus = dict(prompt=prompt_len, new_tokens=generated, attn_implementation=gpt2["attn_implementation"],
                  multihead_s=gpt2["eager_s"], transformers_s=gpt2["transformers_s"],
                  speedup=gpt2["eager_vs_transformers"], same_tokens=gpt2["same_tokens"])
    return speed, versus


def print_cache_bytes(settings, memory) -> None:
    print_table(f"Cache per token, {settings['layers']} layers, {settings['heads']} heads of {settings['head_dim']}, "
                f"fp16 (MLA: d_c={settings['d_c']}, d_rope={settings['d_rope']})",
                ["attention", "elements per layer", "KiB per token", "vs MHA"],
                [[r["attention"] + ("" if r["attention"] != "GQA" else f" ({r['kv_heads']} groups)"),
                  f"{r['elements_per_layer']:,}", f"{r['bytes_per_token'] / 1024:.1f}", f"{r['vs_mha']:.2%}"]
                 for r in memory], right=True)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled column (default: inductor; eager with --quick)")
    parser.add_argument("--profile", action="store_true", help="print where an eager decoding step spends its time")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where table 2 runs (cuda: the compiled step replays CUDA graphs)")
    parser.add_argument("--tables", default=",".join(TABLES),
                        help=f"comma-separated tables to run, of {','.join(TABLES)} (default: all)")
    args = parser.parse_args(argv)
    args.tables = [t for t in args.tables.split(",") if t]
    unknown = sorted(set(args.tables) - set(TABLES))
    if unknown:
        parser.error(f"--tables takes {','.join(TABLES)}, got {','.join(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import transformers

    contexts = [16, 48] if args.quick else [128, 512, 1024, 2048]
    new_tokens = 4 if args.quick else 16
    device = torch.cuda.get_device_name() if args.device == "cuda" else device_name()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"transformers {transformers.__version__}")
    results = dict(device=device, threads=torch.get_num_threads(), torch=torch.__version__,
                   transformers=transformers.__version__, python=platform.python_version(),
                   multihead=mh.__version__, date=time.strftime("%Y-%m-%d"))
    nets = models(args.quick, max(contexts) + 256)
    if "context" in args.tables:
        results["context"] = context_table(nets, contexts, new_tokens, 1 if args.quick else 3)
        print_context(nets, results["context"], new_tokens)
    if "speed" in args.tables:
        results["decoding"], results["versus_transformers"] = speed_table(
            args, args.compile_backend or ("eager" if args.quick else "inductor"))
    if args.profile:
        for name, model in nets.items():
            print(f"\nWhere an eager decoding step of {name} spends its time (decode_step, context 64):")
            print(profile_eager_step(model, 64, 50))
    if "cache" in args.tables:
        results["cache_bytes_settings"], results["cache_bytes"] = cache_bytes_table()
        print_cache_bytes(results["cache_bytes_settings"], results["cache_bytes"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-{slug(device)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
