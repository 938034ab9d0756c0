"""Export intg-v1 artifacts to compressed-tensors `pack-quantized` (the format vLLM serves as W{b}A16).

Per quantized module `<m>` (weight [out, in], b bits, group G):
  <m>.weight_packed      int32 [out, ceil(in*b/32)]  codes, dense LSB-first bit stream across little-endian
                                                     int32 words (compressed-tensors >= the dense-packing
                                                     release; identical to older releases for b in 2, 4, 8)
  <m>.weight_scale       [out, G']                   the artifact's scales, dtype kept (fp16 -> exact)
  <m>.weight_zero_point  int32 [ceil(out*b/32), G']  zero points packed the same way along dim 0; only for
                                                     asymmetric groups (symmetric: every zero == 2^(b-1))
  <m>.weight_shape       int64 [2]                   (out, in)
compressed-tensors keeps codes signed (q_ct = q - 2^(b-1)) and packs q_ct + 2^(b-1), i.e. our unsigned codes:
the packed bits are our `qweight` bit stream, re-chunked into int32 words. w = s * (q_ct - zp_ct) = s * (q - z).

What cannot be represented, and what we do:
  * float offsets (w = s*q + m, QA-LoRA): compressed-tensors has integer zero points only. We round
    z = round(-m/s) and report the max abs weight error, or refuse with strict=True.
  * in % G != 0 (e.g. in=576, G=128): compressed-tensors needs G | in. The same weights are written exactly
    with G' = gcd(G, in) (scales repeated); reported as `regrouped`. Per bit width all tensors share the
    smallest such G' when it divides the others, so the checkpoint has one config group (see plan_group_sizes).
  * act-order g_idx: compressed-tensors >= 0.15 dropped `actorder: group` / weight_g_idx: refused (use
    `--format gptq`, which keeps g_idx).
  * nf4 / lowra layouts: not an integer grid: refused (use `--format bnb-nf4` or `--format hf`).
  * 3-bit (and 5-7): written densely as compressed-tensors 0.20 does; vLLM's W{b}A16 kernels take 4 and 8
    bits only (reported in `vllm_compatible`).
"""
from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, OptionError
from ..flows.progress import progress_bar
from ..io.atomic import atomic_dir, check_output
from ..io.writer import ShardWriter
from ..layouts.bitpack import pack_bits, packed_row_bytes, unpack_bits
from ..layouts.intg import default_g_idx
from .hf import clean_config, copy_sidecars, dtype_label, open_export_source, write_export_manifest, write_json

CT_FORMAT = "pack-quantized"
VLLM_BITS = (4, 8)
# The compressed-tensors release whose conventions these files follow (dense packing for any b in 1..8).
CT_VERSION_WRITTEN = "0.20.0"


# --- packing: our uint8 bit streams <-> compressed-tensors int32 words ---------------------------------------

