"""Export an intg-v1 artifact (gptq2/3/4/8, int2/3/4/8 RTN, QA-LoRA groups) as a GPTQ checkpoint.

What GPTQModel (and transformers + optimum, which load through it) read, per quantized linear `<m>`:
  <m>.qweight  int32 [ceil(in·b/32), out]   codes packed LSB-first along the input: column o is row o's dense
                                            little-endian bit stream in 32-bit words (3-bit: 32 codes per 3 words)
  <m>.qzeros   int32 [G, ceil(out·b/32)]    zero points packed the same way along the output
  <m>.scales   fp16  [G, out]
  <m>.g_idx    int32 [in]                   group of each input column
plus `quantize_config.json` and `quantization_config` in config.json (quant_method "gptq", sym false).
Our `qweight` byte stream per row *is* that bit stream, so codes are carried over without unpacking.

Zero points. `checkpoint_format` "gptq_v2" stores z. "gptq" (v1, the default, what every loader knows) stores
z − 1, and readers differ on how: GPTQModel converts v1 → v2 by adding 0x11111111 (4-bit; 0x55555555 2-bit,
0x01010101 8-bit) to each packed word, and 3-bit by adding 1 to each field modulo 8. We write the exact
inverse of that (GPTQModel's own v2 → v1 conversion), so a v1 export is exact under GPTQModel, also for
groups whose zero point is 0. Legacy per-field decoders (AutoGPTQ/exllama/vLLM's `+1` after unpacking)
read such groups wrongly — inherent to v1 for asymmetric codes; the report counts them
(`zero_point_zero_groups`), and `version="v2"` avoids the issue for GPTQModel-based loaders.

Inexact cases are reported, never hidden: float offsets (QA-LoRA, w = s·q + m) are rounded to integer zero
points and float32 scales are cast to fp16; `max_abs_error` compares the exported weights with the
artifact's reference dequantization (0 when exact).
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, OptionError
from ..flows.progress import progress_bar
from ..io.atomic import atomic_dir, check_output
from ..io.writer import ShardWriter
from ..layouts.bitpack import pack_bits, unpack_bits
from ..layouts.intg import default_g_idx, dequantize_intg
from ..version import __version__
from .compressed_tensors import bytes_to_int32_words, int32_words_to_bytes
from .hf import clean_config, copy_sidecars, open_export_source, write_export_manifest, write_json

GPTQ_BITS = (2, 3, 4, 8)
# Group sizes GPTQModel's kernels accept (-1: one group per row).
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
VERSIONS = {"v1": "gptq", "v2": "gptq_v2"}
_WORD = 1 << 32


# --- packing ------------------------------------------------------------------------------------------------

def _v1_word_offset(bits: int) -> int:
    """The constant GPTQModel adds to each packed qzeros word to turn v1 into v2 (a 1 in every field)."""
    return sum(1 << (bits * j) for j in range(32 // bits))


def _wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values taken modulo 2^32 -> int32 with the same bit pattern."""
    x = x % _WORD
    return torch.where(x >= (1 << 31), x - _WORD, x).to(torch.int32)


