"""Time of `merge --restore 16` vs copying the same bytes with `cp`.

    .venv/bin/python bench/merge_speed.py [--model DIR] [--reps 3]     # writes bench/results/merge_speed.json

The original is SmolLM2-135M-Instruct (offline default model, bf16, one 270 MB shard) unless --model is given.
The adapter is a random PEFT LoRA, r=16 on q/k/v/o of every layer (what the PLR paper trains), bundled against
the original (`--trained-on int4`, so no artifact is needed). Every run reads a page-cache-warm source: the bytes
are read once before timing. Reported: medians of --reps runs of (a) the whole `lowbitpack.api.merge` call
(open + verify the bundle, hash the adapted tensors, stream W + ΔW, write shards, config, sidecars, manifest,
fsync, rename) and (b) `cp` of the source's safetensors files into a fresh directory followed by `sync`.
The machine is shared: the 1-minute load average before and after is recorded with the figures.

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch is imported): on an oversubscribed machine OpenMP's
spinning barriers made every small tensor op of the merge 10-20x slower with 2 threads (measured 18 s vs 0.7 s
for this merge at load average 12 on 2 cores); pass OMP_WAIT_POLICY=ACTIVE to measure the default behaviour.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_bundle(model: Path, work: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import lowbitpack

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         init_lora_weights=False))
    pm.save_pretrained(str(work / "adapter"), save_embedding_layers=False)
    del pm, base
    lowbitpack.api.bundle(work / "adapter", model, work / "bundle", trained_on="int4")
    return work / "bundle"


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    import lowbitpack
    from lowbitpack.io.checkpoint import SourceCheckpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge_speed.json"))
    args = ap.parse_args()
    model = Path(args.model) if args.model else lowbitpack.default_model()
    ckpt = SourceCheckpoint.open(model)
    shard_paths = [model / s for s in ckpt.shards]
    nbytes = sum(p.stat().st_size for p in shard_paths)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=os.environ.get("LOWBITPACK_BENCH_TMP")) as tmp:
        work = Path(tmp)
        bundle = make_bundle(model, work)
        for p in shard_paths:  # warm the page cache for both contenders
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        counter = iter(range(10**6))

        def merge() -> None:
            out = work / f"merged{next(counter)}"
            lowbitpack.api.merge(bundle, out, restore=16, original=model, progress=False)
            shutil.rmtree(out)

        def cp() -> None:
            out = work / f"copy{next(counter)}"
            out.mkdir()
            subprocess.run(["cp", *map(str, shard_paths), str(out)], check=True)
            subprocess.run(["sync"], check=True)
            shutil.rmtree(out)

        merge()  # warm-up (imports, first allocations)
        merge_s = timed(merge, args.reps)
        cp_s = timed(cp, args.reps)
        manifest = json.loads((bundle / "lowbitpack_bundle.json").read_text())
    res = {
        "command": "python bench/merge_speed.py" + (f" --model {args.model}" if args.model else "")
                   + (f" --reps {args.reps}" if args.reps != 3 else ""),
        "model": str(ckpt.source_identity().get("model_id")),
        "source_bytes": nbytes, "shards": len(shard_paths),
        "adapter": {"type": "lora", "r": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "adapted_tensors": len(manifest["base"]["tensors"])},
        "merge_restore16_s": {"median": statistics.median(merge_s), "runs": merge_s},
        "cp_s": {"median": statistics.median(cp_s), "runs": cp_s},
        "merge_over_cp": statistics.median(merge_s) / statistics.median(cp_s),
        "merge_MB_per_s": nbytes / statistics.median(merge_s) / 1e6,
        "cp_MB_per_s": nbytes / statistics.median(cp_s) / 1e6,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]},
        "notes": "page cache warm for both; merge includes sha256 of adapted tensors, float32 W + ΔW, fsync + rename",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
