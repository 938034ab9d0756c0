"""Post-LoRA Restoration on SmolLM2-135M: QLoRA-k vs PLR-j held-out perplexity (the PLR paper's Table 1, offline).

    .venv/bin/python examples/plr_smollm2.py [--steps 100] [--bases nf4,gptq3,gptq2] [--work DIR]
        -> examples/results/plr_smollm2.json and plr_smollm2.md

For each training base k (NF4; 3- and 2-bit GPTQ, or RTN int3/int2 when this build has no GPTQ) the script
quantizes the original, trains one LoRA adapter on the packed base (r=16, alpha=16, q/k/v/o, lr 2e-4, as in the
paper), bundles it, and evaluates held-out perplexity (lowbitpack.eval.perplexity on kjv_split()["test"], the
New Testament) of:
  base-k      the packed base alone (no adapter)
  QLoRA-k     the packed base + its adapter (what QLoRA serves)
  PLR-j       `lowbitpack merge --restore j` for every j > k in {3, 4, 8, 16}: j = 16 merged into the original,
              j = 8/4 RTN int8/int4 + the adapter beside it, j = 3 GPTQ-3 (RTN int3 without GPTQ) + adapter
plus two references: the original with no adapter, and 16-bit LoRA (same recipe on the original, merged).

Every step's result is cached in --work/results.json, so an interrupted run resumes. Models are evaluated in the
training compute dtype (bf16 on bf16-capable CPUs and GPUs). The original is the offline SmolLM2-135M-Instruct,
whose weights are Q4_1-dequantized values from a GGUF (lowbitpack.models): "16-bit" means those weights in bf16.
Training data: kjv_split()["train"] (Old Testament minus Psalms); GPTQ calibration: the Psalms split.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on shared CPUs

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbitpack  # noqa: E402
from lowbitpack.restore import gptq_available  # noqa: E402

BITS = {"nf4": 4, "int8": 8, "int4": 4, "int3": 3, "int2": 2, "gptq4": 4, "gptq3": 3, "gptq2": 2}


class Study:
    """Runs and caches each step; `results` maps a row name to its figures."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = self.work / "results.json"
        self.results: dict = json.loads(self.cache.read_text()) if self.cache.is_file() and not args.fresh else {}
        self.original = lowbitpack.default_model()
        self.dtype = torch.bfloat16 if (torch.cuda.is_available() or _cpu_bf16()) else torch.float32
        from lowbitpack.data import kjv_split
        self.test_texts = kjv_split()["test"]

    def save(self) -> None:
        self.cache.write_text(json.dumps(self.results, indent=1))

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -------------------------------------------------------------------------------------------- steps
    def quantize(self, scheme: str) -> Path:
        out = self.work / f"base-{scheme}"
        if not (out / "lowbitpack.json").is_file():
            self.log(f"quantize {scheme}")
            t0 = time.perf_counter()
            lowbitpack.api.quantize(self.original, out, scheme, progress=False)
            self.results.setdefault("timings", {})[f"quantize-{scheme}"] = round(time.perf_counter() - t0, 1)
            self.save()
        return out

    def train(self, base: Path, name: str) -> Path:
        out = self.work / f"adapter-{name}"
        if not (out / "adapter_model.safetensors").is_file():
            self.log(f"train on {name} ({self.args.steps} steps)")
            rec = lowbitpack.api.train(base, out, max_steps=self.args.steps, batch_size=self.args.batch,
                                       seq_len=self.args.seq_len, lr=self.args.lr, r=self.args.r,
                                       alpha=self.args.alpha, seed=self.args.seed, progress=False, force=True)
            self.results.setdefault("training", {})[name] = {k: rec["result"][k] for k in (
                "steps", "first_loss", "final_loss", "seconds", "tokens_seen")}
            self.save()
        return out

    def bundle(self, adapter: Path, base: Path, name: str) -> Path:
        out = self.work / f"bundle-{name}"
        if not (out / "lowbitpack_bundle.json").is_file():
            lowbitpack.api.bundle(adapter, base, out, force=True)
        return out

    def restore(self, bundle: Path, j: int, name: str) -> tuple[Path, dict]:
        out = self.work / f"plr{j}-{name}"
        if not (out / "lowbitpack_merge.json").is_file():
            self.log(f"merge --restore {j} ({name})")
            lowbitpack.api.merge(bundle, out, restore=j, progress=False, force=True)
        return out, json.loads((out / "lowbitpack_merge.json").read_text())

    def evaluate(self, row: str, path: Path, *, packed: bool, adapter: Path | None = None, extra=None) -> dict:
        if row in self.results.get("rows", {}):
            return self.results["rows"][row]
        self.log(f"eval {row}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbitpack.eval import perplexity
        from lowbitpack.lowbit_linear import attach_adapter, load_packed_model, lowbit_modules
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if packed:
            model = load_packed_model(path, self.dtype, device)
            for m in lowbit_modules(model).values():
                m.cache_dense(True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(device)
        if adapter is not None:
            model = attach_adapter(model, adapter)
        tok = AutoTokenizer.from_pretrained(self.original)
        t0 = time.perf_counter()
        res = perplexity(model, tok, self.test_texts, seqlen=self.args.eval_seqlen, max_tokens=self.args.eval_tokens)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res.update(extra or {})
        self.results.setdefault("rows", {})[row] = res
        self.save()
        self.log(f"  {row}: ppl {res['ppl']:.3f}")
        return res

    # -------------------------------------------------------------------------------------------- plan
    def run(self) -> None:
        a = self.args
        self.evaluate("original", self.original, packed=False)
        ad16 = self.train(self.original, "lora16")
        b16 = self.bundle(ad16, self.original, "lora16")
        m16, _ = self.restore(b16, 16, "lora16")
        self.evaluate("LoRA-16", m16, packed=False)
        for scheme in a.bases:
            k = BITS[scheme]
            base = self.quantize(scheme)
            self.evaluate(f"base-{scheme}", base, packed=True)
            ad = self.train(base, scheme)
            self.evaluate(f"QLoRA-{scheme}", base, packed=True, adapter=ad)
            bundle = self.bundle(ad, base, scheme)
            for j in sorted((j for j in a.restores if j > k), reverse=True):
                out, man = self.restore(bundle, j, scheme)
                extra = {"restore_scheme": man["restore"]["scheme"], "fallback": man["restore"]["fallback"]}
                if j == 16:
                    self.evaluate(f"PLR16-{scheme}", out, packed=False, extra=extra)
                else:
                    extra["base_error_mean"] = man["errors"]["mean"]
                    self.evaluate(f"PLR{j}-{scheme}", out, packed=True, adapter=out, extra=extra)

    def report(self) -> dict:
        a = self.args
        rows = self.results.get("rows", {})
        table = []
        for scheme in a.bases:
            k = BITS[scheme]
            line = {"base": scheme, "bits": k}
            for col in ["base", "QLoRA"] + [f"PLR{j}" for j in sorted((j for j in a.restores if j > k))]:
                r = rows.get(f"{col}-{scheme}")
                line["alone" if col == "base" else col] = None if r is None else round(r["ppl"], 3)
            table.append(line)
        out = {
            "command": "python examples/plr_smollm2.py " + " ".join(sys.argv[1:]),
            "model": "SmolLM2-135M-Instruct (offline GGUF Q4_1, dequantized to bf16)",
            "eval": {"data": "kjv_split()['test'] (New Testament)", "tokens": a.eval_tokens, "seqlen": a.eval_seqlen,
                     "dtype": str(self.dtype).removeprefix("torch.")},
            "train": {"data": "kjv_split()['train']", "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len,
                      "lr": a.lr, "r": a.r, "alpha": a.alpha, "targets": "q,k,v,o", "seed": a.seed},
            "gptq_available": gptq_available(),
            "references": {"original": rows.get("original", {}).get("ppl"), "LoRA-16": rows.get("LoRA-16", {}).get("ppl")},
            "table": table, "rows": rows, "training": self.results.get("training", {}),
            "timings": self.results.get("timings", {}),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                        "threads": torch.get_num_threads()},
        }
        return out


def _cpu_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def markdown(res: dict) -> str:
    cols = ["alone", "QLoRA", "PLR3", "PLR4", "PLR8", "PLR16"]
    lines = [f"Held-out perplexity (lower is better), {res['model']}; eval {res['eval']['tokens']} tokens of "
             f"{res['eval']['data']}, {res['eval']['dtype']}; LoRA r={res['train']['r']} alpha={res['train']['alpha']} "
             f"on q/k/v/o, {res['train']['steps']} steps x {res['train']['batch']} x {res['train']['seq_len']} tokens, "
             f"lr {res['train']['lr']}.", "",
             f"References: original (no adapter) {res['references']['original']:.3f}, "
             f"16-bit LoRA {res['references']['LoRA-16']:.3f}.", "",
             "| training base | " + " | ".join(c if c != "alone" else "base alone" for c in cols) + " |",
             "|" + " --- |" * (len(cols) + 1)]
    for line in res["table"]:
        cells = [("" if line.get(c) is None else f"{line[c]:.3f}") for c in cols]
        lines.append(f"| {line['base']} ({line['bits']}-bit) | " + " | ".join(cells) + " |")
    fallbacks = {r.get("fallback") for r in res["rows"].values() if r.get("fallback")}
    if fallbacks:
        lines += ["", "Fallbacks: " + "; ".join(sorted(fallbacks))]
    lines += ["", f"Command: `{res['command'].strip()}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "lowbitpack" / "plr_smollm2"))
    ap.add_argument("--bases", default=None, help="comma list (default nf4,gptq3,gptq2; int3,int2 without GPTQ)")
    ap.add_argument("--restores", default="16,8,4,3")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--fresh", action="store_true", help="ignore cached results in --work")
    ap.add_argument("--out", default=str(ROOT / "examples" / "results" / "plr_smollm2"))
    args = ap.parse_args()
    if args.bases is None:
        args.bases = ["nf4", "gptq3", "gptq2"] if gptq_available() else ["nf4", "int3", "int2"]
    else:
        args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    args.restores = [int(x) for x in args.restores.split(",")]
    if not gptq_available():
        print("note: lowbitpack.schemes.gptq is missing: 3/2-bit bases use RTN int3/int2", flush=True)
    study = Study(args)
    study.run()
    res = study.report()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
