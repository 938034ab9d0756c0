"""The public functions. The CLI is a thin layer over these, with the same options."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import OptionError
from .flows.quantize import quantize_checkpoint
from .inspect import inspect_path
from .schemes import SCHEMES, make_scheme


def quantize(
    src: str | Path,
    out: str | Path,
    scheme: str = "nf4",
    *,
    group_size: int | None = None,
    bits: float | None = None,
    modules: str | None = None,
    calib: str | Path | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    seed: int = 0,
    damp: float = 0.01,
    act_order: bool = False,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = 2 * 1024**3,
    nproc: int | None = None,
) -> dict[str, Any]:
    """Quantize the HF checkpoint `src` (local dir or Hub id) into a packed artifact at `out`.

    Returns the artifact manifest (dict). Calibrated schemes (gptq*, lowra) read `calib` text (default:
    the offline KJV calibration split) for `calib_samples` sequences of `calib_seqlen` tokens.
    `nproc=N` runs N local ranks with torch.distributed (as under torchrun, which also works): same artifact
    bytes for RTN/NF4, see docs/SCALING.md.
    """
    if nproc is not None and nproc != 1:  # launch N ranks; each runs this function with RANK/WORLD_SIZE set
        call = {k: v for k, v in locals().items() if k != "nproc"}  # every parameter, as given
        from .dist import launch_quantize
        return launch_quantize(nproc, call)
    if scheme not in SCHEMES:
        raise OptionError(f"unknown scheme {scheme!r}", None, f"choose one of {', '.join(SCHEMES)}")
    if group_size is not None and group_size < 1:
        raise OptionError(f"--group-size must be positive, got {group_size}", None, "e.g. --group-size 128")
    opts: dict[str, Any] = {}
    if scheme.startswith("gptq"):
        opts = {"damp": damp, "act_order": act_order}
    try:
        sch = make_scheme(scheme, group_size=group_size, bits=bits, **opts)
    except ValueError as e:
        raise OptionError(str(e), None, "see `lowbitpack quantize --help`") from None
    from .dist import context_from_env
    par = context_from_env(device)  # one rank of several (torchrun / --nproc), else None
    precomputed = None
    extra = None
    if par is not None and scheme == "lowra":
        raise OptionError("--scheme lowra does not run distributed yet", None, "run it without --nproc / torchrun")
    if scheme == "lowra":
        # Global two-pass flow: statistics of all layers -> one exact bit allocation -> packing.
        from .flows.lowra import lowra_quantize
        from .io.atomic import check_output
        if group_size is not None:
            raise OptionError("--group-size does not apply to --scheme lowra (one codebook per row)", None,
                              "drop --group-size; --bits sets the average-bit budget")
        check_output(out, force)  # fail before minutes of calibration, not after
        precomputed, extra = lowra_quantize(
            src, sch, modules=modules, calib=calib, samples=calib_samples, seqlen=calib_seqlen, seed=seed,
            device=device, show_progress=progress)
    elif sch.needs_calibration:
        from .flows.calibrate import calibrated_quantize
        if par is not None:
            par.check_output(out, force)  # fail before minutes of calibration, not after
        precomputed, extra = calibrated_quantize(
            src, sch, modules=modules, calib=calib, samples=calib_samples, seqlen=calib_seqlen, seed=seed,
            device=device if par is None else par.device, show_progress=progress,
            **({} if par is None else {"parallel": par.calibration()}))
    if par is not None:  # divided reading, quantizing and writing; byte-identical artifact (lowbitpack.dist)
        return par.write_artifact(src, out, sch, modules=modules, force=force, show_progress=progress,
                                  max_shard_bytes=max_shard_size, precomputed=precomputed, extra_quantization=extra)
    return quantize_checkpoint(src, out, sch, modules=modules, force=force, show_progress=progress,
                               max_shard_bytes=max_shard_size, precomputed=precomputed,
                               extra_quantization=extra)


def inspect(path: str | Path) -> dict[str, Any]:
    """Per-tensor table and totals for a source checkpoint or an artifact."""
    return inspect_path(path)


def verify(path: str | Path) -> dict[str, Any]:
    """Check every file of an artifact, bundle, merge or export output against the sha256 recorded in its manifest;
    raises IntegrityError."""
    from .artifact import MANIFEST, Artifact
    from .errors import InputError
    p = Path(path)
    if not p.is_dir():
        raise InputError("no such directory", p, "pass an artifact, bundle or merge output directory")
    from .export.hf import EXPORT_MANIFEST, export_is_outermost, verify_export
    if export_is_outermost(p):  # an export (e.g. of a merged checkpoint, whose merge record it copied)
        return verify_export(p)
    merge_manifest = p / "lowbitpack_merge.json"
    if merge_manifest.is_file():  # merge outputs: every file's sha256 (+ the artifact's own check for PLR-j)
        from .restore import verify_merge_output
        return verify_merge_output(p)
    if (p / MANIFEST).is_file():
        art = Artifact.open(p, verify=True)
        return {"path": str(p), "kind": "artifact", "files_checked": len(art.manifest["shards"]), "ok": True}
    from .bundle import BUNDLE_MANIFEST, open_bundle
    if (p / BUNDLE_MANIFEST).is_file():
        b = open_bundle(p)  # checks every file's sha256 and the adapter against the recorded base
        return {"path": str(p), "kind": "bundle", "files_checked": len(b.manifest["files"]), "ok": True}
    if (p / EXPORT_MANIFEST).is_file():  # export outputs: every file's sha256 from lowbitpack_export.json
        return verify_export(p)
    raise InputError("nothing to verify: no lowbitpack manifest here", p,
                     "pass an artifact, bundle, merge or export output directory")


IMPORT_FORMATS = ("bnb", "gptq", "compressed-tensors")


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    format: str = "auto",
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Convert a checkpoint quantized by another tool (bitsandbytes 4/8-bit, GPTQ, compressed-tensors
    pack-quantized; local dir or Hub id) into a lowbitpack artifact at `out`, codes carried over unchanged.

    `format="auto"` reads `quantization_config.quant_method` in config.json (or a GPTQ quantize_config.json).
    The artifact then works like one from `quantize`: `export`, `train`, `bundle` and, with its `hf` export as the
    16-bit original, `merge --restore 16`. Returns the artifact manifest.
    """
    import json

    from .errors import InputError
    from .io.checkpoint import resolve_model_path
    if format not in ("auto", *IMPORT_FORMATS):
        raise OptionError(f"unknown import format {format!r}", None,
                          f"choose auto or one of {', '.join(IMPORT_FORMATS)}")
    path = resolve_model_path(src)
    if format == "auto":
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            cfg = {}
        qm = str(((cfg if isinstance(cfg, dict) else {}).get("quantization_config") or {}).get("quant_method", ""))
        format = {"bitsandbytes": "bnb", "gptq": "gptq", "compressed-tensors": "compressed-tensors"}.get(qm, "")
        if not format and (path / "quantize_config.json").is_file():
            format = "gptq"
        if not format:
            raise InputError(f"config.json names no importable quantization (quant_method {qm or 'missing'!r})",
                             path / "config.json", "pass a bitsandbytes, GPTQ or compressed-tensors checkpoint, or "
                             "quantize a full-precision one with `lowbitpack quantize`")
    if format == "bnb":
        from .importers.bnb import import_bnb as fn
    elif format == "gptq":
        from .importers.gptq import import_gptq as fn
    else:
        from .importers.compressed_tensors import import_compressed_tensors as fn
    res = fn(path, out, force=force, progress=progress, max_shard_size=max_shard_size)
    if "format_version" not in res:  # the compressed-tensors importer returns a summary: give the manifest
        from .artifact import MANIFEST
        res = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    return res


