"""Run the decode kernel of one format at one shape a few times, for a profiler; or time it with ``--timeline``.

    ncu --clock-control none --set full --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \\
        -o /tmp/nsep4 python benchmarks/ncu_decode.py --format nsep-4
    python benchmarks/ncu_decode.py --timeline --format nsep-2 --batch 1 --context 4096
    python benchmarks/ncu_decode.py --programs --format nsep-4

The inputs are the benchmark's (:mod:`benchmarks.kernels`: Llama-3-8B shape, batch 8, 32k tokens by default), so the
profiled launch is the one ``kernels.py`` times. ``KVCOMPILE_DECODE_CONFIG`` selects launch variants as usual.

``--timeline``: where one call's time goes. After 3 warm-up calls, ``--calls`` calls are recorded by
``torch.profiler`` (CUPTI), eagerly, one at a time (a synchronize between calls), and the script prints the median
of each kernel's GPU duration and of the span from the call's first kernel start to its last kernel end. The span
includes any gap between the split kernel and the merge kernel (the Gluon path's dependent launch is meant to hide
it; eager host launch delays show up too), but not Python's overhead before the first kernel.

``--programs`` (Gluon split kernel only): when its programs start and end. Each program of ``--calls`` calls (5)
records the GPU's global timer at its start, after its quantized loop and partial store, and at its end
(:func:`kvcompile.kernels.decode_gluon.record_program_times`); the script prints, per call, those times from the
first program's start (percentiles over the programs), and how much of the SMs' time the tail leaves idle: per SM,
the time from its last program's end to the grid's last end, as a fraction of SMs x span.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from kernels import add_case_args, case_call  # noqa: E402


def timeline(call: Callable[[], object], n_calls: int) -> tuple[dict[str, list[float]], list[float]]:
    """(GPU durations in us per kernel name, span of each call in us) of ``n_calls`` recorded calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_calls):
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
    return per_kernel, spans


def program_times(call: Callable[[], object], n_calls: int) -> list[str]:
    """One summary line per recorded call of the Gluon split kernel's program timestamps (see ``--programs``)."""
    from kvcompile.kernels import decode_gluon

    buf = torch.zeros(4 << 20, dtype=torch.int64, device="cuda")
    lines = []
    for _ in range(n_calls):
        buf.zero_()
        decode_gluon.record_program_times(buf)
        try:
            call()
            torch.cuda.synchronize()
        finally:
            decode_gluon.record_program_times(None)
        t = buf.view(-1, 4).cpu()
        t = t[t[:, 0] > 0]
        if not len(t):
            return ["no program recorded a time: the Gluon split kernel did not run for this case"]
        t0 = int(t[:, 0].min())
        start, loop, end = ((t[:, i] - t0).double() / 1e3 for i in range(3))
        loop = loop[t[:, 1] > 0]  # (programs of fp16 slots only have no quantized loop)
        span = float(end.max())
        sm_end = defaultdict(float)
        for sm, e in zip(t[:, 3].tolist(), end.tolist(), strict=True):
            sm_end[sm] = max(sm_end[sm], e)
        idle = sum(span - e for e in sm_end.values()) / (len(sm_end) * span)

        def pct(x: torch.Tensor) -> str:
            q = torch.quantile(x, torch.tensor([0.0, 0.5, 0.9, 0.99, 1.0], dtype=x.dtype)).tolist()
            return "/".join(f"{v:.1f}" for v in q)

        lines.append(f"{len(t)} programs on {len(sm_end)} SMs, span {span:.1f} us; us from the first start "
                     f"(min/p50/p90/p99/max): start {pct(start)}, loop+store done {pct(loop)}, end {pct(end)}; "
                     f"duration {pct(end - start)}; tail idle {100 * idle:.1f}% of SM time")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap)
    ap.add_argument("--calls", type=int, default=None,
                    help="launches in all, the first compiling (default 5); with --timeline, recorded calls (20)")
    ap.add_argument("--timeline", action="store_true", help="print each kernel's duration and the call's span")
    ap.add_argument("--programs", action="store_true", help="print when the split kernel's programs start and end")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("ncu_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    call = case_call(args)
    what = f"{args.format} {args.shape} B={args.batch} ctx={args.context}"
    if args.programs:
        for _ in range(3):
            call()
        print(f"{what}, {torch.cuda.get_device_name()}:")
        for line in program_times(call, args.calls or 5):
            print("  " + line)
        if not args.timeline:
            return 0
    if not args.timeline:
        for _ in range(args.calls or 5):
            call()
        torch.cuda.synchronize()
        print(f"{what}: {args.calls or 5} calls done")
        return 0
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    per_kernel, spans = timeline(call, args.calls or 20)
    print(f"{what}: {len(spans)} calls, {torch.cuda.get_device_name()}")
    for name, ts in per_kernel.items():
        print(f"  {name[:60]:60s} x{len(ts) / len(spans):.0f}/call  median {statistics.median(ts):8.1f} us")
    print(f"  span (first start to last end) median {statistics.median(spans):8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
