"""Decode steps captured once as a CUDA graph and replayed: no Python or launch overhead per layer.

A transformers decode step is ~1,000 small kernel launches plus the Python that issues them; at batch 8 on an H100
that host work (tens of milliseconds) is longer than the GPU work it launches, so an eager decode loop is CPU-bound
whatever the KV cache does. :class:`DecodeGraph` captures one whole decode step (embedding, every layer with its cache
update and attention kernel, the LM head and the greedy choice of the next token) and replays it.

What makes the quantized cache replayable (see :mod:`kvcompile.runtime.cache`): every layer keeps its lengths in a
device tensor updated inside the step, the new token is written at a device-side position, the decode kernel reads
the lengths from that tensor (its launch is sized by the storage capacity, reserved up front) and the flush that
quantizes tokens leaving the window runs between replays, on the host's schedule, once every ``block`` steps.
The same runner drives transformers' ``StaticCache`` (its layers keep a device-side length too), so fp16 baselines
are timed with the same graphs.

Limits: greedy decoding at a fixed batch, no attention mask (no left padding), CUDA only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvcompile.runtime.cache import QuantizedKVCache, QuantizedLayer

__all__ = ["DecodeGraph"]


class DecodeGraph:
    """Greedy decoding of ``model`` over ``cache`` with each step replayed from a CUDA graph.

    ``next_ids`` ``[B, 1]``: the first tokens to feed (e.g. the argmax of the prefill's last logits); ``position``:
    their position (the number of tokens already cached). ``max_length``: the most tokens the cache will hold, so
    storage can be reserved once. Call :meth:`step` repeatedly; :attr:`ids` holds the tokens it chose.
    """

    def __init__(self, model: torch.nn.Module, cache: Any, next_ids: Tensor, position: int, max_length: int) -> None:
        if next_ids.device.type != "cuda":
            raise ValueError("DecodeGraph needs the model and cache on a CUDA device")
        self.model, self.cache = model, cache
        self.ids = next_ids.detach().clone().long()
        self.pos = torch.full_like(self.ids, position)
        self.max_length = max_length
        self.kvc = cache if isinstance(cache, QuantizedKVCache) else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self._version = -1
        self.captures = 0
        if self.kvc is not None:
            if any(not isinstance(la, QuantizedLayer) for la in self.kvc.layers):
                raise ValueError("graph decoding needs every layer in kvcompile's own cache: make it with "
                                 "model.kvcompile.new_cache(graphs=True) (sliding-window layers are not supported)")
            self.kvc.reserve(max_length)

    def _body(self) -> Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True)
        logits = out.logits[:, -1]
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def _eager_then_capture(self) -> Tensor:
        """Run one real step eagerly (warming up kernels and allocators), then capture the next one."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._body().clone()
        torch.cuda.current_stream().wait_stream(stream)
        if self.kvc is not None:
            self.kvc.flush_pending()
            state = self.kvc.host_state()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()
        if self.kvc is not None:
            self.kvc.set_host_state(state)  # capturing ran the Python, not the kernels: undo its host bookkeeping
            self._version = self.kvc.step.version
        self.captures += 1
        return logits

    @torch.no_grad()
    def step(self) -> Tensor:
        """Decode one token per sequence; returns the step's logits ``[B, V]`` (valid until the next step)."""
        if self.kvc is not None:
            self.kvc.step.static = True
            self.kvc.flush_pending()  # tokens that left the window: quantized eagerly, outside the graph
            if self.graph is not None and self.kvc.step.version != self._version:
                self.graph = None  # storage moved (e.g. grew past the reservation): capture again
        if self.graph is None:
            return self._eager_then_capture()
        self.graph.replay()
        if self.kvc is not None:
            self.kvc.advance(1)
        assert self.logits is not None
        return self.logits

    def close(self) -> None:
        """Leave graph mode: later eager calls on the cache behave as usual."""
        if self.kvc is not None:
            self.kvc.step.static = False
        self.graph = None
