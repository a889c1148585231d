"""KV-cache formats: the numerical truth of kvcompile.

This module is the only place a quantization formula is written. Kernels, the runtime, the profiler,
the ONNX exporter and the tests all call (or are checked against) the functions here.

Conventions
-----------
* A K or V tensor has shape ``[batch, kv_heads, tokens, head_dim]`` (``[B, H, T, d]``).
* Quantized tensors are plain dicts of tensors (``QTensor``); every format stores ``codes`` (packed uint8)
  plus its own metadata, listed in :data:`QTENSOR_FIELDS`.
* Static, calibrated parameters (nsep scales) have shape ``[H, d]`` and are broadcast over batch and tokens.

Formats (per token t, head h, channel c)
----------------------------------------
``fp16``
    stored as is (``{"data": x.half()}``).
``int-token`` (the seed's naive baseline)
    symmetric per-token absmax: ``r_t = max_c |x_tc| / qmax``, ``q_tc = round(x_tc / r_t)``, ``x_hat = r_t * q_t``.
    This is exactly nsep with ``s = 1`` and no norm separation, so kernels share one code path for both.
``kivi`` (baseline, KIVI)
    asymmetric b-bit. Keys: per channel, over groups of ``group`` consecutive tokens. Values: per token, over
    groups of ``group`` consecutive channels. ``scale = (max - min) / (2^b - 1)``, ``zero = min``,
    ``code = clamp(round((x - zero) / scale), 0, 2^b - 1)``, ``x_hat = code * scale + zero``.
``nsep`` (the core)
    ``n = ||x||``, ``u = x / n``; ``q_c = clamp(round(u_c / s_c), -L, L)`` (2 bits: the nearest odd integer) with a
    static per-(head, channel) scale ``s_c = alpha * P_c / L`` (``P_c`` a calibrated max or high percentile of
    ``|u_c|``), so the top level ``L * s_c`` is ``alpha * P_c``. ``L = nsep_levels(b)``: ``qmax = 2^(b-1) - 1``
    at 3, 4 and 8 bits (grid ``{-qmax, ..., qmax}``), 3 at 2 bits (see below).
    Stored: the codes and ``r = n / ||s * q||`` (fp16). Dequantize: ``x_hat = r * s * q``.
    If every code of a vector rounds to zero, the code of the channel with the largest ``|u_c| / s_c`` is set to
    ``sign(u_c)`` so the vector keeps its norm and its dominant direction instead of silently becoming zero.
``nsep`` at 2 bits: a midrise grid
    ``q`` takes the four odd values ``{-3, -1, +1, +3}`` (``L = 3``): ``q_c`` is the odd integer nearest to
    ``u_c / s_c``, clamped to ``[-3, 3]`` (computed as ``q = 2 * round((clamp(u/s, -3, 3) + 3) / 2) - 3``, round half
    to even, so an exact zero gives ``+1``). Why: the symmetric grid ``{-1, 0, +1}`` wastes one of the four codes, and
    since the components of a unit direction are small (``~1/sqrt(d)``) next to the calibrated top level, it rounds
    most of them to zero; the optimal 4-level quantizer of a Gaussian has ~40% lower MSE than the 3-level one
    (0.118 vs 0.190 sigma^2, Lloyd-Max). There is no zero level, so ``||s * q|| > 0`` always and the all-zero
    fallback never applies at 2 bits.

Symmetric codes (int-token, nsep) are stored offset-binary: ``stored = q + 2^(b-1)``, so ``q`` in
``[-qmax, qmax]`` with ``qmax = 2^(b-1) - 1`` maps to ``[1, 2^b - 1]``. nsep-2 (midrise) stores
``(q + 3) / 2`` in ``[0, 3]`` (all four codes used; ``q = 2 * stored - 3``). int-token keeps the symmetric grid at
every width (it is the naive baseline). Asymmetric codes (kivi) are stored as is.

Bit layout of packed codes (``pack_codes``)
-------------------------------------------
For b in {2, 4, 8}, P = 8 / b codes share a byte and ``d`` must be divisible by P. With ``m = d / P`` bytes per
vector, byte ``j`` holds channels ``j, j + m, j + 2m, ...`` at bit offsets ``0, b, 2b, ...`` (least significant
first). This "planar" layout lets a kernel unpack a block of tokens into P contiguous channel slices with one
shift and mask each, and pair each slice with a contiguous slice of the query: no interleaving shuffles.
3-bit codes do not fit a byte evenly and are therefore only available to simulated (fake) quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

FormatKind = Literal["fp16", "int-token", "kivi", "nsep"]
Role = Literal["k", "v"]
QTensor = dict[str, Tensor]

FORMAT_KINDS: tuple[str, ...] = ("fp16", "int-token", "kivi", "nsep")
PACKED_BITS: tuple[int, ...] = (2, 4, 8)
SIM_BITS: tuple[int, ...] = (2, 3, 4, 8)

#: the tensors a QTensor of each format holds, besides nothing else
QTENSOR_FIELDS: dict[str, tuple[str, ...]] = {
    "fp16": ("data",),
    "int-token": ("codes", "r"),
    "nsep": ("codes", "r"),
    "kivi": ("codes", "scale", "zero"),
}

_EPS = 1e-12


@dataclass(frozen=True)
class KVFormat:
    """One storage format for a K or V tensor of one head.

    ``kind`` is one of :data:`FORMAT_KINDS`; ``bits`` the code width (16 for fp16); ``group`` the KIVI group size
    (tokens for keys, channels for values), ignored by other formats.
    """

    kind: str = "fp16"
    bits: int = 16
    group: int = 32

    def __post_init__(self) -> None:
        if self.kind not in FORMAT_KINDS:
            raise ValueError(f"unknown KV format {self.kind!r}; expected one of {', '.join(FORMAT_KINDS)}")
        if self.kind == "fp16":
            if self.bits != 16:
                raise ValueError("fp16 format has 16 bits")
        elif self.bits not in SIM_BITS:
            raise ValueError(f"{self.kind} supports bits {SIM_BITS}, got {self.bits}")
        if self.kind == "kivi" and (self.group <= 0 or self.group & (self.group - 1)):
            raise ValueError(f"kivi group must be a power of two, got {self.group}")

    # ------------------------------------------------------------------ naming
    @property
    def name(self) -> str:
        """Short name used in plans and tables: ``fp16``, ``nsep-4``, ``int-token-4``, ``kivi-2g32``."""
        if self.kind == "fp16":
            return "fp16"
        if self.kind == "kivi":
            return f"kivi-{self.bits}g{self.group}"
        return f"{self.kind}-{self.bits}"

    @classmethod
    def parse(cls, name: str) -> KVFormat:
        """Inverse of :attr:`name`."""
        name = name.strip()
        if name == "fp16":
            return cls()
        kind, _, rest = name.rpartition("-")
        if kind == "kivi" or name.startswith("kivi-"):
            kind, rest = "kivi", name[len("kivi-") :]
            bits, _, group = rest.partition("g")
            return cls("kivi", int(bits), int(group or 32))
        if kind not in FORMAT_KINDS or not rest.isdigit():
            raise ValueError(f"cannot parse KV format {name!r} (examples: fp16, nsep-4, int-token-4, kivi-2g32)")
        return cls(kind, int(rest))

    @property
    def packable(self) -> bool:
        """Whether the runtime can store this format packed (3-bit is simulation only)."""
        return self.kind == "fp16" or self.bits in PACKED_BITS

    # ------------------------------------------------------------------ cost
    def bytes_per_token(self, head_dim: int, role: Role) -> float:
        """Stored bytes per token per head, per-token and per-group metadata included.

        Static per-layer parameters (nsep scales, centering vectors) do not grow with the context and are counted
        separately by :meth:`kvcompile.plan.Plan.static_bytes`.
        """
        d = head_dim
        if self.kind == "fp16":
            return 2.0 * d
        codes = d * self.bits / 8
        if self.kind in ("int-token", "nsep"):
            return codes + 2.0  # one fp16 multiplier r per token
        # kivi: fp16 scale + fp16 zero per group
        if role == "k":
            return codes + 4.0 * d / self.group  # per channel, shared by `group` tokens
        return codes + 4.0 * math.ceil(d / self.group)  # per token, one pair per channel group

    def bits_per_element(self, head_dim: int, role: Role) -> float:
        """Average stored bits per K/V element, metadata included."""
        return 8.0 * self.bytes_per_token(head_dim, role) / head_dim


FP16 = KVFormat()


# ---------------------------------------------------------------------------------------------- packing
def _check_bits(bits: int) -> int:
    if bits not in PACKED_BITS:
        raise ValueError(f"packed codes support bits {PACKED_BITS}, got {bits}")
    return 8 // bits


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned b-bit codes ``[..., d]`` (values in ``[0, 2^b)``) into uint8 ``[..., d * b / 8]``.

    Layout: see the module docstring (byte j holds channels j, j+m, j+2m, ... with m = d*b/8).
    """
    per = _check_bits(bits)
    d = codes.shape[-1]
    if d % per:
        raise ValueError(f"head_dim {d} is not divisible by {per} ({bits}-bit codes per byte)")
    c = codes.to(torch.uint8)
    if per == 1:
        return c.contiguous()
    m = d // per
    c = c.reshape(*c.shape[:-1], per, m)
    out = torch.zeros(*c.shape[:-2], m, dtype=torch.uint8, device=c.device)
    for i in range(per):
        out |= c[..., i, :] << (i * bits)
    return out


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., m]`` -> uint8 codes ``[..., m * 8 / b]``."""
    per = _check_bits(bits)
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.cat(parts, dim=-1)


def qmax_of(bits: int) -> int:
    """Largest symmetric code magnitude: ``2^(b-1) - 1``."""
    return (1 << (bits - 1)) - 1


def nsep_midrise(bits: int) -> bool:
    """Whether nsep at ``bits`` uses the midrise grid ``{-3, -1, +1, +3}`` (2 bits) instead of the symmetric one."""
    return bits == 2


def nsep_levels(bits: int) -> int:
    """nsep's top level ``L`` (``s = alpha * P / L``): 3 at 2 bits (midrise), ``2^(b-1) - 1`` otherwise."""
    return 3 if nsep_midrise(bits) else qmax_of(bits)


