"""QWHA adapters (peft_type "QWHA", reference: github.com/vantaa89/qwha, peft/src/peft/tuners/qwha/).

A QWHA layer computes y = wht(x) · (wht(W) + S)ᵀ / n, with `wht` the unnormalised Walsh–Hadamard transform
along the input dim (matrix M, n = in_features, see `lowbitpack.hadamard`) and S the sparse [out, in] matrix
holding spectrum · scaling / √out at the stored (row, col) indices. Since M·Mᵀ = n·I this is

    y = x · (W + S·M / n)ᵀ,   so   ΔW = S·M / n,   ΔW[r, :] = wht(S[r, :], transpose=True) / n.

The reference's own `merge()` adds S itself to W (`weight.data += get_delta_weight()`), which is not what its
unmerged forward computes; lowbitpack merges ΔW = S·M / n. `reference_merge_delta` gives the reference's
(wrong) quantity, for tests and for explaining the difference to users.

Saved keys (PEFT strips ".default" from the ParameterDict entry but not from buffer names):
  base_model.model.<module>.qwha_spectrum                 float [n]
  base_model.model.<module>.qwha_indices_<adapter>        int   [2, n]  (row, col)
  base_model.model.<module>.qwha_scaling_<adapter>        float scalar  (optional; else config `scaling`)
  base_model.model.<module>.qwha_n_frequency_<adapter>    int   scalar  (informational)
  base_model.model.<module>.qwha_random_loc_seed_<adapter> int  scalar  (informational)
The per-module tensors are the truth: the reference's initialisation script rewrites spectrum and indices
with a per-layer frequency count (rank·(in+out)) without updating `n_frequency` anywhere, so a count that
differs from the config is accepted. Duplicate (row, col) pairs add up, as the reference's sparse COO does.

Initialisation that cancels the training base's quantisation error (QWHA's idea; `lowbitpack train --adapter
qwha`) puts ΔW_init ≈ W − Q_k(W) into the adapter. That part belongs to the k-bit base: on a restored base
(W, or Q_j(W) with j > k) it adds the k-bit error back: W + ΔW_init of an untrained adapter (int3 RTN base,
LoRA-r16-sized budget on all seven projections) took SmolLM2-135M from perplexity 12.9 to 47.9 on 4080 held-out
KJV tokens, where the same ΔW_init on the int3 base improved 96.2 to 69.0. lowbitpack therefore writes
the initial spectrum beside the adapter (`lowbitpack_qwha_init.safetensors`: `<key>.qwha_spectrum_init` [n],
same indices) and, when it is present, merges and restores the learned part only:
ΔW = (spectrum − spectrum_init) at the same indices. Adapters without the file merge as saved. One exception:
an unmerged `merge --restore k` whose restored packed tensor is bit-identical to the training base's (same scheme,
bits, group size; checked against the stored-tensor sha256 the bundle recorded) keeps the saved spectrum for that
module, because there ΔW_init cancels exactly the error it was fitted to and PLR-k must give back the trained model.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..hadamard import hadamard_factors, wht
from .base import PREFIX, AdapterKind

_KEY = re.compile(r"^(?P<module>.+)\.qwha_(?:(?P<spectrum>spectrum)"
                  r"|(?P<role>indices|scaling|n_frequency|random_loc_seed)_(?P<adapter>[A-Za-z0-9_]+))$")
_INTEGER_ROLES = ("indices", "n_frequency", "random_loc_seed")
INIT_FILE = "lowbitpack_qwha_init.safetensors"  # initial spectra of an error-init adapter (see module docstring)
INIT_SUFFIX = ".qwha_spectrum_init"


def spectrum_values(spectrum: torch.Tensor, scaling: float, out_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The nonzeros of S: spectrum · scaling / √out (the reference's `get_delta_weight`)."""
    return spectrum.to(dtype) * (float(scaling) / math.sqrt(out_features))


