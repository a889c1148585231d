"""Compile the decode kernel for a GPU architecture on a machine without one, and count its main loop's instructions.

    python benchmarks/kernel_sass.py --format nsep-4                       # the default launch configuration
    python benchmarks/kernel_sass.py --format nsep-2 --config "num_warps=4,block_n=256" --dump /tmp/k
    python benchmarks/kernel_sass.py --format nsep-4 --gluon               # the Gluon split kernel (Hopper path)

Triton compiles for a target without a GPU present (``GPUTarget("cuda", 90, 32)`` = H100) down to SASS with the
``ptxas``/``cuobjdump`` it ships. The launch is taken from the real host code (:func:`kvcompile.kernels.decode._decode`
with the Llama-3-8B shape, batch 8, 32k tokens), so the specialisation (constexprs, 16-byte alignment) matches what
the runtime compiles. Prints registers, spills, shared memory, and an opcode histogram of the loop over quantized
tokens: the cheapest way to see what a kernel change costs before spending GPU time on it. ``--dump`` writes the
TTGIR, PTX and SASS. Instruction counts are per warp and loop iteration (``block_n / num_warps`` tokens of M each).
Code generation differs between Triton versions: to see what the H100 runs, use the version installed there, e.g.
``pip install --target /tmp/t36 triton==3.6.0`` and ``PYTHONPATH=/tmp/t36 python benchmarks/kernel_sass.py ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvcompile.formats import KVFormat  # noqa: E402
from kvcompile.kernels import decode_gluon  # noqa: E402
from kvcompile.kernels.sass import (  # noqa: E402
    capture_launch,
    compile_for,
    disassemble,
    loop_histogram,
    program_sections,
    resource_usage,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="nsep-4", help="K and V format, e.g. nsep-4, nsep-2, int-token-4")
    ap.add_argument("--config", default="", help="KVCOMPILE_DECODE_CONFIG-style overrides, e.g. 'num_warps=4'")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    ap.add_argument("--dump", metavar="DIR", help="write k.ttgir, k.ptx and k.sass here")
    ap.add_argument("--gluon", action="store_true", help="the Gluon split kernel (decode_gluon) instead of Triton's")
    a = ap.parse_args()
    os.environ["KVCOMPILE_DECODE_CONFIG"] = a.config
    fmt = KVFormat.parse(a.format)
    args, kw = capture_launch(fmt, fmt, 8, 32, 8, 128, 32768, gluon=a.gluon)
    block_n = decode_gluon.BLOCK_N if a.gluon else kw["BLOCK_N"]
    k, opts = compile_for(args, kw, a.arch, a.gluon)
    sass = disassemble(k.asm["cubin"])
    usage = resource_usage(k.asm["cubin"])
    if a.dump:
        Path(a.dump).mkdir(parents=True, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            (Path(a.dump) / f"k.{ext}").write_text(k.asm[ext])
        (Path(a.dump) / "k.sass").write_text(sass)
    n, ops = loop_histogram(sass)
    import triton

    print(f"{a.format} {'gluon ' if a.gluon else ''}block_n={block_n} {opts} sm_{a.arch}, triton {triton.__version__}: "
          f"shared {k.metadata.shared} B; {usage}")
    print(f"main loop: {n} instructions per warp per iteration ({block_n // opts['num_warps']} tokens per warp)")
    print("  " + ", ".join(f"{op} {c}" for op, c in ops.most_common(20)))
    setup, _, epilogue = program_sections(sass)
    print(f"per program, outside the loop (static counts): {setup} instructions before it, {epilogue} after it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
