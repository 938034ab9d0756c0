"""Export to bitsandbytes checkpoints that `AutoModelForCausalLM.from_pretrained(out)` loads pre-quantized.

mode "nf4": every quantized linear weight becomes bitsandbytes' 4-bit layout (as `Linear4bit` saves it):
  <name>                                   uint8 [(n+1)//2, 1]  packed codes, high nibble = even element
  <name>.absmax                            uint8 [n_blocks]     (f32 without double quantization)
  <name>.quant_map                         f32 [16]
  <name>.nested_absmax                     f32 [ceil(n_blocks/256)]
  <name>.nested_quant_map                  f32 [256]
  <name>.quant_state.bitsandbytes__nf4     uint8 JSON bytes: quant_type, blocksize, dtype, shape,
                                           nested_blocksize, nested_dtype, nested_offset
mode "int8" (LLM.int8, as `Linear8bitLt` saves it): <module>.weight int8 [out, in], <module>.SCB f32 [out]
(row absmax), <module>.weight_format uint8 scalar 0 ("row").

Artifacts whose tensors are already nf4-bnb-v1 (NF4) keep their codes byte for byte; int8 tensors imported from
bitsandbytes keep CB and SCB; anything else is dequantized by the reference and quantized with bitsandbytes'
arithmetic (our NF4, `int8_rowwise`). Kept tensors are written as stored. config.json gets the
`quantization_config` that transformers' BitsAndBytesConfig writes; linear layers left unquantized are listed
in `llm_int8_skip_modules` so that transformers does not wrap them.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, OptionError
from ..flows.progress import progress_bar
from ..flows.select import compile_modules, is_selected
from ..io.atomic import atomic_dir, check_output
from ..io.writer import ShardWriter
from ..layouts.nf4 import LAYOUT as NF4_LAYOUT
from ..qtensor import QuantizedTensor
from ..schemes.nf4 import NF4
from .hf import clean_config, copy_sidecars, dtype_label, open_export_source, write_export_manifest, write_json

MODES = ("nf4", "int8")
INT8_SCB_KEY = "bnb_scb"  # intg-v1 records imported from bnb int8 keep SCB here (lowbitpack.importers.bnb)


def quant_state_json(qt: QuantizedTensor, shape: tuple[int, ...] | None = None) -> bytes:
    """The JSON of `quant_state.bitsandbytes__<type>`, key for key as `QuantState.as_dict(packed=True)` writes it."""
    p = qt.params
    state: dict[str, Any] = {"quant_type": p.get("quant_type", "nf4"), "blocksize": int(p["blocksize"]),
                             "dtype": dtype_label(qt.dtype), "shape": list(shape or qt.shape)}
    if p.get("double_quant", True):
        state.update({"nested_blocksize": int(p.get("nested_blocksize", 256)), "nested_dtype": "float32",
                      "nested_offset": float(p["offset"])})
    return json.dumps(state).encode("utf-8")


def bnb_4bit_tensors(name: str, qt: QuantizedTensor, shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """bitsandbytes' serialized tensors of one nf4-bnb-v1 weight `name` (e.g. `...q_proj.weight`)."""
    t = qt.tensors
    out = {name: t["qweight"].reshape(-1, 1).contiguous(), f"{name}.absmax": t["absmax"],
           f"{name}.quant_map": t["quant_map"].float()}
    if qt.params.get("double_quant", True):
        out[f"{name}.nested_absmax"] = t["nested_absmax"].float()
        out[f"{name}.nested_quant_map"] = t["nested_quant_map"].float()
    qtype = qt.params.get("quant_type", "nf4")
    out[f"{name}.quant_state.bitsandbytes__{qtype}"] = torch.tensor(list(quant_state_json(qt, shape)),
                                                                     dtype=torch.uint8)
    return out


def int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 weight quantization as `Int8Params` does it on CPU: fp16 cast, row absmax, round(w·127/absmax).

    Returns (CB int8 [out, in], SCB f32 [out]). An all-zero row gets codes 0 (bitsandbytes divides by zero there).
    """
    b = weight.to(torch.float16)
    scb = b.abs().max(dim=1).values.float()
    cb = torch.round(b * (127.0 / scb.unsqueeze(-1)))
    cb = torch.where((scb > 0).unsqueeze(-1), cb, torch.zeros_like(cb)).to(torch.int8)
    return cb, scb


def int8_dequantize(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' int8_vectorwise_dequant: CB · SCB · (1/127), f32."""
    return cb.float() * scb.float().view(-1, 1) * 7.874015718698502e-3


