"""Quantization schemes, one module each. `make_scheme` builds one from CLI/API options."""
from __future__ import annotations

from typing import Any

from .base import Scheme

SCHEMES = ("nf4", "int8", "int4", "int3", "int2", "gptq4", "gptq3", "gptq2", "lowra", "qalora")


def make_scheme(name: str, *, group_size: int | None = None, bits: float | None = None, **opts: Any) -> Scheme:
    """Scheme object for a CLI name. `bits` is the LowRA budget or the QA-LoRA bit width."""
    if name in ("int8", "int4", "int3", "int2"):
        from .rtn import IntRTN
        return IntRTN(int(name[3:]), group_size or 128)
    if name == "nf4":
        from .nf4 import NF4
        return NF4(blocksize=group_size or 64, **opts)
    if name in ("gptq4", "gptq3", "gptq2"):
        from .gptq import GPTQ
        return GPTQ(int(name[4:]), group_size or 128, **opts)
    if name == "qalora":
        from .qalora import QALoRAGroups
        return QALoRAGroups(int(bits or 4), group_size or 32, **opts)
    if name == "lowra":
        from .lowra import LowRA
        return LowRA(float(bits or 2.0), **opts)
    raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")


__all__ = ["SCHEMES", "Scheme", "make_scheme"]
