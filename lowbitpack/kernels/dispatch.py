"""One op, several backends (the bitsandbytes pattern): `dequantize(qt)` picks CUDA or the torch reference."""
from __future__ import annotations

import os
from typing import Callable

import torch

import importlib

from ..qtensor import QuantizedTensor

Dequantizer = Callable[[QuantizedTensor, torch.dtype], torch.Tensor]

# Each layout module defines `LAYOUT` and `dequantize_qt(qt, dtype)`, its pure-torch reference.
_LAYOUT_MODULES = {
    "intg-v1": "lowbitpack.layouts.intg",
    "nf4-bnb-v1": "lowbitpack.layouts.nf4",
    "lowra-v1": "lowbitpack.layouts.lowra",
}
_REFERENCE: dict[str, Dequantizer] = {}
_CUDA: dict[str, Dequantizer] = {}
_last_path: dict[str, str] = {}


def register_reference(layout: str, fn: Dequantizer) -> None:
    _REFERENCE[layout] = fn


def register_cuda(layout: str, fn: Dequantizer) -> None:
    _CUDA[layout] = fn


def last_path() -> dict[str, str]:
    """Which backend ran last for each layout ("cuda" or "torch"): lets callers and tests say which path ran."""
    return dict(_last_path)


_cuda_autoload_done = False


def _autoload_cuda() -> None:
    """First CUDA dequantize: build/load the extension (lowbitpack.kernels.cuda_ext) and register its kernels.
    Without a GPU, nvcc or a working build this registers nothing; cuda_ext.status() says why."""
    global _cuda_autoload_done
    if _cuda_autoload_done:
        return
    _cuda_autoload_done = True
    try:
        from . import cuda_ext
        cuda_ext.register()
    except Exception:  # the reference path must keep working whatever the toolchain does
        pass


def _on_cuda(qt: QuantizedTensor) -> bool:
    return any(t.is_cuda for t in qt.tensors.values())


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of `qt` in `dtype` (default: the original dtype), on the device of its tensors."""
    dtype = dtype or qt.dtype
    if _on_cuda(qt) and os.environ.get("LOWBITPACK_DISABLE_CUDA") != "1":
        _autoload_cuda()
    if _on_cuda(qt) and qt.layout in _CUDA and os.environ.get("LOWBITPACK_DISABLE_CUDA") != "1":
        out = _CUDA[qt.layout](qt, dtype)
        if out is not None:  # a CUDA dequantizer returns None for a tensor it cannot take
            _last_path[qt.layout] = "cuda"
            return out
    fn = reference(qt.layout)
    _last_path[qt.layout] = "torch"
    return fn(qt, dtype)


def reference(layout: str) -> Dequantizer:
    """The pure-torch dequantizer of `layout`."""
    if layout not in _REFERENCE:
        if layout not in _LAYOUT_MODULES:
            raise ValueError(f"no dequantizer for layout {layout!r}; known: {sorted(_LAYOUT_MODULES)}")
        _REFERENCE[layout] = importlib.import_module(_LAYOUT_MODULES[layout]).dequantize_qt
    return _REFERENCE[layout]
