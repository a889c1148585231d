"""Fused decode attention over a packed quantized KV cache plus its fp16 sinks and tail.

One query token per sequence attends to ``n_quant`` quantized tokens (read packed, never dequantized to memory) and to
``n_fp`` full-precision slots. Two Triton kernels:

1. ``_decode_split_kernel``, grid ``(B * Hkv, num_splits [+ 1])``. Program ``(b*h, s)`` with ``s < num_splits`` takes
   one contiguous chunk of the quantized tokens of KV head ``h``; the extra last program (when ``n_fp > 0``) takes
   the fp16 slots. Each program serves all ``G = Hq / Hkv`` query heads of its KV head, so every packed byte is read
   from HBM once. Per block of ``BLOCK_N`` tokens it

   * loads the packed key rows as 32-bit words ``[BLOCK_N, m/4]`` (m = d*b/8 bytes) and unpacks them one bit-slice
     at a time (P = 8/b slices): in the planar layout slice ``i`` of every byte is the contiguous channel range
     ``[i*m, (i+1)*m)``, so a slice is one mask per pair of codes, with no shuffles between channels. The masked
     16-bit lanes are read directly as fp16 (subnormal) numbers ``code * 2^(i*b - 24)``: no int-to-float
     conversion, whose quarter-rate throughput would otherwise bound the kernel (see :func:`_unpack`);
   * scores the block with one tensor-core dot per slice against the query, which was pre-scaled once per program by
     the static nsep scale, the softmax scale and log2(e): ``score_t = r_t * sum_c (q_c s_c) code_tc`` (int-token:
     s = 1; kivi: against the query times the tile's per-channel group scales, plus the query's sum with the zeros,
     see :func:`_kivi_kw`; fp16: plain);
   * updates an online softmax (base 2) and accumulates ``sum_t (p_t r_t) code_t`` with one dot per value slice
     and byte of a 16-bit lane; the static value scale ``s`` is applied once at the end. The values' dot reduces
     over tokens, so its operand must pair *tokens* in each 32-bit register, while a packed word pairs channels.
     Packed values are therefore read as 16-bit lanes and transposed while still packed (:func:`_load_lanes_t`;
     the compiler does it with ``ldmatrix.trans`` from the pipelined shared-memory buffer), and the lanes of two
     neighbouring tokens are joined into one word before masking: the masked words are then the dot's operand as
     they stand. Transposing the unpacked fp16 codes instead (the previous kernel) cost a shared-memory round trip
     of 4-8x the bytes per tile (H200, Llama-3-8B shape, batch 8, 32k: nsep-2 134.7 -> 67.4 us, nsep-4 105.8 ->
     85.3 us).

   The value tiles of 32-byte rows are loaded in blocks of 8 lanes (:func:`_load_lanes_t`, ``LB``), which keeps the
   transposing ``ldmatrix`` free of bank conflicts in Triton's unswizzled pipeline buffer. The softmax denominator
   and ``sum_t p_t r_t`` are kept as per-thread partial sums over row groups (:func:`_rows8`) and reduced across
   threads once, after the loop.

   Stored codes are unsigned, ``q = code - 2^(b-1)`` (nsep-2: midrise, ``q = 2 code - 3``, see
   :mod:`kvcompile.formats`). The offset never touches the unpacked tiles: keys remove it through the query's sum
   (``q . (code - o) = q . code - o sum(q)``; nsep-2's factor 2 goes into the score multiplier), values accumulate
   the raw codes plus an elementwise running ``sum_t p_t r_t`` (reduced once after the loop), and the output is
   ``acc - o sum_t p_t r_t`` (nsep-2: ``2 acc - 3 sum_t p_t r_t``). Partials stay plain unnormalized sums, so the
   merge is the same for every format.

   Tokens are the MMA M dimension (``[BLOCK_N, d] @ [d, G]``): the unpacked codes are the dot's A operand and the
   query the small loop-invariant B operand, with ``G`` padded to a power of two (>= 8). Each program writes its
   partial (max, sum, unnormalized output) in fp32. Packed formats run one warp per program on 64-token tiles (see
   :class:`DecodeConfig`): the softmax's reductions over tokens then stay inside a warp (no shared-memory round trip
   and barrier per block), and many small programs per SM hide each other's latencies.
2. ``_merge_kernel``, grid ``(B * Hq,)``: combines the partials of each query head by log-sum-exp and writes the
   output in the query's dtype. With a single program per KV head the split kernel writes the output itself.

On Hopper GPUs the common case (packed nsep / int-token keys and values of 2 or 4 bits at head_dim 128) runs the split
programs in Gluon instead (:mod:`kvcompile.kernels.decode_gluon`: the same math and partials, operands built in
registers; on an H200 up to 1.6x faster, and within 1 % at the one measured shape where it is not faster,
benchmarks/RESULTS.md §1a″; current figures §1a⁹), followed by its own merge kernel where a KV head has at most 64
partials (:func:`kvcompile.kernels.decode_gluon.merge`), else by ``_merge_kernel``, either launched as the split
kernel's programmatic dependent.
``DecodeConfig.gluon = 0`` keeps this module's split kernel everywhere.

Masks: only left padding (``seq_start``); the decode token sees every cached key. ``softcap`` applies Gemma-2's
``softcap * tanh(score / softcap)``. Everything is checked against :func:`decode_attention_reference`, which
dequantizes through :mod:`kvcompile.formats` and runs :func:`kvcompile.formats.reference_attention`.
"""

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Self

import torch
from torch import Tensor

from kvcompile import formats
from kvcompile.formats import KVFormat
from kvcompile.kernels import decode_gluon
from kvcompile.kernels._backend import backend_for, jit, next_pow2, num_sms, tl
from kvcompile.kernels.quantize import check_store, token_rows

__all__ = ["DecodeConfig", "decode_attention", "decode_attention_reference", "pick_num_splits"]

_LOG2E = 1.4426950408889634
# DecodeConfig.gluon_claim's default where keys and values are both 4-bit: the share of a split's even part of its
# KV head's tiles that is a fixed range (the rest handed out at run time); elsewhere 0 (see DecodeConfig)
CLAIM_DEFAULT = 90
CLAIM_MIN_TILES = 8  # fixed tiles per split program below which a launch does not claim
# tiles per split program below which 2-bit keys keep fp16 scores by default: the int8 query's preparation costs a
# short program more than its loop gains (DecodeConfig.gluon_i8)
I8_MIN_TILES = 8
# kinds of a K or V source, as the kernel sees them
_FP, _SYM, _KIVI = 0, 1, 2
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked block then gives exp2(0) * 0, never NaN
_TWO24 = tl.constexpr(16777216.0)  # 2^24: unpacked codes are fp16 subnormals code * 2^-24, see _unpack
_KIVI_VGROUPS = 16  # kivi values: the kernel keeps the zeros' sums of at most this many channel groups per head
_KIVI_VG = tl.constexpr(_KIVI_VGROUPS)


# ---------------------------------------------------------------------------------------------- Triton
@jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    # fp32 models get exact fp32 products (slow, never a hot path); fp16/bf16 run on tensor cores
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@jit
def _slot_chan(KIND: tl.constexpr, SL: tl.constexpr, M: tl.constexpr, MP: tl.constexpr):
    """Channel held by each slot of slice SL of an unpacked tile, and whether the slot is a real channel.

    fp16 data: slot = channel. Packed codes: :func:`_unpack` emits the 4 bytes of a word in the order 0, 2, 1, 3
    (so that the halves of one 32-bit register are adjacent slots), i.e. the two low bits of the slot are swapped.
    The dot is indifferent to the order of its reduction axis as long as both operands agree, so the query (and the
    output) are simply gathered in the same order.
    """
    s = tl.arange(0, MP)
    if KIND == 0:
        j = s
    else:
        j = (s & ~3) | ((s & 1) << 1) | ((s >> 1) & 1)
    return SL * M + j, j < M


