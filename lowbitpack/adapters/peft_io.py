"""Read and validate a PEFT adapter directory: adapter_config.json + adapter_model.safetensors, nothing pickled.

Refuses what cannot be trusted or merged, with one-line errors that name the file: symlinked or missing files,
pickled weights only, a header that does not describe the file, keys outside PEFT's `base_model.model.` naming,
path-like module names (`..`, `/`), and anything the adapter type does not recognise.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError
from ..io.checkpoint import load_safetensors_file
from ..io.hashing import sha256_file
from . import detect_type, get_kind
from .base import PREFIX, AdapterKind

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")  # dotted identifiers: no '..', '/', '\\'
MAX_CONFIG_BYTES = 4 * 1024 * 1024


@dataclass
class PeftAdapter:
    """A validated adapter: its config, its type and its tensors grouped per adapted module."""

    path: Path
    config: dict[str, Any]
    type: str
    modules: dict[str, dict[str, torch.Tensor]]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # file name -> {sha256, bytes}

    @property
    def kind(self) -> AdapterKind:
        return get_kind(self.type)

    def base_tensors(self) -> dict[str, str]:
        """module -> name of the base tensor its ΔW applies to."""
        return {m: self.kind.base_tensor(m) for m in self.modules}

    def delta_weight(self, module: str, base_shape: tuple[int, ...]) -> torch.Tensor:
        return self.kind.delta_weight(module, self.modules[module], base_shape, self.config)

    def check_against(self, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
        """Every adapted module must exist in the base with a fitting shape."""
        missing = [t for t in self.base_tensors().values() if t not in shapes]
        if missing:
            raise InputError(f"the adapter targets {len(missing)} tensor(s) the base does not have, e.g. "
                             f"{missing[0]}", where, "the adapter was trained on another model; pass its base")
        for module, parts in self.modules.items():
            self.kind.check_shapes(module, parts, tuple(shapes[self.kind.base_tensor(module)]), self.config,
                                   self.path)


def _regular_file(path: Path, what: str) -> Path:
    if path.is_symlink():
        raise InputError(f"{what} is a symbolic link; refusing to follow it", path,
                         "copy the real file into the adapter directory")
    if not path.is_file():
        raise InputError(f"missing {what}", path.parent, f"a PEFT adapter directory holds {path.name}")
    return path


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = _regular_file(path / ADAPTER_CONFIG, ADAPTER_CONFIG)
    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError("adapter config is implausibly large", cfg_path, "pass a PEFT adapter_config.json")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not valid JSON ({e.__class__.__name__})", cfg_path, "re-save the adapter with PEFT") from None
    if not isinstance(config, dict):
        raise InputError("adapter config is not a JSON object", cfg_path, "re-save the adapter with PEFT")
    return config


def read_tensors(path: Path, integer_ok: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors; all floating point except keys `integer_ok` accepts (e.g. QWHA's indices)."""
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists() and not weights.is_symlink():
        pickled = [p for p in PICKLED_WEIGHTS if (path / p).exists()]
        hint = (f"found only pickled {pickled[0]}; lowbitpack never unpickles: re-save with PEFT's "
                "save_pretrained (safetensors is its default)" if pickled else "save the adapter with PEFT")
        raise InputError(f"missing {ADAPTER_WEIGHTS}", path, hint)
    _regular_file(weights, ADAPTER_WEIGHTS)
    tensors = load_safetensors_file(weights)
    if not tensors:
        raise InputError("the adapter holds no tensors", weights, "re-save the adapter")
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise InputError(f"unexpected tensor key {key!r} (PEFT keys start with {PREFIX!r})", weights,
                             "save the adapter with PEFT's save_pretrained")
        module = key[len(PREFIX):]
        if not MODULE_NAME.match(module):
            raise InputError(f"malformed tensor key {key!r}", weights, "save the adapter with PEFT's save_pretrained")
        if not t.is_floating_point() and not (integer_ok is not None and integer_ok(key) and _is_integer(t)):
            raise InputError(f"tensor {key!r} is not floating point ({t.dtype})", weights, "re-save the adapter")
        if not torch.isfinite(t).all():
            raise InputError(f"tensor {key!r} holds NaN or Inf", weights, "the training diverged; re-train")
    return tensors


def _is_integer(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def read_peft_adapter(path: str | Path, *, with_hashes: bool = True) -> PeftAdapter:
    """Read and validate the PEFT adapter directory `path` (no base needed; see `check_against`)."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise InputError("the adapter directory is a symbolic link", path, "pass the real directory")
    if not path.is_dir():
        raise InputError("no such adapter directory", path, "pass a directory holding adapter_config.json")
    config = read_config(path)
    adapter_type = detect_type(config)
    kind = get_kind(adapter_type) if adapter_type in ("lora", "qalora", "qwha") else None
    if kind is None:
        raise InputError(f"unsupported adapter type peft_type={config.get('peft_type')!r}", path / ADAPTER_CONFIG,
                         "lowbitpack bundles LoRA, QA-LoRA and QWHA adapters")
    kind.check_config(config, path / ADAPTER_CONFIG)
    tensors = read_tensors(path, kind.integer_tensor)
    modules = kind.group_tensors(tensors, config, path / ADAPTER_WEIGHTS)
    if not modules:
        raise InputError("the adapter adapts no module", path / ADAPTER_WEIGHTS, "re-save the adapter")
    files = {}
    if with_hashes:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            files[name] = {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}
    return PeftAdapter(path=path, config=config, type=adapter_type, modules=modules, files=files)
