"""Speed of kvcompile's Triton kernels on a GPU: fused decode attention over packed KV, and quantize-on-write.

    python benchmarks/kernels.py                 # the full table (a few minutes on an H100)
    python benchmarks/kernels.py --quick         # a first smoke run: Llama-3-8B shape, batch 8, 4k and 32k
    python benchmarks/kernels.py --json out.json # every number, machine-readable
    python benchmarks/kernels.py --tune          # sweep the decode launch configuration on one shape

Decode: one query token per sequence over a cache of ``ctx`` tokens laid out as the runtime keeps it (4 fp16 sink
tokens, a 128-token fp16 tail, the rest packed), for the attention shapes of Llama-3-8B (32 query heads, 8 KV heads,
head_dim 128) and Qwen2.5-1.5B (12/2/128). Each packed format is timed against two fp16 baselines over the same
``ctx`` tokens: torch SDPA (every backend that runs, native GQA or expanded K/V; the fastest is reported and named)
and the same Triton kernel reading fp16 stores. Reported per row: median GPU time (CUDA-graph replay, so no Python
launch overhead; eager time in the JSON), bytes the kernel must read (codes + per-token multipliers + group metadata
+ fp16 sinks/tail + query and output), achieved GB/s, the fraction of the device's measured HBM read bandwidth
(the fastest streaming read found, :func:`hbm_read_bandwidth`), and the speedup over the faster fp16 baseline.
Quantize-on-write, which reads and writes, is a fraction of a device-to-device copy (reads + writes). Inputs are
rotated over several copies when one set would fit in L2.

Before timing, every kernel is checked on the GPU against its PyTorch reference (decode: relative error < 1e-2
against decode_attention_reference in fp16; quantize: codes equal but for rare ties).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from kvcompile import formats  # noqa: E402
from kvcompile.formats import KVFormat  # noqa: E402

SINKS, WINDOW, BLOCK = 4, 128, 32  # the runtime's fp16 part (sink tokens + recent tail) and its flush block
KV_BUDGET = 40e9  # bytes of fp16 K/V per shape; larger shapes are skipped
DECODE_FORMATS = ["nsep-4", "nsep-2", "int-token-4", "kivi-4g32"]
QUANT_FORMATS = ["nsep-4", "nsep-2", "nsep-8"]


@dataclass(frozen=True)
class Shape:
    name: str
    hq: int
    hkv: int
    d: int


SHAPES = [Shape("Llama-3-8B", 32, 8, 128), Shape("Qwen2.5-1.5B", 12, 2, 128)]
BATCHES = [1, 8, 32]
CONTEXTS = [1024, 4096, 16384, 32768, 65536, 131072]


# ---------------------------------------------------------------------------------------------- timing
def bench(fns: list[Callable[[], object]]) -> tuple[float, float]:
    """Median microseconds of one call, rotating over ``fns`` (one per input copy): (CUDA-graph replay, eager)."""
    import triton.testing

    state = {"i": 0}

    def step() -> None:
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
    try:
        graph = triton.testing.do_bench_cudagraph(step, rep=50, return_mode="median")
    except Exception as e:  # some SDPA backends cannot be captured; the eager time still stands
        print(f"    (graph capture failed: {type(e).__name__}; reporting eager time)", file=sys.stderr)
        graph = eager
    return graph * 1e3, eager * 1e3


def copies_for(nbytes: float) -> int:
    """Input copies to rotate so that consecutive calls never find their data in L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(8, math.ceil(4 * l2 / max(nbytes, 1))))


