"""Post-LoRA Restoration: apply a bundled adapter to the ORIGINAL base restored to 16, 8, 4, 3 or 2 bits.

  --restore 16          W + ΔW, streamed shard by shard (one source shard in memory), written as a plain HF
                        checkpoint that transformers loads without lowbitpack.
  --restore j (8..2)    PLR-j: Quantize_j(W) as a lowbitpack artifact with the PEFT adapter beside it (unmerged),
                        or with --fold Quantize_j(W + ΔW) (merged, then re-quantized; the fold error is reported).
                        j = 8/4 default to RTN int8/int4, 3/2 to GPTQ (as in the PLR paper); --scheme overrides.
  --format FMT          hand the result to lowbitpack.export.<fmt> (gguf, compressed-tensors, gptq, bnb-...).

The original is `--original`, else the source path / model id recorded in the bundle (Hub ids resolve through
the huggingface-hub cache). The sha256 of every tensor the adapter touches must equal the one recorded when
the adapter was bundled (BaseMismatchError otherwise; --allow-base-mismatch merges anyway, with a warning).
Outputs appear whole or not at all (atomic_dir); lowbitpack_merge.json records the provenance
(formats/bundle-v1.md, section "Merge output").
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .artifact import MANIFEST, Artifact
from .bundle import Bundle, open_bundle
from .errors import BaseMismatchError, InputError, OptionError
from .flows.progress import progress_bar
from .io.atomic import atomic_dir, check_output
from .io.checkpoint import SIDECAR_FILES, SourceCheckpoint, resolve_model_path
from .io.hashing import sha256_file, sha256_tensor
from .io.verify import verify_recorded_dir
from .version import __version__

MERGE_MANIFEST = "lowbitpack_merge.json"
MERGE_FORMAT = "lowbitpack-merge"
MERGE_FORMAT_VERSION = 1
RESTORE_BITS = (16, 8, 4, 3, 2)
DEFAULT_SCHEMES = {8: "int8", 4: "int4", 3: "gptq3", 2: "gptq2"}
OUR_FORMATS = ("hf", "ours")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


class BaseMismatchWarning(UserWarning):
    """Merged with --allow-base-mismatch although the original differs from the adapter's base."""


# ---------------------------------------------------------------------------------------------- options
def gptq_available() -> bool:
    return (importlib.util.find_spec("lowbitpack.schemes.gptq") is not None
            and importlib.util.find_spec("lowbitpack.flows.calibrate") is not None)


def restore_scheme(bits: int, scheme: str | None) -> tuple[str, str | None]:
    """(scheme to quantize the original with, note when a fallback was taken)."""
    from .schemes import SCHEMES
    if scheme is not None:
        if scheme not in SCHEMES:
            raise OptionError(f"unknown --scheme {scheme!r}", None, f"choose one of {', '.join(SCHEMES)}")
        digits = "".join(c for c in scheme if c.isdigit())
        if digits and int(digits) != bits:
            raise OptionError(f"--scheme {scheme} is {digits}-bit but --restore is {bits}", None,
                              f"pass a {bits}-bit scheme or leave --scheme out")
        if scheme.startswith("gptq") and not gptq_available():
            raise OptionError(f"--scheme {scheme} needs GPTQ, which this build lacks", None,
                              f"use --scheme int{bits} (RTN)")
        return scheme, None
    default = DEFAULT_SCHEMES[bits]
    if default.startswith("gptq") and not gptq_available():
        note = (f"{default} is not available in this build (no lowbitpack.schemes.gptq); "
                f"fell back to RTN int{bits}, which is much less accurate at {bits} bits")
        return f"int{bits}", note
    return default, None


