"""LowRA budget sweep on a real model: held-out perplexity vs stored bits per weight, against RTN and GPTQ.

    python bench/lowra_ppl.py --out bench/results/lowra_smollm2.json --plot docs/lowra.png

The LowRA statistics and per-row fits do not depend on the budget, so they are computed once (the same
functions `lowbitpack quantize --scheme lowra` runs) and every budget only re-solves the allocation and
packs; each point is written as a real artifact and evaluated from it (`load_dequantized_model`).
Comparators go through `lowbitpack.api.quantize`. Perplexity: `lowbitpack.eval.perplexity` on the KJV
New Testament (held out), first --eval-tokens tokens, windows of 256.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbitpack import api  # noqa: E402
from lowbitpack.data import kjv_split  # noqa: E402
from lowbitpack.eval import perplexity  # noqa: E402
from lowbitpack.flows import lowra as flow  # noqa: E402
from lowbitpack.flows.quantize import quantize_checkpoint  # noqa: E402
from lowbitpack.io.checkpoint import SourceCheckpoint  # noqa: E402
from lowbitpack.modeling import load_dequantized_model  # noqa: E402
from lowbitpack.models import default_model_path  # noqa: E402
from lowbitpack.schemes.lowra import LowRA  # noqa: E402


def evaluate(model, tokenizer, eval_tokens: int) -> dict:
    t0 = time.perf_counter()
    r = perplexity(model, tokenizer, kjv_split()["test"], max_tokens=eval_tokens)
    r["eval_s"] = round(time.perf_counter() - t0, 1)
    return r


DEVICE = "cpu"


def eval_artifact(path: Path, tokenizer, eval_tokens: int) -> dict:
    model = load_dequantized_model(path, torch.float32, device=DEVICE)
    r = evaluate(model, tokenizer, eval_tokens)
    info = api.inspect(path)["totals"]
    r["avg_bits"] = info["avg_bits_quantized"]
    del model
    gc.collect()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=None, help="HF model dir (default: the offline SmolLM2-135M-Instruct)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.15, 1.5, 2.0, 2.5, 3.0])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--baselines", nargs="*", default=["int2", "int3", "gptq2", "gptq3"],
                    help="api.quantize schemes to compare (gptq* use the same calibration settings)")
    ap.add_argument("--ablations", action="store_true", help="also: all rows 2-bit, and unweighted fits (h=1)")
    ap.add_argument("--out", default="bench/results/lowra_smollm2.json")
    ap.add_argument("--plot", default="docs/lowra.png")
    ap.add_argument("--workdir", default=None, help="where artifacts go (default: a temp dir)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device for calibration forwards and evaluation (fits and packing run on the CPU)")
    ap.add_argument("--replot", default=None, help="only redraw --plot from this results JSON")
    ap.add_argument("--alloc-exp", nargs="*", default=[],
                    help="results of bench/lowra_alloc_exp.py: their global hessian-diag points become a curve")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.plot), args.alloc_exp)
        return
    global DEVICE
    DEVICE = args.device

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(args.src) if args.src else default_model_path()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lowra_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    results: dict = {"model": str(src), "command": " ".join(sys.argv), "host": platform.node(),
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "device": DEVICE,
                     "gpu": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else None,
                     "eval": {"text": "KJV New Testament (kjv_split()['test'])", "tokens": args.eval_tokens,
                              "seqlen": 256},
                     "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen,
                                     "text": "KJV Psalms (kjv_split()['calib'])", "seed": 0},
                     "rows": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))

    print("baseline (unquantized, float32)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(DEVICE).eval()
    r = evaluate(model, tok, args.eval_tokens)
    del model
    results["rows"].append({"method": "bf16 source", "avg_bits": 16.0, **r})
    print(results["rows"][-1], flush=True)
    save()

    # LowRA: statistics + fits once, then one allocation per budget.
    ckpt = SourceCheckpoint.open(src)
    names = flow.selected_weights(ckpt, None)
    infos = ckpt.tensor_infos()
    numels = {n: infos[n]["shape"][0] * infos[n]["shape"][1] for n in names}
    t0 = time.perf_counter()
    windows = flow.calibration_windows(tok, None, args.calib_samples, args.calib_seqlen, 0)
    stats, grads = flow.collect_stats(ckpt.path, names, windows, DEVICE, show_progress=False, output_grads=True)
    t_stats = time.perf_counter() - t0
    print(f"statistics {t_stats:.1f}s", flush=True)

    def fit_all(scheme: LowRA, weighted: bool = True) -> tuple[dict, float]:
        t0 = time.perf_counter()
        fits = {n: scheme.fit(w, stats[n] if weighted else None) for n, w in flow._iter_selected(ckpt, names)}
        return fits, time.perf_counter() - t0

    def write_and_eval(label: str, scheme: LowRA, fits: dict, row_bits: dict, extra: dict) -> None:
        pre = {n: scheme.pack(w, fits[n], row_bits[n]) for n, w in flow._iter_selected(ckpt, names)}
        out = work / label.replace(" ", "_").replace("/", "_")
        quantize_checkpoint(src, out, scheme, force=True, show_progress=False, precomputed=pre,
                            extra_quantization=extra)
        r = eval_artifact(out, tok, args.eval_tokens)
        hist = {b: sum(qt.params["bit_histogram"][b] for qt in pre.values()) for b in ("1", "2", "4")}
        results["rows"].append({"method": label, "budget": scheme.budget, **r, "bit_histogram": hist, **extra})
        print({k: v for k, v in results["rows"][-1].items() if k != "solver"}, flush=True)
        save()

    base = LowRA(2.0)
    fits, t_fit = fit_all(base)
    results["lowra_timing"] = {"statistics_s": round(t_stats, 1), "fit_s": round(t_fit, 1)}
    print(f"fit {t_fit:.1f}s", flush=True)
    for budget in args.budgets:
        scheme = LowRA(budget)
        row_bits, solver = flow.allocate_bits(fits, numels, budget, row_weights=grads)
        write_and_eval(f"LowRA {budget}", scheme, fits, row_bits, {"solver": solver})

    if args.ablations:
        rb, solver = flow.allocate_bits(fits, numels, 2.0)
        write_and_eval("LowRA 2.0, objective hessian-diag (no Fisher row weights)",
                       LowRA(2.0, objective="hessian-diag"), fits, rb, {"solver": solver})
        rb = {n: torch.full((f.errors.shape[0],), 2, dtype=torch.int64) for n, f in fits.items()}
        write_and_eval("LowRA fits, all rows 2-bit", LowRA(2.0), fits, rb, {})
        fits_u, _ = fit_all(LowRA(2.0), weighted=False)
        rb, solver = flow.allocate_bits(fits_u, numels, 2.0, row_weights=grads)
        write_and_eval("LowRA 2.0, unweighted fits (h=1)", LowRA(2.0), fits_u, rb, {"solver": solver})
        del fits_u
        # the same point through the public API (statistics, fits, solve and packing all redone)
        out = work / "api_lowra_2.0"
        t0 = time.perf_counter()
        m = api.quantize(src, out, "lowra", bits=2.0, calib_samples=args.calib_samples,
                         calib_seqlen=args.calib_seqlen, force=True, progress=False, device=DEVICE)
        q_s = time.perf_counter() - t0
        r = eval_artifact(out, tok, args.eval_tokens)
        results["rows"].append({"method": "LowRA 2.0 via api.quantize", "budget": 2.0, "quantize_s": round(q_s, 1),
                                **r, "bit_histogram": m["quantization"]["bit_histogram"],
                                "lowra_timing": m["quantization"]["lowra_timing"],
                                "solver": m["quantization"]["solver"]})
        print({k: v for k, v in results["rows"][-1].items() if k != "solver"}, flush=True)
        save()
    del fits
    gc.collect()

    for scheme in args.baselines:
        if scheme.startswith("gptq"):
            try:
                import lowbitpack.schemes.gptq  # noqa: F401
            except ImportError:
                results["rows"].append({"method": scheme, "note": "lowbitpack.schemes.gptq not available"})
                continue
        out = work / scheme
        t0 = time.perf_counter()
        try:
            api.quantize(src, out, scheme, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         force=True, progress=False, device=DEVICE)
        except Exception as e:  # noqa: BLE001 - a failing comparator must not lose the LowRA results
            results["rows"].append({"method": scheme, "error": f"{e.__class__.__name__}: {e}"})
            print(results["rows"][-1], flush=True)
            save()
            continue
        q_s = time.perf_counter() - t0
        r = eval_artifact(out, tok, args.eval_tokens)
        results["rows"].append({"method": f"{scheme} (g128)", "quantize_s": round(q_s, 1), **r})
        print(results["rows"][-1], flush=True)
        save()

    if args.plot:
        plot(results, Path(args.plot))
    print(f"wrote {args.out}")


def plot(results: dict, path: Path, alloc_exp: list[str] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(9.0, 4.6), dpi=120)
    lowra = sorted((r for r in rows if r["method"].startswith("LowRA ") and r["method"][6:].replace(".", "").isdigit()),
                   key=lambda r: r["avg_bits"])
    ax.plot([r["avg_bits"] for r in lowra], [r["ppl"] for r in lowra], "o-", label="LowRA, Fisher-weighted allocation")
    for r in lowra:
        ax.annotate(f"{r['budget']:g}", (r["avg_bits"], r["ppl"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    raw = {}
    for f in alloc_exp or []:
        for r in json.loads(Path(f).read_text())["rows"]:
            if r["objective"].startswith("raw sum") and r.get("budget"):
                raw[r["budget"]] = r
    if raw:
        pts = [raw[b] for b in sorted(raw)]
        ax.plot([r["avg_bits"] for r in pts], [r["ppl"] for r in pts], "s--", color="tab:orange", alpha=0.7,
                label="LowRA, objective hessian-diag (no Fisher row weights)")
    marks = {"int2": "s", "int3": "D", "gptq2": "^", "gptq3": "v", "LowRA fits": "x", "LowRA 2.0, unweighted": "+",
             "LowRA 2.0, objective": "*", "LowRA 2.0 via": "o"}
    for r in rows:
        if "ppl" not in r or r in lowra or r["method"] == "bf16 source":
            continue
        m = next((v for k, v in marks.items() if r["method"].startswith(k)), "o")
        ax.plot([r["avg_bits"]], [r["ppl"]], m, label=r["method"])
    src = next(r for r in rows if r["method"] == "bf16 source")
    ax.axhline(src["ppl"], color="gray", ls="--", lw=1, label=f"bf16 source ({src['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight of the quantized linears (codes + codebooks/scales)")
    ax.set_ylabel("perplexity, KJV New Testament (log)")
    ax.set_title("SmolLM2-135M-Instruct: LowRA budget sweep", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
