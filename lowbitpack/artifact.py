"""Packed artifact, format v1 (spec: formats/artifact-v1.md): manifest read/write and validation.

An artifact is a directory:
  lowbitpack.json                        the manifest
  packed[-0000i-of-0000N].safetensors    stored tensors (packed codes, scales, kept tensors)
  packed.safetensors.index.json          stored tensor name -> shard
  config.json, tokenizer files ...       copied from the source
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from .errors import FormatVersionError, InputError, IntegrityError
from .io.checkpoint import SIDECAR_FILES, validate_safetensors_file
from .io.hashing import sha256_file
from .io.writer import ShardWriter
from .qtensor import QuantizedTensor
from .version import __version__

MANIFEST = "lowbitpack.json"
FORMAT = "lowbitpack-artifact"
FORMAT_VERSION = 1
SHARD_PREFIX = "packed"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
           "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


class ArtifactWriter:
    """Streams quantized and kept tensors into shards and writes the manifest last."""

    def __init__(self, directory: Path, source: dict[str, Any], quantization: dict[str, Any],
                 max_shard_bytes: int = 2 * 1024**3):
        self.dir = Path(directory)
        self.source = source
        self.quantization = quantization
        self.writer = ShardWriter(self.dir, SHARD_PREFIX, max_shard_bytes)
        self.tensors: dict[str, dict[str, Any]] = {}
        self.files: dict[str, str] = {}  # copied sidecar file -> sha256
        self.source_bytes = 0

    def add_quantized(self, name: str, qt: QuantizedTensor, sha256: str) -> None:
        stored = {}
        for key, t in qt.tensors.items():
            stored[key] = f"{name}.{key}"
            self.writer.add(stored[key], t)
        self.tensors[name] = {
            "scheme": qt.scheme, "layout": qt.layout, "bits": qt.bits, "group_size": qt.group_size,
            "shape": list(qt.shape), "dtype": dtype_name(qt.dtype), "stored": stored, "sha256": sha256,
            "params": qt.params,
        }
        self.source_bytes += _numel(qt.shape) * qt.dtype.itemsize

    def add_kept(self, name: str, tensor: torch.Tensor, sha256: str) -> None:
        self.writer.add(name, tensor)
        self.tensors[name] = {
            "scheme": "none", "layout": "dense", "bits": 8 * tensor.element_size(), "group_size": None,
            "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "stored": {"weight": name},
            "sha256": sha256, "params": {},
        }
        self.source_bytes += tensor.numel() * tensor.element_size()

    def copy_sidecars(self, src_dir: Path) -> None:
        for f in SIDECAR_FILES:
            if (src_dir / f).is_file():
                shutil.copy2(src_dir / f, self.dir / f)
                self.files[f] = ""  # hashed in finish(): callers may still rewrite e.g. config.json

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        shards = self.writer.finish()
        self.files = {f: sha256_file(self.dir / f) for f in self.files}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "producer": {"name": "lowbitpack", "version": __version__},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": self.source,
            "quantization": self.quantization,
            "shards": shards,
            "files": self.files,
            "summary": summarize(self.tensors, shards),
            "tensors": self.tensors,
        }
        if extra:
            manifest.update(extra)
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))
        return manifest


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def summarize(tensors: dict[str, dict], shards: dict[str, dict]) -> dict[str, Any]:
    """Totals over the artifact; average bits count everything stored for quantized tensors (scales too)."""
    q_params = sum(_numel(r["shape"]) for r in tensors.values() if r["scheme"] != "none")
    all_params = sum(_numel(r["shape"]) for r in tensors.values())
    src_bytes = sum(_numel(r["shape"]) * dtype_from_name(r["dtype"]).itemsize for r in tensors.values())
    stored = sum(s["bytes"] for s in shards.values())
    return {"params_total": all_params, "params_quantized": q_params, "source_bytes": src_bytes,
            "stored_bytes": stored}


@dataclass
class Artifact:
    """An opened artifact; tensors are read lazily from the shards."""

    path: Path
    manifest: dict[str, Any]
    weight_map: dict[str, str]

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "Artifact":
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise InputError(f"no {MANIFEST}: not a lowbitpack artifact", path,
                             "run `lowbitpack quantize` to create one, or pass the artifact directory")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"manifest is not valid JSON ({e.__class__.__name__})", mpath,
                             "the artifact is damaged; re-create it") from None
        validate_manifest(manifest, mpath)
        weight_map: dict[str, str] = {}
        for shard in manifest["shards"]:
            f = path / shard
            if not f.is_file():
                raise InputError(f"missing shard {shard}", path, "the artifact is incomplete; re-create it")
            for name in validate_safetensors_file(f):
                if name != "__metadata__":
                    weight_map[name] = shard
        art = cls(path=path, manifest=manifest, weight_map=weight_map)
        if verify:
            art.verify()
        return art

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tensors"]

    def verify(self) -> None:
        """Check every shard against the sha256 in the manifest."""
        for shard, info in self.manifest["shards"].items():
            got = sha256_file(self.path / shard)
            if got != info["sha256"]:
                raise IntegrityError(f"sha256 mismatch (manifest {info['sha256'][:12]}…, file {got[:12]}…)",
                                     self.path / shard, "the file was modified or corrupted; re-create the artifact")
        for name, digest in self.manifest.get("files", {}).items():
            f = self.path / name
            if not f.is_file() or sha256_file(f) != digest:
                raise IntegrityError("missing or modified (sha256 differs from the manifest)", f,
                                     "restore the file or re-create the artifact")

    def _read(self, stored_names: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[str, list[str]] = {}
        for n in stored_names:
            if n not in self.weight_map:
                raise InputError(f"stored tensor {n} is missing from the shards", self.path,
                                 "the artifact is damaged; re-create it")
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, names in by_shard.items():
            with safe_open(str(self.path / shard), framework="pt") as f:
                for n in names:
                    out[n] = f.get_tensor(n)
        return out

    def quantized_tensor(self, name: str) -> QuantizedTensor:
        rec = self.tensors[name]
        raw = self._read(list(rec["stored"].values()))
        return QuantizedTensor(
            scheme=rec["scheme"], layout=rec["layout"], bits=rec["bits"], group_size=rec["group_size"],
            shape=tuple(rec["shape"]), dtype=dtype_from_name(rec["dtype"]),
            tensors={k: raw[v] for k, v in rec["stored"].items()}, params=rec.get("params", {}),
        )

    def is_quantized(self, name: str) -> bool:
        return self.tensors[name]["scheme"] != "none"

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as the model uses it: kept tensors as stored, quantized ones dequantized."""
        from .kernels import dequantize
        rec = self.tensors[name]
        if rec["scheme"] == "none":
            t = self._read([rec["stored"]["weight"]])[rec["stored"]["weight"]]
            return t.to(dtype) if dtype is not None else t
        return dequantize(self.quantized_tensor(name), dtype)

    def iter_dense(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.dense(name, dtype)

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))


