"""LowRA: per output channel 1, 2 or 4 bits with a weighted Lloyd–Max codebook, bits allocated exactly.

For a weight W [out, in] and calibration activations x, the output error of row c is
E‖(W_c − Q(W_c)) x‖² ≈ Σ_j h_j (w_cj − Q(w_cj))² with h_j = E[x_j²] (the diagonal of the GPTQ Hessian,
dampened by `damp`·mean(h) so that dead inputs still count a little). For each row and each width
b ∈ {1, 2, 4} we fit a codebook of 2^b values minimising that weighted error:

* b = 1: the global optimum (scan every split of the sorted row, O(in) per row with prefix sums);
* b = 2, 4: weighted Lloyd–Max from equal-weight quantiles (each step never increases the error);
  working on the sorted row with prefix sums of h, h·w, h·w², one step costs O(2^b log in) per row.

The codebook is rounded to fp16 (what is stored) and the codes are nearest-value assignments against the
fp16 values — the decision thresholds are the midpoints of adjacent codebook values, so they need not be
stored. The error of each (row, width) is then exact for what is written.

Bit allocation (which rows get 1, 2 or 4 bits) minimises Σ_rows F_c·error_c (objective "fisher", F_c =
E[g_c²] of the row's output, g = ∂loss/∂y; objective "hessian-diag": F_c = 1) subject to
Σ stored bits ≤ budget·numel,
where a row of width b stores exactly `row_cost_bits(in, b)` bits (codes + fp16 codebook + its row_bits
byte, see layouts/lowra.py). `lowbitpack.solvers.solve_mckp` solves it exactly. The whole-model flow
(lowbitpack.flows.lowra) allocates across all selected linears at once; `LowRA.quantize` on a single
tensor allocates within that tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..layouts.lowra import LAYOUT, WIDTHS, class_rows, pack_lowra
from ..qtensor import QuantizedTensor
from .base import Scheme

FP16_MAX = 65504.0
# What the bit allocation minimises (recorded in the manifest).
OBJECTIVES = {
    "fisher": "sum over rows c of E[g_c^2] * sum_j E[x_j^2] (w_cj - q_cj)^2, g = dLoss/dy_c (diagonal "
              "Kronecker-factored empirical Fisher estimate of the loss increase)",
    "hessian-diag": "sum over rows c of sum_j E[x_j^2] (w_cj - q_cj)^2 (layer-output error, GPTQ Hessian diagonal)",
}


def row_cost_bits(in_features: int, bits: int) -> int:
    """Exact stored bits of one row of width `bits`: packed codes + fp16 codebook + its row_bits byte."""
    return 8 * ((in_features * bits + 7) // 8) + 16 * (1 << bits) + 8


def act_weights(act_stats: torch.Tensor | None, in_features: int, damp: float = 0.01) -> torch.Tensor:
    """h_j = E[x_j²] + damp·mean(E[x²]) (float64 [in]); all ones without statistics."""
    if act_stats is None:
        return torch.ones(in_features, dtype=torch.float64)
    h = act_stats.detach().to(torch.float64).flatten().cpu()
    if h.shape != (in_features,):
        raise ValueError(f"activation statistics have {h.numel()} entries, the weight has {in_features} inputs")
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError("activation second moments must be finite and non-negative")
    mean = float(h.mean())
    if mean <= 0:
        return torch.ones(in_features, dtype=torch.float64)
    return h + damp * mean


def _segment_sums(prefix: tuple[torch.Tensor, ...], bnd: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sums over segments [bnd[:, i], bnd[:, i+1]) of each prefix-sum array ([R, n+1]) -> [R, k]."""
    return tuple(p.gather(1, bnd[:, 1:]) - p.gather(1, bnd[:, :-1]) for p in prefix)


