"""LowRA quality vs bit budget on both offline models, from the PLR study's results (no new runs).

    python bench/lowra_curve.py [--out docs/lowra-curve.png]

Reads examples/plr/results/*.json and bench/results/lowra_curve/*.json (written by examples/plr/study.py) and plots,
per model, held-out perplexity of the LowRA base alone at each budget, with its adapter (QLoRA) and restored to 16
bits (PLR-16), against RTN int2/int3 and GPTQ 2/3 bases alone. The numbers are the study's, nothing is recomputed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "examples" / "plr" / "results", ROOT / "bench" / "results" / "lowra_curve"]


def collect() -> dict[str, dict[str, dict]]:
    """{model label: {row name: row}} merged over every study result file."""
    models: dict[str, dict[str, dict]] = {}
    for folder in SOURCES:
        for path in sorted(folder.glob("*.json")):
            res = json.loads(path.read_text())
            label = f"{res['model'].split(' (')[0]} ({res['mode']} mode)"
            rows = models.setdefault(label, {})
            for line in res["table"]:
                rows.setdefault(line["name"], {"bits": line["bits"]}).update(
                    {k: v for k, v in line.items() if isinstance(v, dict)})
            rows.setdefault("_refs", {}).update(res["references"])
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "lowra-curve.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = collect()
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, (label, rows) in zip(axes[0], models.items()):
        lowra = sorted((r["bits"], r) for name, r in rows.items() if name.startswith("lowra"))
        for col, style, name in (("base", "o-", "LowRA base alone"), ("QLoRA", "s--", "LowRA + adapter (QLoRA)"),
                                 ("PLR16", "^:", "adapter restored to 16 bits (PLR-16)")):
            pts = [(b, r[col]["ppl"]) for b, r in lowra if col in r]
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        for name, marker in (("int2", "x"), ("int3", "x"), ("gptq2", "D"), ("gptq3", "D")):
            r = rows.get(name)
            if r and "base" in r:
                ax.scatter([r["bits"]], [r["base"]["ppl"]], marker=marker, color="0.4", zorder=3)
                ax.annotate(f"{name} alone", (r["bits"], r["base"]["ppl"]), textcoords="offset points",
                            xytext=(5, 2), fontsize=7, color="0.3")
        refs = rows["_refs"]
        ax.axhline(refs["original"]["ppl"], ls=":", color="k", lw=1, label="original (16-bit)")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (nominal; LowRA budgets count codebooks)")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