def bnb_quantization_config(mode: str, compute_dtype: str = "float32", double_quant: bool = True,
                            skip_modules: list[str] | None = None) -> dict[str, Any]:
    """`quantization_config` exactly as transformers' BitsAndBytesConfig.to_dict() writes it."""
    four = mode == "nf4"
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": compute_dtype if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4" if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def linear_modules(config_dir: Path) -> tuple[dict[str, str], str | None] | None:
    """{module name: "linear" | "conv1d"} of the model (built on the meta device) and its output-embedding
    module name; None when transformers cannot build the architecture."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D
        config = AutoConfig.from_pretrained(config_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - unknown architecture: fall back to tensor names
        return None
    kinds = {}
    for mname, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            kinds[mname] = "linear"
        elif isinstance(module, Conv1D):
            kinds[mname] = "conv1d"
    out_emb = model.get_output_embeddings()
    out_name = next((n for n, m in model.named_modules() if m is out_emb), None) if out_emb is not None else None
    return kinds, out_name


def _module_of(name: str) -> str | None:
    return name[: -len(".weight")] if name.endswith(".weight") else None


def export_bnb(artifact_path: Path, out: Path, *, mode: str = "nf4", force: bool = False, progress: bool = True,
               max_shard_size: int = 2 * 1024**3) -> dict[str, Any]:
    """Write a bitsandbytes checkpoint (`mode` "nf4" or "int8") of the artifact or dense HF checkpoint at
    `artifact_path` into `out`. Dense checkpoints get the default module selection of `lowbitpack quantize`.
    Returns a summary: counts of reused / re-quantized / kept tensors, the quantization_config, bytes."""
    if mode not in MODES:
        raise OptionError(f"unknown bitsandbytes mode {mode!r}", None, "use nf4 or int8")
    # Writing needs no bitsandbytes (pure torch); loading the result does. find_spec: importing it logs noise.
    bnb_missing = importlib.util.find_spec("bitsandbytes") is None
    check_output(out, force)
    src = open_export_source(artifact_path)
    t0 = time.perf_counter()
    found = linear_modules(src.path)
    kinds, out_emb = found if found is not None else ({}, None)
    default_pattern = compile_modules(None)

    def wanted(name: str) -> bool:
        """Is `name` exported quantized? Artifacts: what they quantized; dense sources: default selection."""
        module = _module_of(name)
        if module is None or len(src.shape(name)) != 2:
            return False
        if found is not None and module not in kinds:
            return False  # not a Linear/Conv1D (e.g. embeddings): transformers would not wrap it
        if src.artifact is not None:
            return src.is_quantized(name)
        return is_selected(name, src.shape(name), dtype_label(src.dtype(name)), default_pattern)

    nf4 = NF4()
    reused, requantized, dequantized, kept = [], [], [], []
    quantized_modules: set[str] = set()
    all_double = True
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        task = bar.add_task(f"export bnb-{mode}", total=sum(src.nbytes(n) for n in src.names))
        writer = ShardWriter(tmp, "model", max_shard_size, metadata={"format": "pt"})
        for name in src.names:
            if not wanted(name):
                if src.is_quantized(name):
                    dequantized.append(name)  # quantized in the artifact but no linear layer: write it dense
                else:
                    kept.append(name)
                writer.add(name, src.dense(name, src.dtype(name) if src.is_quantized(name) else None))
                bar.advance(task, src.nbytes(name))
                continue
            module = _module_of(name)
            assert module is not None
            conv1d = kinds.get(module) == "conv1d"  # stored [in, out]; bitsandbytes wants [out, in]
            rec = src.record(name)
            if mode == "nf4":
                if (rec is not None and rec["layout"] == NF4_LAYOUT and not conv1d
                        and rec.get("params", {}).get("quant_type", "nf4") == "nf4"):
                    qt = src.artifact.quantized_tensor(name)
                    reused.append(name)
                else:
                    w = src.dense(name, src.dtype(name))
                    qt = nf4.quantize(w.t().contiguous() if conv1d else w)
                    requantized.append(name)
                all_double &= bool(qt.params.get("double_quant", True))
                for key, t in bnb_4bit_tensors(name, qt).items():
                    writer.add(key, t)
            else:
                if rec is not None and INT8_SCB_KEY in rec["stored"] and not conv1d:
                    qt = src.artifact.quantized_tensor(name)
                    cb = (qt.tensors["qweight"].to(torch.int16) - 128).to(torch.int8)
                    scb = qt.tensors[INT8_SCB_KEY].float()
                    reused.append(name)
                else:
                    w = src.dense(name, src.dtype(name))
                    cb, scb = int8_rowwise(w.t() if conv1d else w)
                    requantized.append(name)
                writer.add(name, cb.contiguous())
                writer.add(f"{module}.SCB", scb)
                writer.add(f"{module}.weight_format", torch.tensor(0, dtype=torch.uint8))
            quantized_modules.add(module)
            bar.advance(task, src.nbytes(name))
        if not quantized_modules:
            raise InputError("nothing to quantize: no linear-layer weight is selected", src.path,
                             "quantize the model first (`lowbitpack quantize`) or check its module names")
        shards = writer.finish()
        if len(shards) == 1:
            (tmp / "model.safetensors.index.json").unlink()  # save_pretrained writes no index for one file
        skip = sorted(set(kinds) - quantized_modules)
        default_skip = [out_emb] if out_emb is not None else []
        skip_modules = None if (found is None or skip == default_skip) else skip
        config = clean_config(src.config)
        compute = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
        qcfg = bnb_quantization_config(mode, compute, all_double, skip_modules)
        config["quantization_config"] = qcfg
        write_json(tmp / "config.json", config)
        copied = copy_sidecars(src.sidecar_dir(), tmp)
        report = {"mode": mode, "quantized": len(quantized_modules), "reused_codes": len(reused),
                  "requantized": len(requantized), "dequantized_non_linear": dequantized, "kept": len(kept),
                  "exact": not requantized and not dequantized,
                  "skip_modules": skip_modules, "shards": sorted(shards),
                  "bytes": sum(s["bytes"] for s in shards.values())}
        if bnb_missing:
            report["note"] = "bitsandbytes is not installed here; loading the export needs it (pip install bitsandbytes)"
        write_export_manifest(tmp, f"bnb-{mode}", src, report)
    return {"format": f"bnb-{mode}", "out": str(out), "input": src.kind, **report, "quantization_config": qcfg,
            "sidecars": copied, "seconds": round(time.perf_counter() - t0, 3)}
