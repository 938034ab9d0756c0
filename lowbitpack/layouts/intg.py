"""Layout `intg-v1`: group-wise integer codes with per-group scale and zero (or float offset).

Stored tensors for a weight of shape [out, in], b bits, group size G, n_groups = ceil(in / G):
  qweight  uint8   [out, ceil(in*b/8)]  codes, dense LSB-first bit stream per row (layouts.bitpack)
  scale    f16/f32 [out, n_groups]
  zero     uint8   [out, n_groups]      integer zero point:  w = scale * (q - zero)
    or
  offset   f16/f32 [out, n_groups]      float offset:        w = scale * q + offset   (QA-LoRA)
  g_idx    int32   [in]  (optional)     group of each input column (GPTQ act-order); default j // G
The last group may be shorter than G when G does not divide `in`.
"""
from __future__ import annotations

import torch

from ..qtensor import QuantizedTensor
from .bitpack import pack_bits, unpack_bits

LAYOUT = "intg-v1"


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    return torch.arange(in_features, dtype=torch.int32, device=device) // group_size


def pack_intg(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [out, in] -> qweight uint8 [out, ceil(in*bits/8)]."""
    return pack_bits(codes, bits)


def unpack_intg(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return unpack_bits(qweight, bits, in_features)


def dequantize_intg(
    tensors: dict[str, torch.Tensor], shape: tuple[int, int], bits: int, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference dequantization (float32 arithmetic, one rounding to `dtype` at the end)."""
    out_f, in_f = shape
    q = unpack_intg(tensors["qweight"], bits, in_f).float()
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = default_g_idx(in_f, group_size, q.device)
    g_idx = g_idx.long()
    scale = tensors["scale"].float()[:, g_idx]
    if "offset" in tensors:
        w = q * scale + tensors["offset"].float()[:, g_idx]
    else:
        w = (q - tensors["zero"].float()[:, g_idx]) * scale
    return w.to(dtype)


def dequantize_qt(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_intg(qt.tensors, qt.shape, int(qt.bits), int(qt.group_size), dtype)
