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

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvcompile import formats  # noqa: E402
from kvcompile.formats import KVFormat  # noqa: E402
from kvcompile.kernels import decode as dec  # noqa: E402
from kvcompile.kernels import decode_gluon  # noqa: E402
from kvcompile.kernels.sass import disassemble, loop_histogram, resource_usage  # noqa: E402

_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
          torch.uint8: "*u8", torch.int64: "*i64"}


def capture_launch(fmt: KVFormat, B: int, hq: int, hkv: int, d: int, n: int,
                   gluon: bool = False) -> tuple[tuple, dict]:
    """Arguments the host code passes to the split kernel for this shape (nothing is launched). ``gluon``: the
    Gluon kernel's launch (:mod:`kvcompile.kernels.decode_gluon`), as on a Hopper GPU."""
    seen: dict = {}

    class Grab:
        def __init__(self, keep: bool) -> None:
            self.keep = keep

        def __getitem__(self, grid: tuple):
            def launch(*args, **kw):
                if self.keep:
                    seen["args"], seen["kw"] = args, kw
            return launch

    real = (dec._decode_split_kernel, dec._merge_kernel, dec.backend_for, dec.num_sms)
    real_g = (decode_gluon._quant_split_kernel, decode_gluon.supported)
    dec._decode_split_kernel, dec._merge_kernel = Grab(not gluon), Grab(False)
    dec.backend_for, dec.num_sms = (lambda t: "triton"), (lambda i: 132)
    if gluon:
        decode_gluon._quant_split_kernel = Grab(True)
        decode_gluon.supported = lambda *a, **k: True  # the CPU tensors stand for a Hopper GPU's
    try:
        def store(role: str) -> tuple[dict, torch.Tensor]:
            scale = torch.rand(hkv, d) + 0.5
            qt = formats.quantize(torch.randn(B, hkv, 64, d), fmt, role, scale if fmt.kind == "nsep" else None)
            return {k: torch.zeros([*t.shape[:2], n, *t.shape[3:]], dtype=t.dtype) for k, t in qt.items()}, scale

        (ks, kscale), (vs, vscale) = store("k"), store("v")
        fk = torch.zeros(B, hkv, 160, d, dtype=torch.float16)
        nsep = fmt.kind == "nsep"
        dec._decode(torch.randn(B, hq, d, dtype=torch.float16), ks, vs, fmt, fmt, n, fk, fk.clone(), 132, 4, 0.088,
                    kscale if nsep else None, vscale if nsep else None, None, None, None, None)
    finally:
        dec._decode_split_kernel, dec._merge_kernel, dec.backend_for, dec.num_sms = real
        decode_gluon._quant_split_kernel, decode_gluon.supported = real_g
    return seen["args"], seen["kw"]


def compile_for(args: tuple, kw: dict, arch: int, gluon: bool = False):
    """Compile the split kernel (``gluon``: the Gluon one) as Triton's JIT would specialise it for these arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource

        fn = decode_gluon._quant_split_kernel
    else:
        fn = dec._decode_split_kernel
    sig, const, attrs = {}, {}, {}
    for i, (name, v) in enumerate(zip(fn.arg_names, args, strict=False)):
        if isinstance(v, torch.Tensor):
            sig[name] = _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # the JIT turns integer arguments equal to 1 into constants
                sig[name], const[name] = "constexpr", 1
                continue
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
            sig[name] = "i32" if abs(v) < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    kw = dict(kw)
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kw}
    for k, v in kw.items():
        sig[k], const[k] = "constexpr", v
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32), options=opts), opts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="nsep-4", help="K and V format, e.g. nsep-4, nsep-2, int-token-4")
    ap.add_argument("--config", default="", help="KVCOMPILE_DECODE_CONFIG-style overrides, e.g. 'num_warps=4'")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    ap.add_argument("--dump", metavar="DIR", help="write k.ttgir, k.ptx and k.sass here")
    ap.add_argument("--gluon", action="store_true", help="the Gluon split kernel (decode_gluon) instead of Triton's")
    a = ap.parse_args()
    os.environ["KVCOMPILE_DECODE_CONFIG"] = a.config
    args, kw = capture_launch(KVFormat.parse(a.format), 8, 32, 8, 128, 32768, a.gluon)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
