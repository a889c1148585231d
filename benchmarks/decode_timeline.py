"""Where one decode call's time goes: each kernel's GPU duration, and the span from the first start to the last end.

    python benchmarks/decode_timeline.py --format nsep-4                 # Llama-3-8B shape, batch 8, 32k
    python benchmarks/decode_timeline.py --format nsep-2 --batch 1 --context 4096

The inputs are the benchmark's (:mod:`benchmarks.kernels`), so the calls are the ones ``kernels.py`` times. The
calls are recorded by ``torch.profiler`` (CUPTI), eagerly, one at a time (a synchronize between calls), so the span
includes the gap between the split kernel and the merge kernel (which the dependent launch of the Gluon path is
meant to hide) but not Python's launch overhead before the first kernel. Prints the median over ``--calls`` of
each kernel's duration and of the span.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from kernels import SHAPES, decode_call, make_inputs, quantized_stores  # noqa: E402

from kvcompile.formats import KVFormat  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="nsep-4")
    ap.add_argument("--shape", default="Llama-3-8B", choices=[s.name for s in SHAPES])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=20, help="recorded calls (after 3 warm-up calls)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_timeline: needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = next(s for s in SHAPES if s.name == args.shape)
    fmt = KVFormat.parse(args.format)
    inp = make_inputs(shape, args.batch, args.context, seed=0)
    k_store, v_store, ks, vs = quantized_stores(inp, fmt)
    call = decode_call(inp, fmt, k_store, v_store, ks, vs)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.device_time_total > 0), key=lambda e: e.time_range.start)
    # every call launches the same kernels in the same order: a call starts with each launch of the first one
    calls: list[list] = []
    for e in kernels:
        if not calls or e.name == kernels[0].name:
            calls.append([])
        calls[-1].append(e)
    per_kernel: dict[str, list[float]] = defaultdict(list)
    spans = []
    for c in calls:
        spans.append(max(e.time_range.end for e in c) - c[0].time_range.start)
        for e in c:
            per_kernel[e.name].append(e.time_range.end - e.time_range.start)
    print(f"{args.format} {args.shape} B={args.batch} ctx={args.context}: {len(calls)} calls, "
          f"{torch.cuda.get_device_name()}")
    for name, ts in per_kernel.items():
        print(f"  {name[:60]:60s} x{len(ts) / len(calls):.0f}/call  median {statistics.median(ts):8.1f} us")
    print(f"  span (first start to last end) median {statistics.median(spans):8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
