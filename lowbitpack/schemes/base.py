"""The scheme interface: a 2-D weight in, a `QuantizedTensor` out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..qtensor import QuantizedTensor


class Scheme(ABC):
    """A quantization method. Schemes needing calibration receive per-layer statistics."""

    name: str
    needs_calibration: bool = False

    @abstractmethod
    def quantize(self, weight: torch.Tensor, **calib: Any) -> QuantizedTensor:
        """Quantize a 2-D weight [out, in]. `calib` may hold e.g. `hessian` (GPTQ) or `act_stats`."""

    def config(self) -> dict[str, Any]:
        """Options that reproduce this scheme (recorded in the manifest)."""
        return {"scheme": self.name}
