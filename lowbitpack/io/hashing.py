"""sha256 of files (streamed) and of tensors (their raw bytes in native dtype, C order)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def sha256_tensor(t: torch.Tensor) -> str:
    """Hash of a tensor's bytes: equal to the sha256 of its data block in a safetensors file."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()
