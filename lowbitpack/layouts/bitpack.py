"""Dense little-endian bit streams for codes of 1..8 bits.

Codes along the last dimension are laid out as one continuous bit stream, LSB-first: code i occupies
bits [i*b, (i+1)*b) of the row, bit j of the stream is bit (j % 8) of byte j // 8. 3-bit codes therefore
straddle bytes (8 codes per 3 bytes) rather than wasting a bit. Every row starts on a byte boundary and
its last byte is zero-padded, so a row of n codes takes ceil(n*b/8) bytes.
"""
from __future__ import annotations

import torch


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one row of `n` codes of `bits` bits takes."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8 (see module doc)."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        codes = codes.to(torch.uint8)
    *lead, n = codes.shape
    if bits == 8:
        return codes.clone()
    if bits in (1, 2, 4):
        # Byte-aligned: 8/bits codes per byte; pad n up to a multiple of that.
        per = 8 // bits
        pad = (-n) % per
        c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        c = c.reshape(*lead, -1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # General case (3, 5, 6, 7 bits): 8 codes fill exactly `bits` bytes.
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    c = c.reshape(*lead, -1, 8).to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1)  # up to 56 bits per 8 codes
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)
    out = out.reshape(*lead, -1)
    return out[..., : packed_row_bytes(n, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 [..., ceil(n*bits/8)] -> uint8 codes [..., n]."""
    _check_bits(bits)
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(f"packed row has {nbytes} bytes, expected {packed_row_bytes(n, bits)} for n={n}, bits={bits}")
    if bits == 8:
        return packed.clone()
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, -1)[..., :n].to(torch.uint8).contiguous()
    pad = (-nbytes) % bits
    p = torch.nn.functional.pad(packed, (0, pad)) if pad else packed
    p = p.reshape(*lead, -1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (p << byte_shifts).sum(-1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8).contiguous()
