"""Property tests of the packed code layout (formats.pack_codes / unpack_codes), which the kernels rely on."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile import formats

_SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3)


@st.composite
def _codes(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    bits = draw(st.sampled_from(formats.PACKED_BITS))
    per = 8 // bits
    lead = draw(_SHAPES)
    d = per * draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (*lead, d), generator=g, dtype=torch.uint8), bits


@settings(max_examples=60, deadline=None)
@given(_codes())
def test_pack_unpack_round_trip(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    packed = formats.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], codes.shape[-1] * bits // 8)
    assert torch.equal(formats.unpack_codes(packed, bits), codes)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(formats.PACKED_BITS), _SHAPES, st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_unpack_pack_round_trip(bits: int, lead: list[int], m: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (*lead, m), generator=g, dtype=torch.uint8)
    assert torch.equal(formats.pack_codes(formats.unpack_codes(packed, bits), bits), packed)


@settings(max_examples=40, deadline=None)
@given(_codes())
def test_planar_layout(case: tuple[torch.Tensor, int]) -> None:
    """Byte j carries channels j, j+m, j+2m, ... at bit offsets 0, b, 2b, ... (what the kernels' slicing assumes)."""
    codes, bits = case
    packed = formats.pack_codes(codes, bits).long()
    m = packed.shape[-1]
    for i in range(8 // bits):
        got = (packed >> (i * bits)) & ((1 << bits) - 1)
        assert torch.equal(got, codes[..., i * m:(i + 1) * m].long())
