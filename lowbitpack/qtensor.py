"""`QuantizedTensor`: stored tensors of one quantized weight plus the metadata to decode them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class QuantizedTensor:
    """One quantized weight: `tensors` are written to the artifact as `<name>.<key>`."""

    scheme: str                      # e.g. "int4", "nf4", "gptq3", "lowra", "qalora"
    layout: str                      # how `tensors` decode, e.g. "intg-v1" (see lowbitpack.layouts)
    bits: float                      # nominal bits per weight of the codes
    group_size: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype               # dtype of the original tensor
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)  # layout/scheme extras (JSON-serialisable)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bits_per_weight(self) -> float:
        """Storage cost including scales, zeros, codebooks: stored bits / original numel."""
        n = 1
        for s in self.shape:
            n *= s
        return 8.0 * self.stored_bytes() / max(n, 1)
