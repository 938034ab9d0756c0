"""Distributed quantize (lowbitpack.dist): wall time with 1 rank vs N ranks, and what N ranks change.

    python bench/dist_quantize.py                          # CPU, gloo; writes bench/results/dist_quantize-cpu.json
    python bench/dist_quantize.py --device cuda --nproc 2  # GPUs, NCCL; writes bench/results/dist_quantize-cuda.json

Measured, each once with 1 rank (in-process, the ordinary single-process code) and with `--nproc` ranks
(`api.quantize(nproc=N)`, which launches the ranks through torchrun's elastic launch API):
  1. `rtn`: int4 (g128) and NF4 of SmolLM2-135M-Instruct (the offline default model: its weights are Q4_1-dequantized,
     which does not change speed). Checks that the N-rank artifact is byte-identical to the 1-rank one.
  2. `gptq_smollm2`: gptq4 (g128) on SmolLM2-135M truncated to `--gptq-layers` decoder layers (real weights),
     default KJV calibration text, `--samples` x `--seqlen` tokens. Reports per-layer seconds and what the
     all-reduce's summation order changes: fraction of codes changed, max |ΔW|, max |Δcode|.
  3. `gptq_70b_layers`: gptq4 (g128) on `--layers70` synthetic decoder layers of a Llama-3-70B shape (hidden 8192,
     intermediate 28672, 64 heads, 8 KV heads) divided by `--scale70` in every dimension (CPU default 8:
     hidden 1024, intermediate 3584; CUDA default 1 = the real shape), random weights, byte-level tokenizer.
Wall time includes starting the ranks (a few seconds: Python + torch import per rank); `in_rank_s` is the
calibration + writing time measured inside rank 0. On a shared machine CPU figures vary with load: the JSON
records the load average before and after each run, the thread count and the command.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowbitpack  # noqa: E402
from lowbitpack.artifact import Artifact  # noqa: E402


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _files_sha(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.iterdir()):
        data = f.read_bytes()
        if f.name == "lowbitpack.json":
            text = data.decode()
            text = re.sub(r'"created_utc": "[^"]*"', '"created_utc": ""', text)
            text = re.sub(r'"(seconds|layer_seconds)": (\[[^\]]*\]|[0-9.e+-]+)', r'"\1": 0', text)
            data = text.encode()
        out[f.name] = hashlib.sha256(data).hexdigest()
    return out


def _run(src, out: Path, scheme: str, nproc: int, **kw) -> dict:
    load0 = _load()
    t0 = time.perf_counter()
    m = lowbitpack.quantize(src, out, scheme, progress=False, nproc=nproc, **kw)
    wall = time.perf_counter() - t0
    cal = m["quantization"].get("calibration", {})
    rec = {"ranks": nproc, "wall_s": round(wall, 2), "write_s": m["timing"]["seconds"],
           "loadavg_before": load0, "loadavg_after": _load()}
    if cal:
        rec["calibration_s"] = cal["seconds"]
        rec["layer_seconds"] = cal["layer_seconds"]
        rec["per_layer_s"] = round(sum(cal["layer_seconds"]) / max(1, len(cal["layer_seconds"])), 3)
        # the median resists a one-off slow layer (a 2x H200 run once had a 111 s first layer, then 21 s)
        rec["median_layer_s"] = round(statistics.median(cal["layer_seconds"]), 3) if cal["layer_seconds"] else 0.0
    return rec


def _speedups(one: dict, many: dict) -> dict:
    return {"speedup_per_layer": round(one["per_layer_s"] / many["per_layer_s"], 2),
            "speedup_median_layer": round(one["median_layer_s"] / many["median_layer_s"], 2)}


def _compare_gptq(a: Path, b: Path) -> dict:
    from lowbitpack.layouts.intg import unpack_intg
    A, B = Artifact.open(a), Artifact.open(b)
    changed = total = 0
    max_dw = max_dcode = 0.0
    max_rel = 0.0
    for name, rec in A.tensors.items():
        if rec["scheme"] == "none":
            continue
        qa, qb = A.quantized_tensor(name), B.quantized_tensor(name)
        ca = unpack_intg(qa.tensors["qweight"], qa.bits, qa.shape[1]).int()
        cb = unpack_intg(qb.tensors["qweight"], qb.bits, qb.shape[1]).int()
        changed += int((ca != cb).sum())
        total += ca.numel()
        max_dcode = max(max_dcode, int((ca - cb).abs().max()))
        wa, wb = A.dense(name, torch.float32), B.dense(name, torch.float32)
        max_dw = max(max_dw, float((wa - wb).abs().max()))
        max_rel = max(max_rel, float((wa - wb).norm() / wa.norm()))
    la = A.manifest["quantization"].get("calibration_loss", {})
    lb = B.manifest["quantization"].get("calibration_loss", {})
    loss_rel = max((abs(lb[n] - la[n]) / la[n] for n in la if la[n] > 0), default=0.0)
    return {"codes_changed": changed, "codes_total": total, "fraction_changed": changed / total,
            "max_abs_dw": max_dw, "max_rel_frobenius_dw": max_rel, "max_abs_dcode": max_dcode,
            "max_rel_calibration_loss_diff": loss_rel,
            "sum_calibration_loss_1": sum(la.values()), "sum_calibration_loss_n": sum(lb.values()),
            "first_group_fraction_changed": _first_group_fraction(a, b)}


def _batch16_reference(src: Path, art: Path, samples: int, seqlen: int, device: str) -> dict:
    """How much one process changes by itself when only the calibration batching changes (batch 16 instead
    of 8: the same tokens, another fp32 summation order of Σ xxᵀ): the yardstick for the N-rank difference."""
    from lowbitpack.flows.calibrate import calibrated_quantize
    from lowbitpack.layouts.intg import unpack_intg
    from lowbitpack.schemes import make_scheme
    res, _ = calibrated_quantize(src, make_scheme("gptq4", group_size=128), samples=samples, seqlen=seqlen, seed=0,
                                 device=device, show_progress=False, batch_size=16)
    A = Artifact.open(art)
    changed = total = 0
    first_changed = first_total = 0
    for name, qb in res.items():
        qa = A.quantized_tensor(name)
        ca = unpack_intg(qa.tensors["qweight"], qa.bits, qa.shape[1])
        cb = unpack_intg(qb.tensors["qweight"], qb.bits, qb.shape[1])
        c = int((ca != cb).sum())
        changed += c
        total += ca.numel()
        if ".layers.0.self_attn." in name and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            first_changed += c
            first_total += ca.numel()
    return {"fraction_changed": changed / total, "first_group_fraction_changed": first_changed / first_total}


def _first_group_fraction(a: Path, b: Path) -> float:
    from lowbitpack.layouts.intg import unpack_intg
    A, B = Artifact.open(a), Artifact.open(b)
    ch = tot = 0
    for name in A.tensors:
        if ".layers.0.self_attn." in name and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            qa, qb = A.quantized_tensor(name), B.quantized_tensor(name)
            ca = unpack_intg(qa.tensors["qweight"], qa.bits, qa.shape[1])
            cb = unpack_intg(qb.tensors["qweight"], qb.bits, qb.shape[1])
            ch += int((ca != cb).sum())
            tot += ca.numel()
    return ch / tot


def _truncated_smollm2(root: Path, n_layers: int) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file
    src = lowbitpack.default_model()
    out = root / f"smollm2-{n_layers}l"
    out.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = n_layers
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "chat_template.jinja"):
            shutil.copy2(f, out / f.name)
    keep = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for n in f.keys():
            m = re.match(r"model\.layers\.(\d+)\.", n)
            if m is None or int(m.group(1)) < n_layers:
                keep[n] = f.get_tensor(n)
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _synthetic_70b(root: Path, scale: int, n_layers: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    heads = 64 // scale
    cfg = LlamaConfig(vocab_size=256, hidden_size=8192 // scale, intermediate_size=28672 // scale,
                      num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=max(1, 8 // scale),
                      head_dim=128, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = root / f"llama70b-div{scale}-{n_layers}l"
    model.save_pretrained(out)
    del model
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return out


# --- extrapolation to 8 GPUs (docs/SCALING.md): formula and inputs, every assumption named ---------------------

MODELS = {  # (name, out, in) of one decoder layer's linears, layers, hidden
    "llama-3-70b": ([("q_proj", 8192, 8192), ("k_proj", 1024, 8192), ("v_proj", 1024, 8192), ("o_proj", 8192, 8192),
                     ("gate_proj", 28672, 8192), ("up_proj", 28672, 8192), ("down_proj", 8192, 28672)], 80, 8192),
    "llama-3.1-405b": ([("q_proj", 16384, 16384), ("k_proj", 1024, 16384), ("v_proj", 1024, 16384),
                        ("o_proj", 16384, 16384), ("gate_proj", 53248, 16384), ("up_proj", 53248, 16384),
                        ("down_proj", 16384, 53248)], 126, 16384),
}
GROUPS = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
ASSUMED = {"fp32_matmul_flops_per_s": 50e12, "nvlink_allreduce_bytes_per_s": 300e9, "gloo_exchange_bytes_per_s": 2e9,
           "layer_read_bytes_per_s": 2e9, "forward_passes_per_layer": 3, "tokens": 128 * 512, "batch_tokens": 8 * 512}


def extrapolate(cuda_json: Path, gpus=(1, 2, 8)) -> dict:
    from lowbitpack.dist import C_COL, C_MM, CHOL_FLOPS, solve_time
    g = json.loads(cuda_json.read_text())
    smol = next(r for r in g["solve"] if r["model"] == "smollm2-135m")
    floor = g["flow"]["per_layer_s"] - smol["plain_per_layer_s"]  # measured non-solve time of a (tiny) layer
    a = ASSUMED
    out: dict = {"inputs": {"cuda_file": cuda_json.name, "cuda_device": g["device"],
                            "solve_fit": {"C_COL_s_per_column": C_COL, "C_MM_s_per_out_in2": C_MM,
                                          "cholesky_flops_per_s_assumed": CHOL_FLOPS},
                            "forward_floor_s_measured": round(floor, 3), "assumed": a},
                 "formula": ("T_layer(N) = T_read + max(F_floor, FLOPs_fwd/R)/N + T_allreduce(N) + T_solve(N) + "
                             "T_exchange(N); T_solve(N) = sum over groups (qkv, o, gate+up, down) of min(rows, linears) "
                             "with T(out,in) = C_COL*in + C_MM*out*in^2/rows_div + in^3/CHOL; FLOPs_fwd = passes*2*tokens*P "
                             "+ 2*tokens*sum(in^2); T_allreduce = 2(N-1)/N*4*sum(in^2)/B_nvlink; T_exchange = "
                             "(N-1)/N*packed_bytes/B_gloo; T_read = 2*P/B_read"),
                 "models": {}}
    for name, (lins, n_layers, hidden) in MODELS.items():
        shapes = {n: (o, i) for n, o, i in lins}
        p_layer = sum(o * i for _, o, i in lins)
        sum_in2 = sum(i * i for _, _, i in lins)
        flops = a["forward_passes_per_layer"] * 2 * a["tokens"] * p_layer + 2 * a["tokens"] * sum_in2
        rec: dict = {"layers": n_layers, "params_per_layer": p_layer, "per_gpu_count": {}}
        for n in gpus:
            t_solve = sum(min(solve_time(shapes, grp, n, "rows"), solve_time(shapes, grp, n, "linears"))
                          if n > 1 else solve_time(shapes, grp, 1, "linears") for grp in GROUPS)
            t_fwd = max(floor, flops / a["fp32_matmul_flops_per_s"]) / n
            t_ar = 2 * (n - 1) / n * 4 * sum_in2 / a["nvlink_allreduce_bytes_per_s"]
            t_ex = (n - 1) / n * (p_layer * 4 / 8) / a["gloo_exchange_bytes_per_s"]
            t_read = 2 * p_layer / a["layer_read_bytes_per_s"]
            t_layer = t_read + t_fwd + t_ar + t_solve + t_ex
            big = max((sum(4 * shapes[x][1] ** 2 for x in grp) + 5 * 4 * max(shapes[x][1] for x in grp) ** 2
                       + 2 * 4 * max(shapes[x][0] * shapes[x][1] for x in grp)) for grp in GROUPS)
            mem = (4 * p_layer + 4 * hidden * a["tokens"] / n
                   + 3 * 4 * max(o for _, o, _ in lins) * a["batch_tokens"] + big)
            rec["per_gpu_count"][n] = {
                "solve_s": round(t_solve, 2), "forward_hessian_s": round(t_fwd, 2), "allreduce_s": round(t_ar, 3),
                "exchange_s": round(t_ex, 2), "read_s": round(t_read, 2), "layer_s": round(t_layer, 2),
                "model_min": round(t_layer * n_layers / 60, 1), "peak_mem_per_rank_GiB": round(mem / 2**30, 1)}
        base = rec["per_gpu_count"][1]["layer_s"]
        for n in gpus:
            rec["per_gpu_count"][n]["speedup"] = round(base / rec["per_gpu_count"][n]["layer_s"], 2)
        out["models"][name] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--only", default="rtn,gptq_smollm2,gptq_70b_layers")
    ap.add_argument("--gptq-layers", type=int, default=None, help="SmolLM2 layers for GPTQ (cpu 2, cuda 30)")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (cpu 16, cuda 128)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration seqlen (cpu 128, cuda 512)")
    ap.add_argument("--scale70", type=int, default=None, help="divide the 70B layer shape by this (cpu 8, cuda 1)")
    ap.add_argument("--layers70", type=int, default=None, help="synthetic 70B-shaped layers (cpu 2, cuda 2)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--work-dir", type=Path, default=None, help="where models and artifacts go (default: a temp dir)")
    ap.add_argument("--extrapolate", action="store_true",
                    help="only the 8-GPU model of docs/SCALING.md: writes bench/results/dist_scaling-model.json")
    args = ap.parse_args()
    if args.extrapolate:
        res = extrapolate(args.out_dir / "gptq_speed-cuda.json")
        path = args.out_dir / "dist_scaling-model.json"
        path.write_text(json.dumps({**res, "command": " ".join([Path(sys.executable).name] + sys.argv)}, indent=1) + "\n")
        print(json.dumps(res, indent=1))
        print(f"wrote {path}")
        return
    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--device cuda --nproc {args.nproc} needs {args.nproc} GPUs, {torch.cuda.device_count()} visible")
    samples = args.samples or (128 if cuda else 16)
    seqlen = args.seqlen or (512 if cuda else 128)
    gl = args.gptq_layers or (30 if cuda else 2)
    scale = args.scale70 or (1 if cuda else 8)
    l70 = args.layers70 or 2
    only = set(args.only.split(","))
    report: dict = {
        "bench": "dist_quantize", "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu"),
        "backend": "nccl" if cuda else "gloo", "cpus": os.cpu_count(), "torch": torch.__version__,
        "threads_single_process": torch.get_num_threads(),
        "threads_per_rank": "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else f"cpus // {args.nproc}",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "gptq_split": os.environ.get("LOWBITPACK_GPTQ_SPLIT", "auto (cpu: rows, cuda: linears)"),
        "note": ("CPU figures: 2 cores shared with other engineers' jobs, so a speed-up here does not predict GPUs; "
                 "see loadavg" if not cuda else ""),
    }
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "rtn" in only:
            src = lowbitpack.default_model()
            report["rtn"] = []
            for scheme in ("int4", "nf4"):
                one = _run(src, work / f"{scheme}-1", scheme, 1)
                many = _run(src, work / f"{scheme}-n{args.nproc}", scheme, args.nproc)
                same = _files_sha(work / f"{scheme}-1") == _files_sha(work / f"{scheme}-n{args.nproc}")
                report["rtn"].append({"model": "SmolLM2-135M-Instruct", "scheme": scheme, "one": one, "many": many,
                                      "byte_identical": same, "speedup_wall": round(one["wall_s"] / many["wall_s"], 2)})
                print(json.dumps(report["rtn"][-1]), flush=True)
        gkw = {"calib_samples": samples, "calib_seqlen": seqlen, "device": args.device, "group_size": 128}
        if "gptq_smollm2" in only:
            src = _truncated_smollm2(work, gl)
            one = _run(src, work / "g-smol-1", "gptq4", 1, **gkw)
            many = _run(src, work / f"g-smol-n{args.nproc}", "gptq4", args.nproc, **gkw)
            report["gptq_smollm2"] = {
                "model": f"SmolLM2-135M-Instruct, first {gl} of 30 layers", "samples": samples, "seqlen": seqlen,
                "one": one, "many": many, **_speedups(one, many),
                "difference": _compare_gptq(work / "g-smol-1", work / f"g-smol-n{args.nproc}")}
            report["gptq_smollm2"]["reference_single_process_batch16_vs_batch8"] = _batch16_reference(
                src, work / "g-smol-1", samples, seqlen, args.device)
            print(json.dumps(report["gptq_smollm2"]), flush=True)
        if "gptq_70b_layers" in only:
            src = _synthetic_70b(work, scale, l70)
            one = _run(src, work / "g-70-1", "gptq4", 1, **gkw)
            many = _run(src, work / f"g-70-n{args.nproc}", "gptq4", args.nproc, **gkw)
            report["gptq_70b_layers"] = {
                "shape": {"hidden": 8192 // scale, "intermediate": 28672 // scale, "heads": 64 // scale,
                          "kv_heads": max(1, 8 // scale), "divided_by": scale, "layers": l70},
                "samples": samples, "seqlen": seqlen, "one": one, "many": many,
                **_speedups(one, many),
                "difference": _compare_gptq(work / "g-70-1", work / f"g-70-n{args.nproc}")}
            print(json.dumps(report["gptq_70b_layers"]), flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"dist_quantize-{args.device}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
