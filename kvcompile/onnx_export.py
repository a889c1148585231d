"""Export an artifact as an ONNX decoder-with-past over the packed quantized KV cache (``kvcompile export-onnx``).

Design
------
One graph serves prefill and decode of one sequence: it takes ``input_ids`` ``[1, sequence]`` plus the cache state
and returns ``logits`` ``[1, sequence, vocab]`` plus the new state (``present.*``, fed back as ``past.*``). Two axes
are dynamic: ``sequence`` (tokens of this call: a whole prompt, a chunk or one token) and ``past`` (tokens fed so
far). The batch is fixed at 1: every dynamic axis multiplies the cost of tracing, and without padding support a
batch could only hold sequences of equal length.

* A layer whose plan is fp16 everywhere keeps its whole past unquantized (``past.{i}.k`` / ``past.{i}.v``,
  ``[1, kv_heads, past, head_dim]``), as the runtime's ``DynamicLayer`` does.
* Any other layer keeps, per group of KV heads that share a (K format, V format) (the runtime's head groups):

  - ``past.{i}.g{j}.{k|v}.{codes,r}`` (or ``.data`` for fp16-format heads): the packed store, one row per token fed
    (``[1, heads, past, ...]``): uint8 planar codes and fp16 ``r``, exactly ``formats.quantize``'s output;
  - ``past.{i}.g{j}.{k|v}.sinks`` ``[1, heads, sinks, head_dim]``: the first tokens in full precision;
  - ``past.{i}.g{j}.{k|v}.window`` ``[1, heads, window + block - 1, head_dim]``: a fixed-size buffer of the most
    recent tokens in full precision (the oldest slots are empty until that many tokens were fed).

  K and V are centred by the calibrated means before they are stored when the plan says so.

Every token is quantized once, when it enters (``formats.quantize`` of the new tokens; every supported format is per
token, so this is the very result the runtime gets when the token later leaves its window), and its full-precision
copy goes to the window buffer (and the sinks). Attention then reads each past token in the representation the
PyTorch runtime holds at that step: sinks in full precision, tokens the runtime has flushed from the store
(``formats.dequantize``), the rest of the tail and the new tokens in full precision. What the runtime has flushed
follows its rule (:meth:`kvcompile.runtime.cache.QuantizedLayer.flush`) with the plan's own ``window``, ``sinks`` and
``block``: after ``past`` tokens, ``max(past - sinks - window, 0) // block * block`` tokens. That choice is a mask, not
a shape, so the state's shapes stay simple (static window, one store row per token) and prefill, decode, and any
chunk size in between follow the runtime step for step.

The quantization math is not rewritten here: the graph is traced from :mod:`kvcompile.formats` by ``torch.export``.
Two things need help on the way: the all-zero-codes fallback of ``nsep_quantize`` sits behind a data-dependent
``if`` that tracing cannot follow, so the trace takes that branch unconditionally (exact: the branch only replaces
codes of vectors that are all zero); and the stock ONNX translation of uint8 shifts goes through int8 casts, so
unsigned shifts are translated to plain ``BitShift`` (opset >= 18 also brings ``BitwiseAnd``/``BitwiseOr`` on uint8).

Output folder::

    OUT/
      model.onnx, model.onnx.data   the graph and its weights (external data, so any model size passes the checker)
      onnx_config.json              opset, IR version, plan, model identity, input/output names and shapes, SHA-256s
      tokenizer files               the model's tokenizer
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from kvcompile import __version__
from kvcompile.errors import KVCompileError
from kvcompile.formats import FP16, QTENSOR_FIELDS, KVFormat, dequantize, quantize
from kvcompile.kvparams import KVParams
from kvcompile.plan import Plan

ONNX_FORMAT = "kvcompile-onnx"
ONNX_FORMAT_VERSION = 1
OPSET = 18
CONFIG_FILE = "onnx_config.json"
MODEL_FILE = "model.onnx"
ATTN_NAME = "kvcompile_onnx"

#: ONNX element type names used in onnx_config.json, with their item sizes
DTYPE_BYTES = {"float32": 4, "float16": 2, "uint8": 1, "int64": 8}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}

#: symbolic axis names of the graph's inputs and outputs
SEQUENCE, PAST = "sequence", "past"
#: the graph runs one sequence at a time
BATCH = 1


class OnnxExportError(KVCompileError):
    """An artifact that cannot be exported to ONNX (unsupported format or architecture)."""


# ---------------------------------------------------------------------------------------------- state layout
@dataclass(frozen=True)
class GroupLayout:
    """KV heads of one layer that share a (K format, V format); one set of state tensors."""

    heads: tuple[int, ...]
    k: KVFormat
    v: KVFormat


@dataclass(frozen=True)
class LayerLayout:
    """How one layer's cache is held: ``plain`` (whole past unquantized) or quantized (store + sinks + window)."""

    plain: bool
    groups: tuple[GroupLayout, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape (ints, or axis names for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def layer_layouts(plan: Plan) -> list[LayerLayout]:
    """The state layout the graph uses for ``plan`` (the same grouping as the runtime's ``QuantizedLayer``)."""
    out = []
    for i, lp in enumerate(plan.layers):
        if plan.shape.sliding and plan.shape.sliding[i]:
            raise OnnxExportError(f"layer {i} uses sliding-window attention, which ONNX export does not support yet; "
                                  "export a model without sliding-window layers")
        for hp in lp.heads:
            for f in (hp.k, hp.v):
                if f.kind == "kivi":
                    raise OnnxExportError(f"layer {i} uses {f.name}: kivi formats are not supported for ONNX export "
                                          "yet; export an artifact built with nsep, int-token or fp16 formats")
        plain = all(hp.k == FP16 and hp.v == FP16 for hp in lp.heads)
        groups = tuple(GroupLayout(tuple(h), kf, vf) for (kf, vf), h in lp.groups().items())
        out.append(LayerLayout(plain, groups))
    return out


def window_slots(plan: Plan) -> int:
    """Rows of the full-precision window buffer: the runtime's tail never exceeds ``window + block - 1`` tokens."""
    return max(plan.window + plan.block - 1, 1)


def _store_specs(prefix: str, fmt: KVFormat, heads: int, d: int) -> list[TensorSpec]:
    """The packed store, one row per token (``formats.store_shapes`` with the token axis named ``past``)."""
    shapes = {"data": ("float16", (BATCH, heads, PAST, d)),
              "codes": ("uint8", (BATCH, heads, PAST, d * fmt.bits // 8)),
              "r": ("float16", (BATCH, heads, PAST))}
    return [TensorSpec(f"{prefix}.{name}", *shapes[name]) for name in QTENSOR_FIELDS[fmt.kind]]


def state_specs(plan: Plan, kv_dtype: str, prefix: str = "past") -> list[TensorSpec]:
    """Every cache-state tensor of the graph, in input order (``prefix`` ``past`` for inputs, ``present`` outputs)."""
    s = plan.shape
    d = s.head_dim
    specs: list[TensorSpec] = []
    for i, lay in enumerate(layer_layouts(plan)):
        if lay.plain:
            specs += [TensorSpec(f"{prefix}.{i}.{r}", kv_dtype, (BATCH, s.num_kv_heads, PAST, d)) for r in "kv"]
            continue
        for j, g in enumerate(lay.groups):
            for role, fmt in (("k", g.k), ("v", g.v)):
                p, h = f"{prefix}.{i}.g{j}.{role}", len(g.heads)
                specs += _store_specs(p, fmt, h, d)
                if plan.sinks:
                    specs.append(TensorSpec(f"{p}.sinks", kv_dtype, (BATCH, h, plan.sinks, d)))
                specs.append(TensorSpec(f"{p}.window", kv_dtype, (BATCH, h, window_slots(plan), d)))
    return specs


def io_specs(plan: Plan, kv_dtype: str, vocab: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the graph."""
    inputs = [TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)), *state_specs(plan, kv_dtype, "past")]
    outputs = [TensorSpec("logits", "float32", (BATCH, SEQUENCE, vocab)), *state_specs(plan, kv_dtype, "present")]
    return inputs, outputs


def spec_bytes(spec: TensorSpec, sizes: dict[str, int]) -> int:
    """Bytes of a tensor of ``spec`` with the dynamic axes set to ``sizes``."""
    return math.prod(sizes[a] if isinstance(a, str) else a for a in spec.shape) * DTYPE_BYTES[spec.dtype]


def past_bytes(specs: list[TensorSpec]) -> dict[str, int]:
    """Per sequence: ``per_token`` bytes every fed token adds to the state, ``fixed`` bytes of the sinks and window
    buffers (whatever the length)."""
    per_token = sum(spec_bytes(sp, {PAST: 1}) for sp in specs if PAST in sp.shape)
    fixed = sum(spec_bytes(sp, {}) for sp in specs if PAST not in sp.shape)
    return {"per_token": per_token, "fixed": fixed}


def layout_digest(plan: Plan, kv_dtype: str, vocab: int, model_sha: str | None) -> str:
    """SHA-256 of what the graph was built for (the model's config hash, the plan's semantics, the I/O layout);
    stored in the graph's metadata and in onnx_config.json, so a config that belongs to another export is
    recognised."""
    inputs, outputs = io_specs(plan, kv_dtype, vocab)
    sem = {k: v for k, v in plan.to_dict().items() if k != "meta"}
    blob = json.dumps({"model": model_sha, "plan": sem, "kv_dtype": kv_dtype, "inputs": [t.to_dict() for t in inputs],
                       "outputs": [t.to_dict() for t in outputs]}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- tracing helpers
class _TakeAllBranches(TorchFunctionMode):
    """Make ``bool(tensor)`` true while tracing a formats.py call.

    ``formats.nsep_quantize`` applies its all-zero-codes fallback only ``if bool(dead.any())``, a shortcut for eager
    speed that tracing cannot evaluate. The fallback itself is a ``torch.where`` that leaves every vector with a
    non-zero code untouched, so taking it unconditionally is exact, and the graph then handles all-zero vectors.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is torch.Tensor.__bool__:
            return True
        return func(*args, **(kwargs or {}))


def _unsigned_shift(direction: str, tensor_scalar: bool) -> Any:
    """An ONNX translation of ``aten.bitwise_{left,right}_shift`` that keeps unsigned types unsigned.

    torchlib's translation casts 8-bit operands to int8 around the shift (and sign-extends right shifts), which gives
    uint8 inputs the wrong type; packed codes are uint8, so unsigned operands get a plain ``BitShift``.
    """
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import core

    signed = {("LEFT", True): core.aten_bitwise_left_shift_tensor_scalar,
              ("LEFT", False): core.aten_bitwise_left_shift,
              ("RIGHT", True): core.aten_bitwise_right_shift_tensor_scalar,
              ("RIGHT", False): core.aten_bitwise_right_shift}[(direction, tensor_scalar)]

    def shift(self: Any, other: Any) -> Any:
        if self.dtype is not None and self.dtype.is_signed():
            return signed(self, other)
        if tensor_scalar or isinstance(other, int):
            other = op.Constant(value=ir.tensor(int(other), dtype=self.dtype))
        else:
            other = op.CastLike(other, self)
        return op.BitShift(self, other, direction=direction)

    return shift


def _translation_table() -> dict[Any, Any]:
    aten = torch.ops.aten
    return {
        aten.bitwise_left_shift.Tensor_Scalar: _unsigned_shift("LEFT", True),
        aten.bitwise_left_shift.Tensor: _unsigned_shift("LEFT", False),
        aten.bitwise_right_shift.Tensor_Scalar: _unsigned_shift("RIGHT", True),
        aten.bitwise_right_shift.Tensor: _unsigned_shift("RIGHT", False),
        aten.__lshift__.Scalar: _unsigned_shift("LEFT", True),
        aten.__rshift__.Scalar: _unsigned_shift("RIGHT", True),
    }


_ACTIVE: contextvars.ContextVar[DecoderStep | None] = contextvars.ContextVar("kvcompile_onnx_step", default=None)


def _onnx_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """The attention function the export registers: routes each layer to :meth:`DecoderStep.attend_layer`."""
    step = _ACTIVE.get()
    if step is None:
        raise RuntimeError("the kvcompile ONNX attention runs only inside DecoderStep.forward")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = step.attend_layer(int(module.layer_idx), query, key, value, float(scaling), kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask function of the export: the graph builds its own mask over the state and the new tokens."""
    return None


def register_attention() -> str:
    """Register the export's attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_NAME, _onnx_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _no_mask)
    return ATTN_NAME


def _attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scaling: float, softcap: float | None) -> Tensor:
    """GQA attention: q ``[B, Hq, T, d]``, k/v ``[B, Hkv, L, d]``, ``visible`` ``[T, L]`` (bool). fp32 softmax;
    returns ``[B, Hq, T, d]`` in q's dtype."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    # query heads h*rep .. h*rep+rep-1 read KV head h: fold them into the query axis instead of repeating K and V
    qf = q.float().reshape(b, hkv, rep * t, d)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible.repeat(rep, 1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.reshape(b, hq, t, d).to(q.dtype)


# ---------------------------------------------------------------------------------------------- the traced module
class DecoderStep(torch.nn.Module):
    """``forward(input_ids, past) -> (logits, *present)``: the module the export traces.

    It runs the unmodified transformers model with ``use_cache=False``; the registered attention function hands each
    layer's new K/V to :meth:`attend_layer`, which reads that layer's state, attends and builds its new state.
    It also runs eagerly (the tests use it as a reference for the exported graph).
    """

    def __init__(self, model: torch.nn.Module, plan: Plan, params: KVParams, kv_dtype: str) -> None:
        super().__init__()
        self.model, self.plan, self.kv_dtype = model, plan, kv_dtype
        self.layouts = layer_layouts(plan)
        self.specs = state_specs(plan, kv_dtype)
        self.tensors: dict[str, Tensor] = {}  # the state while forward runs: "past.*" read, "present.*" written
        self.masks: dict[str, Tensor] = {}
        rep = plan.shape.num_q_heads // plan.shape.num_kv_heads
        for i, lay in enumerate(self.layouts):
            if lay.plain:
                continue
            for role, on in (("k", plan.k_center), ("v", plan.v_center)):
                mean = params.mean(i, role) if on else None
                if on and mean is None:
                    raise OnnxExportError(f"the plan centres {role.upper()} but the artifact has no "
                                          f"layers.{i}.{role}.mean; rebuild the artifact")
                if mean is not None:
                    self.register_buffer(f"mean_{i}_{role}", mean.float()[None, :, None, :].clone())
            for j, g in enumerate(lay.groups):
                heads = list(g.heads)
                self.register_buffer(f"heads_{i}_{j}", torch.tensor(heads, dtype=torch.long))
                self.register_buffer(f"qheads_{i}_{j}", torch.tensor([h * rep + r for h in heads for r in range(rep)],
                                                                     dtype=torch.long))
                for role, fmt in (("k", g.k), ("v", g.v)):
                    if fmt.kind != "nsep":
                        continue
                    scale = params.scale(i, role)
                    if scale is None:
                        raise OnnxExportError(f"layer {i} {role.upper()} is nsep but the artifact has no "
                                              f"layers.{i}.{role}.scale; rebuild the artifact")
                    self.register_buffer(f"scale_{i}_{j}_{role}", scale.float()[heads].clone())
            if len(lay.groups) > 1:
                order = [h * rep + r for g in lay.groups for h in g.heads for r in range(rep)]
                inverse = torch.empty(len(order), dtype=torch.long)
                inverse[torch.tensor(order)] = torch.arange(len(order))
                self.register_buffer(f"unperm_{i}", inverse)

    def _buf(self, name: str) -> Tensor | None:
        return getattr(self, name, None)

    def past_length(self) -> Any:
        """Tokens already fed (a SymInt while tracing): the store length of layer 0."""
        lay = self.layouts[0]
        if lay.plain:
            return self.tensors["past.0.k"].shape[2]
        field = QTENSOR_FIELDS[lay.groups[0].k.kind][0]
        return self.tensors[f"past.0.g0.k.{field}"].shape[2]

    def forward(self, input_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, ...]:
        self.tensors = {sp.name: t for sp, t in zip(self.specs, past, strict=True)}
        b, t = input_ids.shape
        p = self.past_length()
        self.masks = self._masks(p, t, input_ids.device)
        positions = (torch.arange(t, device=input_ids.device) + p).expand(b, t)
        token = _ACTIVE.set(self)
        try:
            logits = self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
        finally:
            _ACTIVE.reset(token)
        present = [self.tensors["present" + sp.name[len("past"):]] for sp in self.specs]
        self.tensors, self.masks = {}, {}
        return (logits.float(), *present)

    def _masks(self, past: Any, t: Any, device: torch.device) -> dict[str, Tensor]:
        """Which keys each new token reads (shared by all layers), as ``[T, keys]`` booleans, and where the sinks'
        rows come from.

        Quantized layers lay their keys out as [sinks, store (one row per past token), window slots, new tokens]. With
        ``n`` tokens flushed by the runtime after ``past`` tokens, past token ``x`` is read from the sinks if
        ``x < sinks``, from the store if ``sinks <= x < sinks + n``, else from the window, whose slot ``k`` holds
        token ``past - slots + k``; new tokens are read causally. Plain layers read [past, new tokens].
        """
        plan, slots = self.plan, window_slots(self.plan)
        p = torch.scalar_tensor(past, dtype=torch.long, device=device)
        flushed = torch.clamp(p - plan.sinks - plan.window, min=0) // plan.block * plan.block
        rows = torch.arange(past, device=device)
        tok = torch.arange(t, device=device)
        causal = tok[None, :] <= tok[:, None]
        old = [rows.ge(plan.sinks) & rows.lt(plan.sinks + flushed),  # store rows the runtime has flushed
               torch.arange(slots, device=device) + (p - slots) >= plan.sinks + flushed]  # the rest of the tail
        if plan.sinks:
            sink_rows = torch.arange(plan.sinks, device=device)
            old.insert(0, sink_rows < p)
            # row j of the new sinks: the old row while j < past, else new token j - past (clamped: rows beyond the
            # tokens fed are never read)
            tt = torch.scalar_tensor(t, dtype=torch.long, device=device)
            src = torch.where(sink_rows < p, sink_rows, plan.sinks + torch.minimum(sink_rows - p, tt - 1))
        quant = torch.cat([torch.cat(old)[None, :].expand(t, -1), causal], dim=1)
        plain = torch.cat([torch.ones(t, past, dtype=torch.bool, device=device), causal], dim=1)
        out = {"quant": quant, "plain": plain}
        if plan.sinks:
            out["sink_src"] = src
        return out

    # ------------------------------------------------------------------ one layer
    def attend_layer(self, i: int, q: Tensor, k: Tensor, v: Tensor, scaling: float,
                     softcap: float | None) -> Tensor:
        """Attention of layer ``i`` over its state and the new K/V ``[B, Hkv, T, d]``; records the new state."""
        lay, st, kvd = self.layouts[i], self.tensors, _TORCH_DTYPES[self.kv_dtype]
        dtype = q.dtype
        if lay.plain:
            # the state holds kv_dtype: attend to the new tokens as they will be read back on later steps
            k, v = k.to(kvd).to(dtype), v.to(kvd).to(dtype)
            keys = torch.cat([st[f"past.{i}.k"].to(dtype), k], dim=2)
            values = torch.cat([st[f"past.{i}.v"].to(dtype), v], dim=2)
            st[f"present.{i}.k"], st[f"present.{i}.v"] = keys.to(kvd), values.to(kvd)
            return _attend(q, keys, values, self.masks["plain"], scaling, softcap)
        k_mean, v_mean = self._buf(f"mean_{i}_k"), self._buf(f"mean_{i}_v")
        if k_mean is not None:  # softmax is shift-invariant per query: centred keys give the same weights
            k = k - k_mean.to(dtype)
        if v_mean is not None:  # weights sum to one: the mean is added back to the output below
            v = v - v_mean.to(dtype)
        whole = len(lay.groups) == 1
        outs = []
        for j, g in enumerate(lay.groups):
            heads, qheads = self._buf(f"heads_{i}_{j}"), self._buf(f"qheads_{i}_{j}")
            kg = k if whole else k.index_select(1, heads)
            vg = v if whole else v.index_select(1, heads)
            qg = q if whole else q.index_select(1, qheads)
            keys = self._group_role(i, j, "k", g.k, kg, dtype)
            values = self._group_role(i, j, "v", g.v, vg, dtype)
            outs.append(_attend(qg, keys, values, self.masks["quant"], scaling, softcap))
        out = outs[0] if whole else torch.cat(outs, dim=1).index_select(1, self._buf(f"unperm_{i}"))
        if v_mean is not None:
            rep = q.shape[1] // v_mean.shape[1]
            out = out + v_mean.repeat_interleave(rep, dim=1).to(out.dtype)
        return out

    def _group_role(self, i: int, j: int, role: str, fmt: KVFormat, new: Tensor, dtype: torch.dtype) -> Tensor:
        """K or V of one head group: stores the new tokens (quantized into the store, full precision into the sinks
        and window) and returns the keys/values attention reads, laid out as :meth:`_masks` describes."""
        st = self.tensors
        pre = f"{i}.g{j}.{role}"
        kvd = _TORCH_DTYPES[self.kv_dtype]
        scale = self._buf(f"scale_{i}_{j}_{role}")
        # the full-precision copy is what the runtime's buffer holds and later quantizes (kv_dtype rounding included)
        held = new.to(kvd)
        new = held.to(dtype)
        store = {name: st[f"past.{pre}.{name}"] for name in QTENSOR_FIELDS[fmt.kind]}
        parts = [dequantize(store, fmt, role, scale).to(dtype)]  # type: ignore[arg-type]
        with _TakeAllBranches():
            rows = quantize(new, fmt, role, scale)  # type: ignore[arg-type]
        for name in QTENSOR_FIELDS[fmt.kind]:
            st[f"present.{pre}.{name}"] = torch.cat([store[name], rows[name].to(store[name].dtype)], dim=2)
        if self.plan.sinks:
            sinks = st[f"past.{pre}.sinks"]
            parts.insert(0, sinks.to(dtype))
            st[f"present.{pre}.sinks"] = torch.cat([sinks, held], dim=2).index_select(2, self.masks["sink_src"])
        window = st[f"past.{pre}.window"]
        parts += [window.to(dtype), new]
        st[f"present.{pre}.window"] = torch.cat([window, held], dim=2)[:, :, new.shape[2]:]
        return torch.cat(parts, dim=2)

    # ------------------------------------------------------------------ example inputs
    def random_state(self, past: int = 0, generator: torch.Generator | None = None) -> list[Tensor]:
        """A state of ``past`` tokens with random contents (codes uniform over all byte values)."""
        sizes = {PAST: past}
        out = []
        for sp in self.specs:
            shape = tuple(sizes[a] if isinstance(a, str) else a for a in sp.shape)
            if sp.dtype == "uint8":
                out.append(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator))
            elif sp.name.endswith(".r"):
                out.append((torch.rand(shape, generator=generator) + 0.5).half())
            else:
                out.append(torch.randn(shape, generator=generator).to(_TORCH_DTYPES[sp.dtype]))
        return out


# ---------------------------------------------------------------------------------------------- export
def _load_model(art: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of an artifact, loaded in fp32 on the CPU and checked to be the model the artifact was built
    for (as ``kvcompile.load`` checks it)."""
    from kvcompile.artifact import ArtifactError
    from kvcompile.models import load_model, model_identity, resolve_model

    artifact = art.path
    if art.has_model_weights:
        ref = str(art.path / "model")
    else:
        ref = art.model.get("path") if art.model.get("source") == "folder" else art.model.get("name")
    if not ref:
        raise ArtifactError(f"artifact {artifact} records no model reference; rebuild it")
    resolved = resolve_model(ref)
    model, tok = load_model(resolved, device="cpu", dtype=torch.float32)
    want, got = art.model.get("config_sha256"), model_identity(resolved, model.config).get("config_sha256")
    if want and got and want != got and not art.has_model_weights:
        raise ArtifactError(f"artifact {artifact} was built for model {art.model.get('name')!r} but {ref!r} is a "
                            "different model (config differs); restore the model it was built for")
    return model, tok


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress lines and warnings of its own; keep the CLI output to ours."""
    import io
    import logging

    log = logging.getLogger("torch.onnx")
    level = log.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(level)


def trace(step: DecoderStep, path: Path, digest: str) -> None:
    """Export ``step`` to ``path`` (weights as external data beside it) with the sequence and past axes dynamic."""
    from torch.export import Dim

    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise OnnxExportError("ONNX export needs the onnxscript package; install it with `pip install onnxscript`") \
            from e
    dims = {SEQUENCE: Dim(SEQUENCE, min=1), PAST: Dim(PAST, min=0)}
    # example sizes distinct from each other and from 0/1, so that export keeps every axis symbolic
    g = torch.Generator().manual_seed(0)
    vocab = int(step.model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (BATCH, 3), generator=g)
    past = step.random_state(past=step.plan.sinks + window_slots(step.plan) + 7, generator=g)
    inputs, outputs = io_specs(step.plan, step.kv_dtype, vocab)
    dynamic = ({1: dims[SEQUENCE]},
               [{ax: dims[a] for ax, a in enumerate(sp.shape) if isinstance(a, str)} for sp in inputs[1:]])
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                step, (ids, past), dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
                input_names=[sp.name for sp in inputs], output_names=[sp.name for sp in outputs],
                custom_translation_table=_translation_table(), optimize=True, verbose=False)
    except Exception as e:  # torch.export / onnxscript raise many types, with pages of detail
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OnnxExportError(f"tracing {type(step.model).__name__} for ONNX failed ({first[:300]}); this "
                              "architecture is not supported by the ONNX export yet") from e
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise OnnxExportError("torch.onnx.export returned no program")
    program.model.metadata_props.update({
        "kvcompile.format": ONNX_FORMAT,
        "kvcompile.layout_sha256": digest,
    })
    program.save(str(path), external_data=True)


def export_onnx(artifact: str | Path, out: str | Path, *, kv_dtype: str | None = None) -> Path:
    """Export ``artifact`` as an ONNX decoder-with-past over its packed KV cache into the folder ``out``.

    ``kv_dtype`` is the element type of the full-precision state (sinks, window, fp16-plan layers): by default the
    graph's compute type (float32), which reproduces ``kvcompile.load`` on the CPU exactly; ``"float16"`` halves
    those bytes at the cost of one rounding of each stored K/V. Writing is atomic. Returns ``out``.
    """
    import onnx

    from kvcompile.artifact import sha256_file, staging

    if kv_dtype not in (None, "float32", "float16"):
        raise OnnxExportError(f"kv_dtype must be float32 or float16, got {kv_dtype!r}")
    kv_dtype = kv_dtype or "float32"
    out = Path(out).resolve()
    if (out / "kvcompile.json").is_file():
        raise OnnxExportError(f"{out} is a kvcompile artifact; export the ONNX model to another folder")
    from kvcompile.artifact import read_artifact

    art = read_artifact(artifact)
    plan = art.plan
    layer_layouts(plan)  # refuse unsupported plans before the model is loaded
    model, tok = _load_model(art)
    register_attention()
    model.set_attn_implementation(ATTN_NAME)
    step = DecoderStep(model, plan, art.params, kv_dtype).eval()
    vocab = int(model.config.get_text_config().vocab_size)
    inputs, outputs = io_specs(plan, kv_dtype, vocab)
    digest = layout_digest(plan, kv_dtype, vocab, art.model.get("config_sha256"))
    with _replacing(out), staging(out) as tmp:
        trace(step, tmp / MODEL_FILE, digest)
        onnx.checker.check_model(str(tmp / MODEL_FILE))  # path-based: works past the 2 GB protobuf limit
        proto = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
        tok.save_pretrained(tmp)
        config = {
            "format": ONNX_FORMAT,
            "version": ONNX_FORMAT_VERSION,
            "kvcompile_version": __version__,
            "opset": int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
            "ir_version": int(proto.ir_version),
            "model": art.model,
            "artifact": {"path": str(art.path), "recipe": art.recipe.get("name"),
                         "manifest_sha256": sha256_file(art.path / "kvcompile.json")},
            "plan": plan.to_dict(),
            "kv_dtype": kv_dtype,
            "window_slots": window_slots(plan),
            "vocab_size": vocab,
            "eos_token_id": _eos_ids(model, tok),
            "layout_sha256": digest,
            "inputs": [sp.to_dict() for sp in inputs],
            "outputs": [sp.to_dict() for sp in outputs],
            "past_bytes": past_bytes(inputs[1:]),
            "usage": "feed present.* back as past.*; start with past = 0 tokens and zero sinks/window buffers",
        }
        config["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out


@contextlib.contextmanager
def _replacing(out: Path) -> Iterator[None]:
    """Let :func:`~kvcompile.artifact.staging` replace an earlier ONNX export at ``out`` (by itself it replaces only
    artifact folders): the old export is moved aside and put back if the new one fails."""
    if not (out / CONFIG_FILE).is_file():
        yield
        return
    old = out.with_name(f".{out.name}.old-onnx-{os.getpid()}")
    os.replace(out, old)
    try:
        yield
    except BaseException:
        if not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _eos_ids(model: Any, tok: Any) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(x) for x in src)
    return sorted(ids)
