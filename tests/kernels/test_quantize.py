"""quantize_into against formats.quantize: same codes (but for rare ties), same r (to fp16 rounding), in place.

On a CPU the Triton kernel runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch

from kvcompile import formats
from kvcompile.formats import KVFormat
from kvcompile.kernels import quantize as qmod
from kvcompile.kernels.quantize import quantize_into

POISON_CODE = 0xA5
CAP = 80  # store capacity (tokens)


def kv_like(B: int, H: int, T: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random K/V with planted outlier channels (x20..x50) and token norms spread over x0.1..x10."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, d, generator=g)
    chans = torch.randperm(d, generator=g)[:3]
    x[..., chans] *= torch.empty(3).uniform_(20, 50, generator=g)
    x *= torch.exp(torch.empty(B, H, T, 1).uniform_(-2.3, 2.3, generator=g))
    return x.to(dtype)


def calibrated_scale(x: torch.Tensor, bits: int, alpha: float = 1.0) -> torch.Tensor:
    """A static nsep scale [H, d] from x itself: the max |u_c| per head and channel (what calibration measures)."""
    u = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return formats.nsep_scale(u.abs().amax(dim=(0, 2)), bits, alpha)


def empty_store(fmt: KVFormat, role: str, B: int, H: int, d: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A store at capacity CAP, poisoned so that any write outside the target rows shows."""
    if fmt.kind == "fp16":
        return {"data": torch.full((B, H, CAP, d), float("nan"), dtype=dtype)}
    m = d * fmt.bits // 8
    store = {"codes": torch.full((B, H, CAP, m), POISON_CODE, dtype=torch.uint8)}
    if fmt.kind == "kivi":
        rows = CAP // fmt.group if role == "k" else CAP
        width = d if role == "k" else -(-d // fmt.group)
        store["scale"] = torch.full((B, H, rows, width), float("nan"), dtype=torch.float16)
        store["zero"] = torch.full((B, H, rows, width), float("nan"), dtype=torch.float16)
    else:
        store["r"] = torch.full((B, H, CAP), float("nan"), dtype=torch.float16)
    return store


def check_against_formats(x: torch.Tensor, fmt: KVFormat, role: str, pos: int, scale: torch.Tensor | None,
                          store: dict[str, torch.Tensor]) -> None:
    """Rows [pos, pos+T) equal formats.quantize(x); every other row still holds the poison."""
    ref = formats.quantize(x, fmt, role, scale)
    T = x.shape[2]
    for name, want in ref.items():
        lo = qmod.token_rows(fmt, role, name, pos)
        hi = lo + want.shape[2]
        got = store[name][:, :, lo:hi]
        if name == "codes":
            gc = formats.unpack_codes(got, fmt.bits).int()
            wc = formats.unpack_codes(want, fmt.bits).int()
            # ties of round-half-to-even may resolve differently after a one-ulp difference in u / s
            assert (gc - wc).abs().max().item() <= 1
            assert (gc != wc).float().mean().item() <= 1e-3
        elif name == "r":
            # both are fp32 values rounded to fp16: at most one fp16 ulp apart
            rel = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)
            assert rel.max().item() <= 2.0**-10
        else:
            assert torch.equal(got.to(want.dtype), want), name
        rest = torch.cat([store[name][:, :, :lo], store[name][:, :, hi:]], dim=2)
        if name == "codes":
            assert (rest == POISON_CODE).all()
        else:
            assert rest.isnan().all(), f"{name} written outside [{pos}, {pos + T})"


# every format and width; head dims 64/128/256 and input dtypes spread over the cases
CASES = [
    ("nsep", 4, 128, torch.float32),
    ("nsep", 2, 64, torch.float16),
    ("nsep", 8, 256, torch.bfloat16),
    ("nsep", 4, 96, torch.float16),  # a head_dim that is not a power of two
    ("int-token", 4, 128, torch.float16),
    ("int-token", 2, 64, torch.float32),
    ("int-token", 8, 128, torch.bfloat16),
]


