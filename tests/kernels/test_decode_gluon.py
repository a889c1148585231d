"""The Gluon loop of decode attention (kvcompile/kernels/decode_gluon.py).

Gluon has no interpreter, so on the CPU machine the kernel is compiled for sm_90 (Triton ships ptxas) exactly as the
host launches it, and its machine code is checked for the property it exists for: the quantized loop builds its MMA
operands in registers. On a GPU (``pytest -m gpu``) its output is checked against the reference with the tolerances
of test_decode.py, and shown to be the path that actually ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompile.kernels import decode as dmod
from kvcompile.kernels import decode_gluon as dg
from tests.kernels.test_decode import INT2, INT4, NSEP2, NSEP4, TOL, Case, build

needs_gluon = pytest.mark.skipif(not dg.HAVE_GLUON, reason="this Triton has no Gluon")


def _compile_report() -> None:  # run in a child process: the tests' TRITON_INTERPRET=1 would break compilation
    """Compile the Gluon kernel for sm_90 exactly as the host launches it (Llama-3-8B shape, batch 8, 32k) and print
    what its main loop holds, one JSON line per case."""
    import triton

    from kvcompile.kernels.sass import capture_launch, compile_for, disassemble, loop_histogram

    for k, v, n_fp, cfg, hq in ((NSEP4, NSEP4, 132, "", 32), (NSEP2, NSEP2, 132, "", 32), (NSEP4, NSEP2, 132, "", 32),
                                (NSEP4, INT2, 0, "", 32), (NSEP4, NSEP4, 132, "gluon_claim=75", 32),
                                (NSEP2, NSEP2, 132, "gluon_i8=0", 32), (NSEP2, NSEP4, 132, "", 32),
                                (NSEP2, NSEP2, 132, "", 48)):
        os.environ["KVCOMPILE_DECODE_CONFIG"] = cfg
        args, kw = capture_launch(k, v, 8, hq, 8, 128, 32768, n_fp=n_fp, gluon=True)
        kern, _ = compile_for(args, kw, 90, gluon=True)
        _, ops = loop_histogram(disassemble(kern.asm["cubin"]))
        print(json.dumps({"bits": [k.bits, v.bits], "n_fp": n_fp, "cfg": cfg, "G": hq // 8,
                          "shared": kern.metadata.shared,
                          "hmma": ops["HMMA"], "imma": ops["IMMA"], "shfl": ops["SHFL"],
                          "sts": ops["STS"] + ops["STSM"],
                          "ldl": ops["LDL"], "triton": triton.__version__}))


@needs_gluon
def test_gluon_loop_builds_its_operands_in_registers() -> None:
    """Compiled for sm_90: in the quantized loop the only layout change is the softmax weights' (a few shuffles): the
    key, value and query operands need no shuffle and no shared-memory store (the tiles arrive by asynchronous
    copies), and nothing spills (under Triton 3.6, the GPU machine's; see the assertion for later versions). Shared
    memory is the copy stages (2 x 64 tokens of codes and r), plus the small buffer of the fp16 slots' programs. The
    same holds for 4-bit keys and values with tiles claimed at run time (``gluon_claim``): the claims' loop state fits
    beside the operands without spilling; and for scores from int8 MMAs (``gluon_i8``, the default at 2-bit keys
    there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    code = "from tests.kernels.test_decode_gluon import _compile_report as r; r()"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8, res.stdout
    for r in rows:
        kb, vb = r["bits"]
        stages = 2 * 64 * (4 * (kb + vb) * 128 // 32 + 2 * 2)  # words of codes + two fp16 r per token
        # (the fp16 slots' program converts its softmax weights through shared memory: at most [32, 8] fp16)
        assert stages <= r["shared"] <= stages + 512, \
            f"bits {r['bits']}: {r['shared']} B of shared memory, the copies need {stages}"
        # 64 tokens: 32 score MMAs (fp16, or int8 for the high and low query halves: gluon_i8, on by default at
        # 2-bit keys) + 32 value MMAs, whatever the widths, + 4 over a tile of ones (the sums of the weights) when
        # keys and values are both 2-bit (decode_gluon._values: LEAN), 2 when the int8 scores also take the tile's
        # second half into the padding columns (at most 4 query heads per KV head: HALF)
        i8 = "gluon_i8=1" in r["cfg"] or (kb == 2 and "gluon_i8=0" not in r["cfg"])
        ones = (2 if i8 and r["G"] <= 4 else 4) if kb == vb == 2 else 0
        assert (r["hmma"], r["imma"]) == ((32 + ones, 32) if i8 else (64 + ones, 0)), r
        # no spills in the loop under Triton 3.6 (the GPU machine's). Later versions allocate the int8 loop's
        # registers differently: Triton 3.9 reloads up to 4 loop-invariant words (shared-memory offsets, the score
        # offset) from local memory per 64-token tile, an L1 hit beside ~680 instructions
        spills_ok = 0 if r["triton"].startswith("3.6") else 4
        assert r["shfl"] <= 16 and r["sts"] == 0 and r["ldl"] <= spills_ok, r


@needs_gluon
@pytest.mark.parametrize(("fmt", "B", "n", "cfg", "i8"), [
    (NSEP2, 8, 32768, "", True),  # 16-32 tiles per split program (by occupancy): int8 scores
    (NSEP2, 1, 4096, "", False),  # 2: the query's preparation would cost more than the loop gains
    (NSEP2, 1, 4096, "gluon_i8=1", True),
    (NSEP2, 8, 32768, "gluon_i8=0", False),
    (NSEP4, 8, 32768, "", False),  # 4-bit keys wait for memory: fp16 scores
])
def test_int8_scores_where_the_host_chooses_them(fmt, B: int, n: int, cfg: str, i8: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's default for DecodeConfig.gluon_i8 (captured from the real launch, Llama-3-8B shape, 132 SMs)."""
    from kvcompile.kernels.sass import capture_launch

    monkeypatch.setenv("KVCOMPILE_DECODE_CONFIG", cfg)
    _, kw = capture_launch(fmt, fmt, B, 32, 8, 128, n, gluon=True)
    assert kw["KI8"] is i8


@needs_gluon
@pytest.mark.parametrize(("n_quant", "splits", "cfg", "gluon_merge", "claims"), [
    (64 * 32, 32, "", True, False),  # 32 splits + 2 fp16 chunks = 34 partials per KV head
    (64 * 62, 62, "", True, False),  # 64: the most that the Gluon merge takes
    (64 * 63, 63, "", False, False),  # 65: decode's merge kernel
    (64 * 70, 70, "gluon_claim=50", False, True),  # ... which then zeroes the claim counters
    (64 * 32, 32, "gluon_claim=50", True, True),
])
def test_merge_after_the_gluon_splits(n_quant: int, splits: int, cfg: str, gluon_merge: bool, claims: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Which merge follows the Gluon split kernel (the host's choice, captured without a GPU): its own
    (decode_gluon.merge) for at most MERGE_MAX partials per KV head, else decode's; either zeroes the claim counters
    when the split kernel claimed tiles, and is launched as the split kernel's programmatic dependent."""
    seen: dict = {}

    class Grab:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.update(triton=(a, k))

    monkeypatch.setenv("KVCOMPILE_DECODE_CONFIG", cfg)
    monkeypatch.setattr(dmod, "backend_for", lambda t: "triton")
    monkeypatch.setattr(dmod, "num_sms", lambda i: 132)
    monkeypatch.setattr(dmod, "_merge_kernel", Grab())
    monkeypatch.setattr(dg, "supported", lambda *a, **k: True)
    monkeypatch.setattr(dg, "launch", lambda *a, **k: None)
    monkeypatch.setattr(dg, "merge", lambda *a, **k: seen.update(gluon=(a, k)))
    c = Case(NSEP2, NSEP2, G=4, Hkv=1, B=1, n_quant=n_quant, n_fp=40, sinks=4, dtype=torch.float16, splits=splits)
    args, kw = build(c)
    dmod._decode(*args, **kw, num_splits=splits, config=None)
    assert ("gluon" in seen, "triton" in seen) == (gluon_merge, not gluon_merge), seen.keys()
    if gluon_merge:
        a, _ = seen["gluon"]
        assert a[6] <= dg.MERGE_MAX and (a[7] is not None) == claims
    else:
        a, k = seen["triton"]
        assert a[8] > dg.MERGE_MAX and k["PDL"] and k["launch_pdl"] and k["CLAIMS"] is claims


GPU_CASES = [
    Case(NSEP4, NSEP4, G=4, Hkv=2, B=3, n_quant=1000, n_fp=37, sinks=4, dtype=torch.float16, splits=3),
    Case(NSEP2, NSEP2, G=4, Hkv=2, B=2, n_quant=777, n_fp=9, sinks=4, dtype=torch.float16, splits=None, cap=832),
    Case(NSEP4, NSEP2, G=7, Hkv=1, B=2, n_quant=300, n_fp=0, sinks=0, dtype=torch.bfloat16, splits=1, cap=300),
    Case(NSEP2, NSEP4, G=8, Hkv=1, B=2, n_quant=129, n_fp=5, sinks=2, dtype=torch.float16, seq_start=(0, 70),
         splits=2, cap=130),
    Case(INT4, INT4, G=6, Hkv=1, B=1, n_quant=190, n_fp=6, sinks=1, dtype=torch.float16, splits=2),
    Case(INT2, NSEP2, G=3, Hkv=2, B=2, n_quant=64, n_fp=3, sinks=1, dtype=torch.bfloat16, splits=1),
    Case(NSEP4, INT2, G=1, Hkv=3, B=2, n_quant=4101, n_fp=128, sinks=4, dtype=torch.float16, seq_start=(200, 3),
         cap=4102),
    # 2-bit keys and values, at most 4 query heads, a start per sequence and a last tile cut short: with int8 scores
    # the padding columns take each tile's second half (decode_gluon HALF), whose masks run per column
    Case(NSEP2, NSEP2, G=2, Hkv=2, B=2, n_quant=1001, n_fp=20, sinks=4, dtype=torch.bfloat16, seq_start=(0, 300),
         splits=3, cap=1002),
    # more partials per KV head (73) than the Gluon merge takes (MERGE_MAX = 64): decode's merge kernel follows the
    # Gluon split kernel (and zeroes its claim counters)
    Case(NSEP2, NSEP2, G=4, Hkv=1, B=1, n_quant=64 * 70 + 5, n_fp=40, sinks=4, dtype=torch.float16, splits=71,
         cap=64 * 70 + 6),
]


def _poison() -> None:
    """Fill half the free GPU memory with NaN and hand it back to the cache allocator, so that torch.empty buffers
    of its large pool (1 MB and more: the partials of the larger cases) come back poisoned."""
    t = torch.full((torch.cuda.mem_get_info()[0] // 8,), float("nan"), dtype=torch.float32, device="cuda")
    del t


def _cuda(x):
    if isinstance(x, torch.Tensor):
        return x.cuda()
    if isinstance(x, dict):
        return {k: _cuda(v) for k, v in x.items()}
    return x


def _counters_zero() -> None:
    """Every launch leaves its run-time claim counters at zero (the next launch on the stream starts from them)."""
    torch.cuda.synchronize()
    for bufs in dg._COUNTERS.values():
        for b in bufs:
            assert not b.any(), f"claim counters left at {b.nonzero().flatten()[:8].tolist()}"


@pytest.mark.gpu
@needs_gluon
@pytest.mark.parametrize("mode", ["", "gluon_fp=1", "gluon_fp=0,gluon_trigger=0", "gluon_release=0",
                                  "gluon_release=1", "gluon_claim=50", "gluon_claim=1,gluon_fp=1",
                                  "gluon_claim=90,gluon_release=1", "gluon_claim=0", "gluon_i8=0",
                                  "gluon_i8=1", "gluon_i8=1,gluon_claim=50", "maxnreg=96"])
@pytest.mark.parametrize("c", GPU_CASES, ids=str)
def test_gluon_loop_matches_reference(c: Case, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the fp16 chunks where the host puts them (at these sizes: programs of their own), in the split programs after
    # their loops, or in programs of their own with the merge launched after every loop; the loop that refills a
    # stage as soon as it is read or not; tiles claimed at run time (half of them, nearly all, a tenth with the
    # refill) or none; scores from fp16 or int8 MMAs at either key width; registers capped (spills). Partials
    # that no program wrote would be the NaNs the allocator hands back (_poison); a tile claimed twice or never
    # would show in the error
    monkeypatch.setenv("KVCOMPILE_DECODE_CONFIG", mode)
    _poison()
    args, kw = build(c)
    args, kw = tuple(_cuda(a) for a in args), {k: _cuda(v) for k, v in kw.items()}
    calls = []
    real = dg.launch
    monkeypatch.setattr(dg, "launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = dmod.decode_attention(*args, **kw, num_splits=c.splits)
    assert calls, "the Gluon loop did not run for this case"
    ref = dmod.decode_attention_reference(*args, **kw)
    assert not out.isnan().any()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[c.dtype], f"relative error {err:.2e} >= {TOL[c.dtype]:.0e}"
    # the Triton kernel over the same store agrees to rounding
    tri = dmod._decode(*args, **kw, num_splits=c.splits, config=dmod.DecodeConfig(gluon=0))
    terr = ((out.float() - tri.float()).norm() / tri.float().norm()).item()
    assert terr < TOL[c.dtype], terr
    # lengths on the device (CUDA-graph replay): a launch sized for the capacity gives the same result
    q, k_store, v_store, kf, vf, n_quant, fp_k, fp_v, n_fp, sinks, scaling = args
    lens = torch.tensor([n_quant, n_fp], dtype=torch.int32, device="cuda")
    _poison()
    got = dmod.decode_attention(q, k_store, v_store, kf, vf, k_store["codes"].shape[2], fp_k, fp_v, fp_k.shape[2],
                                sinks, scaling, **kw, lens=lens)
    # (another split of the tokens: the same sums in another order, rounded to the output dtype)
    gerr = ((got.float() - out.float()).norm() / out.float().norm()).item()
    assert gerr < TOL[c.dtype] * 0.1, gerr
    _counters_zero()


@pytest.mark.gpu
@needs_gluon
@pytest.mark.parametrize("mode", ["gluon_fp=1", "gluon_fp=0,gluon_trigger=0", "gluon_fp=1,gluon_release=1",
                                  "gluon_fp=1,gluon_claim=60", "gluon_fp=1,gluon_claim=0", "gluon_fp=1,gluon_i8=1"])
def test_gluon_loop_in_a_cuda_graph(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured once at the stores' capacity with lengths on the device (the merge a programmatic dependent of the
    split kernel), then replayed after the lengths change: each replay equals the reference at those lengths."""
    monkeypatch.setenv("KVCOMPILE_DECODE_CONFIG", mode)
    c = Case(NSEP4, NSEP2, G=4, Hkv=2, B=2, n_quant=2000, n_fp=40, sinks=4, dtype=torch.float16, cap=2048)
    args, kw = build(c)
    args, kw = tuple(_cuda(a) for a in args), {k: _cuda(v) for k, v in kw.items()}
    q, k_store, v_store, kf, vf, n_quant, fp_k, fp_v, n_fp, sinks, scaling = args
    lens = torch.tensor([n_quant, n_fp], dtype=torch.int32, device="cuda")
    fp_in = []
    real = dg.launch
    monkeypatch.setattr(dg, "launch", lambda *a, **k: fp_in.append(a[-3]) or real(*a, **k))

    def call() -> torch.Tensor:
        return dmod.decode_attention(q, k_store, v_store, kf, vf, k_store["codes"].shape[2], fp_k, fp_v,
                                     fp_k.shape[2], sinks, scaling, **kw, lens=lens)

    call()  # compiles outside the capture
    torch.cuda.synchronize()
    assert fp_in == ["gluon_fp=1" in mode], fp_in  # the Gluon loop ran, with the fp16 slots where asked
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for nq, nf in ((n_quant, n_fp), (1500, 17), (64, 0)):
        lens.copy_(torch.tensor([nq, nf], dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = dmod.decode_attention_reference(q, k_store, v_store, kf, vf, nq, fp_k, fp_v, nf, sinks, scaling, **kw)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < TOL[c.dtype], f"lengths {nq}/{nf}: relative error {err:.2e}"
        _counters_zero()

