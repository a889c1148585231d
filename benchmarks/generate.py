"""End-to-end decode speed and memory on a GPU: fp16 transformers cache (SDPA) vs kvcompile recipes.

For a model (a zoo model, or random weights with the shape of Llama-3-8B / Qwen2.5-7B built from a config, so nothing
is downloaded): prefill P tokens, then decode N tokens at batch B, with

* ``fp16-static``: transformers' StaticCache + SDPA (preallocated, the stronger fp16 baseline),
* ``fp16-dynamic``: transformers' default DynamicCache + SDPA,
* kvcompile recipes: nsep-int4, mixed-nsep, mixed-nsep-2bit, kivi-int4 (plans built by the real passes; on a
  random-weight model the profile runs on random token windows, which fixes the byte mix the allocator picks).

``--graphs`` decodes through :class:`kvcompile.runtime.graph.DecodeGraph` (each step captured once as a CUDA graph
and replayed) for the fp16 StaticCache and the kvcompile caches alike; without it every step is eager PyTorch, which
on a fast GPU is bound by the host's kernel launches for both sides. ``--profile-step`` splits a step's GPU time
into the decode-attention kernels, kvcompile's other work (cache writes, flushes, head-group gathers) and the model.

Reports decode tokens/s, time per output token (median step), peak GPU memory, KV bytes held, and the largest batch
whose KV cache at the same context fits a memory cap (from the measured bytes per token and the measured fixed
memory; ``--verify-max-batch`` also allocates it for real). The prefill runs at batch 1 and the cache is repeated
across the batch (decode cost does not depend on the sequences being different), which keeps the run short.

Usage (on the GPU machine)::

    python benchmarks/generate.py --model llama3-8b-shape --prefill 32768 --decode 64 --batch 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b-shape": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                            rope_theta=500000.0, max_position_embeddings=131072),
    "qwen2.5-7b-shape": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                             rope_theta=1000000.0, max_position_embeddings=131072),
}


def build_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in SHAPES:
        spec = dict(SHAPES[name])
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        cfg._attn_implementation = "sdpa"
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        # small random weights keep activations finite over a long context
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
        return model.eval()
    from kvcompile.models import load_model

    model, _ = load_model(name, device="cuda", dtype=dtype)
    return model


def make_plan(model: torch.nn.Module, recipe: str, calib_ids: torch.Tensor) -> tuple[Any, Any]:
    """Run the recipe's passes on ``model`` with token windows ``calib_ids`` (no tokenizer/text needed)."""
    from kvcompile.pipeline import CompileContext, load_recipe, run_recipe

    rec = load_recipe(recipe)
    ctx = CompileContext(model_ref="<in-memory>", model=model, calib="<random ids>", calib_ids=calib_ids,
                         device="cuda")
    run_recipe(rec, ctx)
    return ctx.plan, ctx.params


