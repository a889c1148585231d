"""Which MMA operand types run natively on a GPU architecture: compile one small Gluon ``mma_v2`` per operand type
for ``sm_<arch>`` (no GPU needed: Triton ships ptxas) and count the machine instructions.

    python benchmarks/mma_operand_types.py            # sm_90 (H100/H200)

On sm_90 the fp8 (e4m3) form of ``mma.sync`` is not native: ptxas converts both operands to fp16 (F2FP) and runs
HMMA. int8 runs as IMMA. That is why the Gluon decode loop's narrow key operands are int8
(:func:`kvcompile.kernels.decode_gluon._k_operand_i8`), see ``benchmarks/RESULTS.md`` §1a⁶.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: E402

from kvcompile.kernels.sass import disassemble  # noqa: E402

M, N, K = 64, 8, 128


@gluon.jit
def _dot(a_ptr, b_ptr, o_ptr, ACC: gl.constexpr, BL: gl.constexpr, MMA: gl.constexpr,
         OPA: gl.constexpr, OPB: gl.constexpr):
    r = gl.arange(0, 64, layout=gl.SliceLayout(1, BL))
    k = gl.arange(0, 128, layout=gl.SliceLayout(0, BL))
    a = gl.load(a_ptr + r[:, None] * 128 + k[None, :])
    kb = gl.arange(0, 128, layout=gl.SliceLayout(1, BL))
    n = gl.arange(0, 8, layout=gl.SliceLayout(0, BL))
    b = gl.load(b_ptr + kb[:, None] * 8 + n[None, :])
    acc = mma_v2(gl.convert_layout(a, OPA), gl.convert_layout(b, OPB), gl.zeros([64, 8], ACC, layout=MMA))
    ro = gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
    no = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    gl.store(o_ptr + ro[:, None] * 8 + no[None, :], acc)


def histogram(in_ptr: str, acc_dtype, k_width: int, arch: int) -> tuple[collections.Counter, set]:
    """(SASS opcode counts, PTX mma forms) of the dot over ``in_ptr`` operands (e.g. ``"*fp16"``)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    const = dict(ACC=acc_dtype, BL=gl.BlockedLayout([1, 1], [4, 8], [1, 1], [1, 0]), MMA=mma,
                 OPA=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=k_width),
                 OPB=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=k_width))
    out = "*i32" if acc_dtype == gl.int32 else "*fp32"
    sig = dict(a_ptr=in_ptr, b_ptr=in_ptr, o_ptr=out, **dict.fromkeys(const, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    kern = triton.compile(GluonASTSource(_dot, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=1))
    sass = disassemble(kern.asm["cubin"])
    ops = collections.Counter(m.group(1).split(".")[0]
                              for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
    return ops, set(re.findall(r"mma\.sync[^ ]*", kern.asm["ptx"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    a = ap.parse_args()
    print(f"[{M}x{K}] x [{K}x{N}] through mma_v2, sm_{a.arch}, triton {triton.__version__}")
    for name, dt, acc, kw in (("fp16", "*fp16", gl.float32, 2), ("int8", "*i8", gl.int32, 4),
                              ("fp8e4m3", "*fp8e4nv", gl.float32, 4)):
        ops, ptx = histogram(dt, acc, kw, a.arch)
        mma = {op: ops[op] for op in ("HMMA", "IMMA", "QMMA") if ops[op]}
        print(f"  {name:8s} PTX {sorted(ptx)}  ->  SASS MMAs {mma}, F2FP (conversions) {ops['F2FP']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
