"""The attention function kvcompile registers with transformers' ``AttentionInterface``.

Lowering switches a model's ``config._attn_implementation`` to ``"kvcompile"``. The model code is not forked: every
attention module still projects Q/K/V, applies RoPE and calls ``past_key_values.update``; our cache returns the new
tokens tagged with their :class:`~kvcompile.runtime.cache.QuantizedLayer`, and this function attends over the packed
past:

* decode (one query token, ``mode="fused"``): the fused Triton kernel over packed codes + fp sinks/tail
  (:func:`kvcompile.kernels.decode.decode_attention`), batched, GQA-aware, left padding via per-sequence starts;
* prefill / chunks (and every step in ``mode="reference"``): the past is dequantized transiently (formats.py) and
  attended with SDPA together with the full-precision new chunk.

Untagged calls (no cache, sliding-window or fp16 layers) go to transformers' SDPA (or eager, for soft-capping).
The mask function registered under the same name is transformers' SDPA mask, so padding and sliding windows arrive
as the usual 4D boolean masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from kvcompile.formats import dequantize, slice_store
from kvcompile.kernels.decode import decode_attention
from kvcompile.runtime.cache import HeadGroup, QuantizedLayer, profile_range

ATTN_NAME = "kvcompile"


def _eager(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float,
           softcap: float | None, causal_offset: int | None) -> Tensor:
    """Attention of ``[B, Hq, T, d]`` queries over ``[B, Hkv, L, d]`` keys (GQA); returns ``[B, Hq, T, d]``.

    ``mask`` is transformers' 4D boolean mask; without one, queries sit at positions ``causal_offset + i`` and
    attend causally.
    """
    t, length = query.shape[2], key.shape[2]
    if softcap is None:
        gqa = query.shape[1] != key.shape[1]
        if mask is None and causal_offset == 0 and t == length:
            # plain causal prefill: let SDPA pick its fused (flash / memory-efficient) kernel
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                                    scale=scaling, enable_gqa=gqa)
        if mask is None and causal_offset is not None:
            mask = _causal(t, length, causal_offset, query.device)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                                enable_gqa=gqa)
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None and causal_offset is not None:
        mask = _causal(t, length, causal_offset, query.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value)


def _causal(t: int, length: int, offset: int, device: torch.device) -> Tensor:
    qpos = torch.arange(t, device=device) + offset
    return (torch.arange(length, device=device)[None, :] <= qpos[:, None])[None, None]


def _group_past(layer: QuantizedLayer, g: HeadGroup, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Keys/values of a head group in position order: sinks, dequantized packed tokens, tail (incl. the new chunk)."""
    s = min(layer.sinks, layer.n_fp)
    parts_k, parts_v = [g.fp_k[:, :, :s].to(dtype)], [g.fp_v[:, :, :s].to(dtype)]
    if layer.n_quant:
        kq = slice_store(g.k_store, g.kfmt, "k", layer.n_quant)
        vq = slice_store(g.v_store, g.vfmt, "v", layer.n_quant)
        parts_k.append(dequantize(kq, g.kfmt, "k", g.k_scale).to(dtype))
        parts_v.append(dequantize(vq, g.vfmt, "v", g.v_scale).to(dtype))
    parts_k.append(g.fp_k[:, :, s:layer.n_fp].to(dtype))
    parts_v.append(g.fp_v[:, :, s:layer.n_fp].to(dtype))
    return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)


def attend(layer: QuantizedLayer, query: Tensor, mask: Tensor | None, scaling: float,
           softcap: float | None = None) -> Tensor:
    """Attention of ``query`` ``[B, Hq, T, d]`` over everything the layer holds. Returns ``[B, Hq, T, d]``."""
    b, hq, t, d = query.shape
    rep = hq // (sum(len(g.heads) for g in layer.groups))
    outs: list[Tensor] = []
    fused = t == 1 and layer.mode == "fused"
    seq_start = layer.step.seq_start_from_mask(mask) if fused else None
    if layer.step.static:
        # graph capture: size the launch by the storage, the kernel reads the real lengths from layer.lens
        n_quant, n_fp = layer.quant_capacity, layer.fp_capacity()
    else:
        n_quant, n_fp = layer.n_quant, layer.n_fp
    for g in layer.groups:
        if len(layer.groups) == 1:
            qg = query
        else:
            qg = query.index_select(1, _query_index(g, rep, query.device))
        if fused:
            o = decode_attention(qg[:, :, 0], g.k_store, g.v_store, g.kfmt, g.vfmt, n_quant, g.fp_k, g.fp_v,
                                 n_fp, layer.sinks, scaling, k_scale=g.k_scale, v_scale=g.v_scale,
                                 seq_start=seq_start, softcap=softcap, lens=layer.lens).unsqueeze(2)
        else:
            k, v = _group_past(layer, g, query.dtype)
            o = _eager(qg, k, v, mask, scaling, softcap, causal_offset=k.shape[2] - t)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else _scatter_heads(layer, outs, rep, query)
    if layer.v_mean is not None:  # values were stored centred; probabilities sum to one, so add the mean back
        if layer.v_mean_q is None or layer.v_mean_q.dtype != out.dtype:
            layer.v_mean_q = layer.v_mean.repeat_interleave(rep, dim=1).to(out.dtype)
        out = out + layer.v_mean_q
    return out


def _query_index(g: HeadGroup, rep: int, device: torch.device) -> Tensor:
    """The query heads served by the KV heads of a group (made once: no host-to-device copy per step)."""
    if g.qidx is None or g.qidx.device != device:
        g.qidx = torch.tensor([h * rep + j for h in g.heads for j in range(rep)], device=device)
    return g.qidx


def _scatter_heads(layer: QuantizedLayer, outs: list[Tensor], rep: int, query: Tensor) -> Tensor:
    out = torch.empty_like(query)
    for g, o in zip(layer.groups, outs, strict=True):
        out.index_copy_(1, _query_index(g, rep, query.device), o.to(out.dtype))
    return out


def kvcompile_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention-interface entry point (see the module docstring)."""
    layer = getattr(key, "_kvc_layer", None)
    softcap = kwargs.get("softcap")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        out = _eager(query, key, value, attention_mask, scaling, softcap,
                     causal_offset=key.shape[2] - query.shape[2])
        return out.transpose(1, 2).contiguous(), None
    with profile_range("kvcompile.attend"):
        out = attend(layer, query, attention_mask, scaling, softcap)
    if not layer.step.static:  # (graph mode: the host flushes between replays, see runtime/graph.py)
        layer.flush()  # the new tokens have been attended in full precision; now quantize what left the window
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function and its mask function under :data:`ATTN_NAME` (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvcompile_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