def _check_options(restore: int, fold: bool, scheme: str | None, fmt: str | None, dtype: str | None) -> str:
    if restore not in RESTORE_BITS:
        raise OptionError(f"--restore must be one of {', '.join(map(str, RESTORE_BITS))}, got {restore}", None,
                          "e.g. --restore 16 for the full-precision original")
    if restore == 16 and fold:
        raise OptionError("--fold applies to --restore 8/4/3/2; --restore 16 always merges", None, "drop --fold")
    if restore == 16 and scheme is not None:
        raise OptionError("--scheme applies to --restore 8/4/3/2", None, "drop --scheme")
    if dtype is not None and dtype not in _DTYPES:
        raise OptionError(f"unsupported --dtype {dtype!r}", None, "use bf16, fp16 or fp32")
    fmt = fmt or ("hf" if restore == 16 else "ours")
    if restore == 16 and fmt == "ours":
        raise OptionError("--format ours needs --restore 8/4/3/2 (a 16-bit restore is a plain HF checkpoint)", None,
                          "use --format hf")
    if fmt not in OUR_FORMATS:
        from .export import EXPORT_FORMATS, EXPORTERS
        if fmt not in EXPORTERS:
            raise OptionError(f"unknown --format {fmt!r}", None,
                              f"choose one of {', '.join(OUR_FORMATS + tuple(EXPORT_FORMATS))}")
    return fmt


def resolve_original(bundle: Bundle, original: str | Path | None) -> SourceCheckpoint:
    """The full-precision original: --original, else the recorded source path, else the recorded model id."""
    base = bundle.base
    if original is not None:
        path = resolve_model_path(original)
    elif base.get("source_path") and (Path(base["source_path"]) / "config.json").is_file():
        path = Path(base["source_path"])
    elif base.get("model_id") and str(base["model_id"]).count("/") == 1:
        try:
            path = resolve_model_path(base["model_id"])
        except InputError as e:
            raise InputError(f"cannot find the original model {base['model_id']!r} ({e})", bundle.path,
                             "pass it with --original DIR") from None
    else:
        raise InputError("the bundle records no reachable original model", bundle.path, "pass it with --original DIR")
    if (path / MANIFEST).is_file():
        raise InputError("this is a packed lowbitpack artifact, not the full-precision original", path,
                         "pass the original Hugging Face checkpoint with --original")
    ckpt = SourceCheckpoint.open(path)
    infos = ckpt.tensor_infos()
    for name, rec in bundle.base["tensors"].items():
        if name not in infos:
            raise InputError(f"the original lacks {name}, which the adapter targets", ckpt.path,
                             "pass the model the adapter was trained on with --original")
        if list(infos[name]["shape"]) != list(rec["shape"]):
            raise InputError(f"{name} has shape {infos[name]['shape']} in the original, {rec['shape']} in the "
                             "adapter's base", ckpt.path, "pass the model the adapter was trained on with --original")
    return ckpt


def _mismatch(names: list[str], ckpt: SourceCheckpoint, allow: bool) -> None:
    if not names:
        return
    msg = (f"{len(names)} tensor(s) of the original differ from the base the adapter was trained on "
           f"(sha256), e.g. {names[0]}")
    if not allow:
        raise BaseMismatchError(msg, ckpt.path, "pass the exact original with --original, or --allow-base-mismatch "
                                "to merge anyway")
    warnings.warn(f"{ckpt.path}: {msg}; merging anyway (--allow-base-mismatch)", BaseMismatchWarning, stacklevel=3)


def verify_original(bundle: Bundle, ckpt: SourceCheckpoint, allow: bool) -> list[str]:
    """Hash only the tensors the adapter touches; returns the names that differ (raises unless `allow`)."""
    expected = bundle.base_tensor_sha256()
    by_shard: dict[str, list[str]] = {}
    for name in expected:
        by_shard.setdefault(ckpt.weight_map[name], []).append(name)
    bad = []
    for shard, names in by_shard.items():
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            for n in names:
                if sha256_tensor(f.get_tensor(n)) != expected[n]:
                    bad.append(n)
    _mismatch(sorted(bad), ckpt, allow)
    return sorted(bad)


