"""Round-to-nearest asymmetric integer quantization, group-wise along the input dim (2/3/4/8 bits)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..layouts.bitpack import packed_row_bytes
from ..layouts.intg import LAYOUT, pack_intg
from ..qtensor import QuantizedTensor
from .base import Scheme

# Elements per block of rows in `IntRTN.quantize`: 1M elements keep each f32 temporary at 4 MB (the whole
# quantization of a 14336x4096 weight then needs ~30 MB beyond its input and output, not ~1.2 GB).
_CHUNK_ELEMENTS = 1 << 20


def group_min_max(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) min and max of a [out, in] float tensor; the last group may be short."""
    out_f, in_f = w.shape
    n_groups = math.ceil(in_f / group_size)
    pad = n_groups * group_size - in_f
    if pad:
        # Pad with the row's first element so padding never widens a group's range.
        w_pad = torch.cat([w, w[:, :1].expand(out_f, pad)], dim=1)
    else:
        w_pad = w
    g = w_pad.reshape(out_f, n_groups, group_size)
    if pad:
        # The short last group must only see its own columns.
        last = w[:, (n_groups - 1) * group_size:]
        mn, mx = g.amin(-1), g.amax(-1)
        mn[:, -1], mx[:, -1] = last.amin(-1), last.amax(-1)
        return mn, mx
    return g.amin(-1), g.amax(-1)


def rtn_scale_zero(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and integer zero so that [mn, mx] (widened to include 0) maps onto [0, 2^b-1]."""
    qmax = (1 << bits) - 1
    mn = torch.minimum(mn, torch.zeros_like(mn))
    mx = torch.maximum(mx, torch.zeros_like(mx))
    scale = (mx - mn) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    zero = torch.clamp(torch.round(-mn / scale), 0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """q = clamp(round(w / s) + z) with per-column group lookup; returns uint8 codes [out, in]."""
    qmax = (1 << bits) - 1
    s = scale[:, g_idx.long()]
    z = zero[:, g_idx.long()]
    return torch.clamp(torch.round(w / s) + z, 0, qmax).to(torch.uint8)


class IntRTN(Scheme):
    """`int2|int3|int4|int8`: asymmetric RTN with fp16 scales and uint8 zero points per group."""

    def __init__(self, bits: int, group_size: int = 128, scale_dtype: torch.dtype = torch.float16):
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"RTN supports 2, 3, 4 or 8 bits, got {bits}")
        if group_size < 1:
            raise ValueError(f"group size must be positive, got {group_size}")
        self.bits = bits
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        self.name = f"int{bits}"

    def quantize(self, weight: torch.Tensor, **calib: Any) -> QuantizedTensor:
        if weight.ndim != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        g = min(self.group_size, in_f)
        n_groups = math.ceil(in_f / g)
        dev = weight.device
        qweight = torch.empty(out_f, packed_row_bytes(in_f, self.bits), dtype=torch.uint8, device=dev)
        scale_out = torch.empty(out_f, n_groups, dtype=self.scale_dtype, device=dev)
        zero_out = torch.empty(out_f, n_groups, dtype=torch.uint8, device=dev)
        g_idx = torch.arange(in_f, device=dev) // g
        # Every step is row-wise, so quantizing a block of rows at a time gives the same bytes while the
        # f32 temporaries (a few times rows x in x 4 bytes) stay bounded instead of growing with the tensor.
        rows = max(1, _CHUNK_ELEMENTS // max(in_f, 1))
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            w = weight[r0:r1].float()
            mn, mx = group_min_max(w, g)
            scale, zero = rtn_scale_zero(mn, mx, self.bits)
            # Quantize against the scale as stored, so dequantization reproduces exactly what we rounded to.
            scale = scale.to(self.scale_dtype).float().clamp_min(2.0**-14)
            codes = quantize_codes(w, scale, zero, g_idx, self.bits)
            del w
            qweight[r0:r1] = pack_intg(codes, self.bits)
            scale_out[r0:r1] = scale.to(self.scale_dtype)
            zero_out[r0:r1] = zero.to(torch.uint8)
        return QuantizedTensor(
            scheme=self.name, layout=LAYOUT, bits=self.bits, group_size=g,
            shape=tuple(weight.shape), dtype=weight.dtype,
            tensors={"qweight": qweight, "scale": scale_out, "zero": zero_out},
        )

    def config(self) -> dict[str, Any]:
        return {"scheme": self.name, "bits": self.bits, "group_size": self.group_size}
