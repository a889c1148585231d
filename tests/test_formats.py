"""formats.py: the nsep grids (midrise at 2 bits, symmetric otherwise) and their stored codes."""

import pytest
import torch

from kvcompile import formats
from kvcompile.formats import KVFormat


def _directions(H: int, T: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, H, T, d, generator=g)
    return x * torch.exp(torch.empty(2, H, T, 1).uniform_(-2.0, 2.0, generator=g))


def _p999(x: torch.Tensor) -> torch.Tensor:
    u = x / x.norm(dim=-1, keepdim=True)
    return u.abs().transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1]).quantile(0.999, dim=1)


def test_levels() -> None:
    assert formats.nsep_levels(2) == 3
    assert [formats.nsep_levels(b) for b in (3, 4, 8)] == [3, 7, 127]
    assert formats.nsep_midrise(2) and not any(formats.nsep_midrise(b) for b in (3, 4, 8))
    p = torch.full((2, 8), 0.6)
    assert torch.allclose(formats.nsep_scale(p, 2, 0.5), torch.full((2, 8), 0.1))  # top level 3 s = alpha * P
    assert torch.allclose(formats.nsep_scale(p, 4), torch.full((2, 8), 0.6 / 7))


def test_nsep2_midrise_grid_values() -> None:
    """u / s -> the nearest odd integer in [-3, 3]; stored code (q + 3) / 2; dequantized r * s * q."""
    v = torch.tensor([-5.0, -2.5, -1.2, -0.3, 0.0, 0.9, 2.2, 4.0])  # the wanted u / s
    want = torch.tensor([-3.0, -3.0, -1.0, -1.0, 1.0, 1.0, 3.0, 3.0])  # 0 (a tie) goes to +1
    x = (v * 0.1).reshape(1, 1, 1, 8)
    s = torch.full((1, 8), 0.1) / x.norm()  # u = x / ||x||, so u / s = v
    q, r = formats.nsep_quantize(x, s, 2)
    assert torch.equal(q.float().flatten(), want)
    assert torch.allclose(r, x.norm() / (q.float() * s).norm())
    qt = formats.quantize(x, KVFormat("nsep", 2), "k", s)
    codes = formats.unpack_codes(qt["codes"], 2).flatten()
    assert torch.equal(codes.long(), ((want + 3) / 2).long())
    assert torch.equal(formats.signed_codes(qt, KVFormat("nsep", 2)).flatten(), want)


def test_nsep2_round_trip_uses_every_code() -> None:
    x = _directions(3, 64, 128, seed=1)
    s = formats.nsep_scale(_p999(x), 2)
    fmt = KVFormat("nsep", 2)
    qt = formats.quantize(x, fmt, "v", s)
    codes = formats.unpack_codes(qt["codes"], 2)
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}
    q = formats.signed_codes(qt, fmt)
    assert set(q.unique().tolist()) == {-3.0, -1.0, 1.0, 3.0}
    # the dequantized values are exactly r * s * q on the levels +-s, +-3s
    hat = formats.dequantize(qt, fmt, "v", s)
    lev = hat / (qt["r"].float().unsqueeze(-1) * s[:, None, :])
    assert torch.allclose(lev, q, atol=1e-5)
    assert torch.allclose(hat.norm(dim=-1), x.norm(dim=-1), rtol=2e-3)  # norm kept (r in fp16)
    # fake quantization (fp32 r) and the stored form agree up to r's fp16 rounding
    fq = formats.fake_quantize(x, fmt, "v", s)
    assert ((fq - hat).norm() / x.norm()).item() < 1e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_wider_nsep_grid_unchanged(bits: int) -> None:
    """4 and 8 bits keep the symmetric grid {-qmax..qmax} and offset-binary storage q + 2^(b-1)."""
    x = _directions(2, 32, 64, seed=bits)
    s = formats.nsep_scale(_p999(x), bits)
    qmax = formats.qmax_of(bits)
    u = x / x.norm(dim=-1, keepdim=True)
    q, _ = formats.nsep_quantize(x, s, bits)
    assert torch.equal(q.float(), torch.round(u / s[:, None, :]).clamp(-qmax, qmax))
    qt = formats.quantize(x, KVFormat("nsep", bits), "k", s)
    assert torch.equal(formats.unpack_codes(qt["codes"], bits).long(), q.long() + (1 << (bits - 1)))


def test_int_token_2bit_stays_symmetric() -> None:
    x = _directions(2, 16, 64, seed=3)
    fmt = KVFormat("int-token", 2)
    qt = formats.quantize(x, fmt, "k")
    q = formats.signed_codes(qt, fmt)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (q == 0).any()


def test_nsep2_beats_the_three_level_grid() -> None:
    """On Gaussian directions (s from the 99.9th percentile, alpha 1) the 4-level grid has a lower MSE than the old
    3-level {-1, 0, +1} grid (s = P)."""
    x = _directions(2, 512, 128, seed=5)
    p = _p999(x)
    u = x / x.norm(dim=-1, keepdim=True)
    new = formats.fake_quantize(x, KVFormat("nsep", 2), "k", formats.nsep_scale(p, 2))
    sb = p.clamp_min(1e-6)[:, None, :]
    q = torch.round(u / sb).clamp(-1, 1)
    old = (x.norm(dim=-1) / (q * sb).norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1) * sb * q
    mse = lambda hat: ((hat - x) ** 2).sum() / (x**2).sum()  # noqa: E731
    assert mse(new) < 0.7 * mse(old)