def kv_bytes_dynamic(cache: Any) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def run_one(model: torch.nn.Module, kind: str, plan: Any, params: Any, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import DynamicCache, StaticCache

    from kvcompile.passes.lower import lower

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prefill), device="cuda", generator=g)
    max_len = args.prefill + args.decode + args.warmup + 8
    graphs = args.graphs and kind != "fp16-dynamic"  # a DynamicCache grows by concatenation: not replayable
    if kind == "fp16-static":
        model.set_attn_implementation("sdpa")
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    elif kind == "fp16-dynamic":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache()
    else:
        lower(model, plan, params.to("cuda"))
        cache = model.kvcompile.new_cache(graphs=graphs)
    with torch.no_grad():
        t0 = time.perf_counter()
        # a static cache is sized for the batch up front: prefill the whole batch; the others prefill one
        # sequence and repeat it. Chunked, keeping only the last logits, so a 32k prefill fits in memory.
        ids = prompt.expand(args.batch, -1) if kind == "fp16-static" else prompt
        for lo in range(0, args.prefill, args.prefill_chunk):
            out = model(ids[:, lo:lo + args.prefill_chunk], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
        if kind != "fp16-static":
            cache.batch_repeat_interleave(args.batch)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1).expand(args.batch, 1).contiguous()
        del out
        steps: list[float] = []
        runner = None
        if graphs:
            from kvcompile.runtime.graph import DecodeGraph

            runner = DecodeGraph(model, cache, nxt, args.prefill, max_len)
        for i in range(args.decode + args.warmup):
            torch.cuda.synchronize()
            t = time.perf_counter()
            if runner is not None:
                runner.step()  # the first step also captures the graph (a warm-up step)
            else:
                o = model(nxt, past_key_values=cache, use_cache=True)
                nxt = o.logits[:, -1:].argmax(-1)
                del o
            torch.cuda.synchronize()
            if i >= args.warmup:
                steps.append(time.perf_counter() - t)
        if runner is not None:
            runner.close()
    peak = torch.cuda.max_memory_allocated()
    if kind.startswith("fp16"):
        kv = kv_bytes_dynamic(cache)
        if kind == "fp16-static":  # static cache holds max_cache_len slots; count the tokens actually held
            kv = int(kv * (args.prefill + args.decode + args.warmup) / (args.prefill + args.decode + 8))
    else:
        kv = cache.storage_bytes()
    tokens = args.prefill + args.decode + args.warmup
    med = statistics.median(steps)
    mean = statistics.mean(steps)  # flush steps included: tokens/s is what a user gets
    res = {"kind": kind, "graphs": graphs, "batch": args.batch, "context": args.prefill,
           "median_step_ms": 1000 * med, "mean_step_ms": 1000 * mean, "tokens_per_s": args.batch / mean,
           "prefill_s": prefill_s, "peak_gb": peak / 1e9,
           "kv_bytes": kv, "kv_bytes_per_token_per_seq": kv / (tokens * args.batch),
           "fixed_gb": base_mem / 1e9}
    if plan is not None:
        res["avg_bits"] = plan.avg_bits()
    del cache
    torch.cuda.empty_cache()
    return res


