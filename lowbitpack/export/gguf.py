"""Export to GGUF (llama.cpp) for Llama-architecture models: F32/F16/BF16/Q8_0/Q4_0/Q4_1.

What is written follows llama.cpp's convert_hf_to_gguf.py (LlamaModel):
  * tensor names from gguf-py's tensor map (`blk.N.attn_q.weight` ...), q/k rows permuted with
    `LlamaModel.permute` (GGUF's rope pairs interleaved rows; transformers' loader undoes it),
  * `llama.*` hyper-parameters, `general.file_type`, `general.quantization_version`,
  * a gpt2 (byte-level BPE) tokenizer from tokenizer.json: tokens, token types (normal / control /
    user-defined / unused), merges, bos/eos/unk/pad ids, add_bos/add_eos, chat template (gguf.SpecialVocab),
    and `tokenizer.ggml.pre` inferred from the pre-tokenizer (gpt-2, smollm, llama-bpe, qwen2 ...).
Tensor types: 1-D tensors (norms, biases) stay F32; 2-D tensors get `gguf_type`; the token embedding and
output head get `embed_type` (default Q8_0 when `gguf_type` is a 4-bit type, like llama.cpp's mixes keep them
wider); rows whose length is not a multiple of 32 fall back to F16.

Exact path from intg-v1 artifacts (`exact_from_intg`): a 4-bit intg tensor whose groups cover whole 32-blocks
(G % 32 == 0, in % 32 == 0, no act-order g_idx) is written as Q4_1 blocks straight from its codes, d = scale and
m = offset (QA-LoRA's w = s*q + m) or m = -scale*zero, without re-quantization; symmetric codes (all zeros
2^(b-1)) map to Q4_0 (4-bit) and Q8_0 (8-bit) the same way. Q4_1/Q4_0/Q8_0 store d and m as fp16: values are
exact when scales/offsets are fp16 and m = -s*z is representable, otherwise rounded once (reported).
`exact_from_intg=None` (default) uses the direct path wherever it applies, True requires it for every
quantized tensor, False always re-quantizes the dequantized weights with gguf.quants.

Every quantized tensor is decoded back with gguf.quants.dequantize and compared with the input's weights:
the report lists, per GGUF type and path, the max abs error.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, OptionError
from ..flows.progress import progress_bar
from ..io.atomic import atomic_dir, check_output
from ..layouts.intg import default_g_idx, unpack_intg
from .hf import ExportSource, open_export_source, write_export_manifest

try:
    import gguf
except ImportError as e:  # surfaced by lowbitpack.export's lazy loader as "pip install 'lowbitpack[gguf]'"
    raise ModuleNotFoundError("gguf", name="gguf") from e

Q = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, Any] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
                              "q4_1": Q.Q4_1}
_FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
               Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
_BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
QK = 32  # block size of Q8_0 / Q4_0 / Q4_1
SUPPORTED_MODEL_TYPES = ("llama",)
_EMBED_NAMES = ("token_embd.weight", "output.weight")


def parse_gguf_type(name: str) -> Any:
    try:
        return GGUF_TYPES[str(name).lower()]
    except KeyError:
        raise OptionError(f"unsupported GGUF type {name!r}", None, f"choose one of {', '.join(GGUF_TYPES)}") from None


# --- llama.cpp conventions ---------------------------------------------------------------------------------------

def permute_rows(w: np.ndarray | torch.Tensor, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's LlamaModel.permute: interleave the two rope halves of every head (rows of q/k)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    r = w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
    r = r.swapaxes(1, 2) if isinstance(r, np.ndarray) else r.transpose(1, 2)
    return r.reshape(shape)


def _row_permutation(rows: int, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    return permute_rows(torch.arange(rows).reshape(rows, 1), n_head, n_head_kv).reshape(rows)


def infer_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE pre-tokenizer, or None if unrecognised."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True)):
        return "smollm"
    if kinds[:1] == ["Split"] and kinds[-1:] == ["ByteLevel"]:
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        try:  # transformers' own table of pre-tokenizer names -> split regexes, inverted
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            return None
        for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35"):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern:
                return name
    return None


def _looks_special(token: str) -> bool:
    return bool(re.fullmatch(r"<\|.*\|>|<\|[^|]*>|<[^<>\s]+>|\[[A-Z_]+\]", token))


def tokenizer_vocab(tokenizer_json: dict[str, Any], vocab_size: int, where: Path) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (as get_vocab_base does)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise OptionError(f"tokenizer model is {model.get('type')!r}; GGUF export writes byte-level BPE (gpt2) "
                          "tokenizers only", where, "export with --format hf, or convert with llama.cpp")
    reverse: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    added: dict[int, dict] = {int(a["id"]): a for a in tokenizer_json.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    if reverse and max(reverse) >= vocab_size:
        raise InputError(f"tokenizer has token id {max(reverse)} >= vocab_size {vocab_size}", where,
                         "config.json's vocab_size must cover the tokenizer")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].get("special") or _looks_special(reverse[i])
            types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _is_byte_level(tokenizer_json: dict[str, Any]) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    dec = tokenizer_json.get("decoder") or {}
    return any(p.get("type") == "ByteLevel" for p in parts) or dec.get("type") == "ByteLevel"


# --- planning ------------------------------------------------------------------------------------------------------

@dataclass
class TensorPlan:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]          # numpy / torch order: [out, in]
    qtype: Any
    permute: tuple[int, int] | None
    direct: bool                    # written from intg codes (no re-quantization)
    note: str = ""

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        if self.qtype in _BLOCK_TYPES:
            block, size = gguf.GGML_QUANT_SIZES[self.qtype]
            return n // block * size
        return n * {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[self.qtype]


def _direct_reason(rec: dict[str, Any] | None, qtype: Any, shape: tuple[int, ...]) -> str | None:
    """None if the intg record can be written as `qtype` blocks directly, else why not."""
    if rec is None or rec.get("scheme") == "none":
        return "not quantized"
    if rec.get("layout") != "intg-v1":
        return f"layout {rec.get('layout')} is not intg-v1"
    bits = int(rec["bits"])
    need = {Q.Q4_1: 4, Q.Q4_0: 4, Q.Q8_0: 8}.get(qtype)
    if need is None:
        return f"{qtype.name} is not a block type"
    if bits != need:
        return f"{bits}-bit codes do not fit {qtype.name}"
    in_f = shape[1]
    g = min(int(rec["group_size"]), in_f)
    if in_f % QK or (g < in_f and g % QK):
        return f"groups of {g} over {in_f} columns do not cover whole 32-blocks"
    if "g_idx" in rec["stored"]:
        return "act-order g_idx"  # refined after reading: a trivial g_idx is fine
    if qtype != Q.Q4_1 and "offset" in rec["stored"]:
        return f"float offsets need Q4_1, not {qtype.name}"
    return None


def _blocks_from_intg(tensors: dict[str, torch.Tensor], shape: tuple[int, int], bits: int, group_size: int,
                      qtype: Any, rows: torch.Tensor | None) -> np.ndarray | None:
    """GGUF block bytes [out, in/32*type_size] from intg codes; None if the values do not fit `qtype`."""
    out_f, in_f = shape
    g_idx = tensors.get("g_idx")
    group_size = min(group_size, in_f)
    if g_idx is not None and not torch.equal(g_idx.to(torch.int32), default_g_idx(in_f, group_size)):
        return None
    codes = unpack_intg(tensors["qweight"], bits, in_f)
    scale = tensors["scale"].float()
    offset = tensors["offset"].float() if "offset" in tensors else None
    zero = tensors.get("zero")
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        offset = offset[rows] if offset is not None else None
        zero = zero[rows] if zero is not None else None
    nb = in_f // QK
    blk_group = (torch.arange(nb) * QK) // group_size
    d = scale[:, blk_group].to(torch.float16)
    if qtype == Q.Q4_1:
        m = (offset if offset is not None else -scale * zero.float())[:, blk_group].to(torch.float16)
        q = codes.reshape(out_f, nb, QK)
        qs = q[..., :16] | (q[..., 16:] << 4)
        parts = [d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), qs]
    else:
        mid = 1 << (bits - 1)
        if offset is not None or not bool((zero == mid).all()):
            return None  # asymmetric codes need Q4_1
        q = codes.reshape(out_f, nb, QK)
        if qtype == Q.Q4_0:
            qs = q[..., :16] | (q[..., 16:] << 4)
        else:  # Q8_0: signed int8 = q - 128
            qs = (q.to(torch.int16) - mid).to(torch.int8).view(torch.uint8)
        parts = [d.unsqueeze(-1).view(torch.uint8), qs]
    return torch.cat(parts, dim=-1).reshape(out_f, -1).numpy()


# --- export ---------------------------------------------------------------------------------------------------------

def _rope_theta(cfg: dict[str, Any]) -> float:
    rp = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(rs["factor"])}
    raise OptionError(f"rope scaling {kind!r} is not supported by the GGUF exporter", None,
                      "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")


def _general_name(src: ExportSource) -> str:
    prov = src.provenance().get("source", {})
    mid = prov.get("model_id") or src.config.get("_name_or_path") or src.path.name
    return str(mid).rstrip("/").split("/")[-1] or "model"


def _license(src: ExportSource) -> str | None:
    return (src.provenance().get("source") or {}).get("license")


def export_gguf(
    path: str | Path,
    out: str | Path,
    *,
    gguf_type: str = "q8_0",
    embed_type: str | None = None,
    exact_from_intg: bool | None = None,
    tokenizer_pre: str | None = None,
    filename: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `<out>/<name>-<TYPE>.gguf` from an artifact or a HF checkpoint (Llama architecture).

    Loads with llama.cpp and with transformers' `from_pretrained(out, gguf_file=...)`. Returns a summary with
    the file name, tensor types, which tensors went the exact intg path, and max abs errors per type/path.
    """
    qtype = parse_gguf_type(gguf_type)
    etype = parse_gguf_type(embed_type) if embed_type else (Q.Q8_0 if qtype in (Q.Q4_0, Q.Q4_1) else qtype)
    check_output(out, force)
    src = open_export_source(path)
    cfg = src.config
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise OptionError(f"model_type {cfg.get('model_type')!r} is not supported by the GGUF exporter "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})", src.path / "config.json",
                          "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    tok_path = src.sidecar_dir() / "tokenizer.json"
    if not tok_path.is_file():
        raise InputError("no tokenizer.json next to the weights", src.path,
                         "copy the source model's tokenizer files into the directory")
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    if not _is_byte_level(tok):
        raise OptionError("the tokenizer is not byte-level BPE; GGUF export writes gpt2-style tokenizers only",
                          tok_path, "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    rope_scaling = _rope_scaling(cfg)
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    vocab_size = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    plans: list[TensorPlan] = []
    fallbacks: dict[str, str] = {}
    names = src.names
    if not tied and "lm_head.weight" not in names:
        raise InputError("tie_word_embeddings is false but there is no lm_head.weight", src.path,
                         "the checkpoint is incomplete")
    for name in names:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise InputError(f"tensor {name} has no GGUF name for the llama architecture", src.path,
                             "export with --format hf and convert with llama.cpp")
        shape = src.shape(name)
        permute = None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = (n_head, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = (n_head, n_kv)
        if len(shape) == 1:
            t = Q.F32
        else:
            t = etype if gname in _EMBED_NAMES else qtype
            if t in _BLOCK_TYPES and shape[-1] % QK:
                fallbacks[name] = f"{shape[-1]} columns are not a multiple of {QK}: F16"
                t = Q.F16
        direct = False
        if len(shape) == 2 and t in _BLOCK_TYPES and exact_from_intg is not False:
            reason = _direct_reason(src.record(name), t, shape)
            if reason is None or (reason == "act-order g_idx"):
                direct = True  # confirmed (or withdrawn) once the codes are read
            elif exact_from_intg and src.is_quantized(name):
                raise OptionError(f"{name}: no exact {t.name} path ({reason})", src.path,
                                  "drop --exact to re-quantize, or pick a GGUF type that matches the codes")
        plans.append(TensorPlan(name, gname, shape, t, permute, direct))

    fname = filename or f"{re.sub(r'[^A-Za-z0-9._-]+', '-', _general_name(src))}-{GGUF_TYPES_NAME[qtype]}.gguf"
    if "/" in fname or fname.startswith("."):
        raise OptionError(f"invalid GGUF file name {fname!r}", None, "pass a plain file name")
    t0 = time.perf_counter()
    stats: dict[str, dict[str, Any]] = {}
    direct_done: list[str] = []
    with atomic_dir(out, force) as tmp, progress_bar(progress) as bar:
        w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(_general_name(src))
        if (lic := _license(src)):
            w.add_license(lic)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(vocab_size)
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope_scaling["factor"])
        w.add_file_type(int(_FILE_TYPES[qtype]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # tokenizer
        tokens, toktypes = tokenizer_vocab(tok, vocab_size, tok_path)
        pre = tokenizer_pre or infer_pre_tokenizer(tok)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or "default")
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        special = gguf.SpecialVocab(src.sidecar_dir(), load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise InputError("tokenizer.json has no BPE merges", tok_path, "re-save the tokenizer with transformers")
        special.add_to_gguf(w, quiet=True)
        if "bos" not in special.add_special_token:
            # HF byte-level BPE tokenizers add no BOS unless their post-processor says so (SpecialVocab read it).
            w.add_add_bos_token(False)
        for p in plans:
            if p.qtype in _BLOCK_TYPES:
                byte_shape = (p.shape[0], p.shape[1] // QK * gguf.GGML_QUANT_SIZES[p.qtype][1])
                w.add_tensor_info(p.gguf_name, byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
            elif p.qtype == Q.BF16:
                w.add_tensor_info(p.gguf_name, (*p.shape[:-1], p.shape[-1] * 2), np.dtype(np.uint8), p.nbytes,
                                  raw_dtype=Q.BF16)
            else:
                dt = np.dtype(np.float32 if p.qtype == Q.F32 else np.float16)
                w.add_tensor_info(p.gguf_name, p.shape, dt, p.nbytes)
        file = tmp / fname
        w.write_header_to_file(file)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        task = bar.add_task(f"export gguf {GGUF_TYPES_NAME[qtype]}", total=sum(p.nbytes for p in plans))
        for p in plans:
            data, ref, path_kind = _tensor_data(src, p, exact_from_intg)
            if path_kind == "direct":
                direct_done.append(p.hf_name)
            if p.qtype in _BLOCK_TYPES or p.qtype in (Q.F16, Q.BF16):
                got = gguf.quants.dequantize(data, p.qtype).reshape(p.shape)
                err = float(np.abs(got - ref).max()) if ref.size else 0.0
            else:
                err = 0.0
            key = f"{p.qtype.name}/{path_kind}"
            s = stats.setdefault(key, {"tensors": 0, "max_abs_error": 0.0, "max_rel_error": 0.0})
            s["tensors"] += 1
            s["max_abs_error"] = max(s["max_abs_error"], err)
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            s["max_rel_error"] = max(s["max_rel_error"], err / scale if scale else 0.0)
            w.write_tensor_data(data)
            bar.advance(task, p.nbytes)
            del data, ref
        w.close()
        report = {
            "file": fname, "gguf_type": GGUF_TYPES_NAME[qtype], "embed_type": GGUF_TYPES_NAME[etype],
            "tensors": len(plans), "types": {k: v["tensors"] for k, v in sorted(stats.items())},
            "errors": dict(sorted(stats.items())), "exact_intg_tensors": len(direct_done),
            "fallbacks": fallbacks, "tokenizer_pre": pre or "default",
            "notes": ([] if pre or tokenizer_pre else
                      ["pre-tokenizer not recognised: wrote 'default'; pass tokenizer_pre for llama.cpp"]),
            "bytes": file.stat().st_size,
        }
        write_export_manifest(tmp, "gguf", src, report)
    return {"format": "gguf", "out": str(out), **report, "seconds": round(time.perf_counter() - t0, 3)}


GGUF_TYPES_NAME = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16", Q.Q8_0: "Q8_0", Q.Q4_0: "Q4_0", Q.Q4_1: "Q4_1"}


def _tensor_data(src: ExportSource, p: TensorPlan, exact_from_intg: bool | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(bytes or floats to write, float32 reference in GGUF row order, 'direct' | 'requantized' | 'float')."""
    ref_t = src.dense(p.hf_name, torch.float32)
    if p.permute is not None:
        ref_t = permute_rows(ref_t, *p.permute)
    ref = ref_t.contiguous().numpy()
    if p.direct:
        art = src.artifact
        assert art is not None
        qt = art.quantized_tensor(p.hf_name)
        rows = _row_permutation(p.shape[0], *p.permute) if p.permute is not None else None
        data = _blocks_from_intg(qt.tensors, tuple(qt.shape), int(qt.bits), int(qt.group_size), p.qtype, rows)
        if data is not None:
            return data, ref, "direct"
        if exact_from_intg:
            raise OptionError(f"{p.hf_name}: codes do not fit {p.qtype.name} exactly (asymmetric zeros or act-order)",
                              src.path, "use --gguf-type q4_1, or drop --exact to re-quantize")
    if p.qtype == Q.F32:
        return ref.astype(np.float32), ref, "float"
    if p.qtype == Q.F16:
        return ref.astype(np.float16), ref, "float"
    return gguf.quants.quantize(ref, p.qtype), ref, ("requantized" if p.qtype != Q.BF16 else "float")
