"""Summarise Nsight Compute's per-instruction warp-stall samples: which SASS instructions the warps wait at, and why.

    ncu --clock-control none --section SourceCounters --section WarpStateStats --kernel-name regex:_quant_split \\
        --launch-skip 3 --launch-count 1 -o /tmp/k python benchmarks/ncu_decode.py --format nsep-4
    ncu --import /tmp/k.ncu-rep --page source --csv --print-source sass > /tmp/k.csv
    python benchmarks/ncu_stalls.py /tmp/k.csv

Prints the samples per opcode, the instructions with the most samples (address, SASS, the leading stall reasons),
and the share of the samples that fall inside the hottest loop (the address range of the backward branch that
encloses the most samples). Column names are matched loosely, as they vary between Nsight Compute versions.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    try:
        with open(args.csv, newline="") as f:
            lines = f.read().splitlines()
    except OSError as e:
        print(f"ncu_stalls: cannot read {args.csv}: {e.strerror}", file=sys.stderr)
        return 2
    start = next((i for i, ln in enumerate(lines) if "Address" in ln and "Source" in ln), None)
    if start is None:
        print("ncu_stalls: no 'Address'/'Source' header in the CSV", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(lines[start:]))
    cols = list(rows[0].keys()) if rows else []
    total_col = next((c for c in cols if "Sampling (All" in c), None) or next((c for c in cols if "Sampling" in c),
                                                                           None)
    if total_col is None:
        print("ncu_stalls: no warp-stall sampling column (profile with --section SourceCounters)", file=sys.stderr)
        return 2
    reason_cols = [c for c in cols if c.startswith("stall_") or ("Stall" in c and c != total_col
                   and "Sampling" not in c)]
    print(f"columns: total = {total_col!r}; {len(reason_cols)} stall-reason columns")
    insts = []
    for r in rows:
        addr = r.get("Address", "") or r.get("# Address", "")
        try:
            a = int(addr, 16)
        except ValueError:
            continue
        insts.append((a, r.get("Source", "").strip(), _num(r.get(total_col, "0")), r))
    total = sum(i[2] for i in insts) or 1.0
    by_op = Counter()
    for _, src, n, _ in insts:
        op = re.sub(r"^@!?U?P\w+\s+", "", src).split(" ")[0].split(".")[0]
        by_op[op] += n
    print(f"{int(total)} samples; by opcode: " + ", ".join(f"{op} {100 * n / total:.1f}%"
                                                           for op, n in by_op.most_common(16)))
    # the hottest loop: a backward branch (target below its own address) enclosing the most samples
    best = None
    for a, src, _, _ in insts:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|)?\s*(0x[0-9a-f]+)", src)
        if m and int(m.group(1), 16) < a:
            lo = int(m.group(1), 16)
            n = sum(i[2] for i in insts if lo <= i[0] <= a)
            if best is None or n > best[2]:
                best = (lo, a, n)
    if reason_cols:
        sums = sorted(((c, sum(_num(r[c]) for *_, r in insts)) for c in reason_cols), key=lambda x: -x[1])
        tot = sum(v for _, v in sums) or 1.0
        print("by reason: " + ", ".join(f"{c.replace('stall_', '')} {100 * v / tot:.1f}%" for c, v in sums[:10]))
    if best:
        print(f"hottest loop {best[0]:#x}-{best[1]:#x}: {100 * best[2] / total:.1f}% of the samples")
    print(f"top {args.top} instructions:")
    for a, src, n, r in sorted(insts, key=lambda i: -i[2])[:args.top]:
        reasons = sorted(((c, _num(r[c])) for c in reason_cols), key=lambda x: -x[1])[:3]
        why = ", ".join(f"{c.replace('stall_', '')} {v:.0f}" for c, v in reasons if v > 0)
        print(f"  {a:#07x} {100 * n / total:5.2f}%  {src[:60]:60s} {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
