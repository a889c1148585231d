"""Decode speed and cache bytes of kvcompile ONNX exports under onnxruntime.

Measure one or more export folders (same prompt, same number of greedy steps each)::

    python benchmarks/onnx_speed.py OUT/onnx-nsep4 OUT/onnx-fp16 --prompt-tokens 64 --new-tokens 128 --threads 2

Make the fp16 baseline of an artifact first (the same model with the fp16 plan, exported with an fp16 state, i.e. a
plain fp16 decoder-with-past)::

    python benchmarks/onnx_speed.py --make-fp16 ARTIFACT OUT/onnx-fp16

For every folder it prints the past-KV bytes per token (from the graph's input shapes), the bytes of the fixed
sinks/window buffers, prefill time, decode tokens/s (median step latency too) and the state bytes held at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def make_fp16(artifact: str, out: str) -> Path:
    """Write the fp16-plan twin of ``artifact`` beside ``out`` and export it with an fp16 state into ``out``."""
    from kvcompile.artifact import read_artifact, write_artifact
    from kvcompile.formats import FP16
    from kvcompile.kvparams import KVParams
    from kvcompile.onnx_export import export_onnx
    from kvcompile.plan import Plan

    art = read_artifact(artifact)
    if art.has_model_weights:
        raise SystemExit("artifact carries its own model weights; point --make-fp16 at an artifact without model/")
    plan = Plan.uniform(art.plan.shape, FP16, FP16, window=art.plan.window, sinks=art.plan.sinks,
                        block=art.plan.block)
    twin = Path(out).resolve().with_name(Path(out).name + "-artifact")
    write_artifact(twin, plan, KVParams(), art.model, recipe={"name": "fp16"})
    return export_onnx(twin, out, kv_dtype="float16")


def measure(folder: str, prompt_tokens: int, new_tokens: int, threads: int | None, warmup: int) -> dict:
    from kvcompile.onnx_runtime import OnnxDecoder

    dec = OnnxDecoder(folder, threads=threads)
    vocab = int(dec.config["vocab_size"])
    prompt = np.random.default_rng(0).integers(10, min(vocab, 30000), size=(1, prompt_tokens))
    for _ in range(warmup):  # first runs allocate and pick kernels
        dec.reset()
        logits = dec.step(prompt)
        dec.step(logits[:, -1:].argmax(-1))
    dec.reset()
    t0 = time.perf_counter()
    logits = dec.step(prompt)
    prefill_s = time.perf_counter() - t0
    steps = []
    tok = logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        t = time.perf_counter()
        logits = dec.step(tok)
        steps.append(time.perf_counter() - t)
        tok = logits[:, -1:].argmax(-1)
    decode_s = sum(steps)
    cfg = dec.config
    return {
        "folder": str(folder),
        "recipe": cfg.get("artifact", {}).get("recipe"),
        "plan_avg_bits": cfg["plan"].get("avg_bits"),
        "kv_dtype": cfg["kv_dtype"],
        "past_bytes_per_token": cfg["past_bytes"]["per_token"],
        "fixed_window_bytes": cfg["past_bytes"]["fixed"],
        "state_bytes_end": dec.state_bytes(),
        "tokens_end": dec.length,
        "provider": dec.session.get_providers()[0],
        "prompt_tokens": prompt_tokens,
        "prefill_s": round(prefill_s, 4),
        "new_tokens": new_tokens,
        "decode_tokens_per_s": round(new_tokens / decode_s, 2),
        "median_step_ms": round(1000 * statistics.median(steps), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", help="ONNX export folders (kvcompile export-onnx)")
    ap.add_argument("--make-fp16", nargs=2, metavar=("ARTIFACT", "OUT"), help="export the fp16 baseline and exit")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.make_fp16:
        print(make_fp16(*args.make_fp16))
        return 0
    if not args.folders:
        ap.error("give at least one export folder (or --make-fp16)")
    rows = [measure(f, args.prompt_tokens, args.new_tokens, args.threads, args.warmup) for f in args.folders]
    cols = ("folder", "kv_dtype", "past_bytes_per_token", "fixed_window_bytes", "state_bytes_end", "prefill_s",
            "decode_tokens_per_s", "median_step_ms")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
