"""How close LowRA's codebook fits come to the exact optimum, and how fast the exact allocator is.

    python bench/lowra_fit_quality.py --out bench/results/lowra_fit_quality.json

1. Fits: 5 random rows from each of 6 SmolLM2-135M linears (random positive input weights h, seeded), widths
   1/2/4: weighted error of `lloyd_max` (quantile start, and the DP start with 32/64/128 bins) divided by the
   exact optimum of weighted 1-D k-means (O(k·n²) dynamic programme over the sorted row).
2. Solver: `solve_mckp` on a synthetic instance shaped like SmolLM2's allocation (155,520 rows, in = 576 or
   1536, costs from row_cost_bits, log-normal errors falling with bits) at budgets 1.15-3.0; optimality is
   proven by the solver (lower bound = objective).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbitpack.models import default_model_path  # noqa: E402
from lowbitpack.schemes.lowra import assign_codes, lloyd_max, row_cost_bits, weighted_error  # noqa: E402
from lowbitpack.solvers import solve_mckp  # noqa: E402

TENSORS = ["model.layers.10.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight",
           "model.layers.20.mlp.gate_proj.weight", "model.layers.0.self_attn.v_proj.weight",
           "model.layers.28.mlp.up_proj.weight", "model.layers.15.self_attn.o_proj.weight"]


def kmeans_opt(w: np.ndarray, h: np.ndarray, k: int) -> float:
    o = np.argsort(w)
    ws, hs = w[o].astype(np.float64), h[o].astype(np.float64)
    n = len(ws)
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (hs, hs * ws, hs * ws * ws))
    best = None
    for _ in range(k):
        # best[i]: least error of the first i values with the clusters so far; one row at a time keeps memory O(n)
        new = np.empty(n + 1)
        for i in range(n + 1):
            j = np.arange(i + 1)
            s0, s1, s2 = p0[i] - p0[j], p1[i] - p1[j], p2[i] - p2[j]
            with np.errstate(all="ignore"):
                c = np.where(s0 > 0, s2 - s1 * s1 / np.where(s0 > 0, s0, 1), 0.0).clip(min=0)
            new[i] = c[0] if best is None else np.min(best[: i + 1] + c)
        best = new
    return float(best[n])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/lowra_fit_quality.json")
    ap.add_argument("--rows", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    with safe_open(str(default_model_path() / "model.safetensors"), "pt") as f:
        for n in TENSORS:
            t = f.get_tensor(n).float()
            rows.append(t[torch.randperm(t.shape[0], generator=g)[: args.rows]])
    variants = [("quantile start", {"init": "quantile"})] + [(f"DP start, {b} bins", {"dp_bins": b}) for b in (32, 64, 128)]
    ratios = {v: {b: [] for b in (1, 2, 4)} for v, _ in variants}
    for w in rows:
        h = torch.rand(w.shape[1], dtype=torch.float64, generator=g) + 0.05
        for b in (1, 2, 4):
            opt = np.array([kmeans_opt(w[r].numpy(), h.numpy(), 1 << b) for r in range(len(w))])
            for v, kw in variants:
                c = lloyd_max(w, h, b, **kw)
                e = weighted_error(w, h, c, assign_codes(w, c)).numpy()
                ratios[v][b] += list(e / opt)
    fit = {v: {str(b): {"mean": float(np.mean(r)), "max": float(np.max(r))} for b, r in d.items()}
           for v, d in ratios.items()}
    print(json.dumps(fit, indent=1), flush=True)

    rng = np.random.default_rng(0)
    n = 155_520
    ins = np.where(rng.random(n) < 0.6, 576, 1536)
    costs = np.stack([np.array([row_cost_bits(int(i), b) for i in ins]) for b in (1, 2, 4)], 1)
    base = rng.lognormal(0, 1, n) * ins / 576
    errors = np.stack([base, base * 0.3 * rng.uniform(0.8, 1.2, n), base * 0.02 * rng.uniform(0.5, 1.5, n)], 1)
    solver = []
    for budget in (1.15, 1.5, 2.0, 2.5, 3.0):
        t0 = time.perf_counter()
        sol = solve_mckp(errors, costs, int(budget * ins.sum()))
        solver.append({"budget": budget, "seconds": round(time.perf_counter() - t0, 2), "optimal": sol.optimal,
                       "avg_bits": sol.cost / ins.sum(), "core_rows": [r["core_rows"] for r in sol.info["rounds"]],
                       "gap": sol.objective - sol.lower_bound})
        print(solver[-1], flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "fit_vs_optimum": fit,
                                          "solver_synthetic_155520_rows": solver}, indent=1))


if __name__ == "__main__":
    main()