def sparse_spectrum_matrix(spectrum: torch.Tensor, indices: torch.Tensor, scaling: float,
                           shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense S [out, in] (duplicates summed). Differentiable in `spectrum`."""
    out_f, in_f = shape
    s = torch.zeros(out_f, in_f, dtype=dtype, device=spectrum.device)
    rows, cols = indices[0].long().to(spectrum.device), indices[1].long().to(spectrum.device)
    return s.index_put((rows, cols), spectrum_values(spectrum, scaling, out_f, dtype), accumulate=True)


def qwha_delta(spectrum: torch.Tensor, indices: torch.Tensor, scaling: float, shape: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW = S·M / n [out, in] with the fast transform: only rows of S that hold a nonzero are made dense and
    transformed (row r of S·M is wht(S[r], transpose=True)); no n×n matrix is formed."""
    out_f, in_f = shape
    rows, cols = indices[0].long(), indices[1].long()
    present, row_slot = torch.unique(rows, return_inverse=True)
    dense_rows = torch.zeros(len(present), in_f, dtype=dtype, device=spectrum.device)
    dense_rows.index_put_((row_slot.to(spectrum.device), cols.to(spectrum.device)),
                          spectrum_values(spectrum, scaling, out_f, dtype), accumulate=True)
    delta = torch.zeros(out_f, in_f, dtype=dtype, device=spectrum.device)
    delta[present.to(spectrum.device)] = wht(dense_rows, transpose=True) / in_f
    return delta


def reference_merge_delta(spectrum: torch.Tensor, indices: torch.Tensor, scaling: float, shape: tuple[int, int],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the reference's `QWHALinear.merge()` adds to W: S itself (not S·M / n). Kept to show the bug."""
    return sparse_spectrum_matrix(spectrum, indices, scaling, shape, dtype)


def qwha_forward(x: torch.Tensor, weight: torch.Tensor, spectrum: torch.Tensor, indices: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """The reference's unmerged forward, literally: F.linear(wht(x), wht(W) + S) / n (no bias)."""
    out_f, in_f = weight.shape
    s = sparse_spectrum_matrix(spectrum, indices, scaling, (out_f, in_f), x.dtype)
    return (wht(x) @ (wht(weight.to(x.dtype)) + s).t()) / in_f


def module_scaling(parts: dict[str, torch.Tensor], config: dict[str, Any]) -> float:
    """The per-module scaling tensor when saved, else the config's `scaling` (reference default 150)."""
    if "scaling" in parts:
        return float(parts["scaling"].reshape(-1)[0])
    return float(config.get("scaling", 150.0))


def learned_spectrum(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The spectrum a restored base gets: minus the initial (error-cancelling) spectrum when one was saved."""
    if "spectrum_init" in parts:
        return parts["spectrum"].float() - parts["spectrum_init"].float()
    return parts["spectrum"]


def _attach_init_spectra(modules: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Add role "spectrum_init" from the sidecar file, when the adapter has one (validated like the weights)."""
    if not path.exists() and not path.is_symlink():
        return
    from ..io.checkpoint import load_safetensors_file
    if path.is_symlink() or not path.is_file():
        raise InputError(f"{INIT_FILE} is not a regular file", path, "copy the real file or remove it")
    tensors = load_safetensors_file(path)
    expected = {f"{PREFIX}{m}{INIT_SUFFIX}": m for m in modules}
    if set(tensors) != set(expected):
        extra = sorted(set(tensors) ^ set(expected))
        raise InputError(f"initial spectra do not match the adapter's modules, e.g. {extra[0]!r}", path,
                         "remove the file (the adapter then merges as saved) or re-train")
    for key, t in tensors.items():
        parts = modules[expected[key]]
        if not t.is_floating_point() or t.shape != parts["spectrum"].shape or not torch.isfinite(t).all():
            raise InputError(f"{key} must be a finite float vector shaped like qwha_spectrum "
                             f"{tuple(parts['spectrum'].shape)}", path, "the file is malformed; re-train")
        parts["spectrum_init"] = t


def restored_artifact_dir(out_dir: Path) -> Path | None:
    """Where `merge --restore j` (unmerged) keeps the restored artifact when the adapter is written beside it: OUT
    itself for `--format ours`, else OUT/.artifact (removed only after the adapter files are written)."""
    for d in (out_dir, out_dir / ".artifact"):
        if (d / "lowbitpack.json").is_file():
            return d
    return None


def same_as_training_base(bundle_dir: Path, artifact_dir: Path | None,
                          modules: dict[str, dict[str, torch.Tensor]]) -> set[str]:
    """Modules whose packed base tensor in `artifact_dir` is bit-identical to the one recorded in the bundle (the
    training base: same scheme, layout, bits, group size and sha256 of every stored tensor). For those the error
    the initial spectrum cancels is exactly the restored base's, so it must stay. Empty without an artifact or
    when the bundle was made against a full-precision checkpoint."""
    import json

    from ..artifact import Artifact
    from ..io.hashing import sha256_tensor
    if artifact_dir is None:
        return set()
    try:
        base = json.loads((bundle_dir / "lowbitpack_bundle.json").read_text(encoding="utf-8"))["base"]
    except (OSError, ValueError, KeyError):
        return set()
    if base.get("kind") != "artifact":
        return set()
    art = Artifact.open(artifact_dir)
    same = set()
    for module in modules:
        name = module + ".weight"
        trained, rec = base.get("tensors", {}).get(name), art.tensors.get(name)
        if not trained or not rec or not trained.get("stored_sha256") or rec["scheme"] == "none":
            continue
        if any(trained.get(k) != rec.get(k) for k in ("scheme", "layout", "bits", "group_size", "shape")):
            continue
        stored = art._read(list(rec["stored"].values()))
        if {k: sha256_tensor(stored[v]) for k, v in rec["stored"].items()} == trained["stored_sha256"]:
            same.add(module)
    return same


class QwhaKind(AdapterKind):
    name = "qwha"

    card_use_note = ("QWHA is not in upstream PEFT: load the adapter with the QWHA reference's PEFT fork "
                     "(github.com/vantaa89/qwha), or use the merged checkpoint (`--restore 16`), which needs nothing.")

    def card_summary(self, config: dict[str, Any], n_modules: int) -> str:
        return (f"QWHA, n_frequency={config.get('n_frequency')} (per-layer counts may differ), "
                f"scaling={config.get('scaling')}, {n_modules} modules")

    def integer_tensor(self, key: str) -> bool:
        m = _KEY.match(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        return bool(m and m.group("role") in _INTEGER_ROLES)

    def check_config(self, config: dict[str, Any], where: Path) -> None:
        if str(config.get("peft_type", "")).upper() != "QWHA":
            raise InputError(f"peft_type {config.get('peft_type')!r} is not QWHA", where, "pass a QWHA adapter")
        if config.get("fan_in_fan_out"):
            raise InputError("fan_in_fan_out=True QWHA adapters are not supported (the reference transforms the "
                             "stored [in, out] weight along the wrong dim)", where, "train on nn.Linear layers")
        bias = config.get("bias") or "none"
        if bias != "none":
            raise InputError(f"bias={bias!r} adapters train base biases, which merge does not apply", where,
                             "train with bias='none'")
        if config.get("modules_to_save"):
            raise InputError(f"modules_to_save={config['modules_to_save']!r} is not supported", where,
                             "train without modules_to_save (QWHA on the projections only)")
        scaling = config.get("scaling", 150.0)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise InputError(f"scaling={scaling!r} is not a finite number", where, "re-save the adapter")

    def group_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                      where: Path) -> dict[str, dict[str, torch.Tensor]]:
        modules: dict[str, dict[str, torch.Tensor]] = {}
        names: dict[str, set[str]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key[len(PREFIX):])
            if m is None:
                raise InputError(f"unexpected tensor key {key!r}", where,
                                 "a QWHA adapter holds qwha_spectrum and qwha_indices_<adapter> per module")
            role = "spectrum" if m.group("spectrum") else m.group("role")
            parts = modules.setdefault(m.group("module"), {})
            if role in parts:
                raise InputError(f"module {m.group('module')} has two {role} tensors", where,
                                 "save one adapter per directory")
            parts[role] = t
            if m.group("adapter"):
                names.setdefault(m.group("module"), set()).add(m.group("adapter"))
        for module, parts in modules.items():
            if len(names.get(module, ())) > 1:
                raise InputError(f"module {module} mixes adapters {sorted(names[module])}", where,
                                 "save one adapter per directory")
            for need in ("spectrum", "indices"):
                if need not in parts:
                    raise InputError(f"module {module} lacks qwha_{need}", where,
                                     "the adapter file is incomplete; re-save it")
            spec, idx = parts["spectrum"], parts["indices"]
            if spec.ndim != 1 or not spec.is_floating_point():
                raise InputError(f"module {module}: qwha_spectrum must be a float vector, got {spec.dtype} "
                                 f"{tuple(spec.shape)}", where, "the adapter file is malformed")
            if idx.ndim != 2 or idx.shape[0] != 2 or idx.shape[1] != spec.shape[0] or idx.is_floating_point():
                raise InputError(f"module {module}: qwha_indices {idx.dtype} {tuple(idx.shape)} is not integer "
                                 f"[2, {spec.shape[0]}] (row, col)", where, "the adapter file is malformed")
            if "scaling" in parts:
                sc = parts["scaling"]
                if sc.numel() != 1 or not sc.is_floating_point() or not math.isfinite(float(sc.reshape(-1)[0])):
                    raise InputError(f"module {module}: qwha_scaling must be one finite float", where,
                                     "the adapter file is malformed")
                cfg = config.get("scaling")
                if isinstance(cfg, (int, float)) and not math.isclose(float(sc.reshape(-1)[0]), float(cfg),
                                                                      rel_tol=1e-6):
                    # The reference's loaders disagree on which wins, so the adapter has no single meaning.
                    raise InputError(f"module {module}: qwha_scaling {float(sc.reshape(-1)[0])} differs from the "
                                     f"config's scaling {cfg}", where,
                                     "make adapter_config.json's scaling match the saved tensors")
            for role in ("n_frequency", "random_loc_seed"):
                if role in parts and (parts[role].numel() != 1 or parts[role].is_floating_point()):
                    raise InputError(f"module {module}: qwha_{role} must be one integer", where,
                                     "the adapter file is malformed")
        _attach_init_spectra(modules, where.parent / INIT_FILE)
        return modules

    def extra_files(self, adapter_dir: Path) -> tuple[str, ...]:
        f = adapter_dir / INIT_FILE
        return (INIT_FILE,) if f.exists() or f.is_symlink() else ()

    def write_unmerged(self, bundle_dir: Path, out_dir: Path, modules: dict[str, dict[str, torch.Tensor]],
                       config: dict[str, Any]) -> None:
        """Beside a restored base goes the learned part: the saved spectrum minus the initial one; except for modules
        whose restored packed tensor is bit-identical to the one the adapter was trained on (restore at the training
        scheme, bits and group size): their initial spectrum cancels exactly the error it was fitted to, so they keep
        the saved spectrum and the PLR-k output is the trained model (see `same_as_training_base`)."""
        if not any("spectrum_init" in parts for parts in modules.values()):
            return super().write_unmerged(bundle_dir, out_dir, modules, config)
        import shutil

        from safetensors.torch import load_file, save_file
        keep = same_as_training_base(bundle_dir, restored_artifact_dir(out_dir), modules)
        shutil.copyfile(bundle_dir / "adapter_config.json", out_dir / "adapter_config.json")
        tensors = load_file(str(bundle_dir / "adapter_model.safetensors"))
        for module, parts in modules.items():
            if module in keep or "spectrum_init" not in parts:
                continue
            key = f"{PREFIX}{module}.qwha_spectrum"
            tensors[key] = (parts["spectrum"].float() - parts["spectrum_init"].float()).to(tensors[key].dtype)
        save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})

    def check_shapes(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any], where: Path) -> None:
        if len(base_shape) != 2:
            raise InputError(f"module {module}: QWHA adapts 2-D weights, the base tensor has shape "
                             f"{list(base_shape)}", where, "the adapter was trained on a different model")
        out_f, in_f = base_shape
        idx = parts["indices"]
        if idx.numel():
            rmin, rmax = int(idx[0].min()), int(idx[0].max())
            cmin, cmax = int(idx[1].min()), int(idx[1].max())
            if rmin < 0 or cmin < 0 or rmax >= out_f or cmax >= in_f:
                raise InputError(f"module {module}: indices reach row {rmax} / col {cmax} but the base weight is "
                                 f"{list(base_shape)} [out, in]", where, "the adapter was trained on a different model")
        try:
            hadamard_factors(in_f)
        except ValueError as e:
            raise InputError(f"module {module}: {e}", where, "QWHA cannot adapt this layer") from None

    def delta_weight(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any]) -> torch.Tensor:
        out_f, in_f = base_shape
        spectrum = learned_spectrum(parts)
        return qwha_delta(spectrum, parts["indices"], module_scaling(parts, config), (out_f, in_f))

    def describe_config(self, config: dict[str, Any]) -> dict[str, Any]:
        keys = ("peft_type", "n_frequency", "scaling", "random_loc_seed", "target_modules", "n_frequency_pattern",
                "init_weights", "fan_in_fan_out", "bias", "base_model_name_or_path", "task_type")
        return {k: config.get(k) for k in keys if k in config}


KIND = QwhaKind()

__all__ = ["INIT_FILE", "KIND", "QwhaKind", "learned_spectrum", "module_scaling", "qwha_delta", "qwha_forward",
           "reference_merge_delta", "restored_artifact_dir", "same_as_training_base", "sparse_spectrum_matrix",
           "spectrum_values"]
