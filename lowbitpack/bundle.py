"""Adapter bundles, format v1 (spec: formats/bundle-v1.md): a PEFT adapter plus what it was trained on.

A bundle is a directory:
  adapter_config.json, adapter_model.safetensors   the PEFT adapter, byte for byte
  lowbitpack_training.json, train_log.jsonl        training record and loss log (when trained by lowbitpack)
  README.md                                        model card (YAML front matter: base_model, library_name, tags)
  lowbitpack_bundle.json                           the manifest: adapter type/config, base identity + hashes

The base is identified by the sha256 of each tensor the adapter touches, both of the ORIGINAL tensor (from the
artifact manifest, so `merge --restore` can check the original it is given) and of the packed tensors the
adapter was trained against, plus the artifact manifest's sha256.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import ADAPTER_TYPES, get_kind
from .adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftAdapter, read_peft_adapter
from .artifact import MANIFEST, Artifact
from .errors import FormatVersionError, InputError, IntegrityError
from .io.atomic import atomic_dir, check_output
from .io.checkpoint import SourceCheckpoint
from .io.hashing import sha256_file, sha256_tensor
from .train import TRAIN_LOG, TRAINING_FORMAT, TRAINING_MANIFEST
from .version import __version__

BUNDLE_MANIFEST = "lowbitpack_bundle.json"
BUNDLE_FORMAT = "lowbitpack-bundle"
BUNDLE_FORMAT_VERSION = 1
CARD = "README.md"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class Bundle:
    """An opened, verified bundle."""

    path: Path
    manifest: dict[str, Any]
    adapter: PeftAdapter

    @property
    def id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def base(self) -> dict[str, Any]:
        return self.manifest["base"]

    def base_tensor_sha256(self) -> dict[str, str]:
        """Base tensor name -> sha256 of the ORIGINAL tensor the adapter was trained against."""
        return {n: r["sha256"] for n, r in self.base["tensors"].items()}


# ---------------------------------------------------------------------------------------------- create
def create_bundle(adapter_dir: str | Path, base: str | Path, out: str | Path, *, trained_on: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Bundle the PEFT adapter `adapter_dir` with the identity of `base` (a packed artifact, or the original HF
    checkpoint for adapters trained elsewhere / in 16 bits). Returns the bundle manifest."""
    check_output(out, force)
    adapter = read_peft_adapter(adapter_dir)
    base_rec = _base_record(Path(base).expanduser(), adapter, trained_on)
    training = _read_training(adapter.path)
    kind = adapter.kind
    with atomic_dir(out, force) as tmp:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) + kind.extra_files(adapter.path):
            shutil.copyfile(adapter.path / name, tmp / name)
        if training is not None:
            shutil.copyfile(adapter.path / TRAINING_MANIFEST, tmp / TRAINING_MANIFEST)
            log = adapter.path / TRAIN_LOG
            if log.is_file() and not log.is_symlink():
                shutil.copyfile(log, tmp / TRAIN_LOG)
        # Re-read the copies: what the manifest hashes is what the bundle holds.
        copied = read_peft_adapter(tmp)
        if copied.files != adapter.files:
            raise IntegrityError("the adapter changed while it was being copied", adapter.path, "try again")
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "producer": {"name": "lowbitpack", "version": __version__},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bundle_id": "",
            "adapter": {
                "type": adapter.type,
                "peft_type": adapter.config.get("peft_type"),
                "config": kind.describe_config(adapter.config),
                "modules": sorted(adapter.modules),
                "source_path": str(adapter.path.resolve()),
            },
            "base": base_rec,
            "training": training,
            "files": {},
        }
        (tmp / CARD).write_text(model_card(manifest), encoding="utf-8")
        manifest["files"] = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                             for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest["bundle_id"] = bundle_id(manifest)
        (tmp / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def bundle_id(manifest: dict[str, Any]) -> str:
    """sha256 over the adapter bytes and the base identity: equal bundles of the same adapter share it."""
    ident = {
        "adapter": {k: manifest["files"][k]["sha256"] for k in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)},
        "base": {n: [r["sha256"], r.get("stored_sha256")] for n, r in sorted(manifest["base"]["tensors"].items())},
        "artifact": (manifest["base"].get("artifact") or {}).get("manifest_sha256"),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _base_record(base: Path, adapter: PeftAdapter, trained_on: str | None) -> dict[str, Any]:
    if (base / MANIFEST).is_file():
        return _artifact_base(base, adapter, trained_on)
    if base.is_dir() and (base / "config.json").is_file():
        return _checkpoint_base(base, adapter, trained_on)
    raise InputError("--base is neither a lowbitpack artifact nor a Hugging Face checkpoint", base,
                     "pass the packed artifact the adapter was trained on (or the original model directory)")


def _artifact_base(path: Path, adapter: PeftAdapter, trained_on: str | None) -> dict[str, Any]:
    art = Artifact.open(path, verify=True)
    shapes = {n: tuple(r["shape"]) for n, r in art.tensors.items()}
    adapter.check_against(shapes, path)
    for module, base_name in adapter.base_tensors().items():  # adapter-type checks of the packed base (QA-LoRA)
        adapter.kind.check_base_record(module, art.tensors[base_name], adapter.config, path / MANIFEST)
    tensors = {}
    for name in sorted(adapter.base_tensors().values()):
        rec = art.tensors[name]
        stored = art._read(list(rec["stored"].values()))
        tensors[name] = {
            "shape": rec["shape"], "dtype": rec["dtype"], "scheme": rec["scheme"], "layout": rec["layout"],
            "bits": rec["bits"], "group_size": rec["group_size"], "sha256": rec["sha256"],
            "stored_sha256": {k: sha256_tensor(stored[v]) for k, v in sorted(rec["stored"].items())},
        }
    q = art.manifest["quantization"]
    src = art.manifest["source"]
    return {
        "kind": "artifact",
        "artifact": {"manifest_sha256": sha256_file(path / MANIFEST), "path": str(path.resolve()),
                     "format_version": art.manifest["format_version"], "producer": art.manifest.get("producer")},
        "model_id": src.get("model_id"), "revision": src.get("revision"), "source_path": src.get("path"),
        "source_shards": src.get("shards", {}),
        "scheme": trained_on or q.get("scheme"), "bits": q.get("bits"), "group_size": q.get("group_size"),
        "quantization": q,
        "tensors": tensors,
    }


def _checkpoint_base(path: Path, adapter: PeftAdapter, trained_on: str | None) -> dict[str, Any]:
    ckpt = SourceCheckpoint.open(path)
    infos = ckpt.tensor_infos()
    adapter.check_against({n: tuple(i["shape"]) for n, i in infos.items()}, path)
    wanted = set(adapter.base_tensors().values())
    tensors = {}
    for shard in ckpt.shards:
        if not wanted & {n for n, s in ckpt.weight_map.items() if s == shard}:
            continue
        for name, t in ckpt.iter_shard(shard):
            if name in wanted:
                tensors[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                 "scheme": "none", "layout": "dense", "bits": 8 * t.element_size(),
                                 "group_size": None, "sha256": sha256_tensor(t)}
    ident = ckpt.source_identity()
    return {
        "kind": "checkpoint", "artifact": None,
        "model_id": ident.get("model_id"), "revision": ident.get("revision"), "source_path": str(ckpt.path.resolve()),
        "source_shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards},
        "scheme": trained_on or "none", "bits": None, "group_size": None,
        "quantization": {"scheme": trained_on or "none", "declared": trained_on is not None},
        "tensors": dict(sorted(tensors.items())),
    }


def _read_training(adapter_dir: Path) -> dict[str, Any] | None:
    f = adapter_dir / TRAINING_MANIFEST
    if not f.exists() and not f.is_symlink():
        return None
    if f.is_symlink() or not f.is_file():
        raise InputError(f"{TRAINING_MANIFEST} is not a regular file", f, "remove it or copy the real file")
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not valid JSON ({e.__class__.__name__})", f, "remove or repair it") from None
    if not isinstance(rec, dict) or rec.get("format") != TRAINING_FORMAT:
        raise InputError(f"not a {TRAINING_FORMAT} record", f, "remove it; bundles record it only when valid")
    return rec


def model_card(manifest: dict[str, Any]) -> str:
    """README.md with YAML front matter the Hub reads (base_model, library_name: peft, tags)."""
    base = manifest["base"]
    cfg = manifest["adapter"]["config"]
    kind = get_kind(manifest["adapter"]["type"])
    scheme = base.get("scheme") or "none"
    tags = ["lowbitpack", manifest["adapter"]["type"], "peft", "plr"]
    if scheme != "none":
        tags.append(str(scheme))
    lines = ["---"]
    from .hub import hub_id
    if hub_id(base.get("model_id")):      # a local directory name is not a base_model the Hub can link
        lines.append(f"base_model: {json.dumps(str(base['model_id']))}")
    lines += ["library_name: peft", "tags:"] + [f"- {json.dumps(t)}" for t in tags] + ["---", ""]
    bits = f"{base['bits']}-bit " if base.get("bits") else ""
    trained = (f"{bits}{scheme} (group size {base.get('group_size')})" if scheme != "none"
               else "the full-precision model")
    lines += [
        f"# {manifest['adapter']['type'].upper()} adapter bundle for {base.get('model_id') or 'its base model'}",
        "",
        f"A PEFT {manifest['adapter']['type']} adapter trained on {base.get('model_id')} quantized to {trained}, "
        f"bundled by lowbitpack {manifest['producer']['version']} with the identity of that base (sha256 of "
        f"every tensor it touches), so it can be merged onto a restored base (Post-LoRA Restoration).",
        "",
        "| | |", "| --- | --- |",
        f"| adapter | {kind.card_summary(cfg, len(manifest['adapter']['modules']))} |",
        f"| trained on | {trained} |",
    ]
    tr = manifest.get("training")
    if tr:
        res, hp = tr.get("result", {}), tr.get("hparams", {})
        lines += [f"| training | {res.get('steps')} steps, batch {hp.get('batch_size')} x {hp.get('seq_len')} tokens,"
                  f" lr {hp.get('lr')}, final loss {res.get('final_loss', float('nan')):.4f} |",
                  f"| data | {tr.get('data', {}).get('source')} (sha256 {str(tr.get('data', {}).get('file_sha256'))[:12]}…) |"]
    lines += [
        "", "## Use", "",
        "```bash",
        "lowbitpack merge BUNDLE --restore 16 -o merged      # original weights + ΔW, plain HF checkpoint",
        "lowbitpack merge BUNDLE --restore 8 -o plr8         # PLR-8: int8 base + this adapter",
        "```", "",
        kind.card_use_note,
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- open
def open_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle: manifest structure and version, file hashes, adapter vs recorded base shapes."""
    path = Path(path).expanduser()
    mpath = path / BUNDLE_MANIFEST
    if not path.is_dir():
        raise InputError("no such bundle directory", path, "pass a directory written by `lowbitpack bundle`")
    if mpath.is_symlink() or not mpath.is_file():
        raise InputError(f"no {BUNDLE_MANIFEST}: not a lowbitpack bundle", path,
                         "create one with `lowbitpack bundle ADAPTER --base PACKED -o BUNDLE`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"manifest is not valid JSON ({e.__class__.__name__})", mpath, "re-create the bundle") from None
    validate_bundle_manifest(manifest, mpath)
    for name, info in manifest["files"].items():
        f = path / name
        if f.is_symlink():
            raise InputError(f"{name} is a symbolic link; refusing to follow it", path, "re-create the bundle")
        if not f.is_file():
            raise InputError(f"missing file {name}", path, "the bundle is incomplete; re-create it")
        if sha256_file(f) != info["sha256"]:
            raise IntegrityError(f"sha256 mismatch of {name}", f, "the file was modified or corrupted; re-create the bundle")
    adapter = read_peft_adapter(path)
    if adapter.type != manifest["adapter"]["type"]:
        raise InputError(f"adapter type {adapter.type!r} differs from the manifest's {manifest['adapter']['type']!r}",
                         mpath, "re-create the bundle")
    if sorted(adapter.modules) != sorted(manifest["adapter"]["modules"]):
        raise InputError("the adapter's modules differ from the manifest's", mpath, "re-create the bundle")
    shapes = {n: tuple(r["shape"]) for n, r in manifest["base"]["tensors"].items()}
    adapter.check_against(shapes, mpath)
    return Bundle(path=path, manifest=manifest, adapter=adapter)


def validate_bundle_manifest(m: Any, where: Path) -> None:
    """Structural checks at the boundary (the JSON schema in formats/ says the same, for other readers)."""
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise InputError(f"not a {BUNDLE_FORMAT} manifest", where, "pass a directory written by `lowbitpack bundle`")
    v = m.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise InputError("manifest has no integer format_version", where, "re-create the bundle")
    if v > BUNDLE_FORMAT_VERSION:
        raise FormatVersionError(f"bundle format_version {v} is newer than this lowbitpack reads "
                                 f"({BUNDLE_FORMAT_VERSION})", where, "upgrade lowbitpack: pip install -U lowbitpack")
    if v < 1:
        raise InputError(f"invalid format_version {v}", where, "re-create the bundle")

    def need(obj: Any, key: str, typ: type | tuple[type, ...], ctx: str) -> Any:
        if not isinstance(obj, dict) or not isinstance(obj.get(key), typ):
            raise InputError(f"manifest field {ctx}{key} is missing or malformed", where, "re-create the bundle")
        return obj[key]

    need(m, "bundle_id", str, "")
    adapter = need(m, "adapter", dict, "")
    base = need(m, "base", dict, "")
    files = need(m, "files", dict, "")
    if need(adapter, "type", str, "adapter.") not in ADAPTER_TYPES:
        raise InputError(f"unknown adapter type {adapter['type']!r}", where, "upgrade lowbitpack")
    need(adapter, "config", dict, "adapter.")
    modules = need(adapter, "modules", list, "adapter.")
    if not all(isinstance(x, str) for x in modules):
        raise InputError("manifest field adapter.modules must list strings", where, "re-create the bundle")
    need(base, "kind", str, "base.")
    tensors = need(base, "tensors", dict, "base.")
    for name, rec in tensors.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("shape"), list):
            raise InputError(f"base tensor record {name!r} is malformed", where, "re-create the bundle")
    for name, info in files.items():
        if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name or name == BUNDLE_MANIFEST:
            raise InputError(f"manifest names a file outside the bundle: {name!r}", where, "re-create the bundle")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise InputError(f"file record {name!r} is malformed", where, "re-create the bundle")
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if required not in files:
            raise InputError(f"manifest does not list {required}", where, "re-create the bundle")
    if m.get("training") is not None and not isinstance(m["training"], dict):
        raise InputError("manifest field training must be an object or null", where, "re-create the bundle")
