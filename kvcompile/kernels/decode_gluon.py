"""Decode attention's quantized splits written in Gluon: packed K/V become tensor-core operands in registers.

The Triton kernel of :mod:`kvcompile.kernels.decode` leaves two costs that its language cannot remove (Nsight
Compute on an H200, ``benchmarks/RESULTS.md`` §1a′): Triton picks the layouts through which every packed tile goes
global -> shared memory -> registers (31 % of the stalls wait on shared memory; 64-byte value rows take 4-way bank
conflicts), and the query's loop-invariant MMA operand is re-read from shared memory in every iteration. Gluon
(``triton.experimental.gluon``) lets a kernel state each tensor's layout, so here, one warp per program and 64
tokens per step:

* **keys** are read as 32-bit words in a register layout chosen so that, after the bit-slice masking of
  :func:`kvcompile.kernels.decode._unpack`, every thread already holds exactly its part of the MMA's A operand
  (tokens are the M dimension, the reduction runs over code slots). The slot order is free as long as the query is
  gathered in the same order: lane group ``c`` reads words ``KS*c .. KS*c + KS - 1`` of a token row (one 8- or
  16-byte read), and word ``KS*c + ks`` feeds k-step ``ks``. No shuffles, no layout conversion.
* **keys at 2 bits** (``KI8``; the host's default where a split program has at least 8 tiles) are instead read as
  bytes and enter *int8* MMAs
  (:func:`_k_operand_i8`): one mask gives four code slots (one 32-bit register of int8 codes) where an fp16 operand
  register holds two, so the score side needs half the masks. The query enters as the high and low int8 halves of
  a signed 16-bit integer (|q| <= 32639; two MMAs, the high sums scaled by 256 in between), so the scores are exact
  integer sums of a query rounded to 15 bits of magnitude (13 in the slots whose codes stay shifted by two bits;
  fp16 keeps 11). Hopper has no fp8 ``mma.sync`` (ptxas widens e4m3 operands to fp16:
  ``benchmarks/mma_operand_types.py``), so int8 is the one narrower operand it offers.
* **values** are the A operand of ``O^T[channels, G] += V^T[channels, tokens] P^T[tokens, G]``: each 32-bit register
  of that operand pairs two *tokens* of one channel. A thread reads the same words of two tokens and joins their
  16-bit lanes with byte permutes (:func:`_v_pairs`); masking then gives the operand directly. The rows (channels)
  come out permuted, which the output's store undoes, and the tokens are paired so that the four lanes of a row group
  read four consecutive rows (no bank conflicts); the softmax weights are permuted to match (:func:`_p_operand`).
* the **query** operand is built once per program and stays in registers.
* tiles move global -> shared memory by 16-byte asynchronous copies, ``STAGES`` deep (2: measured best), and are
  read back in the layouts above. Only the softmax weights change layout inside the loop (by warp shuffles). With
  ``RELEASE`` a landed tile is read into registers whole and its stage refilled then: ``STAGES`` tiles in flight
  per program instead of ``STAGES - 1`` (as written; ptxas moves the score work above the value reads and the
  barrier after them, so the refill is issued after the scores, not at once).
* **tiles claimed at run time** (``CLAIM``, the host's default when keys and values are 4-bit): programs of equal
  work end up to ~15 % apart (the memory system serves them unevenly), so each split program takes only CLAIM % of
  its even share of the KV head's tiles as a fixed range; the rest go one tile at a time to whichever of the head's
  programs asks first, by an atomic counter per head (:func:`launch_counters`) that is asked a tile ahead, so its
  answer never stalls the loop. With claims the program's fp16 chunk comes before its loop, so that the programs
  with a chunk claim fewer tiles.
* the **fp16 slots** (sinks and recent tail) are cut into chunks, each its own partial. When the split programs fill
  the GPU's wave, split program ``j mod num_splits`` attends to chunk j (``FP_CHUNK_IN`` slots) after its loop, so
  that no split waits for a place on an SM; otherwise more programs of the same kernel take ``FP_CHUNK`` slots each,
  placed first in the grid, and run beside the splits (the host decides: :func:`kvcompile.kernels.decode._decode`).
* the programs write the partials of :mod:`kvcompile.kernels.decode`; this module's merge kernel (:func:`merge`)
  is launched as their programmatic dependent (by default it may launch as soon as every program has started; it
  waits for the results). It keeps every partial of a channel in one lane's registers, so its sums over the
  partials need no shared-memory reduction (H200, Llama-3-8B shape, batch 8, 32k, nsep-2: 48.6 -> 48.0 us against
  the Triton merge kernel, ``benchmarks/RESULTS.md`` §1a⁹).

* at 2-bit keys and values (``LEAN``, :func:`_values`) the loop, bound by instructions rather than memory, also
  skips the end-of-range selects on whole tiles, rescales its running state only when a running max grows, and
  sums the softmax weights by an MMA over a tile of ones.
* with int8 scores at 2-bit keys and values and at most 4 query heads per KV head (``HALF``; Llama-3-8B and
  Mistral-7B have 4), the score MMA's padding columns would hold nothing: there columns 4-7 take the tile's second
  half of tokens against the same query heads. The key operand becomes [32 rows, 256 slots] (row r: token r, then
  token r + 32; the same registers), the query [256, 8] block-diagonal (:func:`_half_q`), so the same 32 int8 MMAs
  leave the scores in [32, 8] (8 registers a thread, not 16 of which half were padding), and every step of the
  softmax (scaling, max, exp2, the sums, p·r) runs on half the registers. The value MMAs take the weights as a
  block-diagonal [64, 8] operand (:func:`_half_q` too); the two halves of a head are merged once, after the loop, as
  two splits are. There the growth check of the running max is also one warp vote (:func:`_any_positive`) instead of
  a chain of shuffles, and the scores' scale joins the subtraction of the running max (one fused multiply-add).

* the per-program work around the loop is kept small, since at 16 tiles per program it weighed ~14 % of the
  instructions: the int8 query is built in the B operand's own layout (:func:`_q_operand_i8`: vector loads, no
  layout conversion, its maximum reduced over a thread's registers first), and HALF's two halves are exchanged by
  one butterfly shuffle per register (:func:`_other_half`). Setup 1,334 -> 684 and epilogue 468 -> 349
  instructions per program at the target shape (``benchmarks/kernel_sass.py``, Triton 3.6).

Measured on an H200 (``benchmarks/RESULTS.md`` §1a⁶-§1a⁹): Llama-3-8B shape, batch 8, 32k: nsep-4 74.9 us (SDPA
244.5: 3.26x; it reads at 82 % of the measured HBM read bandwidth), nsep-2 48.3 us (5.07x; 50.6 us before the
leaner setup and merge, 53.2 us before HALF, 55.2 us with the int8 scores alone, 57.0 with fp16 ones).

Scope: Hopper GPUs (sm_90); nsep / int-token keys and values of 2 or 4 bits at head_dim 128, up to 8 query heads per
KV head, fp16 or bf16 queries and fp16 slots, no soft-capping (:func:`supported`; the rest runs the Triton kernel).
The math, the stored layout and the partials are those of :mod:`kvcompile.kernels.decode`, whose docstring explains
the code offsets and the fp16-subnormal unpacking. Gluon has no interpreter: this path runs only on CUDA GPUs; the
tests compare it with the reference there (``pytest -m gpu``) and compile it for sm_90 on the CPU machine
(``python benchmarks/kernel_sass.py --gluon --format nsep-4`` prints its main loop's instructions).
"""

from __future__ import annotations

from functools import cache

try:  # Gluon is experimental and versioned with Triton; without it the Triton kernel serves every case
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    # Triton 3.6 calls the asynchronous copy async_copy_global_to_shared; later versions async_load
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after 3.6 too
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

__all__ = ["FP_CHUNK", "FP_CHUNK_IN", "HAVE_GLUON", "MERGE_MAX", "fp_splits", "gluon_layouts", "launch",
           "launch_counters", "merge", "record_program_times", "supported"]

BLOCK_N = 64  # tokens per loop step: the M dimension of four 16-row MMA tiles, one warp
FP_CHUNK = 32  # fp16 slots per program of their own (sinks + tail: 100-200 slots go to several short programs)
FP_CHUNK_IN = 16  # fp16 slots per chunk that a split program attends to after its loop: one tile, one round trip
G_PAD = 8  # query heads per KV head, padded: the MMA's N dimension
HEAD_DIM = 128
MERGE_MAX = 64  # partials per KV head that merge() takes (one block, in registers); longer lists: decode's merge


def _mma_layout():
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])


def _k_words_layout(bits: int):
    """[BLOCK_N, m/4] words of the key rows: lane ``4R + c`` holds rows ``R + 8hf + 16mt`` and words
    ``KS*c + ks`` (ks in registers, contiguous: one vector read of shared memory)."""
    m = HEAD_DIM * bits // 8
    ks = m // 16  # k-steps of 16 slots per bit-slice
    reg = [[0, 1 << i] for i in range(ks.bit_length() - 1)] + [[8, 0], [16, 0], [32, 0]]
    lane = [[0, ks], [0, 2 * ks], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout(reg, lane, [], [], [BLOCK_N, m // 4])


def _k_bytes_layout(bits: int):
    """[BLOCK_N, m] bytes of the key rows, as :func:`_k_words_layout` holds their words: the bytes of a word are a
    thread's four consecutive registers (one 32-bit register once packed: :func:`_k_operand_i8`)."""
    m = HEAD_DIM * bits // 8
    ks = m // 16
    reg = [[0, 1], [0, 2]] + [[0, 4 << i] for i in range(ks.bit_length() - 1)] + [[8, 0], [16, 0], [32, 0]]
    lane = [[0, 4 * ks], [0, 8 * ks], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout(reg, lane, [], [], [BLOCK_N, m])


def _v_words_layout(bits: int):
    """[BLOCK_N, m/4] words of the value rows: lane ``4R + c`` holds tokens ``8a + 4e + c`` (a, e in registers) and
    words ``WI*R + wi`` (WI = m/32 words: the rows' bytes of its channel slots). The four lanes c of a row group
    read four consecutive token rows, so one load instruction covers a contiguous span (no shared-memory bank
    conflicts); the values' dot then runs over the tokens in the order ``8a + 2c + e`` (see :func:`_p_operand`)."""
    m = HEAD_DIM * bits // 8
    wi = m // 32
    reg = [[0, 1 << i] for i in range(wi.bit_length() - 1)] + [[4, 0], [8, 0], [16, 0], [32, 0]]
    lane = [[1, 0], [2, 0], [0, wi], [0, 2 * wi], [0, 4 * wi]]
    return gl.DistributedLinearLayout(reg, lane, [], [], [BLOCK_N, m // 4])


def _copy_layout(bits: int):
    """[BLOCK_N, m/4] words as the asynchronous copies move them: 16 bytes per lane, consecutive lanes along a row."""
    nw = HEAD_DIM * bits // 32
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[128 // nw, nw // 4], warps_per_cta=[1, 1],
                            order=[1, 0])


@cache
def gluon_layouts(k_bits: int, v_bits: int, k_i8: bool = False) -> dict:
    """The constexpr layouts of one specialisation (built on the host: Gluon layouts are plain dataclasses).
    ``k_i8``: the keys are read as bytes for int8 MMAs (:func:`_k_operand_i8`)."""
    mma = _mma_layout()
    return dict(
        MMA=mma,
        KW=_k_bytes_layout(k_bits) if k_i8 else _k_words_layout(k_bits),
        OPK=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4 if k_i8 else 2),
        OPQ=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4 if k_i8 else 2),
        VW=_v_words_layout(v_bits),
        OPA=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
        OPB=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2),
        BL=gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[4, 8], warps_per_cta=[1, 1], order=[1, 0]),
        RL=gl.BlockedLayout(size_per_thread=[1, 2], threads_per_warp=[32, 1], warps_per_cta=[1, 1], order=[1, 0]),
        KC=_copy_layout(k_bits),
        VC=_copy_layout(v_bits),
        SM3=gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]),  # row-major stages
        LN=gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[1], order=[0]),  # a lane each
    )


