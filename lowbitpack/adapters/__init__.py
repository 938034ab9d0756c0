"""Adapters that bundles carry and merges apply: reading PEFT adapter dirs and each adapter type's ΔW math.

An adapter *type* is a module `lowbitpack.adapters.<type>` that exposes `KIND`, an `AdapterKind` (see
`base.py`): it parses the adapter's tensors into per-module groups, checks them against the base's shapes and
computes ΔW. `lora` lives here; `qalora` and `qwha` are added as their own modules with no change elsewhere.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import OptionError
from .base import AdapterKind

# adapter type -> module under lowbitpack.adapters (imported on first use)
ADAPTER_TYPES: dict[str, str] = {"lora": "lora", "qalora": "qalora", "qwha": "qwha"}
_KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: AdapterKind) -> None:
    """Make an adapter type known at run time (tests, plug-ins); modules in ADAPTER_TYPES need not call it."""
    _KINDS[kind.name] = kind
    ADAPTER_TYPES.setdefault(kind.name, kind.name)


def get_kind(name: str) -> AdapterKind:
    """The `AdapterKind` of adapter type `name`; a clear error when this build does not have it."""
    if name in _KINDS:
        return _KINDS[name]
    if name not in ADAPTER_TYPES:
        raise OptionError(f"unknown adapter type {name!r}", None, f"known types: {', '.join(ADAPTER_TYPES)}")
    modname = f"{__name__}.{ADAPTER_TYPES[name]}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise OptionError(f"adapter type {name!r} is not supported by this lowbitpack build", None,
                              "upgrade lowbitpack, or use a LoRA adapter") from None
        raise
    _KINDS[name] = mod.KIND
    return mod.KIND


def detect_type(config: dict[str, Any]) -> str:
    """Adapter type from a PEFT adapter_config.json: LoRA, QA-LoRA (LoRA + use_qalora) or QWHA."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        return "qalora" if config.get("use_qalora") else "lora"
    if peft_type == "QWHA":
        return "qwha"
    return peft_type.lower() or "unknown"


__all__ = ["ADAPTER_TYPES", "AdapterKind", "detect_type", "get_kind", "register_kind"]
