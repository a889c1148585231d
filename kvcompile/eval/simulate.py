"""The seed papers' simulated protocol: every K/V fake-quantized per the plan inside an ordinary forward pass.

Inside :func:`simulated_quantization` the model's attention runs through a function registered with transformers'
``AttentionInterface`` (:data:`SIM_IMPL`). For each layer it replaces the keys and values it receives, the current
token's included, by ``formats.fake_quantize`` of them (per group of KV heads that share a format; nsep heads with
their calibrated static scales; centred roles centred before and un-centred after, which leaves attention unchanged
but for the quantization), then hands them to the model's previous attention implementation. There is no fp16 window
and no sink: this is the "quantize then immediately dequantize everything" protocol of the nsep README, KIVI and
SmoothQuant, kept for comparison with published ΔPPL; the runtime protocol (:mod:`kvcompile.eval.ppl`) measures what
the packed cache really does.

The mask function of the previous implementation is registered under the same name, so padding, causal and sliding
window masks arrive as the model expects (a custom name without one would get no mask at all). The previous
implementation is restored on exit, also after an exception.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvcompile.errors import KVCompileError
from kvcompile.formats import FP16, KVFormat, fake_quantize
from kvcompile.kvparams import KVParams
from kvcompile.plan import Plan

__all__ = ["SIM_IMPL", "fake_quantize_layer", "simulated_quantization"]

#: attention implementation name used while simulating
SIM_IMPL = "kvcompile_simulated"


@dataclass
class _SimState:
    plan: Plan
    params: KVParams
    previous: str
    modules: set[int]
    delegate: Callable[..., Any] | None = None


_ACTIVE: list[_SimState] = []


def _find(module: torch.nn.Module) -> _SimState | None:
    for st in reversed(_ACTIVE):
        if id(module) in st.modules:
            return st
    return None


def _delegate_for(previous: str, module: torch.nn.Module) -> Callable[..., Any]:
    """The attention function the model would call under ``previous`` (eager lives in each modeling file)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if previous == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        return fn if callable(fn) else sdpa_attention_forward
    if previous in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[previous]
    return sdpa_attention_forward


def _fq_role(x: Tensor, fmt: KVFormat, role: str, scale: Tensor | None, mean: Tensor | None) -> Tensor:
    """Fake-quantize one head group's K or V ``[B, h, T, d]`` (centred around ``mean`` ``[h, d]`` if given)."""
    if fmt == FP16:
        return x
    m = mean.to(x.device, torch.float32)[None, :, None, :] if mean is not None else None
    xf = x.float() - m if m is not None else x.float()
    out = fake_quantize(xf, fmt, role, scale=scale.to(x.device) if scale is not None else None)  # type: ignore[arg-type]
    if m is not None:
        out = out + m
    return out.to(x.dtype)


def fake_quantize_layer(plan: Plan, params: KVParams, layer: int, key: Tensor,
                        value: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values ``[B, Hkv, T, d]`` of ``layer`` fake-quantized per the plan (every token, per head group)."""
    lp = plan.layers[layer]
    groups = lp.groups()
    if len(groups) == 1 and next(iter(groups)) == (FP16, FP16):
        return key, value
    ks, vs = params.scale(layer, "k"), params.scale(layer, "v")
    km = params.mean(layer, "k") if plan.k_center else None
    vm = params.mean(layer, "v") if plan.v_center else None
    k_out, v_out = key.clone(), value.clone()
    for (kf, vf), heads in groups.items():
        idx = torch.tensor(heads, device=key.device)

        def pick(t: Tensor | None, fmt: KVFormat, heads: list[int] = heads) -> Tensor | None:
            if t is None or fmt == FP16:
                return None
            return t[heads]

        if (kf.kind == "nsep" and ks is None) or (vf.kind == "nsep" and vs is None):
            raise KVCompileError(f"layer {layer} uses nsep but its parameters hold no scale: rebuild the artifact")
        k_out.index_copy_(1, idx, _fq_role(key.index_select(1, idx), kf, "k", pick(ks, kf), pick(km, kf)))
        v_out.index_copy_(1, idx, _fq_role(value.index_select(1, idx), vf, "v", pick(vs, vf), pick(vm, vf)))
    return k_out, v_out


def _simulated_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, *args: Any, **kwargs: Any) -> Any:
    """The registered attention function: fake-quantize this layer's K/V, then run the previous implementation."""
    st = _find(module)
    if st is None:  # a model left switched to this name (another context exited abnormally): plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise KVCompileError(f"{type(module).__name__} has no layer_idx: the simulated protocol cannot map it to the "
                             "plan; use --protocol runtime")
    k, v = fake_quantize_layer(st.plan, st.params, int(layer), key, value)
    if st.delegate is None:
        st.delegate = _delegate_for(st.previous, module)
    return st.delegate(module, query, k, v, attention_mask, *args, **kwargs)


def _register(previous: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SIM_IMPL, _simulated_attention)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(previous, sdpa_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SIM_IMPL, mask_fn)


@contextmanager
def simulated_quantization(model: torch.nn.Module, plan: Plan, params: KVParams) -> Iterator[None]:
    """Inside the block, ``model`` fake-quantizes every K/V per ``plan`` (see the module docstring)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None) or "sdpa"
    if previous == SIM_IMPL:
        raise KVCompileError("this model is already inside simulated_quantization: do not nest it")
    from kvcompile.plan import ModelShape

    plan.validate(ModelShape.from_config(config))
    _register(previous)
    st = _SimState(plan, params.to(next(model.parameters()).device), previous, {id(m) for m in model.modules()})
    _ACTIVE.append(st)
    try:
        model.set_attn_implementation(SIM_IMPL)
        yield
    finally:
        _ACTIVE.remove(st)
        model.set_attn_implementation(previous)
