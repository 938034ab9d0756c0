"""QA-LoRA on SmolLM2-135M: quantize (qalora), train a short QA-LoRA adapter, bundle, fold exactly, export.

    .venv/bin/python bench/qalora_fold.py --bits 4 --steps 20        # writes bench/results/qalora_fold-b4.json

Per bit width: logits of the packed base + adapter (PEFT pooled forward on LowBitLinear) vs the folded b-bit
artifact (merge --restore b --fold) on held-out KJV windows: max abs diff (should be float rounding), the adapter's
own effect for scale, PLR-16 (W + ΔW) vs the pooled adapter on the original, and the exports' reports
(GGUF Q4_1 for 4 bits, GPTQ with integer zero points: rounding error per layer and summarised).
`--random-b` skips training and draws a nonzero B instead (said so in the output).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import lowbitpack
from lowbitpack.lowbit_linear import attach_adapter, load_packed_model


def held_out_ids(tokenizer_dir: Path, n: int, seq: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from lowbitpack.data import kjv_split
    from lowbitpack.train import token_windows
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return token_windows(tok, kjv_split()["test"], seq, max_windows=n)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def randomize_b(adapter: Path, scale: float, seed: int = 0) -> None:
    from safetensors.torch import load_file, save_file
    f = adapter / "adapter_model.safetensors"
    t = load_file(str(f))
    gen = torch.Generator().manual_seed(seed)
    for k in t:
        if k.endswith("lora_B.weight"):
            t[k] = torch.randn(t[k].shape, generator=gen) * scale
    save_file(t, str(f), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--random-b", type=float, default=None, help="skip training: B ~ N(0, this^2)")
    ap.add_argument("--work", default="/tmp/qalora_bench")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--formats", default="gguf,gptq")
    ap.add_argument("--reuse", action="store_true", help="keep WORK/bN/packed and adapter from an earlier run")
    args = ap.parse_args()

    src = lowbitpack.api.default_model()
    work = Path(args.work) / f"b{args.bits}"
    reuse = args.reuse and (work / "adapter" / "lowbitpack_training.json").is_file()
    for p in work.iterdir() if work.is_dir() else ():
        if not (reuse and p.name in ("packed", "adapter")):
            shutil.rmtree(p, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": str(src), "bits": args.bits, "group": args.group, "torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    if not reuse:
        lowbitpack.quantize(src, work / "packed", "qalora", bits=args.bits, group_size=args.group, progress=False)
    res["quantize_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    steps = 1 if args.random_b is not None else args.steps
    if not reuse:
        lowbitpack.api.train(work / "packed", work / "adapter", adapter="qalora", r=16, alpha=16,
                             max_steps=steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr, progress=False)
    rec = json.loads((work / "adapter" / "lowbitpack_training.json").read_text())
    res["train"] = {"steps": rec["result"]["steps"], "first_loss": rec["result"]["first_loss"],
                    "last_loss": rec["result"]["last_loss"], "seconds": rec["result"]["seconds"],
                    "compute_dtype": rec["hparams"]["compute_dtype"], "random_b": args.random_b}
    if args.random_b is not None and not reuse:
        randomize_b(work / "adapter", args.random_b)
    res["train_s"] = round(time.perf_counter() - t, 1)
    lowbitpack.api.bundle(work / "adapter", work / "packed", work / "bundle")
    t = time.perf_counter()
    m = lowbitpack.api.merge(work / "bundle", work / "folded", restore=args.bits, fold=True, progress=False)
    res["merge_s"] = round(time.perf_counter() - t, 1)
    fold = m["restore"]["qalora_fold"]
    res["fold"] = {k: v for k, v in fold.items() if k != "tensors"}
    res["restore_errors"] = {k: v for k, v in m["errors"].items() if k != "tensors"}

    ids = held_out_ids(work / "packed", args.eval_windows, args.seq)
    base = logits(load_packed_model(work / "packed"), ids)
    adapted = logits(attach_adapter(load_packed_model(work / "packed"), work / "adapter"), ids)
    merged = logits(load_packed_model(work / "folded"), ids)
    res["logits"] = {"windows": list(ids.shape), "adapter_effect_max_abs": float((adapted - base).abs().max()),
                     "fold_vs_adapter_max_abs": float((merged - adapted).abs().max()),
                     "logit_max_abs": float(adapted.abs().max())}

    # PLR-16: W + ΔW (expanded per group) vs the pooled adapter on the original, float32
    from transformers import AutoModelForCausalLM
    lowbitpack.api.merge(work / "bundle", work / "plr16", restore=16, dtype="fp32", progress=False)
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    on_orig = logits(attach_adapter(orig, work / "adapter"), ids)
    plr = logits(AutoModelForCausalLM.from_pretrained(work / "plr16", dtype=torch.float32).eval(), ids)
    res["logits"]["plr16_vs_pooled_on_original_max_abs"] = float((plr - on_orig).abs().max())
    shutil.rmtree(work / "plr16", ignore_errors=True)

    res["exports"] = {}
    for fmt in [f for f in args.formats.split(",") if f]:
        t = time.perf_counter()
        mm = lowbitpack.api.merge(work / "bundle", work / f"out-{fmt}", restore=args.bits, fold=True, format=fmt,
                                  progress=False)
        exp = mm["restore"]["qalora_fold"]["export"]
        e = exp["exporter"]
        keep = {k: e.get(k) for k in ("exact", "max_abs_error", "exact_intg_tensors", "types", "errors", "file",
                                      "checkpoint_format", "notes") if k in e}
        keep["seconds"] = round(time.perf_counter() - t, 1)
        keep["options"] = exp["options"]
        if "integer_zero_rounding" in exp:
            r = exp["integer_zero_rounding"]
            keep["integer_zero_rounding"] = {"summary": r["summary"], "adapted_layers": {
                n: v for n, v in r["tensors"].items() if "error_vs_adapter" in v}}
        res["exports"][fmt] = keep
    out = Path(__file__).parent / "results" / f"qalora_fold-b{args.bits}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "exports"}, indent=1))
    for fmt, e in res["exports"].items():
        print(fmt, json.dumps({k: v for k, v in e.items() if k != "integer_zero_rounding"})[:600])
        if "integer_zero_rounding" in e:
            print("  integer zeros:", json.dumps(e["integer_zero_rounding"]["summary"]))


if __name__ == "__main__":
    main()
