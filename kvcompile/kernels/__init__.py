"""Triton kernels over packed KV storage: quantize-on-write and fused decode attention.

Both entry points take CUDA tensors (compiled Triton), CPU tensors under ``TRITON_INTERPRET=1`` (the same kernels in
Triton's interpreter) or plain CPU tensors (the PyTorch path through :mod:`kvcompile.formats`); results agree.
"""

from kvcompile.kernels.decode import DecodeConfig, decode_attention, decode_attention_reference
from kvcompile.kernels.quantize import quantize_into

__all__ = ["DecodeConfig", "decode_attention", "decode_attention_reference", "quantize_into"]