def _sse(s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ h (w − c)² per row from segment sums (clamped at 0 against cancellation)."""
    return (s2 - 2 * c * s1 + c * c * s0).clamp_min(0).sum(1)


def _boundaries(ws: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid partition of the sorted rows: [R, k+1] segment boundaries (c sorted ascending)."""
    r, n = ws.shape
    thr = (c[:, :-1] + c[:, 1:]) / 2
    inner = torch.searchsorted(ws, thr.contiguous())            # values < threshold go to the lower code
    zeros = torch.zeros(r, 1, dtype=torch.int64, device=ws.device)
    return torch.cat([zeros, inner, torch.full_like(zeros, n)], 1)


def _binned_dp_init(ws: torch.Tensor, prefix: tuple[torch.Tensor, ...], k: int, bins: int) -> torch.Tensor:
    """Initial codebooks [R, k]: the optimal k-partition of each sorted row restricted to `bins` bin edges.

    Lloyd–Max from quantile starts stalls in poor local optima on heavy-tailed rows (measured 20-70% above
    the optimum at 4 bits). An exact DP over the bins (min-plus products, O(k·bins²) per row) finds the
    global optimum at bin resolution; Lloyd then refines the boundaries at full resolution. Edges are the
    union of equal-count and equal-width edges, so tails (outliers) get their own bins.
    """
    r, n = ws.shape
    if n <= bins:
        edges = torch.arange(n + 1).unsqueeze(0).expand(r, -1)
    else:
        n_count = bins // 2
        by_count = torch.round(torch.linspace(0, n, n_count + 1, dtype=torch.float64)).long()
        lo, hi = ws[:, :1], ws[:, -1:]
        cuts = lo + (hi - lo) * torch.linspace(0, 1, bins - n_count + 1, dtype=torch.float64)[1:-1]
        by_width = torch.searchsorted(ws, cuts.contiguous())
        edges = torch.sort(torch.cat([by_count.unsqueeze(0).expand(r, -1), by_width], 1), 1)[0]
    e = edges.contiguous()
    # Segment costs in float32 on row-centred, row-scaled values: float64 is not needed to pick an init,
    # and centring keeps s2 − s1²/s0 from cancelling badly. In-place ops: this is the hot loop of fitting.
    q0, q1, q2 = (p.gather(1, e) for p in prefix)
    tot0 = q0[:, -1:].clamp_min(1e-300)
    mu = q1[:, -1:] / tot0
    sd = ((q2[:, -1:] / tot0 - mu * mu).clamp_min(0).sqrt()).clamp_min(1e-30)
    p0 = (q0 / tot0).float()
    p1 = ((q1 - mu * q0) / (tot0 * sd)).float()
    p2 = ((q2 - 2 * mu * q1 + mu * mu * q0) / (tot0 * sd * sd)).float()
    # cost[r, j, i]: weighted SSE of the segment from edge i to edge j (i ≤ j; i == j: an empty cluster).
    # The start index is the last dim so the min-plus reduction runs over contiguous memory.
    s0 = p0[:, :, None] - p0[:, None, :]
    s1 = p1[:, :, None] - p1[:, None, :]
    cost = p2[:, :, None] - p2[:, None, :]
    s1.mul_(s1).div_(s0)
    cost.sub_(s1).nan_to_num_(0.0, 0.0, 0.0).clamp_min_(0)  # 0/0 on empty segments -> 0
    del s0, s1
    m = e.shape[1]
    ar = torch.arange(m)
    cost.add_(torch.where(ar[None, :] <= ar[:, None], 0.0, float("inf")))  # a segment ends after it starts
    # Forward pass: best[l][r, j] = least cost of l+1 segments covering edges 0..j.
    best = [cost[:, :, 0].contiguous()]
    tmp = torch.empty_like(cost)
    for _ in range(k - 1):
        torch.add(best[-1][:, None, :], cost, out=tmp)
        best.append(tmp.amin(2))
    del tmp
    # Backtrack only along the chosen path (cheaper than keeping argmins of the whole table).
    end = torch.full((r, 1), m - 1, dtype=torch.int64)
    ends = [end]
    for lvl in range(k - 1, 0, -1):
        row = cost.gather(1, end.unsqueeze(2).expand(r, 1, m)).squeeze(1)   # cost[r, end, :]
        end = (best[lvl - 1] + row).argmin(1, keepdim=True)
        ends.append(end)
    bnd = torch.cat([torch.zeros(r, 1, dtype=torch.int64), e.gather(1, torch.cat(ends[::-1], 1))], 1)
    s0, s1, _ = _segment_sums(prefix, bnd)
    # an empty (or weightless) segment starts at the value where it sits in the sorted row
    at = ws.gather(1, bnd[:, :-1].clamp_max(n - 1))
    return torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), at)


