"""decode_attention (Triton; interpreted on a CPU) against decode_attention_reference (formats.py dequantize + fp32
softmax attention).

Tolerances, relative L2 error of the whole output against the fp32 reference over the same stored K/V:
fp32 inputs < 1e-3, fp16 inputs < 1e-2, bf16 inputs < 2e-2 (bf16 keeps 8 mantissa bits).
"""

import math
from dataclasses import dataclass

import pytest
import torch

from kvcompile import formats
from kvcompile.formats import KVFormat
from kvcompile.kernels import decode as dmod
from kvcompile.kernels.decode import decode_attention, decode_attention_reference, pick_num_splits
from tests.kernels.test_quantize import calibrated_scale, kv_like

TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
NSEP4, NSEP2, NSEP8 = KVFormat("nsep", 4), KVFormat("nsep", 2), KVFormat("nsep", 8)
INT4, INT2 = KVFormat("int-token", 4), KVFormat("int-token", 2)
KIVI4, KIVI2 = KVFormat("kivi", 4, 32), KVFormat("kivi", 2, 32)
FP16 = formats.FP16


@dataclass
class Case:
    k: KVFormat
    v: KVFormat
    d: int = 128
    G: int = 4  # query heads per KV head
    Hkv: int = 2
    B: int = 2
    n_quant: int = 200
    n_fp: int = 9
    sinks: int = 4
    dtype: torch.dtype = torch.float32
    seq_start: tuple[int, ...] | None = None
    softcap: float | None = None
    splits: int | None = None
    cap: int | None = None  # quantized store capacity (default n_quant + 64)

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (f"{self.k.name}/{self.v.name}-d{self.d}-G{self.G}-B{self.B}-q{self.n_quant}-f{self.n_fp}-s{self.sinks}"
                f"-{dt}" + (f"-start{list(self.seq_start)}" if self.seq_start else "")
                + (f"-cap{self.softcap}" if self.softcap else "") + f"-split{self.splits}")


def _store(x: torch.Tensor, fmt: KVFormat, role: str, scale: torch.Tensor | None, cap: int) -> dict[str, torch.Tensor]:
    """formats.quantize(x) copied into a store of capacity cap whose unused rows hold NaN / random bytes."""
    qt = {"data": x.clone()} if fmt.kind == "fp16" else formats.quantize(x, fmt, role, scale)
    out = {}
    for name, t in qt.items():
        rows = cap // fmt.group if (fmt.kind == "kivi" and role == "k" and name != "codes") else cap
        shape = (*t.shape[:2], rows, *t.shape[3:])
        if t.is_floating_point():
            full = torch.full(shape, float("nan"), dtype=t.dtype)
        else:
            full = torch.randint(0, 256, shape, dtype=t.dtype)
        full[:, :, :t.shape[2]] = t
        out[name] = full
    return out


def build(c: Case, seed: int = 0) -> tuple[tuple, dict]:
    torch.manual_seed(seed)
    Hq = c.G * c.Hkv
    kq = kv_like(c.B, c.Hkv, c.n_quant, c.d, seed=seed + 1, dtype=c.dtype)
    vq = kv_like(c.B, c.Hkv, c.n_quant, c.d, seed=seed + 2, dtype=c.dtype)
    # static scales calibrated on separate tokens of the same distribution
    ks = calibrated_scale(kv_like(c.B, c.Hkv, 64, c.d, seed=seed + 6), c.k.bits) if c.k.kind == "nsep" else None
    vs = calibrated_scale(kv_like(c.B, c.Hkv, 64, c.d, seed=seed + 7), c.v.bits) if c.v.kind == "nsep" else None
    cap = c.cap or c.n_quant + 64
    k_store = _store(kq, c.k, "k", ks, cap)
    v_store = _store(vq, c.v, "v", vs, cap)
    fcap = c.n_fp + 5
    fp_k = torch.full((c.B, c.Hkv, fcap, c.d), float("nan"), dtype=c.dtype)
    fp_v = torch.full((c.B, c.Hkv, fcap, c.d), float("nan"), dtype=c.dtype)
    fp_k[:, :, :c.n_fp] = kv_like(c.B, c.Hkv, c.n_fp, c.d, seed=seed + 3, dtype=c.dtype)
    fp_v[:, :, :c.n_fp] = kv_like(c.B, c.Hkv, c.n_fp, c.d, seed=seed + 4, dtype=c.dtype)
    # queries with outlier channels too, at a realistic scale (scores of a few units after 1/sqrt(d))
    q = (kv_like(c.B, Hq, 1, c.d, seed=seed + 5)[:, :, 0] * 0.05).to(c.dtype)
    start = torch.tensor(c.seq_start, dtype=torch.int32) if c.seq_start is not None else None
    args = (q, k_store, v_store, c.k, c.v, c.n_quant, fp_k, fp_v, c.n_fp, c.sinks, 1.0 / math.sqrt(c.d))
    kw = dict(k_scale=ks, v_scale=vs, seq_start=start, softcap=c.softcap)
    return args, kw


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float buffer the kernels allocate (output, partials) starts as NaN, so an unwritten element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def run_and_check(c: Case) -> None:
    args, kw = build(c)
    out = decode_attention(*args, **kw, num_splits=c.splits)
    ref = decode_attention_reference(*args, **kw)
    assert out.shape == ref.shape and out.dtype == c.dtype
    assert not out.isnan().any(), "output not fully written (or NaN read from beyond n_quant / n_fp)"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[c.dtype], f"relative error {err:.2e} >= {TOL[c.dtype]:.0e}"


