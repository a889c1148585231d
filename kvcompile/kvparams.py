"""Static, calibrated tensors that go with a plan: nsep scales, clip ratios and centering vectors.

Stored in the artifact as ``kv_params.safetensors`` with keys ``layers.{i}.{k|v}.{name}``:
``scale`` (nsep static scale ``[H, d]``, fp32) and ``mean`` (centering vector ``[H, d]``, fp32), plus any
pass-specific extras (``alpha`` clip ratios ``[H]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVParams:
    """Mapping ``layers.{i}.{k|v}.{name}`` -> tensor, with typed accessors."""

    tensors: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def key(layer: int, role: str, name: str) -> str:
        return f"layers.{layer}.{role}.{name}"

    def get(self, layer: int, role: str, name: str) -> Tensor | None:
        return self.tensors.get(self.key(layer, role, name))

    def set(self, layer: int, role: str, name: str, value: Tensor) -> None:
        self.tensors[self.key(layer, role, name)] = value.detach().float().cpu().contiguous()

    def scale(self, layer: int, role: str) -> Tensor | None:
        """nsep static scale ``[H, d]`` of this layer's K or V, if the plan uses nsep there."""
        return self.get(layer, role, "scale")

    def mean(self, layer: int, role: str) -> Tensor | None:
        """Centering vector ``[H, d]`` of this layer's K or V, if the plan centers it."""
        return self.get(layer, role, "mean")

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.tensors))

    def to(self, device: torch.device | str) -> KVParams:
        return KVParams({k: v.to(device) for k, v in self.tensors.items()})
