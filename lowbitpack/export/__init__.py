"""Exporters: one module per target format, each `export_x(path, out, *, force, progress, ...) -> dict`.

`EXPORTERS[name](path, out, force=..., progress=..., **options)` runs one; modules are imported on first use
so that a missing optional dependency (bitsandbytes, gguf, ...) only matters for the format that needs it.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from ..errors import OptionError

Exporter = Callable[..., dict[str, Any]]

# format name -> (module under lowbitpack.export, function, fixed keyword arguments)
_TARGETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "hf": ("hf", "export_hf", {}),
    "bnb-nf4": ("bnb", "export_bnb", {"mode": "nf4"}),
    "bnb-int8": ("bnb", "export_bnb", {"mode": "int8"}),
    "bnb": ("bnb", "export_bnb", {"mode": "nf4"}),  # `merge --format bnb` means NF4
    "gptq": ("gptq", "export_gptq", {}),
    "compressed-tensors": ("compressed_tensors", "export_compressed_tensors", {}),
    "gguf": ("gguf", "export_gguf", {}),
}
# Names shown to users (the `bnb` alias is accepted but not listed).
EXPORT_FORMATS = ("hf", "bnb-nf4", "bnb-int8", "gptq", "compressed-tensors", "gguf")
_EXTRAS = {"bnb": "bnb", "gguf": "gguf", "compressed_tensors": "ct", "gptq": "gptq"}


def _load(fmt: str) -> Exporter:
    module, func, fixed = _TARGETS[fmt]
    modname = f"{__name__}.{module}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise OptionError(f"export format {fmt!r} is not available in this build (no module {modname})", None,
                              f"choose one of {', '.join(EXPORT_FORMATS)}") from None
        extra = _EXTRAS.get(module)
        raise OptionError(f"export format {fmt!r} needs the package {e.name!r}", None,
                          f"pip install 'lowbitpack[{extra}]'" if extra else f"pip install {e.name}") from None
    fn = getattr(mod, func)
    if not fixed:
        return fn

    def run(path, out, **kwargs):
        return fn(path, out, **fixed, **kwargs)
    run.__name__ = f"{func}_{fixed.get('mode', '')}"
    run.__doc__ = fn.__doc__
    # advertise the real options (minus the fixed ones) so api.export can validate them
    sig = inspect.signature(fn)
    run.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in fixed])
    return run


class _LazyExporters(dict):
    """`EXPORTERS[name]` imports the exporter module on first access."""

    def __missing__(self, fmt: str) -> Exporter:
        if fmt not in _TARGETS:
            raise OptionError(f"unknown export format {fmt!r}", None, f"choose one of {', '.join(EXPORT_FORMATS)}")
        fn = _load(fmt)
        self[fmt] = fn
        return fn

    def __contains__(self, fmt: object) -> bool:
        return fmt in _TARGETS

    def keys(self):  # type: ignore[override]
        return _TARGETS.keys()

    def __iter__(self):
        return iter(_TARGETS)

    def __len__(self) -> int:
        return len(_TARGETS)


EXPORTERS: dict[str, Exporter] = _LazyExporters()

__all__ = ["EXPORTERS", "EXPORT_FORMATS"]