# Each format, width, head_dim (64/128/256), GQA ratio (1, 3, 4, 6, 7), dtype, padding, sinks, softcap and split count
# appears at least once; shapes are small because the kernels run in Triton's interpreter here.
CASES = [
    Case(NSEP4, NSEP4, d=128, G=4, n_quant=300, n_fp=9, sinks=4, seq_start=(0, 37), splits=3),
    Case(NSEP2, NSEP2, d=64, G=3, n_quant=257, n_fp=5, sinks=0, splits=2),
    Case(NSEP8, NSEP8, d=256, G=1, B=1, n_quant=77, n_fp=3, sinks=2, splits=1),
    Case(NSEP4, NSEP2, d=64, G=7, Hkv=1, n_quant=140, n_fp=6, sinks=2, dtype=torch.float16, seq_start=(5, 0)),
    Case(INT4, INT4, d=128, G=6, Hkv=1, B=1, n_quant=190, n_fp=6, sinks=1, dtype=torch.float16, splits=2),
    Case(INT2, NSEP4, d=64, G=3, n_quant=129, n_fp=4, sinks=0, softcap=30.0, splits=2),
    Case(KIVI4, KIVI4, d=128, G=4, n_quant=128, n_fp=7, sinks=1, seq_start=(0, 50), splits=2),
    Case(KIVI2, KIVI2, d=64, G=1, B=1, Hkv=1, n_quant=96, n_fp=3, sinks=0, dtype=torch.float16, splits=1),
    Case(FP16, FP16, d=128, G=4, n_quant=150, n_fp=8, sinks=4, dtype=torch.float16, seq_start=(0, 20), splits=2),
    Case(NSEP4, FP16, d=64, G=3, n_quant=100, n_fp=5, sinks=2, splits=2),
    Case(KIVI4, NSEP4, d=64, G=4, B=1, n_quant=64, n_fp=3, sinks=1, splits=1),
    Case(NSEP4, NSEP4, d=128, G=4, n_quant=0, n_fp=11, sinks=4, seq_start=(2, 0)),  # all fp16 (one direct program)
    Case(NSEP4, NSEP4, d=64, G=4, n_quant=100, n_fp=0, sinks=0, splits=1),  # quantized only (one direct program)
    Case(NSEP2, NSEP2, d=64, G=4, n_quant=100, n_fp=0, sinks=0, splits=3),  # quantized only, merged
    Case(NSEP4, NSEP4, d=128, G=4, n_quant=200, n_fp=9, sinks=4, dtype=torch.bfloat16, splits=2),
    # nsep-2 is midrise (q = 2 code - 3): single direct program, and each role next to a symmetric 2-bit format
    Case(NSEP2, NSEP2, d=128, G=4, n_quant=100, n_fp=0, sinks=0, dtype=torch.bfloat16, splits=1),
    Case(NSEP2, INT2, d=64, G=6, Hkv=1, n_quant=150, n_fp=4, sinks=1, dtype=torch.float16, softcap=30.0, splits=2),
    Case(INT2, NSEP2, d=128, G=2, n_quant=90, n_fp=3, sinks=1, seq_start=(0, 11), splits=1),
    Case(NSEP4, INT4, d=64, G=4, n_quant=160, n_fp=6, sinks=2, dtype=torch.float16, seq_start=(170, 3), splits=2,
         softcap=50.0),  # batch 0 masked through all quantized tokens and some of the tail
    # kivi groups wider than a tile (keys) and than a slice (values); 8-bit kivi with 8 channel groups of values
    Case(KVFormat("kivi", 4, 128), KVFormat("kivi", 4, 128), d=128, G=4, n_quant=256, n_fp=5, sinks=1,
         dtype=torch.bfloat16, splits=3),
    Case(KVFormat("kivi", 8, 32), KVFormat("kivi", 8, 32), d=256, G=2, n_quant=64, n_fp=3, sinks=0, splits=1),
]


