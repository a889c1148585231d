"""Capture the post-RoPE query, key and value of every attention layer through transformers' AttentionInterface.

Inside :func:`capture_attention` the model runs its attention through a function registered under
:data:`CAPTURE_IMPL` (``"kvcompile_capture"``). That function hands each call to a user callback::

    callback(layer_idx, query, key, value, attention_mask, scaling, module)

with ``query`` ``[B, Hq, T, d]``, ``key`` / ``value`` ``[B, Hkv, T, d]`` (after RoPE and, with a cache, after the cache
update), the mask the model built for that layer (``None`` means plain causal), the softmax ``scaling`` and the
attention ``module`` itself (``module.layer_idx``; projections, softcapping and sliding window are read from it). It
then returns what the model's previous implementation returns, so the model's outputs do not change.

Why delegate to the previous implementation instead of always calling SDPA: some models cannot run on SDPA
(Gemma 2 soft-caps its attention logits, which SDPA rejects, and those models default to ``eager``). Delegating also
keeps the mask format the model expects: transformers builds masks per implementation name, so the capture name is
registered with the mask function of the implementation it wraps (a custom name without one would get no mask at all,
silently dropping sliding windows and padding).

This works on every architecture whose attention goes through the standard interface (Llama, Qwen2/3, Mistral,
Gemma 2/3 with sliding layers, Phi-3, GPT-NeoX, GPT-2, ...). A model that never calls it is detected by
:meth:`Capture.require`, which raises :class:`~kvcompile.errors.KVCompileError`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kvcompile.errors import KVCompileError

#: the attention implementation name used while capturing a model whose implementation is SDPA; other
#: implementations get ``f"{CAPTURE_IMPL}_{name}"`` so each keeps its own mask format
CAPTURE_IMPL = "kvcompile_capture"

CaptureCallback = Callable[[int, Tensor, Tensor, Tensor, "Tensor | None", float, nn.Module], None]


@dataclass
class Capture:
    """One active capture over one model: what was seen so far."""

    model: nn.Module
    callback: CaptureCallback
    previous: str
    delegate: Callable[..., Any] | None = None
    #: layer indices seen at least once
    layers: set[int] = field(default_factory=set)
    #: number of attention calls handed to the callback
    calls: int = 0
    _modules: set[int] = field(default_factory=set, repr=False)
    _fallback_idx: dict[int, int] = field(default_factory=dict, repr=False)

    def layer_index(self, module: nn.Module) -> int:
        """``module.layer_idx``, or the order of first appearance for attention modules that do not carry one."""
        idx = getattr(module, "layer_idx", None)
        if idx is not None:
            return int(idx)
        return self._fallback_idx.setdefault(id(module), len(self._fallback_idx))

    def require(self) -> None:
        """Raise :class:`KVCompileError` if no attention layer has been captured (call after a forward pass)."""
        if not self.layers:
            name = type(self.model).__name__
            raise KVCompileError(
                f"{name} does not use transformers' AttentionInterface (no attention layer was captured): "
                "kvcompile supports decoder-only models whose attention goes through it (Llama, Qwen, Mistral, Gemma, "
                "Phi-3, ...)")


_ACTIVE: list[Capture] = []


def _find_capture(module: nn.Module) -> Capture | None:
    # Innermost first, so nested captures of one model see the inner callback.
    for cap in reversed(_ACTIVE):
        if id(module) in cap._modules:
            return cap
    return None


def _sdpa() -> Callable[..., Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _resolve_delegate(previous: str, module: nn.Module) -> Callable[..., Any]:
    """The attention function the model would have called under ``previous``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if previous == "eager":
        # "eager" is not in the registry: each modeling file defines its own eager_attention_forward (with the
        # model's extras such as softcapping), which is what the model falls back to.
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        return fn if callable(fn) else _sdpa()
    if previous in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[previous]
    return _sdpa()


