"""`inspect`: per-tensor table and totals for a source checkpoint or a packed artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifact import MANIFEST, Artifact
from .io.checkpoint import SourceCheckpoint, validate_safetensors_file

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_TORCH_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                   "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Describe `path`. Keys: kind, format_version, tensors (rows), totals."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return _inspect_artifact(Artifact.open(path))
    return _inspect_source(SourceCheckpoint.open(path))


def _inspect_source(ckpt: SourceCheckpoint) -> dict[str, Any]:
    rows = []
    for name, info in ckpt.tensor_infos().items():
        n = _numel(info["shape"])
        size = _ITEMSIZE.get(info["dtype"], 4)
        rows.append({"name": name, "scheme": "none", "bits": 8 * size, "group_size": None,
                     "shape": info["shape"], "dtype": info["dtype"], "params": n, "bytes": n * size})
    total_params = sum(r["params"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    return {"kind": "source", "path": str(ckpt.path), "format_version": None, "tensors": rows,
            "totals": {"params": total_params, "bytes": total_bytes,
                       "avg_bits_per_weight": 8 * total_bytes / max(total_params, 1), "compression_ratio": 1.0}}


def _stored_sizes(art: Artifact) -> dict[str, int]:
    sizes = {}
    for shard in art.manifest["shards"]:
        for name, info in validate_safetensors_file(art.path / shard).items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = end - start
    return sizes


def _inspect_artifact(art: Artifact) -> dict[str, Any]:
    sizes = _stored_sizes(art)
    rows = []
    for name, rec in art.tensors.items():
        n = _numel(rec["shape"])
        stored = sum(sizes.get(s, 0) for s in rec["stored"].values())
        row = {"name": name, "scheme": rec["scheme"], "bits": rec["bits"], "group_size": rec["group_size"],
               "layout": rec["layout"], "shape": rec["shape"], "dtype": rec["dtype"], "params": n,
               "bytes": stored, "bits_per_weight": 8 * stored / max(n, 1)}
        hist = rec.get("params", {}).get("bit_histogram")
        if hist:
            row["bit_histogram"] = hist
        rows.append(row)
    q = [r for r in rows if r["scheme"] != "none"]
    total_params = sum(r["params"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    src_bytes = sum(r["params"] * _TORCH_ITEMSIZE[r["dtype"]] for r in rows)
    q_params = sum(r["params"] for r in q)
    totals = {
        "params": total_params, "bytes": total_bytes, "source_bytes": src_bytes,
        "params_quantized": q_params,
        "avg_bits_per_weight": 8 * total_bytes / max(total_params, 1),
        "avg_bits_quantized": 8 * sum(r["bytes"] for r in q) / max(q_params, 1),
        "compression_ratio": src_bytes / max(total_bytes, 1),
    }
    return {"kind": "artifact", "path": str(art.path), "format_version": art.manifest["format_version"],
            "producer": art.manifest.get("producer"), "source": art.manifest.get("source"),
            "quantization": art.manifest.get("quantization"), "tensors": rows, "totals": totals}
