"""kvcompile: calibrate, plan and lower a quantized KV cache for HuggingFace causal LMs."""

__version__ = "0.1.0"