# ---------------------------------------------------------------------------------------------- int-token
def int_token_quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-token absmax. Returns signed integer codes ``[..., d]`` (int8) and ``r`` ``[...]`` (fp32)."""
    qmax = qmax_of(bits)
    xf = x.float()
    r = xf.abs().amax(dim=-1) / qmax
    q = torch.round(xf / r.clamp_min(_EPS).unsqueeze(-1)).clamp(-qmax, qmax)
    return q.to(torch.int8), r


# ---------------------------------------------------------------------------------------------- nsep
def nsep_scale(p: Tensor, bits: int, alpha: float | Tensor = 1.0) -> Tensor:
    """Static nsep scale ``s = alpha * P / L`` (``L = nsep_levels(bits)``) from direction statistics ``P`` (``[H, d]``).

    ``P`` is clamped away from zero so a channel never seen non-zero in calibration still gets a usable scale.
    """
    p = p.float().clamp_min(1e-6)
    if isinstance(alpha, Tensor):
        alpha = alpha.float().to(p.device)
        while alpha.dim() < p.dim():
            alpha = alpha.unsqueeze(-1)
    return alpha * p / nsep_levels(bits)


def nsep_quantize(x: Tensor, s: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Norm-separated quantization of ``x`` ``[B, H, T, d]`` with static scales ``s`` ``[H, d]``.

    Returns signed codes (int8, ``[B, H, T, d]``) and ``r = ||x|| / ||s * q||`` (fp32, ``[B, H, T]``).
    At 2 bits the codes are the odd values ``{-3, -1, +1, +3}`` (midrise grid, see the module docstring).
    """
    xf = x.float()
    sb = s.float().to(x.device)[:, None, :]  # [H, 1, d] broadcasts over [B, H, T, d]
    n = torch.linalg.vector_norm(xf, dim=-1)
    u = xf / n.clamp_min(_EPS).unsqueeze(-1)
    ratio = u / sb
    if nsep_midrise(bits):
        # nearest odd integer in [-3, 3]: stored code c = round((v + 3) / 2) in [0, 3], q = 2c - 3 (no zero level,
        # so the all-zero fallback below cannot apply)
        c = torch.round(ratio.clamp(-3.0, 3.0) * 0.5 + 1.5)
        q = c * 2.0 - 3.0
        sq_norm = torch.linalg.vector_norm(q * sb, dim=-1)
        return q.to(torch.int8), n / sq_norm.clamp_min(_EPS)
    qmax = qmax_of(bits)
    q = torch.round(ratio).clamp(-qmax, qmax)
    # All-zero codes: keep the dominant channel (largest |u_c| / s_c) at +-1 rather than a zero vector.
    dead = (q == 0).all(dim=-1)
    if bool(dead.any()):
        top = ratio.abs().argmax(dim=-1, keepdim=True)
        sign = torch.where(torch.gather(ratio, -1, top) < 0, -1.0, 1.0)
        fallback = torch.zeros_like(q).scatter_(-1, top, sign)
        q = torch.where(dead.unsqueeze(-1), fallback, q)
    sq_norm = torch.linalg.vector_norm(q * sb, dim=-1)
    r = n / sq_norm.clamp_min(_EPS)
    return q.to(torch.int8), r


