"""kvcompile: calibrate, plan and lower a quantized KV cache for HuggingFace causal LMs.

``kvcompile.load(OUT)`` returns a model whose ``generate()`` runs on the packed quantized cache of an artifact built
with ``kvcompile build``; ``kvcompile.build``, ``kvcompile.profile`` and ``kvcompile.evaluate`` are the Python forms
of the CLI commands.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["build", "evaluate", "load", "profile"]


def __getattr__(name: str) -> Any:
    # Lazy: importing kvcompile stays cheap (no torch/transformers) until an API function is used.
    if name in __all__:
        from kvcompile import api

        return getattr(api, name)
    raise AttributeError(f"module 'kvcompile' has no attribute {name!r}")
