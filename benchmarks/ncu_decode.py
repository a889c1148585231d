"""Run the decode kernel of one format at one shape a few times, for a profiler to pick one launch.

    ncu --clock-control none --set full --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \
        -o /tmp/nsep4 python benchmarks/ncu_decode.py --format nsep-4

The inputs are the benchmark's (:mod:`benchmarks.kernels`: Llama-3-8B shape, batch 8, 32k tokens by default), so the
profiled launch is the one ``kernels.py`` times. ``KVCOMPILE_DECODE_CONFIG`` selects launch variants as usual.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

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
    ap.add_argument("--calls", type=int, default=5, help="launches in all (the first compiles)")
    args = ap.parse_args()
    shape = next(s for s in SHAPES if s.name == args.shape)
    fmt = KVFormat.parse(args.format)
    inp = make_inputs(shape, args.batch, args.context, seed=0)
    k_store, v_store, ks, vs = quantized_stores(inp, fmt)
    call = decode_call(inp, fmt, k_store, v_store, ks, vs)
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    print(f"{args.format} {args.shape} B={args.batch} ctx={args.context}: {args.calls} calls done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