def bytes_to_int32_words(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 [rows, ceil(n*b/8)] bit stream -> int32 [rows, ceil(n*b/32)] (little-endian words, zero-padded)."""
    rows = packed.shape[0]
    words = math.ceil(n * bits / 32)
    buf = torch.zeros(rows, words * 4, dtype=torch.uint8)
    buf[:, : packed.shape[1]] = packed
    out = buf.view(torch.int32)
    if sys.byteorder == "big":  # torch views native order; the format is little-endian
        out = buf.reshape(rows, words, 4).flip(-1).reshape(rows, words * 4).view(torch.int32)
    return out.contiguous()


def int32_words_to_bytes(words: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of `bytes_to_int32_words`: int32 [rows, W] -> uint8 [rows, ceil(n*b/8)]."""
    if words.dtype != torch.int32:
        raise ValueError(f"expected int32 words, got {words.dtype}")
    rows, w = words.shape
    if w != math.ceil(n * bits / 32):
        raise ValueError(f"packed row has {w} int32 words, expected {math.ceil(n * bits / 32)} for n={n}, bits={bits}")
    b = words.contiguous().view(torch.uint8).reshape(rows, w * 4)
    if sys.byteorder == "big":
        b = b.reshape(rows, w, 4).flip(-1).reshape(rows, w * 4)
    return b[:, : packed_row_bytes(n, bits)].contiguous()


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 [rows, n] -> int32 [rows, ceil(n*b/32)].

    Equal to compressed-tensors' pack_to_int32(q - 2^(b-1)) (tested)."""
    return bytes_to_int32_words(pack_bits(codes, bits), codes.shape[1], bits)


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [rows, W] -> unsigned codes uint8 [rows, n]."""
    return unpack_bits(int32_words_to_bytes(words, n, bits), bits, n)


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """zero uint8 [out, G] -> int32 [ceil(out*b/32), G]: packed along dim 0, as compressed-tensors stores them."""
    return pack_int32(zero.t().contiguous(), bits).t().contiguous()


def unpack_zero_points(words: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_int32(words.t().contiguous(), bits, out_features).t().contiguous()


# --- one tensor ------------------------------------------------------------------------------------------------

def ct_group_size(in_features: int, group_size: int) -> int:
    """Largest group size compressed-tensors accepts that re-expresses G exactly: G itself when G | in."""
    return group_size if in_features % group_size == 0 else math.gcd(group_size, in_features)


def plan_group_sizes(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Group size to write per quantized tensor (from manifest records, before reading any data).

    Per bit width, when the smallest exact group size divides all the others, every tensor uses it: one
    config group instead of several. transformers' `dequantize=True` loader applies a single scheme to all
    dense layers, so fewer groups also means more loaders work; finer groups are exact, they only repeat scales.
    """
    per_tensor = {n: ct_group_size(r["shape"][1], min(int(r["group_size"]), r["shape"][1]))
                  for n, r in records.items()}
    plan = dict(per_tensor)
    by_bits: dict[int, list[str]] = {}
    for n, r in records.items():
        by_bits.setdefault(int(r["bits"]), []).append(n)
    for names in by_bits.values():
        # channel-wise tensors (one group) stay channel-wise
        grouped = [n for n in names if per_tensor[n] < records[n]["shape"][1]]
        if not grouped:
            continue
        smallest = min(per_tensor[n] for n in grouped)
        if all(per_tensor[n] % smallest == 0 for n in grouped):
            for n in grouped:
                plan[n] = smallest
    return plan


def convert_intg(name: str, qt_tensors: dict[str, torch.Tensor], shape: tuple[int, int], bits: int,
                 group_size: int, target_group_size: int | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """intg-v1 stored tensors -> compressed-tensors tensors (keys without the module prefix) + facts.

    `target_group_size` must divide both `in` and `group_size` (default: `ct_group_size`).
    facts: symmetric, group_size (G' actually written), strategy, regrouped_from, offset_max_abs_error.
    """
    out_f, in_f = shape
    scale = qt_tensors["scale"]
    n_groups = scale.shape[1]
    g_idx = qt_tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int32), default_g_idx(in_f, group_size)):
        raise OptionError(f"{name} uses act-order (a permuted g_idx), which compressed-tensors no longer represents",
                          None, "export with --format gptq (keeps g_idx), or re-quantize without --act-order")
    facts: dict[str, Any] = {"offset_max_abs_error": 0.0}
    if "offset" in qt_tensors:
        # w = s*q + m  ->  s*(q - z) with integer z = round(-m/s): exact only when m is a multiple of s.
        s = scale.float()
        zf = -qt_tensors["offset"].float() / s
        z = torch.clamp(torch.round(zf), 0, (1 << bits) - 1)
        err = (s * z + qt_tensors["offset"].float()).abs()  # |w_ct - w| is constant over a group
        facts["offset_max_abs_error"] = float(err.max()) if err.numel() else 0.0
        zero = z.to(torch.uint8)
    else:
        zero = qt_tensors["zero"]
    symmetric = bool((zero == (1 << (bits - 1))).all())
    group_size = min(group_size, in_f)
    g_ct = target_group_size or ct_group_size(in_f, group_size)
    if in_f % g_ct or group_size % g_ct:
        raise ValueError(f"group size {g_ct} does not re-express groups of {group_size} over {in_f} columns")
    if g_ct != group_size:
        # Repeat each group's scale/zero over the finer groups it contains: the same weights, exactly.
        src_group = (torch.arange(in_f // g_ct) * g_ct) // group_size
        scale = scale[:, src_group]
        zero = zero[:, src_group]
        facts["regrouped_from"] = group_size
    n_ct = in_f // g_ct
    strategy = "channel" if n_ct == 1 else "group"
    tensors = {
        "weight_packed": bytes_to_int32_words(qt_tensors["qweight"], in_f, bits),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not symmetric:
        tensors["weight_zero_point"] = pack_zero_points(zero.contiguous(), bits)
    facts.update(symmetric=symmetric, group_size=None if strategy == "channel" else g_ct, strategy=strategy,
                 n_groups_in=n_groups)
    return tensors, facts


def dequantize_ct(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None) -> torch.Tensor:
    """Reference decode of one module's compressed-tensors tensors, in float32: s * (q - z) per group."""
    out_f, in_f = (int(x) for x in tensors["weight_shape"])
    q = unpack_int32(tensors["weight_packed"], bits, in_f).float()
    scale = tensors["weight_scale"].float()
    if "weight_zero_point" in tensors:
        z = unpack_zero_points(tensors["weight_zero_point"], bits, out_f).float()
    else:
        z = torch.full_like(scale, float(1 << (bits - 1)))
    g = in_f if group_size is None else group_size
    cols = torch.arange(in_f) // g
    return (q - z[:, cols]) * scale[:, cols]


def weights_args(bits: int, symmetric: bool, strategy: str, group_size: int | None) -> dict[str, Any]:
    """QuantizationArgs for weights as compressed-tensors serialises them (model_dump)."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "dynamic": False}


def build_quantization_config(groups: dict[tuple, list[str]], ignore: list[str]) -> dict[str, Any]:
    """config.json's quantization_config: one config group per distinct weight scheme (mixed precision)."""
    config_groups: dict[str, Any] = {}
    single = len(groups) == 1
    for i, (key, modules) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1:])))):
        bits, symmetric, strategy, gsize = key
        # One scheme for every quantized module: target the class, as llm-compressor writes it, and list the
        # unquantized linears in `ignore`. Mixed: exact module names (compressed-tensors matches names exactly).
        use_class = single and not any(m.endswith(_NON_LINEAR_SUFFIXES) or _EMBED.search(m) for m in modules)
        targets = ["Linear"] if use_class else sorted(modules)
        config_groups[f"group_{i}"] = {"targets": targets, "weights": weights_args(bits, symmetric, strategy, gsize),
                                       "input_activations": None, "output_activations": None, "format": CT_FORMAT}
    return {
        "config_groups": config_groups, "format": CT_FORMAT, "global_compression_ratio": None,
        "ignore": sorted(ignore), "kv_cache_scheme": None, "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "version": CT_VERSION_WRITTEN,
    }


