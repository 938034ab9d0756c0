"""Import a bitsandbytes checkpoint (4-bit NF4/FP4 or LLM.int8, as transformers saves it) as an artifact.

4-bit weights become layout nf4-bnb-v1 with the same bytes: packed codes, absmax (codes), nested absmax, both
code maps and the offset are carried over unchanged, so dequantization equals bitsandbytes' exactly. FP4 weights
use the same layout with their own `quant_map` (scheme `fp4`: decoded exactly, but lowbitpack cannot quantize
to FP4 itself). Int8 weights become intg-v1 codes q = CB + 128 with zero 128 and one group per row,
scale = SCB / 127 in f32, plus the original SCB (stored key `bnb_scb`) so that a bnb-int8 export gives back
CB and SCB bit for bit.

The quantized tensors' `sha256` in the manifest hashes the dequantized weight in the model dtype (the original
float weights are not available); `params.imported_from` and `params.sha256_of` say so.
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
from ..layouts.intg import LAYOUT as INTG_LAYOUT
from ..layouts.intg import dequantize_intg
from ..layouts.nf4 import LAYOUT as NF4_LAYOUT
from ..layouts.nf4 import dequantize_nf4
from ..qtensor import QuantizedTensor

_QS_SUFFIX = ".quant_state.bitsandbytes__"
_4BIT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INT8_SCB_KEY = "bnb_scb"  # read back by lowbitpack.export.bnb


def _parse_state(raw: torch.Tensor, where: Path, name: str) -> dict[str, Any]:
    try:
        state = json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{name} is not valid JSON", where, "the checkpoint is damaged; re-save it") from None
    for key in ("quant_type", "blocksize", "dtype", "shape"):
        if key not in state:
            raise InputError(f"{name} lacks {key!r}", where, "the checkpoint is damaged; re-save it")
    return state


def convert_4bit(weight_name: str, read, names: set[str], where: Path) -> QuantizedTensor:
    """One bnb 4-bit weight (`<weight_name>` + its quant_state tensors) -> nf4-bnb-v1, same bytes."""
    qs_names = [n for n in (f"{weight_name}{_QS_SUFFIX}nf4", f"{weight_name}{_QS_SUFFIX}fp4") if n in names]
    state = _parse_state(read(qs_names[0]), where, qs_names[0])
    qtype = state["quant_type"]
    if qtype not in ("nf4", "fp4"):
        raise InputError(f"{weight_name}: quant_type {qtype!r} is not a bitsandbytes 4-bit type", where,
                         "re-save the model with bnb_4bit_quant_type nf4 or fp4")
    shape = tuple(int(s) for s in state["shape"])
    n = 1
    for s in shape:
        n *= s
    packed = read(weight_name).contiguous().reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bnb_4bit_quant_storage other than uint8: same bytes
    if packed.numel() != (n + 1) // 2:
        raise InputError(f"{weight_name}: {packed.numel()} packed bytes for shape {list(shape)} (expected "
                         f"{(n + 1) // 2})", where, "the checkpoint is damaged; re-save it")
    tensors = {"qweight": packed.clone()}
    for key in _4BIT_KEYS:
        if f"{weight_name}.{key}" in names:
            tensors[key] = read(f"{weight_name}.{key}")
    if "absmax" not in tensors or "quant_map" not in tensors:
        raise InputError(f"{weight_name}: absmax or quant_map is missing", where, "the checkpoint is incomplete")
    blocksize = int(state["blocksize"])
    nested = "nested_absmax" in state or "nested_offset" in state
    params: dict[str, Any] = {"quant_type": qtype, "blocksize": blocksize, "double_quant": nested,
                              "imported_from": "bitsandbytes", "sha256_of": "dequantized"}
    if nested:
        if "nested_absmax" not in tensors or "nested_quant_map" not in tensors:
            raise InputError(f"{weight_name}: nested_absmax or nested_quant_map is missing", where,
                             "the checkpoint is incomplete")
        if str(state.get("nested_dtype", "float32")) != "float32":
            raise InputError(f"{weight_name}: nested_dtype {state.get('nested_dtype')!r} is not float32", where,
                             "re-save the model with a current bitsandbytes")
        params.update({"nested_blocksize": int(state.get("nested_blocksize", 256)),
                       "offset": float(state["nested_offset"])})
    else:
        tensors["absmax"] = tensors["absmax"].float()
    n_blocks = -(-n // blocksize)
    if tensors["absmax"].numel() != n_blocks:
        raise InputError(f"{weight_name}: {tensors['absmax'].numel()} absmax values for {n_blocks} blocks", where,
                         "the checkpoint is damaged; re-save it")
    try:
        dtype = dtype_from_name(str(state["dtype"]))
    except ValueError:
        raise InputError(f"{weight_name}: unsupported dtype {state['dtype']!r}", where,
                         "re-save the model in float16, bfloat16 or float32") from None
    return QuantizedTensor(scheme=qtype, layout=NF4_LAYOUT, bits=4, group_size=blocksize, shape=shape,
                           dtype=dtype, tensors=tensors, params=params)


def convert_int8(module: str, read, names: set[str], dtype: torch.dtype, where: Path) -> QuantizedTensor:
    """One LLM.int8 weight (`<module>.weight` int8 + `<module>.SCB`) -> intg-v1 (q = CB + 128, zero 128)."""
    fmt_name = f"{module}.weight_format"
    if fmt_name in names:
        fmt = read(fmt_name)
        if int(fmt.reshape(-1)[0]) != 0:
            raise InputError(f"{module}: weight_format {int(fmt.reshape(-1)[0])} is not row-major (0)", where,
                             "re-save the model with a current bitsandbytes (row format)")
    cb = read(f"{module}.weight")
    if cb.dtype != torch.int8 or cb.ndim != 2:
        raise InputError(f"{module}.weight is {cb.dtype} {list(cb.shape)}, expected int8 [out, in]", where,
                         "the checkpoint is not an LLM.int8 export")
    scb = read(f"{module}.SCB").float().reshape(-1)
    out_f, in_f = cb.shape
    if scb.numel() != out_f:
        raise InputError(f"{module}.SCB has {scb.numel()} values for {out_f} rows", where, "the checkpoint is damaged")
    q = (cb.to(torch.int16) + 128).to(torch.uint8)
    scale = (scb * 7.874015718698502e-3).reshape(out_f, 1)  # bitsandbytes' 1/127
    zero = torch.full((out_f, 1), 128, dtype=torch.uint8)
    return QuantizedTensor(scheme="int8", layout=INTG_LAYOUT, bits=8, group_size=in_f, shape=(out_f, in_f),
                           dtype=dtype, tensors={"qweight": q, "scale": scale, "zero": zero, INT8_SCB_KEY: scb},
                           params={"imported_from": "bitsandbytes", "sha256_of": "dequantized"})


def import_bnb(src_dir: str | Path, out: str | Path, force: bool = False, progress: bool = True,
               max_shard_size: int = 2 * 1024**3) -> dict[str, Any]:
    """Convert the bitsandbytes checkpoint `src_dir` into a lowbitpack artifact at `out`; returns its manifest."""
    check_output(out, force)
    ckpt = SourceCheckpoint.open(src_dir)
    cfg_path = ckpt.path / "config.json"
    qcfg = ckpt.config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "bitsandbytes":
        raise InputError("config.json has no bitsandbytes quantization_config", cfg_path,
                         "pass a checkpoint saved by transformers with BitsAndBytesConfig (4-bit or 8-bit)")
    dtype_name = str(ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "bfloat16")
    try:
        model_dtype = dtype_from_name(dtype_name.removeprefix("torch."))
    except ValueError:
        model_dtype = torch.bfloat16
    infos = ckpt.tensor_infos()
    names = set(infos)
    four_bit = sorted(n.rsplit(_QS_SUFFIX, 1)[0] for n in infos if _QS_SUFFIX in n)
    eight_bit = sorted(n[: -len(".SCB")] for n in infos if n.endswith(".SCB") and f"{n[:-4]}.weight" in names)
    if four_bit and eight_bit:
        raise InputError("the checkpoint mixes 4-bit and 8-bit bitsandbytes weights", ckpt.path,
                         "import one kind at a time")
    if not four_bit and not eight_bit:
        raise InputError("no bitsandbytes-quantized weights (no *.quant_state.bitsandbytes__* or *.SCB tensors)",
                         ckpt.path, "the checkpoint was not saved pre-quantized; quantize it with `lowbitpack quantize`")
    if four_bit:
        owned = {f"{w}{_QS_SUFFIX}{t}" for w in four_bit for t in ("nf4", "fp4")}
        owned |= {f"{w}.{k}" for w in four_bit for k in _4BIT_KEYS} | set(four_bit)
        weights = four_bit
    else:
        owned = {f"{m}.{k}" for m in eight_bit for k in ("weight", "SCB", "weight_format")}
        weights = [f"{m}.weight" for m in eight_bit]
    read = TensorReader(ckpt)
    t0 = time.perf_counter()
    kinds: dict[str, int] = {}
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        source = {**ckpt.source_identity(), "path": str(ckpt.path.resolve()),
                  "shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards}}
        quant: dict[str, Any] = {"imported_from": "bitsandbytes", "bitsandbytes": qcfg,
                                 "modules": "^(?:" + "|".join(re.escape(w) for w in weights) + ")$"}
        if four_bit:
            quant.update({"scheme": str(qcfg.get("bnb_4bit_quant_type", "nf4")),
                          "double_quant": bool(qcfg.get("bnb_4bit_use_double_quant", False))})
        else:
            quant.update({"scheme": "int8", "bits": 8})
        writer = ArtifactWriter(tmp, source, quant, max_shard_size)
        task = bar.add_task("import bitsandbytes", total=len(infos))
        weight_set = set(weights)
        for name in infos:  # index / shard order, one weight at a time
            if name in owned:
                if name in weight_set:
                    if four_bit:
                        qt = convert_4bit(name, read, names, ckpt.path)
                        dense = dequantize_nf4(qt.tensors, qt.shape, qt.params, qt.dtype)
                    else:
                        qt = convert_int8(name[: -len(".weight")], read, names, model_dtype, ckpt.path)
                        dense = dequantize_intg(qt.tensors, qt.shape, 8, int(qt.group_size), qt.dtype)
                    writer.add_quantized(name, qt, sha256_tensor(dense))
                    kinds[qt.scheme] = kinds.get(qt.scheme, 0) + 1
                    del dense
                bar.advance(task, 1)
                continue
            t = read(name)
            writer.add_kept(name, t, sha256_tensor(t))
            bar.advance(task, 1)
        if len(kinds) == 1:
            quant["scheme"] = next(iter(kinds))
        writer.copy_sidecars(ckpt.path)
        # The artifact's config.json describes the dense model; the bnb config is kept in the manifest.
        cfg = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        manifest = writer.finish({"timing": {"seconds": round(time.perf_counter() - t0, 3)}})
    return manifest
