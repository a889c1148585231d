"""Which implementation a kernel entry point runs: compiled Triton, Triton's interpreter, or the PyTorch reference.

* CUDA tensors -> the compiled Triton kernels.
* CPU tensors with ``TRITON_INTERPRET=1`` in the environment (set before triton was imported, as the tests do) -> the
  same Triton kernels under Triton's interpreter, so the kernel code itself is checked on machines without a GPU.
* otherwise -> the PyTorch path through :mod:`kvcompile.formats` (same results, no Triton needed).

Kernel modules import ``triton``, ``tl`` and ``jit`` from here, so that they still import (and fall back to PyTorch)
on platforms without Triton.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux-only dependency

    class _Missing:
        """Stands in for triton.language so kernel definitions (annotations, constants) still evaluate."""

        def __getattr__(self, name: str) -> Any:
            return None

        @staticmethod
        def constexpr(value: Any) -> Any:
            return value

    triton = None  # type: ignore[assignment]
    tl = _Missing()  # type: ignore[assignment]
    HAVE_TRITON = False

    def jit(fn: Any) -> Any:
        return fn


Backend = Literal["triton", "interpret", "torch"]

#: set by :func:`force_cpu_backend`: what CPU tensors use instead of the environment's choice
_CPU_OVERRIDE: list[Backend] = []


def interpreting() -> bool:
    """Whether Triton runs kernels under its interpreter (only effective if set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(t: Tensor) -> Backend:
    """The backend that runs a kernel whose inputs live where ``t`` lives."""
    if not HAVE_TRITON:
        return "torch"
    if t.is_cuda:
        return "triton"
    if t.device.type == "cpu" and _CPU_OVERRIDE:
        return _CPU_OVERRIDE[-1]
    if t.device.type == "cpu" and interpreting():
        return "interpret"
    return "torch"


@contextmanager
def force_cpu_backend(backend: Backend) -> Iterator[None]:
    """Run CPU kernels with ``backend`` ("torch" or "interpret") inside the block.

    The runtime tests use it to run whole-model checks on the PyTorch path (the interpreter is too slow for
    hundreds of launches) while the kernel tests check the interpreted Triton kernels themselves.
    """
    _CPU_OVERRIDE.append(backend)
    try:
        yield
    finally:
        _CPU_OVERRIDE.pop()


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): Triton block shapes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())


@cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM), used to size split-sequence grids."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
