"""Quantize-on-write: new K/V tokens -> packed codes + per-token multipliers, written in place into a store.

The runtime keeps, per layer and per group of KV heads, one store per role: the QTensor dict of
:func:`kvcompile.formats.quantize` with the token axis at its capacity. :func:`quantize_into` quantizes a chunk of
tokens and writes it at a token offset.

nsep and int-token (the formats on the hot path) run one fused Triton kernel, one program per (batch, head, block of
tokens): it reads the block once, computes per token the norm (nsep) or absmax (int-token), the rounded codes, the nsep
all-zero fallback and the stored multiplier ``r``, all in fp32 (nsep-2: the midrise grid ``{-3, -1, +1, +3}``, stored
``(q + 3) / 2``, without fallback), packs the codes in the planar layout of
:func:`kvcompile.formats.pack_codes` and writes codes and ``r``. It mirrors :func:`kvcompile.formats.nsep_quantize` /
:func:`kvcompile.formats.int_token_quantize` and is tested against them. Made for bandwidth: rounding and the float to
int step share one add (no conversion instructions), per-token scalars use fast rsqrt/division, and the rare fallback
search runs only in blocks that need it. kivi and fp16 are baselines: they go through :func:`kvcompile.formats.quantize`
and a copy.
"""

import torch
from torch import Tensor

from kvcompile import formats
from kvcompile.formats import KVFormat
from kvcompile.kernels._backend import backend_for, jit, next_pow2, tl, triton

__all__ = ["check_store", "quantize_into", "token_rows"]

_EPS = tl.constexpr(1e-12)  # the same floor formats.py puts under norms and multipliers
# Adding then subtracting 1.5 * 2^23 rounds an fp32 |x| < 2^22 to the nearest integer, ties to even: exactly
# torch.round. (libdevice.rint would do too, but Triton's interpreter cannot run libdevice, and it is a slower op.)
_ROUND_MAGIC = tl.constexpr(12582912.0)
_MAGIC_BITS = tl.constexpr(0x4B400000)  # the fp32 bit pattern of _ROUND_MAGIC


