"""Read a Hugging Face checkpoint lazily, one shard at a time, with safetensors only (never unpickle)."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from ..errors import InputError

# Files copied verbatim from a source checkpoint into artifacts and exports.
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "lowbitpack_source.json",
)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a bigger header is a "header bomb"


def validate_safetensors_file(path: Path) -> dict:
    """Check header length, JSON and data offsets against the file size; return the header.

    Catches truncated, garbage and header-bomb files before safetensors mmaps them.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError("not a safetensors file (shorter than 8 bytes)", path, "re-download or re-export it")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"corrupt safetensors header (declares {n} header bytes, file has {size})",
                                 path, "the file is truncated or not safetensors; re-download it")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"corrupt safetensors header ({e.__class__.__name__})", path, "re-download it") from None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror})", path, "check the path and permissions") from None
    if not isinstance(header, dict):
        raise InputError("corrupt safetensors header (not a JSON object)", path, "re-download it")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise InputError(f"corrupt safetensors header entry {name!r}", path, "re-download it") from None
        if not (0 <= start <= end <= data_len):
            raise InputError(f"tensor {name!r} lies past the end of the file (truncated?)", path, "re-download it")
    return header


@dataclass
class SourceCheckpoint:
    """A local HF model directory with safetensors weights."""

    path: Path
    shards: list[str]               # file names relative to `path`, in index order
    weight_map: dict[str, str]      # tensor name -> shard file name
    config: dict

    @classmethod
    def open(cls, src: str | Path) -> "SourceCheckpoint":
        path = resolve_model_path(src)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise InputError("no config.json: not a Hugging Face model directory", path,
                             "point at the folder that holds config.json and *.safetensors")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"config.json is not valid JSON ({e})", cfg_path, "fix or re-download it") from None
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (KeyError, ValueError, UnicodeDecodeError):
                raise InputError("index has no valid weight_map", index, "re-download the checkpoint") from None
            shards = list(dict.fromkeys(weight_map.values()))
            for s in shards:
                if "/" in s or "\\" in s or s.startswith("."):
                    raise InputError(f"index names a shard outside the model dir: {s!r}", index, "fix the index")
                if not (path / s).is_file():
                    raise InputError(f"index names missing shard {s}", index, "re-download the missing shard")
        else:
            shards = sorted(p.name for p in path.glob("*.safetensors"))
            if not shards:
                pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
                hint = ("only pickled weights found; lowbitpack never unpickles: convert them to safetensors first"
                        if pickled else "expected model.safetensors or sharded *.safetensors with an index")
                raise InputError("no safetensors weights", path, hint)
            weight_map = {}
        headers = {s: validate_safetensors_file(path / s) for s in shards}
        if not weight_map:
            for s, h in headers.items():
                for name in h:
                    if name != "__metadata__":
                        weight_map[name] = s
        return cls(path=path, shards=shards, weight_map=weight_map, config=config)

    def iter_shard(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of one shard, one tensor at a time (mmap'd, copied on read)."""
        file = self.path / shard
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except InputError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise InputError(f"cannot read tensors ({e.__class__.__name__}: {e})", file,
                             "the file is corrupt or truncated; re-download it") from None

    def tensor_infos(self) -> dict[str, dict]:
        """name -> {dtype, shape, shard} from the headers, without reading data."""
        out = {}
        for s in self.shards:
            for name, info in validate_safetensors_file(self.path / s).items():
                if name != "__metadata__":
                    out[name] = {"dtype": info["dtype"], "shape": info["shape"], "shard": s}
        return out

    def source_identity(self) -> dict:
        """Model id and revision: from lowbitpack_source.json, the Hub cache path, or the config."""
        ident = {"model_id": self.config.get("_name_or_path") or self.path.name, "revision": None}
        marker = self.path / "lowbitpack_source.json"
        if marker.is_file():
            ident.update(json.loads(marker.read_text(encoding="utf-8")))
        parts = self.path.resolve().parts
        if "snapshots" in parts:  # huggingface-hub cache: models--org--name/snapshots/<revision>
            i = parts.index("snapshots")
            if i >= 1 and parts[i - 1].startswith("models--") and i + 1 < len(parts):
                ident["model_id"] = parts[i - 1][len("models--"):].replace("--", "/")
                ident["revision"] = parts[i + 1]
        return ident


def resolve_model_path(src: str | Path) -> Path:
    """A local directory as is; otherwise a Hub id resolved through huggingface-hub's cache."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError("expected a model directory, got a file", p, "pass the folder holding config.json")
        return p
    if str(src).count("/") == 1 and not str(src).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                      "*.txt", "*.jinja"]))
        except Exception as e:
            raise InputError(f"not a local directory and not downloadable from the Hub ({e.__class__.__name__})",
                             src, "check the repo id, your network or HF_HUB_OFFLINE, or pass a local path") from None
    raise InputError("no such directory", p, "check the path")


def load_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a whole (small) safetensors file after validating it, e.g. an adapter."""
    path = Path(path)
    validate_safetensors_file(path)
    try:
        from safetensors.torch import load_file
        return load_file(str(path))
    except Exception as e:
        raise InputError(f"cannot read tensors ({e.__class__.__name__})", path, "the file is corrupt; re-create it") from None


class TensorReader:
    """Tensors of a checkpoint by name, for readers that jump between shards (the importers): one safetensors
    handle kept open per shard, a corrupt shard reported with its path."""

    def __init__(self, ckpt: "SourceCheckpoint"):
        self.ckpt = ckpt
        self.handles: dict[str, Any] = {}

    def __call__(self, name: str) -> torch.Tensor:
        shard = self.ckpt.weight_map[name]
        if shard not in self.handles:
            try:
                self.handles[shard] = safe_open(str(self.ckpt.path / shard), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' own error types
                raise InputError(f"cannot read tensors ({e.__class__.__name__})", self.ckpt.path / shard,
                                 "the file is corrupt or truncated; re-download it") from None
        return self.handles[shard].get_tensor(name)
