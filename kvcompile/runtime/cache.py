"""A transformers ``Cache`` over packed quantized KV storage.

Per full-attention layer, the cache keeps, for each group of KV heads that share a (K format, V format) in the plan:

* a packed store of quantized tokens (codes + per-token multipliers / group metadata; see ``formats.store_shapes``),
* a full-precision buffer whose first ``sinks`` slots hold the first tokens of the sequence forever and whose
  remaining slots hold the recent tail (past-only quantization: the newest ``window`` tokens stay exact).

New tokens are appended to the tail by :meth:`QuantizedLayer.update`; after attention has read them, tokens that have
left the window are quantized ``block`` at a time by the write kernel (:func:`kvcompile.kernels.quantize.quantize_into`)
and the tail is compacted. No dequantized copy of the cache is ever kept: decode attention reads the packed store
through the fused kernel, prefill dequantizes the past transiently.

Absolute positions: sink slot j has position j; quantized token i has position ``sinks + i``; tail slot j (j >= sinks)
has position ``n_quant + j``. The attention function (``runtime/attention.py``) relies on this order.

Sliding-window layers keep transformers' own bounded fp16 layer; layers whose plan is all fp16 keep a plain
``DynamicLayer``, so an fp16 plan reproduces the unmodified model exactly.

CUDA graphs (``static=True``, driven by :class:`kvcompile.runtime.graph.DecodeGraph`): every layer also keeps its
lengths ``(n_quant, n_fp)`` in a device tensor ``lens``, updated by the same arithmetic as the host counters, so a
decode step can be captured once and replayed: the new token is written at the device-side position and the kernel
reads the lengths from ``lens`` (the launch is sized by the storage capacity). Flushes are scheduled by the host
between replays (:meth:`QuantizedKVCache.flush_pending`), never inside a captured step; all-fp16 layers then use
:class:`QuantizedLayer` too (a ``DynamicLayer`` grows by concatenation, which a graph cannot replay).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from kvcompile.formats import FP16, KVFormat, QTensor, empty_store, token_axis_length
from kvcompile.kernels.quantize import quantize_into
from kvcompile.kvparams import KVParams
from kvcompile.plan import LayerPlan, Plan

#: tokens of packed storage added at least when a store grows (amortises re-allocation during decode)
_GROW_TOKENS = 256

#: label the runtime's work in torch.profiler traces (benchmarks/generate.py sets it; off, it costs nothing)
PROFILE_RANGES = False


def profile_range(name: str) -> Any:
    """A ``torch.profiler.record_function`` range when :data:`PROFILE_RANGES` is on, else a no-op context."""
    return torch.profiler.record_function(name) if PROFILE_RANGES else nullcontext()


@dataclass
class StepState:
    """Per-forward facts shared by all layers of one cache (computed once per step, not once per layer)."""

    mask_ref: Any = None
    seq_start: Tensor | None = None
    #: CUDA-graph mode: device-side write positions, no flush inside a step (see the module docstring)
    static: bool = False
    #: bumped whenever storage is reallocated or reordered, so a captured graph knows it is stale
    version: int = 0

    def seq_start_from_mask(self, mask: Tensor | None) -> Tensor | None:
        """First valid key position of each sequence (left padding), from transformers' 4D boolean decode mask."""
        if mask is None:
            return None
        if mask is not self.mask_ref:
            row = mask[:, 0, -1, :]
            valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
            self.seq_start = valid.to(torch.int32).argmax(dim=-1).to(torch.int32)
            self.mask_ref = mask
        return self.seq_start


@dataclass
class HeadGroup:
    """The KV heads of one layer that share a (K format, V format), with their storage."""

    heads: list[int]
    kfmt: KVFormat
    vfmt: KVFormat
    k_scale: Tensor | None = None
    v_scale: Tensor | None = None
    index: Tensor | None = None  # None: the group is every head of the layer (no gather needed)
    k_store: QTensor = field(default_factory=dict)
    v_store: QTensor = field(default_factory=dict)
    fp_k: Tensor | None = None
    fp_v: Tensor | None = None
    qidx: Tensor | None = None  # the query heads of this group (None: every head), set on the device at first use

    def take(self, x: Tensor) -> Tensor:
        """This group's heads of a ``[B, H, T, d]`` tensor."""
        return x if self.index is None else x.index_select(1, self.index)