@pytest.mark.parametrize("c", CASES, ids=str)
def test_decode_matches_reference(c: Case, poisoned_empty: None) -> None:
    run_and_check(c)


SLOW_CASES = [
    Case(k, v, d=d, G=G, n_quant=nq, n_fp=nf, sinks=s, dtype=dt, splits=sp)
    for (k, v) in [(NSEP4, NSEP4), (NSEP2, NSEP2), (NSEP8, NSEP8), (INT4, INT4), (INT2, INT2), (KIVI4, KIVI4),
                   (KIVI2, KIVI2), (FP16, FP16)]
    for (d, G, nq, nf, s, dt, sp) in [(64, 1, 64, 1, 0, torch.float32, 1), (128, 7, 320, 33, 4, torch.float16, 4),
                                      (256, 3, 96, 2, 1, torch.bfloat16, None)]
]


@pytest.mark.slow
@pytest.mark.parametrize("c", SLOW_CASES, ids=str)
def test_decode_sweep(c: Case, poisoned_empty: None) -> None:
    run_and_check(c)


def test_no_keys_gives_zeros() -> None:
    args, kw = build(Case(NSEP4, NSEP4, d=64, n_quant=0, n_fp=0))
    out = decode_attention(*args, **kw)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(decode_attention_reference(*args, **kw), torch.zeros_like(out, dtype=torch.float32))


def test_split_count_does_not_change_the_result() -> None:
    args, kw = build(Case(NSEP4, NSEP4, d=64, G=4, B=1, n_quant=260, n_fp=5, sinks=2))
    outs = [decode_attention(*args, **kw, num_splits=s) for s in (1, 3)]
    # the merge in blocks of 2 partials (its running maximum carried across blocks): 5 splits + the fp16 slots
    outs.append(dmod._decode(*args, **kw, num_splits=5, config=dmod.DecodeConfig(merge_block=2)))
    for o in outs[1:]:
        # fp32 sums in another order; the values offset is removed after the sums (cancellation of ~3 bits)
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5 * outs[0].abs().max().item())


@pytest.mark.parametrize("fmt,d", [(NSEP4, 128), (NSEP2, 128), (NSEP2, 256), (KIVI4, 128)],
                         ids=lambda x: str(getattr(x, "name", x)))
