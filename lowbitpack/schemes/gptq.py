"""GPTQ (Frantar et al. 2022): column-by-column quantization with second-order error feedback.

For a linear layer with weight W [out, in] and calibration inputs X, GPTQ minimises ||W X - Q X||² one
column at a time. After quantizing column i, its error is spread onto the not-yet-quantized columns
through the inverse Hessian H⁻¹ (H = 2XXᵀ/n), read from the upper Cholesky factor of H⁻¹. Updates to
the columns right of the current 128-column block are batched ("lazy batch updates"), which is what
makes it fast. Codes are asymmetric integers with one fp16 scale and one integer zero per group of
`group_size` input columns, stored in layout `intg-v1`.

Follows the reference implementation (IST-DASLab/gptq `gptq.py`, as continued by GPTQModel): dead
columns (diag(H) == 0) are zeroed, `damp · mean(diag(H))` is added to the diagonal (raised in steps of
0.0025 until the Cholesky factorisation succeeds, as GPTQModel's damp_auto_increment does), and group
parameters are computed when a group's first column is reached. With act-order, columns are processed
by decreasing diag(H) and groups are formed in that processing order; `g_idx` maps each original column
to its group (GPTQModel's `desc_act` convention). Group parameters come from the group's *current*
weights: in-block updates included (as in GPTQModel's column loop, whose block is a view of W), and for
a group that runs past the current block (group sizes that are not divisors of the block, e.g. 256 or
48 with 128-column blocks) the block's pending lazy update is applied to those columns first, so lazy
batching stays an exact reordering of the column-by-column algorithm for every group size. The
reference implementations read such columns stale (before the lazy update); results agree whenever the
group lies inside one block (group sizes 16..128 with the default block).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch

from ..layouts.intg import LAYOUT, pack_intg
from ..qtensor import QuantizedTensor
from .base import Scheme
from .rtn import rtn_scale_zero

DAMP_STEP = 0.0025  # step of the automatic increase (GPTQModel 7.6 uses 0.01 by default)


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run GPTQ single-threaded on CPU: the column loop's ops are tiny and the factorisations small; on a
    busy machine torch's and LAPACK's threads wait on each other (measured 15-30x slower with 2 threads
    under load)."""
    if n is None or torch.get_num_threads() == n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H); returns (factor, damp used).

    A Hessian that is not positive definite after dampening (rank-deficient calibration) gets more
    dampening until the factorisation succeeds.
    """
    mean_diag = torch.mean(torch.diagonal(h)).item()
    d = damp
    while True:
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, d
        d += DAMP_STEP
        if d >= 1.0:
            raise ValueError("the Hessian stays singular even with damp 1.0 (are the calibration inputs all zero?)")


def gptq_quantize_weight(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *, damp: float = 0.01,
    act_order: bool = False, block_size: int = 128, scale_dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Run GPTQ on one weight [out, in] with its Hessian [in, in].

    Returns codes uint8 [out, in] (original column order), scale [out, G] (as stored, `scale_dtype`),
    zero uint8 [out, G], g_idx int32 [in] (None unless act_order), loss (the reference's
    Σ (w−q)²/(2·[H⁻¹]ᵢᵢ²)), the damp actually used and the number of dead columns.
    Computes in float64 when the weight is float64 (tests), else float32, on the Hessian's device.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    with _cpu_threads(1 if hessian.device.type == "cpu" else None):
        return _gptq(weight, hessian, bits, group_size, damp, act_order, block_size, scale_dtype)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float,
          act_order: bool, block_size: int, scale_dtype: torch.dtype) -> dict[str, Any]:
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's input dim {in_f}")
    cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dev = hessian.device
    w = weight.detach().to(dev, cdt).clone()
    h = hessian.detach().to(dev, cdt).clone()
    qmax = (1 << bits) - 1
    g = min(group_size, in_f)
    n_groups = math.ceil(in_f / g)

    # Inputs that never fire carry no information: fix their Hessian row and drop their weights.
    dead = torch.diagonal(h) == 0
    n_dead = int(dead.sum())
    if n_dead:
        h[dead, dead] = 1
        w[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    hinv, damp_used = inverse_hessian_cholesky(h, damp)
    del h

    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=dev)
    scale = torch.empty(out_f, n_groups, dtype=cdt, device=dev)
    zero = torch.empty(out_f, n_groups, dtype=cdt, device=dev)
    loss = 0.0
    s = z = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        q1 = torch.empty_like(w1)
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        hinv1_ahead = hinv[i1:i2, i2:]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                # A group starts: its scale/zero come from the group's weights as they are now.
                end = min(col + g, in_f)
                if end <= i2:
                    wg = w1[:, i:end - i1]
                else:
                    # The group runs past this block: those columns still miss the block's pending lazy
                    # update from the columns done so far; apply it to them so the range is current.
                    ahead = w[:, i2:end] - err1[:, :i] @ hinv1_ahead[:i, : end - i2]
                    wg = torch.cat([w1[:, i:], ahead], dim=1)
                s, z = rtn_scale_zero(wg.amin(1), wg.amax(1), bits)
                # Quantize against the scale as stored, so the artifact dequantizes to what GPTQ optimised.
                s = s.to(scale_dtype).to(cdt).clamp_min(2.0**-14)
                scale[:, col // g] = s
                zero[:, col // g] = z
            wc = w1[:, i]
            q = torch.clamp(torch.round(wc / s) + z, 0, qmax)
            q1[:, i] = q
            e = (wc - s * (q - z)) / hinv1[i, i]
            # Spread the error onto the block's remaining columns (OBS update, one row of H⁻¹'s factor).
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            err1[:, i] = e
        codes[:, i1:i2] = q1.to(torch.uint8)
        loss += float((err1 * err1).sum()) / 2  # Σ (w−q)²/(2 d²), the reference's Losses
        # Lazy batch update: the columns right of the block see this block's errors in one matmul.
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        # Groups were formed in processing order: column perm[j] belongs to group j // g.
        g_idx = (torch.arange(in_f, device=dev, dtype=torch.int32) // g)[invperm].contiguous()
    return {"codes": codes.contiguous(), "scale": scale.to(scale_dtype), "zero": zero.to(torch.uint8),
            "g_idx": g_idx, "group_size": g, "loss": loss, "damp": damp_used, "dead_columns": n_dead}


class GPTQ(Scheme):
    """`gptq2|gptq3|gptq4` (and 8): GPTQ with asymmetric group-wise integer codes (layout intg-v1)."""

    needs_calibration = True

    def __init__(self, bits: int, group_size: int = 128, damp: float = 0.01, act_order: bool = False,
                 block_size: int = 128, scale_dtype: torch.dtype = torch.float16):
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"GPTQ supports 2, 3, 4 or 8 bits, got {bits}")
        if group_size < 1:
            raise ValueError(f"group size must be positive, got {group_size}")
        if not 0 <= damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {damp}")
        if block_size < 1:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.bits = bits
        self.group_size = group_size
        self.damp = damp
        self.act_order = act_order
        self.block_size = block_size
        self.scale_dtype = scale_dtype
        self.name = f"gptq{bits}"

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None, **calib: Any) -> QuantizedTensor:
        return self.quantize_with_stats(weight, hessian=hessian)[0]

    def quantize_with_stats(self, weight: torch.Tensor, hessian: torch.Tensor | None = None,
                            **calib: Any) -> tuple[QuantizedTensor, dict[str, Any]]:
        """Like `quantize`, also returning {loss, damp, dead_columns} for the manifest."""
        if hessian is None:
            raise ValueError("GPTQ needs the layer's Hessian from calibration data; quantize through "
                             "lowbitpack.api.quantize (it calibrates), or pass hessian=")
        r = gptq_quantize_weight(weight, hessian, self.bits, self.group_size, damp=self.damp,
                                 act_order=self.act_order, block_size=self.block_size, scale_dtype=self.scale_dtype)
        tensors = {"qweight": pack_intg(r["codes"], self.bits), "scale": r["scale"], "zero": r["zero"]}
        if r["g_idx"] is not None:
            tensors["g_idx"] = r["g_idx"]
        qt = QuantizedTensor(scheme=self.name, layout=LAYOUT, bits=self.bits, group_size=r["group_size"],
                             shape=tuple(weight.shape), dtype=weight.dtype, tensors=tensors)
        return qt, {"loss": r["loss"], "damp": r["damp"], "dead_columns": r["dead_columns"]}

    def config(self) -> dict[str, Any]:
        return {"scheme": self.name, "bits": self.bits, "group_size": self.group_size, "damp": self.damp,
                "act_order": self.act_order, "block_size": self.block_size}
