"""Import a GPTQ checkpoint (GPTQModel / AutoGPTQ / optimum; v1 "gptq" or v2 "gptq_v2") as an intg-v1 artifact.

Codes come over bit for bit: GPTQ's `qweight` column o is row o's dense LSB-first bit stream in int32 words,
which re-chunked into bytes is our `qweight` row. Zero points: v2 stores z; v1 stores z − 1 the way GPTQModel
reads it back (a 1 added to every field of each packed word for 2/4/8 bits, field by field modulo 8 for
3 bits; see lowbitpack.export.gptq). `g_idx` is kept only when it is not ⌊j / G⌋ (act-order). Per-module
bits / group sizes from GPTQModel's `dynamic` are honoured; `-:` patterns mark modules left dense.
Refused: marlin/bitblas/awq formats, planar packings (5/6/7-bit), pack dtypes other than int32.

Quantized tensors' `sha256` in the manifest hashes the dequantized weight in the model dtype (the original
float weights are not available), and `params.imported_from` says so.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from ..artifact import ArtifactWriter, dtype_from_name
from ..errors import InputError
from ..flows.progress import progress_bar
from ..io.atomic import atomic_dir, check_output
from ..io.checkpoint import SourceCheckpoint, TensorReader
from ..io.hashing import sha256_file, sha256_tensor
from ..layouts.intg import LAYOUT, default_g_idx, dequantize_intg
from ..qtensor import QuantizedTensor
from ..export.gptq import unpack_gptq_qweight, unpack_gptq_qzeros

_QKEYS = ("qweight", "qzeros", "scales", "g_idx")
_FORMATS = {"gptq": "v1", "gptq_v2": "v2"}


def read_gptq_config(ckpt: SourceCheckpoint) -> tuple[dict[str, Any], Path]:
    """The GPTQ quantization config: config.json's `quantization_config`, else quantize_config.json."""
    q = ckpt.config.get("quantization_config")
    where = ckpt.path / "config.json"
    if not isinstance(q, dict):
        qc = ckpt.path / "quantize_config.json"
        if not qc.is_file():
            raise InputError("no quantization_config in config.json and no quantize_config.json", ckpt.path,
                             "pass a GPTQ checkpoint (GPTQModel, AutoGPTQ or optimum output)")
        try:
            q = json.loads(qc.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"not valid JSON ({e.__class__.__name__})", qc, "fix or re-download it") from None
        where = qc
    method = str(q.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise InputError(f"quant_method is {method!r}, not 'gptq'", where, "use the importer for that format")
    if q.get("is_marlin_format"):
        raise InputError("marlin-repacked GPTQ checkpoints are not imported", where,
                         "import the original (gptq) checkpoint")
    return q, where


def checkpoint_version(q: dict[str, Any], where: Path) -> str:
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in _FORMATS:
        raise InputError(f"checkpoint format {fmt!r} is not imported (only gptq and gptq_v2)", where,
                         "convert it to gptq with GPTQModel, or import the original checkpoint")
    pack_dtype = str(q.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise InputError(f"pack_dtype {pack_dtype!r}: only int32 packing is imported", where,
                         "re-save the checkpoint with pack_dtype int32")
    return _FORMATS[fmt]


def module_overrides(module: str, q: dict[str, Any]) -> dict[str, Any] | None:
    """GPTQModel's `dynamic`: first matching pattern wins; None for `-:` (module left dense), else overrides."""
    for pattern, over in (q.get("dynamic") or {}).items():
        neg = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(raw, module):
            return None if neg else dict(over or {})
    return {}


def convert_module(module: str, read, names: set[str], bits: int, group_size: int, version: str,
                   dtype: torch.dtype, where: Path) -> QuantizedTensor:
    """One GPTQ module's tensors -> QuantizedTensor (intg-v1) with the same codes."""
    qweight = read(f"{module}.qweight")
    qzeros = read(f"{module}.qzeros")
    scales = read(f"{module}.scales")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise InputError(f"{module}: qweight/qzeros are {qweight.dtype}/{qzeros.dtype}, expected int32", where,
                         "the checkpoint is not int32-packed GPTQ")
    out_f = scales.shape[1]
    g_idx = read(f"{module}.g_idx").to(torch.int32) if f"{module}.g_idx" in names else None
    in_f = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // bits
    if qweight.shape != (math.ceil(in_f * bits / 32), out_f):
        raise InputError(f"{module}: qweight shape {list(qweight.shape)} does not fit {bits}-bit in={in_f}, "
                         f"out={out_f}", where, "the checkpoint does not match its quantization config")
    g = in_f if group_size in (-1, 0) or group_size >= in_f else group_size
    n_groups = scales.shape[0]
    if g_idx is None and n_groups != math.ceil(in_f / g):
        raise InputError(f"{module}: {n_groups} scale rows do not fit in={in_f}, group_size={group_size}", where,
                         "the checkpoint does not match its quantization config")
    if g_idx is not None and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise InputError(f"{module}: g_idx points outside the {n_groups} groups", where, "the checkpoint is damaged")
    if qzeros.shape != (n_groups, math.ceil(out_f * bits / 32)):
        raise InputError(f"{module}: qzeros shape {list(qzeros.shape)} does not fit {n_groups} groups, out={out_f}",
                         where, "the checkpoint does not match its quantization config")
    if bits == 3 and (in_f % 32 or out_f % 32):
        raise InputError(f"{module}: 3-bit GPTQ needs in and out divisible by 32, got {in_f}x{out_f}", where,
                         "the checkpoint uses a packing this importer does not know")
    tensors = {
        "qweight": unpack_gptq_qweight(qweight, bits, in_f),
        "scale": scales.t().contiguous() if scales.dtype in (torch.float16, torch.float32) else scales.float().t().contiguous(),
        "zero": unpack_gptq_qzeros(qzeros, bits, out_f, version),
    }
    if g_idx is not None and not torch.equal(g_idx, default_g_idx(in_f, g)):
        tensors["g_idx"] = g_idx.contiguous()
    elif g_idx is not None and n_groups != math.ceil(in_f / g):
        raise InputError(f"{module}: {n_groups} scale rows do not fit in={in_f}, group_size={group_size}", where,
                         "the checkpoint does not match its quantization config")
    return QuantizedTensor(scheme=f"gptq{bits}", layout=LAYOUT, bits=bits, group_size=g, shape=(out_f, in_f),
                           dtype=dtype, tensors=tensors,
                           params={"imported_from": f"gptq-{version}", "sha256_of": "dequantized"})


def import_gptq(
    src_dir: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Convert the GPTQ checkpoint `src_dir` into a lowbitpack artifact at `out`; returns the manifest."""
    check_output(out, force)
    ckpt = SourceCheckpoint.open(src_dir)
    q, where = read_gptq_config(ckpt)
    version = checkpoint_version(q, where)
    bits0 = int(q.get("bits", 4))
    group0 = int(q.get("group_size", 128))
    dtype_name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float16"
    try:
        dtype = dtype_from_name(str(dtype_name).removeprefix("torch."))
    except ValueError:
        dtype = torch.float16
    infos = ckpt.tensor_infos()
    names = set(infos)
    modules = [n[: -len(".qweight")] for n in infos if n.endswith(".qweight")]
    if not modules:
        raise InputError("no *.qweight tensors", ckpt.path, "the checkpoint is not GPTQ-quantized")
    settings: dict[str, tuple[int, int]] = {}
    for m in modules:
        over = module_overrides(m, q)
        if over is None:
            raise InputError(f"{m} has packed weights but `dynamic` marks it unquantized", where,
                             "the checkpoint's quantization config is inconsistent")
        b, g = int(over.get("bits", bits0)), int(over.get("group_size", group0))
        if b not in (2, 3, 4, 8):
            raise InputError(f"{m}: {b}-bit GPTQ is not imported (2, 3, 4, 8 only)", where,
                             "planar 5/6/7-bit packings are GPTQModel-specific")
        settings[m] = (b, g)
    owned = {f"{m}.{k}" for m in modules for k in _QKEYS}
    read = TensorReader(ckpt)
    t0 = time.perf_counter()
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        source = {**ckpt.source_identity(), "path": str(ckpt.path.resolve()),
                  "shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards}}
        kinds = set(settings.values())
        if len(kinds) == 1:
            (b, g), = kinds
            quant: dict[str, Any] = {"scheme": f"gptq{b}", "bits": b, "group_size": g}
        else:
            quant = {"scheme": "mixed", "bits": sorted({k[0] for k in kinds})}
        quant.update({"imported_from": f"gptq-{version}", "desc_act": bool(q.get("desc_act", False)),
                      "gptq": q, "modules": "|".join(re.escape(m + ".weight") for m in sorted(modules))})
        if isinstance(q.get("damp_percent"), (int, float)):
            quant["damp"] = q["damp_percent"]
        writer = ArtifactWriter(tmp, source, quant, max_shard_size)
        task = bar.add_task(f"import gptq {version}", total=len(infos))
        module_set = set(modules)
        for name in infos:
            if name in owned:
                module, _, key = name.rpartition(".")
                if key == "qweight" and module in module_set:
                    b, g = settings[module]
                    qt = convert_module(module, read, names, b, g, version, dtype, ckpt.path)
                    dense = dequantize_intg(qt.tensors, qt.shape, b, int(qt.group_size), dtype)
                    writer.add_quantized(f"{module}.weight", qt, sha256_tensor(dense))
                bar.advance(task, 1)
                continue
            t = read(name)
            writer.add_kept(name, t, sha256_tensor(t))
            bar.advance(task, 1)
        writer.copy_sidecars(ckpt.path)
        # The artifact's config.json describes the dense model; the GPTQ config lives in the manifest.
        cfg = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        manifest = writer.finish({"timing": {"seconds": round(time.perf_counter() - t0, 3)}})
    return manifest