def nsep_dequantize(q: Tensor, r: Tensor, s: Tensor) -> Tensor:
    """``x_hat = r * s * q`` (fp32)."""
    return r.float().unsqueeze(-1) * s.float().to(q.device)[:, None, :] * q.float()


# ---------------------------------------------------------------------------------------------- kivi
def _asym(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    levels = (1 << bits) - 1
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    scale = (mx - mn) / levels
    code = torch.round((x - mn) / scale.clamp_min(_EPS)).clamp(0, levels)
    return code.to(torch.uint8), scale, mn


def kivi_quantize(x: Tensor, bits: int, group: int, role: Role) -> tuple[Tensor, Tensor, Tensor]:
    """KIVI asymmetric quantization of ``x`` ``[B, H, T, d]``.

    Keys (``role="k"``): per channel over groups of ``group`` tokens; ``T`` must be a multiple of ``group``.
    Returns codes ``[B, H, T, d]`` and scale/zero ``[B, H, T / group, d]``.
    Values (``role="v"``): per token over groups of ``group`` channels (the last group may be shorter).
    Returns codes ``[B, H, T, d]`` and scale/zero ``[B, H, T, ceil(d / group)]``.
    """
    xf = x.float()
    B, H, T, d = xf.shape
    if role == "k":
        if T % group:
            raise ValueError(f"kivi keys are quantized in whole groups of {group} tokens, got {T}")
        g = xf.reshape(B, H, T // group, group, d)
        code, scale, zero = _asym(g, bits, dim=3)
        return code.reshape(B, H, T, d), scale.squeeze(3), zero.squeeze(3)
    ng = math.ceil(d / group)
    pad = ng * group - d
    xp = torch.nn.functional.pad(xf, (0, pad), mode="replicate") if pad else xf
    g = xp.reshape(B, H, T, ng, group)
    code, scale, zero = _asym(g, bits, dim=4)
    return code.reshape(B, H, T, ng * group)[..., :d], scale.squeeze(4), zero.squeeze(4)


def kivi_dequantize(code: Tensor, scale: Tensor, zero: Tensor, group: int, role: Role) -> Tensor:
    """Inverse of :func:`kivi_quantize` (fp32)."""
    c = code.float()
    if role == "k":
        sc = scale.float().repeat_interleave(group, dim=2)
        zr = zero.float().repeat_interleave(group, dim=2)
    else:
        d = c.shape[-1]
        sc = scale.float().repeat_interleave(group, dim=3)[..., :d]
        zr = zero.float().repeat_interleave(group, dim=3)[..., :d]
    return c * sc + zr


# ---------------------------------------------------------------------------------------------- codec
@dataclass
class FormatParams:
    """Static parameters of one layer's K or V: nsep scales ``s`` ``[H, d]`` (None for other formats)."""

    scale: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


def quantize(x: Tensor, fmt: KVFormat, role: Role, scale: Tensor | None = None) -> QTensor:
    """Quantize ``x`` ``[B, H, T, d]`` into the stored (packed) representation of ``fmt``.

    ``scale`` is the nsep static scale ``[H, d]`` (required for nsep, ignored otherwise).
    Multipliers and metadata are stored in fp16, as the runtime stores them.
    """
    if fmt.kind == "fp16":
        return {"data": x.to(torch.float16)}
    if not fmt.packable:
        raise ValueError(f"{fmt.name} cannot be stored packed; use fake_quantize for simulation")
    if fmt.kind == "int-token":
        q, r = int_token_quantize(x, fmt.bits)
        return {"codes": pack_codes((q + (1 << (fmt.bits - 1))).to(torch.uint8), fmt.bits), "r": r.half()}
    if fmt.kind == "nsep":
        if scale is None:
            raise ValueError("nsep needs its calibrated static scale")
        q, r = nsep_quantize(x, scale, fmt.bits)
        if nsep_midrise(fmt.bits):
            code = (q.float() + 3.0) * 0.5  # odd q in [-3, 3] -> [0, 3], exact
        else:
            code = q + (1 << (fmt.bits - 1))
        return {"codes": pack_codes(code.to(torch.uint8), fmt.bits), "r": r.half()}
    code, sc, zr = kivi_quantize(x, fmt.bits, fmt.group, role)
    return {"codes": pack_codes(code, fmt.bits), "scale": sc.half(), "zero": zr.half()}


def signed_codes(qt: QTensor, fmt: KVFormat) -> Tensor:
    """Unpack a symmetric format's codes to signed values ``q`` (float32) ``[..., d]`` (nsep-2: ``2 * code - 3``)."""
    c = unpack_codes(qt["codes"], fmt.bits).float()
    if fmt.kind == "nsep" and nsep_midrise(fmt.bits):
        return c * 2.0 - 3.0
    return c - float(1 << (fmt.bits - 1))


def dequantize(qt: QTensor, fmt: KVFormat, role: Role, scale: Tensor | None = None) -> Tensor:
    """Inverse of :func:`quantize`, returning fp32 ``[B, H, T, d]``."""
    if fmt.kind == "fp16":
        return qt["data"].float()
    if fmt.kind == "int-token":
        return qt["r"].float().unsqueeze(-1) * signed_codes(qt, fmt)
    if fmt.kind == "nsep":
        if scale is None:
            raise ValueError("nsep needs its calibrated static scale")
        return nsep_dequantize(signed_codes(qt, fmt), qt["r"], scale)
    return kivi_dequantize(unpack_codes(qt["codes"], fmt.bits), qt["scale"], qt["zero"], fmt.group, role)


def fake_quantize(x: Tensor, fmt: KVFormat, role: Role, scale: Tensor | None = None) -> Tensor:
    """Quantize then dequantize in fp32 without packing (simulated quantization; supports 3-bit too).

    Multipliers are not rounded to fp16 here, matching the seed papers' protocol. For kivi keys, ``T`` need not be a
    multiple of ``group``: a trailing partial group is quantized on its own.
    """
    if fmt.kind == "fp16":
        return x.float()
    if fmt.kind == "int-token":
        q, r = int_token_quantize(x, fmt.bits)
        return r.unsqueeze(-1) * q.float()
    if fmt.kind == "nsep":
        if scale is None:
            raise ValueError("nsep needs its calibrated static scale")
        q, r = nsep_quantize(x, scale, fmt.bits)
        return nsep_dequantize(q, r, scale)
    if role == "k":
        T = x.shape[2]
        full = T - T % fmt.group
        parts = []
        if full:
            c, s, z = kivi_quantize(x[:, :, :full], fmt.bits, fmt.group, "k")
            parts.append(kivi_dequantize(c, s, z, fmt.group, "k"))
        if full < T:
            rest = x[:, :, full:]
            c, s, z = kivi_quantize(rest, fmt.bits, T - full, "k")
            parts.append(kivi_dequantize(c, s, z, T - full, "k"))
        return torch.cat(parts, dim=2)
    c, s, z = kivi_quantize(x, fmt.bits, fmt.group, "v")
    return kivi_dequantize(c, s, z, fmt.group, "v")


# ---------------------------------------------------------------------------------------------- attention
def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scaling: float,
    q_positions: Tensor | None = None,
    k_positions: Tensor | None = None,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Plain fp32 softmax attention with GQA, the reference for every kernel.

    q ``[B, Hq, Tq, d]``; k, v ``[B, Hkv, Tk, d]`` with ``Hq % Hkv == 0``. If positions are given (``[Tq]`` and ``[Tk]``
    or per batch ``[B, T]``), key j is visible to query i iff ``k_pos[j] <= q_pos[i]`` (causal). ``key_valid``
    ``[B, Tk]`` (bool) masks padded keys. Returns ``[B, Hq, Tq, d]`` (fp32).
    """
    B, Hq, Tq, d = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scaling
    mask = torch.ones(B, 1, Tq, kf.shape[2], dtype=torch.bool, device=q.device)
    if q_positions is not None and k_positions is not None:
        qp = q_positions if q_positions.dim() == 2 else q_positions.unsqueeze(0)
        kp = k_positions if k_positions.dim() == 2 else k_positions.unsqueeze(0)
        mask = mask & (kp[:, None, None, :] <= qp[:, None, :, None])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, vf)


# ---------------------------------------------------------------------------------------------- storage layout
def store_shapes(fmt: KVFormat, role: Role, batch: int, heads: int, capacity: int,
                 head_dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors of a QTensor holding ``capacity`` tokens (the runtime's preallocated storage)."""
    b, h, t, d = batch, heads, capacity, head_dim
    if fmt.kind == "fp16":
        return {"data": (b, h, t, d)}
    codes = (b, h, t, d * fmt.bits // 8)
    if fmt.kind in ("int-token", "nsep"):
        return {"codes": codes, "r": (b, h, t)}
    meta = (b, h, t // fmt.group, d) if role == "k" else (b, h, t, math.ceil(d / fmt.group))
    return {"codes": codes, "scale": meta, "zero": meta}


def empty_store(fmt: KVFormat, role: Role, batch: int, heads: int, capacity: int, head_dim: int,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float16) -> QTensor:
    """Allocate uninitialised storage for ``capacity`` tokens (``dtype`` is used for fp16-format data only)."""
    out: QTensor = {}
    for name, shape in store_shapes(fmt, role, batch, heads, capacity, head_dim).items():
        dt = torch.uint8 if name == "codes" else (dtype if name == "data" else torch.float16)
        out[name] = torch.empty(shape, dtype=dt, device=device)
    return out


def token_axis_length(fmt: KVFormat, role: Role, name: str, tokens: int) -> int:
    """How many rows along the token axis (dim 2) tensor ``name`` of a store needs for ``tokens`` tokens."""
    if fmt.kind == "kivi" and role == "k" and name in ("scale", "zero"):
        return -(-tokens // fmt.group)
    return tokens


def slice_store(qt: QTensor, fmt: KVFormat, role: Role, tokens: int) -> QTensor:
    """The first ``tokens`` tokens of a store (views, no copy)."""
    return {name: t[:, :, : token_axis_length(fmt, role, name, tokens)] for name, t in qt.items()}