def default_model(refresh: bool = False) -> Path:
    """Path of the offline default model (SmolLM2-135M-Instruct, converted once from its Q4_1 GGUF)."""
    from .models import default_model_path
    return default_model_path(refresh)


def export(
    path: str | Path,
    out: str | Path,
    format: str = "hf",
    *,
    force: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Export an artifact (or, for hf/gguf, a merged HF checkpoint) at `path` to `format` in `out`.

    Formats: hf, bnb-nf4, bnb-int8, gptq, compressed-tensors, gguf. `options` go to the exporter, e.g.
    `dtype` (hf), `gguf_type` / `embed_type` / `exact_from_intg` (gguf), `strict` / `scale_dtype`
    (compressed-tensors). Returns the exporter's summary (exactness, files, sizes).
    """
    import inspect as _inspect

    from .export import EXPORT_FORMATS, EXPORTERS
    if format not in EXPORTERS:
        raise OptionError(f"unknown export format {format!r}", None, f"choose one of {', '.join(EXPORT_FORMATS)}")
    fn = EXPORTERS[format]
    params = _inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in options if k not in params)
        if unknown:
            raise OptionError(f"option(s) {', '.join(unknown)} do not apply to --format {format}", None,
                              "see `lowbitpack export --help`")
    return fn(path, out, force=force, progress=progress, **options)


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    card: str = "auto",
    timeout: float | None = None,
) -> dict[str, Any]:
    """Upload `path` to the Hub model repo `repo_id` in one commit with a generated model card (README.md).

    `card`: auto (keep a person's README.md, regenerate lowbitpack's), generate, keep. `dry_run=True` returns
    the file list and the card without contacting the Hub. The token (or HF_TOKEN / the saved login) is never
    printed or returned. `timeout`: seconds any single wait on the Hub may take (default $LOWBITPACK_HUB_TIMEOUT
    or 120), so a Hub that stops answering fails the push instead of hanging it.
    """
    from .hub import push as _push
    return _push(path, repo_id, private=private, revision=revision, dry_run=dry_run, token=token,
                 endpoint=endpoint, license=license, commit_message=commit_message, card=card, timeout=timeout)


def train(
    packed: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    use_rslora: bool = False,
    lr: float = 2e-4,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 4,
    seq_len: int = 128,
    seed: int = 42,
    device: str | None = None,
    dtype: str | None = None,
    cache_dense: bool | None = None,
    force: bool = False,
    progress: bool = True,
    adapter: str = "lora",
    qalora_group_size: int | None = None,
    n_frequency: int | None = None,
    scaling: float | None = None,
    qwha_init: str = "error",
    qwha_selection: str = "channel",
    random_loc_seed: int = 777,
    original: str | Path | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on the packed artifact `packed` (QLoRA-style); write a PEFT adapter dir at `out`.
    `packed` may be a full-precision HF checkpoint instead (plain 16-bit LoRA, the PLR baseline; `adapter="lora"`).

    `adapter="qalora"`: QA-LoRA (PEFT use_qalora; pooling group `qalora_group_size`, default the base's group).
    `adapter="qwha"`: QWHA (sparse Walsh–Hadamard spectrum, reference format): `n_frequency` per layer (default
    r·(in+out), a LoRA-r-sized budget), `scaling` (default 3000), `qwha_init` "error" (cancel W − Q(W), reads the
    `original` model, default the artifact's source) or "zeros", `qwha_selection` "channel" or "global".

    `data`: plain text or JSONL with a `text` field (default: the offline KJV training split). Returns the
    training record also written to OUT/lowbitpack_training.json (loss per step in OUT/train_log.jsonl).
    """
    if adapter == "qwha":
        if dropout or use_rslora or alpha != 16 or qalora_group_size is not None:
            raise OptionError("--alpha/--dropout/--rslora/--qalora-group-size do not apply to --adapter qwha", None,
                              "set the adapter's strength with --scaling and its size with --r or --n-frequency")
        from .adapters.qwha_train import DEFAULT_SCALING, train_qwha_adapter
        return train_qwha_adapter(packed, out, data=data, n_frequency=n_frequency, r=r,
                                  scaling=DEFAULT_SCALING if scaling is None else scaling,
                                  random_loc_seed=random_loc_seed, init=qwha_init, selection=qwha_selection,
                                  original=original, target_modules=target_modules, lr=lr, epochs=epochs,
                                  max_steps=max_steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                  device=device, dtype=dtype, cache_dense=cache_dense, force=force, progress=progress)
    if n_frequency is not None or scaling is not None or original is not None:
        raise OptionError("--n-frequency/--scaling/--original apply to --adapter qwha only", None,
                          "drop them, or pass --adapter qwha")
    from .train import train_adapter
    return train_adapter(packed, out, data=data, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                         use_rslora=use_rslora, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                         seq_len=seq_len, seed=seed, device=device, dtype=dtype, cache_dense=cache_dense,
                         force=force, progress=progress, adapter=adapter, qalora_group_size=qalora_group_size)


def bundle(
    adapter: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    trained_on: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Bundle the PEFT adapter dir `adapter` with the identity of `base` (the packed artifact it was trained on,
    or the original checkpoint); returns the bundle manifest (OUT/lowbitpack_bundle.json)."""
    from .bundle import create_bundle
    return create_bundle(adapter, base, out, trained_on=trained_on, force=force)


def merge(
    bundle: str | Path,
    out: str | Path,
    *,
    restore: int = 16,
    original: str | Path | None = None,
    fold: bool = False,
    scheme: str | None = None,
    format: str | None = None,
    dtype: str | None = None,
    group_size: int | None = None,
    calib: str | Path | None = None,
    allow_base_mismatch: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Post-LoRA Restoration: the bundle's base restored to `restore` bits from the original, plus the adapter.

    16: merged full-precision HF checkpoint; 8/4/3/2: re-quantized original with the adapter beside it, or folded
    in with `fold`. `format` hands the result to an exporter. Returns OUT/lowbitpack_merge.json's content.
    """
    from .restore import merge_bundle
    return merge_bundle(bundle, out, restore=restore, original=original, fold=fold, scheme=scheme, fmt=format,
                        dtype=dtype, group_size=group_size, calib=calib, allow_base_mismatch=allow_base_mismatch,
                        force=force, progress=progress)