@jit
def _quantize_sym_kernel(
    x_ptr, s_ptr, codes_ptr, r_ptr,
    T, pos, H,
    sxb, sxh, sxt, sxc,
    scb, sch, sct,
    srb, srh, srt,
    BITS: tl.constexpr, P: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, NSEP: tl.constexpr, MID: tl.constexpr,
):
    """One program quantizes BLOCK_T tokens of one (batch, head): x [T, d] -> codes [T, M] uint8, r [T] fp16.

    The block is held as [BLOCK_T, D_PAD] with slot i * M_PAD + j holding channel i * M + j: the channel that packed
    byte j carries in bits [i * BITS, (i + 1) * BITS) (planar layout), so packing is a reshape to [BLOCK_T, P, M_PAD],
    one shift and a sum over the P axis. MID (nsep-2): the midrise grid of odd q in [-3, 3], stored (q + 3) / 2.
    """
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.arange(0, D_PAD)
    j = f % M_PAD
    chan = (f // M_PAD) * M + j
    cmask = j < M
    tmask = t < T
    mask = tmask[:, None] & cmask[None, :]

    x = tl.load(x_ptr + b * sxb + h * sxh + t[:, None] * sxt + chan[None, :] * sxc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if NSEP:
        s = tl.load(s_ptr + h * (P * M) + chan, mask=cmask, other=1.0).to(tl.float32)
        n2 = tl.sum(x * x, axis=1)  # [BLOCK_T]
        # u / s = x / (n s). Per-token scalars use the fast (few-ulp) sqrt, rsqrt and division: they move a code only
        # when u / s lies within a few ulp of a rounding tie, and r only below its fp16 rounding.
        inv_n = tl.rsqrt(tl.maximum(n2, _EPS * _EPS))
        ratio = x * inv_n[:, None] * (1.0 / s)[None, :]
    else:
        amax = tl.max(tl.abs(x), axis=1)
        r = amax / QMAX
        ratio = x * (1.0 / tl.maximum(r, _EPS))[:, None]
    # Round half to even (torch.round) with the 1.5 * 2^23 trick, after clamping to the code range (rounding a clamped
    # value equals clamping a rounded one here). The integer also comes out of the same add: for |v| < 2^22 the low
    # mantissa bits of v + 1.5 * 2^23 are round(v) + 2^22, so no float-to-int conversion (quarter rate) is needed.
    if MID:
        # midrise (nsep-2): the stored code c = round((clamp(u / s, -3, 3) + 3) / 2) in [0, 3] is the nearest odd
        # q = 2c - 3, exactly as formats.nsep_quantize computes it
        w = tl.minimum(tl.maximum(ratio, -3.0), 3.0) * 0.5 + 1.5
        big = w + _ROUND_MAGIC
        q = tl.where(cmask[None, :], (big - _ROUND_MAGIC) * 2.0 - 3.0, 0.0)  # padding slots (j >= M) hold no channel
        code = big.to(tl.int32, bitcast=True) - _MAGIC_BITS
    else:
        big = tl.minimum(tl.maximum(ratio, -QMAX * 1.0), QMAX * 1.0) + _ROUND_MAGIC
        q = big - _ROUND_MAGIC
        code = big.to(tl.int32, bitcast=True) - (_MAGIC_BITS - (QMAX + 1))  # offset-binary code q + 2^(b-1)

    if NSEP:
        sq = q * s[None, :]
        sq_norm2 = tl.sum(sq * sq, axis=1)
        # All-zero codes (||s * q|| = 0): the channel with the largest |u_c / s_c| (the first on ties, like
        # torch.argmax) gets sign(u_c), so the token keeps its norm and dominant direction instead of becoming a zero
        # vector. Rare (every |u_c / s_c| <= 1/2), so a block pays for the search only when it holds such a token.
        # (midrise codes are never zero: no fallback)
        if not MID:
            dead = sq_norm2 == 0.0
            if tl.max(dead.to(tl.int32), axis=0) > 0:
                # re-read the block rather than keep x and u / s alive (in registers) through the common path
                xr = tl.load(x_ptr + b * sxb + h * sxh + t[:, None] * sxt + chan[None, :] * sxc, mask=mask,
                             other=0.0)
                a = tl.where(mask, tl.abs(xr.to(tl.float32)) * (1.0 / s)[None, :], -1.0)  # |u / s| up to 1/n
                top = tl.min(tl.where(a == tl.max(a, axis=1)[:, None], chan[None, :], P * M), axis=1)
                pick = (chan[None, :] == top[:, None]) & dead[:, None]
                code = tl.where(pick, tl.where(xr < 0.0, QMAX, QMAX + 2), code)
                sq_norm2 = tl.where(dead, tl.sum(tl.where(pick, s * s, 0.0), axis=1), sq_norm2)
        r = tl.sqrt(n2) * tl.rsqrt(tl.maximum(sq_norm2, _EPS * _EPS))

    # packed planar: byte j = sum_i code(i * M + j) << (i * BITS)
    code = code << ((f // M_PAD) * BITS)[None, :]
    packed = tl.sum(tl.reshape(code, (BLOCK_T, P, M_PAD)), axis=1)  # [BLOCK_T, M_PAD]
    dst_t = pos + t
    jj = tl.arange(0, M_PAD)
    tl.store(codes_ptr + b * scb + h * sch + dst_t[:, None] * sct + jj[None, :], packed.to(tl.uint8),
             mask=tmask[:, None] & (jj < M)[None, :])
    tl.store(r_ptr + b * srb + h * srh + dst_t * srt, r.to(tl.float16), mask=tmask)


# ---------------------------------------------------------------------------------------------- host side
def token_rows(fmt: KVFormat, role: str, name: str, tokens: int) -> int:
    """Rows along the token axis that ``tokens`` tokens occupy in a store field (kivi keys: one per group)."""
    if fmt.kind == "kivi" and role == "k" and name in ("scale", "zero"):
        return tokens // fmt.group
    return tokens


def check_store(store: dict[str, Tensor], fmt: KVFormat, role: str, batch: int, heads: int, head_dim: int) -> int:
    """Validate a store against its format; return its token capacity. Raises ValueError with the mismatch."""
    fields = formats.QTENSOR_FIELDS[fmt.kind]
    missing = [f for f in fields if f not in store]
    if missing:
        raise ValueError(f"{fmt.name} {role} store lacks {', '.join(missing)} (has {', '.join(store) or 'nothing'})")
    first = store[fields[0]]
    if first.dim() != 4 or tuple(first.shape[:2]) != (batch, heads):
        raise ValueError(f"{fmt.name} {role} store {fields[0]} has shape {tuple(first.shape)}; expected "
                         f"[{batch}, {heads}, capacity, ...]")
    cap = first.shape[2]
    if fmt.kind == "fp16":
        width = head_dim
    else:
        width = head_dim * fmt.bits // 8
        if store["codes"].dtype != torch.uint8 or store["codes"].stride(-1) != 1:
            raise ValueError(f"{fmt.name} codes must be uint8 with contiguous rows, got {store['codes'].dtype} "
                             f"with strides {store['codes'].stride()}")
    if first.shape[3] != width:
        raise ValueError(f"{fmt.name} {role} store {fields[0]} has last dim {first.shape[3]}, expected {width}")
    return cap


def _copy_rows(store: dict[str, Tensor], qt: dict[str, Tensor], fmt: KVFormat, role: str, pos: int) -> None:
    for name, src in qt.items():
        row = token_rows(fmt, role, name, pos)
        store[name][:, :, row:row + src.shape[2]].copy_(src)


def quantize_into(x: Tensor, fmt: KVFormat, role: str, store: dict[str, Tensor], pos: int,
                  scale: Tensor | None = None) -> None:
    """Quantize new tokens ``x`` ``[B, H, T, d]`` (fp16/bf16/fp32) into ``store`` at token positions [pos, pos+T).

    kivi keys: ``pos`` and ``T`` must be multiples of the group; their scale/zero rows are written at ``pos // group``.
    ``scale`` is the nsep static scale ``[H, d]``. The result equals :func:`kvcompile.formats.quantize` (codes identical
    but for rare rounding ties; ``r`` to fp16 rounding). Nothing outside the target positions is written.
    """
    if x.dim() != 4:
        raise ValueError(f"quantize_into expects x of shape [B, H, T, d], got {tuple(x.shape)}")
    if role not in ("k", "v"):
        raise ValueError(f"role must be 'k' or 'v', got {role!r}")
    B, H, T, d = x.shape
    cap = check_store(store, fmt, role, B, H, d)
    if pos < 0 or pos + T > cap:
        raise ValueError(f"writing tokens [{pos}, {pos + T}) overflows the store's capacity {cap}")
    if fmt.kind == "kivi" and role == "k" and (pos % fmt.group or T % fmt.group):
        raise ValueError(f"kivi keys are written in whole groups of {fmt.group} tokens (pos {pos}, T {T})")
    if T == 0:
        return
    if fmt.kind == "nsep":
        if scale is None:
            raise ValueError("nsep needs its calibrated static scale")
        if tuple(scale.shape) != (H, d):
            raise ValueError(f"nsep scale has shape {tuple(scale.shape)}, expected [{H}, {d}]")
    if fmt.kind == "fp16":
        store["data"][:, :, pos:pos + T].copy_(x)
        return
    if fmt.kind == "kivi" or backend_for(x) == "torch":
        _copy_rows(store, formats.quantize(x, fmt, role, scale), fmt, role, pos)
        return

    per = 8 // fmt.bits
    m = d // per
    m_pad = next_pow2(m)
    codes, r = store["codes"], store["r"]
    s = scale.to(x.device, torch.float32).contiguous() if scale is not None else r  # r: unused placeholder pointer
    # ~4k elements per program: 8 KiB of fp16 in flight per program, and few enough registers (~130) for 4 programs
    # of 4 warps per SM
    block_t = max(1, min(next_pow2(T), 4096 // (per * m_pad)))
    grid = (B * H, triton.cdiv(T, block_t))
    _quantize_sym_kernel[grid](
        x, s, codes, r, T, pos, H,
        *x.stride(), *codes.stride()[:3], *r.stride(),
        BITS=fmt.bits, P=per, M=m, M_PAD=m_pad, D_PAD=per * m_pad, BLOCK_T=block_t, NSEP=fmt.kind == "nsep",
        MID=fmt.kind == "nsep" and formats.nsep_midrise(fmt.bits), num_warps=4,
    )
