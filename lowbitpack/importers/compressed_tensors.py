"""Import a compressed-tensors `pack-quantized` checkpoint (e.g. from llm-compressor) as an intg-v1 artifact.

The codes are carried over bit for bit: compressed-tensors packs q_ct + 2^(b-1) (= our unsigned code) as a
dense LSB-first bit stream in little-endian int32 words, which is our `qweight` byte stream re-chunked.
Releases before 0.20 packed 3/5/6/7-bit codes floor(32/b) per word (high bits unused): read too (by row width, or
by the config's `version` when both widths agree). Zero points: unpacked from int32 along dim 0 (current
releases) or read as int8 [out, G] (releases before zero-point packing); symmetric schemes get zero = 2^(b-1). `weight_g_idx` (old act-order checkpoints) becomes
our `g_idx`. Strategies: group, channel, tensor. Activation-quantized (W8A8, FP8, NVFP4 ...) checkpoints and
other formats are refused.

Quantized tensors' `sha256` in the manifest hashes the dequantized weight in the model dtype (the original
float weights are not available), and `params.imported_from` says so.
"""
from __future__ import annotations

import json
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
from ..layouts.bitpack import pack_bits
from ..layouts.intg import LAYOUT, default_g_idx, dequantize_intg
from ..qtensor import QuantizedTensor
from ..export.compressed_tensors import int32_words_to_bytes, unpack_zero_points

_QKEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def _match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _is_class_target(target: str) -> bool:
    """`Linear`, `LlamaDecoderLayer` ...: class names cannot be checked without the model; treat as wildcards."""
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def scheme_for(module: str, qcfg: dict[str, Any]) -> dict[str, Any] | None:
    ignore = qcfg.get("ignore") or []
    if any(_match(module, t) for t in ignore if not _is_class_target(t)):
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        targets = group.get("targets") or []
        if any(_match(module, t) for t in targets if not _is_class_target(t)):
            return group
    for group in (qcfg.get("config_groups") or {}).values():
        if any(_is_class_target(t) for t in group.get("targets") or []):
            return group
    return None


def _legacy_unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Releases before dense packing: 32 // b codes per int32 word, high bits unused (matters for 3/5/6/7 bits)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :n].to(torch.uint8)


DENSE_PACKING_SINCE = (0, 20)  # compressed-tensors release writing 3/5/6/7-bit codes densely (2/4/8: always dense)


def dense_packing(version: Any) -> bool:
    """Whether a checkpoint's `quantization_config.version` packs densely (unknown versions: assume current)."""
    m = re.match(r"(\d+)\.(\d+)", str(version or ""))
    return True if m is None else (int(m.group(1)), int(m.group(2))) >= DENSE_PACKING_SINCE


