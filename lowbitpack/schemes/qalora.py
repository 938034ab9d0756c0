"""`qalora`: QA-LoRA's group-wise asymmetric INT-b quantization with **float** offsets (w = s·q + m).

Per group of G consecutive input columns (the last group may be shorter), as in the QA-LoRA paper (eq. 2):
    s = (max − min) / (2^b − 1)  stored in `scale_dtype` (fp16 by default),
    m = min                      stored in `offset_dtype` (fp32 by default),
    q = clamp(round((w − m) / s), 0, 2^b − 1)     computed against s and m as stored,
so dequantization (layout intg-v1 with `offset`, see lowbitpack.layouts.intg) reproduces exactly what was rounded.

Why float offsets: a QA-LoRA adapter's ΔW is constant over each group (its input is average-pooled per group),
so merging it only moves the offsets, m' = m + c (lowbitpack.adapters.qalora.fold_into_offsets): codes and
scales stay, and the merged model is still b-bit. An integer zero point (GPTQ, RTN `int*`) cannot absorb an
arbitrary c; a float32 offset holds m + c to one float32 rounding.

Storage per weight: b + 16/G (fp16 scale) + 32/G (fp32 offset) bits, e.g. 4-bit G=32: 4 + 0.5 + 1.0 = 5.5 bits
(5.0 with fp16 offsets, which GGUF Q4_1 stores exactly, but a folded offset is then rounded to fp16).

`integer_zero_rounding` measures what exporting to integer zero points (GPTQ, compressed-tensors) costs:
z = clamp(round(−m / s), 0, 2^b − 1) replaces m by −s·z, an error constant over each group.
"""
from __future__ import annotations

from typing import Any

import torch

from ..layouts.intg import LAYOUT, default_g_idx, pack_intg
from ..qtensor import QuantizedTensor
from .base import Scheme
from .rtn import group_min_max

QALORA_BITS = (2, 3, 4, 8)
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _dtype(d: torch.dtype | str) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return _DTYPES[str(d).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {d!r}; use float16 or float32") from None


def qalora_scale_offset(mn: torch.Tensor, mx: torch.Tensor, bits: int, scale_dtype: torch.dtype,
                        offset_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) in float32 holding exactly the values that will be stored in the given dtypes."""
    qmax = (1 << bits) - 1
    scale = (mx - mn) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: q = 0, w = m exactly
    scale = scale.to(scale_dtype).float().clamp_min(2.0**-14)      # stays a normal fp16 number
    offset = mn.to(offset_dtype).float()
    return scale, offset


def quantize_codes_offset(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, g_idx: torch.Tensor,
                          bits: int) -> torch.Tensor:
    """q = clamp(round((w − m) / s), 0, 2^b − 1) with per-column group lookup; uint8 codes [out, in]."""
    qmax = (1 << bits) - 1
    gi = g_idx.long()
    return torch.clamp(torch.round((w - offset[:, gi]) / scale[:, gi]), 0, qmax).to(torch.uint8)


class QALoRAGroups(Scheme):
    """`qalora`: asymmetric min/max RTN per group of `group_size` inputs, fp16 scales, float offsets."""

    def __init__(self, bits: int, group_size: int = 32, offset_dtype: torch.dtype | str = torch.float32,
                 scale_dtype: torch.dtype | str = torch.float16):
        if bits not in QALORA_BITS:
            raise ValueError(f"qalora supports {', '.join(map(str, QALORA_BITS))} bits, got {bits}")
        if group_size < 1:
            raise ValueError(f"group size must be positive, got {group_size}")
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.offset_dtype = _dtype(offset_dtype)
        self.scale_dtype = _dtype(scale_dtype)
        self.name = "qalora"

    def quantize(self, weight: torch.Tensor, **calib: Any) -> QuantizedTensor:
        if weight.ndim != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        w = weight.float()
        g = min(self.group_size, w.shape[1])
        mn, mx = group_min_max(w, g)
        scale, offset = qalora_scale_offset(mn, mx, self.bits, self.scale_dtype, self.offset_dtype)
        codes = quantize_codes_offset(w, scale, offset, default_g_idx(w.shape[1], g, w.device), self.bits)
        return QuantizedTensor(
            scheme=self.name, layout=LAYOUT, bits=self.bits, group_size=g,
            shape=tuple(weight.shape), dtype=weight.dtype,
            tensors={"qweight": pack_intg(codes, self.bits), "scale": scale.to(self.scale_dtype),
                     "offset": offset.to(self.offset_dtype)},
        )

    def config(self) -> dict[str, Any]:
        return {"scheme": self.name, "bits": self.bits, "group_size": self.group_size,
                "scale_dtype": str(self.scale_dtype).removeprefix("torch."),
                "offset_dtype": str(self.offset_dtype).removeprefix("torch.")}


@torch.no_grad()
def integer_zero_rounding(qt: QuantizedTensor, reference_norm: float | None = None) -> dict[str, Any]:
    """What replacing float offsets by integer zero points (GPTQ, compressed-tensors) does to the weights.

    z = clamp(round(−m / s), 0, 2^b − 1) with s as exported (fp16); the weight error is −s·z − m, constant over
    each group (plus the fp16 cast of s when s is float32). Returns `max_abs_error`, `rel_frobenius`
    (‖error‖_F / ‖W_q‖_F over the dequantized weight), `clamped_groups` (zero point outside the code range) and,
    with `reference_norm` (e.g. ‖ΔW‖_F), `error_vs_reference` = ‖error‖_F / reference_norm.
    """
    t = qt.tensors
    if "offset" not in t:
        return {"max_abs_error": 0.0, "rel_frobenius": 0.0, "clamped_groups": 0, "groups": 0}
    if "g_idx" in t:
        raise ValueError("integer_zero_rounding expects contiguous groups (no g_idx)")
    from ..layouts.intg import dequantize_intg, unpack_intg
    bits, (out_f, in_f) = int(qt.bits), qt.shape
    qmax = (1 << bits) - 1
    s16 = t["scale"].to(torch.float16).float()
    m = t["offset"].float()
    zf = torch.round(-m / s16)
    z = zf.clamp(0, qmax)
    g_idx = default_g_idx(in_f, min(int(qt.group_size), in_f)).long()
    codes = unpack_intg(t["qweight"], bits, in_f).float()
    w = dequantize_intg(t, (out_f, in_f), bits, int(qt.group_size), torch.float32)
    exported = s16[:, g_idx] * (codes - z[:, g_idx])
    err = exported - w
    err_norm = float(err.double().norm())
    w_norm = float(w.double().norm())
    rep = {"max_abs_error": float(err.abs().max()) if err.numel() else 0.0,
           "rel_frobenius": err_norm / w_norm if w_norm > 0 else 0.0,
           "clamped_groups": int((zf != z).sum()), "groups": int(z.numel())}
    if reference_norm is not None:
        rep["error_vs_reference"] = err_norm / reference_norm if reference_norm > 0 else float("inf")
    return rep


__all__ = ["QALORA_BITS", "QALoRAGroups", "integer_zero_rounding", "qalora_scale_offset",
           "quantize_codes_offset"]
