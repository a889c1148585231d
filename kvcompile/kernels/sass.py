"""Compile a kernel for a GPU that is not there and read its machine code (developer tooling, used by
``benchmarks/kernel_sass.py`` and the Gluon kernel's tests).

Triton ships ``ptxas`` and ``cuobjdump``, so a kernel compiles down to SASS for, e.g., ``GPUTarget("cuda", 90, 32)``
(H100/H200) on a machine without a GPU; counting the instructions of its main loop is the cheapest way to see what a
kernel change costs before spending GPU time on it.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from kvcompile import formats
from kvcompile.formats import KVFormat
from kvcompile.kernels import decode as dec
from kvcompile.kernels import decode_gluon

__all__ = ["capture_launch", "compile_for", "cuda_tool", "disassemble", "loop_histogram", "resource_usage"]


def cuda_tool(name: str) -> str:
    """Path of a CUDA binary tool bundled with Triton (``cuobjdump``, ``ptxas``, ``nvdisasm``)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuda_tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def disassemble(cubin: bytes) -> str:
    """SASS text of a compiled kernel (``k.asm["cubin"]``)."""
    return _cuobjdump(cubin, "-sass")


def resource_usage(cubin: bytes) -> str:
    """cuobjdump's one-line resource summary: registers, stack, shared memory."""
    return _cuobjdump(cubin, "--dump-resource-usage").strip().splitlines()[-1].strip()


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def _main_loop(ins: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) address of the backward-branch loop with the most tensor-core instructions (the longest such
    loop on a tie), or None."""
    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    for addr, text in ins:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [x for a, x in ins if lo <= a <= addr]
            ops = collections.Counter(_opcode(x) for x in body)
            mma = ops["HMMA"] + ops["HGMMA"] + ops["IMMA"]
            if mma and (best is None or (mma, len(body)) > best[0]):
                best = ((mma, len(body)), (lo, addr))
    return best[1] if best else None


def loop_histogram(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of the backward-branch loop with the most tensor-core instructions (the longest
    such loop on a tie): a decode kernel's main loop over packed tokens."""
    ins = _instructions(sass)
    loop = _main_loop(ins)
    if loop is None:
        return 0, collections.Counter()
    ops = collections.Counter(_opcode(x) for a, x in ins if loop[0] <= a <= loop[1])
    return sum(ops.values()), ops


def program_sections(sass: str) -> tuple[int, int, int]:
    """Instructions (static: both sides of every branch count) before the main loop (:func:`loop_histogram`), in
    it, and after it up to the first EXIT: a program's setup, its per-tile loop and its epilogue."""
    ins = _instructions(sass)
    loop = _main_loop(ins)
    if loop is None:
        return len(ins), 0, 0
    exits = [a for a, x in ins if a > loop[1] and _opcode(x) == "EXIT"]
    end = exits[0] if exits else ins[-1][0]
    return (sum(a < loop[0] for a, _ in ins), sum(loop[0] <= a <= loop[1] for a, _ in ins),
            sum(loop[1] < a <= end for a, _ in ins))


_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
          torch.uint8: "*u8", torch.int64: "*i64"}


def capture_launch(k_fmt: KVFormat, v_fmt: KVFormat, B: int, hq: int, hkv: int, d: int, n: int, n_fp: int = 132,
                   gluon: bool = False) -> tuple[tuple, dict]:
    """Arguments the host code (:func:`kvcompile.kernels.decode._decode`) passes to the split kernel for this shape,
    with CPU tensors standing in (nothing is launched). ``gluon``: the Gluon kernel's launch
    (:mod:`kvcompile.kernels.decode_gluon`), as on a Hopper GPU."""
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
    # (this module also serves copies of older trees, whose decode_gluon had no merge of its own: none to stub)
    real_g = (decode_gluon._quant_split_kernel, decode_gluon.supported, getattr(decode_gluon, "merge", None))
    dec._decode_split_kernel, dec._merge_kernel = Grab(not gluon), Grab(False)
    dec.backend_for, dec.num_sms = (lambda t: "triton"), (lambda i: 132)
    if gluon:
        decode_gluon._quant_split_kernel = Grab(True)
        decode_gluon.supported = lambda *a, **k: True  # the CPU tensors stand for a Hopper GPU's
        if real_g[2] is not None:
            decode_gluon.merge = lambda *a, **k: None
    try:
        def store(fmt: KVFormat, role: str) -> tuple[dict, torch.Tensor | None]:
            scale = torch.rand(hkv, d) + 0.5 if fmt.kind == "nsep" else None
            qt = formats.quantize(torch.randn(B, hkv, 64, d), fmt, role, scale)
            return {k: torch.zeros([*t.shape[:2], n, *t.shape[3:]], dtype=t.dtype) for k, t in qt.items()}, scale

        (ks, kscale), (vs, vscale) = store(k_fmt, "k"), store(v_fmt, "v")
        fk = torch.zeros(B, hkv, 160, d, dtype=torch.float16)
        dec._decode(torch.randn(B, hq, d, dtype=torch.float16), ks, vs, k_fmt, v_fmt, n, fk, fk.clone(), n_fp, 4,
                    0.088, kscale, vscale, None, None, None, None)
    finally:
        dec._decode_split_kernel, dec._merge_kernel, dec.backend_for, dec.num_sms = real
        decode_gluon._quant_split_kernel, decode_gluon.supported = real_g[:2]
        if real_g[2] is not None:
            decode_gluon.merge = real_g[2]
    return seen["args"], seen["kw"]


def compile_for(args: tuple, kw: dict, arch: int = 90, gluon: bool = False):
    """Compile the split kernel (``gluon``: the Gluon one) for ``sm_<arch>`` as Triton's JIT would specialise it for
    these arguments (from :func:`capture_launch`). Returns (compiled kernel, launch options)."""
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
