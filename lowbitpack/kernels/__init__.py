"""Dequantization dispatch: a CUDA kernel when one is built for the layout and the tensors are on a GPU,
else the pure-torch reference in lowbitpack.layouts (the ground truth)."""
from .dispatch import dequantize, last_path, reference, register_cuda

__all__ = ["dequantize", "last_path", "reference", "register_cuda"]
