"""Delta PPL of mixed-nsep with and without the smooth and clip passes (issue 6), runtime protocol, austen eval split.

Usage: python benchmarks/smooth_ablation.py MODEL PROFILE_WINDOWS EVAL_TOKENS OUT.json [budgets...]
(e.g. ``smollm2-135m 32 8192 out.json`` -> budgets 4.0 and 2.5, each without/with clipping, then the same on the
smoothed model; results are appended to OUT.json as they come).
"""
import copy
import json
import sys
import time

import torch

from kvcompile.eval import evaluate_model
from kvcompile.kvparams import KVParams
from kvcompile.models import load_model, resolve_model
from kvcompile.passes.lower import lower
from kvcompile.pipeline import PASSES, CompileContext

torch.set_num_threads(2)
name, W, TOK, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
budgets = [float(b) for b in sys.argv[5:]] or [4.0, 2.5]
CTX = int(__import__("os").environ.get("EVAL_CTX", 2048))
CANDS = ["fp16", "nsep-8", "nsep-4", "nsep-2"]
resolved = resolve_model(name)
base, tok = load_model(resolved)
results: dict = {"model": name, "profile_windows": W, "eval_tokens": TOK, "eval_ctx": CTX, "runs": []}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


variants = []
for smooth in (False, True):
    m = copy.deepcopy(base) if smooth else base
    ctx = CompileContext(name, model=m, tokenizer=tok, resolved=resolved, calib="austen")
    ctx.runtime = {"window": 128, "sinks": 4, "block": 32}
    t0 = time.time()
    if smooth:
        PASSES["smooth"].fn(ctx, windows=8, seq_len=512)
        log("smooth", ctx.metrics["smooth"], round(time.time() - t0, 1))
    PASSES["profile"].fn(ctx, windows=W, seq_len=1024)
    log("profile", round(time.time() - t0, 1))
    PASSES["calibrate"].fn(ctx, statistic="p999", alpha=1.0, center_k=True)
    for b in budgets:
        for k in [k for k in ctx.params.tensors if k.endswith(".alpha")]:
            del ctx.params.tensors[k]  # a clip tuned for the previous plan's bits
        PASSES["allocate"].fn(ctx, budget_bits=b, candidates=CANDS)
        variants.append(((smooth, b, False), m, copy.deepcopy(ctx.plan), KVParams(dict(ctx.params.tensors))))
        t1 = time.time()
        PASSES["clip"].fn(ctx, windows=8, seq_len=1024)
        log("clip", b, ctx.plan.meta["clip"], round(time.time() - t1, 1))
        variants.append(((smooth, b, True), m, copy.deepcopy(ctx.plan), KVParams(dict(ctx.params.tensors))))

baselines: dict = {}
for (smooth, b, clip), m, plan, params in variants:
    t0 = time.time()
    lower(m, plan, params)
    r = evaluate_model(m, tok, "ppl", data="austen", max_tokens=TOK, ctx=CTX, chunk=128,
                       baseline=baselines.get(smooth))
    baselines[smooth] = r["baseline"]
    row = {"smooth": smooth, "budget": b, "clip": clip, "avg_bits": round(plan.avg_bits(), 4), "fp16": r["fp16"],
           "quantized": r["quantized"], "delta": r["delta"], "n_tokens": r["n_tokens"],
           "clip_meta": plan.meta.get("clip")}
    results["runs"].append(row)
    log(row, round(time.time() - t0, 1))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
