"""CPU quantization throughput (ours vs bitsandbytes, same run) and peak RSS of a streamed 4-shard conversion.

    .venv/bin/python bench/quantize_cpu.py            # writes bench/results/quantize_cpu.json
    .venv/bin/python bench/quantize_cpu.py --only rss # only the peak-RSS part (keeps the other from the file)

Throughput: median of 5 runs on a 14336x4096 bf16 weight (a Llama-3-8B MLP shape).
Peak RSS: a child process quantizes a synthetic 1.68 GB bf16 checkpoint in 4 shards (each 419 MB) and reports
its own peak (VmHWM, Linux); the target is peak RSS <= largest shard + 1 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench(fn, reps: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput() -> dict:
    from lowbitpack.schemes import make_scheme
    torch.manual_seed(0)
    w = torch.randn(14336, 4096, dtype=torch.bfloat16)
    n = w.numel()
    res = {"shape": [14336, 4096], "dtype": "bfloat16", "threads": torch.get_num_threads()}
    for name in ("nf4", "int4"):
        sch = make_scheme(name)
        t = bench(lambda: sch.quantize(w))
        res[f"lowbitpack_{name}_s"] = t
        res[f"lowbitpack_{name}_Mparams_per_s"] = n / t / 1e6
    try:
        import bitsandbytes.functional as F
        t = bench(lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        res["bitsandbytes_nf4_s"] = t
        res["bitsandbytes_nf4_Mparams_per_s"] = n / t / 1e6
        res["bitsandbytes_version"] = __import__("bitsandbytes").__version__
        res["nf4_speed_ratio_vs_bnb"] = res["bitsandbytes_nf4_s"] / res["lowbitpack_nf4_s"]
    except ImportError:
        res["bitsandbytes"] = "not installed"
    return res


CHILD = """
import sys, json, lowbitpack
# VmHWM: this process's own peak RSS. getrusage's ru_maxrss would not do: Linux carries it across fork+exec,
# so a child of a big parent reports at least the parent's RSS at the fork.
def hwm_kb():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
base = hwm_kb()
m = lowbitpack.quantize(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(json.dumps({"maxrss_kb": hwm_kb(), "import_rss_kb": base}))
"""


def peak_rss() -> dict:
    from safetensors.torch import save_file
    from tests.conftest import make_tiny_llama  # noqa: F401 (ensures tests importable)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        src = Path(d) / "src"
        src.mkdir()
        hidden, inter = 4096, 14336
        # 4 shards, each one MLP block of 3 x (14336x4096) bf16 weights = 352 MB, plus q/o (64 MB)
        weight_map = {}
        g = torch.Generator().manual_seed(0)
        for i in range(4):
            t = {
                f"model.layers.{i}.mlp.gate_proj.weight": torch.randn(inter, hidden, generator=g).to(torch.bfloat16),
                f"model.layers.{i}.mlp.up_proj.weight": torch.randn(inter, hidden, generator=g).to(torch.bfloat16),
                f"model.layers.{i}.mlp.down_proj.weight": torch.randn(hidden, inter, generator=g).to(torch.bfloat16),
                f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g).to(torch.bfloat16),
                f"model.layers.{i}.self_attn.o_proj.weight": torch.randn(hidden, hidden, generator=g).to(torch.bfloat16),
            }
            f = f"model-{i + 1:05d}-of-00004.safetensors"
            save_file(t, str(src / f), metadata={"format": "pt"})
            weight_map.update({k: f for k in t})
            del t
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
        sizes = [p.stat().st_size for p in src.glob("*.safetensors")]
        res = {"total_bytes": sum(sizes), "largest_shard_bytes": max(sizes), "shards": len(sizes),
               "child_torch_threads": torch.get_num_threads()}
        for scheme in ("nf4", "int4"):
            p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(d) / f"out-{scheme}"), scheme],
                               capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                res[f"{scheme}_error"] = p.stderr.strip().splitlines()[-1]
                continue
            child = json.loads(p.stdout.strip().splitlines()[-1])
            rss = child["maxrss_kb"] * 1024
            res[f"{scheme}_peak_rss_bytes"] = rss
            res[f"{scheme}_peak_rss_minus_largest_shard_GB"] = (rss - max(sizes)) / 1e9
            res[f"{scheme}_rss_after_import_bytes"] = child["import_rss_kb"] * 1024  # python + torch + lowbitpack
            res[f"{scheme}_target_met"] = rss - max(sizes) <= 1e9
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize_cpu.json"))
    ap.add_argument("--only", choices=["throughput", "rss"], default=None,
                    help="run one part (a few minutes less); the other part is kept from an existing --out file")
    args = ap.parse_args()
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.only and out.is_file() else {}
    command = " ".join(([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ
                        else []) + ["python", "bench/quantize_cpu.py"] + sys.argv[1:])
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    for part, fn in (("throughput", throughput), ("streaming", peak_rss)):
        if args.only in (None, {"streaming": "rss"}.get(part, part)):
            load0 = list(os.getloadavg())
            res[part] = {**fn(), "command": command, "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
                         "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        elif part in old:
            res[part] = {"command": old.get("command", "python bench/quantize_cpu.py"), **old[part]}
    res["command"] = command
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