def validate_manifest(m: Any, where: Path) -> None:
    """Structural checks at the boundary; deeper code trusts a validated manifest."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} manifest", where, "pass a directory written by `lowbitpack quantize`")
    v = m.get("format_version")
    if not isinstance(v, int):
        raise InputError("manifest has no integer format_version", where, "the artifact is damaged; re-create it")
    if v > FORMAT_VERSION:
        raise FormatVersionError(f"format_version {v} is newer than this lowbitpack reads ({FORMAT_VERSION})",
                                 where, "upgrade lowbitpack: pip install -U lowbitpack")
    for key, typ in (("tensors", dict), ("shards", dict), ("source", dict), ("quantization", dict)):
        if not isinstance(m.get(key), typ):
            raise InputError(f"manifest field {key!r} is missing or not a {typ.__name__}", where,
                             "the artifact is damaged; re-create it")
    for shard in m["shards"]:
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise InputError(f"manifest names a shard outside the artifact: {shard!r}", where, "re-create it")
        info = m["shards"][shard]
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise InputError(f"shard record {shard!r} has no sha256", where, "the artifact is damaged; re-create it")
    files = m.get("files", {})
    if not isinstance(files, dict):
        raise InputError("manifest field 'files' is not an object", where, "the artifact is damaged; re-create it")
    for name, digest in files.items():
        if "/" in name or "\\" in name or name.startswith(".") or not isinstance(digest, str):
            raise InputError(f"malformed file record {name!r}", where, "the artifact is damaged; re-create it")
    for name, rec in m["tensors"].items():
        if not isinstance(rec, dict):
            raise InputError(f"tensor record {name!r} is not an object", where, "re-create the artifact")
        for key in ("scheme", "layout", "shape", "dtype", "stored"):
            if key not in rec:
                raise InputError(f"tensor record {name!r} lacks {key!r}", where, "re-create the artifact")
        if rec["dtype"] not in _DTYPES:
            raise InputError(f"tensor {name!r} has unsupported dtype {rec['dtype']!r}", where, "re-create the artifact")
        if not isinstance(rec["stored"], dict) or not all(isinstance(v, str) for v in rec["stored"].values()):
            raise InputError(f"tensor record {name!r} has a malformed 'stored' map", where, "re-create the artifact")
        if not isinstance(rec["shape"], list) or not all(isinstance(s, int) and s >= 0 for s in rec["shape"]):
            raise InputError(f"tensor record {name!r} has a malformed shape", where, "re-create the artifact")
