"""GPTQ speed: the per-linear solve and the whole layer-by-layer calibration flow, on CPU and CUDA.

    python bench/gptq_speed.py                      # every device present; writes bench/results/gptq_speed-<device>.json
    python bench/gptq_speed.py --device cpu --flow-layers 2 --samples 16

Two measurements per device:
  1. `solve`: `gptq_quantize_weight` (4-bit, g128, with and without act-order) on the linear shapes of
     SmolLM2-135M (576/1536) and, on CUDA, Llama-2-7B (4096/11008), with a Hessian from correlated random
     inputs; median of `--repeats` runs after one warm-up. `per_layer_s` sums one decoder layer's 7 linears.
  2. `flow`: `calibrated_quantize` (gptq4, g128, true-sequential) end to end on a SmolLM2-135M-shaped Llama
     with random weights (speed does not depend on the values) and a byte-level tokenizer, `--samples` x
     `--seqlen` calibration tokens, `--flow-layers` decoder layers; reported per layer and extrapolated to
     the 30 layers of the real model. The text is synthetic, so no download or offline package is needed.
Timings on CUDA synchronise before reading the clock. CPU results on a shared machine vary with load:
the JSON records the load average and thread count next to the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbitpack.schemes.gptq import gptq_quantize_weight  # noqa: E402

# (name, out, in) of one decoder layer's linears
SMOLLM2_135M = [("q_proj", 576, 576), ("k_proj", 192, 576), ("v_proj", 192, 576), ("o_proj", 576, 576),
                ("gate_proj", 1536, 576), ("up_proj", 1536, 576), ("down_proj", 576, 1536)]
LLAMA2_7B = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
             ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]
MODELS = {"smollm2-135m": (SMOLLM2_135M, 30), "llama2-7b": (LLAMA2_7B, 32)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _hessian(d: int, dev: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = max(2 * d, 2048)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / math.sqrt(d)) + 0.1 * torch.randn(n, d, generator=g)
    x = x.to(dev)
    return 2 * x.T @ x / n


def bench_solve(dev: torch.device, model: str, repeats: int) -> dict:
    shapes, n_layers = MODELS[model]
    hs = {d: _hessian(d, dev) for d in {i for _, _, i in shapes}}
    out: dict = {"model": model, "bits": 4, "group_size": 128, "linears": {}}
    for act_order in (False, True):
        key = "act_order" if act_order else "plain"
        per_layer = 0.0
        for name, o, i in shapes:
            w = torch.randn(o, i, device=dev)
            gptq_quantize_weight(w, hs[i], 4, 128, act_order=act_order)  # warm-up (allocations, kernels)
            times = []
            for _ in range(repeats):
                _sync(dev)
                t0 = time.perf_counter()
                gptq_quantize_weight(w, hs[i], 4, 128, act_order=act_order)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            out["linears"].setdefault(name, {"shape": [o, i]})[f"{key}_s"] = round(s, 4)
            per_layer += s
        out[f"{key}_per_layer_s"] = round(per_layer, 3)
        out[f"{key}_model_s"] = round(per_layer * n_layers, 1)
    out["layers"] = n_layers
    return out


def _tiny_smollm2_dir(root: Path, n_layers: int) -> Path:
    """SmolLM2-135M's architecture with random weights, `n_layers` layers, and a byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "model")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root / "model")
    words = ["lord", "light", "water", "stone", "king", "song", "river", "night", "praise", "field"]
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(words[j] for j in torch.randint(0, 10, (40,), generator=g).tolist()) for _ in range(2000)]
    (root / "calib.txt").write_text("\n".join(lines))
    return root / "model"


def bench_flow(dev: torch.device, n_layers: int, samples: int, seqlen: int) -> dict:
    from lowbitpack.flows.calibrate import calibrated_quantize
    from lowbitpack.schemes import make_scheme
    with tempfile.TemporaryDirectory() as tmp:
        src = _tiny_smollm2_dir(Path(tmp), n_layers)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        res, extra = calibrated_quantize(src, make_scheme("gptq4", group_size=128), calib=Path(tmp) / "calib.txt",
                                         samples=samples, seqlen=seqlen, seed=0, device=str(dev), show_progress=False)
        _sync(dev)
        total = time.perf_counter() - t0
    layer_s = extra["calibration"]["layer_seconds"]
    per_layer = statistics.mean(layer_s)
    setup = total - sum(layer_s)  # config, tokenizer, calibration windows, embeddings, layer-0 inputs
    return {"architecture": "smollm2-135m (random weights)", "layers_run": n_layers, "samples": samples,
            "seqlen": seqlen, "tensors_quantized": len(res), "seconds": round(total, 2),
            "setup_s": round(setup, 2), "per_layer_s": round(per_layer, 3),
            "extrapolated_30_layers_s": round(setup + per_layer * 30, 1),
            "peak_gpu_mem_gib": (round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None)}


def _compare_with_cuda(cpu: dict, cuda_path: Path) -> dict | None:
    """Per-layer GPU speed-up from an earlier CUDA run, only where the flow used the same samples x seqlen."""
    if not cuda_path.is_file():
        return None
    gpu = json.loads(cuda_path.read_text())
    cf, gf = cpu["flow"], gpu["flow"]
    out: dict = {"cuda_file": cuda_path.name, "cuda_device": gpu.get("device"), "cuda_command": gpu.get("command")}
    cs = next((r for r in cpu["solve"] if r["model"] == "smollm2-135m"), None)
    gs = next((r for r in gpu["solve"] if r["model"] == "smollm2-135m"), None)
    if cs and gs:
        out["solve_per_layer_speedup"] = round(cs["plain_per_layer_s"] / gs["plain_per_layer_s"], 2)
        out["solve_act_order_per_layer_speedup"] = round(cs["act_order_per_layer_s"] / gs["act_order_per_layer_s"], 2)
    if (cf["samples"], cf["seqlen"]) == (gf["samples"], gf["seqlen"]):
        out["flow_per_layer_cpu_s"] = cf["per_layer_s"]
        out["flow_per_layer_cuda_s"] = gf["per_layer_s"]
        out["flow_per_layer_speedup"] = round(cf["per_layer_s"] / gf["per_layer_s"], 2)
        out["flow_30_layers_cpu_s"] = cf["extrapolated_30_layers_s"]
        out["flow_30_layers_cuda_s"] = gf["extrapolated_30_layers_s"]
    else:
        out["flow_note"] = (f"not comparable: cpu {cf['samples']}x{cf['seqlen']} vs cuda {gf['samples']}x{gf['seqlen']}"
                            " calibration tokens")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flow-layers", type=int, default=None, help="decoder layers in the flow run (cpu 2, cuda 30)")
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration samples (cpu 16, cuda 128; use 128 on CPU too to compare per-layer speed)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    devices = [d for d in ("cpu", "cuda") if args.device in (d, "all")]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("no CUDA device visible")
        devices.remove("cuda")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for d in devices:
        dev = torch.device(d)
        cuda = dev.type == "cuda"
        report = {
            "bench": "gptq_speed", "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ
                                 else []) + [Path(sys.executable).name] + sys.argv),
            "solve": [bench_solve(dev, m, args.repeats) for m in (["smollm2-135m", "llama2-7b"] if cuda else ["smollm2-135m"])],
            "flow": bench_flow(dev, args.flow_layers or (30 if cuda else 2), args.samples or (128 if cuda else 16),
                               args.seqlen),
        }
        report["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        if not cuda:
            report["cuda_comparison"] = _compare_with_cuda(report, args.out_dir / "gptq_speed-cuda.json")
        path = args.out_dir / f"gptq_speed-{d}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
