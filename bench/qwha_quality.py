"""QWHA on SmolLM2-135M: merge exactness (merged vs unmerged logits) and quantisation-error init quality.

    OMP_NUM_THREADS=2 .venv/bin/python bench/qwha_quality.py            # writes bench/results/qwha_quality.json

(a) merge: quantize int4 (RTN, group 128), `train --adapter qwha` (error init, all seven projections, budget
    r=16·(in+out) per layer) for a few steps, bundle, then compare float32 logits on held-out KJV windows:
      - unmerged QWHA forward on the packed int4 base (the trained model) vs Q4(W) + ΔW merged into dense weights,
      - unmerged QWHA forward (learned spectrum) on the 16-bit original vs `merge --restore 16` (fp32, and bf16),
      - `merge --restore 4` (adapter beside) and `--restore 4 --fold` vs the trained model,
      - the reference implementation's own merge (W + S instead of W + S·M/n), to show it is wrong.
(b) init: for RTN int4/int3/int2 (group 128), relative Frobenius error of Q(W), of Q(W) + ΔW_init (QWHA init, the
    paper's per-channel allocation, and the layer-global top-k), and of a random-location ablation (same budget, the
    reference's random locations, values set optimally), plus held-out perplexity of each (float32, `--tokens`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

import lowbitpack
from lowbitpack.adapters.peft_io import read_peft_adapter
from lowbitpack.adapters.qwha import (learned_spectrum, module_scaling, qwha_delta, reference_merge_delta,
                                      same_as_training_base)
from lowbitpack.adapters.qwha_train import QwhaLinear, init_from_error, layer_budget, random_locations
from lowbitpack.artifact import Artifact
from lowbitpack.data import kjv_split
from lowbitpack.eval import perplexity
from lowbitpack.hadamard import wht
from lowbitpack.lowbit_linear import load_packed_model
from lowbitpack.modeling import load_dequantized_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def set_submodule(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def attach_saved(model, adapter_dir: Path, which: str = "saved") -> None:
    """Wrap the adapter's modules of `model` in QwhaLinear (the unmerged forward) with the saved spectrum, or with
    the learned part (saved − initial) for `which="learned"`."""
    ad = read_peft_adapter(adapter_dir)
    for module, parts in ad.modules.items():
        spec = learned_spectrum(parts) if which == "learned" else parts["spectrum"]
        layer = QwhaLinear(model.get_submodule(module), parts["indices"], spec, module_scaling(parts, ad.config))
        set_submodule(model, module, layer)


def set_weights(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            p = model.get_submodule(name).weight
            p.copy_(w.to(p.dtype))


def original_weights(src: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for n in names:
            out[n] = f.get_tensor(n + ".weight").float()
    return out


def frob(errs: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> dict[str, float]:
    """Aggregate ‖E‖/‖W‖ over all layers, and the mean of the per-layer ratios."""
    num = sum(float(e.double().norm() ** 2) for e in errs.values())
    den = sum(float(w[n].double().norm() ** 2) for n in errs)
    per = [float(e.norm() / w[n].norm()) for n, e in errs.items()]
    return {"all_layers": math.sqrt(num / den), "mean_per_layer": sum(per) / len(per)}


# ---------------------------------------------------------------------------------------------- (b) init
def init_quality(src: Path, work: Path, bits: int, group: int, r: int, scaling: float, tok, texts, tokens: int,
                 seqlen: int, variants: list[str]) -> dict:
    packed = work / f"int{bits}"
    t = time.perf_counter()
    if not (packed / "lowbitpack.json").is_file():
        lowbitpack.quantize(src, packed, f"int{bits}", group_size=group, progress=False)
    quant_s = time.perf_counter() - t
    art = Artifact.open(packed)
    model = load_dequantized_model(art, torch.float32)  # Q(W) everywhere the artifact quantized
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    w = original_weights(src, names)
    q = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    row: dict = {"scheme": f"int{bits}", "group_size": group, "quantize_s": round(quant_s, 1), "variants": {}}
    params = 0
    deltas: dict[str, dict[str, torch.Tensor]] = {v: {} for v in variants if v != "zeros"}
    t = time.perf_counter()
    for n in names:
        e = w[n] - q[n]
        out_f, in_f = e.shape
        k = layer_budget(in_f, out_f, None, r)
        params += k
        for v in deltas:
            if v in ("channel", "global"):
                idx, spec = init_from_error(e, k, scaling, v)  # what `train --adapter qwha --qwha-init error` does
            else:  # random locations (the reference's draw), values = the optimal ones there (F at those entries)
                idx = random_locations(out_f, in_f, k, 777)
                full = wht(e.double())
                spec = full[idx[0], idx[1]].float() / (scaling / math.sqrt(out_f))
            deltas[v][n] = qwha_delta(spec, idx, scaling, (out_f, in_f))
    row["init_s"] = round(time.perf_counter() - t, 1)
    row["adapted_layers"] = len(names)
    row["params_total"] = params
    for v in variants:
        d = deltas.get(v, {})
        errs = {n: w[n] - q[n] - d.get(n, 0) for n in names}
        rec = {"rel_frob": frob(errs, w)}
        set_weights(model, {n: q[n] + d[n] for n in d} if d else q)
        t = time.perf_counter()
        rec["ppl"] = perplexity(model, tok, texts, seqlen=seqlen, max_tokens=tokens)
        rec["ppl_s"] = round(time.perf_counter() - t, 1)
        row["variants"][v] = rec
        print(f"  int{bits} {v:8s} rel_frob={rec['rel_frob']['all_layers']:.4f} "
              f"ppl={rec['ppl']['ppl']:.3f} ({rec['ppl_s']}s)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------- (a) merge
def merge_exactness(src: Path, work: Path, group: int, r: int, steps: int, lr: float, ids: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    packed = work / "int4"
    if not (packed / "lowbitpack.json").is_file():
        lowbitpack.quantize(src, packed, "int4", group_size=group, progress=False)
    adapter, bundle = work / "adapter", work / "bundle"
    for p in (adapter, bundle, work / "m16", work / "m16bf", work / "r4", work / "r4f"):
        shutil.rmtree(p, ignore_errors=True)
    t = time.perf_counter()
    rec = lowbitpack.api.train(packed, adapter, adapter="qwha", r=r, target_modules=TARGETS, max_steps=steps,
                               batch_size=2, seq_len=128, lr=lr, dtype="fp32", progress=False)
    res: dict = {"train": {"steps": rec["result"]["steps"], "lr": lr, "scaling": rec["hparams"]["scaling"],
                           "first_loss": rec["result"]["first_loss"], "last_loss": rec["result"]["last_loss"],
                           "trainable_params": rec["result"]["trainable_params"],
                           "init_rel_frob_mean_before": rec["init"]["mean_before"],
                           "init_rel_frob_mean_after": rec["init"]["mean_after"],
                           "seconds": round(time.perf_counter() - t, 1)}}
    lowbitpack.api.bundle(adapter, packed, bundle)
    ad = read_peft_adapter(adapter)
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    w = {m: orig.get_submodule(m).weight.detach().float().clone() for m in ad.modules}
    base_logits = logits(orig, ids)
    full = {m: qwha_delta(p["spectrum"], p["indices"], module_scaling(p, ad.config), tuple(w[m].shape))
            for m, p in ad.modules.items()}
    learned = {m: ad.delta_weight(m, tuple(w[m].shape)) for m in ad.modules}  # saved − initial spectrum
    res["adapter"] = {"modules": len(ad.modules),
                      "dW_full_rel_norm": frob(full, w)["all_layers"], "dW_learned_rel_norm": frob(learned, w)["all_layers"]}

    # 1. packed int4 base: the trained model (unmerged) vs Q4(W) + ΔW merged into dense weights
    trained = load_packed_model(packed, torch.float32)
    attach_saved(trained, adapter, "saved")
    u4 = logits(trained, ids)
    q4 = load_dequantized_model(packed, torch.float32)
    q4_w = {m: q4.get_submodule(m).weight.detach().clone() for m in ad.modules}
    set_weights(q4, {m: q4_w[m] + full[m] for m in ad.modules})
    m4 = logits(q4, ids)
    naive = {}
    for m, p in ad.modules.items():
        naive[m] = q4_w[m] + reference_merge_delta(p["spectrum"], p["indices"], module_scaling(p, ad.config),
                                                   tuple(w[m].shape))
    set_weights(q4, naive)
    n4 = logits(q4, ids)
    set_weights(q4, q4_w)
    q4_logits = logits(q4, ids)
    res["int4_base"] = {"unmerged_vs_merged_max_abs": diff(u4, m4), "unmerged_vs_reference_merge_max_abs": diff(u4, n4),
                        "adapter_effect_max_abs": diff(u4, q4_logits), "logit_max_abs": float(u4.abs().max())}
    del q4

    # 2. 16-bit original: unmerged QWHA (learned part) on W vs merge --restore 16, float32 and bf16
    t = time.perf_counter()
    lowbitpack.api.merge(bundle, work / "m16", restore=16, dtype="fp32", original=src, progress=False)
    res["merge16_s"] = round(time.perf_counter() - t, 1)
    m16 = logits(AutoModelForCausalLM.from_pretrained(work / "m16", dtype=torch.float32).eval(), ids)
    attach_saved(orig, adapter, "learned")
    u16 = logits(orig, ids)
    naive16 = {m: w[m] + reference_merge_delta(learned_spectrum(p), p["indices"], module_scaling(p, ad.config),
                                               tuple(w[m].shape)) for m, p in ad.modules.items()}
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    set_weights(plain, naive16)
    n16 = logits(plain, ids)
    del plain
    res["restore16_fp32"] = {"unmerged_vs_merged_max_abs": diff(u16, m16),
                             "unmerged_vs_reference_merge_max_abs": diff(u16, n16),
                             "adapter_effect_max_abs": diff(u16, base_logits), "logit_max_abs": float(u16.abs().max()),
                             "vs_trained_int4_model_max_abs": diff(m16, u4)}
    del orig
    # bf16: the default merge (source dtype) in bf16 compute vs the unmerged QWHA layers on the bf16 original
    lowbitpack.api.merge(bundle, work / "m16bf", restore=16, original=src, progress=False)
    mbf = logits(AutoModelForCausalLM.from_pretrained(work / "m16bf", dtype=torch.bfloat16).eval(), ids)
    obf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    bf_floor = diff(logits(obf, ids), base_logits)  # bf16 vs fp32 compute of the same original, for scale
    attach_saved(obf, adapter, "learned")
    ubf = logits(obf, ids)
    del obf
    res["restore16_bf16"] = {"unmerged_vs_merged_max_abs": diff(ubf, mbf), "logit_max_abs": float(ubf.abs().max()),
                             "merged_bf16_vs_unmerged_fp32_max_abs": diff(mbf, u16),
                             "original_bf16_vs_fp32_max_abs": bf_floor}
    shutil.rmtree(work / "m16bf", ignore_errors=True)

    # 3. restore at the training bits: int4 + adapter beside, and --fold
    m = lowbitpack.api.merge(bundle, work / "r4", restore=4, original=src, progress=False)
    same_base = same_as_training_base(bundle, work / "r4", ad.modules)  # stored-tensor sha256 vs the bundle's
    beside = load_packed_model(work / "r4", torch.float32)
    attach_saved(beside, work / "r4", "saved")
    r4 = logits(beside, ids)
    del beside
    res["restore4_beside"] = {"restored_base_identical_to_training_base": f"{len(same_base)}/{len(ad.modules)} modules",
                              "vs_trained_model_max_abs": diff(r4, u4), "logit_max_abs": float(r4.abs().max())}
    m = lowbitpack.api.merge(bundle, work / "r4f", restore=4, fold=True, original=src, progress=False)
    f4 = logits(load_packed_model(work / "r4f", torch.float32), ids)
    res["restore4_fold"] = {"vs_trained_model_max_abs": diff(f4, u4), "vs_merged16_max_abs": diff(f4, m16),
                            "fold_error_mean": m["errors"]["mean"], "adapter_rel_norm_mean": m["errors"]["adapter_rel_norm_mean"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group", type=int, default=128, help="RTN group size (the project's default for intN)")
    ap.add_argument("--r", type=int, default=16, help="budget per layer n_frequency = r*(in+out) (train's default)")
    ap.add_argument("--scaling", type=float, default=3000.0)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--variants", default="zeros,channel,global,random")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--logit-windows", type=int, default=2)
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--work", default="/tmp/qwha_bench")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "qwha_quality.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    src = lowbitpack.api.default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from lowbitpack.train import token_windows
    tok = AutoTokenizer.from_pretrained(str(src))
    texts = kjv_split()["test"]
    res: dict = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " .venv/bin/python "
                   + " ".join(shlex.quote(a) for a in ["bench/qwha_quality.py"] + sys.argv[1:]),
        "model": str(src), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "targets": list(TARGETS), "budget": f"n_frequency = {args.r}*(in+out) per layer (LoRA-r{args.r}-sized)",
        "scaling": args.scaling,
        "eval": {"data": "kjv_split()['test']", "tokens": args.tokens, "seqlen": args.seqlen, "dtype": "float32"},
    }
    from transformers import AutoModelForCausalLM
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    t = time.perf_counter()
    res["original_ppl"] = perplexity(orig, tok, texts, seqlen=args.seqlen, max_tokens=args.tokens)
    print(f"original ppl={res['original_ppl']['ppl']:.3f} ({time.perf_counter() - t:.1f}s)", flush=True)
    del orig
    if not args.skip_merge:
        ids = token_windows(tok, texts, 128, max_windows=args.logit_windows)
        res["merge"] = {"logit_batch": list(ids.shape), **merge_exactness(src, work, args.group, args.r, args.steps,
                                                                            args.lr, ids)}
        print(json.dumps(res["merge"], indent=1), flush=True)
    res["init"] = {}
    variants = args.variants.split(",")
    for b in (int(x) for x in args.bits.split(",")):
        res["init"][f"int{b}"] = init_quality(src, work, b, args.group, args.r, args.scaling, tok, texts, args.tokens,
                                              args.seqlen, variants)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out} in {res['seconds']}s")


if __name__ == "__main__":
    main()