def sorted_prefix(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Rows of w sorted ascending (float64) and prefix sums of h, h·w, h·w² along them ([R, n+1] each)."""
    ws, idx = torch.sort(w.to(torch.float64), dim=1)
    hs = h.to(torch.float64)[idx]
    zeros = torch.zeros(ws.shape[0], 1, dtype=torch.float64)
    hw = hs * ws
    prefix = (torch.cat([zeros, hs.cumsum(1)], 1), torch.cat([zeros, hw.cumsum(1)], 1),
              torch.cat([zeros, (hw * ws).cumsum(1)], 1))
    return ws, prefix


def lloyd_max(w: torch.Tensor, h: torch.Tensor, bits: int, max_iter: int = 100, dp_bins: int = 64,
              history: list | None = None, sorted_rows: tuple | None = None, init: str = "dp") -> torch.Tensor:
    """Weighted Lloyd–Max codebooks (float64 [R, 2^b], ascending) for the rows of w [R, n] with weights h [n].

    1 bit: the exact optimum. More bits: Lloyd–Max iterations started from the binned-DP optimum. If
    `history` is a list, the weighted error per row after each iteration is appended (for tests).
    `sorted_rows` is `sorted_prefix(w, h)` when the caller already has it. `init="quantile"` starts every
    width from equal-weight quantiles instead (for comparisons: it stalls in worse local optima).
    """
    if init not in ("dp", "quantile"):
        raise ValueError(f"init must be 'dp' or 'quantile', got {init!r}")
    k = 1 << bits
    ws, prefix = sorted_rows if sorted_rows is not None else sorted_prefix(w, h)
    p0, p1, p2 = prefix
    r, n = ws.shape
    if init == "quantile":
        targets = p0[:, -1:] * (torch.arange(k, dtype=torch.float64) + 0.5) / k
        pos = torch.searchsorted(p0[:, 1:].contiguous(), targets.contiguous()).clamp_max(n - 1)
        c = ws.gather(1, pos)
    elif bits == 1 and n >= 2:
        # Global optimum of the 2-level weighted quantizer: best split point of the sorted row.
        tot0, tot1, tot2 = p0[:, -1:], p1[:, -1:], p2[:, -1:]
        l0, l1, l2 = p0[:, 1:-1], p1[:, 1:-1], p2[:, 1:-1]
        r0, r1, r2 = tot0 - l0, tot1 - l1, tot2 - l2
        # a side with zero total weight (damp=0 and dead inputs) contributes no error
        cost = (l2 - torch.where(l0 > 0, l1 * l1 / l0.clamp_min(1e-300), 0.0)) + \
            (r2 - torch.where(r0 > 0, r1 * r1 / r0.clamp_min(1e-300), 0.0))
        s = cost.argmin(1, keepdim=True) + 1
        ls0, rs0 = p0.gather(1, s), tot0 - p0.gather(1, s)
        c = torch.cat([torch.where(ls0 > 0, p1.gather(1, s) / ls0.clamp_min(1e-300), ws[:, :1]),
                       torch.where(rs0 > 0, (tot1 - p1.gather(1, s)) / rs0.clamp_min(1e-300), ws[:, -1:])], 1)
    else:
        c = _binned_dp_init(ws, prefix, k, dp_bins)
    c, _ = torch.sort(c, dim=1)
    bnd = _boundaries(ws, c)
    if history is not None:
        history.append(_sse(*_segment_sums(prefix, bnd), c))
    for _ in range(max_iter):
        s0, s1, s2 = _segment_sums(prefix, bnd)
        # Centroid step; an empty segment keeps its value (it then holds no weight, so error is unchanged).
        c = torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), c)
        c, _ = torch.sort(c, dim=1)
        new = _boundaries(ws, c)  # assignment step: nearest value
        if history is not None:
            history.append(_sse(*_segment_sums(prefix, new), c))
        if torch.equal(new, bnd):
            break
        bnd = new
    return c


def assign_codes(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value (codebook [R, k] ascending) for each entry of w [R, n] -> int64."""
    cb = codebook.to(torch.float64)
    thr = ((cb[:, :-1] + cb[:, 1:]) / 2).contiguous()
    return torch.searchsorted(thr, w.to(torch.float64).contiguous())


def weighted_error(w: torch.Tensor, h: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Σ_j h_j (w_rj − codebook[r, codes_rj])² per row (float64 [R])."""
    q = torch.gather(codebook.to(torch.float64), 1, codes)
    return ((w.to(torch.float64) - q).pow(2) * h.to(torch.float64)).sum(1)


@dataclass
class LowRAFit:
    """Per-row fits of one weight for every width: what the allocator needs and what packing reuses."""

    in_features: int
    codebooks: dict[int, torch.Tensor]   # width -> float16 [out, 2^b], ascending
    errors: np.ndarray                   # float64 [out, len(WIDTHS)] weighted error with the fp16 codebook
    costs: np.ndarray                    # int64   [out, len(WIDTHS)] stored bits of the row at that width


class LowRA(Scheme):
    """`lowra`: mixed 1/2/4-bit rows with weighted Lloyd–Max codebooks under an average-bit `budget`."""

    name = "lowra"
    needs_calibration = True

    def __init__(self, budget: float, *, objective: str = "fisher", damp: float = 0.01, max_iter: int = 100,
                 dp_bins: int = 64, chunk_elems: int = 1 << 20):
        if not math.isfinite(budget) or budget <= 1.0:
            raise ValueError(f"LowRA budget must be above 1 bit per weight (every row stores at least 1 bit "
                             f"per weight plus its codebook), got {budget}")
        if budget > 16:
            raise ValueError(f"LowRA budget must be at most 16 bits per weight, got {budget}")
        if objective not in OBJECTIVES:
            raise ValueError(f"LowRA objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if damp < 0:
            raise ValueError(f"damp must be non-negative, got {damp}")
        self.budget = float(budget)
        self.objective = objective
        self.damp = float(damp)
        self.max_iter = int(max_iter)
        self.dp_bins = int(dp_bins)
        self.chunk_elems = int(chunk_elems)

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, weight: torch.Tensor, act_stats: torch.Tensor | None = None) -> LowRAFit:
        """Codebooks and exact weighted errors of every row at every width."""
        if weight.ndim != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        w = weight.detach().float().cpu()
        if not torch.isfinite(w).all():
            raise ValueError("weight holds NaN or Inf values")
        if w.numel() and float(w.abs().max()) > FP16_MAX:
            raise ValueError("weight values exceed the float16 range of LowRA codebooks")
        out_f, in_f = w.shape
        h = act_weights(act_stats, in_f, self.damp)
        rows_per_chunk = max(1, self.chunk_elems // max(in_f, 1))
        codebooks = {b: torch.empty(out_f, 1 << b, dtype=torch.float16) for b in WIDTHS}
        errors = np.empty((out_f, len(WIDTHS)), dtype=np.float64)
        for start in range(0, out_f, rows_per_chunk):
            wc = w[start:start + rows_per_chunk]
            sorted_rows = sorted_prefix(wc, h)
            for i, b in enumerate(WIDTHS):
                cb = lloyd_max(wc, h, b, self.max_iter, self.dp_bins, sorted_rows=sorted_rows)
                # What is stored is fp16: quantize against those values (sorted, so thresholds are midpoints).
                cb16, _ = torch.sort(cb.to(torch.float16).float(), dim=1)
                codes = assign_codes(wc, cb16)
                err = weighted_error(wc, h, cb16, codes).numpy()
                if i:
                    # More levels must never fit worse: if a local optimum (or fp16 rounding) did, reuse the
                    # narrower codebook, padded by repeating its last value (same codes, same error).
                    prev = errors[start:start + len(wc), i - 1]
                    worse = torch.from_numpy(err > prev)
                    if worse.any():
                        narrow = codebooks[WIDTHS[i - 1]][start:start + len(wc)].float()
                        padded = torch.cat([narrow, narrow[:, -1:].expand(-1, (1 << b) - narrow.shape[1])], 1)
                        cb16 = torch.where(worse[:, None], padded, cb16)
                        err = np.where(worse.numpy(), prev, err)
                errors[start:start + len(wc), i] = err
                codebooks[b][start:start + len(wc)] = cb16.to(torch.float16)
        costs = np.array([[row_cost_bits(in_f, b) for b in WIDTHS]] * out_f, dtype=np.int64).reshape(out_f, -1)
        return LowRAFit(in_features=in_f, codebooks=codebooks, errors=errors, costs=costs)

    # -- packing -----------------------------------------------------------------------------------
    def pack(self, weight: torch.Tensor, fit: LowRAFit, row_bits: torch.Tensor) -> QuantizedTensor:
        """Quantized tensor with the given per-row widths, reusing the fitted codebooks."""
        w = weight.detach().float().cpu()
        out_f, in_f = w.shape
        row_bits = torch.as_tensor(row_bits).to(torch.int64).cpu()
        codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
        books: dict[int, torch.Tensor] = {}
        err = 0.0
        for i, b in enumerate(WIDTHS):
            rows = class_rows(row_bits, b)
            books[b] = fit.codebooks[b][rows]
            if len(rows):
                codes[rows] = assign_codes(w[rows], books[b]).to(torch.uint8)
                err += float(fit.errors[rows.numpy(), i].sum())
        tensors = pack_lowra(row_bits, codes, books)
        hist = {str(b): int((row_bits == b).sum()) for b in WIDTHS}
        numel = out_f * in_f
        qt = QuantizedTensor(
            scheme=self.name, layout=LAYOUT, bits=round(float(row_bits.double().mean()), 6) if out_f else 0.0,
            group_size=None, shape=(out_f, in_f), dtype=weight.dtype, tensors=tensors,
            params={"bit_histogram": hist, "weighted_error": err, "codebook_dtype": "float16"})
        qt.params["avg_bits"] = qt.bits_per_weight() if numel else 0.0
        return qt

    # -- single tensor -----------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, act_stats: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None, row_bits: torch.Tensor | None = None,
                 grad_stats: torch.Tensor | None = None, **calib: Any) -> QuantizedTensor:
        """Quantize one weight; without `row_bits`, allocate widths within it under `self.budget`.

        `act_stats` is E[x²] per input; a GPTQ `hessian` (∝ E[x xᵀ]) is accepted instead (its diagonal).
        `grad_stats` (E[g²] per output row) weights the rows when objective is "fisher"; without it every
        row counts alike (then both objectives agree within one tensor up to a constant).
        """
        if act_stats is None and hessian is not None:
            act_stats = torch.diagonal(hessian)
        fit = self.fit(weight, act_stats)
        if row_bits is None:
            from ..solvers import InfeasibleBudget, solve_mckp
            budget = int(math.floor(self.budget * weight.numel()))
            errors = fit.errors
            if grad_stats is not None and self.objective == "fisher":
                g = grad_stats.detach().double().cpu().flatten().numpy()
                if g.shape != (weight.shape[0],) or not np.isfinite(g).all() or (g < 0).any():
                    raise ValueError(f"grad_stats must be {weight.shape[0]} finite non-negative values")
                errors = errors * g[:, None]
            try:
                sol = solve_mckp(errors, fit.costs, budget)
            except InfeasibleBudget as e:
                least = e.min_cost / weight.numel()
                raise ValueError(f"a LowRA budget of {self.budget} bits/weight is too small for a "
                                 f"{tuple(weight.shape)} weight: it needs at least {least:.2f} "
                                 "(every row at 1 bit plus its codebook)") from None
            row_bits = torch.tensor([WIDTHS[i] for i in sol.choice], dtype=torch.int64)
        return self.pack(weight, fit, row_bits)

    def config(self) -> dict[str, Any]:
        return {"scheme": self.name, "budget": self.budget, "objective": self.objective,
                "widths": list(WIDTHS), "codebook_dtype": "float16",
                "fit": "weighted Lloyd-Max (1 bit: exact)", "damp": self.damp, "max_iter": self.max_iter,
                "dp_bins": self.dp_bins}