class QuantizedLayer(CacheLayerMixin):
    """One full-attention layer's quantized cache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, layer_plan: LayerPlan, window: int, sinks: int, block: int,
                 params: dict[str, Tensor | None], step: StepState, mode: str = "fused") -> None:
        super().__init__()
        self.window, self.sinks, self.block, self.mode, self.step = window, sinks, block, mode, step
        self.k_mean, self.v_mean = params.get("k_mean"), params.get("v_mean")
        n_heads = len(layer_plan.heads)
        self.groups: list[HeadGroup] = []
        for (kf, vf), heads in layer_plan.groups().items():
            idx = None if heads == list(range(n_heads)) else torch.tensor(heads)
            ks, vs = params.get("k_scale"), params.get("v_scale")
            self.groups.append(HeadGroup(
                heads, kf, vf,
                k_scale=ks[heads].contiguous() if (ks is not None and kf.kind == "nsep") else None,
                v_scale=vs[heads].contiguous() if (vs is not None and vf.kind == "nsep") else None,
                index=idx))
        self.n_quant = 0  # quantized tokens
        self.n_fp = 0  # filled slots of the fp buffers (sinks + tail)
        self.quant_capacity = 0
        self.batch = 0
        self.lens: Tensor | None = None  # (n_quant, n_fp) on the device, int32
        self.v_mean_q: Tensor | None = None  # v_mean repeated over the query heads of each KV head

    # ------------------------------------------------------------------ transformers Cache layer protocol
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # The window, sinks and fp16-format heads are stored in 16 bits: an fp32 model (CPU) would otherwise keep a
        # window twice the size the plan's byte count (and an fp16 cache) assumes. bf16/fp16 models keep their dtype.
        self.store_dtype = torch.float16 if self.dtype == torch.float32 else self.dtype
        self.batch, self.head_dim = key_states.shape[0], key_states.shape[-1]
        for g in self.groups:
            for name in ("k_scale", "v_scale"):
                t = getattr(g, name)
                if t is not None:
                    setattr(g, name, t.to(self.device, torch.float32))
        if self.k_mean is not None:
            self.k_mean = self.k_mean.to(self.device, self.dtype)[None, :, None, :]
        if self.v_mean is not None:
            self.v_mean = self.v_mean.to(self.device, self.dtype)[None, :, None, :]
        for g in self.groups:  # per-step index tensors made once, on the device (no host copies while decoding)
            if g.index is not None:
                g.index = g.index.to(self.device)
        self.lens = torch.tensor([self.n_quant, self.n_fp], dtype=torch.int32, device=self.device)
        self.quant_capacity = -1  # allocate empty stores now, so kernels and batch ops always see real tensors
        self._ensure_quant_capacity(0)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append new (centred) tokens to the fp tail; return them tagged with this layer for the attention fn."""
        with profile_range("kvcompile.cache_write"):
            return self._update(key_states, value_states)

    def _update(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.step.static:
            self.flush()
        k = key_states - self.k_mean if self.k_mean is not None else key_states
        v = value_states - self.v_mean if self.v_mean is not None else value_states
        t = k.shape[2]
        self._ensure_fp_capacity(self.n_fp + t)
        if self.step.static:
            # the slot comes from the device counter: a replayed graph writes where the cache really is
            pos = self.lens[1:] if t == 1 else self.lens[1:] + torch.arange(t, device=self.device, dtype=torch.int32)
            pos = pos.long()
            for g in self.groups:
                g.fp_k.index_copy_(2, pos, g.take(k).to(g.fp_k.dtype))
                g.fp_v.index_copy_(2, pos, g.take(v).to(g.fp_v.dtype))
        else:
            for g in self.groups:
                g.fp_k[:, :, self.n_fp:self.n_fp + t] = g.take(k)
                g.fp_v[:, :, self.n_fp:self.n_fp + t] = g.take(v)
        self.lens[1:].add_(t)
        self.n_fp += t
        k._kvc_layer = self  # the registered attention function finds the packed cache through this tag
        return k, v

    def get_seq_length(self) -> int:
        return self.n_quant + self.n_fp

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.n_quant = self.n_fp = 0
        if self.lens is not None:
            self.lens.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))
        self.batch *= repeats

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply_batch(lambda t: t[indices])
        self.batch = next((g.fp_k.shape[0] for g in self.groups if g.fp_k is not None), self.batch)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (only those still in the fp tail can be dropped)."""
        n = abs(tokens_to_remove) if tokens_to_remove <= 0 else self.get_seq_length() - tokens_to_remove
        if n > self.n_fp - min(self.sinks, self.n_fp):
            raise ValueError("kvcompile cannot crop tokens that were already quantized")
        self.n_fp -= n
        if self.lens is not None:
            self.lens[1:].sub_(n)

    # ------------------------------------------------------------------ storage management
    def _apply_batch(self, fn: Any) -> None:
        self.step.version += 1
        for g in self.groups:
            g.k_store = {n: fn(t) for n, t in g.k_store.items()}
            g.v_store = {n: fn(t) for n, t in g.v_store.items()}
            if g.fp_k is not None:
                g.fp_k, g.fp_v = fn(g.fp_k), fn(g.fp_v)

    def _ensure_fp_capacity(self, need: int) -> None:
        for g in self.groups:
            cap = 0 if g.fp_k is None else g.fp_k.shape[2]
            if need <= cap:
                continue
            self.step.version += 1
            new_cap = max(need, self.sinks + self.window + self.block)
            shape = (self.batch, len(g.heads), new_cap, self.head_dim)
            fk = torch.empty(shape, dtype=self.store_dtype, device=self.device)
            fv = torch.empty(shape, dtype=self.store_dtype, device=self.device)
            if g.fp_k is not None and self.n_fp:
                fk[:, :, :self.n_fp] = g.fp_k[:, :, :self.n_fp]
                fv[:, :, :self.n_fp] = g.fp_v[:, :, :self.n_fp]
            g.fp_k, g.fp_v = fk, fv

    def _ensure_quant_capacity(self, need: int) -> None:
        if need <= self.quant_capacity:
            return
        cap = max(need, self.quant_capacity + max(_GROW_TOKENS, self.quant_capacity // 8))
        cap = -(-cap // self.block) * self.block
        self.step.version += 1
        for g in self.groups:
            for role, fmt, attr in (("k", g.kfmt, "k_store"), ("v", g.vfmt, "v_store")):
                old = getattr(g, attr)
                new = empty_store(fmt, role, self.batch, len(g.heads), cap, self.head_dim, self.device,
                                  self.store_dtype)
                for name, t in old.items():
                    n = token_axis_length(fmt, role, name, self.n_quant)
                    new[name][:, :, :n] = t[:, :, :n]
                setattr(g, attr, new)
        self.quant_capacity = cap

    def flush_due(self) -> bool:
        """Whether :meth:`flush` has tokens to quantize now."""
        s = min(self.sinks, self.n_fp)
        return s == self.sinks and self.n_fp - s >= self.window + self.block

    def flush(self) -> None:
        """Quantize the oldest tail tokens, ``block`` at a time, until fewer than ``window + block`` remain."""
        if not self.flush_due():
            return
        with profile_range("kvcompile.flush"):
            self._flush()

    def _flush(self) -> None:
        s = self.sinks
        tail = self.n_fp - s
        n = (tail - self.window) // self.block * self.block
        self._ensure_quant_capacity(self.n_quant + n)
        rest = tail - n
        for g in self.groups:
            quantize_into(g.fp_k[:, :, s:s + n], g.kfmt, "k", g.k_store, self.n_quant, scale=g.k_scale)
            quantize_into(g.fp_v[:, :, s:s + n], g.vfmt, "v", g.v_store, self.n_quant, scale=g.v_scale)
            # compact the tail (source and destination may overlap: clone the source)
            g.fp_k[:, :, s:s + rest] = g.fp_k[:, :, s + n:s + n + rest].clone()
            g.fp_v[:, :, s:s + rest] = g.fp_v[:, :, s + n:s + n + rest].clone()
        self.n_quant += n
        self.n_fp -= n
        self.lens[:1].add_(n)
        self.lens[1:].sub_(n)

    def reserve(self, tokens: int) -> None:
        """Allocate packed storage for ``tokens`` cached tokens now (a captured graph needs fixed addresses)."""
        self._ensure_quant_capacity(max(0, tokens - self.sinks))
        self._ensure_fp_capacity(self.sinks + self.window + self.block)

    def fp_capacity(self) -> int:
        """Slots of the fp buffers (sinks + tail)."""
        return next((g.fp_k.shape[2] for g in self.groups if g.fp_k is not None), 0)

    def storage_bytes(self) -> int:
        """Bytes the layer holds for the cached tokens: packed tokens plus the fp sinks and tail.

        Counted over the tokens held (not spare capacity), so the number is comparable with an fp16 cache.
        """
        total = 0
        for g in self.groups:
            for role, fmt, store in (("k", g.kfmt, g.k_store), ("v", g.vfmt, g.v_store)):
                for name, t in store.items():
                    rows = token_axis_length(fmt, role, name, self.n_quant)
                    total += t[:, :, :rows].numel() * t.element_size()
            if g.fp_k is not None:
                total += 2 * g.fp_k[:, :, :self.n_fp].numel() * g.fp_k.element_size()
        return total

    def allocated_bytes(self) -> int:
        """Bytes actually allocated, spare capacity included."""
        total = 0
        for g in self.groups:
            for t in (*g.k_store.values(), *g.v_store.values()):
                total += t.numel() * t.element_size()
            if g.fp_k is not None:
                total += 2 * g.fp_k.numel() * g.fp_k.element_size()
        return total


def _layer_params(plan: Plan, params: KVParams, i: int) -> dict[str, Tensor | None]:
    return {
        "k_scale": params.scale(i, "k"),
        "v_scale": params.scale(i, "v"),
        "k_mean": params.mean(i, "k") if plan.k_center else None,
        "v_mean": params.mean(i, "v") if plan.v_center else None,
    }


class QuantizedKVCache(Cache):
    """The kvcompile cache: :class:`QuantizedLayer` for planned layers, transformers' own layers elsewhere.

    ``mode="fused"`` decodes through the fused Triton kernel (PyTorch reference on a CPU without the Triton
    interpreter); ``mode="reference"`` dequantizes the past and runs SDPA for every step (the test oracle).
    ``graphs=True`` makes every full-attention layer a :class:`QuantizedLayer` (all-fp16 ones too), so that
    :class:`kvcompile.runtime.graph.DecodeGraph` can capture decode steps; the numbers are the same either way.
    """

    def __init__(self, plan: Plan, params: KVParams, config: Any = None, mode: str = "fused",
                 graphs: bool = False) -> None:
        if mode not in ("fused", "reference"):
            raise ValueError(f"unknown runtime mode {mode!r}")
        self.plan, self.mode = plan, mode
        self.step = StepState()
        cfg = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        layers: list[CacheLayerMixin] = []
        for i, lp in enumerate(plan.layers):
            if plan.shape.sliding and plan.shape.sliding[i]:
                layers.append(DynamicSlidingWindowLayer(sliding_window=int(getattr(cfg, "sliding_window", 0) or 0)))
            elif not graphs and all(hp.k == FP16 and hp.v == FP16 for hp in lp.heads):
                layers.append(DynamicLayer())
            else:
                layers.append(QuantizedLayer(lp, plan.window, plan.sinks, plan.block, _layer_params(plan, params, i),
                                             self.step, mode))
        super().__init__(layers=layers)

    def storage_bytes(self) -> int:
        """Bytes held for the cached tokens over all layers (packed + fp window/sinks; fp16 layers in full)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, QuantizedLayer):
                total += layer.storage_bytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += 2 * layer.keys.numel() * layer.keys.element_size()
        return total

    # ------------------------------------------------------------------ CUDA-graph support (runtime/graph.py)
    def quantized_layers(self) -> list[QuantizedLayer]:
        """The layers this cache manages itself."""
        return [la for la in self.layers if isinstance(la, QuantizedLayer)]

    def flush_pending(self) -> None:
        """Quantize, in every layer, the tokens that have left the window (between captured decode steps)."""
        for layer in self.quantized_layers():
            layer.flush()

    def reserve(self, tokens: int) -> None:
        """Preallocate every layer's storage for ``tokens`` cached tokens (fixed addresses for CUDA graphs)."""
        for layer in self.quantized_layers():
            if layer.is_initialized:
                layer.reserve(tokens)

    def host_state(self) -> list[tuple[int, int]]:
        """The host-side counters ``(n_quant, n_fp)`` of every quantized layer."""
        return [(la.n_quant, la.n_fp) for la in self.quantized_layers()]

    def set_host_state(self, state: list[tuple[int, int]]) -> None:
        """Restore counters saved by :meth:`host_state` (the device copies are not touched)."""
        for la, (nq, nf) in zip(self.quantized_layers(), state, strict=True):
            la.n_quant, la.n_fp = nq, nf

    def advance(self, tokens: int) -> None:
        """Account on the host for ``tokens`` appended by a replayed graph (which already moved ``lens``)."""
        for la in self.quantized_layers():
            la.n_fp += tokens
