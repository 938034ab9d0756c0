import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbitpack.layouts.bitpack import pack_bits, packed_row_bytes, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), n=st.integers(1, 97), seed=st.integers(0, 2**16))
def test_roundtrip_any_width(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int32).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_stream_is_lsb_first_little_endian():
    # 3-bit codes 1..8 (mod 8): bit stream value = sum(code_i << 3i)
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    value = sum(int(c) << (3 * i) for i, c in enumerate(codes[0].tolist()))
    expected = torch.tensor([[(value >> (8 * k)) & 0xFF for k in range(3)]], dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, 3), expected)
    # 4-bit: low nibble = even element (the opposite of bitsandbytes' NF4 order)
    assert pack_bits(torch.tensor([[0x1, 0xA]], dtype=torch.uint8), 4).item() == 0xA1


def test_padding_bits_are_zero():
    codes = torch.full((1, 5), 7, dtype=torch.uint8)  # 15 bits -> 2 bytes, last bit zero
    packed = pack_bits(codes, 3)
    assert packed[0, -1].item() >> 7 == 0


def test_wrong_length_rejected():
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, 3, dtype=torch.uint8), 3, 9)
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(1, 3, dtype=torch.uint8), 9)