def hbm_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (bytes read + bytes written): the yardstick of quantize-on-write,
    which reads fp16 and writes codes."""
    n = 2 * 2**30
    bufs = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
    us, _ = bench([lambda: bufs[1].copy_(bufs[0])])
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * n / (us * 1e-6)


@triton.jit
def _read_sum(x_ptr, out_ptr, n_tiles, TILE: tl.constexpr):
    """Grid-stride sum of ``n_tiles`` tiles of int32 words: a pure streaming read (one int per program written)."""
    pid = tl.program_id(0)
    acc = tl.zeros([TILE], dtype=tl.int32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        acc += tl.load(x_ptr + t.to(tl.int64) * TILE + tl.arange(0, TILE))
    tl.store(out_ptr + pid, tl.sum(acc))


def hbm_read_bandwidth() -> tuple[float, str]:
    """(bytes/s, how) of the fastest streaming read of a 2 GiB buffer found: the yardstick of decode, which reads.

    A copy is no read figure (on an H200 it moves ~2.8 TB/s of reads + writes, while SDPA's decode reads 4.4 TB/s),
    so this times reads alone: a Triton grid-stride sum over several grid sizes, tile sizes and warp counts, and
    torch's own sum, and keeps the best."""
    n = 2**29  # int32 words: 2 GiB
    x = torch.ones(n, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(64 * sms, dtype=torch.int32, device="cuda")
    runs: list[tuple[Callable[[], object], str, int]] = [(x.sum, "torch.sum", 0)]
    for tile in (2048, 8192):
        for per_sm in (2, 4, 8, 16):
            for warps in (4, 8):
                def call(tile: int = tile, grid: int = per_sm * sms, warps: int = warps) -> object:
                    return _read_sum[(grid,)](x, out, n // tile, TILE=tile, num_warps=warps)

                runs.append((call, f"Triton grid-stride sum, {tile} words x {per_sm} programs/SM, {warps} warps",
                             per_sm * sms))
    best = (0.0, "none")
    for fn, how, grid in runs:
        fn()
        torch.cuda.synchronize()
        if grid:
            assert int(out[:grid].sum()) == n, "the read kernel summed the wrong words"
        us, _ = bench([fn])
        best = max(best, (4 * n / (us * 1e-6), how))
    return best


# ---------------------------------------------------------------------------------------------- data
def kv_like(B: int, H: int, T: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """fp16 K/V-like data on the GPU: a few outlier channels (x20..x50), token norms over x0.1..x10."""
    x = torch.randn(B, H, T, d, device="cuda", dtype=torch.float16, generator=gen)
    chans = torch.randperm(d, device="cuda", generator=gen)[:3]
    x[..., chans] *= 30
    x *= torch.exp(torch.empty(B, H, T, 1, device="cuda").uniform_(-2.3, 2.3, generator=gen)).half()
    return x


def nsep_scale_for(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A static nsep scale from (a sample of) x: max |u_c| per head and channel."""
    sample = x[:, :, : min(x.shape[2], 4096)].float()
    u = sample / sample.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return formats.nsep_scale(u.abs().amax(dim=(0, 2)), bits).cuda()


def empty_store(fmt: KVFormat, role: str, B: int, H: int, T: int, d: int) -> dict[str, torch.Tensor]:
    """The runtime's storage for T tokens of one format (see kvcompile.kernels.quantize)."""
    dev = "cuda"
    if fmt.kind == "fp16":
        return {"data": torch.empty(B, H, T, d, dtype=torch.float16, device=dev)}
    store = {"codes": torch.empty(B, H, T, d * fmt.bits // 8, dtype=torch.uint8, device=dev)}
    if fmt.kind == "kivi":
        shape = (B, H, T // fmt.group, d) if role == "k" else (B, H, T, -(-d // fmt.group))
        store["scale"] = torch.empty(shape, dtype=torch.float16, device=dev)
        store["zero"] = torch.empty(shape, dtype=torch.float16, device=dev)
    else:
        store["r"] = torch.empty(B, H, T, dtype=torch.float16, device=dev)
    return store


def fill_store(x: torch.Tensor, fmt: KVFormat, role: str, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    from kvcompile.kernels.quantize import quantize_into

    B, H, T, d = x.shape
    store = empty_store(fmt, role, B, H, T, d)
    step = 8192  # chunks bound the temporaries of the PyTorch paths (kivi)
    for s in range(0, T, step):
        quantize_into(x[:, :, s:s + step], fmt, role, store, s, scale=scale)
    return store


# ---------------------------------------------------------------------------------------------- decode
@dataclass
class DecodeInputs:
    q: torch.Tensor
    k: torch.Tensor  # fp16 [B, Hkv, ctx, d], positions in order (for SDPA)
    v: torch.Tensor
    fp_k: torch.Tensor  # sinks + tail
    fp_v: torch.Tensor
    n_quant: int
    n_fp: int


def make_inputs(shape: Shape, B: int, ctx: int, seed: int) -> DecodeInputs:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = kv_like(B, shape.hkv, ctx, shape.d, gen)
    v = kv_like(B, shape.hkv, ctx, shape.d, gen)
    q = torch.randn(B, shape.hq, shape.d, device="cuda", dtype=torch.float16, generator=gen)
    # as the runtime leaves it: whole flush blocks of 32 quantized, 128..159 tail tokens in fp16
    n_quant = max(0, (ctx - SINKS - WINDOW) // BLOCK * BLOCK)
    n_fp = ctx - n_quant
    # the fp part: slots [0, SINKS) are positions 0..3, then the tail follows the quantized tokens
    fp_k = torch.cat([k[:, :, :SINKS], k[:, :, SINKS + n_quant:]], dim=2).contiguous()
    fp_v = torch.cat([v[:, :, :SINKS], v[:, :, SINKS + n_quant:]], dim=2).contiguous()
    return DecodeInputs(q, k, v, fp_k, fp_v, n_quant, n_fp)


def decode_call(inp: DecodeInputs, fmt: KVFormat, k_store: dict, v_store: dict, ks: torch.Tensor | None,
                vs: torch.Tensor | None, config: object | None = None, num_splits: int | None = None
                ) -> Callable[[], torch.Tensor]:
    from kvcompile.kernels import decode as dmod

    scaling = inp.q.shape[-1] ** -0.5
    return lambda: dmod._decode(inp.q, k_store, v_store, fmt, fmt, inp.n_quant, inp.fp_k, inp.fp_v, inp.n_fp,
                                SINKS, scaling, ks, vs, None, None, num_splits, config)


def quantized_stores(inp: DecodeInputs, fmt: KVFormat) -> tuple[dict, dict, torch.Tensor | None, torch.Tensor | None]:
    kq = inp.k[:, :, SINKS:SINKS + inp.n_quant]
    vq = inp.v[:, :, SINKS:SINKS + inp.n_quant]
    ks = nsep_scale_for(kq, fmt.bits) if fmt.kind == "nsep" else None
    vs = nsep_scale_for(vq, fmt.bits) if fmt.kind == "nsep" else None
    return fill_store(kq, fmt, "k", ks), fill_store(vq, fmt, "v", vs), ks, vs


def add_case_args(ap: argparse.ArgumentParser) -> None:
    """The command-line options of a single decode case (the profiling scripts' ``--format/--shape/--batch/
    --context``)."""
    ap.add_argument("--format", default="nsep-4")
    ap.add_argument("--shape", default="Llama-3-8B", choices=[s.name for s in SHAPES])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)


def case_call(args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """The decode call of :func:`add_case_args`' options, on this benchmark's inputs (seed 0)."""
    shape = next(s for s in SHAPES if s.name == args.shape)
    fmt = KVFormat.parse(args.format)
    inp = make_inputs(shape, args.batch, args.context, seed=0)
    k_store, v_store, ks, vs = quantized_stores(inp, fmt)
    return decode_call(inp, fmt, k_store, v_store, ks, vs)


def decode_bytes(shape: Shape, B: int, inp: DecodeInputs, fmt: KVFormat) -> float:
    """Bytes a decode step must move: packed K and V (metadata included), fp16 part, query in and output out."""
    per_tok = fmt.bytes_per_token(shape.d, "k") + fmt.bytes_per_token(shape.d, "v")
    fp = 2 * inp.n_fp * shape.d * 2
    qo = 2 * shape.hq * shape.d * 2
    return B * (shape.hkv * (inp.n_quant * per_tok + fp) + qo)


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_call(inp: DecodeInputs, hq: int, backend: str, gqa: bool) -> Callable[[], torch.Tensor]:
    """SDPA over the fp16 K/V with one backend, with native GQA (enable_gqa) or with K/V expanded to the query heads
    (the expansion is made here, outside the timed call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
          "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None), "math": SDPBackend.MATH}[backend]
    if be is None:
        raise RuntimeError(f"no {backend} backend in this torch")
    q4 = inp.q[:, :, None]
    if gqa:
        k, v, kw = inp.k, inp.v, {"enable_gqa": True}
    else:
        rep = hq // inp.k.shape[1]
        k, v, kw = inp.k.repeat_interleave(rep, 1), inp.v.repeat_interleave(rep, 1), {}

    def call() -> torch.Tensor:
        with sdpa_kernel([be]):
            return sdpa(q4, k, v, **kw)

    return call


def best_sdpa(inputs: list[DecodeInputs], hq: int, kv_bytes: float) -> tuple[float, float, str]:
    """(graph us, eager us, variant) of the fastest SDPA variant that runs on these inputs."""
    best = (float("inf"), float("inf"), "none")
    rep = hq // inputs[0].k.shape[1]
    for backend in SDPA_BACKENDS:
        for gqa in (True, False):
            if not gqa and (rep == 1 or len(inputs) * rep * kv_bytes > 0.5 * torch.cuda.mem_get_info()[0]):
                continue  # expanded K/V would not fit
            if backend == "math" and kv_bytes > 2e9:
                continue  # the math backend materialises fp32 scores and copies: far off the pace, and slow to run
            try:
                calls = [sdpa_call(inp, hq, backend, gqa) for inp in inputs]
                calls[0]()
                torch.cuda.synchronize()
                g, e = bench(calls)
            except Exception:  # backend not available for this shape/dtype/GPU
                continue
            finally:
                torch.cuda.empty_cache()
            if g < best[0]:
                best = (g, e, f"{backend}/{'gqa' if gqa else 'expanded'}")
    return best


def check_decode(fmt: KVFormat, shape: Shape) -> float:
    """GPU check of the fused kernel against decode_attention_reference (a 4k context, batch 2, with padding)."""
    from kvcompile.kernels.decode import decode_attention, decode_attention_reference

    inp = make_inputs(shape, 2, 4096, seed=1)
    k_store, v_store, ks, vs = quantized_stores(inp, fmt)
    start = torch.tensor([0, 300], dtype=torch.int32, device="cuda")
    args = (inp.q, k_store, v_store, fmt, fmt, inp.n_quant, inp.fp_k, inp.fp_v, inp.n_fp, SINKS, shape.d ** -0.5)
    kw = dict(k_scale=ks, v_scale=vs, seq_start=start)
    out = decode_attention(*args, **kw)
    ref = decode_attention_reference(*args, **kw)
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_quantize(fmt: KVFormat) -> float:
    """GPU check of quantize_into against formats.quantize: fraction of codes that differ (ties only, +-1)."""
    from kvcompile.kernels.quantize import quantize_into

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = kv_like(2, 4, 1000, 128, gen)
    scale = nsep_scale_for(x, fmt.bits) if fmt.kind == "nsep" else None
    store = empty_store(fmt, "k", 2, 4, 1000, 128)
    quantize_into(x, fmt, "k", store, 0, scale=scale)
    ref = formats.quantize(x, fmt, "k", scale)
    a = formats.unpack_codes(store["codes"], fmt.bits).int()
    b = formats.unpack_codes(ref["codes"], fmt.bits).int()
    if (a - b).abs().max().item() > 1:
        return 1.0
    rel_r = ((store["r"].float() - ref["r"].float()).abs() / ref["r"].float().abs().clamp_min(1e-30)).max().item()
    if rel_r > 2.0**-10:
        return 1.0
    return (a != b).float().mean().item()


def run_decode(shape: Shape, B: int, ctx: int, formats_: list[str], hbm: float, rows: list[dict]) -> None:
    kv_bytes = 2 * B * shape.hkv * ctx * shape.d * 2
    free = torch.cuda.mem_get_info()[0]
    if kv_bytes > KV_BUDGET or 3.2 * kv_bytes > free:
        print(f"  skip {shape.name} B={B} ctx={ctx}: {kv_bytes / 1e9:.1f} GB of fp16 K/V", file=sys.stderr)
        return
    ncopy = copies_for(kv_bytes)
    inputs = [make_inputs(shape, B, ctx, seed=i) for i in range(ncopy)]
    base = {"model": shape.name, "batch": B, "ctx": ctx}

    # fp16 baselines: SDPA (fastest variant) and the Triton kernel over fp16 stores of the same tokens
    fp_bytes = decode_bytes(shape, B, inputs[0], formats.FP16)
    sdpa_best = best_sdpa(inputs, shape.hq, kv_bytes)
    tri_fp16 = bench([decode_call(inp, formats.FP16, *fp16_stores(inp), None, None) for inp in inputs])
    best_fp16 = min(sdpa_best[0], tri_fp16[0])
    for name, (g, e) in ((f"sdpa ({sdpa_best[2]})", sdpa_best[:2]), ("triton-fp16", tri_fp16)):
        rows.append({**base, "format": name, "us": g, "eager_us": e, "bytes": fp_bytes,
                     "gbps": fp_bytes / (g * 1e-6) / 1e9, "frac_hbm": fp_bytes / (g * 1e-6) / hbm,
                     "speedup": best_fp16 / g})
        print_row(rows[-1])
    for fname in formats_:
        fmt = KVFormat.parse(fname)
        built = [(quantized_stores(inp, fmt), inp) for inp in inputs]
        calls = [decode_call(inp, fmt, ksto, vsto, ks, vs) for (ksto, vsto, ks, vs), inp in built]
        g, e = bench(calls)
        nbytes = decode_bytes(shape, B, inputs[0], fmt)
        rows.append({**base, "format": fmt.name, "us": g, "eager_us": e, "bytes": nbytes,
                     "gbps": nbytes / (g * 1e-6) / 1e9, "frac_hbm": nbytes / (g * 1e-6) / hbm,
                     "speedup": best_fp16 / g})
        print_row(rows[-1])
        del built, calls
    del inputs
    torch.cuda.empty_cache()


def fp16_stores(inp: DecodeInputs) -> tuple[dict, dict]:
    """fp16 stores of the quantized range (the Triton fp16 baseline reads the same tokens, unquantized)."""
    return ({"data": inp.k[:, :, SINKS:SINKS + inp.n_quant]}, {"data": inp.v[:, :, SINKS:SINKS + inp.n_quant]})


def print_row(r: dict) -> None:
    print(f"| {r['model']} | {r['batch']} | {r['ctx']} | {r['format']} | {r['us']:.1f} | {r['bytes'] / 1e6:.1f} | "
          f"{r['gbps']:.0f} | {100 * r['frac_hbm']:.0f}% | {r['speedup']:.2f}x |", flush=True)


# ---------------------------------------------------------------------------------------------- quantize
def run_quantize(fmts: list[str], hbm: float, rows: list[dict]) -> None:
    from kvcompile.kernels.quantize import quantize_into

    B, H, T, d = 8, 8, 4096, 128
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = kv_like(B, H, T, d, gen)
    print("\n| format | shape | us | bytes (MB) | GB/s | of HBM copy |\n|---|---|---|---|---|---|")
    for fname in fmts:
        fmt = KVFormat.parse(fname)
        scale = nsep_scale_for(x, fmt.bits) if fmt.kind == "nsep" else None
        n = copies_for(x.numel() * 2)
        stores = [empty_store(fmt, "k", B, H, T, d) for _ in range(n)]
        g, e = bench([lambda st=st, fmt=fmt, scale=scale: quantize_into(x, fmt, "k", st, 0, scale=scale)
                      for st in stores])
        nbytes = x.numel() * 2 + B * H * T * fmt.bytes_per_token(d, "k")
        row = {"kernel": "quantize_into", "format": fmt.name, "shape": [B, H, T, d], "us": g, "eager_us": e,
               "bytes": nbytes, "gbps": nbytes / (g * 1e-6) / 1e9, "frac_hbm": nbytes / (g * 1e-6) / hbm}
        rows.append(row)
        print(f"| {fmt.name} | {B}x{H}x{T}x{d} | {g:.1f} | {nbytes / 1e6:.1f} | {row['gbps']:.0f} | "
              f"{100 * row['frac_hbm']:.0f}% |", flush=True)


# ---------------------------------------------------------------------------------------------- tune
DEFAULT_GRID = "block_n=64,128,256;num_warps=4,8;num_stages=2,3,4;min_g_pad=8,16"


def parse_grid(spec: str) -> list[dict[str, int]]:
    """``"block_n=64,128;num_warps=1,4"`` -> every combination, as DecodeConfig keyword dicts; ``|`` joins grids."""
    import itertools

    out = []
    for sub in spec.split("|"):
        axes = []
        for part in sub.split(";"):
            if part.strip():
                name, vals = part.split("=")
                axes.append([(name.strip(), int(v)) for v in vals.split(",")])
        out += [dict(c) for c in itertools.product(*axes)]
    return out


def run_tune(shape: Shape, B: int, ctx: int, fmts: list[str], hbm: float, grid: str = DEFAULT_GRID,
             splits: list[int] | None = None) -> list[dict]:
    """Sweep DecodeConfig over ``grid`` on one shape, then with the best configuration the split counts ``splits``
    (default: about 1, 2, 3, 4 and 8 programs per SM) beside the heuristic's; print the best configuration per
    format."""
    from kvcompile.kernels.decode import DecodeConfig

    inputs = [make_inputs(shape, B, ctx, seed=i) for i in range(copies_for(2 * B * shape.hkv * ctx * shape.d * 2))]
    results = []
    for fname in fmts:
        fmt = KVFormat.parse(fname)
        if fmt.kind == "fp16":
            built = [((*fp16_stores(inp), None, None), inp) for inp in inputs]
        else:
            built = [(quantized_stores(inp, fmt), inp) for inp in inputs]
        nbytes = decode_bytes(shape, B, inputs[0], fmt)
        best = None
        for kw in parse_grid(grid):
            cfg = DecodeConfig(**kw)
            spec = ",".join(f"{k}={v}" for k, v in kw.items())
            try:
                calls = [decode_call(inp, fmt, ksto, vsto, ks, vs, cfg) for (ksto, vsto, ks, vs), inp in built]
                g, _ = bench(calls)
            except Exception as e:  # e.g. out of shared memory for this tile
                print(f"  {fmt.name} {spec}: {type(e).__name__}", file=sys.stderr)
                continue
            r = {"format": fmt.name, "config": cfg.__dict__, "us": g, "frac_hbm": nbytes / (g * 1e-6) / hbm}
            results.append(r)
            print(f"  {fmt.name} {spec}: {g:.1f} us, {100 * r['frac_hbm']:.0f}% of HBM read", flush=True)
            if best is None or g < best[0]:
                best = (g, cfg, spec)
        if best is None:
            continue
        # split counts around the heuristic's (None), with the best tile: programs = k * SMs
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        counts = splits or [max(1, round(k * sms / (B * shape.hkv))) for k in (1, 2, 3, 4, 8)]
        for n in (None, *counts):
            calls = [decode_call(inp, fmt, ksto, vsto, ks, vs, best[1], n) for (ksto, vsto, ks, vs), inp in built]
            g, _ = bench(calls)
            print(f"  {fmt.name} best tile, num_splits={n or 'heuristic'}: {g:.1f} us", flush=True)
        print(f"BEST {fmt.name}: {best[0]:.1f} us with KVCOMPILE_DECODE_CONFIG=\"{best[2]}\"", flush=True)
        del built
    return results


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small subset for a first smoke run")
    ap.add_argument("--json", metavar="FILE", help="write every number to FILE")
    ap.add_argument("--tune", action="store_true", help="sweep decode launch configurations (Llama-3-8B, B=8, 32k)")
    ap.add_argument("--tune-grid", default=DEFAULT_GRID, metavar="SPEC",
                    help=f"configurations --tune sweeps, e.g. 'block_n=64,128;num_warps=1,4' (default {DEFAULT_GRID})")
    ap.add_argument("--tune-formats", default="nsep-4,nsep-2,fp16", metavar="F,..", help="formats --tune sweeps")
    ap.add_argument("--tune-splits", metavar="N,..", help="split counts --tune tries with the best configuration")
    ap.add_argument("--batches", metavar="B,..", help=f"batch sizes of the decode table (default {BATCHES})")
    ap.add_argument("--contexts", metavar="N,..", help=f"context lengths of the decode table (default {CONTEXTS})")
    ap.add_argument("--formats", metavar="F,..", help=f"packed formats of the decode table (default {DECODE_FORMATS})")
    ap.add_argument("--no-check", action="store_true", help="skip the GPU correctness checks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none is visible); the kernels' CPU checks are the tests in "
              "tests/kernels/", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name(0)
    info = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    print(f"# kvcompile kernels on {dev} (torch {torch.__version__}, triton {triton.__version__}, "
          f"CUDA {torch.version.cuda})")
    hbm = hbm_bandwidth()
    print(f"HBM copy bandwidth (device-to-device copy, read + write; the quantize yardstick): {hbm / 1e9:.0f} GB/s")
    hbm_read, how = hbm_read_bandwidth()
    torch.cuda.empty_cache()
    print(f"HBM read bandwidth (best streaming read: {how}; the decode yardstick): {hbm_read / 1e9:.0f} GB/s")
    from kvcompile.kernels import decode as dmod
    from kvcompile.kernels import decode_gluon

    gluon_on = decode_gluon.HAVE_GLUON and dmod.DecodeConfig.from_env().gluon != 0
    info["packed_decode"] = "gluon" if gluon_on else "triton"
    print(f"packed nsep/int-token decode at head_dim 128: {'Gluon' if gluon_on else 'Triton'} split kernel "
          "(KVCOMPILE_DECODE_CONFIG=gluon=0 selects the Triton one)")
    result: dict = {"env": info, "hbm_copy_gbps": hbm / 1e9, "hbm_read_gbps": hbm_read / 1e9, "hbm_read_how": how,
                    "checks": {}, "decode": [], "quantize": [], "tune": []}

    shapes, batches, contexts, dfmts, qfmts = SHAPES, BATCHES, CONTEXTS, DECODE_FORMATS, QUANT_FORMATS
    if args.quick:
        shapes, batches, contexts, dfmts, qfmts = SHAPES[:1], [8], [4096, 32768], ["nsep-4", "nsep-2"], ["nsep-4"]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    if args.contexts:
        contexts = [int(c) for c in args.contexts.split(",")]
    if args.formats:
        dfmts = args.formats.split(",")

    failed = False
    if not args.no_check:
        print("\n## correctness on the GPU")
        for fname in ["fp16", *dfmts]:
            fmt = KVFormat.parse(fname)
            for shape in shapes:
                err = check_decode(fmt, shape)
                ok = err < 1e-2
                failed |= not ok
                result["checks"][f"decode {fmt.name} {shape.name}"] = err
                print(f"decode {fmt.name} {shape.name}: relative error {err:.2e} {'ok' if ok else 'FAILED'}")
        for fname in qfmts:
            frac = check_quantize(KVFormat.parse(fname))
            ok = frac <= 1e-3
            failed |= not ok
            result["checks"][f"quantize {fname}"] = frac
            print(f"quantize {fname}: {100 * frac:.4f}% codes differ (ties) {'ok' if ok else 'FAILED'}")
        if failed:
            print("correctness checks FAILED: not timing", file=sys.stderr)
            _write(args.json, result)
            return 1

    if args.tune:
        print("\n## tuning (Llama-3-8B, batch 8, 32k)")
        result["tune"] = run_tune(SHAPES[0], 8, 32768, args.tune_formats.split(","), hbm_read, args.tune_grid,
                                  [int(n) for n in args.tune_splits.split(",")] if args.tune_splits else None)
        _write(args.json, result)
        return 0

    print("\n## decode attention (one query token; sinks + 128-token fp16 tail + packed rest)\n")
    print("| model | batch | ctx | format | us | MB read | GB/s | of HBM read | vs best fp16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for B in batches:
            for ctx in contexts:
                run_decode(shape, B, ctx, dfmts, hbm_read, result["decode"])
    print("\n## quantize-on-write")
    run_quantize(qfmts, hbm, result["quantize"])
    _write(args.json, result)
    return 0


def _write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
