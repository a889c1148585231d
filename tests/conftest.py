"""Test-wide settings. Triton kernels run under the interpreter on machines without a GPU."""

import os

import torch

# Must be set before triton is imported anywhere: on the CPU, kernels are checked against formats.py through
# Triton's interpreter; on a GPU they are compiled and run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` on machines without CUDA."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
