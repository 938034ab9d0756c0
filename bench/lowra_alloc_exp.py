"""Which cross-layer objective should LowRA's allocation minimise? (experiment; see docs/LOWRA.md)

    python bench/lowra_alloc_exp.py --out bench/results/lowra_alloc_exp.json
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbitpack.data import kjv_split  # noqa: E402
from lowbitpack.eval import perplexity  # noqa: E402
from lowbitpack.flows import lowra as flow  # noqa: E402
from lowbitpack.io.checkpoint import SourceCheckpoint  # noqa: E402
from lowbitpack.kernels import dequantize  # noqa: E402
from lowbitpack.models import default_model_path  # noqa: E402
from lowbitpack.schemes.lowra import LowRA, act_weights  # noqa: E402
from lowbitpack.solvers import solve_mckp  # noqa: E402
from lowbitpack.layouts.lowra import WIDTHS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--budgets", type=float, nargs="+", default=[1.15, 1.5, 2.0, 2.5, 3.0])
ap.add_argument("--out", default="bench/results/lowra_alloc_exp.json")
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = ap.parse_args()
from transformers import AutoModelForCausalLM, AutoTokenizer
src = default_model_path()
tok = AutoTokenizer.from_pretrained(src)
ckpt = SourceCheckpoint.open(src)
names = flow.selected_weights(ckpt, None)
windows = flow.calibration_windows(tok, None, 64, 512, 0)
t0 = time.time()
stats, gstats = flow.collect_stats(ckpt.path, names, windows, args.device, show_progress=False, output_grads=True)
print("stats", time.time() - t0, flush=True)
weights = {n: w for n, w in flow._iter_selected(ckpt, names)}
s = LowRA(2.0)
t0 = time.time()
fits = {n: s.fit(weights[n], stats[n]) for n in names}
print("fit", time.time() - t0, flush=True)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(args.device).eval()
params = dict(model.named_parameters())
texts = kjv_split()["test"]
numels = {n: weights[n].numel() for n in names}
signal = {n: float((weights[n].double() ** 2 * act_weights(stats[n], weights[n].shape[1], 0.01)).sum()) for n in names}
res = {"rows": []}

def evaluate(row_bits, label, budget):
    with torch.no_grad():
        for n in names:
            qt = s.pack(weights[n], fits[n], row_bits[n])
            params[n].copy_(dequantize(qt, torch.float32).to(args.device))
    r = perplexity(model, tok, texts, max_tokens=16384)
    tot_bits = sum(int(fits[n].costs[np.arange(len(row_bits[n])), np.searchsorted(WIDTHS, row_bits[n].numpy())].sum()) for n in names)
    row = {"objective": label, "budget": budget, "ppl": r["ppl"], "avg_bits": tot_bits / sum(numels.values()),
           "hist": {str(b): int(sum((row_bits[n] == b).sum() for n in names)) for b in WIDTHS}}
    res["rows"].append(row); print(row, flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))

def global_alloc(scale, budget):
    order = names
    e = np.concatenate([fits[n].errors * scale[n] for n in order]); c = np.concatenate([fits[n].costs for n in order])
    sol = solve_mckp(e, c, int(budget * sum(numels.values())))
    w = np.asarray(WIDTHS)[sol.choice]; out = {}; i = 0
    for n in order:
        k = fits[n].errors.shape[0]; out[n] = torch.from_numpy(w[i:i + k].astype(np.int64)); i += k
    return out

def per_tensor(budget, scale):
    out = {}
    for n in names:
        sol = solve_mckp(fits[n].errors * scale[n], fits[n].costs, int(budget * numels[n]))
        out[n] = torch.from_numpy(np.asarray(WIDTHS)[sol.choice].astype(np.int64))
    return out

ones = {n: 1.0 for n in names}
fisher = {n: gstats[n].numpy()[:, None] for n in names}
for b in WIDTHS:
    evaluate({n: torch.full((fits[n].errors.shape[0],), b, dtype=torch.int64) for n in names}, f"uniform {b}-bit", None)
for budget in args.budgets:
    evaluate(global_alloc(fisher, budget), "fisher-weighted, global", budget)
    evaluate(per_tensor(budget, fisher), "fisher-weighted, per-tensor budget", budget)
    if budget == 2.0:
        evaluate(per_tensor(budget, ones), "raw, per-tensor budget", budget)
        evaluate(global_alloc(ones, budget), "raw sum h*dw^2, global", budget)