# GPT-2 style Conv1D modules are not nn.Linear: name them instead of targeting the class.
_NON_LINEAR_SUFFIXES = ("c_attn", "c_proj", "c_fc")
_EMBED = re.compile(r"(embed|wte|wpe|tok_embeddings|word_embeddings)")


def export_compressed_tensors(
    path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    strict: bool = False,
    scale_dtype: str | torch.dtype | None = None,
    max_shard_size: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Write a compressed-tensors `pack-quantized` checkpoint of the intg-v1 artifact at `path` into `out`.

    Scales keep the artifact's dtype (fp16 for RTN/GPTQ: exact) unless `scale_dtype` is given; compressed-tensors
    computes s*(q - z) in the scale dtype, so fp32 scales make its decompression bit-exact with our reference.
    Codes, zeros and stored scales are carried over bit for bit; when offsets or a scale cast can change values,
    the tensor is decoded back (`dequantize_ct`) and compared with the artifact's reference dequantization:
    `max_abs_error` is 0 when the export is exact. Float offsets (QA-LoRA) are rounded to integer zero points;
    `strict=True` refuses any inexact tensor instead. Returns a summary with per-group facts.
    """
    from .hf import parse_dtype
    target_scale_dtype = parse_dtype(scale_dtype) if scale_dtype is not None else None
    check_output(out, force)
    src = open_export_source(path)
    if src.artifact is None:
        raise InputError("compressed-tensors export needs a lowbitpack artifact (packed codes), not a dense checkpoint",
                         src.path, "run `lowbitpack quantize` first, or export the dense model with --format hf")
    art = src.artifact
    for name, rec in art.tensors.items():
        if rec["scheme"] != "none" and rec["layout"] != "intg-v1":
            raise OptionError(f"{name} has layout {rec['layout']} (scheme {rec['scheme']}); compressed-tensors "
                              "pack-quantized holds integer grids (intg-v1) only", art.path,
                              "use --format bnb-nf4 for nf4 artifacts, or --format hf for a dense export")
        if rec["scheme"] != "none" and not name.endswith(".weight"):
            raise OptionError(f"quantized tensor {name} is not a module weight", art.path,
                              "compressed-tensors quantizes `<module>.weight` tensors only")
    t0 = time.perf_counter()
    groups: dict[tuple, list[str]] = {}
    facts_by_module: dict[str, dict] = {}
    # a tied lm_head has no tensor of its own but is still a Linear that "Linear" targets would match
    ignore: list[str] = [] if art.tensors.get("lm_head.weight", {}).get("scheme", "none") != "none" else ["lm_head"]
    worst_err = 0.0
    plan = plan_group_sizes({n: r for n, r in art.tensors.items() if r["scheme"] != "none"})
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        task = bar.add_task("export compressed-tensors", total=sum(src.nbytes(n) for n in src.names))
        writer = ShardWriter(tmp, "model", max_shard_size, metadata={"format": "pt"})
        for name, rec in art.tensors.items():
            if rec["scheme"] == "none":
                writer.add(name, art.dense(name))
                if len(rec["shape"]) == 2 and name.endswith(".weight") and not _EMBED.search(name):
                    ignore.append(name[: -len(".weight")])
                bar.advance(task, src.nbytes(name))
                continue
            module = name[: -len(".weight")]
            qt = art.quantized_tensor(name)
            bits = int(qt.bits)
            tensors, facts = convert_intg(name, qt.tensors, tuple(qt.shape), bits, int(qt.group_size), plan[name])
            if target_scale_dtype is not None:
                tensors["weight_scale"] = tensors["weight_scale"].to(target_scale_dtype)
            err = 0.0
            if "offset" in qt.tensors or target_scale_dtype is not None:
                # Only these can change values; codes, zeros and stored scales are carried over bit for bit.
                ref = art.dense(name, torch.float32)
                got = dequantize_ct(tensors, bits, facts["group_size"])
                err = float((got - ref).abs().max()) if ref.numel() else 0.0
                del ref
            facts["max_abs_error"] = err
            if strict and err > 0:
                why = ("stores float offsets that integer zero points only approximate" if "offset" in qt.tensors
                       else f"loses precision in {dtype_label(target_scale_dtype)} scales")
                raise OptionError(f"{name} {why} (max abs weight error {err:.3g})", art.path,
                                  "drop --strict to round and report, or export with --format gguf/hf")
            worst_err = max(worst_err, err)
            for key, t in tensors.items():
                writer.add(f"{module}.{key}", t)
            key = (bits, facts["symmetric"], facts["strategy"], facts["group_size"])
            groups.setdefault(key, []).append(module)
            facts_by_module[module] = {"bits": bits, **facts}
            bar.advance(task, src.nbytes(name))
        if not groups:
            raise InputError("the artifact has no quantized tensors", art.path, "export it with --format hf")
        shards = writer.finish()
        if len(shards) == 1:
            (tmp / "model.safetensors.index.json").unlink()
        qcfg = build_quantization_config(groups, sorted(set(ignore)))
        config = clean_config(src.config)
        config["quantization_config"] = qcfg
        write_json(tmp / "config.json", config)
        copied = copy_sidecars(src.sidecar_dir(), tmp)
        regrouped: dict[str, int] = {}
        for f in facts_by_module.values():
            if "regrouped_from" in f:
                k = f"{f['regrouped_from']}->{f['group_size']}"
                regrouped[k] = regrouped.get(k, 0) + 1
        bits_used = sorted({k[0] for k in groups})
        report = {
            "config_groups": {g: {"modules": len(mods), "bits": k[0], "symmetric": k[1], "strategy": k[2],
                                  "group_size": k[3]}
                              for g, (k, mods) in zip(qcfg["config_groups"], sorted(
                                  groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1:]))))},
            "quantized_modules": len(facts_by_module),
            "exact": worst_err == 0.0,
            "max_abs_error": worst_err,
            "scale_dtype": (dtype_label(target_scale_dtype) if target_scale_dtype is not None else "as stored"),
            "regrouped": regrouped,
            "vllm_compatible": all(b in VLLM_BITS for b in bits_used),
            "notes": ([f"{b}-bit weights: compressed-tensors decompresses them; vLLM's W4A16/W8A16 kernels take "
                       "4 or 8 bits only" for b in bits_used if b not in VLLM_BITS]
                      + ([f"inexact: max abs weight error {worst_err:.3g} (float offsets rounded to integer "
                          "zero points, or scales cast)"] if worst_err > 0 else [])),
            "shards": sorted(shards),
            "bytes": sum(s["bytes"] for s in shards.values()),
        }
        write_export_manifest(tmp, "compressed-tensors", src, report)
    return {"format": "compressed-tensors", "out": str(out), **report, "sidecars": copied,
            "seconds": round(time.perf_counter() - t0, 3)}