def profile_step(model: torch.nn.Module, plan: Any, params: Any, args: argparse.Namespace) -> dict[str, float]:
    """Split a kvcompile decode step's GPU time: decode-attention kernels, kvcompile's other work, the model.

    The split comes from ``block`` eager steps (one full flush cycle, so the amortised flush is in it) profiled with
    the runtime's ``kvcompile.*`` ranges on; the kernels are the ones a graph replays. Then the same cache decodes
    through :class:`DecodeGraph` and the mean graphed step is the denominator of the overhead fraction.
    """
    from torch.profiler import ProfilerActivity, profile

    import kvcompile.runtime.cache as rc
    from kvcompile.passes.lower import lower
    from kvcompile.runtime.graph import DecodeGraph

    lower(model, plan, params.to("cuda"))
    cache = model.kvcompile.new_cache(graphs=True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), device="cuda")
    n = plan.block
    with torch.no_grad():
        for lo in range(0, args.prefill, args.prefill_chunk):
            model(ids[:, lo:lo + args.prefill_chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(args.batch)
        cache.reserve(args.prefill + 4 * n + 16)  # as DecodeGraph does: no storage growth inside the profile
        nxt = torch.zeros(args.batch, 1, dtype=torch.long, device="cuda")
        for _ in range(3):
            model(nxt, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        rc.PROFILE_RANGES = True
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    model(nxt, past_key_values=cache, use_cache=True)
                torch.cuda.synchronize()
        finally:
            rc.PROFILE_RANGES = False
        pos = cache.get_seq_length()
        runner = DecodeGraph(model, cache, nxt, pos, pos + 3 * n + 8)
        times = []
        for i in range(2 * n + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            runner.step()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        runner.close()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=20, max_name_column_width=60))

    def dev_us(ev: Any) -> float:
        return float(getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0))

    # A range's CPU-side event sums the kernels of the aten ops inside it; Triton launches are not aten ops, so the
    # runtime's own Triton kernels are taken by name: decode/merge (attention) and quantize (the flush).
    ranges = {"kvcompile.cache_write": 0.0, "kvcompile.flush": 0.0, "kvcompile.attend": 0.0}
    attn_kernels = quant_kernels = total = 0.0
    for ev in prof.key_averages():
        on_gpu = ev.device_type is not None and "cuda" in str(ev.device_type).lower()
        if ev.key in ranges:
            if not on_gpu:  # (the GPU-side copy of a user range is a time span, not kernel time)
                ranges[ev.key] += dev_us(ev)
        elif on_gpu:
            total += dev_us(ev)  # every kernel once
            if "decode_split" in ev.key or "merge_kernel" in ev.key:
                attn_kernels += dev_us(ev)
            elif "quantize" in ev.key:
                quant_kernels += dev_us(ev)
    other = sum(ranges.values()) + quant_kernels
    graphed = statistics.mean(times)
    res = {"profiled_steps": n, "gpu_busy_ms": total / n / 1000, "attention_kernels_ms": attn_kernels / n / 1000,
           "kvcompile_other_ms": other / n / 1000, "cache_write_ms": ranges["kvcompile.cache_write"] / n / 1000,
           "flush_ms_amortised": (ranges["kvcompile.flush"] + quant_kernels) / n / 1000,
           "attend_extra_ms": ranges["kvcompile.attend"] / n / 1000,
           "model_ms": (total - attn_kernels - other) / n / 1000, "graphed_step_ms": 1000 * graphed,
           "kvcompile_overhead_frac_of_graphed_step": other / n / 1e6 / graphed}
    del cache, runner
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b-shape")
    ap.add_argument("--prefill", type=int, default=32768)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--recipes", default="fp16-static,fp16-dynamic,nsep-int4,mixed-nsep,mixed-nsep-2bit,kivi-int4")
    ap.add_argument("--mem-cap-gb", type=float, default=60.0)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--graphs", action="store_true", help="decode through CUDA graphs (both fp16-static and kvcompile)")
    ap.add_argument("--profile-step", action="store_true", help="split one decode step with torch.profiler")
    ap.add_argument("--profile-recipe", default="mixed-nsep", help="recipe whose step --profile-step splits")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/generate.py needs a CUDA GPU")
    import transformers
    import triton

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    calib = torch.randint(0, model.config.vocab_size, (args.calib_windows, args.calib_len), device="cuda",
                          generator=torch.Generator(device="cuda").manual_seed(1))
    results = []
    for kind in args.recipes.split(","):
        plan = params = None
        if not kind.startswith("fp16"):
            plan, params = make_plan(model, kind, calib)
        try:
            r = run_one(model, kind, plan, params, args)
        except torch.OutOfMemoryError as e:
            r = {"kind": kind, "error": f"OOM: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)
    # largest batch whose KV cache at this context fits the cap next to the weights and transient memory
    fp16_static = next((r for r in results if r.get("kind") == "fp16-static" and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        transient = max(0.0, r["peak_gb"] - weights_gb - r["kv_bytes"] / 1e9)
        per_seq = r["kv_bytes_per_token_per_seq"] * args.prefill / 1e9
        r["max_batch_at_cap"] = int((args.mem_cap_gb - weights_gb - transient / max(1, args.batch)) // per_seq)
        if fp16_static:
            r["speedup_vs_fp16_static"] = r["tokens_per_s"] / fp16_static["tokens_per_s"]
            r["max_batch_ratio_vs_fp16"] = r["max_batch_at_cap"] / max(1, fp16_static["max_batch_at_cap"])
    step = None
    if args.profile_step:
        plan, params = make_plan(model, args.profile_recipe, calib)
        step = profile_step(model, plan, params, args)
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "model": args.model,
              "dtype": args.dtype, "prefill": args.prefill, "decode": args.decode, "batch": args.batch,
              "weights_gb": weights_gb, "mem_cap_gb": args.mem_cap_gb, "command": " ".join(sys.argv)}
    print("\n" + " | ".join(f"{k}={v}" for k, v in header.items()))
    cols = ["kind", "avg_bits", "tokens_per_s", "median_step_ms", "speedup_vs_fp16_static", "peak_gb", "kv_bytes",
            "max_batch_at_cap", "max_batch_ratio_vs_fp16"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c, r.get("error", "") if c == "tokens_per_s" else "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    if step:
        print(f"step split ({args.profile_recipe}):", json.dumps(step))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results, "step_split": step}, f, indent=1)


if __name__ == "__main__":
    main()