_TIMES: list = [None]  # the buffer of record_program_times, or None


def record_program_times(buf=None) -> None:
    """A profiling aid: while ``buf`` (an int64 CUDA tensor of at least 4 words per program) is set, every launch
    writes, per program of its grid (row-major, ``pid_bh * grid_columns + column``), the GPU's global timer in ns at
    the program's start, after its quantized loop and partial store, and at its end, then its SM's id. ``None``
    stops recording (the default: the kernel then has no such code). See ``benchmarks/ncu_decode.py --programs``."""
    _TIMES[0] = buf


_COUNTERS: dict = {}  # (device index, stream) -> int32 counters, zero between launches


def launch_counters(device, n: int):
    """At least ``n`` int32 counters for a launch on ``device``'s current stream, zero: per KV head ``bh``, the tiles
    claimed at run time. The merge kernel that follows the launch zeroes them again (:func:`merge`, or for more
    than :data:`MERGE_MAX` partials per KV head :func:`kvcompile.kernels.decode._merge_kernel`'s CLAIMS): it runs
    once the whole split grid has retired. One
    buffer per stream, so that launches on different streams never share counters; launches of one stream run one
    after the other. A CUDA graph keeps the buffer of the stream it was captured on: replays of graphs captured on
    one stream must not overlap (as with every buffer a graph holds). A buffer that must grow is replaced, and the
    old one kept alive, since a captured graph may still point at it."""
    import torch

    if device.type != "cuda":  # (compiled without a GPU: benchmarks/kernel_sass.py)
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    bufs = _COUNTERS.setdefault(key, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return bufs[-1]


def fp_splits(n_fp: int, in_splits: bool = False) -> int:
    """Partials per KV head that the fp16 slots take: chunks of :data:`FP_CHUNK_IN` slots when the split programs
    attend to them (``in_splits``), else programs of :data:`FP_CHUNK`."""
    return -(-n_fp // (FP_CHUNK_IN if in_splits else FP_CHUNK))


if HAVE_GLUON:
    _TWO24 = gl.constexpr(16777216.0)
    _D = gl.constexpr(HEAD_DIM)  # supported() admits this head_dim only
    _G = gl.constexpr(G_PAD)
    _BN = gl.constexpr(BLOCK_N)
    _NEG = gl.constexpr(-1.0e30)

    @gluon.jit
    def _clock():
        """(the global timer in ns, this SM's id)."""
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)
        sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        return t, sm

    @gluon.jit
    def _launch_dependents():
        """Programmatic dependent launch: let the next kernel (the merge) launch once every program got here."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _half(x, HI: gl.constexpr):
        """The low or high 16 bits of uint32 words, read as fp16 (the masked codes are fp16 subnormals)."""
        if HI:
            x = x >> 16
        return x.to(gl.uint16).to(gl.float16, bitcast=True)

    @gluon.jit
    def _k_operand(kw, SL: gl.constexpr, BITS: gl.constexpr, OPA: gl.constexpr):
        """Bit-slice SL of the key words [BLOCK_N, m/4] -> the MMA A operand [BLOCK_N, m] (fp16 codes * 2^(SL*BITS-24)),
        slot ``16ks + 8h + 2c + e`` = byte ``h + 2e`` of word ``KS*c + ks`` (the query is gathered so:
        :func:`_q_operand`)."""
        N: gl.constexpr = kw.shape[0]
        NW: gl.constexpr = kw.shape[1]
        KS: gl.constexpr = NW // 4
        MASK: gl.constexpr = (((1 << BITS) - 1) << (SL * BITS)) * 0x10001
        y0 = kw & MASK  # bytes 0 and 2
        y1 = (kw >> 8) & MASK  # bytes 1 and 3
        j = gl.join(gl.join(_half(y0, False), _half(y0, True)), gl.join(_half(y1, False), _half(y1, True)))
        j = gl.reshape(j, [N, 4, KS, 2, 2])  # [token, c, ks, e, h]
        j = gl.permute(j, [0, 2, 4, 1, 3])  # [token, ks, h, c, e]
        return gl.convert_layout(gl.reshape(j, [N, NW * 4]), OPA)

    # bit fields of int8 key bytes, four (one 32-bit word) per instruction (see _k_operand_i8)
    _F2_0 = gl.constexpr("and.b32 $0, $1, 0x03030303;")
    _F2_1 = gl.constexpr("and.b32 $0, $1, 0x0C0C0C0C;")
    _F2_2 = gl.constexpr("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x03030303; }")
    _F2_3 = gl.constexpr("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0C0C0C0C; }")
    _F4_0 = gl.constexpr("and.b32 $0, $1, 0x0F0F0F0F;")
    _F4_1 = gl.constexpr("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }")

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton > 3.6
        @gluon.jit
        def _as_bytes(stage):
            """A stage of int32 words [BLOCK_N, w] as int8 [BLOCK_N, 4w] (the same shared memory)."""
            return stage.reinterpret(gl.int8, [stage.shape[0], stage.shape[1] * 4], stage.layout)
    else:
        @gluon.jit
        def _as_bytes(stage):
            """A stage of int32 words [BLOCK_N, w] as int8 [BLOCK_N, 4w] (the same shared memory)."""
            return stage._reinterpret(gl.int8, [stage.shape[0], stage.shape[1] * 4], stage.layout)

    @gluon.jit
    def _field(kb, ASM: gl.constexpr):
        """One of the bit-field masks above over int8 ``kb``, whose four consecutive elements per thread are one word
        (pack=4: the asm sees them as one 32-bit register)."""
        return gl.inline_asm_elementwise(ASM, "=r,r", [kb], dtype=gl.int8, is_pure=True, pack=4)

    @gluon.jit
    def _k_operand_i8(kb, BITS: gl.constexpr, OPK: gl.constexpr, HALF: gl.constexpr):
        """Key bytes [BLOCK_N, m] (layout :func:`_k_bytes_layout`) -> the int8 MMA A operand [BLOCK_N, 128]: every
        bit field of every byte, as code * 4^fA at 2-bit (mask 0x0C keeps the field in place: the query slot is
        divided by 4 instead, :func:`_q_operand_i8`), as the code at 4-bit. One mask per four slots, against one per
        two for fp16 operands. Slot ``k = b + 4c + 16fA + 32 hi`` is byte ``b`` of word ``KS*c + ks`` (lane group c),
        field ``fA + 2fB``, where ``hi = ks + 2fB`` at 2-bit and ``ks`` at 4-bit. HALF: [BLOCK_N/2, 256], token
        ``r + BLOCK_N/2`` in slots ``128 + k`` of row r (the same registers: see :func:`_half_q`)."""
        N: gl.constexpr = kb.shape[0]
        if BITS == 2:
            j = gl.join(gl.join(_field(kb, _F2_0), _field(kb, _F2_1)), gl.join(_field(kb, _F2_2), _field(kb, _F2_3)))
            j = gl.reshape(j, [N, 2, 2, 2, 4, 2, 2])  # [token, c1, c0, ks, b, fA, fB]
            j = gl.permute(j, [0, 6, 3, 5, 1, 2, 4])  # [token, fB, ks, fA, c1, c0, b]
        else:
            j = gl.join(_field(kb, _F4_0), _field(kb, _F4_1))
            j = gl.reshape(j, [N, 2, 2, 2, 2, 4, 2])  # [token, c1, c0, ks1, ks0, b, fA]
            j = gl.permute(j, [0, 3, 4, 6, 1, 2, 5])  # [token, ks1, ks0, fA, c1, c0, b]
        j = gl.reshape(j, [N, _D])
        if HALF:
            j = gl.reshape(gl.permute(gl.reshape(j, [2, N // 2, _D]), [1, 0, 2]), [N // 2, 2 * _D])
        return gl.convert_layout(j, OPK)

    @gluon.jit
    def _q_operand_i8(q_ptr, sqh, ks_ptr, qscale, G, BITS: gl.constexpr, NSEP: gl.constexpr, OPQ: gl.constexpr,
                      HALF: gl.constexpr):
        """The query [128 slots, G_PAD] (fp32) in the slot order of :func:`_k_operand_i8`, times the softmax scale
        and the nsep key scale, divided by the slot's field multiplier; and that multiplier [128] (int32). Built in the
        layout of the int8 MMA's B operand (OPQ: a thread holds slots of its own column only), so that the int8
        halves made from it need no layout conversion (from a blocked layout that conversion and the padding of
        :func:`_half_q` were ~350 of the program's ~1,300 setup instructions). HALF: column c holds query head
        ``c mod G_PAD/2``."""
        M: gl.constexpr = _D * BITS // 8
        KS: gl.constexpr = M // 16
        k = gl.arange(0, _D, layout=gl.SliceLayout(1, OPQ))
        # (// and % rather than shifts and masks: the compiler then sees runs of four consecutive channels in a
        # thread's registers, k % 4, and reads them with one vector load)
        fa = (k // 16) % 2
        hi = k // 32
        if BITS == 2:
            ks = hi % 2
            f = fa + 2 * (hi // 2)
            multi = 1 + 3 * fa
        else:
            ks = hi
            f = fa
            multi = gl.full([_D], 1, gl.int32, layout=gl.SliceLayout(1, OPQ))
        # field f of byte B holds channel f * M + B (the planar layout of formats.pack)
        chan = f * M + 4 * ks + 4 * KS * ((k // 4) % 4) + k % 4
        g = gl.arange(0, _G, layout=gl.SliceLayout(0, OPQ))
        if HALF:
            g = g % (_G // 2)
        qt = gl.load(q_ptr + g[None, :] * sqh + chan[:, None], mask=(g < G)[None, :], other=0.0)
        qt = qt.to(gl.float32) * qscale
        if NSEP:
            qt = qt * gl.load(ks_ptr + chan)[:, None]
        return qt / multi.to(gl.float32)[:, None], multi

    @gluon.jit
    def _half_q(x):
        """HALF: a B operand [K, G_PAD] (8- or 16-bit, its layout: column c is lane // 4) -> [2K, G_PAD]
        block-diagonal, for a dot that runs over two tiles' rows: column c keeps rows ``K h + k`` where
        h = (c >= G_PAD/2), zeros elsewhere.

        - The int8 query [128, G_PAD]: with the keys of :func:`_k_operand_i8` (row r: token r in slots 0-127,
          token r + BLOCK_N/2 in slots 128-255) score column c is then token ``r + (BLOCK_N/2) h`` against query
          head c mod G_PAD/2.
        - The softmax weights [BLOCK_N/2, G_PAD]: the values' dot runs over all BLOCK_N tokens, column c over rows
          [0, BLOCK_N/2) or [BLOCK_N/2, BLOCK_N) of it.

        A lane keeps or clears whole 32-bit registers (one select each, :func:`_lanes_half`; a select per element
        would unpack and repack them), and the halves become register bits of the same layout (the conversion to
        the [2K, G_PAD] operand moves nothing)."""
        j = gl.join(_lanes_half(x, False), _lanes_half(x, True))  # [row, c, h]
        return gl.reshape(gl.permute(j, [2, 0, 1]), [2 * x.shape[0], _G])

    @gluon.jit
    def _lanes_half(x, HI: gl.constexpr):
        """``where(lane >= 16 if HI else lane < 16, x, 0)`` on whole 32-bit registers of x (8- or 16-bit elements:
        four or two per register), one select each."""
        if HI:
            asm: gl.constexpr = ("{ .reg .pred p; .reg .u32 l; mov.u32 l, %laneid; setp.ge.u32 p, l, 16;"
                                 " selp.b32 $0, $1, 0, p; }")
        else:
            asm: gl.constexpr = ("{ .reg .pred p; .reg .u32 l; mov.u32 l, %laneid; setp.lt.u32 p, l, 16;"
                                 " selp.b32 $0, $1, 0, p; }")
        PACK: gl.constexpr = 32 // x.dtype.primitive_bitwidth
        return gl.inline_asm_elementwise(asm, "=r,r", [x], dtype=x.dtype, is_pure=True, pack=PACK)

    @gluon.jit
    def _by_half(x, MMA: gl.constexpr):
        """HALF: per-token values x [BLOCK_N] (SliceLayout(1, MMA)) -> [BLOCK_N/2, G_PAD] in the order of the scores:
        row r, column c holds token ``r + (BLOCK_N/2)(c >= G_PAD/2)``'s."""
        R: gl.constexpr = x.shape[0] // 2
        lo, hi = gl.split(gl.permute(gl.reshape(x, [2, R]), [1, 0]))
        lo = gl.convert_layout(lo, gl.SliceLayout(1, MMA))
        hi = gl.convert_layout(hi, gl.SliceLayout(1, MMA))
        c = gl.arange(0, _G, layout=gl.SliceLayout(0, MMA))
        return gl.where((c >= _G // 2)[None, :], hi[:, None], lo[:, None])

    @gluon.jit
    def _first(a, b):
        """A reduction's combine that keeps its first operand (for values every lane already holds)."""
        return a

    @gluon.jit
    def _any_positive(x):
        """1 if any element of the scores x [R, G_PAD] (MMA layout) is > 0, else 0, as a warp-uniform scalar: each
        thread's maximum of its own registers, then one warp vote (in place of five dependent shuffles)."""
        R: gl.constexpr = x.shape[0]
        # flat index i = 8 row + col: a thread's registers are i bits 0, 6 and 7, its lane bits 1-5
        y = gl.reshape(gl.permute(gl.reshape(x, [R // 8, 32, 2]), [1, 0, 2]), [32, R // 4])
        # in-thread, as a tree (halves against halves), not a chain of dependent maxima
        y = gl.max(gl.reshape(y, [32, 2, R // 8]), axis=1)
        y = gl.max(gl.reshape(y, [32, 2, R // 16]), axis=1)
        y = gl.max(y, axis=1)
        v = gl.inline_asm_elementwise(
            "{ .reg .pred p, q; setp.gt.f32 p, $1, 0f00000000; vote.sync.any.pred q, p, 0xffffffff;"
            " selp.u32 $0, 1, 0, q; }",
            "=r,f", [y], dtype=gl.int32, is_pure=True, pack=1)
        # every lane holds the vote: the "reduction" keeps its own value (the unused shuffles are dropped)
        return gl.reduce(v, 0, _first)

    @gluon.jit
    def _other_half(x):
        """x [R, G_PAD] in the MMA accumulator layout, or a vector [G_PAD] in its column slice, with columns c and
        c xor G_PAD/2 exchanged (HALF: the other half of the tile, same head). There column c sits in lane bits 0-1
        (``c // 2 == lane % 4``), so the exchange is one butterfly shuffle (lane xor 2) per register; once per
        program (a conversion through a layout holding both halves took ~170 instructions)."""
        gl.static_assert(_G == 8, "the lane xor 2 exchange is columns c and c ^ 4 of 8")
        return gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;", "=r,r", [x],
                                         dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _rint(x):
        """Round to the nearest integer (ties to even), as int32."""
        return gl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [x], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _v_pairs(vw):
        """Value words [BLOCK_N, m/4] -> (lane 0, lane 1) of the tokens ``8a + c`` and ``8a + 4 + c`` joined per word:
        [BLOCK_N/2, m/4] each (pair ``4a + c``), the low half from the first."""
        N: gl.constexpr = vw.shape[0]
        NW: gl.constexpr = vw.shape[1]
        a, b = gl.split(gl.permute(gl.reshape(vw, [N // 8, 2, 4, NW]), [0, 2, 3, 1]))
        a = gl.reshape(a, [N // 2, NW])
        b = gl.reshape(b, [N // 2, NW])
        # one byte permute per joined word (the shift-and-mask form compiles to two instructions)
        x01 = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b], dtype=gl.uint32,
                                        is_pure=True, pack=1)  # (a & 0xFFFF) | (b << 16)
        x23 = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b], dtype=gl.uint32,
                                        is_pure=True, pack=1)  # (a >> 16) | ((b >> 16) << 16)
        return x01, x23

    @gluon.jit
    def _v_operand(x01, x23, SL: gl.constexpr, BITS: gl.constexpr, OPA: gl.constexpr):
        """Bit-slice SL of the joined value lanes -> the MMA A operand [m, BLOCK_N] (channel slots x tokens); row
        ``R + 8 bp0 + 16 bp1 + 32 wi`` = byte ``4 (WI R + wi) + bp`` of the rows (:func:`_store_out` undoes it)."""
        NP: gl.constexpr = x01.shape[0]
        NW: gl.constexpr = x01.shape[1]
        MASK: gl.constexpr = (((1 << BITS) - 1) << (SL * BITS)) * 0x10001
        b0 = x01 & MASK
        b1 = (x01 >> 8) & MASK
        b2 = x23 & MASK
        b3 = (x23 >> 8) & MASK
        e0 = gl.join(_half(b0, False), _half(b0, True))  # [pair, word, e]
        e1 = gl.join(_half(b1, False), _half(b1, True))
        e2 = gl.join(_half(b2, False), _half(b2, True))
        e3 = gl.join(_half(b3, False), _half(b3, True))
        j = gl.join(gl.join(e0, e1), gl.join(e2, e3))  # [pair, word, e, bp0, bp1]
        if NW == 16:
            j = gl.reshape(j, [NP, 8, 2, 2, 2, 2])  # [pair, R, wi, e, bp0, bp1]
            j = gl.permute(j, [2, 5, 4, 1, 0, 3])  # [wi, bp1, bp0, R, pair, e]
        else:
            j = gl.permute(j, [4, 3, 1, 0, 2])  # [bp1, bp0, R, pair, e]
        return gl.convert_layout(gl.reshape(j, [NW * 4, 2 * NP]), OPA)

    @gluon.jit
    def _p_operand(p, OPB: gl.constexpr):
        """Softmax weights [BLOCK_N, G] (rows = tokens) -> the values' B operand, rows in the dot's token order
        ``8a + 2c + e`` for token ``8a + 4e + c`` (see :func:`_v_words_layout`)."""
        N: gl.constexpr = p.shape[0]
        G: gl.constexpr = p.shape[1]
        p = gl.reshape(gl.permute(gl.reshape(p, [N // 8, 2, 4, G]), [0, 2, 1, 3]), [N, G])
        return gl.convert_layout(p, OPB)

    @gluon.jit
    def _rows8(x):
        """[BLOCK_N, G] -> [8, G]: sums over rows i, i+8, ...: in-thread in the MMA accumulator layout."""
        return gl.sum(gl.reshape(x, [x.shape[0] // 8, 8, x.shape[1]]), axis=0)

    @gluon.jit
    def _scale_cols(x, alpha):
        """x [R, G] * alpha [G] (a per-column rescale), alpha moved to x's column layout (same threads)."""
        return x * gl.convert_layout(alpha, gl.SliceLayout(0, x.type.layout))[None, :]

    @gluon.jit
    def _q_operand(q_ptr, sqh, ks_ptr, qscale, G, SL: gl.constexpr, BITS: gl.constexpr, NSEP: gl.constexpr,
                   BL: gl.constexpr):
        """Slice SL of the query [m, G_PAD] (fp32, slot order of :func:`_k_operand`), times the softmax scale and
        the nsep key scale."""
        M: gl.constexpr = _D * BITS // 8
        KS: gl.constexpr = M // 16
        s = gl.arange(0, M, layout=gl.SliceLayout(1, BL))
        chan = SL * M + 4 * (KS * ((s >> 1) & 3) + (s >> 4)) + ((s >> 3) & 1) + 2 * (s & 1)
        g = gl.arange(0, _G, layout=gl.SliceLayout(0, BL))
        qt = gl.load(q_ptr + g[None, :] * sqh + chan[:, None], mask=(g < G)[None, :], other=0.0)
        qt = qt.to(gl.float32) * qscale
        if NSEP:
            qt = qt * gl.load(ks_ptr + chan)[:, None]
        return qt

    @gluon.jit
    def _q_operands(q, sqh, ksp, qscale, G, K_BITS: gl.constexpr, K_NSEP: gl.constexpr, BL: gl.constexpr,
                    OPB: gl.constexpr):
        """The query's fp16 B operands per key bit-slice (q2/q3 only at 2-bit keys, else placeholders), pre-scaled
        and normalised to a max of 2^14, with their sum over the slots (qoff) and the normaliser."""
        K_P: gl.constexpr = 8 // K_BITS
        qk0 = _q_operand(q, sqh, ksp, qscale, G, 0, K_BITS, K_NSEP, BL)
        qk1 = _q_operand(q, sqh, ksp, qscale, G, 1, K_BITS, K_NSEP, BL)
        amax = gl.maximum(gl.max(gl.abs(qk0), axis=0), gl.max(gl.abs(qk1), axis=0))
        if K_P > 2:
            qk2 = _q_operand(q, sqh, ksp, qscale, G, 2, K_BITS, K_NSEP, BL)
            qk3 = _q_operand(q, sqh, ksp, qscale, G, 3, K_BITS, K_NSEP, BL)
            amax = gl.maximum(amax, gl.maximum(gl.max(gl.abs(qk2), axis=0), gl.max(gl.abs(qk3), axis=0)))
        qnorm = 16384.0 / gl.maximum(gl.max(amax, axis=0), 1e-30)
        q0 = (qk0 * qnorm).to(gl.float16)
        q1 = (qk1 * (qnorm / (1 << K_BITS))).to(gl.float16)
        qoff = gl.sum(q0.to(gl.float32), axis=0) + gl.sum(q1.to(gl.float32), axis=0) * (1 << K_BITS)
        if K_P > 2:
            q2 = (qk2 * (qnorm / (1 << (2 * K_BITS)))).to(gl.float16)
            q3 = (qk3 * (qnorm / (1 << (3 * K_BITS)))).to(gl.float16)
            qoff += gl.sum(q2.to(gl.float32), axis=0) * (1 << (2 * K_BITS))
            qoff += gl.sum(q3.to(gl.float32), axis=0) * (1 << (3 * K_BITS))
            q2 = gl.convert_layout(q2, OPB)
            q3 = gl.convert_layout(q3, OPB)
        q0 = gl.convert_layout(q0, OPB)
        q1 = gl.convert_layout(q1, OPB)
        if K_P == 2:
            q2 = q0
            q3 = q1
        return q0, q1, q2, q3, qoff, qnorm

    @gluon.jit
    def _store_out(acc, prs, SL: gl.constexpr, BITS: gl.constexpr, MID: gl.constexpr, NSEP: gl.constexpr, vs_ptr,
                   pacc_ptr, G, MMA: gl.constexpr):
        """Partial output of value slice SL: acc [m, G_PAD] in the row order of :func:`_v_operand`."""
        M: gl.constexpr = _D * BITS // 8
        WI: gl.constexpr = M // 32
        row = gl.arange(0, M, layout=gl.SliceLayout(1, MMA))
        # row = R + 8 bp0 + 16 bp1 (+ 32 wi): byte 4 (WI R + wi) + bp0 + 2 bp1 of the row
        r_ = row & 7
        bp = ((row >> 3) & 1) + 2 * ((row >> 4) & 1)
        wi = row >> 5
        bi = 4 * (WI * r_ + wi) + bp
        chan = SL * M + bi
        acc = acc * (_TWO24 / (1 << (SL * BITS)))
        if MID:
            acc = acc * 2.0 - 3.0 * prs[None, :]
        else:
            acc = acc - (1 << (BITS - 1)) * prs[None, :]
        if NSEP:
            acc = acc * gl.load(vs_ptr + chan)[:, None]
        g = gl.arange(0, _G, layout=gl.SliceLayout(0, MMA))
        # (the always-true chan >= 0 only gives the mask the store's 2-D shape)
        gl.store(pacc_ptr + g[None, :] * _D + chan[:, None], acc, mask=(g < G)[None, :] & (chan >= 0)[:, None])

    @gluon.jit
    def _fp_part(q, sqh, qscale, G, fk, sfkt, fv, sfvt, f_lo, f_hi, n_sinks, n_quant, start, pm, pl, pacc,
                 HAS_START: gl.constexpr, FDT: gl.constexpr, MMA: gl.constexpr, OPA: gl.constexpr,
                 OPB: gl.constexpr, BL: gl.constexpr, TRIGGER: gl.constexpr):
        """fp16/bf16 slots [f_lo, f_hi) (sinks and recent tail: slot j at position j < n_sinks, else n_quant + j),
        written as one partial. At most FP_CHUNK slots, so a few plain loads, not pipelined: the host spreads the
        slots over many programs, which keeps them off the critical path. TRIGGER: then let the merge kernel launch."""
        BF: gl.constexpr = 16
        # tiles are loaded straight into the operand layouts (4-byte reads of key pairs, 2-byte reads of values: a
        # few per program, and no shared memory, which the quantized loop's stages hold while this runs)
        c = gl.arange(0, _D, layout=gl.SliceLayout(1, BL))
        g = gl.arange(0, _G, layout=gl.SliceLayout(0, BL))
        qf = gl.load(q + g[None, :] * sqh + c[:, None], mask=(g < G)[None, :], other=0.0).to(gl.float32) * qscale
        qf = gl.convert_layout(qf.to(FDT), OPB)
        kt = gl.arange(0, BF, layout=gl.SliceLayout(1, OPA))
        kc = gl.arange(0, _D, layout=gl.SliceLayout(0, OPA))
        vc = gl.arange(0, _D, layout=gl.SliceLayout(1, OPA))
        vt = gl.arange(0, BF, layout=gl.SliceLayout(0, OPA))
        tr0 = gl.arange(0, BF, layout=gl.SliceLayout(1, MMA))
        m_i = gl.full([_G], _NEG, gl.float32, layout=gl.SliceLayout(0, MMA))
        l_i = gl.zeros([_G], gl.float32, layout=gl.SliceLayout(0, MMA))
        acc = gl.zeros([_D, _G], gl.float32, layout=MMA)
        for j0 in range(f_lo, f_hi, BF):
            kk = gl.load(fk + (j0 + kt)[:, None] * sfkt + kc[None, :], mask=(j0 + kt < f_hi)[:, None], other=0.0)
            vv = gl.load(fv + (j0 + vt)[None, :] * sfvt + vc[:, None], mask=(j0 + vt < f_hi)[None, :], other=0.0)
            s = mma_v2(kk, qf, gl.zeros([BF, _G], gl.float32, layout=MMA))
            t = j0 + tr0
            valid = t < f_hi
            if HAS_START:
                valid = valid & (gl.where(t < n_sinks, t, n_quant + t) >= start)
            s = gl.where(valid[:, None], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=0))
            p = gl.exp2(s - m_new[None, :])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=0)
            m_i = m_new
            acc = mma_v2(vv, gl.convert_layout(p.to(FDT), OPB), acc * alpha[None, :])
        if TRIGGER:
            _launch_dependents()
        gm = gl.arange(0, _G, layout=gl.SliceLayout(0, MMA))
        cm = gl.arange(0, _D, layout=gl.SliceLayout(1, MMA))
        gl.store(pacc + gm[None, :] * _D + cm[:, None], acc, mask=(gm < G)[None, :] & (cm >= 0)[:, None])
        gl.store(pm + gm, m_i, mask=gm < G)
        gl.store(pl + gm, l_i, mask=gm < G)

    @gluon.jit
    def _quant_split_kernel(
        q_ptr, sqb, sqh,
        k_ptr, skb, skh, rk_ptr, srkb, srkh, ks_ptr,
        v_ptr, svb, svh, rv_ptr, srvb, srvh, vs_ptr,
        fk_ptr, sfkb, sfkh, sfkt, fv_ptr, sfvb, sfvh, sfvt,
        pm_ptr, pl_ptr, pacc_ptr, start_ptr, lens_ptr, times_ptr, cnt_ptr,
        Hkv, G, n_quant, n_fp, n_sinks, chunk, num_splits, n_slots, qscale,
        K_BITS: gl.constexpr, K_NSEP: gl.constexpr, V_BITS: gl.constexpr, V_NSEP: gl.constexpr,
        HAS_START: gl.constexpr, DEV_LENS: gl.constexpr, STAGES: gl.constexpr, SEP_FP: gl.constexpr,
        IN_FP: gl.constexpr, FPC: gl.constexpr, EARLY: gl.constexpr, RELEASE: gl.constexpr, TIMES: gl.constexpr,
        FDT: gl.constexpr, CLAIM: gl.constexpr, LN: gl.constexpr,
        MMA: gl.constexpr, KW: gl.constexpr, VW: gl.constexpr, OPA: gl.constexpr, OPB: gl.constexpr,
        BL: gl.constexpr, RL: gl.constexpr, SM3: gl.constexpr, KC: gl.constexpr,
        VC: gl.constexpr, KI8: gl.constexpr, OPK: gl.constexpr, OPQ: gl.constexpr, G4: gl.constexpr,
    ):
        """Grid (B * Hkv, num_splits), one quantized split per program. The fp16 slots are cut into ``n_slots -
        num_splits`` chunks of FPC slots, each written as its own partial (slot ``num_splits + j``): with IN_FP, chunk j
        is attended to by split program ``j mod num_splits`` after its own loop (so no program waits for a free place
        on an SM); with SEP_FP, the grid has ``n_slots`` columns and programs [0, n_slots - num_splits) take one chunk
        each (first, so that short programs are not left for the end of the wave). EARLY: the merge kernel may
        launch as soon as every program has started (its programs take the places of those that finish, and wait
        for this grid's results), else once every program's loop is done."""
        pid_bh = gl.program_id(0)
        sid = gl.program_id(1)
        if TIMES:  # record_program_times
            t0, smid = _clock()
            tp = times_ptr + (pid_bh * gl.num_programs(1) + sid) * 4
            gl.store(tp, t0)
            gl.store(tp + 3, smid.to(gl.int64))
        if EARLY:
            _launch_dependents()
        n_fsp = n_slots - num_splits
        if SEP_FP:
            is_fp = sid < n_fsp
            fsp = sid
            sid = sid - n_fsp
        else:
            # never true; kept a runtime test because Triton 3.6 fails to lower the kernel without the fp16 branch
            # (an LLVM assertion in ConvertTritonGPUToLLVM)
            is_fp = sid < 0
            fsp = sid
        b = (pid_bh // Hkv).to(gl.int64)
        h = pid_bh % Hkv
        q = q_ptr + b * sqb + (h * G) * sqh
        start = 0
        if HAS_START:
            start = gl.load(start_ptr + b)
        if DEV_LENS:
            n_quant = gl.load(lens_ptr)
            n_fp = gl.load(lens_ptr + 1)
        if is_fp:
            _fp_chunks(q_ptr, sqb, sqh, qscale, G, fk_ptr, sfkb, sfkh, sfkt, fv_ptr, sfvb, sfvh, sfvt, b, h, fsp,
                       fsp + 1, 1, pid_bh * n_slots + num_splits, n_fp, n_sinks, n_quant, start, pm_ptr, pl_ptr,
                       pacc_ptr, FPC, HAS_START, FDT, MMA, OPA, OPB, BL, not EARLY)
        else:
            if IN_FP and CLAIM > 0:
                # fp16 chunk j = sid (mod num_splits) first: the programs with a chunk then claim fewer tiles, so that
                # they end with the others
                _fp_chunks(q_ptr, sqb, sqh, qscale, G, fk_ptr, sfkb, sfkh, sfkt, fv_ptr, sfvb, sfvh, sfvt, b, h, sid,
                           n_fsp, num_splits, pid_bh * n_slots + num_splits, n_fp, n_sinks, n_quant, start, pm_ptr,
                           pl_ptr, pacc_ptr, FPC, HAS_START, FDT, MMA, OPA, OPB, BL, False)
            _quant_part(q, sqh, k_ptr, skb, skh, rk_ptr, srkb, srkh, ks_ptr, v_ptr, svb, svh, rv_ptr, srvb, srvh,
                        vs_ptr, pm_ptr, pl_ptr, pacc_ptr, b, h, start, G, n_quant, n_sinks, chunk, num_splits,
                        pid_bh * n_slots + sid, sid, qscale, cnt_ptr + pid_bh, K_BITS, K_NSEP,
                        V_BITS, V_NSEP, HAS_START, DEV_LENS, STAGES, EARLY, RELEASE, CLAIM, LN, MMA, KW, VW, OPA, OPB,
                        BL, RL, SM3, KC, VC, KI8, OPK, OPQ, G4)
            if TIMES:
                t1, _ = _clock()
                gl.store(times_ptr + (gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)) * 4 + 1, t1)
            if IN_FP and CLAIM == 0:
                # then the fp16 chunks j = sid (mod num_splits); pointers recomputed: nothing kept over the loop
                _fp_chunks(q_ptr, sqb, sqh, qscale, G, fk_ptr, sfkb, sfkh, sfkt, fv_ptr, sfvb, sfvh, sfvt,
                           (gl.program_id(0) // Hkv).to(gl.int64), gl.program_id(0) % Hkv, sid, n_fsp, num_splits,
                           gl.program_id(0) * n_slots + num_splits, n_fp, n_sinks, n_quant, start, pm_ptr, pl_ptr,
                           pacc_ptr, FPC, HAS_START, FDT, MMA, OPA, OPB, BL, False)
        if TIMES:
            t2, _ = _clock()
            gl.store(times_ptr + (gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)) * 4 + 2, t2)

    @gluon.jit
    def _fp_chunks(q_ptr, sqb, sqh, qscale, G, fk_ptr, sfkb, sfkh, sfkt, fv_ptr, sfvb, sfvh, sfvt, b, h, j_lo, j_hi,
                   j_step, part0, n_fp, n_sinks, n_quant, start, pm_ptr, pl_ptr, pacc_ptr, FPC: gl.constexpr,
                   HAS_START: gl.constexpr, FDT: gl.constexpr, MMA: gl.constexpr, OPA: gl.constexpr,
                   OPB: gl.constexpr, BL: gl.constexpr, TRIGGER: gl.constexpr):
        """fp16 chunks ``j = j_lo, j_lo + j_step, ... < j_hi`` of FPC slots of one (batch, KV head), chunk j into
        partial ``part0 + j``."""
        q = q_ptr + b * sqb + (h * G) * sqh
        # fp strides come divided by 8 (16-byte rows, checked by the host): vector loads
        fkp = fk_ptr + b * (sfkb * 8) + h * (sfkh * 8)
        fvp = fv_ptr + b * (sfvb * 8) + h * (sfvh * 8)
        for j in range(j_lo, j_hi, j_step):
            f_lo = j * FPC
            part = part0 + j
            _fp_part(q, sqh, qscale, G, fkp, sfkt * 8, fvp, sfvt * 8, f_lo, gl.minimum(f_lo + FPC, n_fp), n_sinks,
                     n_quant, start, pm_ptr + part * G, pl_ptr + part * G, pacc_ptr + part * (G * _D), HAS_START,
                     FDT, MMA, OPA, OPB, BL, TRIGGER)

    @gluon.jit
    def _issue(ksm, vsm, rksm, rvsm, st, n1, hi, kp, vp, rkp, rvp, kwo, vwo, ro, kt, vt, rw, SKT: gl.constexpr,
               SVT: gl.constexpr):
        """Request the tile of tokens [n1, n1 + BLOCK_N) (those < hi) into stage st: codes and r, one copy group."""
        _async_load(ksm.index(st), kp + n1 * SKT + kwo, mask=(n1 + kt < hi)[:, None])
        _async_load(vsm.index(st), vp + n1 * SVT + vwo, mask=(n1 + vt < hi)[:, None])
        _async_load(rksm.index(st), rkp + n1 + ro, mask=(n1 + 2 * rw < hi)[:, None])
        _async_load(rvsm.index(st), rvp + n1 + ro, mask=(n1 + 2 * rw < hi)[:, None])
        async_copy.commit_group()

    @gluon.jit
    def _issue_whole(ksm, vsm, rksm, rvsm, st, n1, hi, kp, vp, rkp, rvp, kwo, vwo, ro, kt, vt, rw, SKT: gl.constexpr,
                     SVT: gl.constexpr):
        """:func:`_issue`, without the per-row masks (and their address arithmetic) where the whole tile lies below
        hi: a warp-uniform branch."""
        if n1 + kt.shape[0] <= hi:
            _async_load(ksm.index(st), kp + n1 * SKT + kwo)
            _async_load(vsm.index(st), vp + n1 * SVT + vwo)
            _async_load(rksm.index(st), rkp + n1 + ro)
            _async_load(rvsm.index(st), rvp + n1 + ro)
            async_copy.commit_group()
        else:
            _issue(ksm, vsm, rksm, rvsm, st, n1, hi, kp, vp, rkp, rvp, kwo, vwo, ro, kt, vt, rw, SKT, SVT)

    @gluon.jit
    def _claim(cnt, lane, need):
        """Ask the head's counter for the next dynamic tile (an atomic in lane 0 when ``need``). The answer stays in
        lane 0's register until :func:`_tile_at` reads it, a tile of work later, so its latency is hidden."""
        # inline PTX, lane 0 only, at the address cnt + 4 * laneid formed inside: at an address that ptxas sees is
        # the same in every lane it makes the atomic warp-aggregated, and the shuffle that hands out the result
        # would stall the warp for the round trip right here (gl.atomic_add does that)
        return gl.inline_asm_elementwise(
            "{ .reg .pred p, q; .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; mov.u32 $0, 0; setp.ne.u32 q, $3, 0;"
            " setp.eq.and.u32 p, l, 0, q; mad.wide.u32 a, l, 4, $2; @p atom.relaxed.gpu.global.add.u32 $0, [a], 1; }",
            "=r,r,l,r", [lane, cnt.to(gl.int64, bitcast=True), need.to(gl.int32)], dtype=gl.int32, is_pure=False,
            pack=1)

    @gluon.jit
    def _tile_at(c, lane, need, p, F, s0, dyn0, R):
        """The tile at position p of a program's sequence: static ``s0 + p`` below F, else the claimed dynamic tile
        (``dyn0 + claim``), -1 once the claims ran out (or none was made)."""
        got = gl.max(gl.where(lane == 0, c, 0), axis=0)
        return gl.where(p < F, s0 + p, gl.where(need & (got < R), dyn0 + got, -1))

    @gluon.jit
    def _land(ksm, vsm, rksm, rvsm, ld, STAGES: gl.constexpr, ALL: gl.constexpr, KW: gl.constexpr,
              VW: gl.constexpr, MMA: gl.constexpr, KI8: gl.constexpr):
        """Wait for stage ``ld``'s tile (the oldest copy group) and read its keys and key r, and with ALL its values
        and value r too, then make sure every lane is done reading the stage (r is read back by other lanes). Without
        ALL the values are placeholders: :func:`_values` reads them from the stage after the scores."""
        BN: gl.constexpr = _BN
        async_copy.wait_group(STAGES - 1)
        _barrier()
        if KI8:  # bytes (:func:`_k_operand_i8`)
            kw = _as_bytes(ksm.index(ld)).load(KW)
        else:
            kw = ksm.index(ld).load(KW).to(gl.uint32, bitcast=True)
        rk = rksm.index(ld).reshape([BN]).load(gl.SliceLayout(1, MMA))
        if ALL:
            vw = vsm.index(ld).load(VW).to(gl.uint32, bitcast=True)
            rv = rvsm.index(ld).reshape([BN]).load(gl.SliceLayout(1, MMA))
            _barrier()
        else:
            vw = kw
            rv = rk
        return kw, rk, vw, rv

    @gluon.jit
    def _scores(kw, rk, n0, hi, n_sinks, start, q0, q1, q2, q3, qoff, rq, K_BITS: gl.constexpr,
                HAS_START: gl.constexpr, MMA: gl.constexpr, OPA: gl.constexpr, KI8: gl.constexpr, OPK: gl.constexpr,
                LEAN: gl.constexpr, HALF: gl.constexpr):
        """The scores of tile [n0, n0 + BLOCK_N) in log2 units, -inf where a token does not count: [BLOCK_N, G_PAD]
        from the key words (bytes with KI8) and r. With KI8 q0/q1 are the query's high and low int8 halves
        (:func:`_k_operand_i8`) and ``qoff`` the code offset as an integer, folded into the integer sums; else
        q0..q3 are the fp16 slices (q2/q3 only count at 2-bit keys) and ``qoff`` a float. HALF (KI8 with at most
        G_PAD/2 query heads): [BLOCK_N/2, G_PAD], column c the token ``r + (BLOCK_N/2)(c >= G_PAD/2)`` of row r
        (:func:`_half_q`), neither scaled nor masked: returns (scores, their scale), and :func:`_values` scales and
        masks them with the running max's subtraction. Otherwise the second value is a placeholder."""
        BN: gl.constexpr = kw.shape[0]
        R: gl.constexpr = BN // 2 if HALF else BN
        K_P: gl.constexpr = 8 // K_BITS
        if KI8:
            # exact integer scores: q = 256 q0 + q1. The two halves' sums are independent MMA chains (the low one
            # starts from minus the offset), joined by one shift-add: no float subtraction per score
            a = _k_operand_i8(kw, K_BITS, OPK, HALF)
            shi = mma_v2(a, q0, gl.zeros([R, _G], gl.int32, layout=MMA))
            slo = mma_v2(a, q1, gl.zeros([R, _G], gl.int32, layout=MMA) - qoff[None, :])
            s = (shi * 256 + slo).to(gl.float32)
        else:
            s = mma_v2(_k_operand(kw, 0, K_BITS, OPA), q0, gl.zeros([BN, _G], gl.float32, layout=MMA))
            s = mma_v2(_k_operand(kw, 1, K_BITS, OPA), q1, s)
            if K_P > 2:
                s = mma_v2(_k_operand(kw, 2, K_BITS, OPA), q2, s)
                s = mma_v2(_k_operand(kw, 3, K_BITS, OPA), q3, s)
            s = s * _TWO24 - qoff[None, :]
        if HALF:  # scaled and masked in _values, together with the running max's subtraction
            sc = _by_half(rk, MMA).to(gl.float32) * rq
        else:
            s = _masked(s * (rk.to(gl.float32) * rq)[:, None], n0, hi, n_sinks, start, HAS_START, LEAN, HALF, MMA)
            sc = s  # (unused)
        return s, sc

    @gluon.jit
    def _half_tokens(n0, R: gl.constexpr, MMA: gl.constexpr):
        """HALF: the token of every score [R, G_PAD] of the tile at n0 (column c >= G_PAD/2: the second half)."""
        c = gl.arange(0, _G, layout=gl.SliceLayout(0, MMA))
        return n0 + gl.arange(0, R, layout=gl.SliceLayout(1, MMA))[:, None] + R * (c >= _G // 2).to(gl.int32)[None, :]

    @gluon.jit
    def _masked(x, n0, hi, n_sinks, start, HAS_START: gl.constexpr, LEAN: gl.constexpr, HALF: gl.constexpr,
                MMA: gl.constexpr):
        """Scores x [R, G_PAD] of tile [n0, n0 + BLOCK_N) with -inf where a token does not count (past ``hi``, or
        before ``start`` with HAS_START). LEAN: a warp-uniform branch that whole tiles skip."""
        R: gl.constexpr = x.shape[0]
        BN: gl.constexpr = _BN
        tr = gl.arange(0, R, layout=gl.SliceLayout(1, MMA))
        if HALF:
            t = _half_tokens(n0, R, MMA)
            if HAS_START:
                x = gl.where((t < hi) & (t + n_sinks >= start), x, float("-inf"))
            elif n0 + BN > hi:
                x = gl.where(t < hi, x, float("-inf"))
        else:
            t = n0 + tr
            if HAS_START:
                x = gl.where(((t < hi) & (t + n_sinks >= start))[:, None], x, float("-inf"))
            elif LEAN:
                if n0 + BN > hi:
                    x = gl.where((t < hi)[:, None], x, float("-inf"))
            else:
                x = gl.where((t < hi)[:, None], x, float("-inf"))
        return x

    @gluon.jit
    def _values(s, sc, vw, rv, v_stage, rv_stage, n0, hi, n_sinks, start, m_i, l8, pvs, acc0, acc1, acc2, acc3,
                V_BITS: gl.constexpr, HAS_START: gl.constexpr, LATE_V: gl.constexpr, MMA: gl.constexpr,
                VW: gl.constexpr, OPA: gl.constexpr, OPB: gl.constexpr, LEAN: gl.constexpr, HALF: gl.constexpr):
        """Online softmax of one tile's scores ``s`` (:func:`_scores`) and its values: the running state updated.
        LATE_V: the value words and r are read from their stage here (fewer registers live), else they come in
        ``vw``/``rv``. acc2/acc3 only change at 2-bit values (the caller passes placeholders otherwise). ``pvs``: the
        running sum of the fp16 weights p * r per query head (the values' code offset times it is subtracted at the
        end).

        LEAN (2-bit keys and values, whose loop is bound by instructions, not by memory): fewer instructions per
        tile, measured 54.7 -> 52.6-53.0 us at the target shape (``benchmarks/RESULTS.md`` §1a⁷). The running state
        is rescaled only when some query head's running max grows (after a program's first tiles, rarely): a
        warp-uniform branch instead of 40 multiplications per tile, and the same sums. ``pvs`` [16, G_PAD] is
        accumulated by an MMA over a tile of ones: 4 MMAs in place of 32 conversions and additions, and its sums are
        exactly those the value MMAs make. The end-of-range selects are a branch that whole tiles skip. Else ``pvs``
        is [8, G_PAD] partial sums over row groups: nsep-4's loop waits for memory, and there these forms measured
        no faster (79.2 -> 80.0 us with fixed ranges, same run).

        HALF (see :func:`_scores`): ``s`` [BLOCK_N/2, G_PAD] comes unscaled with its scale ``sc``; the exponents are
        ``s * sc - m`` against the running max so far, and only when one is positive (a warp vote) is the state
        rescaled and they are formed again. Column c >= G_PAD/2 is the second half of the tile for head c - G_PAD/2:
        its own running max, sums and output columns, merged with column c - G_PAD/2 after the loop
        (:func:`_quant_part`). Measured 52.9 -> 51.4 us and 51.2 -> 50.4 us with the vote (§1a⁸)."""
        BN: gl.constexpr = 2 * s.shape[0] if HALF else s.shape[0]
        V_P: gl.constexpr = 8 // V_BITS
        tr = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        if LEAN:
            if HALF:
                # exponents against the running max so far (one fused multiply-add per score); only where some
                # head's max grows are they formed again against the new max. (At more heads, [BLOCK_N, G_PAD],
                # the unscaled scores kept beside them spill: the max is taken first there)
                x = _masked(s * sc - m_i[None, :], n0, hi, n_sinks, start, HAS_START, LEAN, HALF, MMA)
                grow = _any_positive(x) > 0
            else:
                m_t = gl.max(s, axis=0)
                grow = gl.max((m_t > m_i).to(gl.int32), axis=0) > 0
            if grow:
                if HALF:
                    s = _masked(s * sc, n0, hi, n_sinks, start, HAS_START, LEAN, HALF, MMA)
                    m_t = gl.max(s, axis=0)
                m_new = gl.maximum(m_i, m_t)
                alpha = gl.exp2(m_i - m_new)
                l8 = _scale_cols(l8, alpha)
                pvs = pvs * alpha[None, :]
                acc0 = acc0 * alpha[None, :]
                acc1 = acc1 * alpha[None, :]
                if V_P > 2:
                    acc2 = acc2 * alpha[None, :]
                    acc3 = acc3 * alpha[None, :]
                m_i = m_new
                if HALF:
                    x = s - m_i[None, :]
            if not HALF:
                x = s - m_i[None, :]
            p = gl.exp2(x)
            l8 = l8 + _rows8(p)
        else:
            m_new = gl.maximum(m_i, gl.max(s, axis=0))
            p = gl.exp2(s - m_new[None, :])
            alpha = gl.exp2(m_i - m_new)
            l8 = _scale_cols(l8, alpha) + _rows8(p)
            m_i = m_new
        if LATE_V:
            rv = rv_stage.reshape([BN]).load(gl.SliceLayout(1, MMA))
        if HALF:
            R: gl.constexpr = BN // 2
            pv = p * _by_half(rv, MMA).to(gl.float32)
            if n0 + BN > hi:  # a word's second token may lie past the end
                pv = gl.where(_half_tokens(n0, R, MMA) < hi, pv, 0.0)
            pt = _p_operand(pv.to(gl.float16), OPB)  # [R, G_PAD]
            pvs = mma_v2(gl.full([16, R], 1.0, gl.float16, layout=OPA), pt, pvs)
            # the values' dot runs over all BN tokens: column c takes rows [0, R) (c < G_PAD/2) or [R, BN) of it
            pt = gl.convert_layout(_half_q(pt), OPB)
        elif LEAN:
            rv = rv.to(gl.float32)
            if n0 + BN > hi:  # a word's second token may lie past the end
                rv = gl.where(n0 + tr < hi, rv, 0.0)
        else:
            rv = gl.where(n0 + tr < hi, rv.to(gl.float32), 0.0)
        if not HALF:
            pv = (p * rv[:, None]).to(gl.float16)
            pt = _p_operand(pv, OPB)
            if LEAN:
                pvs = mma_v2(gl.full([16, BN], 1.0, gl.float16, layout=OPA), pt, pvs)
            else:
                pvs = _scale_cols(pvs, alpha) + _rows8(pv.to(gl.float32))

        if LATE_V:
            vw = v_stage.load(VW).to(gl.uint32, bitcast=True)
        x01, x23 = _v_pairs(vw)
        if LEAN:
            acc0 = mma_v2(_v_operand(x01, x23, 0, V_BITS, OPA), pt, acc0)
            acc1 = mma_v2(_v_operand(x01, x23, 1, V_BITS, OPA), pt, acc1)
            if V_P > 2:
                acc2 = mma_v2(_v_operand(x01, x23, 2, V_BITS, OPA), pt, acc2)
                acc3 = mma_v2(_v_operand(x01, x23, 3, V_BITS, OPA), pt, acc3)
        else:
            acc0 = mma_v2(_v_operand(x01, x23, 0, V_BITS, OPA), pt, acc0 * alpha[None, :])
            acc1 = mma_v2(_v_operand(x01, x23, 1, V_BITS, OPA), pt, acc1 * alpha[None, :])
            if V_P > 2:
                acc2 = mma_v2(_v_operand(x01, x23, 2, V_BITS, OPA), pt, acc2 * alpha[None, :])
                acc3 = mma_v2(_v_operand(x01, x23, 3, V_BITS, OPA), pt, acc3 * alpha[None, :])
        return m_i, l8, pvs, acc0, acc1, acc2, acc3

    @gluon.jit
    def _tile(kw, rk, vw, rv, v_stage, rv_stage, n0, hi, n_sinks, start, q0, q1, q2, q3, qoff, rq, m_i, l8, pvs, acc0,
              acc1, acc2, acc3, K_BITS: gl.constexpr, V_BITS: gl.constexpr, HAS_START: gl.constexpr,
              LATE_V: gl.constexpr, MMA: gl.constexpr, VW: gl.constexpr, OPA: gl.constexpr, OPB: gl.constexpr,
              KI8: gl.constexpr, OPK: gl.constexpr, LEAN: gl.constexpr, HALF: gl.constexpr):
        """One tile of tokens [n0, n0 + BLOCK_N) (those < hi count): :func:`_scores`, then :func:`_values`."""
        s, sc = _scores(kw, rk, n0, hi, n_sinks, start, q0, q1, q2, q3, qoff, rq, K_BITS, HAS_START, MMA, OPA, KI8,
                        OPK, LEAN, HALF)
        return _values(s, sc, vw, rv, v_stage, rv_stage, n0, hi, n_sinks, start, m_i, l8, pvs, acc0, acc1, acc2, acc3,
                       V_BITS, HAS_START, LATE_V, MMA, VW, OPA, OPB, LEAN, HALF)

    @gluon.jit
    def _quant_part(
        q, sqh,
        k_ptr, skb, skh, rk_ptr, srkb, srkh, ks_ptr,
        v_ptr, svb, svh, rv_ptr, srvb, srvh, vs_ptr,
        pm_ptr, pl_ptr, pacc_ptr, b, h, start,
        G, n_quant, n_sinks, chunk, num_splits, part, sid, qscale, cnt,
        K_BITS: gl.constexpr, K_NSEP: gl.constexpr, V_BITS: gl.constexpr, V_NSEP: gl.constexpr,
        HAS_START: gl.constexpr, DEV_LENS: gl.constexpr, STAGES: gl.constexpr, EARLY: gl.constexpr,
        RELEASE: gl.constexpr, CLAIM: gl.constexpr, LN: gl.constexpr, MMA: gl.constexpr, KW: gl.constexpr,
        VW: gl.constexpr, OPA: gl.constexpr, OPB: gl.constexpr, BL: gl.constexpr, RL: gl.constexpr,
        SM3: gl.constexpr, KC: gl.constexpr, VC: gl.constexpr, KI8: gl.constexpr, OPK: gl.constexpr,
        OPQ: gl.constexpr, G4: gl.constexpr,
    ):
        """One quantized split: tokens [sid * chunk, ...) of one KV head (with CLAIM: a fixed range of tiles, then
        tiles claimed at run time; see :func:`launch`), for its G query heads, into partial ``part``. RELEASE: each
        stage is read into registers as soon as its tile lands and then refilled, so that STAGES tiles (not
        STAGES - 1) are in flight while one is computed, at the cost of the value words' registers over the scores'
        part of the loop (ptxas issues that refill after the scores, though: see the module docstring)."""
        BN: gl.constexpr = _BN
        V_P: gl.constexpr = 8 // V_BITS
        K_MID: gl.constexpr = K_NSEP == 2
        V_MID: gl.constexpr = V_NSEP == 2
        # both 2-bit: the loop is bound by instructions, not memory, and takes the leaner forms of _values
        LEAN: gl.constexpr = K_BITS == 2 and V_BITS == 2
        # at most 4 query heads (G4) the scores' padding columns take the tile's second half instead (_half_q): the
        # softmax then runs on half the registers
        HALF: gl.constexpr = LEAN and KI8 and G4
        # token rows are contiguous (checked by the host): the strides are compile-time constants, so every load of
        # a tile is one per-thread base register plus an immediate offset
        KNW: gl.constexpr = _D * K_BITS // 32
        VNW: gl.constexpr = _D * V_BITS // 32
        skt: gl.constexpr = KNW
        svt: gl.constexpr = VNW
        if DEV_LENS:
            chunk = gl.cdiv(gl.cdiv(n_quant, BN), gl.maximum(num_splits, 1)) * BN
        # the batch/head strides come divided by 4 words / 2 halves (checked by the host), so that the compiler knows
        # the alignment the asynchronous copies need (16 bytes for the codes, 4 for r)
        kp = k_ptr + b * (skb * 4) + h * (skh * 4)
        vp = v_ptr + b * (svb * 4) + h * (svh * 4)
        rkp = rk_ptr + b * (srkb * 2) + h * (srkh * 2)
        rvp = rv_ptr + b * (srvb * 2) + h * (srvh * 2)
        if CLAIM > 0:
            # the head's T tiles: F static ones per program (tiles [sid * F, sid * F + F)), the R after all of them
            # handed out one at a time by the head's counter (cnt) to whichever program asks first
            T = gl.cdiv(n_quant, BN)
            F = (T * CLAIM) // (num_splits * 100)
            s0 = sid * F
            dyn0 = F * num_splits
            R = T - dyn0
            lane = gl.arange(0, 32, layout=LN)
            hi = n_quant
        else:
            lo = (sid * chunk) // BN * BN  # == sid * chunk (whole tiles); in this form the compiler sees the alignment
            hi = gl.minimum(lo + chunk, n_quant)

        # ---- offsets of one tile: the copies move 16 bytes per lane along the rows (the operand layouts then read
        # them back from the row-major stages without bank conflicts)
        kt = gl.arange(0, BN, layout=gl.SliceLayout(1, KC))
        kwo = kt[:, None] * skt + gl.arange(0, KNW, layout=gl.SliceLayout(0, KC))[None, :]
        vt = gl.arange(0, BN, layout=gl.SliceLayout(1, VC))
        vwo = vt[:, None] * svt + gl.arange(0, VNW, layout=gl.SliceLayout(0, VC))[None, :]
        # r is copied 4 bytes (two tokens) per lane, the least cp.async moves: as [BN/2, 2] with one mask per pair
        # (by its first token: the host keeps the capacity even, so the second is always inside the row)
        rw = gl.arange(0, BN // 2, layout=gl.SliceLayout(1, RL))
        ro = 2 * rw[:, None] + gl.arange(0, 2, layout=gl.SliceLayout(0, RL))[None, :]

        # ---- STAGES-deep asynchronous copies into shared memory, read back in the operand layouts; the first tiles
        # are requested before the query is prepared, so that their latency overlaps it
        ksm = gl.allocate_shared_memory(gl.int32, [STAGES, BN, KNW], SM3)
        vsm = gl.allocate_shared_memory(gl.int32, [STAGES, BN, VNW], SM3)
        rksm = gl.allocate_shared_memory(gl.float16, [STAGES, BN // 2, 2], SM3)
        rvsm = gl.allocate_shared_memory(gl.float16, [STAGES, BN // 2, 2], SM3)
        PRE: gl.constexpr = STAGES if RELEASE else STAGES - 1  # tiles requested ahead of the one computed
        if CLAIM > 0:
            # positions 0 .. PRE - 1 (a claim read at once only when a program has fewer static tiles than that)
            c = _claim(cnt, lane, F < 1)
            t0 = _tile_at(c, lane, F < 1, 0, F, s0, dyn0, R)
            _issue(ksm, vsm, rksm, rvsm, 0, gl.where(t0 >= 0, t0, T) * BN, hi, kp, vp, rkp, rvp, kwo, vwo, ro, kt, vt,
                   rw, skt, svt)
            t1 = t0
            if PRE > 1:
                cneed = (F < 2) & (t0 >= 0)
                c = _claim(cnt, lane, cneed)
                t1 = _tile_at(c, lane, cneed, 1, F, s0, dyn0, R)
                _issue(ksm, vsm, rksm, rvsm, 1, gl.where(t1 >= 0, t1, T) * BN, hi, kp, vp, rkp, rvp, kwo, vwo, ro,
                       kt, vt, rw, skt, svt)
            cneed = (F < PRE + 1) & (t1 >= 0)
            c = _claim(cnt, lane, cneed)  # position PRE's, read in the first iteration
        else:
            for i in gl.static_range(PRE):
                _issue(ksm, vsm, rksm, rvsm, i, lo + i * BN, hi, kp, vp, rkp, rvp, kwo, vwo, ro, kt, vt, rw, skt,
                       svt)
        # ---- the query, once: pre-scaled, normalised (fp16: to a max of 2^14 per slice; int8: to 16-bit integers),
        # as the B operand in registers
        ksp = ks_ptr + h * _D
        if KI8:
            # int8 halves of a signed 16-bit query, |q| <= 32639 so that both halves fit (q0 = (q + 128) >> 8 <= 127,
            # q1 = q - 256 q0 in [-128, 127]): the scores are then exact sums of integers
            qk, mult = _q_operand_i8(q, sqh, ksp, qscale, G, K_BITS, K_NSEP, OPQ, HALF)
            # over the slots first: in OPQ those are a thread's own registers (then two shuffles), the heads last
            qnorm = 32639.0 / gl.maximum(gl.max(gl.max(gl.abs(qk), axis=0), axis=0), 1e-30)
            q16 = _rint(qk * qnorm)
            q0 = (q16 + 128) >> 8
            q1 = (q16 - q0 * 256).to(gl.int8)
            q0 = q0.to(gl.int8)
            if HALF:
                q0 = _half_q(q0)
                q1 = _half_q(q1)
            q0 = gl.convert_layout(q0, OPQ)
            q1 = gl.convert_layout(q1, OPQ)
            qoff = gl.sum(q16 * mult[:, None], axis=0).to(gl.float32)  # (exact: |sum| < 2^24)
            q2 = q0  # placeholders
            q3 = q1
        else:
            q0, q1, q2, q3, qoff, qnorm = _q_operands(q, sqh, ksp, qscale, G, K_BITS, K_NSEP, BL, OPB)
        # the codes' offset and the score multiplier exactly as in decode._attend (a Gluon kernel cannot call a
        # Triton helper, so these lines are repeated there)
        if K_MID:
            qoff = qoff * 1.5
            rq = 2.0 / qnorm
        else:
            qoff = qoff * (1 << (K_BITS - 1))
            rq = 1.0 / qnorm
        if KI8:
            qoff = _rint(qoff)  # joins the integer sums (an error of at most half a unit of the 15-bit query)
        qoff = gl.convert_layout(qoff, gl.SliceLayout(0, MMA))

        m_i = gl.full([_G], _NEG, gl.float32, layout=gl.SliceLayout(0, MMA))
        # softmax denominator as partial sums over row groups, reduced across threads after the loop; sum_t p_t r_t
        # the same way, or with LEAN as the accumulator of an MMA over ones
        l8 = _rows8(gl.zeros([BN // 2 if HALF else BN, _G], gl.float32, layout=MMA))
        if LEAN:  # (see _values)
            pvs = gl.zeros([16, _G], gl.float32, layout=MMA)
        else:
            pvs = _rows8(gl.zeros([BN, _G], gl.float32, layout=MMA))
        acc0 = gl.zeros([_D // V_P, _G], gl.float32, layout=MMA)
        acc1 = gl.zeros([_D // V_P, _G], gl.float32, layout=MMA)
        if V_P > 2:
            acc2 = gl.zeros([_D // V_P, _G], gl.float32, layout=MMA)
            acc3 = gl.zeros([_D // V_P, _G], gl.float32, layout=MMA)

        if V_P == 2:  # placeholders of the slices that 4-bit values do not have
            acc2 = acc0
            acc3 = acc1
        ld = 0
        st = STAGES - 1
        if CLAIM > 0:
            # tiles in order of position: this program's static ones, then claimed ones until the claims run out
            # (t0: the tile computed, t1: the next, already requested when PRE == 2; -1 = none)
            i = 0
            while t0 >= 0:
                p = i + PRE
                tp = _tile_at(c, lane, cneed, p, F, s0, dyn0, R)  # the claim read here was made a tile ago
                nneed = (p + 1 >= F) & (tp >= 0)
                if RELEASE:  # the landed tile is read whole, and its stage refilled at once
                    kw, rk, vw, rv = _land(ksm, vsm, rksm, rvsm, ld, STAGES, True, KW, VW, MMA, KI8)
                    st = ld
                else:
                    _barrier()  # every lane is done reading the stage about to be refilled
                _issue(ksm, vsm, rksm, rvsm, st, gl.where(tp >= 0, tp, T) * BN, hi, kp, vp, rkp, rvp, kwo, vwo, ro,
                       kt, vt, rw, skt, svt)
                if not RELEASE:
                    c = _claim(cnt, lane, nneed)  # for position p + 1, read in the next iteration
                    cneed = nneed
                    kw, rk, vw, rv = _land(ksm, vsm, rksm, rvsm, ld, STAGES, False, KW, VW, MMA, KI8)
                m_i, l8, pvs, acc0, acc1, a2, a3 = _tile(
                    kw, rk, vw, rv, vsm.index(ld), rvsm.index(ld), t0 * BN, hi, n_sinks, start, q0, q1, q2, q3, qoff,
                    rq, m_i, l8, pvs, acc0, acc1, acc2, acc3, K_BITS, V_BITS, HAS_START, not RELEASE, MMA, VW, OPA,
                    OPB, KI8, OPK, LEAN, HALF)
                if V_P > 2:
                    acc2 = a2
                    acc3 = a3
                if RELEASE:
                    # the claim for position p + 1 once the tile's words are dead (a claim pending over the tile's
                    # work spills at RELEASE's register use, and the spill's store waits for the round trip); its
                    # answer is read after the next tile's wait
                    c = _claim(cnt, lane, nneed)
                    cneed = nneed
                if PRE > 1:
                    t0 = t1
                    t1 = tp
                else:
                    t0 = tp
                i += 1
                st = ld
                ld = gl.where(ld == STAGES - 1, 0, ld + 1)
        else:
            for n0 in range(lo, hi, BN):
                if RELEASE:  # the landed tile is read whole, and its stage refilled at once
                    kw, rk, vw, rv = _land(ksm, vsm, rksm, rvsm, ld, STAGES, True, KW, VW, MMA, KI8)
                    st = ld
                else:
                    _barrier()  # every lane is done reading the stage about to be refilled
                if RELEASE or not LEAN:  # (unmasked whole tiles: LEAN's, see _values)
                    _issue(ksm, vsm, rksm, rvsm, st, n0 + PRE * BN, hi, kp, vp, rkp, rvp, kwo, vwo, ro, kt, vt, rw, skt,
                           svt)
                else:
                    _issue_whole(ksm, vsm, rksm, rvsm, st, n0 + PRE * BN, hi, kp, vp, rkp, rvp, kwo, vwo, ro, kt, vt,
                                 rw, skt, svt)
                if not RELEASE:
                    kw, rk, vw, rv = _land(ksm, vsm, rksm, rvsm, ld, STAGES, False, KW, VW, MMA, KI8)
                m_i, l8, pvs, acc0, acc1, a2, a3 = _tile(
                    kw, rk, vw, rv, vsm.index(ld), rvsm.index(ld), n0, hi, n_sinks, start, q0, q1, q2, q3, qoff, rq,
                    m_i, l8, pvs, acc0, acc1, acc2, acc3, K_BITS, V_BITS, HAS_START, not RELEASE, MMA, VW, OPA, OPB,
                    KI8, OPK, LEAN, HALF)
                if V_P > 2:
                    acc2 = a2
                    acc3 = a3
                st = ld
                ld = gl.where(ld == STAGES - 1, 0, ld + 1)
        async_copy.wait_group(0)
        if not EARLY:
            _launch_dependents()  # the merge kernel may start launching (it waits for this grid to finish)

        l_i = gl.convert_layout(gl.sum(l8, axis=0), gl.SliceLayout(0, MMA))
        if LEAN:
            prs = gl.max(pvs, axis=0)  # every row holds the same sums
        else:
            prs = gl.convert_layout(gl.sum(pvs, axis=0), gl.SliceLayout(0, MMA))
        if HALF:
            # columns c and c xor G_PAD/2 are one query head over the two halves of every tile: merged as two splits
            m_o = _other_half(m_i)
            m_c = gl.maximum(m_i, m_o)
            w_s = gl.exp2(m_i - m_c)
            w_o = gl.exp2(m_o - m_c)
            l_i = l_i * w_s + _other_half(l_i) * w_o
            prs = prs * w_s + _other_half(prs) * w_o
            acc0 = acc0 * w_s[None, :] + _other_half(acc0) * w_o[None, :]
            acc1 = acc1 * w_s[None, :] + _other_half(acc1) * w_o[None, :]
            acc2 = acc2 * w_s[None, :] + _other_half(acc2) * w_o[None, :]
            acc3 = acc3 * w_s[None, :] + _other_half(acc3) * w_o[None, :]
            m_i = m_c
        pacc = pacc_ptr + part * (G * _D)
        vsp = vs_ptr + h * _D
        _store_out(acc0, prs, 0, V_BITS, V_MID, V_NSEP, vsp, pacc, G, MMA)
        _store_out(acc1, prs, 1, V_BITS, V_MID, V_NSEP, vsp, pacc, G, MMA)
        if V_P > 2:
            _store_out(acc2, prs, 2, V_BITS, V_MID, V_NSEP, vsp, pacc, G, MMA)
            _store_out(acc3, prs, 3, V_BITS, V_MID, V_NSEP, vsp, pacc, G, MMA)
        g = gl.arange(0, _G, layout=gl.SliceLayout(0, MMA))
        gl.store(pm_ptr + part * G + g, m_i, mask=g < G)
        gl.store(pl_ptr + part * G + g, l_i, mask=g < G)

    @gluon.jit
    def _merge_kernel(pm_ptr, pl_ptr, pacc_ptr, out_ptr, sob, soh, Hq, n_slots, cnt_ptr, G: gl.constexpr,
                      S_BLOCK: gl.constexpr, CLAIMS: gl.constexpr):
        """out[b, hq, d] = sum_s 2^(m_s - M) acc_s[d] / sum_s 2^(m_s - M) l_s over the partials of one query head:
        :func:`kvcompile.kernels.decode._merge_kernel`'s math, one warp per (batch, query head, 32 channels). Each
        lane holds every partial of its channel in registers, so the sums over the partials are in-thread: no
        shared-memory reduction and no barrier between warps; only the weights 2^(m_s - M), computed once per warp
        (a few partials per lane), are broadcast to the lanes. Launched as the split kernel's programmatic
        dependent: it waits for that grid's results first. CLAIMS: zero the KV head's tile counter (see there). G is a
        constant, so that the partials' rows lie at constant offsets from one address per lane (immediates)."""
        # griddepcontrol.wait: the split grid has completed and its writes are visible
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        PL: gl.constexpr = gl.BlockedLayout([S_BLOCK, 1], [1, 32], [1, 1], [0, 1])  # [partial, channel]
        ML: gl.constexpr = gl.BlockedLayout([S_BLOCK // 32], [32], [1], [0])  # the partials' m and l over the lanes
        pid = gl.program_id(0)
        dc = gl.program_id(1)
        b = pid // Hq
        hq = pid % Hq
        bh = b * (Hq // G) + hq // G
        base = bh * n_slots  # first partial of this (batch, KV head)
        g = hq % G
        if CLAIMS:
            gl.store(cnt_ptr + bh, 0, mask=(g == 0) & (dc == 0))
        d = dc * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, PL))
        acc = gl.zeros([32], gl.float32, layout=gl.SliceLayout(0, PL))
        den = gl.sum(gl.zeros([S_BLOCK], gl.float32, layout=ML), axis=0)
        m_run = gl.max(gl.full([S_BLOCK], _NEG, gl.float32, layout=ML), axis=0)
        # (one block as the host launches it: at most MERGE_MAX partials, see merge(); the loop over more blocks has
        # not run on a GPU)
        for s0 in range(0, n_slots, S_BLOCK):
            s = s0 + gl.arange(0, S_BLOCK, layout=ML)
            smask = s < n_slots
            m = gl.load(pm_ptr + (base + s) * G + g, mask=smask, other=_NEG)
            lv = gl.load(pl_ptr + (base + s) * G + g, mask=smask, other=0.0)
            sp = gl.arange(0, S_BLOCK, layout=gl.SliceLayout(1, PL))
            row0 = pacc_ptr + ((base + s0) * G + g) * _D + d
            part = gl.load(row0[None, :] + (sp * (G * _D))[:, None],
                           mask=(s0 + sp < n_slots)[:, None] & (d >= 0)[None, :], other=0.0)
            m_new = gl.maximum(m_run, gl.max(m, axis=0))
            keep = gl.exp2(m_run - m_new)
            w = gl.where(smask, gl.exp2(m - m_new), 0.0)
            den = den * keep + gl.sum(w * lv, axis=0)
            acc = acc * keep + gl.sum(gl.convert_layout(w, gl.SliceLayout(1, PL))[:, None] * part, axis=0)
            m_run = m_new
        o = acc / gl.where(den > 0.0, den, 1.0)
        gl.store(out_ptr + b.to(gl.int64) * sob + hq * soh + d, o.to(out_ptr.dtype.element_ty))


@cache
def _hopper(device_index: int) -> bool:
    """Hopper only: the kernel was built and measured there (its dependent-launch trigger also needs sm_90 or later).
    Asked once per device, not on every decode call."""
    import torch

    return torch.cuda.get_device_capability(None if device_index < 0 else device_index)[0] == 9


def supported(q, k_fmt, v_fmt, k_data, v_data, k_r, v_r, fp_k, fp_v, d: int, G: int, softcap: float | None) -> bool:
    """Whether the Gluon loop serves this launch (else the Triton kernel does): see the module docstring's scope."""
    import torch

    if not (HAVE_GLUON and q.is_cuda and _hopper(q.device.index if q.device.index is not None else -1)):
        return False
    if d != HEAD_DIM or G > G_PAD or softcap or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if fp_k.dtype not in (torch.float16, torch.bfloat16) or fp_v.dtype != fp_k.dtype:
        return False
    if any(t.data_ptr() % 16 or t.stride(3) != 1 or any(st % 8 for st in t.stride()[:3]) for t in (fp_k, fp_v)):
        return False
    for fmt, data, r in ((k_fmt, k_data, k_r), (v_fmt, v_data, v_r)):
        nw = HEAD_DIM * fmt.bits // 32
        if fmt.kind not in ("nsep", "int-token") or fmt.bits not in (2, 4):
            return False
        # contiguous token rows of whole 16-byte-aligned words, contiguous r: the kernel's strides are constants
        if (data.dtype != torch.int32 or data.shape[-1] != nw or data.stride(3) != 1 or data.stride(2) != nw
                or data.data_ptr() % 16 or any(st % 4 for st in data.stride()[:2]) or r.stride(2) != 1
                or r.dtype != torch.float16 or r.data_ptr() % 4 or any(st % 2 for st in r.stride()[:2])
                or r.shape[2] % 2):
            return False
    return True


def launch(q, k_data, k_r, k_scale, v_data, v_r, v_scale, fp_k, fp_v, pm, pl, pacc, start, lens, Hkv: int, G: int,
           n_quant: int, n_fp: int, n_sinks: int, chunk: int, num_splits: int, qscale: float, k_nsep: int,
           v_nsep: int, k_bits: int, v_bits: int, has_start: bool, stages: int = 2, maxnreg: int = 0,
           fp_in_splits: bool = True, early_trigger: bool = True, release: bool = False, claim: int = 0,
           counters=None, k_i8: bool = False):
    """Run every partial of :func:`kvcompile.kernels.decode._decode`: the quantized splits ``[0, num_splits)`` of each
    (batch, KV head) and, when ``n_fp > 0``, its fp16 slots in :func:`fp_splits` pieces (slots ``num_splits + j``),
    into the partial buffers (``pid * n_slots + slot``, ``n_slots = num_splits + fp_splits(n_fp, fp_in_splits)``).
    ``fp_in_splits``: the split programs attend to the fp16 chunks after their loops, or with claims before them
    (else programs of their own do).
    ``early_trigger``: the dependent merge kernel may launch once every program has started (else once every
    program's loop is done). ``release``: a stage is refilled as soon as it is read into registers (see
    ``_quant_part``). ``claim`` (0-99; 0 = off): each split program takes ``claim`` % of its even share of the
    KV head's tiles as a fixed range, and the rest of the head's tiles are handed out one at a time, at run time, to
    whichever of the head's programs asks first, by ``counters`` (:func:`launch_counters`, at least ``B * Hkv``,
    which the merge kernel must zero again; needs ``stages == 2``, else off). ``k_i8``: the scores come from int8
    MMAs over the key bytes (:func:`_k_operand_i8`; exact integer sums with the query rounded to 15 bits), else from
    fp16 MMAs (the query rounded to fp16). Returns the compiled kernel.

    ``maxnreg`` caps the registers per thread (0: 128 when keys and values are 2-bit, else 168): what the quantized
    loop needs without spilling. The fp16 slots' programs would raise the whole kernel to ~200 registers and cut the
    resident programs per SM (2-bit: 16 -> about 10); capped, those short programs spill a few registers instead.
    """
    import torch

    maxnreg = maxnreg or (128 if k_bits == v_bits == 2 else 168)
    B = q.shape[0]
    has_fp = n_fp > 0
    fp_in = has_fp and fp_in_splits
    n_slots = num_splits + fp_splits(n_fp, fp_in)
    fdt = gl.bfloat16 if fp_k.dtype == torch.bfloat16 else gl.float16
    columns = num_splits if fp_in else n_slots
    claim = claim if stages == 2 else 0
    if claim and (counters is None or counters.dtype != torch.int32 or counters.numel() < B * Hkv):
        raise ValueError(f"launch: claims need int32 counters of at least {B * Hkv} elements (launch_counters)")
    cnt = counters if claim else start
    times = _TIMES[0]
    if times is not None and (times.dtype != torch.int64 or times.device != q.device
                              or times.numel() < 4 * B * Hkv * columns):
        raise ValueError("record_program_times: the buffer must be an int64 tensor on the query's device with 4 words "
                         f"per program ({4 * B * Hkv * columns} here)")
    return _quant_split_kernel[(B * Hkv, columns)](
        q, q.stride(0), q.stride(1),
        k_data, k_data.stride(0) // 4, k_data.stride(1) // 4, k_r, k_r.stride(0) // 2, k_r.stride(1) // 2, k_scale,
        v_data, v_data.stride(0) // 4, v_data.stride(1) // 4, v_r, v_r.stride(0) // 2, v_r.stride(1) // 2, v_scale,
        fp_k, *(st // 8 for st in fp_k.stride()[:3]), fp_v, *(st // 8 for st in fp_v.stride()[:3]),
        pm, pl, pacc, start, lens if lens is not None else start, times if times is not None else start, cnt,
        Hkv, G, n_quant, n_fp, n_sinks, chunk, num_splits, n_slots, float(qscale),
        K_BITS=k_bits, K_NSEP=k_nsep, V_BITS=v_bits, V_NSEP=v_nsep,
        HAS_START=has_start, DEV_LENS=lens is not None, STAGES=stages, SEP_FP=has_fp and not fp_in, IN_FP=fp_in,
        FPC=FP_CHUNK_IN if fp_in else FP_CHUNK, EARLY=early_trigger, RELEASE=release, TIMES=times is not None,
        FDT=fdt, CLAIM=claim, KI8=bool(k_i8), G4=G <= G_PAD // 2,
        **gluon_layouts(k_bits, v_bits, bool(k_i8)), num_warps=1, **({"maxnreg": maxnreg} if maxnreg else {}),
    )


def merge(pm, pl, pacc, out, Hq: int, G: int, n_slots: int, counters=None) -> None:
    """Combine the partials that :func:`launch` wrote into ``out`` [B, Hq, 128] (:func:`_merge_kernel`), as that
    launch's programmatic dependent. ``counters``: that launch's claim counters (:func:`launch_counters`), which
    are zeroed here for the next launch; None without claims. At most :data:`MERGE_MAX` partials per KV head (the
    host sends longer lists to :func:`kvcompile.kernels.decode._merge_kernel`): the kernel's loop over blocks of
    64 partials has not run on a GPU yet."""
    if n_slots > MERGE_MAX:
        raise ValueError(f"merge: {n_slots} partials per KV head, at most {MERGE_MAX}")
    B = out.shape[0]
    _merge_kernel[(B * Hq, HEAD_DIM // 32)](
        pm, pl, pacc, out, out.stride(0), out.stride(1), Hq, n_slots, counters if counters is not None else pm,
        G=G, S_BLOCK=64 if n_slots > 32 else 32, CLAIMS=counters is not None, num_warps=1, launch_pdl=True)