@pytest.mark.parametrize(("kind", "bits", "d", "dtype"), CASES)
def test_symmetric_formats_match_formats_py(kind: str, bits: int, d: int, dtype: torch.dtype) -> None:
    B, H, T, pos = 2, 3, 37, 11  # odd length at an odd offset
    x = kv_like(B, H, T, d, seed=bits * d, dtype=dtype)
    fmt = KVFormat(kind, bits)
    scale = calibrated_scale(x, bits) if kind == "nsep" else None
    store = empty_store(fmt, "k", B, H, d, dtype)
    quantize_into(x, fmt, "k", store, pos, scale=scale)
    check_against_formats(x, fmt, "k", pos, scale, store)


@pytest.mark.parametrize("bits", [4, 8])
def test_nsep_all_zero_fallback(bits: int) -> None:
    """Tokens whose codes would all round to zero keep their dominant channel at +-1 (and their norm)."""
    B, H, T, d = 1, 2, 24, 64
    x = kv_like(B, H, T, d, seed=7)
    # scales so large that |u_c / s_c| < 1/2 everywhere except channel 0, which only half of the tokens use
    scale = torch.full((H, d), 4.0)
    scale[:, 0] = 0.05
    x[:, :, ::2, 0] = 0.0
    x[:, :, 5] = 0.0  # and an all-zero token
    ref = formats.quantize(x, KVFormat("nsep", bits), "k", scale)
    codes = formats.signed_codes(ref, KVFormat("nsep", bits))
    assert ((codes != 0).sum(-1) == 1).any(), "the case must exercise the fallback"
    store = empty_store(KVFormat("nsep", bits), "k", B, H, d, torch.float32)
    quantize_into(x, KVFormat("nsep", bits), "k", store, 0, scale=scale)
    check_against_formats(x, KVFormat("nsep", bits), "k", 0, scale, store)
    got = formats.signed_codes({"codes": store["codes"][:, :, :T]}, KVFormat("nsep", bits))
    assert ((got != 0).sum(-1) >= 1).all(), "no token may be stored as a zero vector"


@pytest.mark.parametrize(("d", "dtype", "alpha"), [(64, torch.float32, 1.0), (128, torch.float16, 0.5),
                                                   (96, torch.bfloat16, 0.7)])
