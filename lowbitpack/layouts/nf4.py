"""Layout `nf4-bnb-v1`: bitsandbytes' blockwise 4-bit format, byte for byte, with optional double quantization.

A weight of shape S with n = prod(S) elements is flattened row-major and cut into blocks of `blocksize`
elements (the last block may be shorter). Stored tensors:
  qweight           uint8 [(n+1)//2]    two 4-bit codes per byte, HIGH nibble = even element; for odd n the
                                        last low nibble is padding (bitsandbytes writes the code of 0.0)
  quant_map         f32   [16]          the code table (NF4 for scheme nf4; FP4 when imported from bnb fp4)
  absmax            f32   [n_blocks]    per-block scale                        (double_quant false)
                 or uint8 [n_blocks]    8-bit codes of (absmax - offset)       (double_quant true)
  nested_absmax     f32   [ceil(n_blocks/nested_blocksize)]   scale of each block of absmax codes
  nested_quant_map  f32   [256]         bitsandbytes' signed 8-bit dynamic map (create_dynamic_map())
params: quant_type ("nf4" | "fp4"), blocksize, double_quant, and with double quant nested_blocksize and
offset (the f32 mean of the absmax values, stored as the exact float).

Decoding (bitsandbytes' arithmetic, all f32, one rounding to the output dtype at the end):
  absmax[b] = nested_quant_map[absmax_code[b]] * nested_absmax[b // nested_blocksize] + offset
  w[i]      = quant_map[code[i]] * absmax[i // blocksize]
"""
from __future__ import annotations

from typing import Any

import torch

from ..qtensor import QuantizedTensor

LAYOUT = "nf4-bnb-v1"

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1] with an exact 0.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_ZERO_CODE = 7  # code of 0.0: bitsandbytes pads odd-length inputs with 0.0 before packing
NESTED_BLOCKSIZE = 256  # bitsandbytes hard-codes 256 for the absmax of 4-bit double quantization


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels, f32, ascending (index = code)."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map` (the 8-bit map of double quantization), same arithmetic, f32 [256]."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def pack_nibbles(codes: torch.Tensor, pad_code: int = NF4_ZERO_CODE) -> torch.Tensor:
    """uint8 codes [n] (values < 16) -> uint8 [(n+1)//2]: byte j = codes[2j] << 4 | codes[2j+1]."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), pad_code)])
    pairs = c.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [(n+1)//2] -> uint8 codes [n]."""
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)  # bnb allows other quant_storage dtypes; the bytes are the same
    if p.numel() != (n + 1) // 2:
        raise ValueError(f"packed 4-bit weight has {p.numel()} bytes, expected {(n + 1) // 2} for {n} elements")
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def blockwise_scale(codes_or_values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scale[i // blocksize] in f32 for a flat tensor whose last block may be short."""
    v = codes_or_values.reshape(-1)
    n = v.numel()
    nb = -(-n // blocksize)
    if scale.numel() != nb:
        raise ValueError(f"expected {nb} block scales for {n} elements in blocks of {blocksize}, got {scale.numel()}")
    pad = nb * blocksize - n
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    return (v.view(nb, blocksize) * scale.view(nb, 1).float()).reshape(-1)[:n]


def decode_absmax(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
    """Per-block f32 scales; undoes double quantization exactly as bitsandbytes does."""
    absmax = tensors["absmax"]
    if not params.get("double_quant", absmax.dtype == torch.uint8):
        return absmax.float().reshape(-1)
    nested_map = tensors["nested_quant_map"].float()
    values = nested_map[absmax.reshape(-1).long()]
    scaled = blockwise_scale(values, tensors["nested_absmax"].float(), int(params.get("nested_blocksize",
                                                                                       NESTED_BLOCKSIZE)))
    offset = torch.tensor(float(params["offset"]), dtype=torch.float32, device=scaled.device)
    return scaled + offset


def dequantize_nf4(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], params: dict[str, Any],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization: f32 products, one rounding to `dtype` (equals bnb's dequantize_4bit)."""
    n = 1
    for s in shape:
        n *= int(s)
    packed = tensors["qweight"].reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed 4-bit weight has {packed.numel()} bytes, expected {(n + 1) // 2} for {n} elements")
    quant_map = tensors["quant_map"].float()
    # One lookup per byte: pair_map[byte] = (value of the high nibble, value of the low nibble).
    byte = torch.arange(256, device=packed.device)
    pair_map = torch.stack([quant_map[byte >> 4], quant_map[byte & 0xF]], dim=1)
    values = pair_map[packed.long()].reshape(-1)[:n]
    absmax = decode_absmax(tensors, params)
    w = blockwise_scale(values, absmax, int(params["blocksize"]))
    return w.reshape(shape).to(dtype)


def dequantize_qt(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(qt.tensors, qt.shape, qt.params, dtype)
