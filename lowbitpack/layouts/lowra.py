"""Layout `lowra-v1`: per output channel (row) bit width b ∈ {1, 2, 4}, a per-row fp16 codebook of 2^b values.

Rows are grouped by width so that each width class is a dense matrix a kernel decodes with one uniform
code width (no per-row branching inside a warp); `row_bits` says where every row goes.
Stored tensors for a weight of shape [out, in] (spec: formats/artifact-v1.md, "LowRA layout lowra-v1"):

  row_bits    uint8   [out]                      width of each row: 1, 2 or 4
  codes{b}    uint8   [n_b, ceil(in*b/8)]        for b in 1, 2, 4: codes of the rows with width b, in
                                                 ascending original row order, each row a dense LSB-first
                                                 bit stream (layouts.bitpack), last byte zero-padded
  codebook{b} float16 [n_b, 2^b]                 the codebook of those rows, same order

All six class tensors are always present (n_b may be 0). With rows_b = the ascending indices r where
row_bits[r] == b, row rows_b[i] decodes as  W[rows_b[i], j] = codebook{b}[i, codes{b}[i, j]].
Stored bits of a row of width b: 8*ceil(in*b/8) (codes) + 16*2^b (codebook) + 8 (row_bits), exactly —
the LowRA budget counts this (lowbitpack.schemes.lowra.row_cost_bits).
"""
from __future__ import annotations

import torch

from ..qtensor import QuantizedTensor
from .bitpack import pack_bits, packed_row_bytes, unpack_bits

LAYOUT = "lowra-v1"
WIDTHS = (1, 2, 4)


def class_rows(row_bits: torch.Tensor, bits: int) -> torch.Tensor:
    """rows_b: ascending original row indices (int64) of the rows stored with width `bits`."""
    return torch.nonzero(row_bits.to(torch.int64) == bits, as_tuple=False).flatten()


def pack_lowra(row_bits: torch.Tensor, codes: torch.Tensor,
               codebooks: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build the stored tensors.

    row_bits int [out] in {1,2,4}; codes int [out, in] with codes[r] < 2^row_bits[r];
    codebooks {b: float16 [n_b, 2^b]} for the rows of width b in ascending row order.
    """
    if codes.ndim != 2 or row_bits.shape != (codes.shape[0],):
        raise ValueError(f"codes must be [out, in] and row_bits [out]; got {tuple(codes.shape)} and "
                         f"{tuple(row_bits.shape)}")
    bad = ~torch.isin(row_bits.to(torch.int64), torch.tensor(WIDTHS, device=row_bits.device))
    if bad.any():
        raise ValueError(f"row widths must be 1, 2 or 4; row {int(bad.nonzero()[0])} has {int(row_bits[bad][0])}")
    in_f = codes.shape[1]
    out: dict[str, torch.Tensor] = {"row_bits": row_bits.to(torch.uint8).contiguous()}
    for b in WIDTHS:
        rows = class_rows(row_bits, b)
        cb = codebooks.get(b)
        if cb is None:
            cb = torch.zeros(0, 1 << b, dtype=torch.float16, device=codes.device)
        if tuple(cb.shape) != (len(rows), 1 << b):
            raise ValueError(f"codebook{b} must be [{len(rows)}, {1 << b}], got {tuple(cb.shape)}")
        c = codes[rows]
        if c.numel() and int(c.max()) >= (1 << b):
            raise ValueError(f"a {b}-bit row holds a code >= {1 << b}")
        if len(rows):
            out[f"codes{b}"] = pack_bits(c.to(torch.uint8), b)
        else:
            out[f"codes{b}"] = torch.zeros(0, packed_row_bytes(in_f, b), dtype=torch.uint8, device=codes.device)
        out[f"codebook{b}"] = cb.to(torch.float16).contiguous()
    return out


def unpack_lowra_codes(tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """Codes of every row in original order, uint8 [out, in] (inverse of `pack_lowra` for the codes)."""
    row_bits = tensors["row_bits"]
    out = torch.zeros(row_bits.shape[0], in_features, dtype=torch.uint8, device=row_bits.device)
    for b in WIDTHS:
        rows = class_rows(row_bits, b)
        if len(rows):
            out[rows] = unpack_bits(tensors[f"codes{b}"], b, in_features)
    return out


def check_lowra(tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> None:
    """Shapes and dtypes against the spec; raises ValueError naming the offending tensor."""
    out_f, in_f = shape
    rb = tensors.get("row_bits")
    if rb is None or rb.dtype != torch.uint8 or tuple(rb.shape) != (out_f,):
        raise ValueError(f"row_bits must be uint8 [{out_f}]")
    for b in WIDTHS:
        n_b = int((rb == b).sum())
        cd, cb = tensors.get(f"codes{b}"), tensors.get(f"codebook{b}")
        if cd is None or cd.dtype != torch.uint8 or tuple(cd.shape) != (n_b, packed_row_bytes(in_f, b)):
            raise ValueError(f"codes{b} must be uint8 [{n_b}, {packed_row_bytes(in_f, b)}]")
        if cb is None or cb.dtype != torch.float16 or tuple(cb.shape) != (n_b, 1 << b):
            raise ValueError(f"codebook{b} must be float16 [{n_b}, {1 << b}]")
    if int(sum(int((rb == b).sum()) for b in WIDTHS)) != out_f:
        raise ValueError("row_bits holds values other than 1, 2, 4")


def dequantize_lowra(tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference decode: a table lookup per row (the fp16 codebook value, one rounding to `dtype`)."""
    out_f, in_f = shape
    check_lowra(tensors, shape)
    row_bits = tensors["row_bits"]
    w = torch.empty(out_f, in_f, dtype=torch.float32, device=row_bits.device)
    for b in WIDTHS:
        rows = class_rows(row_bits, b)
        if not len(rows):
            continue
        codes = unpack_bits(tensors[f"codes{b}"], b, in_f).long()
        w[rows] = torch.gather(tensors[f"codebook{b}"].float(), 1, codes)
    return w.to(dtype)


def dequantize_qt(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_lowra(qt.tensors, tuple(qt.shape), dtype)