def test_value_tile_order_does_not_change_the_result(fmt: KVFormat, d: int) -> None:
    """The packed value tiles can be loaded in whole token rows or in blocks of 8 / 16 lanes (DecodeConfig.v_lanes,
    a shared-memory layout choice): the same bits come out, and they match the reference."""
    c = Case(fmt, fmt, d=d, G=3, B=2, n_quant=160, n_fp=3, sinks=1)  # 160: the last 64-token tile is partial
    args, kw = build(c)
    cfgs = [dmod.DecodeConfig(v_lanes=lb) for lb in (0, 8, 16)]
    mp = max(dmod.next_pow2(d * fmt.bits // 8), 32)  # the value tile's padded row bytes, as _decode sets them
    assert len({cfg.v_lanes_for(mp) for cfg in cfgs}) >= 2, "the configurations must load the tiles differently"
    outs = [dmod._decode(*args, **kw, num_splits=2, config=cfg) for cfg in cfgs]
    ref = decode_attention_reference(*args, **kw)
    assert ((outs[0].float() - ref).norm() / ref.norm()).item() < TOL[c.dtype]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("c", [
    Case(NSEP4, NSEP4, d=64, G=4, n_quant=200, n_fp=9, sinks=4, seq_start=(0, 37)),
    Case(NSEP2, FP16, d=64, G=3, B=1, n_quant=0, n_fp=6, sinks=2, dtype=torch.float16),  # nothing quantized yet
    Case(KIVI4, INT4, d=64, G=2, n_quant=96, n_fp=3, sinks=1),
], ids=str)
def test_device_lengths(c: Case, poisoned_empty: None) -> None:
    """Lengths read from a device tensor (CUDA-graph replay): a launch sized for the full capacity gives the result
    of the exact lengths, empty splits included."""
    args, kw = build(c)
    q, k_store, v_store, kf, vf, n_quant, fp_k, fp_v, n_fp, sinks, scaling = args
    want = decode_attention(*args, **kw)
    cap_q = k_store["codes" if kf.kind != "fp16" else "data"].shape[2]
    lens = torch.tensor([n_quant, n_fp], dtype=torch.int32)
    got = decode_attention(q, k_store, v_store, kf, vf, cap_q, fp_k, fp_v, fp_k.shape[2], sinks, scaling, **kw,
                           lens=lens)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=TOL[c.dtype], atol=TOL[c.dtype] * 0.1)


def test_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton the entry point runs the reference (cast to the query's dtype)."""
    monkeypatch.setattr(dmod, "backend_for", lambda t: "torch")
    args, kw = build(Case(INT4, NSEP2, d=64, dtype=torch.float16, n_quant=40, n_fp=3))
    out = decode_attention(*args, **kw)
    assert torch.equal(out, decode_attention_reference(*args, **kw).to(torch.float16))


def test_kivi_values_with_many_groups_fall_back() -> None:
    """The kernel sums the values' zeros of at most 16 channel groups per head; more go to the PyTorch path, with a
    warning that says so."""
    args, kw = build(Case(KIVI4, KVFormat("kivi", 4, 2), d=64, n_quant=64, n_fp=3))  # 32 groups of 2 channels
    with pytest.warns(UserWarning, match="channel groups"):
        out = decode_attention(*args, **kw)
    assert torch.equal(out, decode_attention_reference(*args, **kw).to(out.dtype))


def test_pick_num_splits() -> None:
    assert pick_num_splits(0, 8, 128, 396) == 0
    for n, bh in [(1, 1), (1000, 8), (32768, 64), (131072, 256), (4096, 2)]:
        s = pick_num_splits(n, bh, 128, 396)
        assert 1 <= s <= -(-n // 128)
    # a long context on few heads is split enough to fill the GPU; many heads need few splits
    assert 8 * pick_num_splits(32768, 8, 128, 396) >= 264
    assert pick_num_splits(8192, 1024, 128, 396) <= 8
    # few heads, long context, many slots: not hundreds of one-block splits (the merge would dominate)
    assert 16 <= pick_num_splits(32768, 2, 64, 1056) <= 128


@pytest.mark.parametrize(("n_regs", "warps", "shared", "programs"), [
    (128, 1, 9216, 16),   # 4 warps of 4096 registers per scheduler's quarter of the register file
    (120, 1, 9216, 16),   # 3840 registers per warp: still 4 per quarter (the whole file would hold 17)
    (96, 1, 9216, 20),
    (168, 1, 16896, 12),
    (96, 4, 0, 5),
    (64, 1, 20000, 11),   # shared memory: 233472 // (20000 + 1024 reserved)
])
def test_programs_per_sm(n_regs: int, warps: int, shared: int, programs: int,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The occupancy estimate that sizes the split count (H100/H200 figures): a program more than fits would put
    the last ones in a second wave."""
    from types import SimpleNamespace

    props = SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    kernel = SimpleNamespace(n_regs=n_regs, metadata=SimpleNamespace(shared=shared))
    assert dmod._ctas_per_sm(kernel, warps, 0, -1) == programs


def test_bad_input() -> None:
    args, kw = build(Case(NSEP4, NSEP4, d=64, n_quant=40, n_fp=3))
    with pytest.raises(ValueError, match="static scale"):
        decode_attention(*args, **{**kw, "k_scale": None})
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(args[0][:, :3], *args[1:], **kw)
    bad = list(args)
    bad[5] = 10_000  # n_quant beyond the store's capacity
    with pytest.raises(ValueError, match="capacity"):
        decode_attention(*bad, **kw)


def test_bad_decode_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch settings that cannot compile (tile sizes are arange extents and dot shapes) fail in one clear line."""
    for kw in ({"merge_block": 10}, {"v_lanes": 4}, {"block_n": 24}, {"block_f": 8}, {"gluon": 1},
               {"gluon_stages": 1}, {"gluon_fp": 2}, {"gluon_trigger": -1}, {"gluon_release": 2}):
        with pytest.raises(ValueError, match=f"DecodeConfig: {next(iter(kw))}="):
            dmod.DecodeConfig(**kw)
    monkeypatch.setenv("KVCOMPILE_DECODE_CONFIG", "merge_block=3")
    with pytest.raises(ValueError, match="bad KVCOMPILE_DECODE_CONFIG"):
        dmod.DecodeConfig.from_env()