def pack_gptq_qweight(qweight_bytes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Our qweight uint8 [out, ceil(in·b/8)] -> GPTQ qweight int32 [ceil(in·b/32), out] (same bit stream)."""
    return bytes_to_int32_words(qweight_bytes, in_features, bits).t().contiguous()


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """GPTQ qweight int32 [words, out] -> our qweight uint8 [out, ceil(in·b/8)] (padding bits cleared)."""
    raw = int32_words_to_bytes(qweight.t().contiguous(), in_features, bits)
    return pack_bits(unpack_bits(raw, bits, in_features), bits)


def pack_gptq_qzeros(zero: torch.Tensor, bits: int, version: str) -> torch.Tensor:
    """zero uint8 [out, G] -> qzeros int32 [G, ceil(out·b/32)] in checkpoint format v1 or v2."""
    z = zero.t().contiguous().to(torch.int32)
    out_f = z.shape[1]
    if version == "v1" and bits == 3:
        z = (z - 1) & 0x7  # GPTQModel shifts 3-bit v1 zeros field by field
    words = bytes_to_int32_words(pack_bits(z.to(torch.uint8), bits), out_f, bits)
    if version == "v1" and bits != 3:
        words = _wrap_int32((words.to(torch.int64) & 0xFFFFFFFF) - _v1_word_offset(bits))
    return words


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, version: str) -> torch.Tensor:
    """Inverse of `pack_gptq_qzeros`: qzeros int32 [G, W] -> zero uint8 [out, G]."""
    words = qzeros
    if version == "v1" and bits != 3:
        words = _wrap_int32((words.to(torch.int64) & 0xFFFFFFFF) + _v1_word_offset(bits))
    z = unpack_bits(int32_words_to_bytes(words.contiguous(), out_features, bits), bits, out_features)
    if version == "v1" and bits == 3:
        z = ((z.to(torch.int32) + 1) & 0x7).to(torch.uint8)
    return z.t().contiguous()


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int, in_features: int, version: str) -> torch.Tensor:
    """Reference decoding of one exported GPTQ module -> weight float32 [out, in] (for checks and tests)."""
    out_f = tensors["scales"].shape[1]
    q = unpack_bits(unpack_gptq_qweight(tensors["qweight"], bits, in_features), bits, in_features).float()
    z = unpack_gptq_qzeros(tensors["qzeros"], bits, out_f, version).float()
    g = tensors["g_idx"].long()
    return (q - z[:, g]) * tensors["scales"].float().t()[:, g]


# --- planning ---------------------------------------------------------------------------------------------------

def loaded_weights_max_diff(model: torch.nn.Module, artifact: Any) -> tuple[float, int]:
    """Max |W_loaded - W_ours| over the GPTQ linears of a model that GPTQModel or optimum loaded from our export,
    with the loader's own `dequantize_weight` run in float32 (its fp16 scales upcast for the call), against
    `artifact.dense(name, float32)`; and how many modules were compared. Used by the load-back tests and
    bench/gptq_smollm2.py."""
    worst, checked = 0.0, 0
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
            half = mod.scales
            mod.scales = half.float()
            w = mod.dequantize_weight().t().float()
            mod.scales = half
            worst = max(worst, float((w - artifact.dense(f"{name}.weight", torch.float32)).abs().max()))
            checked += 1
    return worst, checked


def _module_group_size(rec: dict[str, Any], n_groups: int) -> int:
    return -1 if n_groups == 1 else int(rec["group_size"])


def _check_tensor(name: str, rec: dict[str, Any], where: Path) -> None:
    if rec["layout"] != "intg-v1":
        raise OptionError(f"{name} has layout {rec['layout']} (scheme {rec['scheme']}); GPTQ stores integer "
                          "grids (intg-v1) only", where,
                          "re-quantize with --scheme gptq4 (or int4), or export with --format hf/bnb-nf4")
    if int(rec["bits"]) != rec["bits"] or int(rec["bits"]) not in GPTQ_BITS:
        raise OptionError(f"{name} has {rec['bits']}-bit codes; GPTQ checkpoints hold 2, 3, 4 or 8 bits", where,
                          "re-quantize with --scheme gptq4/gptq3/gptq2 or int8")
    if len(rec["shape"]) != 2 or not name.endswith(".weight"):
        raise OptionError(f"quantized tensor {name} is not a linear module's weight", where,
                          "GPTQ quantizes `<module>.weight` of linear layers only")


# --- export -----------------------------------------------------------------------------------------------------

def export_gptq(
    artifact_path: Path | str,
    out: Path | str,
    *,
    force: bool = False,
    progress: bool = True,
    version: str = "v1",
    max_shard_size: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Write the intg-v1 artifact at `artifact_path` as a GPTQ checkpoint at `out`; returns a report.

    `version` "v1" (checkpoint_format "gptq", default) or "v2" ("gptq_v2"). Codes, zeros and fp16 scales are
    carried over exactly; the report says what was not exact (`max_abs_error`, QA-LoRA offsets, f32 scales).
    """
    if version not in VERSIONS:
        raise OptionError(f"unknown GPTQ checkpoint version {version!r}", None, "use v1 (gptq) or v2 (gptq_v2)")
    check_output(out, force)
    src = open_export_source(artifact_path)
    if src.artifact is None:
        raise InputError("GPTQ export needs a lowbitpack artifact (packed codes), not a dense checkpoint", src.path,
                         "quantize it first: lowbitpack quantize SRC -o ART --scheme gptq4")
    art = src.artifact
    quantized = {n: r for n, r in art.tensors.items() if r["scheme"] != "none"}
    if not quantized:
        raise InputError("the artifact has no quantized tensors", art.path, "export it with --format hf")
    for name, rec in quantized.items():
        _check_tensor(name, rec, art.path)
    block_re = re.compile(r"^(.*\.layers)\.(\d+)\.(.+)\.weight$")
    outside = [n for n in quantized if not block_re.match(n) and n != "lm_head.weight"]
    if outside:
        raise OptionError(f"{outside[0]} is quantized outside the decoder layers; GPTQ checkpoints quantize the "
                          "layers' linears (and lm_head)", art.path, "re-quantize with the default --modules")

    # Per-module bits and GPTQ group size; the most common pair is the checkpoint's, others go to `dynamic`.
    n_groups = {n: math.ceil(r["shape"][1] / int(r["group_size"] or r["shape"][1])) for n, r in quantized.items()}
    gsizes = {n: _module_group_size(r, n_groups[n]) for n, r in quantized.items()}
    multi = Counter(gsizes[n] for n in quantized if gsizes[n] != -1)
    default_g = multi.most_common(1)[0][0] if multi else -1
    for n, r in quantized.items():
        g = gsizes[n]
        if g == -1 and default_g != -1 and r["shape"][1] <= default_g:
            gsizes[n] = default_g  # one group per row: the checkpoint's group size expresses it too
        if gsizes[n] not in GPTQ_GROUP_SIZES:
            raise OptionError(f"{n} uses group size {gsizes[n]}; GPTQ kernels take {list(GPTQ_GROUP_SIZES[1:])} "
                              "(or one group per row)", art.path, "re-quantize with --group-size 128")
        if int(r["bits"]) == 3 and (r["shape"][0] % 32 or r["shape"][1] % 32):
            raise OptionError(f"{n} has shape {r['shape']}; 3-bit GPTQ packs 32 codes per 3 words and needs in and "
                              "out divisible by 32", art.path, "use 2, 4 or 8 bits for this model")
    bits_of = {n: int(r["bits"]) for n, r in quantized.items()}
    default_bits = Counter(bits_of.values()).most_common(1)[0][0]

    # Linears inside the decoder layers that stay dense: GPTQModel reads `dynamic` negatives, optimum a list.
    block_modules: dict[str, set[str]] = {}
    for n in quantized:
        m = block_re.match(n)
        if m:
            block_modules.setdefault(m.group(1) + "." + m.group(2), set()).add(m.group(3))
    dense_in_blocks = []
    for n, r in art.tensors.items():
        m = block_re.match(n)
        if (r["scheme"] == "none" and m and len(r["shape"]) == 2 and m.group(1) + "." + m.group(2) in block_modules
                and not re.search(r"norm", m.group(3))):
            dense_in_blocks.append(n[: -len(".weight")])

    t0 = time.perf_counter()
    desc_act = False
    worst_err = 0.0
    zero_zero_groups = 0
    inexact: dict[str, float] = {}
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        task = bar.add_task(f"export gptq {version}", total=sum(src.nbytes(n) for n in src.names))
        writer = ShardWriter(tmp, "model", max_shard_size, metadata={"format": "pt"})
        for name, rec in art.tensors.items():
            if rec["scheme"] == "none":
                writer.add(name, art.dense(name))
                bar.advance(task, src.nbytes(name))
                continue
            module = name[: -len(".weight")]
            qt = art.quantized_tensor(name)
            out_f, in_f = qt.shape
            bits = bits_of[name]
            t = qt.tensors
            exact = True
            scale = t["scale"]
            if scale.dtype != torch.float16:
                exact = False
                scale = scale.to(torch.float16)
            if "offset" in t:
                # w = s·q + m  ≈  s·(q − z) with z = round(−m/s), clamped to the code range.
                exact = False
                zero = torch.clamp(torch.round(-t["offset"].float() / scale.float()), 0, (1 << bits) - 1).to(torch.uint8)
            else:
                zero = t["zero"]
            g_idx = t.get("g_idx")
            if g_idx is None:
                g_idx = default_g_idx(in_f, int(qt.group_size))
            else:
                g_idx = g_idx.to(torch.int32)
                gs = gsizes[name]
                if not torch.equal(g_idx, default_g_idx(in_f, in_f if gs == -1 else gs)):
                    desc_act = True
            gtensors = {
                "qweight": pack_gptq_qweight(t["qweight"], bits, in_f),
                "qzeros": pack_gptq_qzeros(zero, bits, version),
                "scales": scale.t().contiguous(),
                "g_idx": g_idx.contiguous(),
            }
            zero_zero_groups += int((zero == 0).sum())
            if not exact:
                ref = dequantize_intg(t, (out_f, in_f), bits, int(qt.group_size), torch.float32)
                err = float((dequantize_gptq(gtensors, bits, in_f, version) - ref).abs().max())
                inexact[name] = err
                worst_err = max(worst_err, err)
            for key, v in gtensors.items():
                writer.add(f"{module}.{key}", v)
            bar.advance(task, src.nbytes(name))
        shards = writer.finish()
        if len(shards) == 1:
            (tmp / "model.safetensors.index.json").unlink()

        qcfg = gptq_quantize_config(
            art.manifest.get("quantization", {}), bits=default_bits, group_size=default_g, desc_act=desc_act,
            version=version, lm_head="lm_head.weight" in quantized,
            dynamic=_dynamic(quantized, bits_of, gsizes, default_bits, default_g, dense_in_blocks),
            modules_in_block=_modules_in_block(block_modules) if dense_in_blocks else None)
        write_json(tmp / "quantize_config.json", qcfg)
        config = clean_config(src.config)
        config["quantization_config"] = qcfg
        write_json(tmp / "config.json", config)
        copied = copy_sidecars(src.sidecar_dir(), tmp)
        notes = []
        if version == "v1" and not any(q.startswith("gptqmodel:") for q in qcfg["meta"]["quantizer"]):
            notes.append("v1 with sym=False: transformers (+optimum) loads it; GPTQModel.load refuses asymmetric v1 "
                         "checkpoints it did not produce itself: export version v2 for GPTQModel")
        if version == "v1" and zero_zero_groups:
            notes.append(f"{zero_zero_groups} groups have zero point 0: exact in GPTQModel (and transformers through "
                         "it); legacy per-field v1 decoders read them wrongly; version v2 avoids that")
        ragged = [n for n in quantized if bits_of[n] == 4 and gsizes[n] > 0 and quantized[n]["shape"][1] % gsizes[n]]
        if ragged:
            notes.append(f"{len(ragged)} modules have in_features not divisible by the group size (e.g. {ragged[0]}): "
                         "the codes are exact, but GPTQModel's CPU int4 ATen kernel (its default 'torch' backend for "
                         "4-bit) refuses them at run time; load with backend gptq_torch")
        if inexact:
            notes.append(f"inexact: max abs weight error {worst_err:.3g} (float offsets rounded to integer zero "
                         "points, or scales cast to fp16)")
        if qcfg.get("dynamic") and any(k.startswith("+:") for k in qcfg["dynamic"]):
            notes.append("per-module bits/group sizes are in `dynamic`: GPTQModel reads them, optimum does not")
        report = {
            "checkpoint_format": VERSIONS[version], "bits": default_bits, "group_size": default_g,
            "desc_act": desc_act, "quantized_modules": len(quantized),
            "kept_tensors": len(art.tensors) - len(quantized), "dense_linears_in_layers": len(dense_in_blocks),
            "exact": not inexact, "max_abs_error": worst_err, "inexact_tensors": inexact,
            "zero_point_zero_groups": zero_zero_groups, "notes": notes,
            "shards": sorted(shards), "bytes": sum(s["bytes"] for s in shards.values()),
        }
        write_export_manifest(tmp, "gptq", src, report)
    return {"format": "gptq", "out": str(out), **report, "sidecars": copied,
            "seconds": round(time.perf_counter() - t0, 3)}


def _dynamic(quantized: dict[str, dict], bits_of: dict[str, int], gsizes: dict[str, int], default_bits: int,
             default_g: int, dense_in_blocks: list[str]) -> dict[str, dict]:
    dyn: dict[str, dict] = {}
    for n in quantized:
        over = {}
        if bits_of[n] != default_bits:
            over["bits"] = bits_of[n]
        if gsizes[n] != default_g:
            over["group_size"] = gsizes[n]
        if over:
            dyn[f"+:^{re.escape(n[: -len('.weight')])}$"] = over
    for m in dense_in_blocks:
        dyn[f"-:^{re.escape(m)}$"] = {}
    return dyn


def _modules_in_block(block_modules: dict[str, set[str]]) -> list[list[str]] | None:
    """optimum's `modules_in_block_to_quantize`, when every layer quantizes the same linears (else None)."""
    sets = {frozenset(s) for s in block_modules.values()}
    return [sorted(next(iter(sets)))] if len(sets) == 1 else None


def gptq_quantize_config(quantization: dict[str, Any], *, bits: int, group_size: int, desc_act: bool, version: str,
                         lm_head: bool = False, dynamic: dict | None = None,
                         modules_in_block: list[list[str]] | None = None) -> dict[str, Any]:
    """quantize_config.json / config.json `quantization_config` for a GPTQ export."""
    cfg: dict[str, Any] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": False,
        "checkpoint_format": VERSIONS[version], "pack_dtype": "int32", "true_sequential": True,
        "static_groups": False, "lm_head": lm_head,
    }
    if isinstance(quantization.get("damp"), (int, float)) and 0 < quantization["damp"] < 1:
        cfg["damp_percent"] = quantization["damp"]
    if dynamic:
        cfg["dynamic"] = dynamic
    if modules_in_block:
        cfg["modules_in_block_to_quantize"] = modules_in_block
    # An imported GPTQ checkpoint keeps the tools that produced its codes (GPTQModel reads this list: it loads
    # sym=False v1 checkpoints only when they name gptqmodel >= 0.9, whose zero-point convention we write).
    prior = ((quantization.get("gptq") or {}).get("meta") or {}).get("quantizer") or []
    prior = [prior] if isinstance(prior, str) else [q for q in prior if isinstance(q, str)]
    cfg["meta"] = {"quantizer": [q for q in prior if not q.startswith("lowbitpack:")] + [f"lowbitpack:{__version__}"],
                   "lowbitpack": {"scheme": quantization.get("scheme"), "calibration": quantization.get("calibration")}}
    return cfg