# ---------------------------------------------------------------------------------------------- restore 16
def write_merged_checkpoint(bundle: Bundle, ckpt: SourceCheckpoint, dst: Path, *, dtype: torch.dtype | None,
                            allow_base_mismatch: bool, check_hashes: bool = True,
                            progress: bool = True) -> dict[str, Any]:
    """W + ΔW for the adapted tensors, the rest copied (cast to `dtype` if given), one source shard at a time.

    Output shards keep the source's names and split; the merge is computed in float32 and rounded once.
    """
    adapter = bundle.adapter
    targets = {adapter.kind.base_tensor(m): m for m in adapter.modules}
    expected = bundle.base_tensor_sha256()
    mismatched: list[str] = []
    total = sum(_nbytes(i) for i in ckpt.tensor_infos().values())
    out_dtypes: set[str] = set()
    with progress_bar(progress) as bar:
        task = bar.add_task("merge --restore 16", total=total)
        for shard in ckpt.shards:
            tensors: dict[str, torch.Tensor] = {}
            for name, t in ckpt.iter_shard(shard):
                nbytes = t.numel() * t.element_size()
                if name in targets:
                    if check_hashes and sha256_tensor(t) != expected[name]:
                        if not allow_base_mismatch:
                            _mismatch([name], ckpt, False)  # raises before anything is kept
                        mismatched.append(name)
                    delta = adapter.delta_weight(targets[name], tuple(t.shape))
                    t = (t.float() + delta).to(dtype or t.dtype)
                elif dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                if t.is_floating_point():
                    out_dtypes.add(str(t.dtype).removeprefix("torch."))
                tensors[name] = t.contiguous()
                bar.advance(task, nbytes)
            save_file(tensors, str(dst / shard), metadata={"format": "pt"})
            del tensors
    if mismatched:
        _mismatch(mismatched, ckpt, True)  # one warning for all of them
    if (ckpt.path / "model.safetensors.index.json").is_file() or len(ckpt.shards) > 1:
        index = {"metadata": {"total_size": sum((dst / s).stat().st_size for s in ckpt.shards)},
                 "weight_map": dict(sorted(ckpt.weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config" and not k.startswith("lowbitpack")}
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in SIDECAR_FILES:
        if f != "config.json" and (ckpt.path / f).is_file():
            shutil.copy2(ckpt.path / f, dst / f)
    return {"merged_tensors": len(targets), "mismatched": mismatched, "dtypes": sorted(out_dtypes)}


# ---------------------------------------------------------------------------------------------- errors
@torch.no_grad()
def restore_errors(bundle: Bundle, ckpt: SourceCheckpoint, art: Artifact, folded: bool) -> dict[str, Any]:
    """Relative Frobenius errors on the adapted tensors, computed in float32.

    folded:   ‖deq(Q_j(W + ΔW)) − (W + ΔW)‖ / ‖W + ΔW‖  (what folding the adapter into the j-bit base loses)
    unfolded: ‖deq(Q_j(W)) − W‖ / ‖W‖                      (the restored base's own quantization error)
    plus ‖ΔW‖ / ‖W‖ for scale: a fold error far above it means the fold erased the adapter.
    """
    adapter = bundle.adapter
    targets = {adapter.kind.base_tensor(m): m for m in adapter.modules}
    per: dict[str, dict[str, float]] = {}
    by_shard: dict[str, list[str]] = {}
    for name in targets:
        by_shard.setdefault(ckpt.weight_map[name], []).append(name)
    for shard, names in by_shard.items():
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            for n in sorted(names):
                w = f.get_tensor(n).float()
                delta = adapter.delta_weight(targets[n], tuple(w.shape))
                ref = w + delta if folded else w
                err = (art.dense(n, torch.float32) - ref).norm() / ref.norm().clamp_min(1e-30)
                per[n] = {"rel_error": float(err), "adapter_rel_norm": float(delta.norm() / w.norm().clamp_min(1e-30))}
    errs = [v["rel_error"] for v in per.values()]
    adapter_norms = [v["adapter_rel_norm"] for v in per.values()]
    return {"what": "fold_error" if folded else "base_error", "mean": sum(errs) / len(errs), "max": max(errs),
            "adapter_rel_norm_mean": sum(adapter_norms) / len(adapter_norms), "tensors": per}


# ---------------------------------------------------------------------------------------------- main flow
def merge_bundle(
    bundle: str | Path,
    out: str | Path,
    *,
    restore: int = 16,
    original: str | Path | None = None,
    fold: bool = False,
    scheme: str | None = None,
    fmt: str | None = None,
    dtype: str | None = None,
    group_size: int | None = None,
    calib: str | Path | None = None,
    allow_base_mismatch: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Restore the bundle's base to `restore` bits from the original and apply the adapter. Returns the merge
    manifest (also written to OUT/lowbitpack_merge.json)."""
    fmt = _check_options(restore, fold, scheme, fmt, dtype)
    used_scheme, note = restore_scheme(restore, scheme) if restore != 16 else ("none", None)
    check_output(out, force)
    b = open_bundle(bundle)
    ckpt = resolve_original(b, original)
    t0 = time.perf_counter()
    out_dtype = _DTYPES[dtype] if dtype else None
    errors = None
    qalora_report = None
    with atomic_dir(out, force) as tmp:
        if restore == 16:
            dst = tmp if fmt == "hf" else tmp / ".merged"
            dst.mkdir(exist_ok=True)
            report = write_merged_checkpoint(b, ckpt, dst, dtype=out_dtype, allow_base_mismatch=allow_base_mismatch,
                                             progress=progress)
            mismatched = report["mismatched"]
            if fmt != "hf":
                _export(fmt, dst, tmp, progress)
            merged = True
        elif fold and b.adapter.type == "qalora" and scheme in (None, "qalora"):
            # QA-LoRA: ΔW is constant per group, so it folds exactly into the offsets (lowbitpack.flows.qalora).
            from .flows.qalora import export_folded, quantize_folded
            mismatched = verify_original(b, ckpt, allow_base_mismatch)
            art_dir = tmp / ".artifact"
            qalora_report = quantize_folded(b, ckpt, art_dir, bits=restore, group_size=group_size, progress=progress)
            used_scheme = "qalora"
            errors = restore_errors(b, ckpt, Artifact.open(art_dir), folded=True)
            if fmt == "ours":
                _move_contents(art_dir, tmp)
            else:
                qalora_report["export"] = export_folded(fmt, art_dir, tmp, bits=restore, fold_report=qalora_report,
                                                        progress=progress)
            merged = True
        else:
            if note:
                warnings.warn(note, UserWarning, stacklevel=2)
            mismatched = verify_original(b, ckpt, allow_base_mismatch)
            src_for_quant = ckpt
            if fold:
                merged_dir = tmp / ".merged"
                merged_dir.mkdir()
                write_merged_checkpoint(b, ckpt, merged_dir, dtype=out_dtype, allow_base_mismatch=True,
                                        check_hashes=False, progress=progress)  # verified above
                src_for_quant = SourceCheckpoint.open(merged_dir)
            art_dir = tmp / ".artifact"
            from .api import quantize as api_quantize  # the public quantize: calibration included
            api_quantize(src_for_quant.path, art_dir, used_scheme, group_size=group_size, calib=calib,
                         progress=progress, bits=restore if used_scheme == "qalora" else None)  # qalora: width
            if fold:
                _point_source_at_original(art_dir, ckpt, b)
            art = Artifact.open(art_dir)
            errors = restore_errors(b, ckpt, art, folded=fold)
            if fmt == "ours":
                _move_contents(art_dir, tmp)
            else:
                _export(fmt, art_dir, tmp, progress)
            if not fold:  # the adapter type decides what goes beside (QWHA: without its init correction)
                b.adapter.kind.write_unmerged(b.path, tmp, b.adapter.modules, b.adapter.config)
            merged = fold
        for hidden in (".merged", ".artifact"):
            shutil.rmtree(tmp / hidden, ignore_errors=True)
        manifest = _merge_manifest(b, ckpt, restore=restore, scheme=used_scheme, note=note, fold=fold, merged=merged,
                                   fmt=fmt, dtype=dtype, mismatched=mismatched, allow=allow_base_mismatch,
                                   errors=errors, seconds=time.perf_counter() - t0)
        if qalora_report is not None:
            manifest["restore"]["qalora_fold"] = qalora_report
        if not (tmp / "README.md").exists():
            (tmp / "README.md").write_text(_merged_card(manifest), encoding="utf-8")
        # sha256 of every file written, so `lowbitpack verify` detects a modified or corrupted merge output
        manifest["files"] = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                             for f in sorted(tmp.iterdir()) if f.is_file() and f.name != MERGE_MANIFEST}
        (tmp / MERGE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _export(fmt: str, src: Path, tmp: Path, progress: bool) -> None:
    """Hand `src` (HF checkpoint or our artifact) to lowbitpack.export.<fmt>; its files land in `tmp`."""
    from .export import EXPORTERS
    dst = tmp / ".export"
    EXPORTERS[fmt](src, dst, force=False, progress=progress)
    _move_contents(dst, tmp)
    shutil.rmtree(dst, ignore_errors=True)


def _move_contents(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        target = dst / f.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.rename(f, target)


def _point_source_at_original(art_dir: Path, ckpt: SourceCheckpoint, b: Bundle) -> None:
    """A folded artifact was quantized from a temporary merged checkpoint: record the real origin instead."""
    mpath = art_dir / MANIFEST
    m = json.loads(mpath.read_text(encoding="utf-8"))
    ident = ckpt.source_identity()
    m["source"] = {**m["source"], "model_id": ident.get("model_id"),
                   "revision": ident.get("revision"), "path": str(ckpt.path.resolve()),
                   "shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards},
                   "merged_bundle": b.id}
    mpath.write_text(json.dumps(m, indent=1), encoding="utf-8")


def _merge_manifest(b: Bundle, ckpt: SourceCheckpoint, *, restore: int, scheme: str, note: str | None, fold: bool,
                    merged: bool, fmt: str, dtype: str | None, mismatched: list[str], allow: bool,
                    errors: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    base = b.base
    ident = ckpt.source_identity()
    return {
        "format": MERGE_FORMAT, "format_version": MERGE_FORMAT_VERSION,
        "producer": {"name": "lowbitpack", "version": __version__},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle": {"id": b.id, "path": str(b.path.resolve()), "adapter_type": b.adapter.type,
                   "modules": len(b.adapter.modules)},
        "trained_on": {"scheme": base.get("scheme"), "bits": base.get("bits"), "group_size": base.get("group_size"),
                       "artifact_manifest_sha256": (base.get("artifact") or {}).get("manifest_sha256"),
                       "model_id": base.get("model_id"), "revision": base.get("revision")},
        "restore": {"bits": restore, "scheme": scheme, "fallback": note, "fold": fold, "merged": merged,
                    "format": fmt, "dtype": dtype},
        "original": {"path": str(ckpt.path.resolve()), "model_id": ident.get("model_id"),
                     "revision": ident.get("revision"), "verified_tensors": len(base["tensors"]),
                     "mismatched": mismatched, "allow_base_mismatch": allow},
        "errors": errors,
        "timing": {"seconds": round(seconds, 3)},
    }


def _merged_card(m: dict[str, Any]) -> str:
    r = m["restore"]
    tags = ["lowbitpack", "plr", f"restore-{r['bits']}"] + ([str(r["scheme"])] if r["scheme"] != "none" else [])
    lines = ["---"]
    if m["original"].get("model_id"):
        lines.append(f"base_model: {json.dumps(str(m['original']['model_id']))}")
    if not r["merged"]:
        lines.append("library_name: peft")
    lines += ["tags:"] + [f"- {json.dumps(t)}" for t in tags] + ["---", ""]
    t = m["trained_on"]
    what = ("the adapter merged into the full-precision original" if r["bits"] == 16 else
            f"the original re-quantized to {r['bits']} bits ({r['scheme']}), "
            + ("QA-LoRA adapter folded exactly into the group offsets (codes and scales unchanged)"
               if r.get("qalora_fold") else
               "adapter folded in before quantizing" if r["fold"] else "adapter kept beside it (PEFT)"))
    lines += [f"# PLR-{r['bits']} restore of {m['original'].get('model_id')}", "",
              f"Post-LoRA Restoration by lowbitpack {m['producer']['version']}: a {m['bundle']['adapter_type']} adapter "
              f"trained on a {t.get('bits') or ''}-bit {t.get('scheme')} base, applied to {what}.", "",
              f"Bundle id `{m['bundle']['id'][:16]}`; provenance in `lowbitpack_merge.json`."]
    if r["fallback"]:
        lines += ["", f"Note: {r['fallback']}."]
    return "\n".join(lines) + "\n"


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(info: dict) -> int:
    n = 1
    for s in info["shape"]:
        n *= s
    return n * _ITEMSIZE.get(info["dtype"], 4)


def verify_merge_output(path: Path) -> dict[str, Any]:
    """Check a merge output against the sha256 of every file in lowbitpack_merge.json (and, for PLR-j outputs in
    our format, the artifact manifest's own hashes). Raises IntegrityError / InputError."""
    _, n = verify_recorded_dir(path, MERGE_MANIFEST, MERGE_FORMAT, MERGE_FORMAT_VERSION, record_name="merge manifest",
                               producer="lowbitpack merge", rerun="re-run the merge")
    if (path / MANIFEST).is_file():
        Artifact.open(path, verify=True)
    return {"path": str(path), "kind": "merge", "files_checked": n, "ok": True}