def _capture_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The registered attention function: hand the call to the active capture's callback, then delegate."""
    cap = _find_capture(module)
    if cap is None:
        # A model left switched to the capture name (its context exited abnormally elsewhere): behave like SDPA.
        return _sdpa()(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = float(scaling) if scaling is not None else float(query.shape[-1]) ** -0.5
    layer = cap.layer_index(module)
    cap.layers.add(layer)
    cap.calls += 1
    cap.callback(layer, query, key, value, attention_mask, scale, module)
    if cap.delegate is None:
        cap.delegate = _resolve_delegate(cap.previous, module)
    return cap.delegate(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _impl_name(previous: str) -> str:
    return CAPTURE_IMPL if previous == "sdpa" else f"{CAPTURE_IMPL}_{previous.replace('|', '_')}"


def _register(previous: str) -> str:
    """Register the capture function (and the wrapped implementation's mask function) under its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _impl_name(previous)
    AttentionInterface.register(name, _capture_attention_forward)
    if previous in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name


def _current_impl(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return impl or "sdpa"


@contextmanager
def capture_attention(model: nn.Module, callback: CaptureCallback) -> Iterator[Capture]:
    """Run ``model``'s attention through ``callback`` inside the ``with`` block; restore the implementation after.

    The model's outputs are unchanged (the previous implementation computes them). After a forward pass, call
    :meth:`Capture.require` to fail clearly on a model whose attention never reached the interface.
    """
    if not hasattr(model, "set_attn_implementation"):
        raise KVCompileError(
            f"{type(model).__name__} is not a transformers PreTrainedModel: load it with transformers "
            "(AutoModelForCausalLM) so its attention can be captured")
    previous = _current_impl(model)
    if previous.startswith(CAPTURE_IMPL):
        raise KVCompileError("this model is already being captured: do not nest captures of one model")
    name = _register(previous)
    cap = Capture(model=model, callback=callback, previous=previous)
    cap._modules = {id(m) for m in model.modules()}
    _ACTIVE.append(cap)
    try:
        model.set_attn_implementation(name)
        yield cap
    finally:
        _ACTIVE.remove(cap)
        if _current_impl(model) != previous:
            model.set_attn_implementation(previous)


# ---------------------------------------------------------------------------------------------- projections
def kv_projection_weight(
    module: nn.Module, role: str, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> Tensor | None:
    """The projection weight that produces ``role`` ("k" or "v") of an attention module, as ``[Hkv, d, hidden]``.

    Row block ``h`` is the slice ``h*d:(h+1)*d`` of the output rows, i.e. what produces KV head ``h``. Handles separate
    projections (``k_proj`` / ``v_proj``), Phi-3's fused ``qkv_proj`` (q, k, v stacked), GPT-NeoX's
    ``query_key_value`` (interleaved per head) and GPT-2's ``c_attn`` (a transposed Conv1D). Returns ``None`` for
    layouts it does not know.
    """
    H, d = num_kv_heads, head_dim
    which = {"k": 1, "v": 2}[role]
    w: Tensor | None = None
    proj = getattr(module, f"{role}_proj", None)
    if isinstance(getattr(proj, "weight", None), Tensor):
        w = proj.weight
    elif isinstance(getattr(getattr(module, "qkv_proj", None), "weight", None), Tensor):
        full = module.qkv_proj.weight  # rows: [q (Hq*d); k (H*d); v (H*d)]
        start = num_q_heads * d + (which - 1) * H * d
        w = full[start:start + H * d]
    elif isinstance(getattr(getattr(module, "query_key_value", None), "weight", None), Tensor):
        full = module.query_key_value.weight  # rows per head: [q (d); k (d); v (d)]
        if full.shape[0] != 3 * H * d:
            return None
        return full.detach().reshape(H, 3, d, -1)[:, which].float()
    elif isinstance(getattr(getattr(module, "c_attn", None), "weight", None), Tensor):
        full = module.c_attn.weight  # Conv1D: [hidden, 3 * E], columns q | k | v
        if full.shape[1] != 3 * H * d:
            return None
        w = full[:, which * H * d:(which + 1) * H * d].t()
    if w is None or w.dim() != 2 or w.shape[0] != H * d:
        return None
    return w.detach().float().reshape(H, d, -1)


def kv_weight_norms(
    module: nn.Module, role: str, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> list[dict[str, float]] | None:
    """Spectral and Frobenius norms of each KV head's slice of the K or V projection, or ``None`` if unknown."""
    w = kv_projection_weight(module, role, num_q_heads, num_kv_heads, head_dim)
    if w is None:
        return None
    w = w.cpu().double()
    # ||W||_2 = sqrt(largest eigenvalue of W W^T): a d x d eigenproblem, far cheaper than an SVD of [d, hidden]
    spectral = torch.linalg.eigvalsh(w @ w.transpose(-1, -2))[..., -1].clamp_min(0).sqrt()
    frob = torch.linalg.vector_norm(w, dim=(-2, -1))
    return [{"spectral": float(s), "frobenius": float(f)} for s, f in zip(spectral, frob, strict=True)]
