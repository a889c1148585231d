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

__all__ = ["cuda_tool", "disassemble", "loop_histogram", "resource_usage"]


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


def loop_histogram(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of the backward-branch loop with the most tensor-core instructions (the longest
    such loop on a tie): a decode kernel's main loop over packed tokens."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best: tuple[int, collections.Counter] = (0, collections.Counter())
    for addr, text in ins:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            body = [x for a, x in ins if int(target.group(1), 16) <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
            mma = ops["HMMA"] + ops["HGMMA"]
            if mma and (mma, len(body)) > (best[1]["HMMA"] + best[1]["HGMMA"], best[0]):
                best = (len(body), ops)
    return best
