"""Exact QA-LoRA merge: `lowbitpack merge BUNDLE --restore b --fold` for a `qalora` bundle.

The original is quantized with the `qalora` scheme (b bits, group = the adapter's pooling group unless
--group-size names a divisor of it) and each adapted tensor's per-group ΔW constants are added to its float
offsets (lowbitpack.adapters.qalora.fold_into_offsets): codes and scales are those of Quantize_b(W), the result
is a b-bit artifact whose weights equal deq(Quantize_b(W)) + ΔW up to one float32 rounding per offset. When b,
the group and the scheme are those the adapter was trained on, Quantize_b(W) is the training base itself (RTN is
deterministic); the report checks it against the stored-tensor hashes recorded in the bundle.

Exports of the folded artifact: GGUF Q4_1 (4-bit, G a multiple of 32) through the exporter's direct intg path
(d and m rounded to fp16 once, reported by the exporter); GPTQ and compressed-tensors store integer zero points,
so the offsets are rounded (z = round(−m / s)); `integer_zero_rounding` reports, per tensor and in a summary,
the max abs weight error, the relative Frobenius error and, for adapted tensors, the error relative to ‖ΔW‖.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..adapters.qalora import fold_into_offsets, pool_group_size
from ..artifact import MANIFEST, Artifact
from ..errors import InputError, OptionError
from ..io.hashing import sha256_tensor
from ..layouts.intg import dequantize_intg
from ..schemes.qalora import QALoRAGroups, integer_zero_rounding
from .quantize import quantize_checkpoint
from .select import compile_modules, is_selected

INTEGER_ZERO_FORMATS = ("gptq", "compressed-tensors")


def restore_group(pool: int, group_size: int | None) -> int:
    g = pool if group_size is None else int(group_size)
    if g < 1 or pool % g:
        raise OptionError(f"--group-size {g} does not divide the adapter's qalora_group_size {pool}, so ΔW would "
                          "not be constant over each quantization group", None,
                          f"leave --group-size out (uses {pool}) or pass a divisor of {pool}")
    return g


@torch.no_grad()
def quantize_folded(bundle, ckpt, out_dir: Path, *, bits: int, group_size: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Write Quantize_b(W) with the adapter folded into the offsets to `out_dir`; returns the fold report."""
    adapter = bundle.adapter
    kind = adapter.kind
    pool = pool_group_size(adapter.config)
    g = restore_group(pool, group_size)
    try:
        scheme = QALoRAGroups(bits, g)
    except ValueError as e:
        raise OptionError(str(e), None, "use --restore 4, 3 or 2 (or 8)") from None
    targets = {kind.base_tensor(m): m for m in adapter.modules}
    infos = ckpt.tensor_infos()
    pattern = compile_modules(None)
    for name in targets:
        if not is_selected(name, infos[name]["shape"], infos[name]["dtype"], pattern):
            raise InputError(f"{name} is adapted but not among the tensors the restore quantizes", ckpt.path,
                             "merge with --restore 16 (full precision) instead")
    recorded = {n: r.get("stored_sha256") for n, r in bundle.base["tensors"].items()}
    precomputed = {}
    per: dict[str, dict[str, Any]] = {}
    by_shard: dict[str, list[str]] = {}
    for name in targets:
        by_shard.setdefault(ckpt.weight_map[name], []).append(name)
    for shard, names in sorted(by_shard.items()):
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            for name in sorted(names):
                module = targets[name]
                w = f.get_tensor(name)
                if not torch.isfinite(w).all():
                    raise InputError(f"tensor {name} holds NaN or Inf values", ckpt.path / shard, "fix the checkpoint")
                qt = scheme.quantize(w)
                same = None
                if recorded.get(name):
                    same = {k: sha256_tensor(v) for k, v in qt.tensors.items()} == recorded[name]
                c = kind.group_constants(module, adapter.modules[module], adapter.config)
                folded = fold_into_offsets(qt, c, pool)
                shape = tuple(qt.shape)
                base = dequantize_intg(qt.tensors, shape, bits, int(qt.group_size))
                merged = dequantize_intg(folded.tensors, shape, bits, int(qt.group_size))
                delta = c.repeat_interleave(pool, dim=1)
                delta_norm = float(delta.double().norm())
                per[name] = {
                    "fold_max_abs_error": float((merged - (base + delta)).abs().max()),
                    "offset_shift_max_abs": float(c.abs().max()),
                    "adapter_norm": delta_norm,
                    "adapter_rel_norm": delta_norm / max(float(w.float().double().norm()), 1e-30),
                    "same_codes_as_training_base": same,
                }
                precomputed[name] = folded
                del w, base, merged, delta
    quantize_checkpoint(ckpt.path, out_dir, scheme, precomputed=precomputed, show_progress=progress,
                        extra_quantization={"folded_adapter": {"type": "qalora", "bundle_id": bundle.id,
                                                               "qalora_group_size": pool, "exact": True}})
    mpath = out_dir / MANIFEST  # like every folded merge: the source is the original plus the bundle merged in
    m = json.loads(mpath.read_text(encoding="utf-8"))
    m["source"]["merged_bundle"] = bundle.id
    mpath.write_text(json.dumps(m, indent=1), encoding="utf-8")
    sames = [v["same_codes_as_training_base"] for v in per.values()]
    return {
        "exact": True, "scheme": scheme.config(), "qalora_group_size": pool,
        "same_base_as_training": (all(sames) if all(s is not None for s in sames) else None),
        "fold_max_abs_error": max(v["fold_max_abs_error"] for v in per.values()),
        "adapter_rel_norm_mean": sum(v["adapter_rel_norm"] for v in per.values()) / len(per),
        "tensors": per,
    }