def unpack_weight_codes(packed: torch.Tensor, bits: int, in_features: int, where: Path,
                        dense: bool = True) -> torch.Tensor:
    """weight_packed int32 -> our qweight uint8 [out, ceil(in*b/8)] (same bit stream).

    The row width tells dense from legacy (floor(32/b) codes per word) packing; when both give the same width
    (short rows of 3/5/6/7-bit codes) `dense` (from the checkpoint's version) decides.
    """
    dense_words = -(-in_features * bits // 32)
    per = 32 // bits
    legacy_words = -(-in_features // per)
    if packed.shape[1] == dense_words and (dense or dense_words != legacy_words):
        return int32_words_to_bytes(packed, in_features, bits)
    if packed.shape[1] == legacy_words:
        return pack_bits(_legacy_unpack(packed, bits, in_features), bits)
    raise InputError(f"weight_packed has {packed.shape[1]} words per row; {bits}-bit rows of {in_features} need "
                     f"{dense_words}", where, "the checkpoint does not match its quantization_config")


def _convert_module(module: str, group: dict, read, names: set[str], dtype: torch.dtype,
                    where: Path, dense: bool = True) -> QuantizedTensor:
    args = group.get("weights") or {}
    bits = int(args.get("num_bits", 0))
    if args.get("type") != "int" or not 1 <= bits <= 8:
        raise InputError(f"{module}: weights are {args.get('type')}{bits}; only int1..int8 pack-quantized imports",
                         where, "import integer weight-only checkpoints (W4A16, W8A16 ...)")
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "channel")
    if strategy not in ("group", "channel", "tensor"):
        raise InputError(f"{module}: strategy {strategy!r} is not supported", where,
                         "import group, channel or tensor strategies")
    shape_t = read(f"{module}.weight_shape") if f"{module}.weight_shape" in names else None
    packed = read(f"{module}.weight_packed")
    scale = read(f"{module}.weight_scale")
    out_f = packed.shape[0]
    in_f = int(shape_t[-1]) if shape_t is not None else packed.shape[1] * 32 // bits
    if shape_t is not None and int(shape_t[0]) != out_f:
        raise InputError(f"{module}: weight_shape {shape_t.tolist()} does not match weight_packed rows {out_f}",
                         where, "the checkpoint is damaged")
    if scale.ndim < 2:
        scale = scale.reshape(1, 1).expand(out_f, 1)
    if scale.shape[0] == 1 and out_f > 1:
        scale = scale.expand(out_f, scale.shape[1])
    n_groups = scale.shape[1]
    group_size = in_f if n_groups == 1 else int(args.get("group_size") or -(-in_f // n_groups))
    if -(-in_f // group_size) != n_groups:
        raise InputError(f"{module}: {n_groups} scale columns do not fit in={in_f}, group_size={group_size}", where,
                         "the checkpoint does not match its quantization_config")
    qweight = unpack_weight_codes(packed, bits, in_f, where, dense)
    zp_name = f"{module}.weight_zero_point"
    if args.get("symmetric", True) or zp_name not in names:
        zero = torch.full((out_f, n_groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zp = read(zp_name)
        if zp.dtype == torch.int32 and zp.shape[0] == -(-out_f * bits // 32) and zp.shape[0] != out_f:
            zero = unpack_zero_points(zp, bits, out_f)
        elif tuple(zp.shape) == (out_f, n_groups) or zp.numel() in (1, n_groups):
            # Unpacked signed zero points (older releases): z = zp_ct + 2^(b-1).
            z = zp.reshape(-1, n_groups) if zp.numel() > 1 else zp.reshape(1, 1)
            zero = (z.to(torch.int32) + (1 << (bits - 1))).expand(out_f, n_groups).to(torch.uint8)
        else:
            raise InputError(f"{module}: weight_zero_point has unexpected shape {list(zp.shape)}", where,
                             "the checkpoint does not match its quantization_config")
    # bf16 scales widen to f32 exactly; intg-v1 stores f16 or f32.
    if scale.dtype not in (torch.float16, torch.float32):
        scale = scale.float()
    tensors = {"qweight": qweight, "scale": scale.contiguous(), "zero": zero.contiguous()}
    gi_name = f"{module}.weight_g_idx"
    if gi_name in names:
        g_idx = read(gi_name).to(torch.int32)
        if not torch.equal(g_idx, default_g_idx(in_f, group_size)):
            tensors["g_idx"] = g_idx
    return QuantizedTensor(scheme=f"int{bits}", layout=LAYOUT, bits=bits, group_size=group_size,
                           shape=(out_f, in_f), dtype=dtype, tensors=tensors,
                           params={"imported_from": "compressed-tensors", "sha256_of": "dequantized",
                                   "ct_strategy": strategy, "ct_symmetric": bool(args.get("symmetric", True))})


def import_compressed_tensors(
    src: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Convert the compressed-tensors pack-quantized checkpoint `src` into a lowbitpack artifact at `out`."""
    check_output(out, force)
    ckpt = SourceCheckpoint.open(src)
    cfg_path = ckpt.path / "config.json"
    qcfg = ckpt.config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "compressed-tensors":
        raise InputError("config.json has no compressed-tensors quantization_config", cfg_path,
                         "pass a checkpoint written by llm-compressor / compressed-tensors")
    for gname, group in (qcfg.get("config_groups") or {}).items():
        fmt = group.get("format") or qcfg.get("format")
        if fmt != "pack-quantized":
            raise InputError(f"config group {gname} has format {fmt!r}; only pack-quantized is imported", cfg_path,
                             "export it with llm-compressor's W4A16 / W8A16 (pack-quantized) recipes")
        if group.get("input_activations") or group.get("output_activations"):
            raise InputError(f"config group {gname} quantizes activations; only weight-only schemes are imported",
                             cfg_path, "import a W{b}A16 checkpoint")
    dtype_name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "bfloat16"
    try:
        dtype = dtype_from_name(str(dtype_name).removeprefix("torch."))
    except ValueError:
        dtype = torch.bfloat16
    infos = ckpt.tensor_infos()
    names = set(infos)
    modules = [n[: -len(".weight_packed")] for n in infos if n.endswith(".weight_packed")]
    if not modules:
        raise InputError("no *.weight_packed tensors", ckpt.path, "the checkpoint is not pack-quantized")
    owned = {f"{m}.{k}" for m in modules for k in _QKEYS}
    read = TensorReader(ckpt)
    t0 = time.perf_counter()
    bits_seen: dict[tuple, int] = {}
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        source = {**ckpt.source_identity(), "path": str(ckpt.path.resolve()),
                  "shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards}}
        module_set = set(modules)
        groups = {m: scheme_for(m, qcfg) for m in modules}
        missing = [m for m, g in groups.items() if g is None]
        if missing:
            raise InputError(f"module {missing[0]} has packed weights but no config group targets it", cfg_path,
                             "the checkpoint's quantization_config is inconsistent")
        keys = {(int(g["weights"]["num_bits"]), g["weights"].get("group_size")) for g in groups.values()}
        if len(keys) == 1:
            (b, gs), = keys
            quant = {"scheme": f"int{b}", "bits": b, "group_size": gs}
        else:
            quant = {"scheme": "mixed", "bits": sorted({k[0] for k in keys})}
        quant.update({"imported_from": "compressed-tensors", "compressed_tensors": qcfg,
                      "modules": "|".join(re.escape(m + ".weight") for m in sorted(modules))})
        writer = ArtifactWriter(tmp, source, quant, max_shard_size)
        task = bar.add_task("import compressed-tensors", total=len(infos))
        for name in infos:  # index / shard order: one tensor (or module) at a time
            if name in owned:
                module, _, key = name.rpartition(".")
                if key == "weight_packed" and module in module_set:
                    qt = _convert_module(module, groups[module], read, names, dtype, ckpt.path,
                                         dense_packing(qcfg.get("version")))
                    bits_seen[(qt.bits, qt.group_size)] = bits_seen.get((qt.bits, qt.group_size), 0) + 1
                    dense = dequantize_intg(qt.tensors, qt.shape, int(qt.bits), int(qt.group_size), dtype)
                    writer.add_quantized(f"{module}.weight", qt, sha256_tensor(dense))
                bar.advance(task, 1)
                continue
            t = read(name)
            writer.add_kept(name, t, sha256_tensor(t))
            bar.advance(task, 1)
        writer.copy_sidecars(ckpt.path)
        # The artifact's config.json describes the dense model; the compressed-tensors config lives in the manifest.
        cfg = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        manifest = writer.finish({"timing": {"seconds": round(time.perf_counter() - t0, 3)}})
    return {"out": str(out), "quantized": len(modules), "kept": len(infos) - len(owned & names),
            "schemes": {f"int{b}/g{g}": n for (b, g), n in sorted(bits_seen.items())},
            "summary": manifest["summary"], "seconds": round(time.perf_counter() - t0, 3)}
