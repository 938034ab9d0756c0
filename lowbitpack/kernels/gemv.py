"""`lowbit_matmul(x, qt)`: y = x @ W^T for a packed weight, fused on the GPU for decode-sized x.

Paths, and the name `last_gemv_path()` records for each layout:
  "cuda-fused"            x on CUDA, bf16/fp16, at most 8 rows, a fused kernel exists for the layout (and
                          takes this tensor): one kernel reads the packed weight once, dequantizes in
                          registers and multiplies on the tensor cores.
  "dequant+matmul:cuda"   otherwise: dense weight via `dispatch.dequantize` (CUDA dequant kernel), then
  "dequant+matmul:torch"  torch.nn.functional.linear (via the pure-torch reference).

Both paths compute the same function: each weight is dequantized in fp32 exactly like the layout's
reference and rounded once to x's dtype; products are exact and summed in fp32. Only the order of the
fp32 sums differs, so results agree to fp32 accumulation error before the final rounding.
"""
from __future__ import annotations

import os

import torch

from ..qtensor import QuantizedTensor
from . import cuda_ext
from .dispatch import dequantize, last_path, reference

_last_gemv_path: dict[str, str] = {}


def last_gemv_path() -> dict[str, str]:
    """Which path `lowbit_matmul` took last, per layout (see module doc)."""
    return dict(_last_gemv_path)


def _fused(x2d: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor | None:
    if not x2d.is_cuda or x2d.dtype not in (torch.bfloat16, torch.float16):
        return None
    if not 1 <= x2d.shape[0] <= cuda_ext.MAX_GEMV_ROWS or os.environ.get("LOWBITPACK_DISABLE_CUDA") == "1":
        return None
    if any(t.device != x2d.device for t in qt.tensors.values()):
        return None
    fn = cuda_ext.gemv_for(qt.layout)
    return None if fn is None else fn(x2d, qt)


def lowbit_matmul(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) -> [..., out] in x's dtype, W the dequantized `qt` [out, in]."""
    if len(qt.shape) != 2:
        raise ValueError(f"lowbit_matmul needs a 2-D weight, got shape {tuple(qt.shape)}")
    out_f, in_f = int(qt.shape[0]), int(qt.shape[1])
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_f}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_f).contiguous()
    y = _fused(x2d, qt)
    if y is not None:
        _last_gemv_path[qt.layout] = "cuda-fused"
    else:
        w = dequantize(qt, x.dtype)
        _last_gemv_path[qt.layout] = f"dequant+matmul:{last_path().get(qt.layout, 'torch')}"
        y = torch.nn.functional.linear(x2d, w)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_f)


def matmul_reference(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch reference of `lowbit_matmul`: reference dequantization to x's dtype, then linear."""
    w = reference(qt.layout)(qt, x.dtype).to(x.device)
    y = torch.nn.functional.linear(x, w)
    return y if bias is None else y + bias
