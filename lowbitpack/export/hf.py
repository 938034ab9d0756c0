"""Export to a plain Hugging Face checkpoint: bf16/fp16/fp32 safetensors shards that transformers loads alone.

Input: a lowbitpack artifact (quantized tensors are dequantized with the layout's reference, one tensor at a
time) or a plain HF checkpoint directory (e.g. the output of `lowbitpack merge`), which is re-cast and
re-sharded. Also home of the helpers the other exporters share (`ExportSource`, config cleaning, the
`lowbitpack_export.json` provenance record, see formats/export-v1.md).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..artifact import MANIFEST, Artifact, dtype_from_name
from ..errors import InputError, OptionError
from ..flows.progress import progress_bar
from ..io.atomic import atomic_dir, check_output
from ..io.checkpoint import SIDECAR_FILES, SourceCheckpoint
from ..io.hashing import sha256_file
from ..io.verify import verify_recorded_dir
from ..io.writer import ShardWriter
from ..version import __version__

EXPORT_MANIFEST = "lowbitpack_export.json"
EXPORT_FORMAT = "lowbitpack-export"
EXPORT_FORMAT_VERSION = 1

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name)
    try:
        return DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise OptionError(f"unsupported --dtype {name!r}", None, "use bf16, fp16 or fp32") from None


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ExportSource:
    """What an exporter reads: a lowbitpack artifact, or a plain HF safetensors checkpoint directory."""

    path: Path
    kind: str                                    # "artifact" or "checkpoint"
    config: dict[str, Any]
    artifact: Artifact | None = None
    checkpoint: SourceCheckpoint | None = None
    _infos: dict[str, dict] = field(default_factory=dict)
    _handles: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        if self.artifact is not None:
            return list(self.artifact.tensors)
        return list(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.artifact is not None:
            return tuple(self.artifact.tensors[name]["shape"])
        return tuple(self._infos[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype in the model (for quantized tensors: the dtype they were quantized from)."""
        if self.artifact is not None:
            return dtype_from_name(self.artifact.tensors[name]["dtype"])
        return _ST_DTYPES.get(self._infos[name]["dtype"], torch.float32)

    def record(self, name: str) -> dict[str, Any] | None:
        """The artifact's manifest record of `name` (None for plain checkpoints)."""
        return self.artifact.tensors[name] if self.artifact is not None else None

    def is_quantized(self, name: str) -> bool:
        return self.artifact is not None and self.artifact.is_quantized(name)

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as the model uses it (artifacts: dequantized by the reference); optionally cast."""
        if self.artifact is not None:
            t = self.artifact.dense(name, dtype if self.artifact.is_quantized(name) else None)
        else:
            shard = self._infos[name]["shard"]
            if shard not in self._handles:
                try:
                    self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
                except Exception as e:
                    raise InputError(f"cannot read tensors ({e.__class__.__name__})", self.path / shard,
                                     "the file is corrupt or truncated; re-create it") from None
            t = self._handles[shard].get_tensor(name)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n * self.dtype(name).itemsize

    def sidecar_dir(self) -> Path:
        return self.path

    def provenance(self) -> dict[str, Any]:
        """Where the input came from, for lowbitpack_export.json and model cards."""
        if self.artifact is not None:
            m = self.artifact.manifest
            return {"kind": "artifact", "path": str(self.path.resolve()), "format_version": m["format_version"],
                    "source": {k: m["source"].get(k) for k in ("model_id", "revision", "license") if k in m["source"]},
                    "quantization": m.get("quantization", {}), "summary": m.get("summary", {})}
        prov: dict[str, Any] = {"kind": "checkpoint", "path": str(self.path.resolve())}
        assert self.checkpoint is not None
        prov["source"] = self.checkpoint.source_identity()
        manifests = {}
        for f in sorted(self.path.glob("lowbitpack*.json")):
            if f.name in (MANIFEST, EXPORT_MANIFEST, "lowbitpack_source.json"):
                continue
            try:
                manifests[f.name] = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        if manifests:
            prov["manifests"] = manifests
        return prov


def open_export_source(path: str | Path) -> ExportSource:
    """Open `path` as an artifact (it holds lowbitpack.json) or else as a HF safetensors checkpoint."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError("no such directory", p, "pass a lowbitpack artifact or a Hugging Face model directory")
    if (p / MANIFEST).is_file():
        art = Artifact.open(p, verify=True)  # a corrupted shard must not be exported as valid weights
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise InputError("artifact has no config.json", p, "re-create it with `lowbitpack quantize`")
        return ExportSource(path=p, kind="artifact", config=art.config(), artifact=art)
    ckpt = SourceCheckpoint.open(p)
    return ExportSource(path=ckpt.path, kind="checkpoint", config=dict(ckpt.config), checkpoint=ckpt,
                        _infos=ckpt.tensor_infos())


def clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for an export: without lowbitpack's own fields or a quantization_config of the input."""
    out = {k: v for k, v in config.items() if not k.startswith("lowbitpack") and k != "quantization_config"}
    return out


def copy_sidecars(src_dir: Path, dst_dir: Path, skip: tuple[str, ...] = ("config.json",)) -> list[str]:
    """Copy tokenizer / generation config (and lowbitpack provenance sidecars) verbatim; returns names copied."""
    copied = []
    names = list(SIDECAR_FILES) + sorted(f.name for f in src_dir.glob("lowbitpack_*.json")
                                         if f.name not in (EXPORT_MANIFEST, MANIFEST))
    for f in dict.fromkeys(names):
        if f in skip or not (src_dir / f).is_file():
            continue
        shutil.copy2(src_dir / f, dst_dir / f)
        copied.append(f)
    return copied


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """{name: {sha256, bytes}} of every file the exporter wrote (everything in `directory` but the record)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(directory.rglob("*")):
        rel = f.relative_to(directory).as_posix()
        if rel == EXPORT_MANIFEST or f.is_dir() or any(part.startswith(".") for part in Path(rel).parts):
            continue
        out[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def write_export_manifest(directory: Path, target: str, source: ExportSource, report: dict[str, Any]) -> dict:
    """lowbitpack_export.json: what was exported, from what, how exact it is, and the sha256 of every file written
    (`files`, checked by `lowbitpack verify`; formats/export-v1.md). Call it last, when every file is written."""
    manifest = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
        "producer": {"name": "lowbitpack", "version": __version__},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target, "input": source.provenance(), "report": report,
        "files": _file_records(directory),
    }
    write_json(directory / EXPORT_MANIFEST, manifest)
    return manifest


def export_is_outermost(path: str | Path) -> bool:
    """Whether `path` is an export whose record covers the other lowbitpack manifests there (an export of a merged
    checkpoint copies its lowbitpack_merge.json; a `merge --format X` output instead records lowbitpack_export.json
    in its merge manifest). Such a directory is verified against lowbitpack_export.json."""
    p = Path(path)
    try:
        m = json.loads((p / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict):
        return False
    others = [f.name for f in p.glob("lowbitpack*.json") if f.name != EXPORT_MANIFEST]
    return all(name in files for name in others)


def verify_export(path: str | Path) -> dict[str, Any]:
    """Check an export directory against the sha256 of every file in its lowbitpack_export.json.

    Raises InputError (no / malformed record, or one written before records carried hashes), FormatVersionError
    (newer format) or IntegrityError (a recorded file missing, a symbolic link, or with different bytes)."""
    p = Path(path)
    m, n = verify_recorded_dir(p, EXPORT_MANIFEST, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, record_name="export record",
                               producer="lowbitpack export", rerun="re-run `lowbitpack export`", nested=True)
    return {"path": str(p), "kind": "export", "target": m.get("target"), "files_checked": n, "ok": True}


def export_hf(
    path: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Write a plain HF checkpoint at `out`: floating tensors in `dtype`, config.json without quantization fields.

    Quantized tensors are dequantized in float32 and rounded once to `dtype`, so the weights equal
    `load_dequantized_model(path, dtype)`'s. Returns a summary dict.
    """
    target_dtype = parse_dtype(dtype)
    check_output(out, force)
    src = open_export_source(path)
    t0 = time.perf_counter()
    names = src.names
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        task = bar.add_task(f"export hf {dtype_label(target_dtype)}", total=sum(src.nbytes(n) for n in names))
        writer = ShardWriter(tmp, "model", max_shard_size, metadata={"format": "pt"})
        n_dequantized = 0
        for name in names:
            t = src.dense(name, target_dtype)
            writer.add(name, t)
            n_dequantized += int(src.is_quantized(name))
            bar.advance(task, src.nbytes(name))
            del t
        shards = writer.finish()
        if len(shards) == 1:
            # save_pretrained writes no index for a single file; keep the layout users expect.
            (tmp / "model.safetensors.index.json").unlink()
        config = clean_config(src.config)
        config["dtype"] = dtype_label(target_dtype)
        config.pop("torch_dtype", None)
        write_json(tmp / "config.json", config)
        copied = copy_sidecars(src.sidecar_dir(), tmp)
        report = {"dtype": dtype_label(target_dtype), "tensors": len(names), "dequantized": n_dequantized,
                  "shards": sorted(shards), "bytes": sum(s["bytes"] for s in shards.values())}
        write_export_manifest(tmp, "hf", src, report)
    return {"format": "hf", "out": str(out), "input": src.kind, **report, "sidecars": copied,
            "seconds": round(time.perf_counter() - t0, 3)}