@jit
def _unpack(x, SL: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, MP: tl.constexpr):
    """Bit-slice SL of packed words x [BLOCK_N, MP/4] (uint32) -> fp16 ``code * 2^(SL*BITS - 24)``, exactly.

    In the planar layout bit-slice SL of every byte holds one contiguous channel range. Masking a word in place leaves
    in each 16-bit lane the integer ``code << (SL * BITS)``, and those bits read as fp16 *are* the number
    ``code * 2^(SL*BITS - 24)`` (a subnormal): codes become fp16 two at a time with one logic op and no conversion
    instruction (integer-to-float conversions run at a quarter of the ALU rate and would bound the kernel). The two
    halves of one register are adjacent slots of the join below, so the compiler leaves them in place. Products with
    fp16 operands are exact in the fp32 accumulators; callers fold the power of two into the query or the output.
    """
    MASK: tl.constexpr = (((1 << BITS) - 1) << (SL * BITS)) * 0x10001
    y0 = x & MASK  # bytes 0 and 2 of each word
    y1 = (x >> 8) & MASK  # bytes 1 and 3
    lo0 = y0.to(tl.uint16).to(tl.float16, bitcast=True)
    hi0 = (y0 >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    lo1 = y1.to(tl.uint16).to(tl.float16, bitcast=True)
    hi1 = (y1 >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(tl.join(lo0, lo1), tl.join(hi0, hi1)), (BLOCK_N, MP))


@jit
def _load_tile(ptr, st, t, tmask, KIND: tl.constexpr, M: tl.constexpr, MP: tl.constexpr):
    """Rows of tokens t: fp16 data [BLOCK_N, MP] or packed codes as 32-bit words [BLOCK_N, MP/4]."""
    if KIND == 0:
        c = tl.arange(0, MP)
        tile = tl.load(ptr + t[:, None] * st + c[None, :], mask=tmask[:, None] & (c < M)[None, :], other=0.0)
    else:
        w = tl.arange(0, MP // 4)
        tile = tl.load(ptr + t[:, None] * st + w[None, :], mask=tmask[:, None] & (w < M // 4)[None, :], other=0)
        tile = tile.to(tl.uint32, bitcast=True)
    return tile


@jit
def _load_lanes_t(ptr, st, n0, hi, BLOCK_N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, LB: tl.constexpr):
    """Packed rows of tokens [n0, n0 + BLOCK_N) as 16-bit lanes (lane j = bytes 2j, 2j+1 of a row), transposed, two
    tokens per word: [MP/2, BLOCK_N/2] uint32, word (j, i) = lane j of token 2i (low half) and of token 2i+1 (high).

    The transposition happens on the packed data (2 to 8 times fewer bytes than the unpacked codes), and masking a
    word gives two tokens' codes of one channel, which is what the values' dot wants in each register of its A
    operand (the reduction runs over tokens): the unpacked codes feed the tensor cores without a shared-memory
    transpose. The host guarantees BLOCK_N even and M a multiple of 4 bytes (:func:`_word_readable`).

    LB > 0: the tile is loaded as ``[MP/(2 LB) * BLOCK_N, LB]``, row ``cb * BLOCK_N + token`` holding lanes
    ``[cb*LB, (cb+1)*LB)`` of the token. The pipelined shared-memory buffer keeps the loaded order, unswizzled (Triton
    swizzles only buffers that feed a dot directly), so this order decides the bank conflicts: with LB = 8 the
    8 tokens x 16 bytes that one transposing ldmatrix reads are 128 contiguous bytes (no conflict), but each 16-byte
    asynchronous copy now comes from a different row, which costs the copies shared-memory wavefronts (Nsight: ~30
    instead of 4 per copy instruction). LB = 0: plain ``[BLOCK_N, MP/2]`` rows, whole-row copies, and for 64-byte
    rows a 4-way conflict per ldmatrix. Which wins depends on the row size (:meth:`DecodeConfig.v_lanes_for`).
    """
    p16 = ptr.to(tl.pointer_type(tl.uint16))
    if LB == 0:
        t = n0 + tl.arange(0, BLOCK_N)
        j = tl.arange(0, MP // 2)
        tile = tl.load(p16 + t[:, None] * (2 * st) + j[None, :], mask=(t < hi)[:, None] & (j < M // 2)[None, :],
                       other=0)
        tile = tl.trans(tile.to(tl.uint16, bitcast=True))  # [MP/2, BLOCK_N]
    else:
        NCB: tl.constexpr = MP // (2 * LB)
        rr = tl.arange(0, NCB * BLOCK_N)
        t = n0 + rr % BLOCK_N
        j = (rr // BLOCK_N)[:, None] * LB + tl.arange(0, LB)[None, :]
        tile = tl.load(p16 + t[:, None] * (2 * st) + j, mask=(t < hi)[:, None] & (j < M // 2), other=0)
        tile = tl.permute(tl.reshape(tile.to(tl.uint16, bitcast=True), (NCB, BLOCK_N, LB)), (0, 2, 1))
        tile = tl.reshape(tile, (MP // 2, BLOCK_N))
    ev, od = tl.split(tl.reshape(tile, (MP // 2, BLOCK_N // 2, 2)))
    return ev.to(tl.uint32) | (od.to(tl.uint32) << 16)  # [MP/2, BLOCK_N/2]: lane j of tokens 2i (low), 2i+1


@jit
def _vdot(vt, SL: tl.constexpr, HI: tl.constexpr, BITS: tl.constexpr, pv, acc, alpha, DT: tl.constexpr,
          IEEE: tl.constexpr):
    """acc * alpha + codes @ pv: the codes of bit-slice SL in byte HI of every lane of vt [MP/2, BLOCK_N/2] (see
    :func:`_load_lanes_t`), as an [MP/2, BLOCK_N] tile of fp16 ``code * 2^(SL*BITS - 24)`` like :func:`_unpack`
    makes; row j is channel ``SL*M + 2j + HI``."""
    MASK: tl.constexpr = (((1 << BITS) - 1) << (SL * BITS)) * 0x10001
    if HI:
        x = (vt >> 8) & MASK
    else:
        x = vt & MASK
    lo = x.to(tl.uint16).to(tl.float16, bitcast=True)
    hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    a = tl.reshape(tl.join(lo, hi), (vt.shape[0], 2 * vt.shape[1])).to(DT)
    NBW: tl.constexpr = acc.shape[1] // alpha.shape[0]  # kivi: one column block per channel group
    if NBW == 1:
        acc = acc * alpha[None, :]
    else:
        acc = tl.reshape(tl.reshape(acc, (acc.shape[0], NBW, alpha.shape[0])) * alpha[None, None, :], acc.shape)
    return _mma(a, pv, acc, IEEE)


@jit
def _kivi_kw(qk, ka_ptr, kb_ptr, skmt, n0, hi, SL: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
             GROUP: tl.constexpr, NB: tl.constexpr, G_PAD: tl.constexpr):
    """kivi keys, slice SL: the query slice qk [MP, G_PAD] (fp32, slot order) times each token group's scales,
    [MP, NB * G_PAD] (column block b = token group ``n0 // GROUP + b``), and ``sum_c q_c zero_c`` [NB, G_PAD].

    A key is ``code * scale + zero`` with scale/zero per channel and group of GROUP tokens, so a score is
    ``sum_c code_c (q_c scale_c) + sum_c q_c zero_c``: the dot runs on the raw codes against the query times the
    scales (one column block per token group of the tile; each row keeps its own block afterwards), and the codes
    are never dequantized element by element.
    """
    chan, real = _slot_chan(2, SL, M, MP)
    tg = n0 // GROUP + tl.arange(0, NB)
    msk = real[:, None] & (tg * GROUP < hi)[None, :]
    off = tg[None, :] * skmt + chan[:, None]
    sc = tl.load(ka_ptr + off, mask=msk, other=0.0).to(tl.float32)  # [MP, NB]
    ze = tl.load(kb_ptr + off, mask=msk, other=0.0).to(tl.float32)
    w = tl.reshape(qk[:, None, :] * sc[:, :, None], (MP, NB * G_PAD))
    qz = tl.sum(qk[:, None, :] * ze[:, :, None], axis=0)  # [NB, G_PAD]
    return w, qz


@jit
def _pick_block(x, blk, NB: tl.constexpr, G_PAD: tl.constexpr):
    """x [R, NB * G_PAD] -> [R, G_PAD]: row i keeps column block blk[i] (zero when blk[i] >= NB)."""
    x3 = tl.reshape(x, (x.shape[0], NB, G_PAD))
    sel = blk[:, None] == tl.arange(0, NB)[None, :]
    return tl.sum(tl.where(sel[:, :, None], x3, 0.0), axis=1)


@jit
def _kivi_vw(pv, va_ptr, svmt, t, tmask, SL: tl.constexpr, M: tl.constexpr, GROUP: tl.constexpr,
             NB: tl.constexpr, NG: tl.constexpr, G_PAD: tl.constexpr, DT: tl.constexpr):
    """kivi values, slice SL: the softmax weights pv [BLOCK_N, G_PAD] times each token's scale of every channel group
    the slice covers, [BLOCK_N, NB * G_PAD] (column block b = group ``SL*M // GROUP + b``): ``sum_t p_t v_tc =
    sum_t (p_t scale_t,grp(c)) code_tc + sum_t p_t zero_t,grp(c)``, so the codes go to the dot as they are."""
    grp = (SL * M) // GROUP + tl.arange(0, NB)
    sc = tl.load(va_ptr + t[:, None] * svmt + grp[None, :], mask=tmask[:, None] & (grp < NG)[None, :], other=0.0)
    w = pv.to(tl.float32)[:, None, :] * sc.to(tl.float32)[:, :, None]
    return tl.reshape(w, (pv.shape[0], NB * G_PAD)).to(DT)


@jit
def _kivi_vout(acc, zacc, SL: tl.constexpr, HI: tl.constexpr, BITS: tl.constexpr, M: tl.constexpr,
               MP: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr, NGP: tl.constexpr, G_PAD: tl.constexpr):
    """kivi values after the loop: acc [MP/2, NB * G_PAD] of :func:`_vdot` -> [MP/2, G_PAD] sums of real values
    (row j = channel ``SL*M + 2j + HI``): each row's own group block, the codes' power of two, plus its group's
    ``sum_t p_t zero_t`` from zacc [NGP, G_PAD]."""
    j = tl.arange(0, MP // 2)
    c = SL * M + 2 * j + HI
    out = _pick_block(acc, (2 * j + HI) // GROUP, NB, G_PAD) * (_TWO24 / (1 << (SL * BITS)))
    return out + _pick_block(tl.reshape(zacc, (1, NGP * G_PAD)).broadcast_to(MP // 2, NGP * G_PAD), c // GROUP,
                             NGP, G_PAD)


@jit
def _rows8(x):
    """[BLOCK_N, G] -> [8, G]: sums over rows i, i + 8, i + 16, ... In the MMA accumulator layout of one warp those rows
    sit in the same thread (a thread holds rows lane/4 + 8k), so this is a sum inside each thread, with no shuffles;
    the last axis-0 sum across threads waits until after the loop. (With several warps the rows of different warps
    are summed through shared memory: correct, just not free.)"""
    return tl.sum(tl.reshape(x, (x.shape[0] // 8, 8, x.shape[1])), axis=0)


@jit
def _slice(tile, SL: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, MP: tl.constexpr, DT: tl.constexpr):
    """Slice SL of a loaded K or V tile as DT values [BLOCK_N, MP] in slot order: fp16 data as it is, packed codes as
    ``code * 2^(SL*BITS - 24)`` (callers remove the codes' offset and apply the powers of two and multipliers)."""
    if KIND == 0:
        out = tile.to(DT)
    else:
        out = _unpack(tile, SL, BITS, tile.shape[0], MP).to(DT)
    return out


@jit
def _q_slice(q_ptr, sqh, ks_ptr, qscale, gmask, SL: tl.constexpr, KIND: tl.constexpr, M: tl.constexpr,
             MP: tl.constexpr, G_PAD: tl.constexpr, NSEP: tl.constexpr):
    """Slice SL of the G query heads in slot order [MP, G_PAD], fp32, times the softmax scale (and nsep key scale)."""
    chan, real = _slot_chan(KIND, SL, M, MP)
    g = tl.arange(0, G_PAD)
    qt = tl.load(q_ptr + g[None, :] * sqh + chan[:, None], mask=real[:, None] & gmask[None, :], other=0.0)
    qt = qt.to(tl.float32) * qscale
    if NSEP:
        qt = qt * tl.load(ks_ptr + chan, mask=real, other=0.0)[:, None]
    return qt


@jit
def _store_slice(acc, l_i, aux, SL: tl.constexpr, vs_ptr, pacc_ptr, out_ptr, soh, gmask, KIND: tl.constexpr,
                 BITS: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                 NSEP: tl.constexpr, DIRECT: tl.constexpr, MID: tl.constexpr, LANE: tl.constexpr = -1,
                 GROUP: tl.constexpr = 1, NB: tl.constexpr = 1):
    """Write slice SL of the accumulated output [MP, G_PAD] (slot order) to its channels, final or partial.

    Packed values (KIND 1): acc holds ``sum_t (p r)_t code_t`` and aux ``sum_t (p r)_t``; the output is
    ``acc - 2^(BITS-1) aux`` for ``q = code - 2^(BITS-1)``, and ``2 acc - 3 aux`` for MID (midrise nsep-2,
    ``q = 2 code - 3``). kivi values (KIND 2): acc has a column block per channel group and aux the zeros' sums per
    group, combined by :func:`_kivi_vout`. LANE 0 / 1: acc has MP/2 rows, row j holding channel
    ``SL*M + 2j + LANE`` (the dots of :func:`_vdot`).
    """
    if LANE >= 0:
        j = tl.arange(0, MP // 2)
        chan = SL * M + 2 * j + LANE
        real = 2 * j + LANE < M
    else:
        chan, real = _slot_chan(KIND, SL, M, MP)
    g = tl.arange(0, G_PAD)
    if KIND == 1:
        acc = acc * (_TWO24 / (1 << (SL * BITS)))  # slice SL was read as code * 2^(SL*BITS - 24)
        if MID:
            acc = acc * 2.0 - 3.0 * aux[None, :]
        else:
            acc = acc - (1 << (BITS - 1)) * aux[None, :]
    elif KIND == 2:
        acc = _kivi_vout(acc, aux, SL, LANE, BITS, M, MP, GROUP, NB, _KIVI_VG, G_PAD)
    if NSEP:
        acc = acc * tl.load(vs_ptr + chan, mask=real, other=0.0)[:, None]  # the static value scale, once
    omask = real[:, None] & gmask[None, :]
    if DIRECT:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[None, :]
        tl.store(out_ptr + g[None, :] * soh + chan[:, None], o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(pacc_ptr + g[None, :] * HEAD_DIM + chan[:, None], acc, mask=omask)


@jit
def _attend(
    q_ptr, sqh, G, qscale, capscale,
    k_ptr, skt, ka_ptr, kb_ptr, skmt, ks_ptr,
    v_ptr, svt, va_ptr, vb_ptr, svmt, vs_ptr,
    lo, hi, pos_split, pos_lo, pos_hi, start,
    pm_ptr, pl_ptr, pacc_ptr, out_ptr, soh,
    HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_P: tl.constexpr, K_MP: tl.constexpr,
    K_NSEP: tl.constexpr, K_DT: tl.constexpr,
    V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_P: tl.constexpr, V_MP: tl.constexpr,
    V_NSEP: tl.constexpr, V_DT: tl.constexpr,
    HAS_START: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr, V_LB: tl.constexpr,
):
    """Attention of the G query heads of one KV head over tokens [lo, hi) of one K/V source; writes the result.

    K and V are handled per bit-slice (P = 8 / bits of them; 1 for fp16 data): each slice is one 2D dot.
    """
    K_M: tl.constexpr = HEAD_DIM // K_P
    V_M: tl.constexpr = HEAD_DIM // V_P
    K_IEEE: tl.constexpr = K_DT == tl.float32  # noqa: SIM300 (a constexpr must be on the left)
    V_IEEE: tl.constexpr = V_DT == tl.float32  # noqa: SIM300
    # NSEP == 2: nsep's midrise 2-bit grid, q = 2 code - 3 (see _source)
    K_MID: tl.constexpr = K_NSEP == 2
    V_MID: tl.constexpr = V_NSEP == 2
    # kivi: token groups of keys per tile, channel groups of values per dot and in all (host: V_NG <= _KIVI_VG)
    K_NB: tl.constexpr = (BLOCK_N + K_GROUP - 1) // K_GROUP
    V_NB: tl.constexpr = (V_M + V_GROUP - 1) // V_GROUP
    V_NG: tl.constexpr = (HEAD_DIM + V_GROUP - 1) // V_GROUP
    gmask = tl.arange(0, G_PAD) < G

    # the query, pre-scaled once per program (softmax scale and log2(e), or 1/softcap; nsep key scale)
    qk0 = _q_slice(q_ptr, sqh, ks_ptr, qscale, gmask, 0, K_KIND, K_M, K_MP, G_PAD, K_NSEP)
    if K_P > 1:
        qk1 = _q_slice(q_ptr, sqh, ks_ptr, qscale, gmask, 1, K_KIND, K_M, K_MP, G_PAD, K_NSEP)
    if K_P > 2:
        qk2 = _q_slice(q_ptr, sqh, ks_ptr, qscale, gmask, 2, K_KIND, K_M, K_MP, G_PAD, K_NSEP)
        qk3 = _q_slice(q_ptr, sqh, ks_ptr, qscale, gmask, 3, K_KIND, K_M, K_MP, G_PAD, K_NSEP)
    if K_KIND == 1:
        # Packed keys: the dot reads slice SL as code * 2^(SL*BITS - 24), so slice SL of the query is scaled by
        # 2^-(I*BITS); the whole query is first normalised to a max of 2^14 so that no slice falls into fp16's
        # subnormal range (and none overflows). The stored codes are unsigned: q . (code - offset) is
        # q . code - offset * sum(q), the sum taken over the very rounded values the dot uses.
        amax = tl.max(tl.abs(qk0), axis=0)
        if K_P > 1:
            amax = tl.maximum(amax, tl.max(tl.abs(qk1), axis=0))
        if K_P > 2:
            amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(qk2), axis=0), tl.max(tl.abs(qk3), axis=0)))
        qnorm = 16384.0 / tl.maximum(tl.max(amax, axis=0), 1e-30)
        qk0 = (qk0 * qnorm).to(K_DT)
        qoff = tl.sum(qk0.to(tl.float32), axis=0)
        if K_P > 1:
            qk1 = (qk1 * (qnorm / (1 << K_BITS))).to(K_DT)
            qoff += tl.sum(qk1.to(tl.float32), axis=0) * (1 << K_BITS)
        if K_P > 2:
            qk2 = (qk2 * (qnorm / (1 << (2 * K_BITS)))).to(K_DT)
            qk3 = (qk3 * (qnorm / (1 << (3 * K_BITS)))).to(K_DT)
            qoff += tl.sum(qk2.to(tl.float32), axis=0) * (1 << (2 * K_BITS))
            qoff += tl.sum(qk3.to(tl.float32), axis=0) * (1 << (3 * K_BITS))
        if K_MID:
            # midrise nsep-2: q . (2 code - 3) = 2 (q . code - 3/2 sum(q)); the factor 2 goes into the multiplier
            qoff = qoff * 1.5
            rq = 2.0 / qnorm
        else:
            qoff = qoff * (1 << (K_BITS - 1))
            rq = 1.0 / qnorm
    elif K_KIND == 0:  # fp16 data (kivi keys keep the fp32 query: it is multiplied by each tile's scales)
        qk0 = qk0.to(K_DT)
        if K_P > 1:
            qk1 = qk1.to(K_DT)
        if K_P > 2:
            qk2 = qk2.to(K_DT)
            qk3 = qk3.to(K_DT)

    m_i = tl.full([G_PAD], _NEG, tl.float32)
    # the softmax denominator and (packed values) sum_t p_t r_t are kept as [8, G_PAD] partial sums over the tokens
    # of each row group (_rows8) and reduced across threads once after the loop, not per tile
    l8 = tl.zeros([8, G_PAD], tl.float32)
    prs = tl.zeros([G_PAD], tl.float32)  # packed values: sum_t p_t r_t (the codes' offset); a placeholder otherwise
    if V_KIND != 0:
        # packed values: one accumulator per bit-slice and byte of a 16-bit lane (see _load_lanes_t); kivi: with a
        # column block per channel group (see _kivi_vw), and the zeros' sums per group
        VW: tl.constexpr = V_NB * G_PAD if V_KIND == 2 else G_PAD
        if V_KIND == 1:
            pvs = tl.zeros([8, G_PAD], tl.float32)
        else:
            zacc = tl.zeros([_KIVI_VG, G_PAD], tl.float32)
        acc0 = tl.zeros([V_MP // 2, VW], tl.float32)
        acc0h = tl.zeros([V_MP // 2, VW], tl.float32)
        if V_P > 1:
            acc1 = tl.zeros([V_MP // 2, VW], tl.float32)
            acc1h = tl.zeros([V_MP // 2, VW], tl.float32)
        if V_P > 2:
            acc2 = tl.zeros([V_MP // 2, VW], tl.float32)
            acc2h = tl.zeros([V_MP // 2, VW], tl.float32)
            acc3 = tl.zeros([V_MP // 2, VW], tl.float32)
            acc3h = tl.zeros([V_MP // 2, VW], tl.float32)
    else:  # fp16 data: one slice
        acc0 = tl.zeros([V_MP, G_PAD], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        tmask = t < hi
        # keys: one load of the packed rows, then one dot per bit-slice
        kt = _load_tile(k_ptr, skt, t, tmask, K_KIND, K_M, K_MP)
        if K_KIND == 2:
            # kivi: the raw codes against the query times each token group's scales (_kivi_kw), normalised per tile
            # to a max of 2^14 like the packed query above (the codes are read as code * 2^(SL*BITS - 24))
            w0, qz = _kivi_kw(qk0, ka_ptr, kb_ptr, skmt, n0, hi, 0, K_M, K_MP, K_GROUP, K_NB, G_PAD)
            amax = tl.max(tl.max(tl.abs(w0), axis=1), axis=0)
            if K_P > 1:
                w1, qz1 = _kivi_kw(qk1, ka_ptr, kb_ptr, skmt, n0, hi, 1, K_M, K_MP, K_GROUP, K_NB, G_PAD)
                qz += qz1
                amax = tl.maximum(amax, tl.max(tl.max(tl.abs(w1), axis=1), axis=0))
            if K_P > 2:
                w2, qz2 = _kivi_kw(qk2, ka_ptr, kb_ptr, skmt, n0, hi, 2, K_M, K_MP, K_GROUP, K_NB, G_PAD)
                w3, qz3 = _kivi_kw(qk3, ka_ptr, kb_ptr, skmt, n0, hi, 3, K_M, K_MP, K_GROUP, K_NB, G_PAD)
                qz += qz2 + qz3
                amax = tl.maximum(amax, tl.max(tl.max(tl.abs(w2), axis=1), axis=0))
                amax = tl.maximum(amax, tl.max(tl.max(tl.abs(w3), axis=1), axis=0))
            kn = 16384.0 / tl.maximum(amax, 1e-30)
            sw = _mma(_unpack(kt, 0, K_BITS, BLOCK_N, K_MP).to(K_DT), (w0 * kn).to(K_DT),
                      tl.zeros([BLOCK_N, K_NB * G_PAD], tl.float32), K_IEEE)
            if K_P > 1:
                sw = _mma(_unpack(kt, 1, K_BITS, BLOCK_N, K_MP).to(K_DT), (w1 * (kn / (1 << K_BITS))).to(K_DT), sw,
                          K_IEEE)
            if K_P > 2:
                sw = _mma(_unpack(kt, 2, K_BITS, BLOCK_N, K_MP).to(K_DT),
                          (w2 * (kn / (1 << (2 * K_BITS)))).to(K_DT), sw, K_IEEE)
                sw = _mma(_unpack(kt, 3, K_BITS, BLOCK_N, K_MP).to(K_DT),
                          (w3 * (kn / (1 << (3 * K_BITS)))).to(K_DT), sw, K_IEEE)
            blk = (t - n0) // K_GROUP  # each token's group within the tile
            qzr = tl.broadcast_to(tl.reshape(qz, (1, K_NB * G_PAD)), (BLOCK_N, K_NB * G_PAD))
            s = _pick_block(sw, blk, K_NB, G_PAD) * (_TWO24 / kn) + _pick_block(qzr, blk, K_NB, G_PAD)
        else:
            s = _mma(_slice(kt, 0, K_KIND, K_BITS, K_MP, K_DT),
                     qk0, tl.zeros([BLOCK_N, G_PAD], tl.float32), K_IEEE)
            if K_P > 1:
                s = _mma(_slice(kt, 1, K_KIND, K_BITS, K_MP, K_DT),
                         qk1, s, K_IEEE)
            if K_P > 2:
                s = _mma(_slice(kt, 2, K_KIND, K_BITS, K_MP, K_DT),
                         qk2, s, K_IEEE)
                s = _mma(_slice(kt, 3, K_KIND, K_BITS, K_MP, K_DT),
                         qk3, s, K_IEEE)
        if K_KIND == 1:
            r = tl.load(ka_ptr + t * skmt, mask=tmask, other=0.0).to(tl.float32) * rq
            s = (s * _TWO24 - qoff[None, :]) * r[:, None]
        if HAS_SOFTCAP:
            # softcap * tanh(x) in base 2; tanh(x) = 1 - 2 / (exp(2x) + 1) saturates cleanly at +-1
            s = capscale * (1.0 - 2.0 / (tl.exp2(s * (2.0 * 1.4426950408889634)) + 1.0))
        valid = tmask
        if HAS_START:
            pos = t + tl.where(t < pos_split, pos_lo, pos_hi)
            valid = valid & (pos >= start)
        s = tl.where(valid[:, None], s, float("-inf"))

        # online softmax over the block (base 2), tokens along axis 0
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new[None, :])  # [BLOCK_N, G_PAD]
        alpha = tl.exp2(m_i - m_new)
        l8 = l8 * alpha[None, :] + _rows8(p)
        m_i = m_new
        if V_KIND == 1:
            p = p * tl.load(va_ptr + t * svmt, mask=tmask, other=0.0).to(tl.float32)[:, None]  # p_t r_t
        pv = p.to(V_DT)
        if V_KIND == 1:
            # elementwise, reduced once after the loop: the very (rounded) weights the dots use
            pvs = pvs * alpha[None, :] + _rows8(pv.to(tl.float32))

        # values: acc_I[c, g] += sum_t code_I[t, c] (p r)[t, g], the slice transposed as the dot's A operand
        if V_KIND != 0:
            vl = _load_lanes_t(v_ptr, svt, n0, hi, BLOCK_N, V_M, V_MP, V_LB)
            pw0 = pv
            pw1 = pv
            pw2 = pv
            pw3 = pv
            if V_KIND == 2:
                # kivi: the weights times each token's group scales, one column block per group of a slice; the
                # zeros' share: zacc[grp, g] += sum_t zero_t,grp p_tg
                gz = tl.arange(0, _KIVI_VG)
                zt = tl.load(vb_ptr + t[None, :] * svmt + gz[:, None], mask=(gz < V_NG)[:, None] & tmask[None, :],
                             other=0.0).to(V_DT)
                zacc = _mma(zt, pv, zacc * alpha[None, :], V_IEEE)
                pw0 = _kivi_vw(pv, va_ptr, svmt, t, tmask, 0, V_M, V_GROUP, V_NB, V_NG, G_PAD, V_DT)
                if V_P > 1:
                    pw1 = _kivi_vw(pv, va_ptr, svmt, t, tmask, 1, V_M, V_GROUP, V_NB, V_NG, G_PAD, V_DT)
                if V_P > 2:
                    pw2 = _kivi_vw(pv, va_ptr, svmt, t, tmask, 2, V_M, V_GROUP, V_NB, V_NG, G_PAD, V_DT)
                    pw3 = _kivi_vw(pv, va_ptr, svmt, t, tmask, 3, V_M, V_GROUP, V_NB, V_NG, G_PAD, V_DT)
            acc0 = _vdot(vl, 0, False, V_BITS, pw0, acc0, alpha, V_DT, V_IEEE)
            acc0h = _vdot(vl, 0, True, V_BITS, pw0, acc0h, alpha, V_DT, V_IEEE)
            if V_P > 1:
                acc1 = _vdot(vl, 1, False, V_BITS, pw1, acc1, alpha, V_DT, V_IEEE)
                acc1h = _vdot(vl, 1, True, V_BITS, pw1, acc1h, alpha, V_DT, V_IEEE)
            if V_P > 2:
                acc2 = _vdot(vl, 2, False, V_BITS, pw2, acc2, alpha, V_DT, V_IEEE)
                acc2h = _vdot(vl, 2, True, V_BITS, pw2, acc2h, alpha, V_DT, V_IEEE)
                acc3 = _vdot(vl, 3, False, V_BITS, pw3, acc3, alpha, V_DT, V_IEEE)
                acc3h = _vdot(vl, 3, True, V_BITS, pw3, acc3h, alpha, V_DT, V_IEEE)
        else:
            vt = _load_tile(v_ptr, svt, t, tmask, V_KIND, V_M, V_MP)
            acc0 = _mma(tl.trans(_slice(vt, 0, V_KIND, V_BITS, V_MP, V_DT)), pv, acc0 * alpha[None, :], V_IEEE)

    l_i = tl.sum(l8, axis=0)
    if V_KIND != 0:
        if V_KIND == 1:
            prs = tl.sum(pvs, axis=0)
        else:
            prs = zacc  # kivi: the zeros' sums per channel group (see _store_slice)
        _store_slice(acc0, l_i, prs, 0, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                     HEAD_DIM, V_NSEP, DIRECT, V_MID, 0, V_GROUP, V_NB)
        _store_slice(acc0h, l_i, prs, 0, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                     HEAD_DIM, V_NSEP, DIRECT, V_MID, 1, V_GROUP, V_NB)
        if V_P > 1:
            _store_slice(acc1, l_i, prs, 1, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                         HEAD_DIM, V_NSEP, DIRECT, V_MID, 0, V_GROUP, V_NB)
            _store_slice(acc1h, l_i, prs, 1, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                         HEAD_DIM, V_NSEP, DIRECT, V_MID, 1, V_GROUP, V_NB)
        if V_P > 2:
            _store_slice(acc2, l_i, prs, 2, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                         HEAD_DIM, V_NSEP, DIRECT, V_MID, 0, V_GROUP, V_NB)
            _store_slice(acc2h, l_i, prs, 2, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                         HEAD_DIM, V_NSEP, DIRECT, V_MID, 1, V_GROUP, V_NB)
            _store_slice(acc3, l_i, prs, 3, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                         HEAD_DIM, V_NSEP, DIRECT, V_MID, 0, V_GROUP, V_NB)
            _store_slice(acc3h, l_i, prs, 3, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                         HEAD_DIM, V_NSEP, DIRECT, V_MID, 1, V_GROUP, V_NB)
    else:
        _store_slice(acc0, l_i, prs, 0, vs_ptr, pacc_ptr, out_ptr, soh, gmask, V_KIND, V_BITS, V_M, V_MP, G_PAD,
                     HEAD_DIM, V_NSEP, DIRECT, V_MID)
    if not DIRECT:
        g = tl.arange(0, G_PAD)
        tl.store(pm_ptr + g, m_i, mask=gmask)
        tl.store(pl_ptr + g, l_i, mask=gmask)


@jit
def _decode_split_kernel(
    q_ptr, sqb, sqh, out_ptr, sob, soh,
    k_ptr, skb, skh, skt, ka_ptr, kb_ptr, skmb, skmh, skmt, ks_ptr,
    v_ptr, svb, svh, svt, va_ptr, vb_ptr, svmb, svmh, svmt, vs_ptr,
    fk_ptr, sfkb, sfkh, sfkt, fv_ptr, sfvb, sfvh, sfvt,
    pm_ptr, pl_ptr, pacc_ptr, start_ptr, lens_ptr,
    Hkv, G, n_quant, n_fp, n_sinks, chunk, num_splits, qscale, capscale,
    HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_P: tl.constexpr, K_MP: tl.constexpr,
    K_NSEP: tl.constexpr, K_DT: tl.constexpr,
    V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_P: tl.constexpr, V_MP: tl.constexpr,
    V_NSEP: tl.constexpr, V_DT: tl.constexpr,
    F_MP: tl.constexpr, FK_DT: tl.constexpr, FV_DT: tl.constexpr,
    HAS_QUANT: tl.constexpr, HAS_FP: tl.constexpr, HAS_START: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DIRECT: tl.constexpr, DEV_LENS: tl.constexpr, K_ROW16: tl.constexpr, V_ROW16: tl.constexpr,
    V_LB: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sid = tl.program_id(1)
    # packed rows start on 16-byte boundaries (checked by the host): tell the compiler, so that a row's words are
    # fetched 16 bytes at a time (Triton only infers this for strides that are multiples of 16 elements)
    if K_ROW16:
        skt = (skt // 4) * 4  # == skt; the compiler's divisibility analysis understands this form
    if V_ROW16:
        svt = (svt // 4) * 4
    if DEV_LENS:
        # lengths live on the device (CUDA-graph replay): the launch was sized for upper bounds; the real lengths
        # are read here and the quantized range is re-split into whole blocks (splits past the end stay empty)
        n_quant = tl.load(lens_ptr)
        n_fp = tl.load(lens_ptr + 1)
        chunk = tl.cdiv(tl.cdiv(n_quant, BLOCK_N), tl.maximum(num_splits, 1)) * BLOCK_N
    b = (pid_bh // Hkv).to(tl.int64)
    h = pid_bh % Hkv
    q = q_ptr + b * sqb + (h * G) * sqh
    out = out_ptr + b * sob + (h * G) * soh
    n_slots = num_splits + HAS_FP
    part = pid_bh * n_slots + sid
    pm = pm_ptr + part * G
    pl = pl_ptr + part * G
    pacc = pacc_ptr + part * (G * HEAD_DIM)
    start = 0
    if HAS_START:
        start = tl.load(start_ptr + b)
    if HAS_QUANT:  # noqa: SIM102 (a compile-time flag, then a runtime test: kept apart for Triton)
        if sid < num_splits:
            lo = sid * chunk
            hi = tl.minimum(lo + chunk, n_quant)
            _attend(q, sqh, G, qscale, capscale,
                    k_ptr + b * skb + h * skh, skt, ka_ptr + b * skmb + h * skmh, kb_ptr + b * skmb + h * skmh, skmt,
                    ks_ptr + h * HEAD_DIM,
                    v_ptr + b * svb + h * svh, svt, va_ptr + b * svmb + h * svmh, vb_ptr + b * svmb + h * svmh, svmt,
                    vs_ptr + h * HEAD_DIM,
                    lo, hi, 0, n_sinks, n_sinks, start, pm, pl, pacc, out, soh,
                    HEAD_DIM, G_PAD, BLOCK_N,
                    K_KIND, K_BITS, K_GROUP, K_P, K_MP, K_NSEP, K_DT,
                    V_KIND, V_BITS, V_GROUP, V_P, V_MP, V_NSEP, V_DT,
                    HAS_START, HAS_SOFTCAP, DIRECT, V_LB)
    if HAS_FP:  # noqa: SIM102
        if sid == num_splits:
            # fp16 slots: slot j holds absolute position j (a sink) or n_quant + j (the recent tail)
            _attend(q, sqh, G, qscale, capscale,
                    fk_ptr + b * sfkb + h * sfkh, sfkt, fk_ptr, fk_ptr, 0, ks_ptr,
                    fv_ptr + b * sfvb + h * sfvh, sfvt, fv_ptr, fv_ptr, 0, vs_ptr,
                    0, n_fp, n_sinks, 0, n_quant, start, pm, pl, pacc, out, soh,
                    HEAD_DIM, G_PAD, BLOCK_F,
                    0, 16, 1, 1, F_MP, False, FK_DT,
                    0, 16, 1, 1, F_MP, False, FV_DT,
                    HAS_START, HAS_SOFTCAP, DIRECT, V_LB)


@jit
def _merge_kernel(pm_ptr, pl_ptr, pacc_ptr, out_ptr, sob, soh, Hq, G, n_slots, cnt_ptr,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                  CLAIMS: tl.constexpr = False):
    """out[b, hq] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the partials of one query head.

    One pass with a running maximum: the maxima, sums and accumulators of a block of partials are loaded together,
    so each block costs one round trip to memory (the kernel is pure latency: a few KB per program). PDL: launched
    as a programmatic dependent of the split kernel (which lets it launch before its last programs end), so it
    first waits for that grid's results. CLAIMS: the split grid claimed tiles at run time; the first program of
    each KV head zeroes the head's counter (``cnt_ptr[bh]``) for the next launch, the grid being done with it.
    (The Gluon split kernel's own merge, :func:`kvcompile.kernels.decode_gluon.merge`, does the same for up to
    :data:`kvcompile.kernels.decode_gluon.MERGE_MAX` partials per KV head; this one takes the longer lists.)
    """
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    b = pid // Hq
    hq = pid % Hq
    base = (b * (Hq // G) + hq // G) * n_slots  # first partial slot of this (batch, KV head)
    g = hq % G
    if CLAIMS and g == 0:
        tl.store(cnt_ptr + b * (Hq // G) + hq // G, 0)
    d = tl.arange(0, D_PAD)
    acc = tl.zeros([D_PAD], tl.float32)
    den = tl.zeros([S_BLOCK], tl.float32)
    m_run = tl.max(tl.full([S_BLOCK], _NEG, tl.float32), axis=0)  # the running maximum (a scalar)
    for s0 in range(0, n_slots, S_BLOCK):  # in blocks: a long context can have hundreds of splits
        s = s0 + tl.arange(0, S_BLOCK)
        smask = s < n_slots
        idx = (base + s) * G + g
        m = tl.load(pm_ptr + idx, mask=smask, other=_NEG)
        lv = tl.load(pl_ptr + idx, mask=smask, other=0.0)
        part = tl.load(pacc_ptr + idx[:, None] * HEAD_DIM + d[None, :],
                       mask=smask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        keep = tl.exp2(m_run - m_new)
        w = tl.where(smask, tl.exp2(m - m_new), 0.0)
        den = den * keep + w * lv
        acc = acc * keep + tl.sum(w[:, None] * part, axis=0)
        m_run = m_new
    total = tl.sum(den, axis=0)
    o = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * sob + hq * soh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (the benchmark's ``--tune`` sweeps them; 0 = chosen by format).

    ``block_n``: tokens per loop step of the quantized range. ``num_warps``: warps per program. ``block_f``: tokens per
    step over the fp16 slots (kept small: the shared-memory buffers of both loops are allocated together).
    ``num_stages``: software-pipelining depth of the tile loads. ``min_g_pad``: the query heads of a KV head are padded
    to a power of two at least this large (the dot's N dimension). ``ctas_per_sm``: programs one SM runs at once,
    until the first launch of a kernel variant tells (it sizes the split count). ``maxnreg``: a register cap per thread
    (0 = the compiler's choice). ``merge_block``: partials this module's merge kernel combines per step (64: with
    16, a long context on few KV heads spent several serial steps merging; H200, batch 1, 32k, nsep-2: Qwen2.5-1.5B
    shape 21.1 -> 17.7 us, Llama-3-8B shape 25.0 -> 21.9 us, ``results/h200_v5_b1_merge*.log``; the Gluon path's
    merge, :func:`kvcompile.kernels.decode_gluon.merge`, takes up to 64 in one step). ``v_lanes``: lanes per
    shared-memory row of the packed value tiles, -1 = by row size (see :meth:`v_lanes_for`). ``gluon``: -1 = run the
    quantized splits with the Gluon loop of :mod:`kvcompile.kernels.decode_gluon` wherever it applies, 0 = always
    the Triton kernel. ``gluon_stages``: copy stages of the Gluon loop's tiles (2 measured best, see its module).
    ``gluon_fp``: where the Gluon kernel attends to the fp16 slots: -1 = chosen per launch (see ``_decode``), 1 = in
    the split programs after their loops, 0 = in programs of their own. ``gluon_trigger``: 1 = the merge kernel may
    launch once every split program has started (it waits for their results), 0 = once every loop is done.
    ``gluon_release``: 1 = the Gluon loop reads each landed tile into registers at once and refills its stage
    (``gluon_stages`` tiles in flight instead of one fewer, for more registers), 0 = it refills after computing, -1
    = 1 when keys and values are both 4-bit and ``gluon_claim`` is 0 (H200, Llama-3-8B shape, batch 8, 32k, two
    runs: nsep-4 77.9 -> 77.2 and 78.0 -> 77.3 us; nsep-2 56.7 -> 59.9 and 56.6 -> 60.0,
    ``results/h200_v13_tune_{release,steal}.log``).
    ``gluon_claim``: 1-99 = each split program of the Gluon loop takes that percentage of its even share of the KV
    head's tiles as a fixed range, and the head's remaining tiles go one at a time to whichever of its programs asks
    first (run-time balancing of programs that the memory system serves at different speeds; the order in which a
    head's tiles are summed then varies between runs, within rounding); 0 = fixed ranges only (bitwise
    reproducible); -1 = :data:`CLAIM_DEFAULT` (90) when keys and values are both 4-bit and each split program
    gets at least :data:`CLAIM_MIN_TILES` fixed tiles, else 0. H200, Llama-3-8B shape, batch 8, 32k, four
    same-run pairs of a first form (whose programs also counted themselves at their end;
    ``results/h200_v14_tune_{claim,claim2,release,wait}.log``): nsep-4 77.1 -> 75.4, 77.3 -> 75.5, 78.8 -> 77.0
    and 77.2 -> 75.2 us with 90 (50 / 70 / 80 / 85 / 93 / 95: 82.2 / 79.2 / 77.0 / 76.0 / 75.5 / 77.1); nsep-2
    57.2 -> 60.3 (its loop issues instructions at its limit, and claims add some). Final form: 75.6 us there (3.24x
    SDPA); the sweep's other nsep-4 rows within -3.3 % to +1.6 % of 1a⁗'s without claims (another run;
    ``results/h200_v14_sweep.log``, RESULTS.md §1a⁵). With claims the refill of ``gluon_release`` is off by
    default: both together spill at the 4-bit register cap (78.5 us).
    ``gluon_i8``: 1 = the Gluon loop computes the scores with int8 MMAs over the key bytes (one mask per four code
    slots instead of one per two; the query enters as two int8 halves of a 15-bit integer, so the scores are exact
    integer sums), 0 = with fp16 MMAs (the query rounded to fp16), -1 = 1 at 2-bit keys where each split program
    gets at least :data:`I8_MIN_TILES` tiles, else 0. H200, Llama-3-8B shape, batch 8, 32k (16 tiles per
    program), three same-run pairs: nsep-2 57.0 -> 55.2, 57.0 -> 55.0 and 56.7 -> 55.4 us; nsep-4 74.7 -> 74.8
    (its loop waits for memory, not for instructions; under Triton 3.9 the 4-bit form also spills). Short programs
    lose 0.1-0.6 us to the query's preparation (batch 1 and 8 at 4k, Qwen2.5-1.5B batch 8 at 32k; two runs each),
    hence the threshold. ``results/h200_v15_tune_i8*.log``, ``h200_v15_small_i8.log``, RESULTS.md §1a⁶.
    """

    block_n: int = 0
    block_f: int = 32
    num_warps: int = 0
    num_stages: int = 3
    min_g_pad: int = 8
    ctas_per_sm: int = 0
    maxnreg: int = 0
    merge_block: int = 64
    v_lanes: int = -1
    gluon: int = -1
    gluon_stages: int = 2
    gluon_fp: int = -1
    gluon_trigger: int = 1
    gluon_release: int = -1
    gluon_claim: int = -1
    gluon_i8: int = -1

    def __post_init__(self) -> None:
        # tile sizes become tl.arange extents and dot shapes: powers of two (the row-group sums need >= 8 rows, the
        # dots >= 16); checked here so that a bad value is one clear line, not a compiler error
        def pow2(x: int) -> bool:
            return x > 0 and x & (x - 1) == 0

        bad = [f"{k}={v}" for k, v, ok in (
            ("block_n", self.block_n, self.block_n == 0 or (pow2(self.block_n) and self.block_n >= 16)),
            ("block_f", self.block_f, pow2(self.block_f) and self.block_f >= 16),
            ("merge_block", self.merge_block, pow2(self.merge_block)),
            ("v_lanes", self.v_lanes, self.v_lanes in (-1, 0) or (pow2(self.v_lanes) and self.v_lanes >= 8)),
            ("gluon", self.gluon, self.gluon in (-1, 0)),
            ("gluon_stages", self.gluon_stages, self.gluon_stages >= 2),
            ("gluon_fp", self.gluon_fp, self.gluon_fp in (-1, 0, 1)),
            ("gluon_trigger", self.gluon_trigger, self.gluon_trigger in (0, 1)),
            ("gluon_release", self.gluon_release, self.gluon_release in (-1, 0, 1)),
            ("gluon_claim", self.gluon_claim, -1 <= self.gluon_claim <= 99),
            ("gluon_i8", self.gluon_i8, self.gluon_i8 in (-1, 0, 1)),
        ) if not ok]
        if bad:
            raise ValueError(f"DecodeConfig: {', '.join(bad)} (block_n: 0 or a power of two >= 16; block_f: a power "
                             "of two >= 16; merge_block: a power of two; v_lanes: -1, 0 or a power of two >= 8; "
                             "gluon: -1 or 0; gluon_stages: >= 2; gluon_fp: -1, 0 or 1; gluon_trigger: 0 or 1; "
                             "gluon_release: -1, 0 or 1; gluon_claim: -1 to 99; gluon_i8: -1, 0 or 1)")

    @classmethod
    def from_env(cls) -> Self:
        """Defaults, overridden by e.g. ``KVCOMPILE_DECODE_CONFIG="block_n=64,num_warps=8,num_stages=2"``."""
        return cls._parse(os.environ.get("KVCOMPILE_DECODE_CONFIG", ""))

    @classmethod
    @lru_cache(maxsize=8)
    def _parse(cls, spec: str) -> Self:  # cached: the decode hot path asks once per layer and step
        try:
            kw = {k.strip(): int(v) for k, v in (p.split("=") for p in spec.split(",") if p.strip())}
            return cls(**kw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"bad KVCOMPILE_DECODE_CONFIG={spec!r} (expected e.g. 'block_n=64,num_warps=4'): {e}") \
                from e

    def launch_for(self, k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int) -> tuple[int, int]:
        """(tokens per loop step, warps per program) for a pair of stores.

        Packed int-token/nsep codes of at most 4 bits at head_dim <= 128: one warp on 64-token tiles. Measured with
        ``benchmarks/kernels.py --tune`` on an H100 (Llama-3-8B shape, batch 8, 32k,
        ``results/h100_tune_warps_2026-11-23.log``): nsep-4 108.8 us vs 137.4 us for the best 4-warp tile (256
        tokens), nsep-2 131.7 us vs 194.3 us; 2 warps on 128 tokens 122 / 147 us, 8 warps far slower. Fewer warps
        win because the softmax reduces over tokens, which with tokens spread over several warps costs a
        shared-memory round trip and a barrier per tile. Everything else: four warps on 64-token tiles, the measured
        best for fp16 stores (wider rows per token would not fit one warp's registers). kivi stores (at most 4 bits,
        head_dim <= 128): two warps on 128-token tiles (its tiles carry per-group scale products as well).
        """
        narrow = head_dim <= 128 and all(f.kind in ("int-token", "nsep") and f.bits <= 4 for f in (k_fmt, v_fmt))
        kivi = (head_dim <= 128 and all(f.kind in ("int-token", "nsep", "kivi") and f.bits <= 4 for f in (k_fmt, v_fmt))
                and "kivi" in (k_fmt.kind, v_fmt.kind))
        if kivi:  # H200, same shape: 2 warps x 128 tokens 320.5 us, 4 x 64 643.3 (results/h200_kivi_tune.log)
            return self.block_n or 128, self.num_warps or 2
        warps = self.num_warps or (1 if narrow else 4)
        if self.block_n:
            return self.block_n, warps
        if narrow and warps == 4:  # the best tiles of four warps (same tuning run): 256 tokens at 4 bits, else 128
            return (256 if all(f.bits == 4 for f in (k_fmt, v_fmt)) else 128), warps
        return 64, warps

    def v_lanes_for(self, mp: int) -> int:
        """Lanes per shared-memory row of the packed value tiles (see :func:`_load_lanes_t`; 0 = whole token rows).

        -1 (default): 8 for 32-byte rows (2-bit values at head_dim 128), else whole rows. H200, Llama-3-8B shape,
        batch 8, 32k (``results/h200_v6_lanes_tune.log``): nsep-2 67.0 -> 64.0 us with 8 lanes; nsep-4 (64-byte rows)
        85.1 us with whole rows, 99.4 with 8 lanes and 85.9 with 16. Blocks of 8 lanes make the transposing ldmatrix
        reads conflict-free but split each row's copy into 16-byte pieces of different rows, which costs the copies
        more than it saves the reads once rows are 64 bytes.
        """
        lanes = self.v_lanes if self.v_lanes >= 0 else (8 if mp // 2 == 16 else 0)
        return lanes if 0 < lanes < mp // 2 else 0

    def slots_per_sm(self, warps: int) -> int:
        """Programs per SM assumed before a kernel variant's first launch reports its real occupancy."""
        return self.ctas_per_sm or (8 if warps == 1 else 3)


_OCCUPANCY: dict[tuple, int] = {}  # programs per SM of each compiled split-kernel variant, read after its first launch
_OCC_SEEN: set[tuple] = set()  # (key, compiled kernel) pairs whose occupancy _OCCUPANCY has taken in


def _ctas_per_sm(kernel: object, num_warps: int, device_index: int, default: int) -> int:
    """Resident programs per SM of a compiled kernel, from its registers and shared memory (default if unknown)."""
    try:
        props = torch.cuda.get_device_properties(device_index)
        # registers are allocated per warp in units of 256, from the register file of one of the SM's 4
        # schedulers (a quarter each): 120 registers per thread still give 4 warps per scheduler, as 128 do
        warp_regs = -(-int(kernel.n_regs) * 32 // 256) * 256  # type: ignore[attr-defined]
        smem = int(kernel.metadata.shared)  # type: ignore[attr-defined]
        regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
        smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
        by_regs = 4 * (regs_sm // 4 // max(warp_regs, 1)) // num_warps
        by_smem = smem_sm // (smem + 1024) if smem else 32  # the driver reserves 1 KiB per block
        return max(1, min(by_regs, by_smem, 64 // num_warps, 32))  # 64 warps and 32 blocks per SM at most
    except Exception:  # attribute names differ across triton versions: the estimate is only a heuristic
        return default


@lru_cache(maxsize=4096)
def pick_num_splits(n_quant: int, bh: int, block_n: int, slots: int) -> int:
    """Split count for the quantized range of ``bh`` (batch, KV head) pairs on ``slots`` concurrent programs.

    Programs run in waves of ``slots``; a wave lasts as long as its programs' chunks (plus about one block of fixed
    work: query setup, partial write). Then the merge kernel reads each query head's partials, costing about one
    block per 16 splits (fitted when the merge took 16 splits per step; it now takes up to
    ``DecodeConfig.merge_block``, so the term is conservative). The chunk length that minimises
    ``waves * (chunk + 1) + ceil(splits / 16)`` wins: the GPU is full (every SM busy with several programs), the
    last wave is not a sliver, and a long context on few heads is not cut into hundreds of splits whose merge would
    cost more than it saves (measured on an H100: Qwen2.5-1.5B shape, batch 1, 32k: 512 one-block splits took 51 us,
    SDPA 19 us).
    """
    if n_quant <= 0:
        return 0
    blocks = -(-n_quant // block_n)
    best, best_cost = 1, float("inf")
    for chunk in range(1, blocks + 1):
        splits = -(-blocks // chunk)
        if chunk > 1 and -(-blocks // (chunk - 1)) == splits:
            continue  # same split count as a shorter chunk
        waves = -(-bh * splits // slots)
        cost = waves * (chunk + 1) + (-(-splits // 16) if splits > 1 else 0)
        if cost < best_cost:
            best, best_cost = splits, cost
    return best


_TL_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _tl_dtype(dt: torch.dtype):
    if dt not in _TL_DTYPE:
        raise ValueError(f"decode attention supports fp16, bf16 and fp32 tensors, got {dt}")
    return getattr(tl, _TL_DTYPE[dt])


def _words(codes: Tensor) -> Tensor:
    """Packed codes ``[..., m]`` uint8 as 32-bit words ``[..., m / 4]``: a view, the kernels read whole words."""
    return codes.view(torch.int32)


def _word_readable(fmt: KVFormat, store: dict[str, Tensor]) -> bool:
    """Whether a store's codes can be read as 32-bit words (m a multiple of 4 bytes, word-aligned rows)."""
    if fmt.kind == "fp16":
        return True
    c = store["codes"]
    return (c.shape[-1] % 4 == 0 and c.stride(-1) == 1 and all(st % 4 == 0 for st in c.stride()[:-1])
            and c.data_ptr() % 4 == 0)


def _rows16(kind: int, data: Tensor) -> bool:
    """Whether every token row of a packed store (viewed as 32-bit words) starts on a 16-byte boundary."""
    return kind != _FP and data.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in data.stride()[:3])


def _data_dot_dtype(data: Tensor, q: Tensor, backend: str) -> torch.dtype:
    """Operand dtype of the dots over full-precision K/V: their own, but fp32 for fp32 models (exact products) and
    for bf16 under Triton's interpreter, which holds bf16 as raw 16-bit integers and multiplies those in tl.dot."""
    if q.dtype == torch.float32 or (data.dtype == torch.bfloat16 and backend == "interpret"):
        return torch.float32
    return data.dtype


def _source(fmt: KVFormat, store: dict[str, Tensor], q: Tensor, backend: str):
    """Kernel view of one quantized store: (data, meta_a, meta_b, meta strides, constexprs)."""
    # unpacked codes are exact in fp16; fp32 models get fp32 products throughout
    code_dt = torch.float32 if q.dtype == torch.float32 else torch.float16
    if fmt.kind == "fp16":
        data = store["data"]
        a = b = data
        ms = (0, 0, 0)
        kind, bits, per, dt = _FP, 16, 1, _data_dot_dtype(data, q, backend)
    elif fmt.kind == "kivi":
        data, a, b = _words(store["codes"]), store["scale"], store["zero"]
        ms = a.stride()[:3]
        kind, bits, per, dt = _KIVI, fmt.bits, 8 // fmt.bits, code_dt
    else:
        data, a = _words(store["codes"]), store["r"]
        b = a
        ms = a.stride()
        kind, bits, per, dt = _SYM, fmt.bits, 8 // fmt.bits, code_dt
    mp = next_pow2(data.shape[-1] * (1 if kind == _FP else 4))  # bytes of codes (or channels of data) per token
    # NSEP: 0 no static scale, 1 nsep, 2 nsep on the midrise 2-bit grid (q = 2 code - 3; the kernel's K_MID / V_MID)
    nsep = (2 if formats.nsep_midrise(fmt.bits) else 1) if fmt.kind == "nsep" else 0
    const = dict(KIND=kind, BITS=bits, GROUP=fmt.group, P=per, MP=mp, NSEP=nsep, DT=_tl_dtype(dt))
    return data, a, b, ms, const


def _check(q: Tensor, k_store: dict[str, Tensor], v_store: dict[str, Tensor], k_fmt: KVFormat, v_fmt: KVFormat,
           n_quant: int, fp_k: Tensor, fp_v: Tensor, n_fp: int, k_scale: Tensor | None,
           v_scale: Tensor | None) -> tuple[int, int, int, int]:
    if q.dim() != 3:
        raise ValueError(f"decode_attention expects q of shape [B, Hq, d], got {tuple(q.shape)}")
    B, Hq, d = q.shape
    if fp_k.dim() != 4 or fp_k.shape[0] != B or fp_k.shape[3] != d or fp_v.shape != fp_k.shape:
        raise ValueError(f"fp_k/fp_v must be [B, Hkv, Fcap, d] = [{B}, Hkv, Fcap, {d}], "
                         f"got {tuple(fp_k.shape)} and {tuple(fp_v.shape)}")
    Hkv = fp_k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if not 0 <= n_fp <= fp_k.shape[2]:
        raise ValueError(f"n_fp={n_fp} outside the fp buffers' capacity {fp_k.shape[2]}")
    for role, fmt, store, scale in (("k", k_fmt, k_store, k_scale), ("v", v_fmt, v_store, v_scale)):
        cap = check_store(store, fmt, role, B, Hkv, d)
        if not 0 <= n_quant <= cap:
            raise ValueError(f"n_quant={n_quant} outside the {role} store's capacity {cap}")
        if fmt.kind == "kivi" and role == "k" and n_quant % fmt.group:
            raise ValueError(f"kivi keys hold whole groups of {fmt.group} tokens; n_quant={n_quant}")
        if fmt.kind == "nsep" and (scale is None or tuple(scale.shape) != (Hkv, d)):
            got = None if scale is None else tuple(scale.shape)
            raise ValueError(f"nsep {role} needs its static scale of shape [{Hkv}, {d}], got {got}")
    return B, Hq, Hkv, d


def decode_attention(q: Tensor, k_store: dict[str, Tensor], v_store: dict[str, Tensor], k_fmt: KVFormat,
                     v_fmt: KVFormat, n_quant: int, fp_k: Tensor, fp_v: Tensor, n_fp: int, n_sinks: int,
                     scaling: float, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                     seq_start: Tensor | None = None, softcap: float | None = None,
                     num_splits: int | None = None, lens: Tensor | None = None) -> Tensor:
    """Attention of one query token per sequence over a packed KV cache: ``q [B, Hq, d]`` -> ``[B, Hq, d]``.

    Keys/values are the quantized tokens ``[0, n_quant)`` of ``k_store``/``v_store`` (absolute positions
    ``n_sinks + i``) plus the fp slots ``[0, n_fp)`` of ``fp_k``/``fp_v`` (slot ``j`` is at position ``j`` if
    ``j < n_sinks`` else ``n_quant + j``). GQA: query head ``h`` uses KV head ``h // (Hq / Hkv)``. ``seq_start``
    ``[B]``: keys at positions ``< seq_start[b]`` are masked (left padding). ``softcap``: Gemma-2 score capping.
    ``k_scale``/``v_scale`` ``[Hkv, d]``: the static nsep scales. ``num_splits``: sequence splits of the quantized
    range (default: a heuristic that fills the GPU). Output dtype is ``q.dtype``.

    ``lens``: an int32 device tensor ``[2]`` holding the actual ``(n_quant, n_fp)``. When given, the kernel reads the
    lengths from it and ``n_quant`` / ``n_fp`` are only upper bounds that size the launch, so one launch (one
    captured CUDA graph) serves every step while the cache grows (see :mod:`kvcompile.runtime.graph`).
    """
    return _decode(q, k_store, v_store, k_fmt, v_fmt, n_quant, fp_k, fp_v, n_fp, n_sinks, scaling, k_scale, v_scale,
                   seq_start, softcap, num_splits, None, lens)


def _decode(q: Tensor, k_store: dict[str, Tensor], v_store: dict[str, Tensor], k_fmt: KVFormat, v_fmt: KVFormat,
            n_quant: int, fp_k: Tensor, fp_v: Tensor, n_fp: int, n_sinks: int, scaling: float,
            k_scale: Tensor | None, v_scale: Tensor | None, seq_start: Tensor | None, softcap: float | None,
            num_splits: int | None, config: DecodeConfig | None, lens: Tensor | None = None) -> Tensor:
    """:func:`decode_attention` with an explicit launch configuration (used by the benchmark's tuner)."""
    B, Hq, Hkv, d = _check(q, k_store, v_store, k_fmt, v_fmt, n_quant, fp_k, fp_v, n_fp, k_scale, v_scale)
    backend = backend_for(q)
    if lens is not None and backend == "torch":
        # no graphs to replay off the GPU: take the real lengths (a host read) and run the ordinary path
        n_quant, n_fp = (int(x) for x in lens.tolist())
        lens = None
    if backend != "torch" and v_fmt.kind == "kivi" and -(-d // v_fmt.group) > _KIVI_VGROUPS:
        warnings.warn(f"decode_attention: kivi values with {-(-d // v_fmt.group)} channel groups per head (more "
                      f"than {_KIVI_VGROUPS}); using the (slow) PyTorch path", stacklevel=2)
        backend = "torch"
    if backend != "torch" and not (_word_readable(k_fmt, k_store) and _word_readable(v_fmt, v_store)):
        # head_dim * bits / 8 not a multiple of 4 (head_dim not a multiple of 16 at 2 bits): no fused kernel
        warnings.warn(f"decode_attention: head_dim {d} packs into rows that are not whole 32-bit words; "
                      "using the (slow) PyTorch path", stacklevel=2)
        backend = "torch"
    if backend == "torch":
        return decode_attention_reference(q, k_store, v_store, k_fmt, v_fmt, n_quant, fp_k, fp_v, n_fp, n_sinks,
                                          scaling, k_scale, v_scale, seq_start, softcap).to(q.dtype)
    cfg = config or DecodeConfig.from_env()
    block_n, num_warps = cfg.launch_for(k_fmt, v_fmt, d)
    G = Hq // Hkv
    out = torch.empty(B, Hq, d, dtype=q.dtype, device=q.device)
    if n_quant == 0 and n_fp == 0:  # nothing to attend to: the reference's softmax over no keys gives zeros
        return out.zero_()
    chunk = 0
    g_pad = max(cfg.min_g_pad, next_pow2(G))
    k_data, ka, kb, kms, kc = _source(k_fmt, k_store, q, backend)
    v_data, va, vb, vms, vc = _source(v_fmt, v_store, q, backend)
    # the Gluon kernel (decode_gluon) serves packed nsep/int-token splits where it applies; it always writes partials
    use_gluon = (n_quant > 0 and backend == "triton" and cfg.gluon != 0 and block_n == decode_gluon.BLOCK_N
                 and vc["KIND"] == _SYM and kc["KIND"] == _SYM
                 and decode_gluon.supported(q, k_fmt, v_fmt, k_data, v_data, ka, va, fp_k, fp_v, d, G, softcap))
    # the launch's compile-time specialisation: programs of one key share registers/shared memory, so occupancy
    occ_key = (k_fmt, v_fmt, d, g_pad, q.dtype, fp_k.dtype, block_n, num_warps, cfg, use_gluon)
    # programs that run at once
    slots = num_sms(q.device.index or 0) * _OCCUPANCY.get(occ_key, cfg.slots_per_sm(num_warps)) \
        if backend == "triton" else 4
    blocks = -(-n_quant // block_n)  # tiles of the quantized range
    if n_quant:
        if num_splits is None:
            num_splits = pick_num_splits(n_quant, B * Hkv, block_n, slots)
        chunk = -(-blocks // max(1, min(num_splits, blocks))) * block_n  # whole blocks per split
        num_splits = -(-n_quant // chunk)  # drops splits that the rounding left empty
    else:
        num_splits = 0
    has_fp = n_fp > 0
    # Gluon: the fp16 slots go to programs of their own when those fit in the wave beside every split program (they
    # then run in parallel on places that would be idle), else to the split programs, after their loops (no
    # program then waits for a place; H200, Llama-3-8B shape, batch 8, 32k: nsep-4 87.0 -> 79.3 us, nsep-2 58.2 ->
    # 57.1, results/h200_v11_tune.log), provided that there is a split per chunk (else a few programs would walk
    # them in series)
    fp_in = bool(cfg.gluon_fp) if cfg.gluon_fp >= 0 else \
        B * Hkv * (num_splits + decode_gluon.fp_splits(n_fp)) > slots
    fp_in = fp_in and n_fp > 0 and num_splits >= decode_gluon.fp_splits(n_fp, True)
    n_slots = num_splits + (decode_gluon.fp_splits(n_fp, fp_in) if use_gluon else int(has_fp))
    # device lengths: a program cannot know it is alone, always merge
    direct = n_slots == 1 and lens is None and not use_gluon
    if vc["KIND"] != _FP:
        vc["MP"] = max(vc["MP"], 32)  # the values' dots have MP/2 rows (_load_lanes_t): 16 at least for tl.dot
    dummy = q  # stands in for pointers a configuration never reads
    ks = k_scale.to(q.device, torch.float32).contiguous() if k_scale is not None else dummy
    vs = v_scale.to(q.device, torch.float32).contiguous() if v_scale is not None else dummy
    if direct:
        pm = pl = pacc = dummy
    else:
        pm = torch.empty(B * Hkv * n_slots * G, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * Hkv * n_slots * G * d, dtype=torch.float32, device=q.device)
    start = seq_start.to(q.device, torch.int32).contiguous() if seq_start is not None else dummy
    if softcap:
        qscale, capscale = scaling / softcap, softcap * _LOG2E
    else:
        qscale, capscale = scaling * _LOG2E, 1.0
    fk_dt = _tl_dtype(_data_dot_dtype(fp_k, q, backend))
    fv_dt = _tl_dtype(_data_dot_dtype(fp_v, q, backend))
    # strides of the data's token axis etc.; last axes are contiguous in every store the runtime allocates
    for t in (k_data, v_data, fp_k, fp_v, q):
        if t.stride(-1) != 1:
            raise ValueError("decode_attention needs tensors whose last axis is contiguous")

    counters = None
    if use_gluon:
        if cfg.gluon_claim >= 0:  # as asked (also on short programs, whose first claims may wait for an answer)
            claim = cfg.gluon_claim if num_splits > 1 else 0
        else:  # by default on programs of many tiles, several per KV head, at 4-bit keys and values
            claim = CLAIM_DEFAULT if k_fmt.bits == v_fmt.bits == 4 and num_splits > 1 else 0
            if blocks * claim // (num_splits * 100) < CLAIM_MIN_TILES:
                claim = 0
        counters = decode_gluon.launch_counters(q.device, B * Hkv) if claim else None
        # (the refill's registers and the claims' together spill at the 4-bit register cap: by default, one of them)
        release = cfg.gluon_release == 1 or (cfg.gluon_release == -1 and k_fmt.bits == v_fmt.bits == 4 and not claim)
        k_i8 = cfg.gluon_i8 == 1 or (cfg.gluon_i8 == -1 and k_fmt.bits == 2 and blocks // num_splits >= I8_MIN_TILES)
        kernel = decode_gluon.launch(
            q, k_data, ka, ks, v_data, va, vs, fp_k, fp_v, pm, pl, pacc, start, lens, Hkv, G, n_quant, n_fp, n_sinks,
            chunk, num_splits, qscale, kc["NSEP"], vc["NSEP"], kc["BITS"], vc["BITS"], seq_start is not None,
            cfg.gluon_stages, cfg.maxnreg, fp_in, bool(cfg.gluon_trigger), release, claim=claim, counters=counters,
            k_i8=k_i8)
        num_warps = 1
    else:
        kernel = _decode_split_kernel[(B * Hkv, n_slots)](
            q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1),
            k_data, *k_data.stride()[:3], ka, kb, *kms, ks,
            v_data, *v_data.stride()[:3], va, vb, *vms, vs,
            fp_k, *fp_k.stride()[:3], fp_v, *fp_v.stride()[:3],
            pm, pl, pacc, start, lens if lens is not None else start,
            Hkv, G, n_quant, n_fp, n_sinks, chunk, num_splits, float(qscale), float(capscale),
            HEAD_DIM=d, G_PAD=g_pad, BLOCK_N=block_n, BLOCK_F=cfg.block_f,
            K_KIND=kc["KIND"], K_BITS=kc["BITS"], K_GROUP=kc["GROUP"], K_P=kc["P"], K_MP=kc["MP"],
            K_NSEP=kc["NSEP"], K_DT=kc["DT"],
            V_KIND=vc["KIND"], V_BITS=vc["BITS"], V_GROUP=vc["GROUP"], V_P=vc["P"], V_MP=vc["MP"],
            V_NSEP=vc["NSEP"], V_DT=vc["DT"],
            F_MP=next_pow2(d), FK_DT=fk_dt, FV_DT=fv_dt,
            HAS_QUANT=num_splits > 0, HAS_FP=has_fp, HAS_START=seq_start is not None, HAS_SOFTCAP=bool(softcap),
            DIRECT=direct, DEV_LENS=lens is not None, K_ROW16=_rows16(kc["KIND"], k_data),
            V_ROW16=_rows16(vc["KIND"], v_data), V_LB=cfg.v_lanes_for(vc["MP"]),
            num_warps=num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
        )
    variant = (occ_key, getattr(kernel, "hash", None) or id(kernel))  # compiled kernels live as long as the process
    if backend == "triton" and variant not in _OCC_SEEN:
        # the compiled variants of one key (e.g. the Gluon kernel with the fp16 slots in the split programs or in
        # programs of their own) may differ by a program per SM: the split count is sized for the smallest seen, so
        # that a launch sized at one variant's occupancy does not spill into a second wave with another's
        _OCC_SEEN.add(variant)
        occ = _ctas_per_sm(kernel, num_warps, q.device.index or 0, cfg.slots_per_sm(num_warps))
        _OCCUPANCY[occ_key] = min(occ, _OCCUPANCY.get(occ_key, occ))
    if use_gluon and n_slots <= decode_gluon.MERGE_MAX:
        # its own merge: one warp per query head and 32 channels, the sums over the partials in-thread
        decode_gluon.merge(pm, pl, pacc, out, Hq, G, n_slots, counters)
    elif not direct:
        _merge_kernel[(B * Hq,)](
            pm, pl, pacc, out, out.stride(0), out.stride(1), Hq, G, n_slots, counters if counters is not None else pm,
            HEAD_DIM=d, D_PAD=next_pow2(d), S_BLOCK=min(cfg.merge_block, next_pow2(n_slots)), PDL=use_gluon,
            CLAIMS=counters is not None, num_warps=4, **({"launch_pdl": True} if use_gluon else {}),
        )
    return out


# ---------------------------------------------------------------------------------------------- reference
def _dequant_range(store: dict[str, Tensor], fmt: KVFormat, role: str, n: int, scale: Tensor | None) -> Tensor:
    qt = {name: t[:, :, :token_rows(fmt, role, name, n)] for name, t in store.items()}
    return formats.dequantize(qt, fmt, role, scale)


def decode_attention_reference(q: Tensor, k_store: dict[str, Tensor], v_store: dict[str, Tensor], k_fmt: KVFormat,
                               v_fmt: KVFormat, n_quant: int, fp_k: Tensor, fp_v: Tensor, n_fp: int, n_sinks: int,
                               scaling: float, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                               seq_start: Tensor | None = None, softcap: float | None = None,
                               num_splits: int | None = None) -> Tensor:
    """:func:`decode_attention` in fp32 PyTorch: dequantize through formats.py, then plain softmax attention.

    Returns fp32 ``[B, Hq, d]``. ``num_splits`` is accepted for signature parity and ignored.
    """
    B, Hq, Hkv, d = _check(q, k_store, v_store, k_fmt, v_fmt, n_quant, fp_k, fp_v, n_fp, k_scale, v_scale)
    dev = q.device
    k = torch.cat([_dequant_range(k_store, k_fmt, "k", n_quant, k_scale), fp_k[:, :, :n_fp].float()], dim=2)
    v = torch.cat([_dequant_range(v_store, v_fmt, "v", n_quant, v_scale), fp_v[:, :, :n_fp].float()], dim=2)
    slot = torch.arange(n_fp, device=dev)
    pos = torch.cat([n_sinks + torch.arange(n_quant, device=dev), torch.where(slot < n_sinks, slot, n_quant + slot)])
    valid = None
    if seq_start is not None:
        valid = pos[None, :] >= seq_start.to(dev).long()[:, None]
    qf = q.float()[:, :, None]
    if softcap is None:
        return formats.reference_attention(qf, k, v, scaling, key_valid=valid)[:, :, 0]
    # formats.reference_attention has no soft-capping: same attention with Gemma-2's capped scores
    G = Hq // Hkv
    kf, vf = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = softcap * torch.tanh(torch.matmul(qf, kf.transpose(-1, -2)) * scaling / softcap)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, vf)[:, :, 0]