@torch.no_grad()
def integer_zero_report(art: Artifact, adapted: dict[str, float] | None = None) -> dict[str, Any]:
    """integer_zero_rounding for every quantized tensor with float offsets, plus a summary.

    `adapted` maps adapted tensor names to ‖ΔW‖_F: their entries add `error_vs_adapter`, the rounding error
    relative to the adapter's contribution (≥ 1 means the export's rounding is as large as the adapter itself).
    """
    adapted = adapted or {}
    per: dict[str, dict[str, Any]] = {}
    for name, rec in art.tensors.items():
        if rec["scheme"] == "none" or "offset" not in rec["stored"]:
            continue
        rep = integer_zero_rounding(art.quantized_tensor(name), adapted.get(name))
        if "error_vs_reference" in rep:
            rep["error_vs_adapter"] = rep.pop("error_vs_reference")
        per[name] = rep
    if not per:
        return {"tensors": {}, "summary": {"tensors": 0}}
    rels = [v["rel_frobenius"] for v in per.values()]
    vs = [v["error_vs_adapter"] for v in per.values() if "error_vs_adapter" in v]
    summary = {"tensors": len(per), "max_abs_error": max(v["max_abs_error"] for v in per.values()),
               "rel_frobenius_mean": sum(rels) / len(rels), "rel_frobenius_max": max(rels),
               "clamped_groups": sum(v["clamped_groups"] for v in per.values())}
    if vs:
        summary.update({"error_vs_adapter_mean": sum(vs) / len(vs), "error_vs_adapter_max": max(vs)})
    return {"tensors": per, "summary": summary}


def export_folded(fmt: str, art_dir: Path, dst: Path, *, bits: int, fold_report: dict[str, Any],
                  progress: bool = True) -> dict[str, Any]:
    """Export the folded artifact to `fmt`, files landing in `dst`; returns the exporter's report plus ours."""
    from ..export import EXPORTERS
    opts: dict[str, Any] = {}
    report: dict[str, Any] = {"format": fmt}
    if fmt == "gguf" and bits == 4:
        opts["gguf_type"] = "q4_1"  # w = d·q + m per 32: the direct path carries codes, d = s, m = offset
    if fmt in INTEGER_ZERO_FORMATS:
        norms = {n: v["adapter_norm"] for n, v in fold_report["tensors"].items()}
        report["integer_zero_rounding"] = integer_zero_report(Artifact.open(art_dir), norms)
    tmp = dst / ".export"
    res = EXPORTERS[fmt](art_dir, tmp, force=False, progress=progress, **opts)
    for f in tmp.iterdir():
        target = dst / f.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.rename(f, target)
    shutil.rmtree(tmp, ignore_errors=True)
    report["exporter"] = {k: v for k, v in res.items() if k not in ("out",)}
    report["options"] = opts
    return report


__all__ = ["export_folded", "integer_zero_report", "quantize_folded", "restore_group"]
