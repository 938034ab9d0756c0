"""Streaming quantization: one source shard in memory at a time, output shards written as we go."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..artifact import ArtifactWriter
from ..errors import InputError
from ..io.atomic import atomic_dir, check_output
from ..io.checkpoint import SourceCheckpoint
from ..io.hashing import sha256_file, sha256_tensor
from ..qtensor import QuantizedTensor
from ..schemes.base import Scheme
from .progress import progress_bar
from .select import compile_modules, is_selected


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    scheme: Scheme,
    *,
    modules: str | None = None,
    force: bool = False,
    show_progress: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    precomputed: Mapping[str, QuantizedTensor] | None = None,
    extra_quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize `src` into a format-v1 artifact at `out`; returns the manifest.

    `precomputed` holds results of calibrated schemes (GPTQ, LowRA), which see the whole model before any
    weight is written; other schemes quantize tensor by tensor while streaming.
    """
    check_output(out, force)
    ckpt = SourceCheckpoint.open(src)
    pattern = compile_modules(modules)
    infos = ckpt.tensor_infos()
    total_bytes = sum(_nbytes(i) for i in infos.values())
    ident = ckpt.source_identity()
    t0 = time.perf_counter()
    with atomic_dir(out, force) as tmp, progress_bar(show_progress) as bar:
        source = {**ident, "path": str(ckpt.path.resolve()),
                  "shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards}}
        quant_cfg = {**scheme.config(), "modules": pattern.pattern, **(extra_quantization or {})}
        writer = ArtifactWriter(tmp, source, quant_cfg, max_shard_bytes)
        task = bar.add_task(f"quantize {scheme.name}", total=total_bytes)
        n_q = 0
        for shard in ckpt.shards:
            for name, tensor in ckpt.iter_shard(shard):
                info = infos[name]
                sha = sha256_tensor(tensor)
                if is_selected(name, tensor.shape, info["dtype"], pattern):
                    qt = precomputed.get(name) if precomputed is not None else None
                    if qt is None:
                        qt = _quantize_one(scheme, name, tensor, ckpt.path / shard)
                    writer.add_quantized(name, qt, sha)
                    n_q += 1
                else:
                    writer.add_kept(name, tensor, sha)
                bar.advance(task, _nbytes(info))
                del tensor
        if n_q == 0:
            raise InputError(f"no tensor matches the module pattern {pattern.pattern!r}", ckpt.path,
                             "check --modules against `lowbitpack inspect` of the source")
        writer.copy_sidecars(ckpt.path)
        manifest = writer.finish({"timing": {"seconds": round(time.perf_counter() - t0, 3)}})
    return manifest


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() without a full-size bool temporary (4 MB at a time)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _quantize_one(scheme: Scheme, name: str, tensor: torch.Tensor, file: Path) -> QuantizedTensor:
    if not _all_finite(tensor):
        raise InputError(f"tensor {name} holds NaN or Inf values", file,
                         "fix the checkpoint, or exclude the tensor with --modules")
    return scheme.quantize(tensor)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(info: dict) -> int:
    n = 1
    for s in info["shape"]:
        n *= s
    return n * _ITEMSIZE.get(info["dtype"], 4)
