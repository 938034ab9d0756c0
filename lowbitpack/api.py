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
) -> dict[str, Any]:
    """Quantize the HF checkpoint `src` (local dir or Hub id) into a packed artifact at `out`.

    Returns the artifact manifest (dict). Calibrated schemes (gptq*, lowra) read `calib` text (default:
    the offline KJV calibration split) for `calib_samples` sequences of `calib_seqlen` tokens.
    """
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
    precomputed = None
    extra = None
    if sch.needs_calibration:
        from .flows.calibrate import calibrated_quantize
        precomputed, extra = calibrated_quantize(
            src, sch, modules=modules, calib=calib, samples=calib_samples, seqlen=calib_seqlen, seed=seed,
            device=device, show_progress=progress)
    return quantize_checkpoint(src, out, sch, modules=modules, force=force, show_progress=progress,
                               max_shard_bytes=max_shard_size, precomputed=precomputed,
                               extra_quantization=extra)


def inspect(path: str | Path) -> dict[str, Any]:
    """Per-tensor table and totals for a source checkpoint or an artifact."""
    return inspect_path(path)


def verify(path: str | Path) -> dict[str, Any]:
    """Check every file of an artifact against the sha256 recorded in its manifest; raises IntegrityError."""
    from .artifact import MANIFEST, Artifact
    p = Path(path)
    if (p / MANIFEST).is_file():
        art = Artifact.open(p, verify=True)
        return {"path": str(p), "kind": "artifact", "files_checked": len(art.manifest["shards"]), "ok": True}
    from .errors import InputError
    raise InputError("nothing to verify: no lowbitpack manifest here", p, "pass an artifact or bundle directory")


def default_model(refresh: bool = False) -> Path:
    """Path of the offline default model (SmolLM2-135M-Instruct, converted once from its Q4_1 GGUF)."""
    from .models import default_model_path
    return default_model_path(refresh)