def test_nsep2_midrise(d: int, dtype: torch.dtype, alpha: float) -> None:
    """nsep-2: codes 0..3 = odd q in {-3, -1, +1, +3}, as formats.py computes them, including tokens formats.py's
    symmetric grid would have zeroed (huge scales), an all-zero token (u = 0 -> q = +1, r = 0) and padded slots
    (d = 96: m = 24 bytes in 32 slots)."""
    B, H, T = 2, 2, 41
    x = kv_like(B, H, T, d, seed=d, dtype=dtype)
    fmt = KVFormat("nsep", 2)
    scale = calibrated_scale(x, 2, alpha)
    scale[1, : d // 2] *= 50.0  # head 1: half its channels far below the first level
    x[:, :, 7] = 0.0
    store = empty_store(fmt, "v", B, H, d, dtype)
    quantize_into(x, fmt, "v", store, 3, scale=scale)
    check_against_formats(x, fmt, "v", 3, scale, store)
    got = formats.unpack_codes(store["codes"][:, :, 3:3 + T], 2)
    assert set(got.unique().tolist()) == {0, 1, 2, 3}
    assert (got[:, :, 7] == 2).all() and (store["r"][:, :, 3 + 7] == 0).all()
    q = formats.signed_codes({"codes": store["codes"][:, :, 3:3 + T]}, fmt)
    hat = formats.nsep_dequantize(q, store["r"][:, :, 3:3 + T], scale)
    keep = torch.ones(T, dtype=torch.bool)
    keep[7] = False
    norm = x.float().norm(dim=-1)[:, :, keep]
    assert torch.allclose(hat.norm(dim=-1)[:, :, keep], norm, rtol=2e-3)  # r restores the norm


def test_strided_input() -> None:
    """x as the runtime passes it: a slice of a larger fp buffer (non-contiguous)."""
    buf = kv_like(2, 2, 50, 64, seed=3, dtype=torch.float16)
    x = buf[:, :, 4:36]
    assert not x.is_contiguous()
    fmt = KVFormat("nsep", 4)
    scale = calibrated_scale(x, 4)
    store = empty_store(fmt, "v", 2, 2, 64, torch.float16)
    quantize_into(x, fmt, "v", store, 32, scale=scale)
    check_against_formats(x, fmt, "v", 32, scale, store)


@pytest.mark.parametrize(("bits", "role"), [(4, "k"), (2, "v"), (4, "v"), (2, "k")])
def test_kivi(bits: int, role: str) -> None:
    fmt = KVFormat("kivi", bits, 32)
    x = kv_like(2, 2, 64, 64, seed=bits)
    store = empty_store(fmt, role, 2, 2, 64, torch.float32)
    quantize_into(x, fmt, role, store, 0)
    check_against_formats(x, fmt, role, 0, None, store)


def test_kivi_keys_at_offset() -> None:
    fmt = KVFormat("kivi", 4, 32)
    x = kv_like(1, 2, 32, 64, seed=5)
    store = empty_store(fmt, "k", 1, 2, 64, torch.float32)
    quantize_into(x, fmt, "k", store, 32)
    check_against_formats(x, fmt, "k", 32, None, store)


def test_fp16_store() -> None:
    x = kv_like(1, 2, 9, 64, seed=1, dtype=torch.bfloat16)
    store = empty_store(formats.FP16, "k", 1, 2, 64, torch.bfloat16)
    quantize_into(x, formats.FP16, "k", store, 3)
    assert torch.equal(store["data"][:, :, 3:12], x)
    assert store["data"][:, :, :3].isnan().all() and store["data"][:, :, 12:].isnan().all()


def test_torch_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton (plain CPU run) the same entry point writes formats.quantize's result."""
    monkeypatch.setattr(qmod, "backend_for", lambda t: "torch")
    x = kv_like(1, 2, 20, 64, seed=2)
    fmt = KVFormat("nsep", 4)
    scale = calibrated_scale(x, 4)
    store = empty_store(fmt, "k", 1, 2, 64, torch.float32)
    quantize_into(x, fmt, "k", store, 5, scale=scale)
    ref = formats.quantize(x, fmt, "k", scale)
    assert torch.equal(store["codes"][:, :, 5:25], ref["codes"])
    assert torch.equal(store["r"][:, :, 5:25], ref["r"])


def test_bad_input() -> None:
    fmt = KVFormat("nsep", 4)
    x = kv_like(1, 2, 8, 64, seed=0)
    store = empty_store(fmt, "k", 1, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="capacity"):
        quantize_into(x, fmt, "k", store, CAP - 4, scale=calibrated_scale(x, 4))
    with pytest.raises(ValueError, match="static scale"):
        quantize_into(x, fmt, "k", store, 0)
    with pytest.raises(ValueError, match="scale has shape"):
        quantize_into(x, fmt, "k", store, 0, scale=torch.ones(3, 64))
    with pytest.raises(ValueError, match="whole groups"):
        quantize_into(x, KVFormat("kivi", 4), "k", empty_store(KVFormat("kivi", 4), "k", 1, 2, 64, torch.float32), 0)
    with pytest.raises(ValueError, match="lacks"):
        quantize_into(x, fmt, "k", {"codes": store["codes"]}, 0, scale=calibrated_scale(x, 4))
    assert (store["codes"] == POISON_CODE).all(), "a rejected call must not write"
